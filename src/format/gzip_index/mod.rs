//! gzip-index: lazy pulling of unmodified gzip layers through an index built once
//! (`lazysnap index`) and kept in the registry next to the image, as an OCI artifact whose
//! `subject` is the image manifest — the zran method that SOCI and Nydus use too.
//!
//! The index (`file`) holds the tar's entries and resume points every few MiB of uncompressed
//! data (`zran`), with the sha256 of each span of uncompressed bytes between them. A span is
//! the unit the reader fetches, verifies and stores: its compressed extent is fetched,
//! inflation resumes from the stored window, and the span's bytes are checked against its
//! digest; a file's bytes are pieces of spans ([`ChunkSpec::within`]). Spans are cut into
//! parts at deflate block boundaries, each with its own digest and compressed end: the unit
//! fetched and verified is a part, whose compressed bytes run from its span's resume point
//! to the part's end, so a read near a span's start does not fetch the rest of the span.
//!
//! The format finds nothing itself: the resolver looks the image's index up in the registry,
//! checks it from the artifact manifest's digest down to the layer's index blob digest, and
//! hands the verified bytes over as the layer's [`ExternalIndex`]. Opening checks them again
//! against that digest. What the digests prove, and what they do not, is in the README's
//! gzip-index section.

pub mod build;
pub mod file;
pub mod zran;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use self::file::{GzipIndex, IndexFileError, TarKind};
use super::{
    BoxFuture, ChunkDecoder, FormatError, LayerFormat, LayerHints, Opened, Probe, Resolved,
};
use crate::chunk::{ChunkId, ChunkSpec};
use crate::metadata::{Entry, EntryKind, IndexBuilder, LayerIndex, Limits};

/// The artifact type of the index artifact (its manifest's `artifactType`).
pub const ARTIFACT_TYPE: &str = "application/vnd.lazysnap.gzip-index.v1";
/// The media type of one layer's index blob in the artifact.
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.lazysnap.gzip-index.layer.v1+zstd";
/// On each index blob's descriptor: the digest of the layer it indexes.
pub const LAYER_ANNOTATION: &str = "dev.lazysnap.gzip-index.layer";
/// On the artifact manifest: the image's layers left unindexed (too small, or not gzip),
/// comma-separated; they take the ordinary path without fetching anything.
pub const NOT_INDEXED_ANNOTATION: &str = "dev.lazysnap.gzip-index.not-indexed";
/// The name the format's layers are saved under.
pub const NAME: &str = "gzip-index";

/// A layer's index found outside its blob, already checked against `digest` (the digest a
/// verified artifact manifest gives for it).
#[derive(Debug, Clone)]
pub struct ExternalIndex {
    /// `sha256:...` of `bytes`.
    pub digest: String,
    pub bytes: bytes::Bytes,
}

impl From<IndexFileError> for FormatError {
    fn from(e: IndexFileError) -> Self {
        match e {
            IndexFileError::Limit(reason) => FormatError::Limit(reason),
            e => FormatError::GzipIndex(e),
        }
    }
}

/// What a gzip-index layer saves: the digest its index must have.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Params {
    index_digest: String,
}

/// Plain gzip layers with an index in the registry.
#[derive(Debug, Clone, Copy, Default)]
pub struct GzipIndexFormat {
    pub limits: Limits,
}

impl LayerFormat for GzipIndexFormat {
    fn name(&self) -> &'static str {
        NAME
    }

    fn accepts(&self, hints: &LayerHints<'_>) -> Result<(), String> {
        match hints.external {
            Some(_) => Ok(()),
            None => Err(format!(
                "layer {} has no gzip index in the registry",
                hints.digest
            )),
        }
    }

    fn resolve<'a>(
        &'a self,
        probe: &'a Probe<'a>,
    ) -> BoxFuture<'a, Result<Option<Resolved>, FormatError>> {
        Box::pin(async move {
            let Some(external) = probe.hints.external else {
                return Ok(None);
            };
            let bytes = external.bytes.clone();
            let limits = self.limits;
            // Decompressing and checking the index is CPU work, off the async workers.
            let index = tokio::task::spawn_blocking(move || GzipIndex::decode(&bytes, &limits))
                .await
                .map_err(|e| {
                    FormatError::GzipIndexMismatch(format!("checking the index: {e}"))
                })??;
            if index.layer_digest != probe.hints.digest || index.compressed_size != probe.blob_size
            {
                return Err(FormatError::GzipIndexMismatch(format!(
                    "the index is for {} of {} bytes, the layer is {} of {} bytes",
                    index.layer_digest, index.compressed_size, probe.hints.digest, probe.blob_size
                )));
            }
            let params = Params {
                index_digest: external.digest.clone(),
            };
            Ok(Some(Resolved {
                params: serde_json::to_value(&params).map_err(FormatError::Params)?,
                index: external.bytes.to_vec(),
            }))
        })
    }

    fn open(&self, resolved: &Resolved) -> Result<Opened, FormatError> {
        let params: Params =
            serde_json::from_value(resolved.params.clone()).map_err(FormatError::Params)?;
        let actual = format!("sha256:{}", hex::encode(Sha256::digest(&resolved.index)));
        if actual != params.index_digest {
            return Err(FormatError::TocDigestMismatch {
                expected: params.index_digest,
                actual,
            });
        }
        let mut index = GzipIndex::decode(&resolved.index, &self.limits)?;
        let layer = layer_index(&index, &self.limits)?;
        // The decoder needs the resume points only; the entries live on in the layer index.
        index.entries = Vec::new();
        Ok(Opened {
            index: layer,
            decoder: Arc::new(SpanDecoder { index }),
        })
    }

    /// The index, span digests included, is whoever pushed it's word: only the layer digest
    /// in the image manifest vouches for the bytes.
    fn needs_whole_blob_check(&self) -> bool {
        true
    }
}

/// The inode table of an indexed layer; each file's chunks are its pieces of spans.
pub fn layer_index(index: &GzipIndex, limits: &Limits) -> Result<LayerIndex, FormatError> {
    let mut builder = IndexBuilder::with_limits(*limits).with_format_chunk_ids();
    for e in &index.entries {
        let kind = match &e.kind {
            TarKind::File => EntryKind::File,
            TarKind::Dir => EntryKind::Dir,
            TarKind::Symlink(t) => EntryKind::Symlink { target: t.clone() },
            TarKind::HardLink(t) => EntryKind::HardLink { target: t.clone() },
            TarKind::CharDevice(major, minor) => EntryKind::CharDevice {
                major: *major,
                minor: *minor,
            },
            TarKind::BlockDevice(major, minor) => EntryKind::BlockDevice {
                major: *major,
                minor: *minor,
            },
            TarKind::Fifo => EntryKind::Fifo,
        };
        let mut entry = Entry::new(e.name.clone(), kind);
        entry.mode = e.mode;
        entry.uid = e.uid;
        entry.gid = e.gid;
        entry.mtime = SystemTime::UNIX_EPOCH + Duration::from_secs(e.mtime.max(0) as u64);
        entry.xattrs = e.xattrs.clone();
        if e.kind == TarKind::File {
            entry.size = e.size;
            entry.chunks = pieces(index, e.offset, e.size);
        }
        builder.add(entry)?;
    }
    Ok(builder.finish())
}

/// The pieces of parts holding bytes `offset..offset + size` of the stream, in file order.
/// At most one per part: bounded by the (checked) number of parts.
fn pieces(index: &GzipIndex, offset: u64, size: u64) -> Vec<ChunkSpec> {
    let end = offset.saturating_add(size);
    let mut out = Vec::new();
    if size == 0 {
        return out;
    }
    let first = index.parts.partition_point(|p| p.out_end <= offset);
    for j in first..index.parts.len() {
        let (Some(part), Some(blob), Some(digest)) = (
            index.part_out(j),
            index.part_blob(j),
            index.parts.get(j).map(|p| p.digest),
        ) else {
            break;
        };
        if part.start >= end {
            break;
        }
        let from = offset.max(part.start);
        let to = end.min(part.end);
        if from >= to {
            continue;
        }
        out.push(ChunkSpec {
            id: ChunkId(j as u32),
            file: Default::default(),
            file_offset: from - offset,
            len: to - from,
            blob_range: blob,
            inner_offset: 0,
            within: from - part.start,
            digest,
        });
    }
    out
}

/// Inflates parts from their spans' resume points.
struct SpanDecoder {
    index: GzipIndex,
}

impl SpanDecoder {
    /// Part `j`'s span, resume point and uncompressed range, checked against what `chunk`
    /// says its compressed bytes are.
    fn locate(
        &self,
        chunk: &ChunkSpec,
    ) -> Result<(usize, std::ops::Range<u64>, std::ops::Range<u64>), FormatError> {
        let j = chunk.id.0 as usize;
        let (Some(k), Some(part), Some(blob)) = (
            self.index.span_of_part(j),
            self.index.part_out(j),
            self.index.part_blob(j),
        ) else {
            return Err(FormatError::GzipIndexMismatch(format!("no part {j}")));
        };
        let Some(span) = self.index.span_out(k) else {
            return Err(FormatError::GzipIndexMismatch(format!("no span {k}")));
        };
        if blob != chunk.blob_range {
            return Err(FormatError::GzipIndexMismatch(format!(
                "part {j} is not at blob bytes {}..{}",
                chunk.blob_range.start, chunk.blob_range.end
            )));
        }
        Ok((k, span, part))
    }

    /// Span `k` inflated from its resume point up to uncompressed offset `end`.
    fn inflate(&self, k: usize, end: u64, compressed: &[u8]) -> Result<Vec<u8>, FormatError> {
        let (Some(point), Some(span)) = (self.index.checkpoints.get(k), self.index.span_out(k))
        else {
            return Err(FormatError::GzipIndexMismatch(format!("no span {k}")));
        };
        // Within the span, whose length was checked against max_chunk_bytes when the index
        // was decoded.
        let len = end.clamp(span.start, span.end) - span.start;
        let out = zran::inflate_span(compressed, point.bits, &point.window, len as usize)
            .map_err(|e| FormatError::ChunkDecompress(std::io::Error::other(e)))?;
        if end >= span.end {
            check_next_window(&self.index, k, &out)?;
        }
        Ok(out)
    }
}

impl ChunkDecoder for SpanDecoder {
    fn decode(&self, chunk: &ChunkSpec, compressed: &[u8]) -> Result<Vec<u8>, FormatError> {
        let (k, span, part) = self.locate(chunk)?;
        let mut out = self.inflate(k, part.end, compressed)?;
        out.drain(..(part.start - span.start) as usize);
        Ok(out)
    }

    /// Parts of one span share their compressed start: the span is inflated once, as far as
    /// the last of them, and cut.
    fn decode_shared(
        &self,
        units: &[&ChunkSpec],
        compressed: &[u8],
    ) -> Result<Vec<Vec<u8>>, FormatError> {
        let mut located = Vec::with_capacity(units.len());
        for unit in units {
            located.push(self.locate(unit)?);
        }
        let Some(&(k, ref span, _)) = located.first() else {
            return Ok(Vec::new());
        };
        if located.iter().any(|(other, _, _)| *other != k) {
            return units.iter().map(|u| self.decode(u, compressed)).collect();
        }
        let end = located
            .iter()
            .map(|(_, _, p)| p.end)
            .max()
            .unwrap_or(span.start);
        let out = self.inflate(k, end, compressed)?;
        Ok(located
            .iter()
            .map(|(_, span, part)| {
                let from = (part.start - span.start) as usize;
                let to = (part.end - span.start) as usize;
                out.get(from..to).unwrap_or_default().to_vec()
            })
            .collect())
    }
}

/// The next resume point's window must be the end of this span's output: the windows chain
/// the spans together (the first has none, so it decodes from the blob alone), and a window
/// that is not what precedes its point would make the next span other bytes than the layer
/// holds, digests notwithstanding. Checked whenever a span's last part is decoded (with the
/// rest of the span), so a layer fetched whole (background fetch) has checked every window.
/// A window longer than the span reaches into earlier spans and is checked as far as this
/// span goes.
fn check_next_window(index: &GzipIndex, k: usize, out: &[u8]) -> Result<(), FormatError> {
    let Some(next) = index.checkpoints.get(k + 1) else {
        return Ok(());
    };
    let n = next.window.len().min(out.len());
    if next.window[next.window.len() - n..] != out[out.len() - n..] {
        return Err(FormatError::GzipIndexMismatch(format!(
            "the window of resume point {} is not the end of span {k}",
            k + 1
        )));
    }
    Ok(())
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;

#[cfg(test)]
#[path = "fuzz_tests.rs"]
mod fuzz_tests;
