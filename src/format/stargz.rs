//! eStargz and zstd:chunked: finding, reading and verifying the TOC from the blob's footer,
//! and decompressing single chunks. Both are [`LayerFormat`]s; the functions below them are
//! pure, over bytes the caller fetched.
//!
//! - eStargz: the blob ends with a 51-byte footer, an empty gzip member whose extra field holds
//!   `SG`, the TOC offset in 16 hex digits and `STARGZ` (47 bytes and no `SG` in old layers).
//!   The TOC is a gzip member holding a tar with one file, `stargz.index.json`.
//! - zstd:chunked as `ctr-remote` writes it: a 40-byte footer in a zstd skippable frame —
//!   little-endian manifest offset, compressed length, uncompressed length, type, then the
//!   magic `GnUlInUx`. The manifest is one zstd frame of the same JSON.
//!
//! Every chunk is an independent gzip member or zstd frame starting at its `offset`; its bytes
//! are the first `chunkSize` bytes of that stream (the stream may go on with tar padding and
//! the next headers).

use std::io::Read;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::toc::{self, Toc};
use super::{
    BoxFuture, ChunkDecoder, FormatError, LayerFormat, LayerHints, Opened, Probe, Resolved,
};
use crate::chunk::ChunkSpec;
use crate::metadata::{over_limit, Limits};

/// The largest footer of any supported format; fetch at least this much of the blob's tail.
pub const MAX_FOOTER: u64 = 64;
const ESTARGZ_FOOTER: usize = 51;
const ESTARGZ_LEGACY_FOOTER: usize = 47;
const ZSTD_CHUNKED_FOOTER: usize = 40;
const ZSTD_CHUNKED_MAGIC: &[u8; 8] = b"GnUlInUx";
/// The name of the TOC inside an eStargz layer's tar.
pub const TOC_TAR_NAME: &str = "stargz.index.json";
/// What the TOC tar holds besides the JSON: headers, padding, the end-of-archive blocks.
const TOC_TAR_SLACK: u64 = 64 << 10;
/// The annotation (snapshot label) pinning the digest of the uncompressed TOC JSON.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Decompression buffers start at most this large and grow with the bytes that really come,
/// so a chunk's claimed length alone never allocates.
const INITIAL_CHUNK_BUFFER: u64 = 4 << 20;

/// How the chunks of a layer are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    Gzip,
    Zstd,
}

/// Where a layer's TOC is and how to read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TocLocation {
    pub compression: Compression,
    /// Blob offset of the compressed TOC.
    pub offset: u64,
    /// Compressed length of the TOC.
    pub len: u64,
}

/// Finds the TOC from the blob's last bytes (`tail`, at least `MAX_FOOTER` of them unless the
/// blob is shorter); a compressed TOC over `max_toc_bytes` is refused.
pub fn locate_toc(
    tail: &[u8],
    blob_size: u64,
    max_toc_bytes: u64,
) -> Result<TocLocation, FormatError> {
    let location = zstd_chunked_footer(tail)
        .or_else(|| estargz_footer(tail, ESTARGZ_FOOTER, true, blob_size))
        .or_else(|| estargz_footer(tail, ESTARGZ_LEGACY_FOOTER, false, blob_size))
        .ok_or(FormatError::NoFooter(tail.len()))?;
    if location
        .offset
        .checked_add(location.len)
        .is_none_or(|end| end > blob_size)
    {
        return Err(FormatError::TocOutOfBounds {
            offset: location.offset,
            len: location.len,
            blob_size,
        });
    }
    if location.len > max_toc_bytes {
        return Err(FormatError::Limit(over_limit(
            "compressed TOC",
            location.len,
            " bytes",
            max_toc_bytes,
            "max_toc_bytes",
        )));
    }
    Ok(location)
}

fn estargz_footer(tail: &[u8], size: usize, with_sg: bool, blob_size: u64) -> Option<TocLocation> {
    let footer = tail.get(tail.len().checked_sub(size)?..)?;
    // gzip magic, deflate, FEXTRA flag
    if footer[..3] != [0x1f, 0x8b, 0x08] || footer[3] & 0x04 == 0 {
        return None;
    }
    let xlen = u16::from_le_bytes([footer[10], footer[11]]) as usize;
    let extra = footer.get(12..12 + xlen)?;
    let payload = if with_sg {
        if xlen != 26 || &extra[..2] != b"SG" || u16::from_le_bytes([extra[2], extra[3]]) != 22 {
            return None;
        }
        &extra[4..]
    } else {
        if xlen != 22 {
            return None;
        }
        extra
    };
    if &payload[16..] != b"STARGZ" {
        return None;
    }
    let offset = u64::from_str_radix(std::str::from_utf8(&payload[..16]).ok()?, 16).ok()?;
    let toc_end = blob_size.checked_sub(size as u64)?;
    Some(TocLocation {
        compression: Compression::Gzip,
        offset,
        len: toc_end.checked_sub(offset)?,
    })
}

fn zstd_chunked_footer(tail: &[u8]) -> Option<TocLocation> {
    let footer = tail.get(tail.len().checked_sub(ZSTD_CHUNKED_FOOTER)?..)?;
    if &footer[32..] != ZSTD_CHUNKED_MAGIC {
        return None;
    }
    let word =
        |i: usize| u64::from_le_bytes(footer[i * 8..i * 8 + 8].try_into().unwrap_or_default());
    Some(TocLocation {
        compression: Compression::Zstd,
        offset: word(0),
        len: word(1),
    })
}

/// Decompresses a fetched TOC and returns the JSON bytes, checked against `expected_digest`
/// (`sha256:<hex>` of the JSON) when the image pins one. A TOC that decompresses to more
/// than `max_toc_bytes` is refused before more is decompressed.
pub fn read_toc(
    location: &TocLocation,
    compressed: &[u8],
    expected_digest: Option<&str>,
    max_toc_bytes: u64,
) -> Result<Vec<u8>, FormatError> {
    let too_large = || {
        FormatError::Limit(format!(
            "TOC of more than {max_toc_bytes} bytes exceeds the limit of {max_toc_bytes} ([limits] max_toc_bytes)"
        ))
    };
    let json = match location.compression {
        Compression::Gzip => {
            // Streamed: only the JSON is ever held, not the tar around it too.
            let tar = flate2::read::GzDecoder::new(compressed)
                .take(max_toc_bytes.saturating_add(TOC_TAR_SLACK));
            toc_from_tar(tar, max_toc_bytes)?
        }
        Compression::Zstd => {
            let mut json = Vec::new();
            zstd::stream::read::Decoder::new(compressed)
                .map_err(FormatError::TocDecompress)?
                .take(max_toc_bytes.saturating_add(1))
                .read_to_end(&mut json)
                .map_err(FormatError::TocDecompress)?;
            json
        }
    };
    if json.len() as u64 > max_toc_bytes {
        return Err(too_large());
    }
    if let Some(expected) = expected_digest {
        let actual = format!("sha256:{}", hex::encode(Sha256::digest(&json)));
        if actual != expected {
            return Err(FormatError::TocDigestMismatch {
                expected: expected.to_owned(),
                actual,
            });
        }
    }
    Ok(json)
}

fn toc_from_tar(tar: impl Read, max_toc_bytes: u64) -> Result<Vec<u8>, FormatError> {
    let mut archive = tar::Archive::new(tar);
    let entries = archive.entries().map_err(FormatError::TocDecompress)?;
    for entry in entries {
        let entry = entry.map_err(FormatError::TocDecompress)?;
        let is_toc = entry
            .path()
            .map(|p| p.as_os_str() == TOC_TAR_NAME)
            .unwrap_or(false);
        if is_toc {
            let mut json = Vec::new();
            entry
                .take(max_toc_bytes.saturating_add(1))
                .read_to_end(&mut json)
                .map_err(FormatError::TocDecompress)?;
            return Ok(json);
        }
    }
    Err(FormatError::TocMissing)
}

/// Parses TOC JSON of at most `max_entries` entries.
pub fn parse_toc(json: &[u8], max_entries: u64) -> Result<Toc, FormatError> {
    toc::parse_within(json, max_entries).map_err(|(over, e)| match over {
        Some(reason) => FormatError::Limit(reason),
        None => FormatError::TocJson(e),
    })
}

/// The uncompressed bytes of one chunk: `len` bytes from `inner_offset` of the stream that
/// starts at the beginning of `compressed`.
pub fn decompress_chunk(
    compression: Compression,
    compressed: &[u8],
    inner_offset: u64,
    len: u64,
) -> Result<Vec<u8>, FormatError> {
    let too_large = FormatError::ChunkTooLarge { inner_offset, len };
    let want = inner_offset.checked_add(len).ok_or(too_large)?;
    if usize::try_from(want).is_err() {
        return Err(FormatError::ChunkTooLarge { inner_offset, len });
    }
    let mut out = Vec::with_capacity(want.min(INITIAL_CHUNK_BUFFER) as usize);
    let result = match compression {
        // GzDecoder stops at the end of the first member, which is exactly the chunk's stream.
        // `want` was bounded by `[limits] max_chunk_bytes` when the index was built.
        Compression::Gzip => flate2::read::GzDecoder::new(compressed)
            .take(want)
            .read_to_end(&mut out),
        Compression::Zstd => zstd::stream::read::Decoder::new(compressed)
            .map(|d| d.single_frame())
            .and_then(|d| d.take(want).read_to_end(&mut out)),
    };
    result.map_err(FormatError::ChunkDecompress)?;
    if (out.len() as u64) < want {
        return Err(FormatError::ChunkShort {
            got: out.len() as u64,
            want,
        });
    }
    Ok(out.split_off(inner_offset as usize))
}

/// Streams `len` bytes from `inner_offset` of the stream at the start of `compressed` into
/// `out` through a small buffer: what the store is fed, so no chunk is ever whole in memory.
pub fn decompress_chunk_to(
    compression: Compression,
    compressed: &[u8],
    inner_offset: u64,
    len: u64,
    out: &mut dyn std::io::Write,
) -> Result<(), FormatError> {
    let want = inner_offset
        .checked_add(len)
        .ok_or(FormatError::ChunkTooLarge { inner_offset, len })?;
    let mut stream: Box<dyn Read + '_> = match compression {
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(compressed)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::new(compressed)
                .map(|d| d.single_frame())
                .map_err(FormatError::ChunkDecompress)?,
        ),
    };
    let mut buf = vec![0u8; STREAM_BUFFER];
    let mut at = 0u64;
    while at < want {
        let room = (want - at).min(STREAM_BUFFER as u64) as usize;
        let n = stream
            .read(&mut buf[..room])
            .map_err(FormatError::ChunkDecompress)?;
        if n == 0 {
            return Err(FormatError::ChunkShort { got: at, want });
        }
        // Bytes before `inner_offset` belong to an earlier chunk of the same stream.
        let skip = inner_offset.saturating_sub(at).min(n as u64) as usize;
        out.write_all(&buf[skip..n])
            .map_err(FormatError::ChunkWrite)?;
        at += n as u64;
    }
    Ok(())
}

/// The buffer a chunk streams through on its way to the store.
const STREAM_BUFFER: usize = 64 << 10;

/// What an eStargz or zstd:chunked layer saves: where its TOC was and what it hashes to.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TocParams {
    location: TocLocation,
    toc_digest: String,
}

/// Decompresses chunks of a TOC-based layer: each one is an independent gzip member or zstd
/// frame starting at its `blob_range`.
struct StreamDecoder(Compression);

impl ChunkDecoder for StreamDecoder {
    fn decode(&self, chunk: &ChunkSpec, compressed: &[u8]) -> Result<Vec<u8>, FormatError> {
        decompress_chunk(self.0, compressed, chunk.inner_offset, chunk.len)
    }

    fn decode_to(
        &self,
        chunk: &ChunkSpec,
        compressed: &[u8],
        out: &mut dyn std::io::Write,
    ) -> Result<(), FormatError> {
        decompress_chunk_to(self.0, compressed, chunk.inner_offset, chunk.len, out)
    }
}

/// An eStargz layer: gzip members, a TOC tar at the end, a 51- or 47-byte footer.
#[derive(Debug, Clone, Copy, Default)]
pub struct Estargz {
    /// What a layer may claim (TOC size, entries, chunk sizes, names...).
    pub limits: Limits,
}

/// A zstd:chunked layer as `ctr-remote` writes it: zstd frames, a zstd TOC, a 40-byte footer.
#[derive(Debug, Clone, Copy, Default)]
pub struct ZstdChunked {
    /// What a layer may claim (TOC size, entries, chunk sizes, names...).
    pub limits: Limits,
}

impl LayerFormat for Estargz {
    fn name(&self) -> &'static str {
        "estargz"
    }

    fn accepts(&self, hints: &LayerHints<'_>) -> Result<(), String> {
        toc_digest(hints).map(drop)
    }

    fn resolve<'a>(
        &'a self,
        probe: &'a Probe<'a>,
    ) -> BoxFuture<'a, Result<Option<Resolved>, FormatError>> {
        Box::pin(resolve_toc(probe, Compression::Gzip, &self.limits))
    }

    fn open(&self, resolved: &Resolved) -> Result<Opened, FormatError> {
        open_toc(resolved, &self.limits)
    }

    fn index_range(&self, tail: &[u8], blob_size: u64) -> Option<std::ops::Range<u64>> {
        toc_range(tail, blob_size, Compression::Gzip, &self.limits)
    }

    fn resolve_unpinned(&self, tail: &[u8], blob_size: u64) -> Option<Resolved> {
        toc_unpinned(tail, blob_size, Compression::Gzip, &self.limits)
    }
}

impl LayerFormat for ZstdChunked {
    fn name(&self) -> &'static str {
        "zstd:chunked"
    }

    fn accepts(&self, hints: &LayerHints<'_>) -> Result<(), String> {
        toc_digest(hints).map(drop)
    }

    fn resolve<'a>(
        &'a self,
        probe: &'a Probe<'a>,
    ) -> BoxFuture<'a, Result<Option<Resolved>, FormatError>> {
        Box::pin(resolve_toc(probe, Compression::Zstd, &self.limits))
    }

    fn open(&self, resolved: &Resolved) -> Result<Opened, FormatError> {
        open_toc(resolved, &self.limits)
    }

    fn index_range(&self, tail: &[u8], blob_size: u64) -> Option<std::ops::Range<u64>> {
        toc_range(tail, blob_size, Compression::Zstd, &self.limits)
    }

    fn resolve_unpinned(&self, tail: &[u8], blob_size: u64) -> Option<Resolved> {
        toc_unpinned(tail, blob_size, Compression::Zstd, &self.limits)
    }
}

/// The TOC's blob range from the footer in `tail`, if the footer is of `compression` and
/// the TOC within the limits.
fn toc_range(
    tail: &[u8],
    blob_size: u64,
    compression: Compression,
    limits: &Limits,
) -> Option<std::ops::Range<u64>> {
    let location = locate_toc(tail, blob_size, limits.max_toc_bytes).ok()?;
    (location.compression == compression).then(|| location.offset..location.offset + location.len)
}

/// The TOC `tail` holds whole, if the footer is of `compression`, decompressed and
/// described with the digest it has (`LayerFormat::resolve_unpinned`).
fn toc_unpinned(
    tail: &[u8],
    blob_size: u64,
    compression: Compression,
    limits: &Limits,
) -> Option<Resolved> {
    let location = locate_toc(tail, blob_size, limits.max_toc_bytes).ok()?;
    if location.compression != compression {
        return None;
    }
    let tail_offset = blob_size.checked_sub(tail.len() as u64)?;
    let start = usize::try_from(location.offset.checked_sub(tail_offset)?).ok()?;
    let end = start.checked_add(usize::try_from(location.len).ok()?)?;
    let json = read_toc(&location, tail.get(start..end)?, None, limits.max_toc_bytes).ok()?;
    let toc_digest = format!("sha256:{}", hex::encode(Sha256::digest(&json)));
    let params = serde_json::to_value(TocParams {
        location,
        toc_digest,
    })
    .ok()?;
    Some(Resolved {
        params,
        index: json,
    })
}

fn toc_digest<'a>(hints: &LayerHints<'a>) -> Result<&'a str, String> {
    hints
        .annotations
        .get(TOC_DIGEST_ANNOTATION)
        .filter(|d| !d.is_empty())
        .map(String::as_str)
        .ok_or_else(|| {
            format!(
                "layer {} has no TOC digest annotation to verify against",
                hints.digest
            )
        })
}

async fn resolve_toc(
    probe: &Probe<'_>,
    compression: Compression,
    limits: &Limits,
) -> Result<Option<Resolved>, FormatError> {
    let Ok(expected) = toc_digest(&probe.hints) else {
        return Ok(None);
    };
    let location = match locate_toc(&probe.tail, probe.blob_size, limits.max_toc_bytes) {
        Ok(location) if location.compression == compression => location,
        Ok(_) | Err(FormatError::NoFooter(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let compressed = match probe_bytes(probe, location.offset, location.len) {
        Some(within) => within,
        None => {
            probe
                .blob
                .read_range(location.offset..location.offset.saturating_add(location.len))
                .await?
        }
    };
    let json = read_toc(&location, &compressed, Some(expected), limits.max_toc_bytes)?;
    let params = TocParams {
        location,
        toc_digest: expected.to_owned(),
    };
    Ok(Some(Resolved {
        params: serde_json::to_value(&params).map_err(FormatError::Params)?,
        index: json,
    }))
}

/// Bytes `offset..offset + len` of the blob when the probe's tail holds all of them.
fn probe_bytes(probe: &Probe<'_>, offset: u64, len: u64) -> Option<bytes::Bytes> {
    let start = offset.checked_sub(probe.tail_offset)?;
    let end = start.checked_add(len)?;
    if end > probe.tail.len() as u64 {
        return None;
    }
    Some(probe.tail.slice(start as usize..end as usize))
}

fn open_toc(resolved: &Resolved, limits: &Limits) -> Result<Opened, FormatError> {
    let params: TocParams =
        serde_json::from_value(resolved.params.clone()).map_err(FormatError::Params)?;
    let actual = format!("sha256:{}", hex::encode(Sha256::digest(&resolved.index)));
    if actual != params.toc_digest {
        return Err(FormatError::TocDigestMismatch {
            expected: params.toc_digest,
            actual,
        });
    }
    if resolved.index.len() as u64 > limits.max_toc_bytes {
        return Err(FormatError::Limit(over_limit(
            "TOC",
            resolved.index.len() as u64,
            " bytes",
            limits.max_toc_bytes,
            "max_toc_bytes",
        )));
    }
    let toc: Toc = parse_toc(&resolved.index, limits.max_entries)?;
    let index = toc::build_index(&toc, params.location.offset, limits)?;
    Ok(Opened {
        index,
        decoder: Arc::new(StreamDecoder(params.location.compression)),
        side_blob: None,
    })
}

#[cfg(test)]
#[path = "stargz_tests.rs"]
mod tests;
