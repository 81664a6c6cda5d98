//! Building a layer's gzip index in one pass over its compressed bytes: the stream is
//! inflated once ([`CheckpointingInflater`] records the resume points and the finer marks
//! that cut spans into parts), every part is hashed as it goes by, and the tar is parsed
//! from the same bytes for its entries and where each file's data starts. Used by
//! `lazysnap index`; blocking (CPU and the reader's I/O). With a read trace, a second pass
//! ([`plan_cuts`] from the first pass's block boundaries and entries, then [`build_with`])
//! puts resume points right before the traced ranges.

use std::io::Read;

use sha2::{Digest as _, Sha256};

use super::file::{GzipIndex, Part, TarEntry, TarKind};
use super::zran::{Checkpoint, CheckpointingInflater, Cuts, ZranError};
use crate::chunk::ChunkDigest;
use crate::metadata::Limits;

/// The default distance between resume points, in uncompressed bytes: a read fetches the
/// compressed bytes of a span of about this much; smaller spans cost more windows. Windows
/// keep only the bytes their span reads (about a tenth of 32 KiB), so on the benchmark's
/// python image 256 KiB spans cost windows blobs of 2.22% of the layers (and index documents
/// of 0.26%) where whole windows cost 2.9% at 1 MiB.
pub const DEFAULT_SPAN: u64 = 256 << 10;
/// Parts per span: a read fetches the compressed bytes from its span's resume point to the
/// end of the part it needs, not to the span's end. Each part costs 48 bytes of index (its
/// ends and digest): parts of 64 KiB cost about 0.3% of the python image's layers.
pub const PARTS_PER_SPAN: u64 = 4;

/// Why a layer could not be indexed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("inflating the layer")]
    Inflate(#[from] ZranError),
    #[error("reading the layer's tar")]
    Tar(#[source] std::io::Error),
    #[error("tar entry {name:?}: {reason}")]
    Entry { name: String, reason: String },
    #[error("a span of {0} bytes is over the limit of uncompressed bytes per chunk ([limits] max_chunk_bytes)")]
    SpanTooLarge(u64),
}

/// Hashes the uncompressed bytes part by part as the tar reader pulls them through.
struct SpanHasher<R> {
    inner: CheckpointingInflater<R>,
    hasher: Sha256,
    /// Uncompressed bytes hashed so far.
    pos: u64,
    /// Parts whose digest is known (every mark but the first, at 0, ends one).
    digests: Vec<ChunkDigest>,
}

impl<R: Read> SpanHasher<R> {
    /// Feeds `bytes` (the output from `pos` on), closing a part at every mark they reach.
    fn feed(&mut self, mut bytes: &[u8]) {
        loop {
            let next = self.inner.marks().get(self.digests.len() + 1);
            match next {
                Some(p) if p.out <= self.pos + bytes.len() as u64 => {
                    let cut = (p.out - self.pos) as usize;
                    self.hasher.update(&bytes[..cut]);
                    self.pos += cut as u64;
                    bytes = &bytes[cut..];
                    let digest = std::mem::take(&mut self.hasher).finalize();
                    self.digests.push(ChunkDigest::from_bytes(digest.into()));
                }
                _ => break,
            }
        }
        self.hasher.update(bytes);
        self.pos += bytes.len() as u64;
    }
}

impl<R: Read> Read for SpanHasher<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.feed(&buf[..n]);
        Ok(n)
    }
}

/// Traced ranges closer than this (uncompressed) are fetched as one: a resume point between
/// them would cost its window (a few KiB) to save less than that of compressed bytes.
pub const MERGE_GAP: u64 = 16 << 10;
/// At most this many traced ranges (the first read first) get resume points of their own:
/// each costs a window in the registry, and a trace document is input.
pub const MAX_TRACED_RANGES: usize = 4096;

/// A range of a file that a container read early, from a read trace (`lazysnap index
/// --trace`): the index gets a resume point at the last block boundary before it and a part
/// end just after it, so that fetching it takes little more than its own compressed bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TracedRange {
    /// The file's path in the layer.
    pub path: String,
    pub offset: u64,
    pub bytes: u64,
}

/// A built index, and the block boundaries of its stream (for [`plan_cuts`]).
pub struct Built {
    pub index: GzipIndex,
    pub boundaries: Vec<u64>,
}

/// Indexes the gzip tar `blob` (all `compressed_size` bytes of the layer `layer_digest`) with
/// resume points every `span` uncompressed bytes. The caller checks that the bytes read were
/// the layer's (its digest).
pub fn build(
    layer_digest: &str,
    compressed_size: u64,
    blob: impl Read,
    span: u64,
    limits: &Limits,
) -> Result<GzipIndex, BuildError> {
    build_with(
        layer_digest,
        compressed_size,
        blob,
        span,
        limits,
        Cuts::default(),
    )
    .map(|built| built.index)
}

/// Where an index of a layer whose first index is `index` (with the block `boundaries` of its
/// stream) should cut it for `ranges` to be fetched on their own: per range, merged with
/// those within [`MERGE_GAP`], a resume point at the last boundary at or before its start and
/// a part end at its end. Ranges naming no regular file of the layer (or a hard link to one)
/// are passed over.
pub fn plan_cuts(index: &GzipIndex, boundaries: &[u64], ranges: &[TracedRange]) -> Cuts {
    let clean = |name: &str| name.trim_start_matches("./").trim_matches('/').to_owned();
    let mut files = std::collections::HashMap::new();
    let mut links = Vec::new();
    for e in &index.entries {
        match &e.kind {
            TarKind::File => {
                files.insert(clean(&e.name), (e.offset, e.size));
            }
            TarKind::HardLink(target) => links.push((clean(&e.name), clean(target))),
            _ => {}
        }
    }
    for (name, target) in links {
        if let Some(&file) = files.get(&target) {
            files.entry(name).or_insert(file);
        }
    }
    let mut wanted: Vec<(u64, u64)> = ranges
        .iter()
        .take(MAX_TRACED_RANGES)
        .filter_map(|r| {
            let &(at, size) = files.get(&clean(&r.path))?;
            let start = r.offset.min(size);
            let end = r.offset.saturating_add(r.bytes).min(size);
            (start < end).then(|| (at + start, at + end))
        })
        .collect();
    wanted.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (start, end) in wanted {
        match merged.last_mut() {
            Some(last) if start <= last.1.saturating_add(MERGE_GAP) => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    let mut cuts = Cuts::default();
    for (start, end) in merged {
        let before = boundaries.partition_point(|&b| b <= start);
        if let Some(&point) = before.checked_sub(1).and_then(|i| boundaries.get(i)) {
            if point > 0 && cuts.points.last() != Some(&point) {
                cuts.points.push(point);
            }
        }
        if end < index.uncompressed_size {
            cuts.ends.push(end);
        }
    }
    cuts
}

/// [`build`], cutting the stream at `cuts` too; also returns the stream's block boundaries.
pub fn build_with(
    layer_digest: &str,
    compressed_size: u64,
    blob: impl Read,
    span: u64,
    limits: &Limits,
    cuts: Cuts,
) -> Result<Built, BuildError> {
    let max_points = usize::try_from(limits.max_entries).unwrap_or(usize::MAX);
    let part = (span / PARTS_PER_SPAN).max(1);
    let inflater = CheckpointingInflater::new(blob, span, part, max_points)?.with_cuts(cuts);
    let hashing = SpanHasher {
        inner: inflater,
        hasher: Sha256::new(),
        pos: 0,
        digests: Vec::new(),
    };
    let mut archive = tar::Archive::new(hashing);
    let mut entries = Vec::new();
    for entry in archive.entries().map_err(BuildError::Tar)? {
        let mut entry = entry.map_err(BuildError::Tar)?;
        if let Some(e) = describe(&mut entry)? {
            entries.push(e);
        }
    }
    let mut hashing = archive.into_inner();
    // The end-of-archive blocks and any padding: the spans cover the whole stream.
    std::io::copy(&mut hashing, &mut std::io::sink()).map_err(BuildError::Tar)?;
    // A mark recorded by a last call that produced nothing still ends a part.
    hashing.feed(&[]);
    let SpanHasher {
        inner,
        hasher,
        mut digests,
        pos,
    } = hashing;
    let (checkpoints, marks, boundaries) = inner.finish_with_boundaries();
    check_spans(&checkpoints, pos, limits)?;
    // Part j ends at mark j + 1, the last part at the end of the stream (unless a mark is
    // there already, ending an empty last span).
    let mut ends: Vec<(u64, u64)> = marks.iter().skip(1).map(|m| (m.out, m.input)).collect();
    if pos > marks.last().map_or(0, |m| m.out) {
        digests.push(ChunkDigest::from_bytes(hasher.finalize().into()));
        ends.push((pos, compressed_size));
    }
    let parts = ends
        .into_iter()
        .zip(digests)
        .map(|((out_end, input), digest)| Part {
            out_end,
            // As for a span: the partial byte at `input` holds the block's last bits.
            blob_end: input.saturating_add(1).min(compressed_size),
            digest,
        })
        .collect();
    let index = GzipIndex {
        layer_digest: layer_digest.to_owned(),
        compressed_size,
        uncompressed_size: pos,
        checkpoints,
        parts,
        entries,
        windows: None,
        window_refs: Vec::new(),
    };
    Ok(Built { index, boundaries })
}

fn check_spans(points: &[Checkpoint], total: u64, limits: &Limits) -> Result<(), BuildError> {
    for (k, p) in points.iter().enumerate() {
        let end = points.get(k + 1).map_or(total, |n| n.out);
        if end - p.out > limits.max_chunk_bytes {
            return Err(BuildError::SpanTooLarge(end - p.out));
        }
    }
    Ok(())
}

fn describe<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Option<TarEntry>, BuildError> {
    let name =
        String::from_utf8(entry.path_bytes().into_owned()).map_err(|e| BuildError::Entry {
            name: String::from_utf8_lossy(e.as_bytes()).into_owned(),
            reason: "name is not UTF-8".into(),
        })?;
    let bad = |reason: String| BuildError::Entry {
        name: name.clone(),
        reason,
    };
    let link = || -> Result<String, BuildError> {
        let target = entry
            .link_name_bytes()
            .map(|b| b.into_owned())
            .unwrap_or_default();
        String::from_utf8(target).map_err(|_| bad("link target is not UTF-8".into()))
    };
    let header = entry.header();
    let device = || {
        (
            header.device_major().ok().flatten().unwrap_or(0),
            header.device_minor().ok().flatten().unwrap_or(0),
        )
    };
    use tar::EntryType as T;
    let kind = match header.entry_type() {
        T::Regular | T::Continuous => TarKind::File,
        T::Directory => TarKind::Dir,
        T::Symlink => TarKind::Symlink(link()?),
        T::Link => TarKind::HardLink(link()?),
        T::Char => {
            let (a, b) = device();
            TarKind::CharDevice(a, b)
        }
        T::Block => {
            let (a, b) = device();
            TarKind::BlockDevice(a, b)
        }
        T::Fifo => TarKind::Fifo,
        T::XGlobalHeader => return Ok(None),
        other => return Err(bad(format!("unsupported tar entry type {other:?}"))),
    };
    let mode = header.mode().map_err(|e| bad(format!("mode: {e}")))?;
    let mut uid = header.uid().map_err(|e| bad(format!("uid: {e}")))?;
    let mut gid = header.gid().map_err(|e| bad(format!("gid: {e}")))?;
    let mut mtime = header.mtime().map_err(|e| bad(format!("mtime: {e}")))? as i64;
    let mut xattrs = Vec::new();
    if let Some(extensions) = entry.pax_extensions().map_err(BuildError::Tar)? {
        for ext in extensions {
            let ext = ext.map_err(BuildError::Tar)?;
            let Ok(key) = ext.key() else { continue };
            let value = ext.value_bytes();
            let number = || {
                std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.split('.').next())
                    .and_then(|v| v.parse::<i64>().ok())
            };
            if let Some(attr) = key.strip_prefix("SCHILY.xattr.") {
                xattrs.push((attr.to_owned(), value.to_vec()));
            } else if key == "uid" {
                uid = number().map_or(uid, |v| v as u64);
            } else if key == "gid" {
                gid = number().map_or(gid, |v| v as u64);
            } else if key == "mtime" {
                mtime = number().unwrap_or(mtime);
            }
        }
    }
    let is_file = kind == TarKind::File;
    Ok(Some(TarEntry {
        kind,
        mode,
        uid: u32::try_from(uid).map_err(|_| bad(format!("uid {uid}")))?,
        gid: u32::try_from(gid).map_err(|_| bad(format!("gid {gid}")))?,
        mtime,
        size: if is_file { entry.size() } else { 0 },
        offset: if is_file {
            entry.raw_file_position()
        } else {
            0
        },
        xattrs,
        name,
    }))
}
