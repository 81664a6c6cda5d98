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
//! Since version 3 the windows live in a blob of their own next to the index (`file`): the
//! decoder fetches a span's window through [`ChunkDecoder::fetch_extra`], concurrently with
//! the span's compressed bytes, checks it against the digest the index gives, and keeps the
//! last few; a span decoded to its end gives the next resume point's window for nothing.
//!
//! The format finds nothing itself: the resolver looks the image's index up in the registry,
//! checks it from the artifact manifest's digest down to the layer's index blob digest, and
//! hands the verified bytes over as the layer's [`ExternalIndex`]. Opening checks them again
//! against that digest. What the digests prove, and what they do not, is in the README's
//! gzip-index section.

pub mod build;
pub mod file;
pub mod zran;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use self::file::{GzipIndex, IndexFileError, TarKind};
use super::{
    BlobSource, BoxFuture, ChunkDecoder, Extra, FormatError, LayerFormat, LayerHints, Opened,
    Probe, Resolved,
};
use crate::chunk::{ChunkId, ChunkSpec};
use crate::metadata::{Entry, EntryKind, IndexBuilder, LayerIndex, Limits};

/// The artifact type of the index artifact (its manifest's `artifactType`): version 2
/// artifacts hold version 3 indexes and their windows blobs. A daemon of the previous build
/// looks for [`ARTIFACT_TYPE_V1`] only, so it finds no index in a version 2 artifact and
/// pulls the image the ordinary way rather than misreading it.
pub const ARTIFACT_TYPE: &str = "application/vnd.lazysnap.gzip-index.v2";
/// The media type of one layer's (version 3) index blob in the artifact.
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.lazysnap.gzip-index.layer.v3+zstd";
/// The media type of one layer's windows blob in the artifact (it is listed there so that
/// the registry keeps it; the index names it by digest).
pub const WINDOWS_MEDIA_TYPE: &str = "application/vnd.lazysnap.gzip-index.windows.v1";
/// The artifact type, and the index blobs' media type, of the previous builds (indexes of
/// versions 1 and 2, windows inside): still read.
pub const ARTIFACT_TYPE_V1: &str = "application/vnd.lazysnap.gzip-index.v1";
pub const INDEX_MEDIA_TYPE_V1: &str = "application/vnd.lazysnap.gzip-index.layer.v1+zstd";
/// Windows a layer's decoder keeps when nobody holds them (32 KiB each): a span read part by
/// part needs its window again for each part, and a span just decoded gives the next one.
const KEPT_WINDOWS: usize = 64;
/// Windows further apart than this in the windows blob are fetched by requests of their own
/// (sent at once): about six windows' worth, so that a batch's windows come in a few
/// requests without bringing many it does not need (64 KiB made a traced start fetch 0.3 MiB
/// more).
const WINDOW_GAP: u64 = 16 << 10;
/// The most windows blob bytes one request asks for.
const MAX_WINDOW_REQUEST: u64 = 4 << 20;
/// On each index blob's descriptor: the digest of the layer it indexes.
pub const LAYER_ANNOTATION: &str = "dev.lazysnap.gzip-index.layer";
/// On the artifact manifest: the image's layers left unindexed (too small, or not gzip),
/// comma-separated; they take the ordinary path without fetching anything.
pub const NOT_INDEXED_ANNOTATION: &str = "dev.lazysnap.gzip-index.not-indexed";
/// On the artifact manifest, and on its descriptor in the referrers listing (the OCI
/// referrers API copies a manifest's annotations there; the fallback tag's listing gets them
/// from `lazysnap index`): `<layer digest>=<index digest>:<size>`, comma-separated, so that a
/// lookup can fetch the index blobs while the artifact manifest is on its way. A hint only:
/// a blob is used when the artifact manifest names it.
pub const INDEXES_ANNOTATION: &str = "dev.lazysnap.gzip-index.indexes";
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
        let side_blob = index.windows.as_ref().map(|w| w.digest.clone());
        let windows = side_blob.as_ref().map(|_| WindowCache::default());
        Ok(Opened {
            index: layer,
            decoder: Arc::new(SpanDecoder { index, windows }),
            side_blob,
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
    /// Version 3: the windows at hand, fetched from the windows blob or taken from the end
    /// of the span before; `None` when the index holds its windows itself.
    windows: Option<WindowCache>,
}

/// Verified windows by resume point: every window someone holds (a fetch between fetching
/// and decoding its chunks), and the [`KEPT_WINDOWS`] used last.
#[derive(Default)]
struct WindowCache {
    inner: Mutex<WindowsInner>,
}

#[derive(Default)]
struct WindowsInner {
    live: HashMap<usize, Weak<Window>>,
    recent: VecDeque<(usize, Arc<Window>)>,
}

/// A window at hand: its bytes, zeros where a record from the windows blob keeps none, and
/// the stretches such a record keeps (`None`: the whole window, e.g. one taken from the end
/// of the span before).
struct Window {
    bytes: Vec<u8>,
    kept: Option<zran::Stretches>,
}

impl Window {
    /// The window with the bytes it does not keep set to `fill`.
    fn filled(&self, fill: u8) -> Vec<u8> {
        let mut out = vec![fill; self.bytes.len()];
        for (start, len) in self.kept.iter().flatten() {
            let (from, to) = (usize::from(*start), usize::from(*start) + usize::from(*len));
            if let (Some(dst), Some(src)) = (out.get_mut(from..to), self.bytes.get(from..to)) {
                dst.copy_from_slice(src);
            }
        }
        out
    }

    /// Whether the bytes it keeps are those of `tail` (the output before its point).
    fn matches(&self, tail: &[u8]) -> bool {
        match &self.kept {
            None => self.bytes == tail,
            Some(kept) => kept.iter().all(|(start, len)| {
                let range = usize::from(*start)..usize::from(*start) + usize::from(*len);
                self.bytes.get(range.clone()) == tail.get(range)
            }),
        }
    }
}

impl WindowCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, WindowsInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, k: usize) -> Option<Arc<Window>> {
        let mut inner = self.lock();
        let window = inner.live.get(&k)?.upgrade()?;
        inner.keep(k, window.clone());
        Some(window)
    }

    /// Keeps `window` for point `k`, unless one is held already, and returns the one kept:
    /// the one a fetch must hold until it decodes.
    fn put(&self, k: usize, window: Arc<Window>) -> Arc<Window> {
        let mut inner = self.lock();
        // A window someone holds stays the one `get` finds: a fetch holds its windows until
        // it decodes, and finds them here then. Replaced by another (the end of the span
        // before, or a second fetch of the same window), the held one would be found only as
        // long as its replacement stayed among the recent, and a busy prefetch pushes that
        // out: its decode would fail ("not fetched") and the read with it. For the same
        // reason a second fetch of a held window holds the kept one, not its own copy: its
        // own copy is found by nobody, and the kept one dies with its first holder.
        let window = match inner.live.get(&k).and_then(Weak::upgrade) {
            Some(held) => held,
            None => {
                inner.live.insert(k, Arc::downgrade(&window));
                window
            }
        };
        inner.keep(k, window.clone());
        // Forget windows nobody holds any more, now and then (bounded by the points).
        if inner.live.len() > 4 * KEPT_WINDOWS {
            inner.live.retain(|_, w| w.strong_count() > 0);
        }
        window
    }
}

impl WindowsInner {
    fn keep(&mut self, k: usize, window: Arc<Window>) {
        if let Some(at) = self.recent.iter().position(|(p, _)| *p == k) {
            self.recent.remove(at);
        }
        self.recent.push_back((k, window));
        if self.recent.len() > KEPT_WINDOWS {
            self.recent.pop_front();
        }
    }
}

impl SpanDecoder {
    /// The window to resume span `k` with: the index's own (versions 1 and 2), or one at
    /// hand (version 3: fetched by `fetch_extra`, which the reader holds until it decodes).
    fn window(&self, k: usize) -> Result<Arc<Window>, FormatError> {
        let Some(cache) = &self.windows else {
            let point = self
                .index
                .checkpoints
                .get(k)
                .ok_or_else(|| FormatError::GzipIndexMismatch(format!("no span {k}")))?;
            return Ok(Arc::new(Window {
                bytes: point.window.clone(),
                kept: None,
            }));
        };
        match self.index.window_refs.get(k) {
            Some(r) if r.raw_len == 0 => Ok(Arc::new(Window {
                bytes: Vec::new(),
                kept: None,
            })),
            Some(_) => cache.get(k).ok_or_else(|| {
                FormatError::GzipIndexMismatch(format!(
                    "the window of resume point {k} was not fetched"
                ))
            }),
            None => Err(FormatError::GzipIndexMismatch(format!("no span {k}"))),
        }
    }

    /// Fetches the missing windows of resume points `points` (sorted) through `side`, a few
    /// requests for windows close together, all at once; each window is checked against its
    /// digest before anyone uses it.
    async fn fetch_windows(
        &self,
        cache: &WindowCache,
        points: Vec<usize>,
        side: &dyn BlobSource,
        extra: &mut Extra,
    ) -> Result<(), FormatError> {
        let mut groups: Vec<(std::ops::Range<u64>, Vec<usize>)> = Vec::new();
        for k in points {
            let Some(r) = self.index.window_refs.get(k) else {
                continue;
            };
            let range = r.range();
            match groups.last_mut() {
                Some((g, members))
                    if range.start >= g.end
                        && range.start - g.end <= WINDOW_GAP
                        && range.end - g.start <= MAX_WINDOW_REQUEST =>
                {
                    g.end = range.end;
                    members.push(k);
                }
                _ => groups.push((range, vec![k])),
            }
        }
        let fetches = groups
            .iter()
            .map(|(range, _)| side.read_range(range.clone()));
        let fetched = futures_util::future::try_join_all(fetches).await?;
        for ((range, members), bytes) in groups.iter().zip(fetched) {
            extra.requests += 1;
            extra.fetched_bytes += bytes.len() as u64;
            for &k in members {
                let Some(r) = self.index.window_refs.get(k) else {
                    continue;
                };
                // Offsets were checked against the blob's size when the index was decoded;
                // a short answer leaves a window out of reach, and that is an error.
                let frame = bytes
                    .get((r.offset - range.start) as usize..(r.range().end - range.start) as usize)
                    .ok_or_else(|| {
                        FormatError::GzipIndexMismatch(format!(
                            "the registry sent {} bytes for windows blob bytes {}..{}",
                            bytes.len(),
                            range.start,
                            range.end
                        ))
                    })?;
                let (bytes, kept) = file::open_window(frame, r).map_err(|why| {
                    FormatError::GzipIndexMismatch(format!("the window of resume point {k} {why}"))
                })?;
                let whole = matches!(&kept[..], [(0, len)] if u64::from(*len) == r.raw_len);
                let window = Arc::new(Window {
                    bytes,
                    kept: (!whole).then_some(kept),
                });
                extra.held.push(cache.put(k, window));
            }
        }
        Ok(())
    }
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
        let window = self.window(k)?;
        let inflate = |window: &[u8], len: usize| {
            zran::inflate_span(compressed, point.bits, window, len)
                .map_err(|e| FormatError::ChunkDecompress(std::io::Error::other(e)))
        };
        let out = inflate(&window.bytes, len as usize)?;
        if window.kept.is_some() {
            // The bytes a window leaves out must be bytes the span never reads: filled
            // otherwise, the span's start (the only output that can read the window) must
            // come out the same. Else the window is not this span's.
            let n = out.len().min(zran::WINDOW);
            if inflate(&window.filled(0xff), n)? != out[..n] {
                return Err(FormatError::GzipIndexMismatch(format!(
                    "the window of resume point {k} leaves out bytes its span reads"
                )));
            }
        }
        if end >= span.end {
            match &self.windows {
                None => check_next_window(&self.index, k, &out)?,
                Some(cache) => self.chain_window(cache, k, &out)?,
            }
        }
        Ok(out)
    }

    /// Version 3's chain check (see [`check_next_window`]): the next resume point's window,
    /// when it is at hand, must keep the bytes that end span `k`'s output; that output's end
    /// then is the next window, kept whole, so that the next span needs no fetch for it. A
    /// window reaching back past the span's start (spans shorter than a window) is left to
    /// its fetch.
    fn chain_window(&self, cache: &WindowCache, k: usize, out: &[u8]) -> Result<(), FormatError> {
        let Some(next) = self.index.window_refs.get(k + 1) else {
            return Ok(());
        };
        let n = next.raw_len as usize;
        if n == 0 || n > out.len() {
            return Ok(());
        }
        let tail = &out[out.len() - n..];
        if let Some(known) = cache.get(k + 1) {
            if !known.matches(tail) {
                return Err(FormatError::GzipIndexMismatch(format!(
                    "the window of resume point {} is not the end of span {k}",
                    k + 1
                )));
            }
            if known.kept.is_none() {
                return Ok(());
            }
        }
        // Nobody holds the tail: kept among the recent for the next span's fetch.
        let _ = cache.put(
            k + 1,
            Arc::new(Window {
                bytes: tail.to_vec(),
                kept: None,
            }),
        );
        Ok(())
    }
}

impl ChunkDecoder for SpanDecoder {
    /// The windows of the spans `chunks` are in, but those at hand (version 3).
    fn fetch_extra<'a>(
        &'a self,
        chunks: &'a [ChunkSpec],
        side: Option<&'a dyn BlobSource>,
    ) -> BoxFuture<'a, Result<Extra, FormatError>> {
        Box::pin(async move {
            let mut extra = Extra::default();
            let Some(cache) = &self.windows else {
                return Ok(extra);
            };
            let mut missing = std::collections::BTreeSet::new();
            for chunk in chunks {
                // A chunk that is not the index's fails its own decode.
                let Ok((k, _, _)) = self.locate(chunk) else {
                    continue;
                };
                if self.index.window_refs.get(k).is_none_or(|r| r.raw_len == 0) {
                    continue;
                }
                match cache.get(k) {
                    Some(window) => extra.held.push(window),
                    None => {
                        missing.insert(k);
                    }
                }
            }
            if missing.is_empty() {
                return Ok(extra);
            }
            let side = side.ok_or_else(|| {
                FormatError::GzipIndexMismatch("no windows blob to fetch windows from".into())
            })?;
            self.fetch_windows(cache, missing.into_iter().collect(), side, &mut extra)
                .await?;
            Ok(extra)
        })
    }

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
