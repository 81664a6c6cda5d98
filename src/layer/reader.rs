//! Reads byte ranges of files in a lazy layer: file range → the chunks covering it → memory or
//! disk cache, or one fetch from the blob shared by every reader waiting for the same chunk.
//!
//! Missing chunks that sit next to each other in the blob are fetched with one range request
//! (a container reading a file sequentially costs one round trip, not one per chunk). Every
//! fetched chunk is decompressed straight into the store, hashed on the way, and becomes
//! readable only if it matched its digest; a registry that lies produces an error, never wrong
//! bytes. Readers then read just their range from the store. Only when the store cannot take a
//! chunk (disk full, someone else writing it) is it verified into memory for its readers.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures_util::future::FutureExt;
use futures_util::stream::{self, StreamExt};
use lazysnap_fuse::ReadBuf;
use tokio::sync::watch;

use super::fetches::{Fetches, Priority};
use super::verify::VerdictCell;
use crate::cache::{ChunkSink, ChunkStore, Put};
use crate::chunk::{self, BlobId, ChunkDigest, ChunkSpec, DigestMismatch, Hashing, PieceId};
use crate::format::{BlobError, BlobSource, ChunkDecoder, Extra, FormatError};

/// Why a read failed. The FUSE layer answers all of them with EIO; the message goes to the
/// log. Clone, because every reader waiting on one fetch gets its outcome.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReadError {
    #[error("fetching chunks from the registry")]
    Fetch(#[from] BlobError),
    #[error("the registry sent {got} bytes for blob range {}..{}", range.start, range.end)]
    ShortBody { range: Range<u64>, got: u64 },
    #[error("chunk {digest} at blob offset {offset} does not decompress")]
    Decode {
        digest: ChunkDigest,
        offset: u64,
        #[source]
        source: Arc<FormatError>,
    },
    #[error(
        "what the chunks at blob offset {offset} need besides their bytes (a gzip-index window)"
    )]
    Extra {
        offset: u64,
        #[source]
        source: Arc<FormatError>,
    },
    #[error("chunk at blob offset {offset} is corrupt")]
    Corrupt {
        offset: u64,
        #[source]
        source: DigestMismatch,
    },
    #[error("fetch of chunk {digest} was abandoned by the reader that started it")]
    Abandoned { digest: ChunkDigest },
    #[error("decoding fetched chunks")]
    Task(#[source] Arc<tokio::task::JoinError>),
    #[error("chunk {digest} left the store as soon as it was stored (a disk budget smaller than the reads in flight?)")]
    Lost { digest: ChunkDigest },
    #[error("the layer is bad: its blob hashes to {got}, the image names {expected}")]
    LayerBad { expected: String, got: String },
}

/// What a batch's chunks need besides their bytes, fetched once for all its runs: each run
/// awaits it, and holds it until its chunks are decoded.
type SharedExtra<'a> = futures_util::future::Shared<
    crate::format::BoxFuture<'a, Arc<Result<Extra, Arc<FormatError>>>>,
>;

/// Where a fetched chunk is for its readers: in the store (read your range from there), or,
/// when the store could not take it, in memory.
#[derive(Debug, Clone)]
enum Landed {
    Stored,
    Memory(Bytes),
}

/// Counters of one layer, for logs now and the CLI and metrics later.
#[derive(Debug, Default)]
pub struct LayerCounters {
    /// Compressed bytes received from the registry.
    pub fetched_bytes: AtomicU64,
    /// Range requests made.
    pub fetches: AtomicU64,
    /// File bytes handed to readers.
    pub served_bytes: AtomicU64,
    /// Chunks found in the cache / not found.
    pub chunk_hits: AtomicU64,
    pub chunk_misses: AtomicU64,
    /// Container reads that had to wait for the registry (a fetch of their own, or one
    /// already under way): what prefetch exists to bring down.
    pub demand_network_reads: AtomicU64,
    /// Uncompressed bytes fetched by prefetch, readahead or background fetch, and how many of
    /// those a container has read since.
    pub prefetch_bytes: AtomicU64,
    pub prefetch_used_bytes: AtomicU64,
    /// Unix milliseconds of the last read by a container.
    pub last_access_ms: AtomicU64,
    /// Compressed bytes of the chunks containers read, each fetch unit once per layer: what
    /// `fetched_bytes` is divided by for the fetch amplification.
    pub read_chunk_bytes: AtomicU64,
    /// Lookups, listings and symlink reads the kernel brought to the daemon (each one a
    /// round trip some process waited for). Kept here, with the layer's other figures.
    pub name_requests: AtomicU64,
}

/// Unix milliseconds now.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

type Shared = Option<Result<Landed, ReadError>>;

/// Bytes between two wanted chunks that are fetched anyway to keep them in one request: about
/// what a link moves in a round trip's time at a few hundred Mbit/s.
const MAX_GAP: u64 = 128 << 10;
/// Range requests one read or prefetch batch has in flight at once.
const RUNS_IN_FLIGHT: usize = 4;
/// A missed chunk brings the rest of its file along when that rest is at most this many
/// compressed bytes: executables, libraries and modules are read whole once opened, and a
/// program's page faults hit its chunks one at a time (gcc's cc1, 12 MiB compressed, waited
/// on eight of them in turn). Larger files are left to readahead, which follows what is
/// actually read.
const WHOLE_FILE_BYTES: u64 = 16 << 20;
/// A miss in a directory of at most this many compressed bytes brings the directory's other
/// files once the container has read another of them: small enough that fetching it whole
/// costs less than a round trip or two at the link speeds lazy pulling is for.
const SMALL_DIRECTORY_BYTES: u64 = 512 << 10;
/// A directory of at most this many compressed bytes comes whole on its first miss. Above
/// it, one file read says too little: a start that reads one file of a directory of many
/// (a config among data files) would fetch several times what it reads; a second file read
/// (modules of one package imported together) is the evidence that the rest is wanted too.
const FIRST_MISS_DIRECTORY_BYTES: u64 = 128 << 10;

/// The reader of one mounted layer.
pub struct LayerReader {
    blob: Arc<dyn BlobSource>,
    /// The blob the decoder reads besides the layer (a gzip-index layer's windows), if any.
    side: Option<Arc<dyn BlobSource>>,
    /// The blob's identity for the store: chunks are ready for this layer only if they were
    /// verified from this blob.
    blob_id: BlobId,
    decoder: Arc<dyn ChunkDecoder>,
    store: Arc<dyn ChunkStore>,
    inflight: Mutex<HashMap<PieceId, watch::Receiver<Shared>>>,
    counters: Arc<LayerCounters>,
    fetches: Arc<Fetches>,
    /// Chunks prefetched and not read by a container yet, for the used/wasted figures; the
    /// flag spares the read path the lock while nothing was prefetched.
    prefetched: Mutex<HashSet<PieceId>>,
    any_prefetched: AtomicBool,
    /// Largest merged request; bounds memory per read and keeps one slow request from holding
    /// many chunks hostage.
    max_request: u64,
    /// Every chunk of the layer in blob order, for fetching a missed chunk's neighbours.
    layout: Arc<[ChunkSpec]>,
    /// How far past a missed chunk (compressed bytes) its uncached neighbours come along.
    amplify: u64,
    /// The whole-blob verdict: a bad layer serves nothing, cached or not.
    verdict: Arc<VerdictCell>,
    /// Woken whenever this reader stored chunks, for whoever waits for the layer to be
    /// complete.
    stored: tokio::sync::Notify,
    /// The directory of each entry of `layout`, and each directory's entries with their
    /// compressed bytes: a miss in a small directory brings the rest of it.
    directories: Arc<[u64]>,
    directory_members: HashMap<u64, (u64, Vec<u32>)>,
    /// [`FIRST_MISS_DIRECTORY_BYTES`], lowered by tests whose fixture directories are tiny.
    first_miss_directory_bytes: u64,
    /// One bit per entry of `layout`: whether a container has read that fetch unit, so it
    /// counts once in `read_chunk_bytes`. Atomic words keep the lock off the read path.
    read_marks: Box<[AtomicU64]>,
}

impl LayerReader {
    pub fn new(
        blob: Arc<dyn BlobSource>,
        blob_id: BlobId,
        decoder: Arc<dyn ChunkDecoder>,
        store: Arc<dyn ChunkStore>,
        fetches: Arc<Fetches>,
    ) -> Self {
        LayerReader {
            blob,
            side: None,
            blob_id,
            decoder,
            store,
            inflight: Mutex::default(),
            counters: Arc::default(),
            fetches,
            prefetched: Mutex::default(),
            any_prefetched: AtomicBool::new(false),
            max_request: 8 << 20,
            layout: Arc::from(Vec::new()),
            amplify: 0,
            verdict: Arc::default(),
            stored: tokio::sync::Notify::new(),
            read_marks: Box::default(),
            directories: Arc::from(Vec::new()),
            directory_members: HashMap::new(),
            first_miss_directory_bytes: FIRST_MISS_DIRECTORY_BYTES,
        }
    }

    /// Gives the decoder `side` to fetch from besides the layer (`Opened::side_blob`).
    pub fn with_side(mut self, side: Option<Arc<dyn BlobSource>>) -> Self {
        self.side = side;
        self
    }

    /// Makes the reader answer to `verdict`: once it says bad, every read fails.
    pub fn with_verdict(mut self, verdict: Arc<VerdictCell>) -> Self {
        self.verdict = verdict;
        self
    }

    pub fn verdict(&self) -> &Arc<VerdictCell> {
        &self.verdict
    }

    /// Completes after this reader next stores chunks (a wake-up already pending counts).
    pub async fn stored_more(&self) {
        self.stored.notified().await;
    }

    /// Makes a container's read that misses also fetch the uncached chunks that follow the
    /// missed ones in the blob, up to `amplify` compressed bytes past each, and the rest of
    /// the missed chunk's file when that rest is small (see [`WHOLE_FILE_BYTES`]). A tar keeps
    /// a directory's files together and programs read them together (an interpreter importing
    /// its modules), and a program or library opened is read whole; so this trades a little
    /// bandwidth for round trips. `layout` is every chunk of the layer in blob order.
    pub fn with_neighbours(mut self, layout: Arc<[ChunkSpec]>, amplify: u64) -> Self {
        self.read_marks = (0..layout.len().div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        self.layout = layout;
        self.amplify = amplify;
        self
    }

    /// Uncached, not-in-flight chunks whose blob bytes the fetch of the missing ones brings
    /// anyway: those starting where a missing one starts (the other files of a gzip-index
    /// part, and of the span's earlier parts, which are inflated on the way), left behind
    /// they would each cost their bytes again. With `whole_span` (a container's read, which
    /// is likely to go on reading nearby), also the span's later parts, whose bytes follow
    /// in the same request. They come along in the same request, whoever fetches.
    fn siblings<'a>(
        &'a self,
        wanted: &[&ChunkSpec],
        missing: &[usize],
        whole_span: bool,
    ) -> Vec<&'a ChunkSpec> {
        if self.layout.is_empty() {
            return Vec::new();
        }
        let inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        let mut taken: HashSet<PieceId> = wanted.iter().map(|c| c.piece()).collect();
        let mut extra = Vec::new();
        for &i in missing {
            let unit = &wanted[i].blob_range;
            let first = self
                .layout
                .partition_point(|c| c.blob_range.start < unit.start);
            let at = self
                .layout
                .partition_point(|c| c.blob_range.start <= unit.start);
            for same in self.layout[first..at]
                .iter()
                .filter(|c| whole_span || c.blob_range.end <= unit.end)
            {
                if !inflight.contains_key(&same.piece())
                    && !self.store.is_ready(&self.blob_id, same)
                    && taken.insert(same.piece())
                {
                    extra.push(same);
                }
            }
        }
        extra
    }

    /// Makes a miss in a directory of at most [`FIRST_MISS_DIRECTORY_BYTES`] (compressed), or
    /// of at most [`SMALL_DIRECTORY_BYTES`] once another of its files was read, also fetch the
    /// directory's other uncached files: the headers a compiler includes, the
    /// modules of one package. `directories` names the directory of each chunk of the
    /// layout given to [`Self::with_neighbours`] (0 for none).
    pub fn with_directories(mut self, directories: Vec<u64>) -> Self {
        let mut members: HashMap<u64, (u64, Vec<u32>)> = HashMap::new();
        for (i, (dir, chunk)) in directories.iter().zip(self.layout.iter()).enumerate() {
            if *dir == 0 {
                continue;
            }
            let entry = members.entry(*dir).or_default();
            entry.0 += chunk.blob_range.end.saturating_sub(chunk.blob_range.start);
            entry.1.push(i as u32);
        }
        members.retain(|_, (bytes, _)| *bytes <= SMALL_DIRECTORY_BYTES);
        self.directory_members = members;
        self.directories = Arc::from(directories);
        self
    }

    /// Whether a container has read chunk `at` of the layout (see [`Self::note_read`]).
    fn was_read(&self, at: usize) -> bool {
        self.read_marks
            .get(at / 64)
            .is_some_and(|word| word.load(Ordering::Relaxed) & (1u64 << (at % 64)) != 0)
    }

    /// Counts the fetch units of `chunks` no container read before into `read_chunk_bytes`.
    /// A unit is a blob range: pieces sharing one (the files of a gzip-index part) count it
    /// once. Units sharing a start (a gzip-index span's parts, each running from the span's
    /// resume point to its own end) count together as far as the furthest one read: that
    /// is the least a reader of them must fetch, so the amplification measures what the
    /// fetches add to it. (Counting the first part alone made a read of a span's last part
    /// look like four times amplification.) A span holds at most one piece per 512 bytes (a tar
    /// header each) within `[limits] max_chunk_bytes`, which bounds the walk over a unit's
    /// siblings.
    /// Without a layout nothing is counted.
    fn note_read<'c>(&self, chunks: impl IntoIterator<Item = &'c ChunkSpec>) {
        for chunk in chunks {
            let unit = &chunk.blob_range;
            let first = self
                .layout
                .partition_point(|c| c.blob_range.start < unit.start);
            let same_start =
                self.layout[first..].partition_point(|c| c.blob_range.start <= unit.start);
            let family = first..first + same_start;
            let Some(at) = family
                .clone()
                .find(|&i| self.layout[i].blob_range.end == unit.end)
            else {
                continue;
            };
            let Some(word) = self.read_marks.get(at / 64) else {
                continue;
            };
            let bit = 1u64 << (at % 64);
            if word.fetch_or(bit, Ordering::Relaxed) & bit != 0 {
                continue;
            }
            let counted = family
                .filter(|&i| i != at && self.was_read(i))
                .map(|i| self.layout[i].blob_range.end)
                .max()
                .unwrap_or(unit.start);
            self.counters
                .read_chunk_bytes
                .fetch_add(unit.end.saturating_sub(counted), Ordering::Relaxed);
        }
    }

    /// Uncached, not-in-flight chunks right after the missing ones: within `amplify`, or of
    /// the same file when its rest is within [`WHOLE_FILE_BYTES`]. Stops at the first one
    /// that is cached or in flight.
    fn neighbours(&self, wanted: &[&ChunkSpec], missing: &[usize]) -> Vec<ChunkSpec> {
        if self.amplify == 0 || self.layout.is_empty() {
            return Vec::new();
        }
        let inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        let mut taken: HashSet<PieceId> = wanted.iter().map(|c| c.piece()).collect();
        let mut extra = Vec::new();
        for &i in missing {
            let missed = wanted[i];
            let start = missed.blob_range.start;
            let first = self.layout.partition_point(|c| c.blob_range.start <= start);
            // Stops at the cap: a huge file's chunks are not walked on every miss.
            let mut rest_of_file = 0;
            for c in self.layout[first..]
                .iter()
                .take_while(|c| c.file == missed.file)
            {
                rest_of_file = c.blob_range.end.saturating_sub(start);
                if rest_of_file > WHOLE_FILE_BYTES {
                    break;
                }
            }
            let reach = if rest_of_file <= WHOLE_FILE_BYTES {
                self.amplify.max(rest_of_file)
            } else {
                self.amplify
            };
            for next in &self.layout[first..] {
                if next.blob_range.end.saturating_sub(start) > reach
                    || inflight.contains_key(&next.piece())
                    || self.store.is_ready(&self.blob_id, next)
                {
                    break;
                }
                if taken.insert(next.piece()) {
                    extra.push(next.clone());
                }
            }
            let at = self.layout.partition_point(|c| c.blob_range.start < start);
            let piece = missed.piece();
            let Some(dir) = self.layout[at..first.max(at)]
                .iter()
                .position(|c| c.piece() == piece)
                .and_then(|k| self.directories.get(at + k))
            else {
                continue;
            };
            let Some((dir_bytes, members)) = self.directory_members.get(dir) else {
                continue;
            };
            if *dir_bytes > self.first_miss_directory_bytes
                && !members.iter().any(|&m| {
                    self.layout
                        .get(m as usize)
                        .is_some_and(|c| c.file != missed.file)
                        && self.was_read(m as usize)
                })
            {
                continue;
            }
            for &m in members {
                let Some(other) = self.layout.get(m as usize) else {
                    continue;
                };
                // The missed chunk's span siblings come with the read itself (`siblings`).
                if other.blob_range.start != missed.blob_range.start
                    && !inflight.contains_key(&other.piece())
                    && !self.store.is_ready(&self.blob_id, other)
                    && taken.insert(other.piece())
                {
                    extra.push(other.clone());
                }
            }
        }
        extra.sort_by_key(|c| c.blob_range.start);
        extra
    }

    /// Fetches the neighbours of a container's missed chunks in a request of their own, on
    /// the wire together with the read's: the reader waits for the bytes it asked for only,
    /// not for the neighbours' transfer and decoding. Claimed before this returns, so a read
    /// of a neighbour meanwhile waits for this fetch instead of starting another.
    fn fetch_neighbours(self: &Arc<Self>, wanted: &[&ChunkSpec], missing: &[usize]) {
        let mut extra = self.neighbours(wanted, missing);
        if extra.is_empty() {
            return;
        }
        // As with the read itself, a neighbour in a gzip-index span brings the rest of the
        // span: the container is likely to read on there, and a later part fetched apart
        // would cost the span's compressed bytes from its resume point again.
        let whole: Vec<ChunkSpec> = {
            let refs: Vec<&ChunkSpec> = extra.iter().collect();
            let all: Vec<usize> = (0..refs.len()).collect();
            self.siblings(&refs, &all, true)
                .into_iter()
                .cloned()
                .collect()
        };
        extra.extend(whole);
        extra.sort_by_key(|c| c.blob_range.start);
        let refs: Vec<&ChunkSpec> = extra.iter().collect();
        let all: Vec<usize> = (0..refs.len()).collect();
        let (claim, _theirs) = self.claim(&refs, &all);
        let pending = claim.into_senders();
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let refs: Vec<&ChunkSpec> = extra.iter().collect();
            let mut out = vec![None; refs.len()];
            let claim = Claim {
                reader: &me,
                senders: pending,
            };
            if let Err(e) = me.fetch_claimed(&refs, claim, &mut out, 0, 0).await {
                tracing::debug!(error = %crate::error_chain(&e), "fetching a read's neighbours failed");
            }
        });
    }

    /// The blob the store scopes this layer's bytes to.
    pub fn blob_id(&self) -> &BlobId {
        &self.blob_id
    }

    pub fn counters(&self) -> &Arc<LayerCounters> {
        &self.counters
    }

    /// Returns bytes `range` of a file whose chunks (in file order) are `chunks`; shorter at
    /// the end of the file. Ready chunks are read from the store (just the part wanted); the
    /// rest are fetched, verified and stored first.
    pub async fn read(
        self: &Arc<Self>,
        chunks: &[ChunkSpec],
        range: Range<u64>,
    ) -> Result<Bytes, ReadError> {
        if let Some(refused) = self.verdict.refusal() {
            return Err(refused);
        }
        let wanted: Vec<&ChunkSpec> = chunks
            .iter()
            .filter(|c| c.file_offset < range.end && c.file_offset + c.len > range.start)
            .collect();
        if wanted.len() > 1 && wanted.len() == chunks.len() {
            // All stored: one read of the range across them.
            if let Some(out) = self
                .store
                .read_span(&self.blob_id, chunks, range.clone())
                .await
            {
                self.counters
                    .chunk_hits
                    .fetch_add(wanted.len() as u64, Ordering::Relaxed);
                self.served(&wanted, out.len());
                return Ok(out);
            }
        }
        let mut parts: Vec<Option<Bytes>> = Vec::with_capacity(wanted.len());
        for chunk in &wanted {
            let part = self
                .store
                .read(&self.blob_id, chunk, chunk.part_of(&range))
                .await;
            if part.is_some() {
                self.counters.chunk_hits.fetch_add(1, Ordering::Relaxed);
            }
            parts.push(part);
        }
        // A chunk stored by this fetch can be evicted before it is read (a budget smaller
        // than what is in flight): fetch it again, a few times at most.
        for attempt in 0..3 {
            let missing: Vec<usize> = (0..wanted.len()).filter(|i| parts[*i].is_none()).collect();
            if missing.is_empty() {
                break;
            }
            if attempt == 0 {
                self.fetch_neighbours(&wanted, &missing);
            }
            let specs: Vec<&ChunkSpec> = missing.iter().map(|i| wanted[*i]).collect();
            let waited = std::time::Instant::now();
            let landed = self.load(&specs, Priority::Demand).await?;
            tracing::debug!(
                file_offset = range.start,
                bytes = range.end - range.start,
                chunks = specs.len(),
                ms = waited.elapsed().as_millis() as u64,
                "a container's read waited on the registry"
            );
            for (i, landed) in missing.into_iter().zip(landed) {
                let chunk = wanted[i];
                let part = chunk.part_of(&range);
                parts[i] = match landed {
                    // The whole verified unit, of which this file's piece is a part.
                    Landed::Memory(whole) => {
                        let part = chunk.unit_part_of(&range);
                        let end = (part.end as usize).min(whole.len());
                        Some(whole.slice((part.start as usize).min(end)..end))
                    }
                    Landed::Stored => self.store.read(&self.blob_id, chunk, part).await,
                };
            }
        }
        if let Some(i) = parts.iter().position(Option::is_none) {
            return Err(ReadError::Lost {
                digest: wanted[i].digest,
            });
        }
        let len: usize = parts.iter().flatten().map(Bytes::len).sum();
        let out = match parts.as_slice() {
            // One chunk: hand its bytes on without a copy.
            [Some(only)] => only.clone(),
            _ => {
                let mut out = BytesMut::with_capacity(len);
                for part in parts.iter().flatten() {
                    out.extend_from_slice(part);
                }
                out.freeze()
            }
        };
        self.served(&wanted, out.len());
        Ok(out)
    }

    /// `range` of the file whose chunks covering it are `chunks`, if all of them are stored:
    /// read now into `buf` (as its answer), blocking on the disk. `None` if any is missing
    /// (then [`read`](Self::read)).
    pub fn read_local(
        &self,
        chunks: &[ChunkSpec],
        range: Range<u64>,
        buf: &mut ReadBuf,
    ) -> Option<()> {
        let wanted = self.stored_bytes(chunks, range, buf)?;
        self.counters
            .chunk_hits
            .fetch_add(wanted.len() as u64, Ordering::Relaxed);
        self.served(&wanted, buf.answer().len());
        Some(())
    }

    /// Like [`read_local`](Self::read_local), for lazysnap's own look at a file (the ELF
    /// headers prefetch parses): counted as no container's read, so the fetch amplification
    /// stays what containers made it.
    pub fn peek_local(&self, chunks: &[ChunkSpec], range: Range<u64>) -> Option<Bytes> {
        let mut buf = ReadBuf::new();
        self.stored_bytes(chunks, range, &mut buf)?;
        Some(Bytes::copy_from_slice(buf.answer()))
    }

    fn stored_bytes<'c>(
        &self,
        chunks: &'c [ChunkSpec],
        range: Range<u64>,
        buf: &mut ReadBuf,
    ) -> Option<Vec<&'c ChunkSpec>> {
        // A bad layer's reads must reach `read`, to fail there.
        if self.verdict.refusal().is_some() {
            return None;
        }
        let wanted: Vec<&ChunkSpec> = chunks
            .iter()
            .filter(|c| c.file_offset < range.end && c.file_offset + c.len > range.start)
            .collect();
        if wanted.is_empty() || wanted.len() != chunks.len() {
            return None;
        }
        self.store
            .read_span_into(&self.blob_id, chunks, range, buf)?;
        Some(wanted)
    }

    /// Counts a read served.
    fn served(&self, chunks: &[&ChunkSpec], len: usize) {
        self.note_prefetch_use(chunks);
        self.note_read(chunks.iter().copied());
        self.counters
            .last_access_ms
            .store(unix_ms(), Ordering::Relaxed);
        self.counters
            .served_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
    }

    /// Makes sure `chunks` are cached, fetching what is missing at `priority` (prefetch,
    /// readahead, background fetch). Returns the uncompressed bytes it had to fetch.
    pub async fn warm(&self, chunks: &[ChunkSpec], priority: Priority) -> Result<u64, ReadError> {
        if let Some(refused) = self.verdict.refusal() {
            return Err(refused);
        }
        let missing: Vec<&ChunkSpec> = chunks
            .iter()
            .filter(|c| !self.store.is_ready(&self.blob_id, c))
            .collect();
        if missing.is_empty() {
            return Ok(0);
        }
        let _admission = self.fetches.admit(priority).await;
        let before = self.counters.prefetch_bytes.load(Ordering::Relaxed);
        self.load(&missing, priority).await?;
        Ok(self
            .counters
            .prefetch_bytes
            .load(Ordering::Relaxed)
            .saturating_sub(before))
    }

    /// Asks the store to bring the ready ones of `chunks` into memory, in order, at most
    /// `max_bytes`: for the reads a trace predicts of bytes already on local disk. Returns
    /// the bytes asked for; a bad layer's are not.
    pub async fn preload(&self, chunks: Vec<ChunkSpec>, max_bytes: u64) -> u64 {
        if self.verdict.refusal().is_some() || max_bytes == 0 {
            return 0;
        }
        let (store, blob) = (self.store.clone(), self.blob_id);
        // The kernel only starts the reads, but opening the files is file I/O.
        tokio::task::spawn_blocking(move || store.preload(&blob, &chunks, max_bytes))
            .await
            .unwrap_or(0)
    }

    /// A local file with exactly the contents of the file whose chunks are `chunks`, if the
    /// store has all of them: for kernel passthrough. Reads through it never reach this
    /// reader, so the open counts as a use of the file's prefetched chunks.
    pub fn backing_file(&self, chunks: &[ChunkSpec]) -> Option<std::fs::File> {
        // A bad layer's reads must reach `read`, to fail there.
        if self.verdict.refusal().is_some() {
            return None;
        }
        let file = self.store.backing_file(&self.blob_id, chunks)?;
        let all: Vec<&ChunkSpec> = chunks.iter().collect();
        self.note_prefetch_use(&all);
        // Its reads never reach us: the open proves its start was wanted, no more.
        self.note_read(chunks.first());
        self.counters
            .last_access_ms
            .store(unix_ms(), Ordering::Relaxed);
        Some(file)
    }

    /// Whether every chunk is ready in the store, without reading any.
    pub fn is_cached(&self, chunks: &[ChunkSpec]) -> bool {
        chunks.iter().all(|c| self.store.is_ready(&self.blob_id, c))
    }

    fn note_prefetch_use(&self, chunks: &[&ChunkSpec]) {
        if !self.any_prefetched.load(Ordering::Relaxed) {
            return;
        }
        let mut prefetched = self.prefetched.lock().unwrap_or_else(|p| p.into_inner());
        for chunk in chunks {
            if prefetched.remove(&chunk.piece()) {
                self.counters
                    .prefetch_used_bytes
                    .fetch_add(chunk.len, Ordering::Relaxed);
            }
        }
    }

    /// Where `chunks` are now, none of which was ready when the caller looked: fetched here,
    /// or by the reader already fetching them.
    async fn load(
        &self,
        chunks: &[&ChunkSpec],
        priority: Priority,
    ) -> Result<Vec<Landed>, ReadError> {
        let mut out: Vec<Option<Landed>> = vec![None; chunks.len()];
        let wanted = chunks.len();
        let mut _demand = None;
        if priority == Priority::Demand && !chunks.is_empty() {
            self.counters
                .demand_network_reads
                .fetch_add(1, Ordering::Relaxed);
            _demand = Some(self.fetches.demand());
        }
        // Any fetch takes along the chunks at its very bytes (see `siblings`).
        let missing: Vec<usize> = (0..wanted).collect();
        // A container's read, or readahead (one, a little early), takes whole spans: it is
        // likely to go on reading nearby. Trace and landmark prefetch stop at the parts named.
        let whole_span = matches!(priority, Priority::Demand | Priority::Readahead);
        let extra = self.siblings(chunks, &missing, whole_span);
        let with_siblings: Vec<&ChunkSpec>;
        let chunks = if extra.is_empty() {
            chunks
        } else {
            with_siblings = chunks.iter().copied().chain(extra).collect();
            out.resize(with_siblings.len(), None);
            &with_siblings[..]
        };
        // What a container did not ask for is speculative, and counts as prefetch.
        let first_speculative = if priority == Priority::Demand {
            wanted
        } else {
            0
        };
        // Some chunks may be missing only because another reader is fetching them: wait for
        // that fetch instead of starting another. A fetch abandoned midway (its reader timed
        // out) sends nothing, and the next round here starts a fresh one.
        for _round in 0..3 {
            let missing: Vec<usize> = (0..chunks.len()).filter(|i| out[*i].is_none()).collect();
            if missing.is_empty() {
                break;
            }
            let (mine, theirs) = self.claim(chunks, &missing);
            self.fetch_claimed(chunks, mine, &mut out, wanted, first_speculative)
                .await?;
            for (i, mut rx) in theirs {
                let value = rx
                    .wait_for(Option::is_some)
                    .await
                    .ok()
                    .and_then(|v| v.clone());
                match value {
                    Some(Ok(landed)) => out[i] = Some(landed),
                    Some(Err(e)) => return Err(e),
                    None => {}
                }
            }
        }
        out.truncate(wanted);
        out.into_iter()
            .zip(chunks)
            .map(|(bytes, chunk)| {
                bytes.ok_or(ReadError::Abandoned {
                    digest: chunk.digest,
                })
            })
            .collect()
    }

    /// Splits `missing` into chunks this reader will fetch (registered as in flight) and
    /// chunks someone else is already fetching.
    fn claim(
        &self,
        chunks: &[&ChunkSpec],
        missing: &[usize],
    ) -> (Claim<'_>, Vec<(usize, watch::Receiver<Shared>)>) {
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        let mut claim = Claim {
            reader: self,
            senders: Vec::new(),
        };
        let mut theirs = Vec::new();
        for &i in missing {
            let id = chunks[i].piece();
            match inflight.get(&id) {
                Some(rx) => theirs.push((i, rx.clone())),
                None => {
                    let (tx, rx) = watch::channel(None);
                    inflight.insert(id, rx);
                    claim.senders.push((i, tx));
                }
            }
        }
        (claim, theirs)
    }

    async fn fetch_claimed(
        &self,
        chunks: &[&ChunkSpec],
        mut claim: Claim<'_>,
        out: &mut [Option<Landed>],
        wanted: usize,
        first_speculative: usize,
    ) -> Result<(), ReadError> {
        // A chunk fetched by another reader between our lookup and the claim is in the store
        // now; don't fetch it again.
        let mut pending = Vec::new();
        for (i, tx) in claim.senders.drain(..) {
            if self.store.is_ready(&self.blob_id, chunks[i]) {
                let _ = tx.send(Some(Ok(Landed::Stored)));
                out[i] = Some(Landed::Stored);
            } else {
                pending.push((i, tx));
            }
        }
        pending.sort_by_key(|(i, _)| chunks[*i].blob_range.start);
        // Runs go out together (a prefetch batch of scattered chunks would otherwise cost one
        // round trip per run); each run's waiters are answered as soon as it lands.
        let runs = self.runs(chunks, &pending);
        // Futures made up front from a named async fn: a closure over borrowed runs inside
        // the stream trips rustc's higher-ranked lifetime inference in Send contexts.
        // What the decoder needs besides the chunks' bytes (a gzip-index span's window) is
        // asked for once for the whole batch, in as few requests as the side blob's layout
        // allows, and comes while the runs do: each run waits for it only to decode.
        let all: Vec<ChunkSpec> = pending.iter().map(|(i, _)| chunks[*i].clone()).collect();
        let extra: SharedExtra<'_> = self
            .decoder
            .fetch_extra(&all, self.side.as_deref())
            .map(|r| Arc::new(r.map_err(Arc::new)))
            .boxed()
            .shared();
        let fetches: Vec<_> = runs
            .iter()
            .enumerate()
            .map(|(k, run)| self.fetch_and_answer(k, chunks, run, first_speculative, extra.clone()))
            .collect();
        let results: Vec<(usize, Vec<Result<Landed, ReadError>>)> = stream::iter(fetches)
            .buffer_unordered(RUNS_IN_FLIGHT)
            .collect()
            .await;
        if let Some(done) = extra.peek() {
            self.count_extra(done, &all);
        }
        // Only the chunks the caller asked for can fail its read: a neighbour that came along
        // and does not decode fails its own waiters, not this reader.
        let mut first_error = None;
        for (k, values) in results {
            for ((i, _), value) in runs[k].iter().zip(values) {
                match value {
                    Ok(landed) => out[*i] = Some(landed),
                    Err(e) if *i < wanted => {
                        first_error.get_or_insert(e);
                    }
                    Err(e) => {
                        tracing::debug!(error = %crate::error_chain(&e), "fetching a neighbouring chunk failed")
                    }
                }
            }
        }
        drop(runs);
        claim.senders = pending;
        drop(claim);
        first_error.map_or(Ok(()), Err)
    }

    /// Fetches one run and answers its waiters; returns the run's number with each chunk's
    /// outcome.
    async fn fetch_and_answer(
        &self,
        k: usize,
        chunks: &[&ChunkSpec],
        run: &[(usize, watch::Sender<Shared>)],
        first_speculative: usize,
        extra: SharedExtra<'_>,
    ) -> (usize, Vec<Result<Landed, ReadError>>) {
        let start = chunks[run[0].0].blob_range.start;
        let end = run
            .iter()
            .map(|(i, _)| chunks[*i].blob_range.end)
            .max()
            .unwrap_or(start);
        self.counters
            .chunk_misses
            .fetch_add(run.len() as u64, Ordering::Relaxed);
        let values = match self
            .fetch_run(chunks, run, start..end, first_speculative, extra)
            .await
        {
            Ok(values) => values,
            Err(e) => vec![Err(e); run.len()],
        };
        for ((_, tx), value) in run.iter().zip(&values) {
            let _ = tx.send(Some(value.clone()));
        }
        (k, values)
    }

    /// Must come before the chunk is visible in the store: a container reading it from there
    /// first would otherwise find it not yet marked, and it would count as wasted.
    fn note_prefetched(&self, chunk: &ChunkSpec) {
        self.prefetched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(chunk.piece());
        self.counters
            .prefetch_bytes
            .fetch_add(chunk.len, Ordering::Relaxed);
        self.any_prefetched.store(true, Ordering::Relaxed);
    }

    /// Groups claimed chunks (sorted by blob offset) into runs for one request each: chunks
    /// close enough in the blob (a gap of at most `MAX_GAP`, whose bytes are fetched and
    /// dropped: cheaper than another round trip) and small enough together.
    fn runs<'p>(
        &self,
        chunks: &[&ChunkSpec],
        pending: &'p [(usize, watch::Sender<Shared>)],
    ) -> Vec<&'p [(usize, watch::Sender<Shared>)]> {
        let mut runs = Vec::new();
        let mut begin = 0;
        for j in 1..=pending.len() {
            let split = j == pending.len() || {
                let prev = &chunks[pending[j - 1].0].blob_range;
                let next = &chunks[pending[j].0].blob_range;
                let first = &chunks[pending[begin].0].blob_range;
                next.start > prev.end + MAX_GAP || next.end - first.start > self.max_request
            };
            if split {
                runs.push(&pending[begin..j]);
                begin = j;
            }
        }
        runs
    }

    async fn fetch_run(
        &self,
        chunks: &[&ChunkSpec],
        run: &[(usize, watch::Sender<Shared>)],
        range: Range<u64>,
        first_speculative: usize,
        extra: SharedExtra<'_>,
    ) -> Result<Vec<Result<Landed, ReadError>>, ReadError> {
        self.counters.fetches.fetch_add(1, Ordering::Relaxed);
        let _buffer = self.fetches.buffer(range.end - range.start).await;
        let started = std::time::Instant::now();
        self.fetches.in_flight.fetch_add(1, Ordering::Relaxed);
        let specs: Vec<ChunkSpec> = run.iter().map(|(i, _)| chunks[*i].clone()).collect();
        // What the decoder needs besides the run's bytes (gzip-index windows) is fetched for
        // the whole batch at the same time, not a round trip later.
        let (result, extra) = tokio::join!(self.blob.read_range(range.clone()), extra);
        self.fetches.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.fetches.latency.observe(started.elapsed());
        tracing::debug!(
            start = range.start,
            bytes = range.end - range.start,
            chunks = run.len(),
            speculative = run.iter().filter(|(i, _)| *i >= first_speculative).count(),
            ms = started.elapsed().as_millis() as u64,
            ok = result.is_ok(),
            "fetched a run of chunks"
        );
        let blob = result?;
        self.counters
            .fetched_bytes
            .fetch_add(blob.len() as u64, Ordering::Relaxed);
        if let Err(source) = &*extra {
            return Err(ReadError::Extra {
                offset: range.start,
                source: source.clone(),
            });
        }
        for (i, _) in run {
            if *i >= first_speculative {
                self.note_prefetched(chunks[*i]);
            }
        }
        // Decompressing, hashing and writing a run (up to `max_request` of compressed bytes)
        // is CPU and disk work: it goes to the blocking pool, never onto the workers answering
        // FUSE and gRPC.
        let (decoder, store, blob_id) = (self.decoder.clone(), self.store.clone(), self.blob_id);
        let landed = tokio::task::spawn_blocking(move || {
            let landed = decode_run(&*decoder, &*store, &blob_id, &specs, &blob, range);
            drop(extra);
            landed
        })
        .await
        .map_err(|e| ReadError::Task(Arc::new(e)))?;
        if landed.iter().any(|l| matches!(l, Ok(Landed::Stored))) {
            self.stored.notify_one();
        }
        Ok(landed)
    }

    /// Counts what `fetch_extra` fetched, or says why it failed (which fails the chunks it
    /// was for: a window that does not match its digest is never used).
    fn count_extra(&self, extra: &Result<Extra, Arc<FormatError>>, specs: &[ChunkSpec]) {
        match extra {
            Ok(extra) => {
                self.counters
                    .fetched_bytes
                    .fetch_add(extra.fetched_bytes, Ordering::Relaxed);
                self.counters
                    .fetches
                    .fetch_add(extra.requests, Ordering::Relaxed);
            }
            Err(e) => {
                let offset = specs.first().map_or(0, |c| c.blob_range.start);
                tracing::warn!(offset, error = %crate::error_chain(&**e), "fetching what the chunks need besides their bytes failed");
            }
        }
    }

    /// Fetches blob bytes `range` whole, in one request at `priority`, hands them to `visit`
    /// (off the async workers), and stores from the same bytes those of `chunks` lying within
    /// the range that are neither cached nor being fetched by someone else: for a walk that
    /// needs every byte of the blob (whole-layer verification), so that what it fetches is
    /// also what fills the cache. The bytes are held within the memory budget meanwhile.
    /// Chunks that fail to decode or verify fail their own waiters, not this call.
    pub async fn fetch_through<T, V>(
        &self,
        range: Range<u64>,
        chunks: &[ChunkSpec],
        priority: Priority,
        visit: V,
    ) -> Result<T, ReadError>
    where
        V: FnOnce(&[u8]) -> T + Send + 'static,
        T: Send + 'static,
    {
        if let Some(refused) = self.verdict.refusal() {
            return Err(refused);
        }
        let _admission = self.fetches.admit(priority).await;
        let _buffer = self.fetches.buffer(range.end - range.start).await;
        self.counters.fetches.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        self.fetches.in_flight.fetch_add(1, Ordering::Relaxed);
        let result = self.blob.read_range(range.clone()).await;
        self.fetches.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.fetches.latency.observe(started.elapsed());
        let blob = result?;
        self.counters
            .fetched_bytes
            .fetch_add(blob.len() as u64, Ordering::Relaxed);
        if blob.len() as u64 != range.end - range.start {
            return Err(ReadError::ShortBody {
                range,
                got: blob.len() as u64,
            });
        }
        let refs: Vec<&ChunkSpec> = chunks
            .iter()
            .filter(|c| c.blob_range.start >= range.start && c.blob_range.end <= range.end)
            .filter(|c| !self.store.is_ready(&self.blob_id, c))
            .collect();
        let all: Vec<usize> = (0..refs.len()).collect();
        let (mut claim, _theirs) = self.claim(&refs, &all);
        let mine = std::mem::take(&mut claim.senders);
        let specs: Vec<ChunkSpec> = mine.iter().map(|(i, _)| refs[*i].clone()).collect();
        for spec in &specs {
            self.note_prefetched(spec);
        }
        // A failure here fails the chunks, not the walk: its bytes still count for the
        // layer's digest.
        let fetched_extra = self
            .decoder
            .fetch_extra(&specs, self.side.as_deref())
            .await
            .map_err(Arc::new);
        self.count_extra(&fetched_extra, &specs);
        let (held_extra, extra_failed) = match fetched_extra {
            Ok(extra) => (Some(extra), None),
            Err(source) => (
                None,
                Some(ReadError::Extra {
                    offset: range.start,
                    source,
                }),
            ),
        };
        let (decoder, store, blob_id) = (self.decoder.clone(), self.store.clone(), self.blob_id);
        let (visited, landed) = tokio::task::spawn_blocking(move || {
            let visited = visit(&blob);
            let landed = match extra_failed {
                Some(e) => vec![Err(e); specs.len()],
                None => decode_run(&*decoder, &*store, &blob_id, &specs, &blob, range),
            };
            drop(held_extra);
            (visited, landed)
        })
        .await
        .map_err(|e| ReadError::Task(Arc::new(e)))?;
        for ((i, tx), value) in mine.iter().zip(&landed) {
            if let Err(e) = value {
                tracing::warn!(chunk = %refs[*i].digest, error = %crate::error_chain(e), "a chunk of the blob walk does not verify");
            }
            let _ = tx.send(Some(value.clone()));
        }
        claim.senders = mine;
        drop(claim);
        if landed.iter().any(|l| matches!(l, Ok(Landed::Stored))) {
            self.stored.notify_one();
        }
        Ok(visited)
    }
}

/// Decodes and verifies each chunk of a fetched run into the store (or, when the store cannot
/// take it, into memory); `blob` holds blob bytes `range`. Pieces of one unit (the files of
/// one gzip-index part) are decoded and hashed once for all of them: a part holds many small
/// files, and decoding it once per file made a prefetch of many small files CPU-bound. Units
/// whose compressed bytes start at the same offset (the parts of one span) are decoded
/// together, in one pass over their shared start.
fn decode_run(
    decoder: &dyn ChunkDecoder,
    store: &dyn ChunkStore,
    blob_id: &BlobId,
    specs: &[ChunkSpec],
    blob: &Bytes,
    range: Range<u64>,
) -> Vec<Result<Landed, ReadError>> {
    let compressed_of = |spec: &ChunkSpec| {
        let from = spec.blob_range.start.checked_sub(range.start)? as usize;
        let to = spec.blob_range.end.checked_sub(range.start)? as usize;
        blob.get(from..to)
    };
    let mut out: Vec<Option<Result<Landed, ReadError>>> = (0..specs.len()).map(|_| None).collect();
    type UnitKey = (chunk::ChunkId, u64, u64, ChunkDigest);
    let mut units: HashMap<UnitKey, Vec<usize>> = HashMap::new();
    for (i, spec) in specs.iter().enumerate() {
        units
            .entry((
                spec.id,
                spec.blob_range.start,
                spec.blob_range.end,
                spec.digest,
            ))
            .or_default()
            .push(i);
    }
    // Units by where their compressed bytes start.
    let mut families: HashMap<u64, Vec<&Vec<usize>>> = HashMap::new();
    for (key, pieces) in &units {
        families.entry(key.1).or_default().push(pieces);
    }
    for family in families.values() {
        if family.len() == 1 {
            let pieces = family[0];
            if pieces.len() == 1 {
                continue;
            }
            let Some(compressed) = compressed_of(&specs[pieces[0]]) else {
                continue;
            };
            let group: Vec<&ChunkSpec> = pieces.iter().map(|&i| &specs[i]).collect();
            for (&i, landed) in pieces
                .iter()
                .zip(decode_unit(decoder, store, blob_id, &group, compressed))
            {
                out[i] = landed;
            }
            continue;
        }
        let heads: Vec<&ChunkSpec> = family.iter().map(|p| &specs[p[0]]).collect();
        let Some(longest) = heads.iter().max_by_key(|c| c.blob_range.end) else {
            continue;
        };
        let Some(compressed) = compressed_of(longest) else {
            continue;
        };
        match decoder.decode_shared(&heads, compressed) {
            Ok(decoded) => {
                for (pieces, bytes) in family.iter().zip(decoded) {
                    let group: Vec<&ChunkSpec> = pieces.iter().map(|&i| &specs[i]).collect();
                    let given = Decoded(bytes);
                    for (&i, landed) in
                        pieces
                            .iter()
                            .zip(decode_unit(&given, store, blob_id, &group, &[]))
                    {
                        out[i] = landed;
                    }
                }
            }
            Err(e) => {
                let e = Arc::new(e);
                for pieces in family {
                    for &i in pieces.iter() {
                        out[i] = Some(Err(ReadError::Decode {
                            digest: specs[i].digest,
                            offset: specs[i].blob_range.start,
                            source: e.clone(),
                        }));
                    }
                }
            }
        }
    }
    out.into_iter()
        .zip(specs)
        .map(|(done, spec)| match done {
            Some(landed) => landed,
            None => decode_one(
                decoder,
                store,
                blob_id,
                spec,
                compressed_of(spec),
                &range,
                blob,
            ),
        })
        .collect()
}

/// A unit's bytes decoded already (with the other parts of its span), handed to
/// [`decode_unit`] as its decoder: they are hashed and stored like freshly decoded ones.
struct Decoded(Vec<u8>);

impl ChunkDecoder for Decoded {
    fn decode(&self, _chunk: &ChunkSpec, _compressed: &[u8]) -> Result<Vec<u8>, FormatError> {
        Ok(self.0.clone())
    }

    fn decode_to(
        &self,
        _chunk: &ChunkSpec,
        _compressed: &[u8],
        out: &mut dyn std::io::Write,
    ) -> Result<(), FormatError> {
        out.write_all(&self.0).map_err(FormatError::ChunkWrite)
    }
}

/// One chunk of a run into the store, or into memory when the store cannot take it.
fn decode_one(
    decoder: &dyn ChunkDecoder,
    store: &dyn ChunkStore,
    blob_id: &BlobId,
    spec: &ChunkSpec,
    compressed: Option<&[u8]>,
    range: &Range<u64>,
    blob: &Bytes,
) -> Result<Landed, ReadError> {
    let compressed = compressed.ok_or_else(|| ReadError::ShortBody {
        range: range.clone(),
        got: blob.len() as u64,
    })?;
    let why = match store.put(blob_id, spec) {
        Ok(Put::Ready) => return Ok(Landed::Stored),
        Ok(Put::Sink(sink)) => match stream_into(decoder, spec, compressed, sink) {
            Ok(()) => return Ok(Landed::Stored),
            Err(Streamed::Refused(e)) => return Err(e),
            Err(Streamed::Store(why)) => Some(why),
        },
        Ok(Put::Unavailable) => None,
        Err(e) => Some(crate::error_chain(&e)),
    };
    if let Some(why) = why {
        tracing::warn!(chunk = %spec.digest, error = %why, "storing a chunk failed; serving it from memory");
    }
    let bytes = decoder
        .decode(spec, compressed)
        .map_err(|e| decode_error(spec, e))?;
    chunk::verify(&spec.digest, Bytes::from(bytes))
        .map(|v| Landed::Memory(v.into_bytes()))
        .map_err(|source| ReadError::Corrupt {
            offset: spec.blob_range.start,
            source,
        })
}

/// Several pieces of one unit, decoded and hashed once, each piece streamed into its own
/// store entry. `None` for a piece left to [`decode_one`]: the store could not take it here
/// (it is then decoded again, into memory: rare).
fn decode_unit(
    decoder: &dyn ChunkDecoder,
    store: &dyn ChunkStore,
    blob_id: &BlobId,
    pieces: &[&ChunkSpec],
    compressed: &[u8],
) -> Vec<Option<Result<Landed, ReadError>>> {
    let mut out: Vec<Option<Result<Landed, ReadError>>> = (0..pieces.len()).map(|_| None).collect();
    let mut sinks = Vec::new();
    for (j, spec) in pieces.iter().enumerate() {
        match store.put(blob_id, spec) {
            Ok(Put::Ready) => out[j] = Some(Ok(Landed::Stored)),
            Ok(Put::Sink(sink)) => sinks.push((
                j,
                Piece {
                    inner: sink,
                    from: spec.within,
                    len: spec.len,
                    at: 0,
                },
            )),
            Ok(Put::Unavailable) | Err(_) => {}
        }
    }
    let Some(first) = pieces.first() else {
        return out;
    };
    if sinks.is_empty() {
        return out;
    }
    let mut hashing = Hashing::new(Fanout { sinks });
    if let Err(e) = decoder.decode_to(first, compressed, &mut hashing) {
        let e = decode_error(first, e);
        for landed in &mut out {
            landed.get_or_insert_with(|| Err(e.clone()));
        }
        return out;
    }
    match hashing.verify(&first.digest) {
        Ok((fanout, proof)) => {
            for (j, piece) in fanout.sinks {
                match piece.inner.commit(proof.again()) {
                    Ok(()) => out[j] = Some(Ok(Landed::Stored)),
                    Err(e) => {
                        tracing::warn!(chunk = %first.digest, error = %crate::error_chain(&e), "storing a piece of a chunk failed");
                    }
                }
            }
        }
        Err(source) => {
            for landed in &mut out {
                landed.get_or_insert_with(|| {
                    Err(ReadError::Corrupt {
                        offset: first.blob_range.start,
                        source: source.clone(),
                    })
                });
            }
        }
    }
    out
}

/// Writes one unit's bytes to every piece's sink; a sink that fails (disk full) drops out,
/// and its piece is left to the one-by-one path.
struct Fanout {
    sinks: Vec<(usize, Piece<Box<dyn ChunkSink>>)>,
}

impl std::io::Write for Fanout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sinks
            .retain_mut(|(_, piece)| match std::io::Write::write_all(piece, buf) {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!(error = %e, "writing a piece of a chunk into the store failed");
                    false
                }
            });
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn decode_error(spec: &ChunkSpec, e: FormatError) -> ReadError {
    ReadError::Decode {
        digest: spec.digest,
        offset: spec.blob_range.start,
        source: Arc::new(e),
    }
}

/// Why streaming a chunk into the store did not make it ready.
enum Streamed {
    /// The bytes are bad (do not decode, or do not match): the read fails.
    Refused(ReadError),
    /// The store failed (disk full...): the bytes may still be good.
    Store(String),
}

/// Passes on only bytes `from..from + len` of what is written to it: a file's piece of a
/// larger verified unit (a gzip-index span), while the whole unit is hashed.
struct Piece<W> {
    inner: W,
    from: u64,
    len: u64,
    at: u64,
}

impl<W: std::io::Write> std::io::Write for Piece<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let start = self.from.saturating_sub(self.at).min(buf.len() as u64) as usize;
        let end = (self.from + self.len)
            .saturating_sub(self.at)
            .min(buf.len() as u64) as usize;
        if start < end {
            self.inner.write_all(&buf[start..end])?;
        }
        self.at += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn stream_into(
    decoder: &dyn ChunkDecoder,
    spec: &ChunkSpec,
    compressed: &[u8],
    sink: Box<dyn ChunkSink>,
) -> Result<(), Streamed> {
    let mut hashing = Hashing::new(Piece {
        inner: sink,
        from: spec.within,
        len: spec.len,
        at: 0,
    });
    match decoder.decode_to(spec, compressed, &mut hashing) {
        Ok(()) => {}
        Err(FormatError::ChunkWrite(e)) => return Err(Streamed::Store(e.to_string())),
        Err(e) => return Err(Streamed::Refused(decode_error(spec, e))),
    }
    let (sink, proof) = hashing.verify(&spec.digest).map_err(|source| {
        Streamed::Refused(ReadError::Corrupt {
            offset: spec.blob_range.start,
            source,
        })
    })?;
    sink.inner
        .commit(proof)
        .map_err(|e| Streamed::Store(crate::error_chain(&e)))
}

/// Chunks this reader promised to fetch. Dropping it (a finished fetch, or a read cancelled
/// midway) takes them out of the in-flight table; waiters of a cancelled fetch see their
/// channel close and fetch themselves.
struct Claim<'a> {
    reader: &'a LayerReader,
    senders: Vec<(usize, watch::Sender<Shared>)>,
}

impl Claim<'_> {
    /// The promises, for a fetch that outlives this borrow of the reader; the chunks stay
    /// in flight until each is answered.
    fn into_senders(mut self) -> Vec<(usize, watch::Sender<Shared>)> {
        std::mem::take(&mut self.senders)
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut inflight = self
            .reader
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        inflight.retain(|_, rx| rx.has_changed().is_ok() && rx.borrow().is_none());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    /// Waits (10 s at most, or fails with `what`) until every one of `chunks` is stored.
    async fn until_cached(reader: &LayerReader, chunks: &[ChunkSpec], what: &str) {
        let landed = async {
            while !reader.is_cached(chunks) {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), landed)
            .await
            .expect(what);
    }

    use super::*;
    use crate::cache::LocalStore;
    use crate::metadata::{LayerIndex, ROOT};
    use crate::test_utils::{open_fixture, FixtureBlob};

    struct Setup {
        _dir: tempfile::TempDir,
        index: LayerIndex,
        blob: Arc<FixtureBlob>,
        decoder: Arc<dyn ChunkDecoder>,
        cache: Arc<LocalStore>,
        reader: Arc<LayerReader>,
    }

    async fn setup(corrupt: bool, fail: bool) -> Setup {
        let (fixture, opened) = open_fixture("estargz").await;
        let blob = Arc::new(FixtureBlob {
            blob: fixture.blob.clone(),
            requests: AtomicUsize::new(0),
            corrupt,
            fail,
            delay: std::time::Duration::from_millis(20),
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Arc::new(LocalStore::open(dir.path(), 0).expect("cache"));
        let reader = Arc::new(LayerReader::new(
            blob.clone(),
            BlobId::new("sha256:fixture", None),
            opened.decoder.clone(),
            cache.clone(),
            Arc::new(Fetches::new(2)),
        ));
        Setup {
            _dir: dir,
            index: opened.index,
            blob,
            decoder: opened.decoder,
            cache,
            reader,
        }
    }

    /// A reader of the fixture's blob with a store of its own in `dir` and nothing cached.
    fn fresh_reader(s: &Setup, dir: &std::path::Path) -> LayerReader {
        LayerReader::new(
            s.blob.clone(),
            BlobId::new("sha256:fixture", None),
            s.decoder.clone(),
            Arc::new(LocalStore::open(dir, 0).expect("cache")),
            Arc::new(Fetches::new(2)),
        )
    }

    fn file(s: &Setup, path: &str) -> (u64, u64) {
        let ino = path
            .split('/')
            .try_fold(ROOT, |d, n| s.index.lookup(d, std::ffi::OsStr::new(n)))
            .expect("path exists");
        (ino, s.index.node(ino).expect("node").size)
    }

    fn expected_multi_chunk() -> Vec<u8> {
        (1..=40000)
            .flat_map(|i| format!("{i}\n").into_bytes())
            .collect()
    }

    #[tokio::test]
    async fn reads_any_range_and_merges_neighbouring_chunks() {
        let s = setup(false, false).await;
        let (ino, size) = file(&s, "dir/multi-chunk.txt");
        let expected = expected_multi_chunk();
        assert_eq!(size as usize, expected.len());
        let all = s
            .reader
            .read(s.index.chunks_for(ino, 0, size), 0..size)
            .await
            .expect("read");
        assert_eq!(all.as_ref(), expected.as_slice());
        assert_eq!(
            s.blob.requests.load(Ordering::SeqCst),
            1,
            "contiguous missing chunks are fetched with one request"
        );
        let part = s
            .reader
            .read(s.index.chunks_for(ino, 65_000, 140_001), 65_000..140_001)
            .await
            .expect("read");
        assert_eq!(part.as_ref(), &expected[65_000..140_001]);
        assert_eq!(
            s.blob.requests.load(Ordering::SeqCst),
            1,
            "second read is served from cache"
        );
        let counters = s.reader.counters();
        assert!(counters.chunk_hits.load(Ordering::Relaxed) >= 2);
        assert!(counters.fetched_bytes.load(Ordering::Relaxed) > 0);
    }

    #[tokio::test]
    async fn prefetch_is_counted_used_when_read_and_network_waits_are_counted() {
        let s = setup(false, false).await;
        let (ino, size) = file(&s, "dir/multi-chunk.txt");
        let chunks = s.index.chunks_for(ino, 0, size).to_vec();
        assert!(chunks.len() > 1, "fixture has a multi-chunk file");
        let first = &chunks[..1];
        let fetched = s
            .reader
            .warm(first, Priority::Prefetch)
            .await
            .expect("warm");
        assert_eq!(fetched, chunks[0].len);
        let again = s
            .reader
            .warm(first, Priority::Prefetch)
            .await
            .expect("warm again");
        assert_eq!(again, 0, "cached chunks cost nothing");
        let c = s.reader.counters();
        s.reader.read(first, 0..10).await.expect("read");
        assert_eq!(c.prefetch_used_bytes.load(Ordering::Relaxed), chunks[0].len);
        assert_eq!(
            c.demand_network_reads.load(Ordering::Relaxed),
            0,
            "the prefetched chunk was a hit"
        );
        s.reader.read(&chunks, 0..size).await.expect("read all");
        assert_eq!(c.demand_network_reads.load(Ordering::Relaxed), 1);
        assert_eq!(
            c.prefetch_used_bytes.load(Ordering::Relaxed),
            chunks[0].len,
            "a chunk counts as used once"
        );
        assert!(c.last_access_ms.load(Ordering::Relaxed) > 0);
    }

    #[tokio::test]
    async fn a_miss_brings_the_rest_of_its_small_file_in_a_request_of_its_own() {
        let s = setup(false, false).await;
        let layout = s.index.chunks_in_blob_order();
        let (ino, size) = file(&s, "dir/multi-chunk.txt");
        let chunks = s.index.chunks_for(ino, 0, size).to_vec();
        assert!(chunks.len() > 2, "fixture has a file of several chunks");
        let dir = tempfile::tempdir().expect("tempdir");
        // The smallest reach: only the rest of the file comes along.
        let reader = Arc::new(fresh_reader(&s, dir.path()).with_neighbours(Arc::from(layout), 1));
        let expected = expected_multi_chunk();
        let first = reader.read(&chunks, 0..10).await.expect("read");
        assert_eq!(first.as_ref(), &expected[..10]);
        until_cached(&reader, &chunks, "the rest of the file lands").await;
        assert_eq!(
            s.blob.requests.load(Ordering::SeqCst),
            2,
            "the read's chunk, and the rest of the file beside it"
        );
        let c = reader.counters();
        let rest: u64 = chunks[1..].iter().map(|c| c.len).sum();
        assert_eq!(
            c.prefetch_bytes.load(Ordering::Relaxed),
            rest,
            "the rest of the file counts as prefetch"
        );
        let all = reader.read(&chunks, 0..size).await.expect("read");
        assert_eq!(all.as_ref(), expected.as_slice());
        assert_eq!(
            s.blob.requests.load(Ordering::SeqCst),
            2,
            "no third request"
        );
        assert_eq!(c.demand_network_reads.load(Ordering::Relaxed), 1);
        assert_eq!(c.prefetch_used_bytes.load(Ordering::Relaxed), rest);
        let compressed: u64 = chunks
            .iter()
            .map(|c| c.blob_range.end - c.blob_range.start)
            .sum();
        assert_eq!(
            c.read_chunk_bytes.load(Ordering::Relaxed),
            compressed,
            "each chunk read counts its compressed bytes"
        );
        reader.read(&chunks, 0..size).await.expect("read again");
        assert_eq!(
            c.read_chunk_bytes.load(Ordering::Relaxed),
            compressed,
            "a chunk read again counts once"
        );
        assert_eq!(
            c.fetched_bytes.load(Ordering::Relaxed),
            compressed,
            "fetched exactly what was read: amplification 1"
        );
    }

    #[tokio::test]
    async fn a_miss_brings_the_next_files_within_reach() {
        let s = setup(false, false).await;
        let layout: Vec<ChunkSpec> = s.index.chunks_in_blob_order();
        // The last chunk of a file that another file follows in the blob.
        let at = layout
            .windows(2)
            .position(|w| w[0].file != w[1].file)
            .expect("the fixture has several files");
        let (last, next) = (layout[at].clone(), layout[at + 1].clone());
        let dir = tempfile::tempdir().expect("tempdir");
        let reach = next.blob_range.end - last.blob_range.start;
        let reader =
            Arc::new(fresh_reader(&s, dir.path()).with_neighbours(Arc::from(layout), reach));
        let from = last.file_offset;
        reader
            .read(std::slice::from_ref(&last), from..from + 1)
            .await
            .expect("read");
        until_cached(
            &reader,
            std::slice::from_ref(&next),
            "the next file's chunk lands",
        )
        .await;
        assert_eq!(
            reader.counters().prefetch_bytes.load(Ordering::Relaxed),
            next.len,
            "the chunk after the file, within reach, and nothing more"
        );
    }

    #[tokio::test]
    async fn a_miss_in_a_small_directory_brings_its_other_files() {
        let s = setup(false, false).await;
        let layout: Vec<ChunkSpec> = s.index.chunks_in_blob_order();
        let dirs = s.index.directories_of(&layout);
        // A file of one chunk in a directory that holds other files too.
        let (miss, dir) = (0..layout.len())
            .filter(|&i| dirs[i] != 0)
            .filter(|&i| layout.iter().filter(|c| c.file == layout[i].file).count() == 1)
            .find(|&i| {
                (0..layout.len()).any(|j| dirs[j] == dirs[i] && layout[j].file != layout[i].file)
            })
            .map(|i| (layout[i].clone(), dirs[i]))
            .expect("the fixture has a directory of several files");
        let others: Vec<ChunkSpec> = (0..layout.len())
            .filter(|&j| dirs[j] == dir && layout[j].piece() != miss.piece())
            .map(|j| layout[j].clone())
            .collect();
        let dir_path = tempfile::tempdir().expect("tempdir");
        let reader = Arc::new(
            fresh_reader(&s, dir_path.path())
                .with_neighbours(Arc::from(layout.clone()), 1)
                .with_directories(dirs),
        );
        let from = miss.file_offset;
        reader
            .read(std::slice::from_ref(&miss), from..from + 1)
            .await
            .expect("read");
        until_cached(&reader, &others, "the directory's other files land").await;
        assert_eq!(
            reader.counters().prefetch_bytes.load(Ordering::Relaxed),
            others.iter().map(|c| c.len).sum::<u64>(),
            "the directory's other files, and nothing else"
        );
    }

    #[tokio::test]
    async fn a_miss_in_a_larger_directory_brings_its_other_files_once_another_was_read() {
        let s = setup(false, false).await;
        let layout: Vec<ChunkSpec> = s.index.chunks_in_blob_order();
        let dirs = s.index.directories_of(&layout);
        // A directory of two files or more: a chunk of one is read, then the last chunk of
        // another (so that the rest of its file brings nothing); the directory's other
        // chunks are what the rule may bring.
        let files_of = |dir: u64| {
            let mut files: Vec<_> = (0..layout.len())
                .filter(|&k| dirs[k] == dir)
                .map(|k| layout[k].file)
                .collect();
            files.sort_unstable();
            files.dedup();
            files
        };
        let dir = dirs
            .iter()
            .copied()
            .filter(|&d| d != 0)
            .find(|&d| {
                files_of(d).len() >= 2 && (0..layout.len()).filter(|&k| dirs[k] == d).count() >= 3
            })
            .expect("the fixture has a directory of two files and three chunks or more");
        let files = files_of(dir);
        let first = layout
            .iter()
            .find(|c| c.file == files[0])
            .cloned()
            .expect("a file of the directory has a chunk");
        let second = layout
            .iter()
            .rev()
            .find(|c| c.file == files[1])
            .cloned()
            .expect("a file of the directory has a chunk");
        let others: Vec<ChunkSpec> = (0..layout.len())
            .filter(|&k| {
                dirs[k] == dir
                    && layout[k].file != first.file
                    && layout[k].piece() != second.piece()
            })
            .map(|k| layout[k].clone())
            .collect();
        assert!(
            !others.is_empty(),
            "the directory has chunks besides the two read"
        );
        let dir_path = tempfile::tempdir().expect("tempdir");
        let mut reader = fresh_reader(&s, dir_path.path())
            .with_neighbours(Arc::from(layout.clone()), 1)
            .with_directories(dirs);
        // Every directory of the fixture counts as larger than the first-miss limit.
        reader.first_miss_directory_bytes = 0;
        let reader = Arc::new(reader);
        let from = first.file_offset;
        reader
            .read(std::slice::from_ref(&first), from..from + 1)
            .await
            .expect("first read");
        // Time for a neighbour fetch, had one been started, to land.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(
            others
                .iter()
                .all(|c| !reader.is_cached(std::slice::from_ref(c))),
            "one file read of the directory brings none of its other files"
        );
        let from = second.file_offset;
        reader
            .read(std::slice::from_ref(&second), from..from + 1)
            .await
            .expect("second read");
        until_cached(
            &reader,
            &others,
            "a second file read brings the directory's other files",
        )
        .await;
    }

    #[tokio::test]
    async fn chunks_cached_for_another_blob_are_fetched_from_this_one_and_verified() {
        let s = setup(false, false).await;
        let (ino, size) = file(&s, "dir/multi-chunk.txt");
        let chunks = s.index.chunks_for(ino, 0, size).to_vec();
        s.reader.read(&chunks, 0..size).await.expect("read");
        assert!(s.reader.is_cached(&chunks));
        // Another layer whose index names the same chunks but whose blob holds other bytes:
        // the cache does not serve it what the first blob proved, and its own bytes fail.
        let lying = Arc::new(FixtureBlob {
            blob: s.blob.blob.clone(),
            requests: AtomicUsize::new(0),
            corrupt: true,
            fail: false,
            delay: std::time::Duration::ZERO,
        });
        let other = |blob: Arc<FixtureBlob>, id: &str| {
            Arc::new(LayerReader::new(
                blob,
                BlobId::new(id, None),
                s.decoder.clone(),
                s.cache.clone(),
                Arc::new(Fetches::new(2)),
            ))
        };
        let attacker = other(lying.clone(), "sha256:attacker");
        assert!(!attacker.is_cached(&chunks));
        let err = attacker
            .read(&chunks, 0..size)
            .await
            .expect_err("other bytes refused");
        assert!(matches!(err, ReadError::Corrupt { .. }), "{err}");
        assert!(
            lying.requests.load(Ordering::SeqCst) >= 1,
            "it had to fetch"
        );
        // A layer whose blob really holds the bytes fetches once, then reads from the cache.
        let honest = Arc::new(FixtureBlob {
            blob: s.blob.blob.clone(),
            ..FixtureBlob::default()
        });
        let third = other(honest.clone(), "sha256:third");
        let got = third.read(&chunks, 0..size).await.expect("read");
        assert_eq!(got.as_ref(), expected_multi_chunk().as_slice());
        let fetched = honest.requests.load(Ordering::SeqCst);
        assert_eq!(fetched, 1);
        third.read(&chunks, 0..size).await.expect("read again");
        assert_eq!(honest.requests.load(Ordering::SeqCst), fetched);
        // The same blob in another layer reader shares everything.
        let same = other(honest.clone(), "sha256:fixture");
        same.read(&chunks, 0..size).await.expect("read");
        assert_eq!(honest.requests.load(Ordering::SeqCst), fetched);
    }

    /// Counts the units it decodes.
    struct Counting {
        inner: Arc<dyn ChunkDecoder>,
        decodes: AtomicUsize,
    }

    impl ChunkDecoder for Counting {
        fn fetch_extra<'a>(
            &'a self,
            chunks: &'a [ChunkSpec],
            side: Option<&'a dyn BlobSource>,
        ) -> crate::format::BoxFuture<'a, Result<Extra, FormatError>> {
            self.inner.fetch_extra(chunks, side)
        }

        fn decode(&self, chunk: &ChunkSpec, compressed: &[u8]) -> Result<Vec<u8>, FormatError> {
            self.decodes.fetch_add(1, Ordering::SeqCst);
            self.inner.decode(chunk, compressed)
        }
    }

    /// 24 files of 24 KiB of varied text (so that deflate ends blocks often and a span has
    /// several parts), from `seed`.
    fn varied_files(mut x: u64) -> Vec<(String, Vec<u8>)> {
        (0..24)
            .map(|i| {
                let mut data = Vec::new();
                while data.len() < 24 << 10 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    data.extend_from_slice(format!("{} {}\n", x >> 40, x % 977).as_bytes());
                }
                (format!("lib/m{i:02}.py"), data)
            })
            .collect()
    }

    /// A reader of a gzip-index layer over a fresh store in `dir`, with `layout` for its
    /// neighbours and no reach beyond its siblings.
    fn span_reader(
        blob: &[u8],
        digest: &str,
        opened: &crate::format::Opened,
        windows: &Arc<FixtureBlob>,
        dir: &tempfile::TempDir,
    ) -> Arc<LayerReader> {
        Arc::new(
            LayerReader::new(
                Arc::new(FixtureBlob {
                    blob: blob.to_vec(),
                    ..FixtureBlob::default()
                }),
                BlobId::new(digest, None),
                opened.decoder.clone(),
                Arc::new(LocalStore::open(dir.path(), 0).expect("store")),
                Arc::new(Fetches::new(2)),
            )
            .with_side(Some(windows.clone()))
            .with_neighbours(Arc::from(opened.index.chunks_in_blob_order()), 0),
        )
    }

    #[tokio::test]
    async fn prefetch_stops_at_its_part_and_a_containers_read_takes_the_whole_span() {
        let files = varied_files(7);
        let (blob, digest, opened, windows) =
            crate::test_utils::gzip_index_layer(&files, 512 << 10);
        let layout = opened.index.chunks_in_blob_order();
        let span_start = layout[0].blob_range.start;
        let span: Vec<ChunkSpec> = layout
            .iter()
            .filter(|c| c.blob_range.start == span_start)
            .cloned()
            .collect();
        let span_end = span.iter().map(|c| c.blob_range.end).max().unwrap_or(0);
        assert!(
            span.iter().any(|c| c.blob_range.end < span_end),
            "the first span has several parts"
        );
        let first = opened.index.resolve("lib/m00.py").expect("first file");
        let chunks = opened.index.node(first).expect("node").chunks.clone();
        let reader = |dir: &tempfile::TempDir| span_reader(&blob, &digest, &opened, &windows, dir);
        let dir = tempfile::tempdir().expect("tempdir");
        let prefetching = reader(&dir);
        prefetching
            .warm(&chunks, Priority::Prefetch)
            .await
            .expect("warm");
        let fetched = prefetching.counters().fetched_bytes.load(Ordering::Relaxed);
        assert!(
            fetched < span_end - span_start,
            "prefetch fetched {fetched} of the span's {} bytes",
            span_end - span_start
        );
        assert!(
            !prefetching.is_cached(&span),
            "the span's last parts are left"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let reading = reader(&dir);
        let len = files[0].1.len() as u64;
        let got = reading.read(&chunks, 0..len).await.expect("read");
        assert_eq!(got.as_ref(), files[0].1.as_slice());
        assert!(reading.is_cached(&span), "the read brought its whole span");
    }

    #[tokio::test]
    async fn a_read_of_a_spans_later_part_counts_the_span_as_far_as_that_part() {
        let files = varied_files(11);
        let (blob, digest, opened, windows) =
            crate::test_utils::gzip_index_layer(&files, 512 << 10);
        let layout = opened.index.chunks_in_blob_order();
        let span_start = layout[0].blob_range.start;
        // The last file whose bytes all lie in a later part of the first span.
        let (late, late_end) = files
            .iter()
            .filter_map(|(name, _)| {
                let ino = opened.index.resolve(name)?;
                let chunks = opened.index.node(ino)?.chunks.clone();
                let all_in_span = chunks.iter().all(|c| c.blob_range.start == span_start);
                let end = chunks.iter().map(|c| c.blob_range.end).max()?;
                (all_in_span && chunks.len() == 1).then_some((name.clone(), end))
            })
            .max_by_key(|(_, end)| *end)
            .expect("a file within the first span");
        let first_part_end = layout[0].blob_range.end;
        assert!(late_end > first_part_end, "{late} lies past the first part");
        let dir = tempfile::tempdir().expect("tempdir");
        let reader = span_reader(&blob, &digest, &opened, &windows, &dir);
        let read_bytes = |name: &str| {
            let ino = opened.index.resolve(name).expect("file");
            let node = opened.index.node(ino).expect("node");
            (node.chunks.clone(), node.size)
        };
        let (chunks, size) = read_bytes(&late);
        reader.read(&chunks, 0..size).await.expect("read");
        let counted = || reader.counters().read_chunk_bytes.load(Ordering::Relaxed);
        assert_eq!(
            counted(),
            late_end - span_start,
            "a read of a later part needs its span from the resume point to that part's end"
        );
        // The first file lies in the first part: no more than is counted already.
        let (chunks, size) = read_bytes("lib/m00.py");
        reader.read(&chunks, 0..size).await.expect("read");
        assert_eq!(
            counted(),
            late_end - span_start,
            "an earlier part adds nothing"
        );
    }

    #[tokio::test]
    async fn the_files_of_one_span_are_decoded_once_together() {
        let files: Vec<(String, Vec<u8>)> = (0..20)
            .map(|i| {
                (
                    format!("lib/m{i}.py"),
                    format!("module {i}\n").repeat(100).into_bytes(),
                )
            })
            .collect();
        let (blob, digest, opened, windows) = crate::test_utils::gzip_index_layer(&files, 1 << 20);
        let layout = opened.index.chunks_in_blob_order();
        assert!(
            layout.iter().all(|c| c.id == layout[0].id),
            "one span holds every file"
        );
        let counting = Arc::new(Counting {
            inner: opened.decoder.clone(),
            decodes: AtomicUsize::new(0),
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let reader = Arc::new(
            LayerReader::new(
                Arc::new(FixtureBlob {
                    blob: blob.clone(),
                    ..FixtureBlob::default()
                }),
                BlobId::new(&digest, None),
                counting.clone(),
                Arc::new(LocalStore::open(dir.path(), 0).expect("store")),
                Arc::new(Fetches::new(2)),
            )
            .with_side(Some(windows.clone())),
        );
        assert_eq!(layout.len(), files.len(), "one piece per file");
        reader
            .warm(&layout, Priority::Prefetch)
            .await
            .expect("warm");
        assert_eq!(
            counting.decodes.load(Ordering::SeqCst),
            1,
            "one decode for the span"
        );
        assert!(reader.is_cached(&layout));
        for (name, data) in &files {
            let ino = opened.index.resolve(name).expect("file");
            let size = data.len() as u64;
            let got = reader
                .read(opened.index.chunks_for(ino, 0, size), 0..size)
                .await
                .expect("read");
            assert_eq!(got.as_ref(), &data[..], "{name}");
        }
        assert_eq!(
            counting.decodes.load(Ordering::SeqCst),
            1,
            "all read from the store"
        );

        // A container's read of one file brings the span's other files along, whatever
        // the amplification: their bytes came with it.
        let served = Arc::new(FixtureBlob {
            blob,
            ..FixtureBlob::default()
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let reader = Arc::new(
            LayerReader::new(
                served.clone(),
                BlobId::new(&digest, None),
                counting.clone(),
                Arc::new(LocalStore::open(dir.path(), 0).expect("store")),
                Arc::new(Fetches::new(2)),
            )
            .with_side(Some(windows.clone()))
            .with_neighbours(Arc::from(layout.clone()), 1),
        );
        let ino = opened.index.resolve(&files[7].0).expect("file");
        let got = reader
            .read(opened.index.chunks_for(ino, 0, 10), 0..10)
            .await
            .expect("read");
        assert_eq!(got.as_ref(), &files[7].1[..10]);
        assert!(reader.is_cached(&layout), "the whole span is stored");
        assert_eq!(served.requests.load(Ordering::SeqCst), 1);
        assert_eq!(
            counting.decodes.load(Ordering::SeqCst),
            2,
            "one more decode"
        );
    }

    #[tokio::test]
    async fn concurrent_readers_share_one_fetch() {
        let s = Arc::new(setup(false, false).await);
        let (ino, _) = file(&s, "dir/multi-chunk.txt");
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let chunks = s.index.chunks_for(ino, 0, 1000).to_vec();
                s.reader.read(&chunks, 0..1000).await.expect("read")
            }));
        }
        for task in tasks {
            assert_eq!(
                task.await.expect("join").as_ref(),
                &expected_multi_chunk()[..1000]
            );
        }
        assert_eq!(s.blob.requests.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn lying_and_failing_registries_give_errors_not_bytes() {
        let s = setup(true, false).await;
        let (ino, size) = file(&s, "dir/multi-chunk.txt");
        let err = s
            .reader
            .read(s.index.chunks_for(ino, 0, size), 0..size)
            .await
            .expect_err("corrupt bytes refused");
        assert!(matches!(err, ReadError::Corrupt { .. }), "{err}");

        let s = setup(false, true).await;
        let err = s
            .reader
            .read(s.index.chunks_for(ino, 0, 10), 0..10)
            .await
            .expect_err("fetch fails");
        assert!(
            crate::error_chain(&err).contains("registry unavailable"),
            "{err}"
        );
        assert!(
            s.reader.inflight.lock().expect("lock").is_empty(),
            "nothing left in flight"
        );
    }
}
