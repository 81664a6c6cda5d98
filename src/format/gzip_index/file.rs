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
//! Version 3 (`LZGZIX03`) moves the windows out of the document into a blob of their own
//! (the layer's windows blob, pushed in the same artifact), each window zstd-compressed on
//! its own and located by offset and length, with the sha256 of its bytes in the document:
//! the windows were most of a version 2 document (2.9 of the 12.9 MiB the python image's
//! cold start fetched), and a start needs the windows of the few spans it reads only. The
//! snapshotter fetches a span's window by range request, together with the span's
//! compressed bytes, and checks it against its digest before inflating with it.
//!
//! The document comes from the registry, so decoding trusts nothing: every count, length and
//! offset is checked against the bytes that remain and against `[limits]` before anything is
//! allocated for it, and the resume points must be ordered and within the layer.

use std::io::Read;

use sha2::{Digest as _, Sha256};

use super::zran::{Checkpoint, Stretches, WINDOW};
use crate::chunk::ChunkDigest;
use crate::metadata::{over_limit, Limits};

const MAGIC_V1: &[u8; 8] = b"LZGZIX01";
const MAGIC_V2: &[u8; 8] = b"LZGZIX02";
const MAGIC_V3: &[u8; 8] = b"LZGZIX03";
/// The most compressed bytes a window may claim in the windows blob: zstd's bound for
/// [`WINDOW`] bytes of incompressible input (a frame header, 128 KiB blocks of 3-byte
/// headers), with room to spare. An honest window is never larger.
pub const MAX_STORED_WINDOW: u64 = WINDOW as u64 + (WINDOW as u64 >> 7) + 1024;
/// The zstd level of each window: windows are written once and fetched by every node.
const WINDOW_LEVEL: i32 = 19;
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
    /// Version 3: the blob holding the windows, and where each resume point's window is in
    /// it (one per checkpoint); the checkpoints' own windows are then empty. Empty for
    /// versions 1 and 2 and for an index just built, whose windows are in its checkpoints.
    pub windows: Option<WindowsBlob>,
    pub window_refs: Vec<WindowRef>,
}

/// The blob of a version 3 index's windows, in the same repository as the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowsBlob {
    /// `sha256:...`
    pub digest: String,
    pub size: u64,
}

/// Where one resume point's window is in the windows blob, and what it must hash to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowRef {
    /// Offset and length of the window's zstd frame in the windows blob (0 and 0 for the
    /// first resume point, which has no window).
    pub offset: u64,
    pub len: u64,
    /// The window's length once decompressed: at most [`WINDOW`] and at most the output
    /// before its resume point.
    pub raw_len: u64,
    /// The sha256 of the decompressed window.
    pub digest: ChunkDigest,
}

impl WindowRef {
    /// Blob bytes `offset..offset + len` (checked when the index was decoded).
    pub fn range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset.saturating_add(self.len)
    }
}

/// A version 3 index as it is pushed: the document, and the windows blob it names.
#[derive(Debug, Clone)]
pub struct EncodedIndex {
    pub index: Vec<u8>,
    pub windows: Vec<u8>,
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

    /// Puts a version 3 index's windows back into its checkpoints, from its windows blob
    /// (each checked against its digest), so that it can be encoded again as version 3. The
    /// bytes a window does not keep are zeros: a version 2 document, which checks its whole
    /// windows, needs an index built again from the layer.
    pub fn with_windows(&mut self, blob: &[u8]) -> Result<(), IndexFileError> {
        for (k, r) in self.window_refs.iter().enumerate() {
            if r.raw_len == 0 {
                continue;
            }
            let frame = blob
                .get(r.offset as usize..r.range().end as usize)
                .ok_or(IndexFileError::Truncated("the windows blob"))?;
            let (window, used) = open_window(frame, r)
                .map_err(|why| invalid(format!("the window of resume point {k} {why}")))?;
            if let Some(p) = self.checkpoints.get_mut(k) {
                p.window = window;
                p.used = Some(used);
            }
        }
        self.windows = None;
        self.window_refs = Vec::new();
        Ok(())
    }

    /// A version 2 document (the windows inside), as the previous build wrote it: kept so
    /// that reading one stays tested.
    pub fn encode_v2(&self) -> std::io::Result<Vec<u8>> {
        let mut w = Vec::new();
        w.extend_from_slice(MAGIC_V2);
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
        self.encode_rest(w)
    }

    /// The version 3 document and its windows blob, from an index whose checkpoints hold
    /// their windows (as `build` makes it). Each window is compressed on its own, so that
    /// one can be fetched and decompressed alone; the document is compressed whole at a high
    /// level: it is written once and fetched by every node.
    pub fn encode(&self) -> std::io::Result<EncodedIndex> {
        let mut windows = Vec::new();
        let mut refs = Vec::with_capacity(self.checkpoints.len());
        // One context for all, each frame told its size: zstd then fits its tables to a
        // window instead of setting up a level's full ones per frame (52 s instead of a
        // few for the python image's 853 windows).
        let mut compressor = zstd::bulk::Compressor::new(WINDOW_LEVEL)?;
        for p in &self.checkpoints {
            if p.window.is_empty() {
                refs.push(WindowRef {
                    offset: 0,
                    len: 0,
                    raw_len: 0,
                    digest: ChunkDigest::of(&[]),
                });
                continue;
            }
            let record = window_record(&p.window, p.used.as_deref());
            let frame = compressor.compress(&record)?;
            refs.push(WindowRef {
                offset: windows.len() as u64,
                len: frame.len() as u64,
                raw_len: p.window.len() as u64,
                digest: ChunkDigest::of(&record),
            });
            windows.extend_from_slice(&frame);
        }
        let blob_digest = format!("sha256:{}", hex::encode(Sha256::digest(&windows)));
        let mut w = Vec::new();
        w.extend_from_slice(MAGIC_V3);
        put_bytes(&mut w, self.layer_digest.as_bytes());
        w.extend_from_slice(&self.compressed_size.to_le_bytes());
        w.extend_from_slice(&self.uncompressed_size.to_le_bytes());
        put_bytes(&mut w, blob_digest.as_bytes());
        w.extend_from_slice(&(windows.len() as u64).to_le_bytes());
        w.extend_from_slice(&(self.checkpoints.len() as u32).to_le_bytes());
        for (p, r) in self.checkpoints.iter().zip(&refs) {
            w.extend_from_slice(&p.out.to_le_bytes());
            w.extend_from_slice(&p.input.to_le_bytes());
            w.push(p.bits);
            w.extend_from_slice(&r.offset.to_le_bytes());
            w.extend_from_slice(&(r.len as u32).to_le_bytes());
            w.extend_from_slice(&(r.raw_len as u32).to_le_bytes());
            w.extend_from_slice(r.digest.as_bytes());
        }
        Ok(EncodedIndex {
            index: self.encode_rest(w)?,
            windows,
        })
    }

    /// The parts and the entries after the resume points, and the whole compressed.
    fn encode_rest(&self, mut w: Vec<u8>) -> std::io::Result<Vec<u8>> {
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
        let version = match r.take(MAGIC_V3.len(), "the magic")? {
            m if m == MAGIC_V3 => 3,
            m if m == MAGIC_V2 => 2,
            m if m == MAGIC_V1 => 1,
            _ => return Err(IndexFileError::Magic),
        };
        let v1 = version == 1;
        let digest = r.string(MAX_DIGEST_BYTES as u64, "the layer digest")?;
        if !is_sha256(&digest) {
            return Err(invalid(format!(
                "layer digest {digest:?} is not sha256:<hex>"
            )));
        }
        let compressed_size = r.u64("the compressed size")?;
        let uncompressed_size = r.u64("the uncompressed size")?;
        let windows = if version == 3 {
            let digest = r.string(MAX_DIGEST_BYTES as u64, "the windows blob digest")?;
            if !is_sha256(&digest) {
                return Err(invalid(format!(
                    "windows blob digest {digest:?} is not sha256:<hex>"
                )));
            }
            let size = r.u64("the windows blob size")?;
            Some(WindowsBlob { digest, size })
        } else {
            None
        };
        // out, input, bits, then a window's length (4) and bytes, or (version 3) where its
        // window is (8 + 4 + 4) and its digest (32), and in version 1 a span digest (32).
        let min_point = match version {
            1 => 53,
            2 => 21,
            _ => 65,
        };
        let n = r.count(min_point, limits.max_entries, "resume points")?;
        if n == 0 {
            return Err(invalid("no resume points".into()));
        }
        if let Some(w) = &windows {
            // Every window within its bound: a blob claiming more is not an honest one.
            if w.size > (n as u64).saturating_mul(MAX_STORED_WINDOW) {
                return Err(invalid(format!(
                    "a windows blob of {} bytes for {n} resume points",
                    w.size
                )));
            }
        }
        let mut checkpoints: Vec<Checkpoint> = Vec::with_capacity(n);
        let mut window_refs = Vec::with_capacity(if windows.is_some() { n } else { 0 });
        let mut span_digests = Vec::with_capacity(if v1 { n } else { 0 });
        for k in 0..n {
            let out = r.u64("a resume point")?;
            let input = r.u64("a resume point")?;
            let bits = r.u8("a resume point")?;
            let window = match &windows {
                None => r.bytes(WINDOW as u64, "a window")?.to_vec(),
                Some(blob) => {
                    let offset = r.u64("a window's place")?;
                    let len = u64::from(r.u32("a window's place")?);
                    let raw_len = u64::from(r.u32("a window's length")?);
                    let mut d = [0u8; 32];
                    d.copy_from_slice(r.take(32, "a window digest")?);
                    let fits = offset.checked_add(len).is_some_and(|end| end <= blob.size);
                    if !fits
                        || len > MAX_STORED_WINDOW
                        || raw_len > WINDOW as u64
                        || raw_len > out
                        || (len == 0) != (raw_len == 0)
                    {
                        return Err(invalid(format!(
                            "resume point {k} claims a window of {raw_len} bytes at {offset}+{len} of a {} byte windows blob",
                            blob.size
                        )));
                    }
                    window_refs.push(WindowRef {
                        offset,
                        len,
                        raw_len,
                        digest: ChunkDigest::from_bytes(d),
                    });
                    Vec::new()
                }
            };
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
                used: None,
            });
        }
        let mut index = GzipIndex {
            layer_digest: digest,
            compressed_size,
            uncompressed_size,
            checkpoints,
            parts: Vec::new(),
            entries: Vec::new(),
            windows,
            window_refs,
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

/// A window as its blob keeps it (before compression): the number of stretches of it the
/// span reads (u16), each stretch's start and length (u16 each), then their bytes. A window
/// whose use is not known is kept whole, as one stretch.
pub fn window_record(window: &[u8], used: Option<&[(u16, u16)]>) -> Vec<u8> {
    let whole = [(0u16, window.len().min(WINDOW) as u16)];
    let runs: Stretches = used
        .unwrap_or(&whole)
        .iter()
        .copied()
        .filter(|(start, len)| *len > 0 && usize::from(*start) + usize::from(*len) <= window.len())
        .collect();
    let mut out = Vec::with_capacity(2 + 4 * runs.len());
    out.extend_from_slice(&(runs.len() as u16).to_le_bytes());
    for (start, len) in &runs {
        out.extend_from_slice(&start.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
    }
    for (start, len) in &runs {
        let from = usize::from(*start);
        out.extend_from_slice(&window[from..from + usize::from(*len)]);
    }
    out
}

/// A window's frame from the windows blob: decompressed (no more than its record can be:
/// a frame claiming more is refused before it is inflated), checked against its digest,
/// and laid out as the window it stands for, zeros where it keeps no bytes, with the
/// stretches it keeps. The error says why not, after "the window of resume point k".
pub fn open_window(frame: &[u8], r: &WindowRef) -> Result<(Vec<u8>, Stretches), String> {
    // The count, at most one stretch per two bytes (they are at least one byte long and
    // apart), and the bytes.
    let most = 2 + 4 * (WINDOW / 2 + 1) + r.raw_len as usize;
    let record =
        zstd::bulk::decompress(frame, most).map_err(|e| format!("does not decompress ({e})"))?;
    if ChunkDigest::of(&record) != r.digest {
        return Err("does not match its digest".into());
    }
    let bad = |why: &str| format!("is not a valid window record ({why})");
    let count = record
        .get(..2)
        .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])))
        .ok_or_else(|| bad("empty"))?;
    let table = record
        .get(2..2 + 4 * count)
        .ok_or_else(|| bad("its stretches are cut short"))?;
    let mut bytes = &record[2 + 4 * count..];
    let mut window = vec![0u8; r.raw_len as usize];
    let mut runs = Vec::with_capacity(count);
    let mut prev_end = 0usize;
    for entry in table.chunks_exact(4) {
        let start = u16::from_le_bytes([entry[0], entry[1]]);
        let len = u16::from_le_bytes([entry[2], entry[3]]);
        let (from, to) = (usize::from(start), usize::from(start) + usize::from(len));
        if len == 0 || from < prev_end || to > window.len() || bytes.len() < to - from {
            return Err(bad("a stretch is out of order or outside the window"));
        }
        window[from..to].copy_from_slice(&bytes[..to - from]);
        bytes = &bytes[to - from..];
        prev_end = to;
        runs.push((start, len));
    }
    if !bytes.is_empty() {
        return Err(bad("bytes after its stretches"));
    }
    Ok((window, runs))
}

fn is_sha256(digest: &str) -> bool {
    digest.starts_with("sha256:") && ChunkDigest::parse(digest).is_some()
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
