//! The gzip index document: what `lazysnap index` writes for one layer and the snapshotter
//! reads back — the layer it describes, its resume points with their windows, the parts the
//! spans between them are cut into (where each ends in the uncompressed stream and in the
//! blob, and the sha256 of its uncompressed bytes), and the tar's entries with where each
//! file's bytes start in the uncompressed stream. A little-endian binary layout, the whole
//! zstd-compressed (the windows are most of it and compress like the layer's data).
//!
//! Version 1 (`LZGZIX01`) had one digest per span and no parts; it is still read, as one part
//! per span. Parts (version 2) let a read that needs the start of a span fetch only the
//! compressed bytes up to the end of the part it needs, not to the end of the span.
//!
//! The document comes from the registry, so decoding trusts nothing: every count, length and
//! offset is checked against the bytes that remain and against `[limits]` before anything is
//! allocated for it, and the resume points must be ordered and within the layer.

use std::io::Read;

use super::zran::{Checkpoint, WINDOW};
use crate::chunk::ChunkDigest;
use crate::metadata::{over_limit, Limits};

const MAGIC_V1: &[u8; 8] = b"LZGZIX01";
const MAGIC: &[u8; 8] = b"LZGZIX02";
/// Digest strings are `sha256:` and 64 hex digits.
const MAX_DIGEST_BYTES: usize = 71;

/// Why an index document was refused.
#[derive(Debug, thiserror::Error)]
pub enum IndexFileError {
    #[error("decompressing the index")]
    Decompress(#[source] std::io::Error),
    #[error("not a lazysnap gzip index (bad magic)")]
    Magic,
    #[error("the index ends inside {0}")]
    Truncated(&'static str),
    #[error("{0}")]
    Invalid(String),
    /// Over a `[limits]` key; the message names it.
    #[error("{0}")]
    Limit(String),
}

/// The kind of a tar entry, with what only that kind has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TarKind {
    File,
    Dir,
    Symlink(String),
    HardLink(String),
    CharDevice(u32, u32),
    BlockDevice(u32, u32),
    Fifo,
}

/// One tar entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarEntry {
    pub name: String,
    pub kind: TarKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the epoch.
    pub mtime: i64,
    /// Regular files: bytes.
    pub size: u64,
    /// Regular files: where the bytes start in the uncompressed stream.
    pub offset: u64,
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// A stretch of a span, ending at a deflate block boundary: the unit a read fetches (from its
/// span's resume point to `blob_end`), inflates and verifies. A part starts where the one
/// before it ends (the first at 0); every resume point is the end of a part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// Uncompressed offset of the part's end.
    pub out_end: u64,
    /// The blob bytes before this offset are enough to inflate the part's span up to
    /// `out_end`.
    pub blob_end: u64,
    /// The sha256 of the part's uncompressed bytes.
    pub digest: ChunkDigest,
}

/// The index of one gzip layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GzipIndex {
    /// The layer blob's digest (`sha256:...`).
    pub layer_digest: String,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    /// Resume points, the first at output offset 0; span `k` runs from point `k` to point
    /// `k + 1` (the last to `uncompressed_size`).
    pub checkpoints: Vec<Checkpoint>,
    /// The parts the spans are cut into, in stream order, covering it whole.
    pub parts: Vec<Part>,
    pub entries: Vec<TarEntry>,
}

impl GzipIndex {
    /// Span `k`'s uncompressed bytes `start..end`.
    pub fn span_out(&self, k: usize) -> Option<std::ops::Range<u64>> {
        let start = self.checkpoints.get(k)?.out;
        let end = self
            .checkpoints
            .get(k + 1)
            .map_or(self.uncompressed_size, |p| p.out);
        Some(start..end)
    }

    /// The blob bytes to fetch to inflate span `k`: from its checkpoint's partial byte to
    /// the next checkpoint's (whose last bits end the span's last block), or the blob's end.
    pub fn span_blob(&self, k: usize) -> Option<std::ops::Range<u64>> {
        let start = self.checkpoints.get(k)?.fetch_from();
        let end = self
            .checkpoints
            .get(k + 1)
            .map_or(self.compressed_size, |p| {
                p.input.saturating_add(1).min(self.compressed_size)
            });
        Some(start..end)
    }

    /// Part `j`'s uncompressed bytes `start..end`.
    pub fn part_out(&self, j: usize) -> Option<std::ops::Range<u64>> {
        let end = self.parts.get(j)?.out_end;
        let start = match j {
            0 => 0,
            _ => self.parts.get(j - 1)?.out_end,
        };
        Some(start..end)
    }

    /// The span part `j` belongs to.
    pub fn span_of_part(&self, j: usize) -> Option<usize> {
        let start = self.part_out(j)?.start;
        self.checkpoints
            .partition_point(|p| p.out <= start)
            .checked_sub(1)
    }

    /// The blob bytes to fetch to inflate part `j`: from its span's resume point to the
    /// part's end.
    pub fn part_blob(&self, j: usize) -> Option<std::ops::Range<u64>> {
        let start = self.checkpoints.get(self.span_of_part(j)?)?.fetch_from();
        Some(start..self.parts.get(j)?.blob_end)
    }

    /// The document, zstd-compressed at a high level: the index is written once and fetched
    /// by every node, so a smaller one is worth the second or so per layer.
    pub fn encode(&self) -> std::io::Result<Vec<u8>> {
        let mut w = Vec::new();
        w.extend_from_slice(MAGIC);
        put_bytes(&mut w, self.layer_digest.as_bytes());
        w.extend_from_slice(&self.compressed_size.to_le_bytes());
        w.extend_from_slice(&self.uncompressed_size.to_le_bytes());
        w.extend_from_slice(&(self.checkpoints.len() as u32).to_le_bytes());
        for p in &self.checkpoints {
            w.extend_from_slice(&p.out.to_le_bytes());
            w.extend_from_slice(&p.input.to_le_bytes());
            w.push(p.bits);
            put_bytes(&mut w, &p.window);
        }
        w.extend_from_slice(&(self.parts.len() as u32).to_le_bytes());
        for part in &self.parts {
            w.extend_from_slice(&part.out_end.to_le_bytes());
            w.extend_from_slice(&part.blob_end.to_le_bytes());
            w.extend_from_slice(part.digest.as_bytes());
        }
        w.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            let (kind, link, (major, minor)) = match &e.kind {
                TarKind::File => (0u8, "", (0, 0)),
                TarKind::Dir => (1, "", (0, 0)),
                TarKind::Symlink(t) => (2, t.as_str(), (0, 0)),
                TarKind::HardLink(t) => (3, t.as_str(), (0, 0)),
                TarKind::CharDevice(a, b) => (4, "", (*a, *b)),
                TarKind::BlockDevice(a, b) => (5, "", (*a, *b)),
                TarKind::Fifo => (6, "", (0, 0)),
            };
            w.push(kind);
            put_bytes(&mut w, e.name.as_bytes());
            put_bytes(&mut w, link.as_bytes());
            for v in [e.mode, e.uid, e.gid, major, minor] {
                w.extend_from_slice(&v.to_le_bytes());
            }
            w.extend_from_slice(&e.mtime.to_le_bytes());
            w.extend_from_slice(&e.size.to_le_bytes());
            w.extend_from_slice(&e.offset.to_le_bytes());
            w.extend_from_slice(&(e.xattrs.len() as u32).to_le_bytes());
            for (k, v) in &e.xattrs {
                put_bytes(&mut w, k.as_bytes());
                put_bytes(&mut w, v);
            }
        }
        zstd::encode_all(&w[..], 19)
    }

    /// Decodes and checks a document (as [`GzipIndex::encode`] wrote it) within `limits`.
    pub fn decode(compressed: &[u8], limits: &Limits) -> Result<Self, IndexFileError> {
        let mut raw = Vec::new();
        zstd::stream::read::Decoder::new(compressed)
            .map_err(IndexFileError::Decompress)?
            .take(limits.max_toc_bytes.saturating_add(1))
            .read_to_end(&mut raw)
            .map_err(IndexFileError::Decompress)?;
        if raw.len() as u64 > limits.max_toc_bytes {
            return Err(IndexFileError::Limit(format!(
                "gzip index of more than {0} bytes exceeds the limit of {0} ([limits] max_toc_bytes)",
                limits.max_toc_bytes
            )));
        }
        let mut r = Cursor { buf: &raw, pos: 0 };
        let v1 = match r.take(MAGIC.len(), "the magic")? {
            m if m == MAGIC => false,
            m if m == MAGIC_V1 => true,
            _ => return Err(IndexFileError::Magic),
        };
        let digest = r.string(MAX_DIGEST_BYTES as u64, "the layer digest")?;
        if ChunkDigest::parse(&digest).is_none() || !digest.starts_with("sha256:") {
            return Err(invalid(format!(
                "layer digest {digest:?} is not sha256:<hex>"
            )));
        }
        let compressed_size = r.u64("the compressed size")?;
        let uncompressed_size = r.u64("the uncompressed size")?;
        // out, input, bits, window length (and in version 1 a digest): at least 21 bytes
        // each.
        let n = r.count(
            if v1 { 53 } else { 21 },
            limits.max_entries,
            "resume points",
        )?;
        if n == 0 {
            return Err(invalid("no resume points".into()));
        }
        let mut checkpoints: Vec<Checkpoint> = Vec::with_capacity(n);
        let mut span_digests = Vec::with_capacity(if v1 { n } else { 0 });
        for k in 0..n {
            let out = r.u64("a resume point")?;
            let input = r.u64("a resume point")?;
            let bits = r.u8("a resume point")?;
            let window = r.bytes(WINDOW as u64, "a window")?.to_vec();
            if v1 {
                let mut digest = [0u8; 32];
                digest.copy_from_slice(r.take(32, "a span digest")?);
                span_digests.push(ChunkDigest::from_bytes(digest));
            }
            let ordered = match checkpoints.last() {
                None => out == 0,
                Some(prev) => out > prev.out && input > prev.input,
            };
            if !ordered || bits > 7 || input > compressed_size || out > uncompressed_size {
                return Err(invalid(format!(
                    "resume point {k} (out {out}, in {input}, bits {bits}) is out of order or outside the layer"
                )));
            }
            if window.len() as u64 > out {
                return Err(invalid(format!(
                    "resume point {k} has a window of {} bytes at output offset {out}",
                    window.len()
                )));
            }
            checkpoints.push(Checkpoint {
                out,
                input,
                bits,
                window,
            });
        }
        let mut index = GzipIndex {
            layer_digest: digest,
            compressed_size,
            uncompressed_size,
            checkpoints,
            parts: Vec::new(),
            entries: Vec::new(),
        };
        for k in 0..n {
            let (Some(out), Some(blob)) = (index.span_out(k), index.span_blob(k)) else {
                return Err(invalid(format!("span {k} is empty")));
            };
            let len = out.end - out.start;
            if len > limits.max_chunk_bytes {
                return Err(IndexFileError::Limit(format!(
                    "span {k}: {}",
                    over_limit(
                        "chunk",
                        len,
                        " bytes",
                        limits.max_chunk_bytes,
                        "max_chunk_bytes"
                    )
                )));
            }
            let fetched = blob.end.saturating_sub(blob.start);
            if blob.end < blob.start || fetched > Limits::extent_bound(len) {
                return Err(invalid(format!(
                    "span {k} claims {fetched} compressed bytes for {len} bytes of output"
                )));
            }
        }
        index.parts = if v1 {
            // One part per span, ending where the span does.
            (0..n)
                .filter_map(|k| {
                    let out = index.span_out(k)?;
                    let blob = index.span_blob(k)?;
                    // An empty last span has no bytes to verify: no part.
                    (out.end > out.start).then_some(Part {
                        out_end: out.end,
                        blob_end: blob.end,
                        digest: *span_digests.get(k)?,
                    })
                })
                .collect()
        } else {
            // out end, blob end, digest: 48 bytes each.
            let m = r.count(48, limits.max_entries, "parts")?;
            let mut parts = Vec::with_capacity(m);
            for _ in 0..m {
                let out_end = r.u64("a part")?;
                let blob_end = r.u64("a part")?;
                let mut digest = [0u8; 32];
                digest.copy_from_slice(r.take(32, "a part digest")?);
                parts.push(Part {
                    out_end,
                    blob_end,
                    digest: ChunkDigest::from_bytes(digest),
                });
            }
            parts
        };
        check_parts(&index, limits)?;
        // kind (1), name and link lengths (4 + 4), 5 u32, mtime, size and offset (3 x 8) and
        // the xattr count (4): at least 57 bytes each. More would refuse an honest index of a
        // few short-named files.
        let n = r.count(57, limits.max_entries, "entries")?;
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let kind = r.u8("an entry")?;
            let name = r.string(limits.max_path_bytes, "an entry's name")?;
            let link = r.string(limits.max_path_bytes.max(limits.max_link_bytes), "a link")?;
            let mut u = [0u32; 5];
            for v in &mut u {
                *v = r.u32("an entry")?;
            }
            let mtime = r.u64("an entry")? as i64;
            let size = r.u64("an entry")?;
            let offset = r.u64("an entry")?;
            let kind = match kind {
                0 => TarKind::File,
                1 => TarKind::Dir,
                2 => TarKind::Symlink(link),
                3 => TarKind::HardLink(link),
                4 => TarKind::CharDevice(u[3], u[4]),
                5 => TarKind::BlockDevice(u[3], u[4]),
                6 => TarKind::Fifo,
                other => return Err(invalid(format!("entry {name:?} has kind {other}"))),
            };
            if kind == TarKind::File
                && offset
                    .checked_add(size)
                    .is_none_or(|end| end > uncompressed_size)
            {
                return Err(invalid(format!(
                    "file {name:?} of {size} bytes at {offset} is outside the layer's {uncompressed_size} bytes"
                )));
            }
            // Name and value, at least 8 bytes each; their sizes the builder checks again.
            let x = r.count(8, limits.max_xattr_bytes, "extended attributes")?;
            let mut xattrs = Vec::with_capacity(x);
            let mut total: u64 = 0;
            for _ in 0..x {
                let k = r.string(limits.max_xattr_name_bytes, "an xattr name")?;
                let v = r
                    .bytes(limits.max_xattr_value_bytes, "an xattr value")?
                    .to_vec();
                total = total.saturating_add((k.len() + v.len()) as u64);
                if total > limits.max_xattr_bytes {
                    return Err(IndexFileError::Limit(format!(
                        "entry {name:?}: {}",
                        over_limit(
                            "extended attributes",
                            total,
                            " bytes",
                            limits.max_xattr_bytes,
                            "max_xattr_bytes"
                        )
                    )));
                }
                xattrs.push((k, v));
            }
            entries.push(TarEntry {
                name,
                kind,
                mode: u[0],
                uid: u[1],
                gid: u[2],
                mtime,
                size,
                offset,
                xattrs,
            });
        }
        if r.pos != raw.len() {
            return Err(invalid(format!(
                "{} bytes after the last entry",
                raw.len() - r.pos
            )));
        }
        index.entries = entries;
        Ok(index)
    }
}

/// The parts must cover the stream in order, each within its span (every resume point ends
/// one), and claim no more compressed bytes than their output can need: a read trusts these
/// extents for the size of what it fetches and inflates.
fn check_parts(index: &GzipIndex, limits: &Limits) -> Result<(), IndexFileError> {
    let mut prev = 0;
    for (j, part) in index.parts.iter().enumerate() {
        if part.out_end <= prev || part.out_end > index.uncompressed_size {
            return Err(invalid(format!(
                "part {j} ends at {} after {prev}, or outside the layer's {} bytes",
                part.out_end, index.uncompressed_size
            )));
        }
        prev = part.out_end;
    }
    if prev != index.uncompressed_size {
        return Err(invalid(format!(
            "the parts end at {prev}, the layer at {}",
            index.uncompressed_size
        )));
    }
    for (k, p) in index.checkpoints.iter().enumerate().skip(1) {
        if index
            .parts
            .binary_search_by_key(&p.out, |part| part.out_end)
            .is_err()
        {
            return Err(invalid(format!(
                "resume point {k} at {} is inside a part",
                p.out
            )));
        }
    }
    for j in 0..index.parts.len() {
        let (Some(k), Some(out), Some(blob)) =
            (index.span_of_part(j), index.part_out(j), index.part_blob(j))
        else {
            return Err(invalid(format!("part {j} is in no span")));
        };
        let Some(span) = index.span_out(k) else {
            return Err(invalid(format!("part {j} is in no span")));
        };
        // Inflated from the span's start: that much output, bounded by the span's check.
        let decoded = out.end.saturating_sub(span.start);
        if decoded > limits.max_chunk_bytes
            || blob.end < blob.start
            || blob.end > index.compressed_size
            || blob.end - blob.start > Limits::extent_bound(decoded)
        {
            return Err(invalid(format!(
                "part {j} claims compressed bytes {}..{} for {decoded} bytes of output",
                blob.start, blob.end
            )));
        }
    }
    Ok(())
}

fn invalid(reason: String) -> IndexFileError {
    IndexFileError::Invalid(reason)
}

fn put_bytes(w: &mut Vec<u8>, b: &[u8]) {
    w.extend_from_slice(&(b.len() as u32).to_le_bytes());
    w.extend_from_slice(b);
}

/// Reads the document, every read checked against what remains.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], IndexFileError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.buf.len())
            .ok_or(IndexFileError::Truncated(what))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, IndexFileError> {
        Ok(self.take(1, what)?[0])
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, IndexFileError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4, what)?);
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, IndexFileError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_le_bytes(b))
    }

    /// A length-prefixed byte string of at most `limit` bytes.
    fn bytes(&mut self, limit: u64, what: &'static str) -> Result<&'a [u8], IndexFileError> {
        let len = u64::from(self.u32(what)?);
        if len > limit {
            return Err(invalid(format!("{what} of {len} bytes (at most {limit})")));
        }
        self.take(len as usize, what)
    }

    fn string(&mut self, limit: u64, what: &'static str) -> Result<String, IndexFileError> {
        let b = self.bytes(limit, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| invalid(format!("{what} is not UTF-8")))
    }

    /// A count of items of at least `min_size` bytes each: at most `limit`, and no more than
    /// the bytes that remain can hold, so a claimed count never allocates by itself.
    fn count(
        &mut self,
        min_size: usize,
        limit: u64,
        what: &'static str,
    ) -> Result<usize, IndexFileError> {
        let n = u64::from(self.u32(what)?);
        if n > limit {
            return Err(IndexFileError::Limit(format!(
                "gzip index: {n} {what} exceed the limit of {limit} ([limits] max_entries)"
            )));
        }
        let room = (self.buf.len() - self.pos) as u64 / min_size as u64;
        if n > room {
            return Err(IndexFileError::Truncated(what));
        }
        Ok(n as usize)
    }
}
