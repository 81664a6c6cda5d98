//! Lazy layer formats, behind one seam: a [`LayerFormat`] finds a layer's index (in the blob
//! or elsewhere in the registry), verifies it, turns it into the inode table and chunk map
//! (`metadata::LayerIndex`), and supplies the [`ChunkDecoder`] that turns a fetched compressed
//! extent into a chunk's bytes. The reader, the FUSE adapter and the snapshotter see only this
//! seam, so a new format is one more implementation added to [`Formats`].
//!
//! Implementations: eStargz (gzip) and zstd:chunked, which share the JSON TOC (`stargz`,
//! `toc`), and gzip-index (`gzip_index`): plain gzip layers with an index kept in the
//! registry next to the image. A format does its I/O only through the [`BlobSource`] it is handed, so every rule
//! is testable with recorded blobs.

pub mod gzip_index;
mod stargz;
pub mod toc;

use std::collections::BTreeMap;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

use crate::chunk::ChunkSpec;
use crate::metadata::{LayerIndex, Limits, MetadataError};

pub use gzip_index::{ExternalIndex, GzipIndexFormat};
pub use stargz::{
    decompress_chunk, locate_toc, parse_toc, read_toc, Compression, Estargz, TocLocation,
    ZstdChunked, MAX_FOOTER, TOC_DIGEST_ANNOTATION, TOC_TAR_NAME,
};
pub use toc::{Toc, TocEntry};

/// A boxed future, as the seam's traits return them (they are used as trait objects).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A source error of any kind, shared by every waiter on the same fetch.
pub type SharedError = Arc<dyn std::error::Error + Send + Sync>;

/// A ranged read of a layer blob that failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("reading blob range {}..{}", range.start, range.end)]
pub struct BlobError {
    pub range: Range<u64>,
    #[source]
    pub source: SharedError,
}

/// Ranged reads of one layer blob; implemented over the registry client, and by fixtures in
/// tests.
pub trait BlobSource: Send + Sync {
    fn read_range(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, BlobError>>;
}

/// What is known of a layer before its format is: its digest and the annotations the image's
/// manifest gave it (containerd passes them as snapshot labels).
#[derive(Debug, Clone, Copy)]
pub struct LayerHints<'a> {
    pub digest: &'a str,
    pub annotations: &'a BTreeMap<String, String>,
    /// An index for the layer found elsewhere in the registry (gzip-index), verified
    /// against the digest its artifact gives.
    pub external: Option<&'a ExternalIndex>,
}

/// What the resolver fetched once for every format to look at: the blob's size and its last
/// bytes (at least [`MAX_FOOTER`] of them, fewer only for a smaller blob; usually a much
/// larger suffix, so that the index is often in it and needs no request of its own).
pub struct Probe<'a> {
    pub hints: LayerHints<'a>,
    pub blob_size: u64,
    /// The blob's bytes from `tail_offset` to its end.
    pub tail: Bytes,
    /// Where `tail` starts in the blob: `blob_size - tail.len()`.
    pub tail_offset: u64,
    pub blob: &'a dyn BlobSource,
}

/// A layer's index, found and verified: what is saved so the layer can be opened again
/// (after a restart) without the registry.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// The format's own parameters (where the index was, what it must hash to), opaque to
    /// everyone else.
    pub params: serde_json::Value,
    /// The verified index document.
    pub index: Vec<u8>,
}

/// An opened layer: its index and the decoder for its chunks.
pub struct Opened {
    pub index: LayerIndex,
    pub decoder: Arc<dyn ChunkDecoder>,
    /// The digest of a blob in the layer's repository that the decoder reads besides the
    /// layer (a gzip-index v3 layer's windows), handed to [`ChunkDecoder::fetch_extra`].
    pub side_blob: Option<String>,
}

/// What [`ChunkDecoder::fetch_extra`] fetched for some chunks: held until they are decoded.
#[derive(Default)]
pub struct Extra {
    /// Bytes received from the side blob, counted with the layer's fetched bytes.
    pub fetched_bytes: u64,
    /// Range requests made for them.
    pub requests: u64,
    /// Keeps what was fetched at hand until the chunks are decoded: the decoder keeps it
    /// only while someone holds it, or among the few it keeps itself.
    pub held: Vec<Arc<dyn std::any::Any + Send + Sync>>,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("inodes", &self.index.len())
            .finish_non_exhaustive()
    }
}

/// Turns one chunk's fetched compressed extent (`chunk.blob_range`) into its uncompressed
/// bytes. CPU-bound: callers run it off the async workers. Verification against
/// `chunk.digest` is the caller's, done once for every format.
pub trait ChunkDecoder: Send + Sync {
    /// Fetches, through `side` (the blob [`Opened::side_blob`] names), what decoding
    /// `chunks` needs besides their compressed extents, and verifies it; callers run it
    /// concurrently with the fetch of the extents and hold the result until the chunks are
    /// decoded. The default needs nothing.
    fn fetch_extra<'a>(
        &'a self,
        _chunks: &'a [ChunkSpec],
        _side: Option<&'a dyn BlobSource>,
    ) -> BoxFuture<'a, Result<Extra, FormatError>> {
        Box::pin(async { Ok(Extra::default()) })
    }

    fn decode(&self, chunk: &ChunkSpec, compressed: &[u8]) -> Result<Vec<u8>, FormatError>;

    /// Streams the chunk's `chunk.len` uncompressed bytes into `out`, so that a chunk on its
    /// way into the store never sits whole in memory. The default decodes whole, then
    /// writes; a format that can stream should.
    fn decode_to(
        &self,
        chunk: &ChunkSpec,
        compressed: &[u8],
        out: &mut dyn std::io::Write,
    ) -> Result<(), FormatError> {
        let bytes = self.decode(chunk, compressed)?;
        out.write_all(&bytes).map_err(FormatError::ChunkWrite)
    }

    /// Decodes several chunks whose compressed extents start at the same blob offset (the
    /// parts of one gzip-index span), `compressed` reaching as far as the longest: a format
    /// whose chunks share a prefix decodes it once. Each chunk's bytes, in order; the
    /// default decodes them one by one.
    fn decode_shared(
        &self,
        chunks: &[&ChunkSpec],
        compressed: &[u8],
    ) -> Result<Vec<Vec<u8>>, FormatError> {
        chunks
            .iter()
            .map(|c| {
                let len = c.blob_range.end.saturating_sub(c.blob_range.start) as usize;
                let own = compressed.get(..len).ok_or_else(|| {
                    FormatError::ChunkDecompress(std::io::Error::other(
                        "compressed bytes shorter than the chunk's extent",
                    ))
                })?;
                self.decode(c, own)
            })
            .collect()
    }
}

/// One lazy layer format.
pub trait LayerFormat: Send + Sync {
    /// The name saved with a layer's state (so it must never change) and shown in logs.
    fn name(&self) -> &'static str;
    /// Whether a layer with these hints could be of this format, before any I/O: `Err` says
    /// why not (e.g. no annotation pins its index, so it could not be verified).
    fn accepts(&self, hints: &LayerHints<'_>) -> Result<(), String>;
    /// Finds and verifies the layer's index. `Ok(None)`: the layer is not of this format.
    fn resolve<'a>(
        &'a self,
        probe: &'a Probe<'a>,
    ) -> BoxFuture<'a, Result<Option<Resolved>, FormatError>>;
    /// Opens a layer from what `resolve` returned (now or before a restart), checking the
    /// saved index again: a damaged file must not become a wrong layer. CPU-bound.
    fn open(&self, resolved: &Resolved) -> Result<Opened, FormatError>;
    /// Whether the chunk digests of this format's indexes fall short of tying the bytes to
    /// the image, so that a layer fetched completely must also be checked against its layer
    /// digest (`crate::layer::verify`). False where the index is pinned by the image itself.
    fn needs_whole_blob_check(&self) -> bool {
        false
    }
    /// Where the layer's index lies in the blob, when `tail` (the blob's last bytes) says,
    /// so that a layer resolved ahead has its whole index fetched in the background and its
    /// Prepare makes no request. Only a hint: `resolve` verifies whatever it is given.
    fn index_range(&self, _tail: &[u8], _blob_size: u64) -> Option<Range<u64>> {
        None
    }
    /// The index `tail` (the blob's last bytes) holds whole, read without a pin: what
    /// `resolve` would return if the image pinned the digest this index has. Only for
    /// opening a layer resolved ahead before its Prepare comes; the Prepare uses that only
    /// if its own `resolve`, verified against the image's pin, returns the same parameters.
    /// CPU-bound.
    fn resolve_unpinned(&self, _tail: &[u8], _blob_size: u64) -> Option<Resolved> {
        None
    }
}

/// The formats the daemon knows, in the order they are tried.
#[derive(Clone)]
pub struct Formats(Vec<Arc<dyn LayerFormat>>);

impl Formats {
    pub fn new(formats: Vec<Arc<dyn LayerFormat>>) -> Self {
        Formats(formats)
    }

    /// The built-in formats, eStargz, zstd:chunked and gzip-index, with the default
    /// [`Limits`].
    pub fn builtin() -> Self {
        Self::builtin_with(Limits::default())
    }

    /// The built-in formats, refusing layers that claim more than `limits`.
    pub fn builtin_with(limits: Limits) -> Self {
        Formats(vec![
            Arc::new(ZstdChunked { limits }),
            Arc::new(Estargz { limits }),
            Arc::new(GzipIndexFormat { limits }),
        ])
    }

    pub fn by_name(&self, name: &str) -> Option<&Arc<dyn LayerFormat>> {
        self.0.iter().find(|f| f.name() == name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn LayerFormat>> {
        self.0.iter()
    }
}

impl Default for Formats {
    fn default() -> Self {
        Self::builtin()
    }
}

/// Why a blob is not a usable lazy layer. Messages name the entry or the offset involved.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("no eStargz or zstd:chunked footer in the last {0} bytes of the blob")]
    NoFooter(usize),
    #[error("footer points outside the blob: TOC at {offset}+{len}, blob size {blob_size}")]
    TocOutOfBounds {
        offset: u64,
        len: u64,
        blob_size: u64,
    },
    #[error("decompressing the TOC")]
    TocDecompress(#[source] std::io::Error),
    #[error("the TOC tar has no {TOC_TAR_NAME}")]
    TocMissing,
    #[error("TOC digest is {actual}, but the image says {expected}")]
    TocDigestMismatch { expected: String, actual: String },
    #[error("TOC is not valid JSON")]
    TocJson(#[from] serde_json::Error),
    #[error("saved format parameters are not valid")]
    Params(#[source] serde_json::Error),
    #[error("fetching the layer's index")]
    Fetch(#[from] BlobError),
    #[error("the layer's index")]
    Index(#[from] MetadataError),
    #[error("decompressing chunk")]
    ChunkDecompress(#[source] std::io::Error),
    #[error("writing a decoded chunk")]
    ChunkWrite(#[source] std::io::Error),
    #[error("chunk stream ended after {got} of {want} bytes")]
    ChunkShort { got: u64, want: u64 },
    #[error("chunk of {len} bytes at inner offset {inner_offset} does not fit in memory")]
    ChunkTooLarge { inner_offset: u64, len: u64 },
    #[error("the layer's gzip index")]
    GzipIndex(#[source] gzip_index::file::IndexFileError),
    #[error("the gzip index does not fit the layer: {0}")]
    GzipIndexMismatch(String),
    /// The layer claims more than a `[limits]` key allows; the message names the key.
    #[error("{0}")]
    Limit(String),
}
