//! The vocabulary every lazy layer module shares about one chunk of a file, kept apart so that
//! the index (`metadata`), the formats, the store (`cache`) and the reader (`layer`) can all
//! speak of chunks without importing each other.
//!
//! A chunk has three names that must not be confused:
//! - its **identity** ([`ChunkId`]): which chunk of which layer, a number the layer's index
//!   hands out; what in-flight tables and prefetch plans are keyed by;
//! - the **digest it is verified against** ([`ChunkDigest`]): the sha256 of its uncompressed
//!   bytes as the layer's index claims it; bytes become [`VerifiedChunk`] only by matching it;
//! - **where it is stored**: the store's business (`cache::ChunkStore`), derived from the spec
//!   and the file it belongs to ([`FileKey`]): the store keeps decompressed bytes per file, at
//!   their file offsets.
//!
//! Two layers may hold chunks with the same digest; they are still different chunks.

use std::ops::Range;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

/// A chunk's identity within its layer: its position in the layer's chunk numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub u32);

/// A sha256 digest of uncompressed bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkDigest([u8; 32]);

impl ChunkDigest {
    /// Accepts `sha256:<lowercase hex>` or bare lowercase hex; anything else is refused, so a
    /// digest can never be a path or anything but 32 bytes.
    pub fn parse(digest: &str) -> Option<Self> {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest).as_bytes();
        if hex.len() != 64 {
            return None;
        }
        // One pass, by hand: a TOC has a digest per chunk, and the `hex` crate's checked
        // decoding was a measurable part of opening a large one.
        let mut out = [0; 32];
        for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
            *byte = (lower_hex_value(pair[0])? << 4) | lower_hex_value(pair[1])?;
        }
        Some(ChunkDigest(out))
    }

    /// A digest from its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        ChunkDigest(bytes)
    }

    /// The digest's 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        ChunkDigest(Sha256::digest(bytes).into())
    }

    /// The digest a hasher fed with the bytes arrives at.
    pub fn of_hasher(hasher: Sha256) -> Self {
        ChunkDigest(hasher.finalize().into())
    }

    /// Lowercase hex, without the algorithm.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// The value of a lowercase hex digit.
fn lower_hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        _ => None,
    }
}

impl std::fmt::Display for ChunkDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl std::fmt::Debug for ChunkDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Which layer blob a chunk was read from and verified against, as the store scopes chunks:
/// a chunk is served to a layer only if that layer's own blob was shown to hold it. The
/// blob's digest and, when the image pins one, its TOC digest (the index that says where
/// each chunk is in the blob), hashed into one 32-byte name: two images share chunks without
/// fetching only if they name the same blob with the same index.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId([u8; 32]);

impl BlobId {
    pub fn new(blob_digest: &str, toc_digest: Option<&str>) -> Self {
        let mut h = Sha256::new();
        h.update(b"lazysnap blob id v1\0");
        h.update(blob_digest.as_bytes());
        h.update(b"\0");
        h.update(toc_digest.unwrap_or("").as_bytes());
        BlobId(h.finalize().into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for BlobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "blob-id:{}", hex::encode(&self.0[..8]))
    }
}

/// Which file of its layer a chunk belongs to, as a content address: the sha256 of the file's
/// whole chunk list (offsets, lengths, blob extents and digests). Two files with the same key
/// hold the same bytes at the same offsets, so the store may keep one copy of them; the index
/// fills it in when it is built (formats leave it zero).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileKey(pub [u8; 32]);

impl FileKey {
    /// The key of a file whose chunks (in file order) are `chunks` and whose size is `size`.
    pub fn of(size: u64, chunks: &[ChunkSpec]) -> Self {
        let mut h = Sha256::new();
        h.update(b"lazysnap file key v1\0");
        h.update(size.to_le_bytes());
        for c in chunks {
            h.update(c.file_offset.to_le_bytes());
            h.update(c.len.to_le_bytes());
            h.update(c.blob_range.start.to_le_bytes());
            h.update(c.blob_range.end.to_le_bytes());
            h.update(c.inner_offset.to_le_bytes());
            h.update(c.within.to_le_bytes());
            h.update(c.digest.0);
        }
        FileKey(h.finalize().into())
    }
}

impl std::fmt::Debug for FileKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "file-key:{}", hex::encode(&self.0[..8]))
    }
}

/// One file's piece of a chunk: what in-flight fetches, prefetch bookkeeping and the store
/// tell apart. A chunk's id alone is not enough where several files share one verified unit
/// (a gzip-index span): each file stores its own piece.
pub type PieceId = (ChunkId, FileKey, u64);

/// One chunk of a regular file, as the layer's index describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkSpec {
    pub id: ChunkId,
    /// The file the chunk belongs to (see [`FileKey`]).
    pub file: FileKey,
    /// Where the chunk's bytes start in the file.
    pub file_offset: u64,
    /// Uncompressed length.
    pub len: u64,
    /// The compressed extent of the blob to fetch to decode the chunk (a gzip member, a zstd
    /// frame, or whatever the format's decoder needs).
    pub blob_range: Range<u64>,
    /// Where the chunk starts in the bytes that decoding `blob_range` yields (non-zero when
    /// several chunks share one compressed extent, or decoding resumes before the chunk).
    pub inner_offset: u64,
    /// Where this piece of the file starts in the chunk's verified bytes. 0 when the chunk
    /// is exactly this piece (eStargz, zstd:chunked); non-zero when the unit verified and
    /// stored is larger than one file's part of it (a gzip-index span holds the bytes of
    /// several files and tar headers, and is verified, stored and fetched whole). The piece
    /// is bytes `within..within + len` of the chunk; chunks sharing a unit share its `id`.
    pub within: u64,
    /// What the uncompressed bytes (the whole unit) must hash to.
    pub digest: ChunkDigest,
}

impl ChunkSpec {
    /// The part of `range` (file offsets) this chunk holds, relative to the chunk's start;
    /// empty when they do not overlap.
    pub fn part_of(&self, range: &Range<u64>) -> Range<u64> {
        let end = self.file_offset.saturating_add(self.len);
        let from = range.start.clamp(self.file_offset, end) - self.file_offset;
        let to = range.end.clamp(self.file_offset, end) - self.file_offset;
        from..to.max(from)
    }

    /// This file's piece of the chunk.
    pub fn piece(&self) -> PieceId {
        (self.id, self.file, self.file_offset)
    }

    /// [`Self::part_of`] as a range of the chunk's verified bytes (shifted by `within`).
    pub fn unit_part_of(&self, range: &Range<u64>) -> Range<u64> {
        let part = self.part_of(range);
        part.start.saturating_add(self.within)..part.end.saturating_add(self.within)
    }
}

/// Uncompressed bytes that hashed to their chunk's digest. Only [`verify`] makes one, so a
/// store handed a `VerifiedChunk` need not hash it again.
#[derive(Debug, Clone)]
pub struct VerifiedChunk {
    digest: ChunkDigest,
    bytes: Bytes,
}

impl VerifiedChunk {
    pub fn digest(&self) -> &ChunkDigest {
        &self.digest
    }

    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }
}

/// Bytes that do not hash to what the index says; carries the digest they do have.
#[derive(Debug, Clone, thiserror::Error)]
#[error("content hashes to {actual}, the layer's index says {expected}")]
pub struct DigestMismatch {
    pub expected: ChunkDigest,
    pub actual: ChunkDigest,
}

/// Checks `bytes` against `expected`. CPU-bound (a sha256 of up to a chunk): call it off the
/// async workers.
pub fn verify(expected: &ChunkDigest, bytes: Bytes) -> Result<VerifiedChunk, DigestMismatch> {
    let actual = ChunkDigest::of(&bytes);
    if actual != *expected {
        return Err(DigestMismatch {
            expected: *expected,
            actual,
        });
    }
    Ok(VerifiedChunk {
        digest: actual,
        bytes,
    })
}

/// A writer that hashes what passes through it, so bytes streamed into the store are verified
/// on the way, without a second pass or a copy of the whole chunk in memory.
pub struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

/// Proof that the bytes streamed through a [`Hashing`] writer matched a digest. Only
/// [`Hashing::verify`] makes one, so a store that commits on it never re-hashes.
#[derive(Debug)]
pub struct Verified {
    digest: ChunkDigest,
    len: u64,
}

impl Verified {
    pub fn digest(&self) -> &ChunkDigest {
        &self.digest
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The same proof for another sink fed the same verified stream: the pieces of one unit
    /// (files sharing a gzip-index span) are each written from the one decode and hash.
    pub fn again(&self) -> Verified {
        Verified {
            digest: self.digest,
            len: self.len,
        }
    }
}

impl<W> Hashing<W> {
    pub fn new(inner: W) -> Self {
        Hashing {
            inner,
            hasher: Sha256::new(),
            written: 0,
        }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Whether what was written hashes to `expected`; hands back the inner writer with the
    /// proof, or the mismatch (the inner writer is dropped: what it holds is not the chunk).
    pub fn verify(self, expected: &ChunkDigest) -> Result<(W, Verified), DigestMismatch> {
        let actual = ChunkDigest(self.hasher.finalize().into());
        if actual != *expected {
            return Err(DigestMismatch {
                expected: *expected,
                actual,
            });
        }
        Ok((
            self.inner,
            Verified {
                digest: actual,
                len: self.written,
            },
        ))
    }
}

impl<W: std::io::Write> std::io::Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Test-only: bytes already checked by other means (a fixture), wrapped without hashing.
#[cfg(test)]
pub fn assume_verified(bytes: Bytes) -> VerifiedChunk {
    VerifiedChunk {
        digest: ChunkDigest::of(&bytes),
        bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_accept_only_sha256_hex() {
        let hex = "a".repeat(64);
        assert!(ChunkDigest::parse(&format!("sha256:{hex}")).is_some());
        assert!(ChunkDigest::parse(&hex).is_some());
        assert!(ChunkDigest::parse("sha256:../../etc/passwd").is_none());
        assert!(ChunkDigest::parse(&"A".repeat(64)).is_none());
        let d = ChunkDigest::of(b"x");
        assert_eq!(ChunkDigest::parse(&d.to_string()), Some(d));
    }

    #[test]
    fn verify_refuses_other_bytes() {
        let expected = ChunkDigest::of(b"expected");
        let err = verify(&expected, Bytes::from_static(b"other")).expect_err("mismatch");
        assert_eq!(err.actual, ChunkDigest::of(b"other"));
        let ok = verify(&expected, Bytes::from_static(b"expected")).expect("match");
        assert_eq!(ok.bytes().as_ref(), b"expected");
    }

    #[test]
    fn part_of_clips_to_the_chunk() {
        let c = ChunkSpec {
            id: ChunkId(0),
            file: FileKey::default(),
            file_offset: 100,
            len: 50,
            blob_range: 0..10,
            inner_offset: 0,
            within: 0,
            digest: ChunkDigest::of(b""),
        };
        assert_eq!(c.part_of(&(0..1000)), 0..50);
        assert_eq!(c.part_of(&(120..130)), 20..30);
        assert_eq!(c.part_of(&(140..200)), 40..50);
        assert_eq!(c.part_of(&(0..10)), 0..0);
    }
}
