//! The local store: decompressed file contents, one sparse file per file of a layer, each
//! chunk's bytes at its file offset. A read of a present chunk is one `pread` of exactly the
//! range asked for; a file whose chunks are all present is a complete copy of the file, which
//! the kernel can read directly (FUSE passthrough).
//!
//! **Layout.** `files/<2 hex>/<64 hex>` holds the bytes and `<64 hex>.map` says which chunks
//! of it are present: one line per chunk, `<file offset> <len> <digest hex> <check>\n`, where
//! the check is a hash of the store key and the rest of the line. The name is the *store key*,
//! a hash of the layer's blob ([`BlobId`]) and the file's [`FileKey`]: bytes are scoped to the
//! blob they were verified from (another layer naming the same digests fetches them itself),
//! and a file key pins the whole chunk list, so a record line can only describe the chunk it
//! names.
//!
//! **Durability.** A chunk's bytes are hashed as they stream in ([`chunk::Hashing`]) and the
//! chunk becomes ready only when they matched its digest. Ready at once in memory (the bytes
//! are in the page cache and `pread` finds them); on disk, a background flusher `fdatasync`s
//! the data files of newly ready chunks and only then appends their record lines. A crash
//! therefore loses at most the last moments' readiness (those chunks are fetched again), and
//! can never leave a record line over bytes that were not written: a torn line fails its check
//! and is ignored, and a line is never written for a file that was evicted or replaced since
//! (generations).
//!
//! **Budget.** As before: room is made before a chunk is written (its length and record
//! line), by unlinking least recently used files, so what is on disk, what is being written
//! and what is reserved outside the store (saved layer state) stay within the budget.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use sha2::{Digest as _, Sha256};

use lazysnap_fuse::ReadBuf;

use super::{CacheError, Evicted, VerifyReport};
use crate::chunk::{BlobId, ChunkDigest, ChunkSpec, FileKey, Verified};

/// Where one file of one blob lives: `sha256(blob id, file key)`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoreKey([u8; 32]);

impl StoreKey {
    pub fn new(blob: &BlobId, file: &FileKey) -> Self {
        let mut h = Sha256::new();
        h.update(b"lazysnap store file v1\0");
        h.update(blob.as_bytes());
        h.update(file.0);
        StoreKey(h.finalize().into())
    }

    fn hex(&self) -> String {
        hex::encode(self.0)
    }

    fn parse(hex: &str) -> Option<Self> {
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        let mut out = [0; 32];
        hex::decode_to_slice(hex, &mut out).ok()?;
        Some(StoreKey(out))
    }
}

impl std::fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "store-key:{}", hex::encode(&self.0[..8]))
    }
}

const RECORD_SUFFIX: &str = ".map";
/// Hex digits of a record line's check.
const CHECK_HEX: usize = 16;
/// What one record line costs on disk, at most (for the budget).
const RECORD_LINE: u64 = 20 + 1 + 20 + 1 + 64 + 1 + CHECK_HEX as u64 + 1;
/// A chunk at an unaligned offset can allocate a block more at each end than its length.
const BLOCK_SLACK: u64 = 2 * 4096;
/// How long newly ready chunks wait before being made durable together.
const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Open data files kept for reads.
const OPEN_FILES: usize = 256;

fn check(key: &StoreKey, offset: u64, len: u64, digest: &ChunkDigest) -> String {
    let mut h = Sha256::new();
    h.update(b"lazysnap present v1\0");
    h.update(key.0);
    h.update(offset.to_le_bytes());
    h.update(len.to_le_bytes());
    h.update(digest.hex().as_bytes());
    hex::encode(&h.finalize()[..CHECK_HEX / 2])
}

fn record_line(key: &StoreKey, offset: u64, len: u64, digest: &ChunkDigest) -> String {
    format!(
        "{offset} {len} {} {}\n",
        digest.hex(),
        check(key, offset, len, digest)
    )
}

/// The chunks a record's text says are present; torn, foreign or garbled lines are ignored.
fn parse_record(key: &StoreKey, text: &[u8]) -> BTreeMap<u64, Present> {
    let mut out = BTreeMap::new();
    for line in text.split_inclusive(|b| *b == b'\n') {
        let Some(line) = line.strip_suffix(b"\n") else {
            continue;
        };
        let Ok(line) = std::str::from_utf8(line) else {
            continue;
        };
        let mut parts = line.split(' ');
        let (Some(offset), Some(len), Some(digest), Some(sum), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            continue;
        };
        let (Ok(offset), Ok(len), Some(digest)) = (
            offset.parse::<u64>(),
            len.parse::<u64>(),
            ChunkDigest::parse(digest),
        ) else {
            continue;
        };
        if sum == check(key, offset, len, &digest) {
            out.insert(offset, Present { len, digest });
        }
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Present {
    len: u64,
    digest: ChunkDigest,
}

/// The chunks of one file present in the store: (file offset, length), sorted. Digests stay
/// in the record file (read by `verify`): the store key pins the chunk list, so offset and
/// length name a chunk, and most files are one chunk, so this is the index's whole cost.
#[derive(Default)]
struct Chunks(Vec<(u64, u64)>);

impl Chunks {
    fn get(&self, offset: u64) -> Option<u64> {
        self.0
            .binary_search_by_key(&offset, |(o, _)| *o)
            .ok()
            .map(|i| self.0[i].1)
    }

    /// Whether it was new.
    fn insert(&mut self, offset: u64, len: u64) -> bool {
        match self.0.binary_search_by_key(&offset, |(o, _)| *o) {
            Ok(_) => false,
            Err(i) => {
                self.0.insert(i, (offset, len));
                true
            }
        }
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// One file of the store.
struct Entry {
    present: Chunks,
    /// Bytes the data file takes on disk (allocated blocks, as `du` counts them).
    data: u64,
    /// Bytes of the record file (and lines still to be written).
    record: u64,
    last_use: u64,
    /// Changes whenever the file is removed, so a pending record line can tell that the
    /// bytes it vouches for are gone.
    generation: u64,
}

#[derive(Default)]
struct Index {
    entries: HashMap<StoreKey, Entry>,
    /// Data and record bytes of `entries`.
    used: u64,
    /// Bytes outside the store that count against its budget (saved layer state).
    reserved: u64,
    /// Bytes being written now, reserved before the write.
    inflight: u64,
    clock: u64,
    generations: u64,
}

impl Index {
    fn touch(&mut self, key: &StoreKey) {
        self.clock += 1;
        let clock = self.clock;
        if let Some(e) = self.entries.get_mut(key) {
            e.last_use = clock;
        }
    }

    fn remove(&mut self, key: &StoreKey) -> Option<Entry> {
        let old = self.entries.remove(key)?;
        self.used -= old.data + old.record;
        Some(old)
    }

    fn total(&self) -> u64 {
        self.used + self.reserved + self.inflight
    }

    fn victims(&mut self, target: u64) -> Vec<(StoreKey, Entry)> {
        if self.total() <= target {
            return Vec::new();
        }
        let mut order: Vec<(u64, StoreKey)> =
            self.entries.iter().map(|(k, e)| (e.last_use, *k)).collect();
        order.sort_unstable_by_key(|(last_use, _)| *last_use);
        let mut victims = Vec::new();
        for (_, key) in order {
            if self.total() <= target {
                break;
            }
            if let Some(entry) = self.remove(&key) {
                victims.push((key, entry));
            }
        }
        victims
    }
}

/// A chunk made ready whose record line is not on disk yet.
struct Pending {
    key: StoreKey,
    generation: u64,
    line: String,
}

/// The store of decompressed files.
#[derive(Clone)]
pub struct FileStore {
    inner: Arc<Inner>,
}

struct Inner {
    files: PathBuf,
    /// 0 = no limit.
    budget: u64,
    index: Mutex<Index>,
    /// Regions being written now: a second writer of the same chunk waits its turn elsewhere
    /// (its bytes are verified into memory), so no one ever writes over bytes being verified.
    writing: Mutex<HashSet<(StoreKey, u64)>>,
    pending: Mutex<Vec<Pending>>,
    wake: Condvar,
    open: Mutex<OpenFiles>,
    evicted_entries: AtomicU64,
    evicted_bytes: AtomicU64,
    too_large_logged: AtomicBool,
}

/// Read-only handles of recently read files, so a read is one `pread`, not an open too.
#[derive(Default)]
struct OpenFiles {
    files: HashMap<StoreKey, (Arc<File>, u64)>,
    clock: u64,
}

impl OpenFiles {
    fn get(&mut self, key: &StoreKey) -> Option<Arc<File>> {
        self.clock += 1;
        let clock = self.clock;
        self.files.get_mut(key).map(|(f, used)| {
            *used = clock;
            f.clone()
        })
    }

    fn insert(&mut self, key: StoreKey, file: Arc<File>) {
        if self.files.len() >= OPEN_FILES {
            if let Some(oldest) = self
                .files
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| *k)
            {
                self.files.remove(&oldest);
            }
        }
        self.clock += 1;
        self.files.insert(key, (file, self.clock));
    }
}

impl Inner {
    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, key: &StoreKey) -> PathBuf {
        let hex = key.hex();
        self.files.join(&hex[..2]).join(hex)
    }

    fn record_path(&self, key: &StoreKey) -> PathBuf {
        let hex = key.hex();
        self.files
            .join(&hex[..2])
            .join(format!("{hex}{RECORD_SUFFIX}"))
    }
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CacheError {
    let path = path.to_path_buf();
    move |source| CacheError::Io {
        action,
        path,
        source,
    }
}

/// What `begin` found for a chunk.
pub enum Slot {
    /// Already present for this blob.
    Ready,
    /// Another writer is filling it, or it is larger than the whole budget: verify into
    /// memory instead.
    Unavailable,
    /// Write the chunk's bytes here, in order, then commit.
    Write(ChunkWriter),
}

impl FileStore {
    /// Opens the store under `dir`, kept within `budget` bytes (0 = no limit). The chunk
    /// files of earlier versions (`dir/chunks`) are removed: their bytes are fetched again.
    pub fn open(dir: &Path, budget: u64) -> Result<Self, CacheError> {
        for old in ["chunks", "wip"] {
            let old = dir.join(old);
            if old.exists() {
                tracing::info!(path = %old.display(), "removing the chunk cache of an earlier version; its data will be fetched again");
                std::fs::remove_dir_all(&old).map_err(io_err("remove", &old))?;
            }
        }
        let files = dir.join("files");
        std::fs::create_dir_all(&files).map_err(io_err("create", &files))?;
        let index = scan(&files).map_err(io_err("scan", &files))?;
        let inner = Arc::new(Inner {
            files,
            budget,
            index: Mutex::new(index),
            writing: Mutex::default(),
            pending: Mutex::default(),
            wake: Condvar::new(),
            open: Mutex::default(),
            evicted_entries: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
            too_large_logged: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("store-flush".into())
            .spawn(move || flusher(weak))
            .map_err(io_err("start the flusher of", dir))?;
        let store = FileStore { inner };
        if budget > 0 {
            store.prune_to(budget);
        }
        Ok(store)
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        self.inner.index()
    }

    fn path(&self, key: &StoreKey) -> PathBuf {
        self.inner.path(key)
    }

    fn record_path(&self, key: &StoreKey) -> PathBuf {
        self.inner.record_path(key)
    }

    pub fn is_ready(&self, blob: &BlobId, chunk: &ChunkSpec) -> bool {
        let key = StoreKey::new(blob, &chunk.file);
        self.index()
            .entries
            .get(&key)
            .and_then(|e| e.present.get(chunk.file_offset))
            .is_some_and(|len| len == chunk.len)
    }

    /// Bytes `range` (relative to the chunk) of a ready chunk, by one `pread`. Blocking.
    pub fn read(
        &self,
        blob: &BlobId,
        chunk: &ChunkSpec,
        range: std::ops::Range<u64>,
    ) -> Option<Bytes> {
        let key = StoreKey::new(blob, &chunk.file);
        let generation = self.generation_if_ready(&key, &[chunk])?;
        let end = range.end.min(chunk.len);
        let start = range.start.min(end);
        let file = self.open_for_read(&key)?;
        let mut buf = BytesMut::zeroed((end - start) as usize);
        let read = read_exact_at(&file, &mut buf, chunk.file_offset + start);
        self.after_read(&key, generation, read)
            .then(|| buf.freeze())
    }

    /// Bytes `range` of the file whose chunks covering it are `chunks`, if all are ready, by
    /// one `pread`. Blocking.
    pub fn read_span(
        &self,
        blob: &BlobId,
        chunks: &[ChunkSpec],
        range: std::ops::Range<u64>,
    ) -> Option<Bytes> {
        let (key, generation) = self.ready_span(blob, chunks, &range)?;
        let file = self.open_for_read(&key)?;
        let mut buf = BytesMut::zeroed((range.end - range.start) as usize);
        let read = read_exact_at(&file, &mut buf, range.start);
        self.after_read(&key, generation, read)
            .then(|| buf.freeze())
    }

    /// Like [`read_span`](Self::read_span), into `buf` (as its answer). Blocking.
    pub fn read_span_into(
        &self,
        blob: &BlobId,
        chunks: &[ChunkSpec],
        range: std::ops::Range<u64>,
        buf: &mut ReadBuf,
    ) -> Option<()> {
        let (key, generation) = self.ready_span(blob, chunks, &range)?;
        let file = self.open_for_read(&key)?;
        let len = usize::try_from(range.end - range.start).ok()?;
        let read = read_exact_at(&file, buf.region(len), range.start);
        self.after_read(&key, generation, read).then_some(())
    }

    /// The store key and generation of the file of `chunks` if they cover `range` and are all
    /// ready.
    fn ready_span(
        &self,
        blob: &BlobId,
        chunks: &[ChunkSpec],
        range: &std::ops::Range<u64>,
    ) -> Option<(StoreKey, u64)> {
        let first = chunks.first()?;
        let last = chunks.last()?;
        // The chunks must cover the range, or the bytes past them would be holes.
        if range.start < first.file_offset || range.end > last.file_offset + last.len {
            return None;
        }
        let key = StoreKey::new(blob, &first.file);
        let all: Vec<&ChunkSpec> = chunks.iter().collect();
        let generation = self.generation_if_ready(&key, &all)?;
        Some((key, generation))
    }

    /// Whether a read of `key`'s file, begun when it was at `generation`, got the bytes that
    /// were ready then; a file that failed to read is dropped.
    fn after_read(&self, key: &StoreKey, generation: u64, read: std::io::Result<()>) -> bool {
        match read {
            // Bytes read from a file evicted and written anew meanwhile are not the chunk's;
            // the generation says whether the file read is still the one that was ready.
            Ok(()) => self.still(key, generation),
            Err(e) => {
                tracing::warn!(path = %self.path(key).display(), error = %e, "reading the store failed; dropping the file");
                self.forget(key);
                false
            }
        }
    }

    fn open_for_read(&self, key: &StoreKey) -> Option<Arc<File>> {
        let mut open = self.inner.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(file) = open.get(key) {
            return Some(file);
        }
        let path = self.path(key);
        match File::open(&path) {
            Ok(file) => {
                advise_sequential(&file);
                let file = Arc::new(file);
                open.insert(*key, file.clone());
                Some(file)
            }
            Err(e) => {
                drop(open);
                tracing::warn!(path = %path.display(), error = %e, "a stored file is missing; dropping it");
                self.forget(key);
                None
            }
        }
    }

    /// Asks the kernel to read the ready ones of `chunks` into its page cache, in the order
    /// given, at most `max_bytes` of them; returns the bytes asked for. The kernel starts the
    /// reads and returns: nothing here waits on the disk but an open. A later read of these
    /// bytes (a `pread` here, or the kernel's own through passthrough, which reads the same
    /// file) then finds them in memory, as a normal pull's just-unpacked files would be.
    pub fn preload(&self, blob: &BlobId, chunks: &[ChunkSpec], max_bytes: u64) -> u64 {
        use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
        let mut asked = 0u64;
        for chunk in chunks {
            if asked.saturating_add(chunk.len) > max_bytes {
                break;
            }
            if !self.is_ready(blob, chunk) {
                continue;
            }
            let key = StoreKey::new(blob, &chunk.file);
            let Some(file) = self.open_for_read(&key) else {
                continue;
            };
            let (Ok(offset), Ok(len)) =
                (i64::try_from(chunk.file_offset), i64::try_from(chunk.len))
            else {
                continue;
            };
            // Only a hint: a failure costs the later read a trip to the disk, nothing more.
            if posix_fadvise(&*file, offset, len, PosixFadviseAdvice::POSIX_FADV_WILLNEED).is_ok() {
                asked += chunk.len;
            }
        }
        asked
    }

    /// A read-only handle on the file of `chunks` (a whole file's chunks) if every one is
    /// present: the file then holds exactly the file's contents.
    pub fn complete_file(&self, blob: &BlobId, chunks: &[ChunkSpec]) -> Option<File> {
        let key = StoreKey::new(blob, &chunks.first()?.file);
        let all: Vec<&ChunkSpec> = chunks.iter().collect();
        let generation = self.generation_if_ready(&key, &all)?;
        let file = File::open(self.path(&key)).ok()?;
        self.still(&key, generation).then_some(file)
    }

    /// The generation of `key`'s file if all of `chunks` (all of that file) are present.
    fn generation_if_ready(&self, key: &StoreKey, chunks: &[&ChunkSpec]) -> Option<u64> {
        let index = self.index();
        let entry = index.entries.get(key)?;
        chunks
            .iter()
            .all(|c| entry.present.get(c.file_offset) == Some(c.len))
            .then_some(entry.generation)
    }

    /// Whether `key`'s file is still the one of `generation` (not evicted since); counts as a
    /// use.
    fn still(&self, key: &StoreKey, generation: u64) -> bool {
        let mut index = self.index();
        let same = index
            .entries
            .get(key)
            .is_some_and(|e| e.generation == generation);
        if same {
            index.touch(key);
        }
        same
    }

    /// Opens a slot to stream `chunk` into, making room for it first. Blocking.
    pub fn begin(&self, blob: &BlobId, chunk: &ChunkSpec) -> Result<Slot, CacheError> {
        if self.is_ready(blob, chunk) {
            return Ok(Slot::Ready);
        }
        let key = StoreKey::new(blob, &chunk.file);
        let incoming = chunk.len + BLOCK_SLACK + RECORD_LINE;
        let budget = self.inner.budget;
        if budget > 0 && incoming > budget {
            if !self.inner.too_large_logged.swap(true, Ordering::Relaxed) {
                tracing::warn!(bytes = chunk.len, budget, "a chunk is larger than the whole disk budget: such chunks are served from memory and not stored (logged once)");
            }
            return Ok(Slot::Unavailable);
        }
        if !self
            .inner
            .writing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((key, chunk.file_offset))
        {
            return Ok(Slot::Unavailable);
        }
        // From here the region and the reservation are the writer's; its drop gives them back.
        let mut writer = ChunkWriter {
            store: self.clone(),
            key,
            offset: chunk.file_offset,
            len: chunk.len,
            digest: chunk.digest,
            at: 0,
            file: None,
            reserved: 0,
            generation: 0,
        };
        {
            let mut index = self.index();
            self.make_room(&mut index, incoming);
            writer.reserved = incoming;
            // The entry exists from now on, so an eviction while the bytes are written is
            // seen at commit (the generation changes) and nothing is vouched for in a file
            // that is gone.
            index.clock += 1;
            index.generations += 1;
            let (clock, fresh) = (index.clock, index.generations);
            let entry = index.entries.entry(key).or_insert(Entry {
                present: Chunks::default(),
                data: 0,
                record: 0,
                last_use: clock,
                generation: fresh,
            });
            writer.generation = entry.generation;
        }
        let path = self.path(&key);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err("open", &path))?;
        writer.file = Some(file);
        Ok(Slot::Write(writer))
    }

    /// Unlinks least recently used files until `incoming` more bytes fit; with the lock held.
    fn make_room(&self, index: &mut Index, incoming: u64) {
        let budget = self.inner.budget;
        if budget > 0 && index.total() + incoming > budget {
            // Down to 90% (when that leaves room), so the sort over all entries is not paid on
            // every following write.
            let target = (budget / 10 * 9).min(budget.saturating_sub(incoming));
            let mut evicted = Evicted::default();
            for (key, entry) in index.victims(target) {
                evicted += self.unlink(&key, &entry);
            }
            tracing::debug!(
                entries = evicted.entries,
                bytes = evicted.bytes,
                budget,
                "evicted least recently used files to keep within the disk budget"
            );
        }
        index.inflight += incoming;
    }

    /// Marks a written, verified chunk ready and queues its record line; fails if the file
    /// was evicted while it was written.
    fn commit(&self, writer: &mut ChunkWriter) -> Result<(), CacheError> {
        let line = record_line(&writer.key, writer.offset, writer.len, &writer.digest);
        let allocated = writer
            .file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(writer.len, |m| {
                std::os::unix::fs::MetadataExt::blocks(&m) * 512
            });
        let mut index = self.index();
        index.inflight -= writer.reserved;
        writer.reserved = 0;
        index.clock += 1;
        let clock = index.clock;
        let generation = writer.generation;
        let Some(entry) = index
            .entries
            .get_mut(&writer.key)
            .filter(|e| e.generation == generation)
        else {
            return Err(CacheError::Evicted {
                digest: writer.digest,
            });
        };
        entry.last_use = clock;
        let grown = allocated.saturating_sub(entry.data);
        entry.data += grown;
        let added = if entry.present.insert(writer.offset, writer.len) {
            entry.record += line.len() as u64;
            grown + line.len() as u64
        } else {
            grown
        };
        index.used += added;
        drop(index);
        self.inner
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Pending {
                key: writer.key,
                generation,
                line,
            });
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Drops a file from the index and the disk, not counted as an eviction.
    fn forget(&self, key: &StoreKey) {
        let mut index = self.index();
        if index.remove(key).is_some() {
            let _ = self.unlink_files(key);
        }
    }

    /// Removes the record first: a crash in between leaves bytes nothing vouches for.
    fn unlink_files(&self, key: &StoreKey) -> std::io::Result<()> {
        self.inner
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .files
            .remove(key);
        for path in [self.record_path(key), self.path(key)] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "removing a stored file failed");
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn unlink(&self, key: &StoreKey, entry: &Entry) -> Evicted {
        if self.unlink_files(key).is_err() {
            return Evicted::default();
        }
        let bytes = entry.data + entry.record;
        self.inner.evicted_entries.fetch_add(1, Ordering::Relaxed);
        self.inner.evicted_bytes.fetch_add(bytes, Ordering::Relaxed);
        Evicted { entries: 1, bytes }
    }

    /// Removes the files holding `chunks` of `blob`.
    pub fn evict(&self, blob: &BlobId, chunks: &[ChunkSpec]) -> Evicted {
        let keys: HashSet<StoreKey> = chunks
            .iter()
            .map(|c| StoreKey::new(blob, &c.file))
            .collect();
        let mut index = self.index();
        let mut total = Evicted::default();
        for key in keys {
            if let Some(entry) = index.remove(&key) {
                total += self.unlink(&key, &entry);
            }
        }
        total
    }

    /// Evicts least recently used files until at most `target` bytes are used, reserved
    /// bytes included.
    pub fn prune_to(&self, target: u64) -> Evicted {
        let mut index = self.index();
        let mut total = Evicted::default();
        for (key, entry) in index.victims(target) {
            total += self.unlink(&key, &entry);
        }
        total
    }

    pub fn reserve(&self, bytes: u64) -> Evicted {
        let mut index = self.index();
        index.reserved = bytes;
        let budget = self.inner.budget;
        if budget == 0 || index.total() <= budget {
            return Evicted::default();
        }
        let mut total = Evicted::default();
        for (key, entry) in index.victims(budget / 10 * 9) {
            total += self.unlink(&key, &entry);
        }
        total
    }

    /// How many of `chunks` are present for `blob`, and their bytes.
    pub fn present(&self, blob: &BlobId, chunks: &[ChunkSpec]) -> (u64, u64) {
        let index = self.index();
        let mut seen = HashSet::new();
        let (mut count, mut bytes) = (0, 0);
        for c in chunks {
            let key = StoreKey::new(blob, &c.file);
            let here = index
                .entries
                .get(&key)
                .and_then(|e| e.present.get(c.file_offset))
                .is_some_and(|len| len == c.len);
            if here && seen.insert((key, c.file_offset)) {
                count += 1;
                bytes += c.len;
            }
        }
        (count, bytes)
    }

    pub fn budget(&self) -> u64 {
        self.inner.budget
    }

    /// Bytes on disk (data, records and the reserve), files, and chunks present.
    pub fn usage(&self) -> (u64, u64, u64) {
        let index = self.index();
        let chunks = index.entries.values().map(|e| e.present.len() as u64).sum();
        (
            index.used + index.reserved,
            index.entries.len() as u64,
            chunks,
        )
    }

    pub fn evicted(&self) -> Evicted {
        Evicted {
            entries: self.inner.evicted_entries.load(Ordering::Relaxed),
            bytes: self.inner.evicted_bytes.load(Ordering::Relaxed),
        }
    }

    /// Makes every ready chunk durable now (also done in the background).
    pub fn flush(&self) {
        flush(&self.inner);
    }

    /// Re-hashes every present chunk and drops the files holding one that no longer matches
    /// (bit rot, a hand edit): the next read fetches them again. Blocking; reads and writes
    /// go on meanwhile.
    pub fn verify(&self) -> VerifyReport {
        // Every ready chunk's record line on disk first: the digests are read from there.
        self.flush();
        // (file, its generation, its present chunks), taken under the lock once.
        type Snapshot = Vec<(StoreKey, u64, Vec<(u64, u64)>)>;
        let snapshot: Snapshot = self
            .index()
            .entries
            .iter()
            .map(|(k, e)| (*k, e.generation, e.present.0.clone()))
            .collect();
        let mut report = VerifyReport::default();
        let mut buf = vec![0u8; 1 << 20];
        for (key, generation, present) in snapshot {
            let path = self.path(&key);
            let file = File::open(&path);
            let digests = std::fs::read(self.record_path(&key))
                .map(|text| parse_record(&key, &text))
                .unwrap_or_default();
            let mut bad = false;
            for (offset, len) in &present {
                report.chunks += 1;
                // A chunk whose line cannot be read back cannot be vouched for either.
                let Some(p) = digests.get(offset).filter(|p| p.len == *len) else {
                    bad = true;
                    report.corrupt_chunks += 1;
                    continue;
                };
                let ok = file.as_ref().is_ok_and(|f| {
                    let mut h = Sha256::new();
                    let mut at = 0;
                    while at < p.len {
                        let n = (p.len - at).min(buf.len() as u64) as usize;
                        if read_exact_at(f, &mut buf[..n], offset + at).is_err() {
                            return false;
                        }
                        h.update(&buf[..n]);
                        at += n as u64;
                    }
                    ChunkDigest::of_hasher(h) == p.digest
                });
                if ok {
                    report.bytes += p.len;
                } else {
                    bad = true;
                    report.corrupt_chunks += 1;
                }
            }
            if bad {
                let mut index = self.index();
                // A file replaced meanwhile was not the one checked.
                if index
                    .entries
                    .get(&key)
                    .is_some_and(|e| e.generation == generation)
                {
                    if let Some(entry) = index.remove(&key) {
                        tracing::warn!(path = %path.display(), "stored file does not match its digests; dropped");
                        report.dropped_files += 1;
                        report.dropped_bytes += entry.data;
                        let _ = self.unlink_files(&key);
                    }
                }
            }
        }
        report
    }
}

/// Doubles the kernel's readahead window on a read handle of a stored file. The daemon's
/// reads of one file come from several threads at once (the kernel keeps up to its FUSE
/// readahead window of 1 MiB requests in flight), so the offsets reaching this handle are
/// a sequential reader's, slightly out of order; with the block device's window alone the
/// kernel's readahead on the handle falls behind them. On the development VM, 4 threads
/// reading a 512 MiB file in 1 MiB `pread`s that way went from 0.7-1.6 GB/s to 1.4-1.8 GB/s.
/// Random reads are not widened by it (the kernel reads ahead only what looks sequential).
fn advise_sequential(file: &File) {
    use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
    // Only a hint: without it reads are as correct, only slower.
    if let Err(e) = posix_fadvise(file, 0, 0, PosixFadviseAdvice::POSIX_FADV_SEQUENTIAL) {
        tracing::debug!(error = %e, "advising sequential reads on a stored file failed");
    }
}

/// `pread` until `buf` is full; a file shorter than that is an error (a truncated store).
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    file.read_exact_at(buf, offset)
}

/// Streams one chunk into its file; see [`Slot::Write`]. Dropped without a commit, it gives
/// back its region and reservation and leaves the bytes unvouched for (never read).
pub struct ChunkWriter {
    store: FileStore,
    key: StoreKey,
    offset: u64,
    len: u64,
    digest: ChunkDigest,
    at: u64,
    file: Option<File>,
    reserved: u64,
    generation: u64,
}

impl ChunkWriter {
    /// Makes the chunk ready: `proof` says the bytes written hashed to its digest.
    pub fn commit(mut self, proof: Verified) -> Result<(), CacheError> {
        // The proof covers the verified unit; what was written is this file's piece of it.
        if *proof.digest() != self.digest || proof.len() < self.len || self.at != self.len {
            return Err(CacheError::Mismatch {
                digest: self.digest,
            });
        }
        self.store.clone().commit(&mut self)
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = self.len - self.at;
        if buf.len() as u64 > room {
            return Err(std::io::Error::new(
                ErrorKind::InvalidData,
                "more bytes than the chunk's length",
            ));
        }
        let file = self
            .file
            .as_ref()
            .ok_or_else(|| std::io::Error::other("store file not open"))?;
        file.write_all_at(buf, self.offset + self.at)?;
        self.at += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for ChunkWriter {
    fn drop(&mut self) {
        if self.reserved > 0 {
            // Not committed: what was written vouches for nothing; give its space back (the
            // region is ours, and a punch keeps the bytes of neighbouring chunks).
            if let (Some(file), true) = (&self.file, self.at > 0) {
                let punched = nix::fcntl::fallocate(
                    file,
                    nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                        | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    self.offset as i64,
                    self.at as i64,
                );
                if let Err(e) = punched {
                    tracing::debug!(error = %e, "freeing the space of a chunk not stored failed");
                }
                let allocated = file
                    .metadata()
                    .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512);
                let mut index = self.store.index();
                let index = &mut *index;
                if let (Ok(allocated), Some(entry)) = (allocated, index.entries.get_mut(&self.key))
                {
                    // What the written bytes took (blocks shared with neighbours stay) counts.
                    if entry.generation == self.generation {
                        index.used = index.used - entry.data + allocated;
                        entry.data = allocated;
                    }
                }
            }
            self.store.index().inflight -= self.reserved;
        }
        self.store
            .inner
            .writing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(self.key, self.offset));
    }
}

/// Makes ready chunks durable in the background until the store is dropped.
fn flusher(store: Weak<Inner>) {
    loop {
        let Some(inner) = store.upgrade() else {
            return;
        };
        let idle = {
            let pending = inner.pending.lock().unwrap_or_else(|p| p.into_inner());
            let (pending, _) = inner
                .wake
                .wait_timeout_while(pending, FLUSH_EVERY, |p| p.is_empty())
                .unwrap_or_else(|p| p.into_inner());
            pending.is_empty()
        };
        if !idle {
            // Let more land first: one fdatasync per file per round, not one per chunk.
            std::thread::sleep(FLUSH_EVERY);
            flush(&inner);
        }
    }
}

/// Syncs the data files of ready chunks, then appends the record lines that vouch for them.
fn flush(inner: &Inner) {
    let pending = std::mem::take(&mut *inner.pending.lock().unwrap_or_else(|p| p.into_inner()));
    if pending.is_empty() {
        return;
    }
    let mut by_file: BTreeMap<StoreKey, Vec<Pending>> = BTreeMap::new();
    for p in pending {
        by_file.entry(p.key).or_default().push(p);
    }
    for (key, lines) in by_file {
        let path = inner.path(&key);
        if let Err(e) = File::open(&path).and_then(|f| f.sync_data()) {
            if e.kind() != ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "syncing a stored file failed; its chunks will be fetched again after a restart");
            }
            continue;
        }
        // Under the lock, so the file cannot be evicted between the check and the append.
        let index = inner.index();
        let Some(generation) = index.entries.get(&key).map(|e| e.generation) else {
            continue;
        };
        let text: String = lines
            .iter()
            .filter(|p| p.generation == generation)
            .map(|p| p.line.as_str())
            .collect();
        let record = inner.record_path(&key);
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&record)
            .and_then(|mut f| f.write_all(text.as_bytes()));
        drop(index);
        if let Err(e) = appended {
            tracing::warn!(path = %record.display(), error = %e, "recording stored chunks failed; they will be fetched again after a restart");
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        flush(self);
    }
}

/// Rebuilds the index from the record files; data files without a record (a crash before
/// their first flush) vouch for nothing and are removed.
fn scan(files: &Path) -> std::io::Result<Index> {
    let mut index = Index::default();
    let mut orphans = Vec::new();
    for shard in std::fs::read_dir(files)? {
        let shard = shard?.path();
        if !shard.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(&shard)? {
            let path = file?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let Some(hex) = name.strip_suffix(RECORD_SUFFIX) else {
                if StoreKey::parse(name).is_some()
                    && !shard.join(format!("{name}{RECORD_SUFFIX}")).exists()
                {
                    orphans.push(path.clone());
                }
                continue;
            };
            let Some(key) = StoreKey::parse(hex) else {
                continue;
            };
            let text = std::fs::read(&path)?;
            let present = parse_record(&key, &text);
            let meta = std::fs::metadata(shard.join(hex)).ok();
            let data_len = meta.as_ref().map_or(0, |m| m.len());
            let data = meta.map_or(0, |m| std::os::unix::fs::MetadataExt::blocks(&m) * 512);
            // Lines past the data file's end describe bytes that never reached it.
            let present = Chunks(
                present
                    .into_iter()
                    .filter(|(o, p)| o.saturating_add(p.len) <= data_len)
                    .map(|(o, p)| (o, p.len))
                    .collect(),
            );
            index.generations += 1;
            index.clock += 1;
            index.used += data + text.len() as u64;
            index.entries.insert(
                key,
                Entry {
                    present,
                    data,
                    record: text.len() as u64,
                    last_use: index.clock,
                    generation: index.generations,
                },
            );
        }
    }
    for orphan in orphans {
        let _ = std::fs::remove_file(orphan);
    }
    Ok(index)
}
