//! The disk tier: one file per chunk at `chunks/<2 hex>/<64 hex>`, written into `wip/` and
//! renamed into place, so a reader sees a whole file or none. Files are not fsynced: a torn file
//! left by a crash fails verification on its next read and is dropped, which costs one refetch
//! and nothing else.
//!
//! **Scope records.** Next to each chunk, `<64 hex>.blobs` says which blobs the chunk was
//! verified from: one line per blob, `<64 hex>\n`, the sha256 of (blob id, chunk key) — a *tag*.
//! A chunk is served to a blob only if that blob's tag is recorded. A line is appended only
//! after bytes fetched from that blob hashed to the chunk's key, so every tag ever written is a
//! true statement, forever (blobs and keys are content addresses). A crash can lose a line or
//! leave a torn one (a prefix of a line, zeros, or stale blocks of another file): none of those
//! is a 64-hex line naming this chunk's key, because a tag is bound by hash to its key and its
//! blob and only ever written into its own key's file, so the worst a crash does is make a blob
//! fetch once more. Lines are parsed strictly (exactly 64 lowercase hex and a newline).
//!
//! **Budget.** Room is made before anything is written: a write reserves its bytes (chunk and
//! record line) under the index lock, least recently used chunks are unlinked until what is on
//! disk, what is being written and what is reserved outside the store (saved layer state) fit
//! the budget, and only then is the file written. A chunk larger than the whole budget is not
//! written at all. Renames, appends and unlinks happen under the index lock, so the index and
//! the directory never disagree about what is there.
//!
//! An in-memory index (built by scanning the directory at open, ordered by the files' mtimes)
//! knows every entry's size, tags and when it was last used. Eviction only unlinks files: a
//! reader holds a chunk's bytes in memory once it has read them, so evicting never breaks a read
//! in progress; the worst it does is make a later read fetch the chunk again.

use std::collections::HashMap;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use super::{CacheError, ChunkKey};
use crate::chunk::BlobId;

/// What a disk lookup found.
pub enum Found {
    Valid(Bytes),
    /// The file existed but did not match its key; it has been removed.
    Corrupt,
}

/// What an eviction removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Evicted {
    pub entries: u64,
    pub bytes: u64,
}

impl std::ops::AddAssign for Evicted {
    fn add_assign(&mut self, other: Evicted) {
        self.entries += other.entries;
        self.bytes += other.bytes;
    }
}

/// What a put did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// The chunk was written, with the blob's tag.
    Written,
    /// The chunk was there; the blob's tag was added.
    Recorded,
    /// The chunk was there with the blob's tag already.
    Known,
    /// The chunk alone is larger than the budget: not written.
    TooLarge,
}

/// The bytes of one record line.
const TAG_LINE: u64 = 65;
const RECORD_SUFFIX: &str = ".blobs";

/// A blob's tag for a chunk: what its record line holds.
pub type Tag = [u8; 32];

pub fn tag(blob: &BlobId, key: &ChunkKey) -> Tag {
    let mut h = Sha256::new();
    h.update(b"lazysnap chunk scope v1\0");
    h.update(blob.as_bytes());
    h.update(key.as_str().as_bytes());
    h.finalize().into()
}

/// The tags of a record file's text; anything but whole 64-lowercase-hex lines is ignored.
fn parse_tags(text: &[u8]) -> Vec<Tag> {
    let mut tags: Vec<Tag> = Vec::new();
    for line in text.split_inclusive(|b| *b == b'\n') {
        let Some(hex) = line.strip_suffix(b"\n") else {
            continue;
        };
        if hex.len() != 64 || !hex.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            continue;
        }
        let mut out = [0; 32];
        if hex::decode_to_slice(hex, &mut out).is_ok() && !tags.contains(&out) {
            tags.push(out);
        }
    }
    tags
}

#[derive(Clone)]
pub struct DiskStore {
    inner: Arc<Inner>,
}

struct Inner {
    chunks: PathBuf,
    wip: PathBuf,
    /// 0 = no limit.
    budget: u64,
    index: Mutex<Index>,
    /// Totals of every eviction since open.
    evicted_entries: AtomicU64,
    evicted_bytes: AtomicU64,
    too_large_logged: AtomicBool,
}

/// Sizes and recency of the entries on disk. `clock` is a logical time: every use takes the
/// next tick, so ordering by tick is least-recently-used order.
#[derive(Default)]
struct Index {
    entries: HashMap<ChunkKey, Entry>,
    /// Chunk and record bytes of `entries`.
    used: u64,
    /// Bytes outside the store that count against its budget (saved layer state).
    reserved: u64,
    /// Bytes being written now, reserved before the write.
    inflight: u64,
    clock: u64,
}

#[derive(Clone)]
struct Entry {
    size: u64,
    /// Bytes of the record file.
    record: u64,
    tags: Vec<Tag>,
    last_use: u64,
}

impl Index {
    fn touch(&mut self, key: &ChunkKey) {
        self.clock += 1;
        let clock = self.clock;
        if let Some(e) = self.entries.get_mut(key) {
            e.last_use = clock;
        }
    }

    fn insert(&mut self, key: ChunkKey, mut entry: Entry) {
        self.clock += 1;
        entry.last_use = self.clock;
        self.used += entry.size + entry.record;
        if let Some(old) = self.entries.insert(key, entry) {
            self.used -= old.size + old.record;
        }
    }

    fn remove(&mut self, key: &ChunkKey) -> Option<Entry> {
        let old = self.entries.remove(key)?;
        self.used -= old.size + old.record;
        Some(old)
    }

    fn total(&self) -> u64 {
        self.used + self.reserved + self.inflight
    }

    /// Least recently used entries to drop until `total() <= target`, taken out of the
    /// index; the caller unlinks them before letting go of the lock.
    fn victims(&mut self, target: u64) -> Vec<(ChunkKey, Entry)> {
        if self.total() <= target {
            return Vec::new();
        }
        let mut order: Vec<(u64, ChunkKey)> = self
            .entries
            .iter()
            .map(|(k, e)| (e.last_use, k.clone()))
            .collect();
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

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CacheError {
    let path = path.to_path_buf();
    move |source| CacheError::Io {
        action,
        path,
        source,
    }
}

impl DiskStore {
    /// Opens the store under `dir`, discarding unfinished writes of an earlier run, and keeps
    /// it within `budget` bytes (0 = no limit).
    pub fn open(dir: PathBuf, budget: u64) -> Result<Self, CacheError> {
        let chunks = dir.join("chunks");
        let wip = dir.join("wip");
        if wip.exists() {
            std::fs::remove_dir_all(&wip).map_err(io_err("clear", &wip))?;
        }
        std::fs::create_dir_all(&chunks).map_err(io_err("create", &chunks))?;
        std::fs::create_dir_all(&wip).map_err(io_err("create", &wip))?;
        let index = scan(&chunks).map_err(io_err("scan", &chunks))?;
        let store = DiskStore {
            inner: Arc::new(Inner {
                chunks,
                wip,
                budget,
                index: Mutex::new(index),
                evicted_entries: AtomicU64::new(0),
                evicted_bytes: AtomicU64::new(0),
                too_large_logged: AtomicBool::new(false),
            }),
        };
        // A budget lowered since the last run applies at once.
        if budget > 0 {
            store.prune_to(budget);
        }
        Ok(store)
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        self.inner.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, key: &ChunkKey) -> PathBuf {
        let hex = key.as_str();
        self.inner.chunks.join(&hex[..2]).join(hex)
    }

    fn record_path(&self, key: &ChunkKey) -> PathBuf {
        let hex = key.as_str();
        self.inner
            .chunks
            .join(&hex[..2])
            .join(format!("{hex}{RECORD_SUFFIX}"))
    }

    /// Whether `key` is on disk, for any blob.
    pub fn contains(&self, key: &ChunkKey) -> bool {
        self.index().entries.contains_key(key)
    }

    /// Whether `key` is on disk and was verified from `blob`.
    pub fn contains_for(&self, key: &ChunkKey, blob: &BlobId) -> bool {
        let tag = tag(blob, key);
        self.index()
            .entries
            .get(key)
            .is_some_and(|e| e.tags.contains(&tag))
    }

    /// The stored size of `key`, if it is on disk for `blob`.
    pub fn size_for(&self, key: &ChunkKey, blob: &BlobId) -> Option<u64> {
        let tag = tag(blob, key);
        self.index()
            .entries
            .get(key)
            .filter(|e| e.tags.contains(&tag))
            .map(|e| e.size)
    }

    /// Reads and verifies `key` for `blob`: `None` unless the blob's tag is recorded. A file
    /// that fails verification is removed.
    pub fn get_for(&self, key: &ChunkKey, blob: &BlobId) -> Option<Found> {
        if !self.contains_for(key, blob) {
            return None;
        }
        let path = self.path(key);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) => {
                if e.kind() != ErrorKind::NotFound {
                    tracing::warn!(chunk = %key, path = %path.display(), error = %e, "cache read failed; treating as a miss");
                }
                self.forget(key);
                return None;
            }
        };
        if ChunkKey::of(&bytes) != *key {
            tracing::warn!(chunk = %key, path = %path.display(), "cached chunk is corrupt; removing it");
            self.forget(key);
            return Some(Found::Corrupt);
        }
        self.index().touch(key);
        Some(Found::Valid(Bytes::from(bytes)))
    }

    /// Drops `key` from the index and the disk, not counted as an eviction.
    fn forget(&self, key: &ChunkKey) {
        let mut index = self.index();
        if index.remove(key).is_some() {
            let _ = self.unlink_files(key);
        }
    }

    /// Reserves `incoming` bytes: unlinks least recently used entries until they fit. Called
    /// with the lock held; the files are gone when it returns.
    fn make_room(&self, index: &mut Index, incoming: u64) {
        let budget = self.inner.budget;
        if budget == 0 {
            index.inflight += incoming;
            return;
        }
        if index.total() + incoming > budget {
            // Down to 90% (when that leaves room), so the sort over all entries is not paid
            // on every following put.
            let target = (budget / 10 * 9).min(budget.saturating_sub(incoming));
            let victims = index.victims(target);
            let mut evicted = Evicted::default();
            for (key, entry) in victims {
                evicted += self.unlink(&key, &entry);
            }
            tracing::debug!(
                entries = evicted.entries,
                bytes = evicted.bytes,
                budget,
                "evicted least recently used chunks to keep within the disk budget"
            );
        }
        index.inflight += incoming;
    }

    /// Stores `bytes` under `key` (already verified by the caller, fetched from `blob`),
    /// making room first so the budget holds on disk at every moment.
    pub fn put(&self, key: &ChunkKey, bytes: &[u8], blob: &BlobId) -> Result<Stored, CacheError> {
        let tag = tag(blob, key);
        {
            let mut index = self.index();
            if let Some(entry) = index.entries.get(key) {
                if entry.tags.contains(&tag) {
                    index.touch(key);
                    return Ok(Stored::Known);
                }
                index.touch(key);
                self.make_room(&mut index, TAG_LINE);
                // `make_room` may still have taken the chunk (a budget smaller than a few
                // chunks): then it is written afresh below.
                if index.entries.contains_key(key) {
                    let appended = self.append_tag(key, &tag);
                    index.inflight -= TAG_LINE;
                    appended?;
                    index.used += TAG_LINE;
                    if let Some(entry) = index.entries.get_mut(key) {
                        entry.tags.push(tag);
                        entry.record += TAG_LINE;
                    }
                    return Ok(Stored::Recorded);
                }
                index.inflight -= TAG_LINE;
            }
        }
        let incoming = bytes.len() as u64 + TAG_LINE;
        let budget = self.inner.budget;
        if budget > 0 && incoming > budget {
            if !self.inner.too_large_logged.swap(true, Ordering::Relaxed) {
                tracing::warn!(chunk = %key, bytes = bytes.len(), budget, "a chunk is larger than the whole disk budget: such chunks are kept in memory only (logged once)");
            }
            return Ok(Stored::TooLarge);
        }
        self.make_room(&mut self.index(), incoming);
        let result = self.write(key, bytes, &tag);
        let mut index = self.index();
        index.inflight -= incoming;
        let record = result?;
        match index.entries.get_mut(key) {
            // Another blob's put of the same chunk landed meanwhile: one file, both tags.
            Some(entry) => {
                if !entry.tags.contains(&tag) {
                    entry.tags.push(tag);
                }
                entry.record += TAG_LINE;
                index.used += TAG_LINE;
                index.touch(key);
            }
            None => index.insert(
                key.clone(),
                Entry {
                    size: bytes.len() as u64,
                    record,
                    tags: vec![tag],
                    last_use: 0,
                },
            ),
        }
        Ok(Stored::Written)
    }

    /// Writes the chunk into `wip/`, then, under the lock, renames it into place and appends
    /// the tag; returns the record file's size.
    fn write(&self, key: &ChunkKey, bytes: &[u8], tag: &Tag) -> Result<u64, CacheError> {
        let target = self.path(key);
        let mut tmp = tempfile::NamedTempFile::new_in(&self.inner.wip)
            .map_err(io_err("create temporary file in", &self.inner.wip))?;
        tmp.write_all(bytes).map_err(io_err("write", tmp.path()))?;
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        }
        let _index = self.index();
        tmp.persist(&target).map_err(|e| CacheError::Io {
            action: "rename into",
            path: target.clone(),
            source: e.error,
        })?;
        if let Err(e) = self.append_tag(key, tag) {
            let _ = std::fs::remove_file(&target);
            return Err(e);
        }
        let record = self.record_path(key);
        Ok(std::fs::metadata(&record).map_or(TAG_LINE, |m| m.len()))
    }

    /// Appends `tag` to the chunk's record: one short `O_APPEND` write, whole or torn.
    fn append_tag(&self, key: &ChunkKey, tag: &Tag) -> Result<(), CacheError> {
        let path = self.record_path(key);
        let mut line = hex::encode(tag).into_bytes();
        line.push(b'\n');
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        file.write_all(&line).map_err(io_err("append to", &path))
    }

    /// Removes `key` if it is stored.
    pub fn remove(&self, key: &ChunkKey) -> Evicted {
        let mut index = self.index();
        let Some(entry) = index.remove(key) else {
            return Evicted::default();
        };
        self.unlink(key, &entry)
    }

    /// Removes the record first: a crash in between leaves a chunk no blob may read (fetched
    /// again), never a record without its chunk's eviction counted.
    fn unlink_files(&self, key: &ChunkKey) -> std::io::Result<()> {
        for path in [self.record_path(key), self.path(key)] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "removing cached chunk failed");
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn unlink(&self, key: &ChunkKey, entry: &Entry) -> Evicted {
        if self.unlink_files(key).is_err() {
            return Evicted::default();
        }
        let bytes = entry.size + entry.record;
        self.inner.evicted_entries.fetch_add(1, Ordering::Relaxed);
        self.inner.evicted_bytes.fetch_add(bytes, Ordering::Relaxed);
        Evicted { entries: 1, bytes }
    }

    /// Evicts least recently used entries until at most `target` bytes are used, reserved
    /// bytes included (all of them go if the reserve alone is over `target`).
    pub fn prune_to(&self, target: u64) -> Evicted {
        let mut index = self.index();
        let victims = index.victims(target);
        let mut total = Evicted::default();
        for (key, entry) in victims {
            total += self.unlink(&key, &entry);
        }
        total
    }

    /// Sets the bytes kept outside the store that count against its budget, evicting to
    /// make room for them.
    pub fn reserve(&self, bytes: u64) -> Evicted {
        let mut index = self.index();
        index.reserved = bytes;
        let budget = self.inner.budget;
        if budget == 0 || index.total() <= budget {
            return Evicted::default();
        }
        let victims = index.victims(budget / 10 * 9);
        let mut total = Evicted::default();
        for (key, entry) in victims {
            total += self.unlink(&key, &entry);
        }
        total
    }

    pub fn budget(&self) -> u64 {
        self.inner.budget
    }

    /// Bytes on disk (chunks, records and the reserve) and number of chunk files.
    pub fn usage(&self) -> (u64, u64) {
        let index = self.index();
        (index.used + index.reserved, index.entries.len() as u64)
    }

    /// Every eviction since open (budget, prune and evict on request).
    pub fn evicted(&self) -> Evicted {
        Evicted {
            entries: self.inner.evicted_entries.load(Ordering::Relaxed),
            bytes: self.inner.evicted_bytes.load(Ordering::Relaxed),
        }
    }
}

/// The index of what an earlier run left, oldest file first. Records without their chunk
/// are removed.
fn scan(chunks: &Path) -> std::io::Result<Index> {
    let mut found = Vec::new();
    let mut records: HashMap<ChunkKey, (PathBuf, u64, Vec<Tag>)> = HashMap::new();
    for shard in std::fs::read_dir(chunks)? {
        for entry in std::fs::read_dir(shard?.path())? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                continue;
            };
            if let Some(hex) = name.strip_suffix(RECORD_SUFFIX) {
                if let Some(key) = ChunkKey::from_digest(hex) {
                    let text = std::fs::read(entry.path())?;
                    let tags = parse_tags(&text);
                    records.insert(key, (entry.path(), text.len() as u64, tags));
                }
                continue;
            }
            let Some(key) = ChunkKey::from_digest(name) else {
                continue;
            };
            let meta = entry.metadata()?;
            let mtime = meta.modified().ok();
            found.push((mtime, key, meta.len()));
        }
    }
    found.sort_by_key(|(mtime, _, _)| *mtime);
    let mut index = Index::default();
    for (_, key, size) in found {
        let (record, tags) = match records.remove(&key) {
            Some((_, len, tags)) => (len, tags),
            None => (0, Vec::new()),
        };
        index.insert(
            key,
            Entry {
                size,
                record,
                tags,
                last_use: 0,
            },
        );
    }
    for (_, (path, _, _)) in records {
        let _ = std::fs::remove_file(path);
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: u8, len: usize) -> (ChunkKey, Vec<u8>) {
        let data = vec![n; len];
        (ChunkKey::of(&data), data)
    }

    fn blob(n: u8) -> BlobId {
        BlobId::new(&format!("sha256:{}", hex::encode([n; 32])), None)
    }

    /// What is really on disk under the store: every file's length.
    fn on_disk(dir: &Path) -> u64 {
        let mut total = 0;
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).expect("list").flatten() {
                let meta = e.metadata().expect("stat");
                if meta.is_dir() {
                    stack.push(e.path());
                } else {
                    total += meta.len();
                }
            }
        }
        total
    }

    #[test]
    fn corrupt_and_torn_files_are_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = DiskStore::open(dir.path().to_path_buf(), 0).expect("open");
        let data = b"some chunk".to_vec();
        let key = ChunkKey::of(&data);
        let b = blob(1);
        store.put(&key, &data, &b).expect("put");
        // Simulate a torn write: the file holds only part of the chunk.
        std::fs::write(store.path(&key), &data[..4]).expect("truncate");
        assert!(matches!(store.get_for(&key, &b), Some(Found::Corrupt)));
        assert!(store.get_for(&key, &b).is_none(), "corrupt file removed");
        assert_eq!(store.usage(), (0, 0), "index follows the removal");
        assert!(!store.record_path(&key).exists(), "its record went with it");
        store.put(&key, &data, &b).expect("put again");
        assert!(matches!(store.get_for(&key, &b), Some(Found::Valid(d)) if d == data));
    }

    #[test]
    fn records_survive_reopen_and_torn_or_foreign_lines_prove_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b, c) = (blob(1), blob(2), blob(3));
        let (key, data) = chunk(7, 100);
        let (other_key, other_data) = chunk(8, 100);
        {
            let store = DiskStore::open(dir.path().to_path_buf(), 0).expect("open");
            assert_eq!(store.put(&key, &data, &a).expect("put"), Stored::Written);
            assert_eq!(store.put(&key, &data, &a).expect("put"), Stored::Known);
            assert_eq!(store.put(&key, &data, &b).expect("put"), Stored::Recorded);
            store.put(&other_key, &other_data, &c).expect("put");
            assert_eq!(store.usage(), (200 + 3 * TAG_LINE, 2));
            assert_eq!(store.usage().0, on_disk(dir.path()));
        }
        // A crash's leftovers in the record: a torn line (a prefix), zeros, and a line that is
        // `c`'s tag for another chunk (stale blocks of another record).
        let record = dir
            .path()
            .join("chunks")
            .join(&key.as_str()[..2])
            .join(format!("{}.blobs", key.as_str()));
        let mut text = std::fs::read(&record).expect("record");
        text.extend_from_slice(&hex::encode(tag(&c, &key)).as_bytes()[..30]);
        text.extend_from_slice(&[0; 40]);
        text.push(b'\n');
        text.extend_from_slice(hex::encode(tag(&c, &other_key)).as_bytes());
        text.push(b'\n');
        std::fs::write(&record, &text).expect("write");
        // A record without its chunk is removed at open.
        let stray = dir.path().join("chunks").join("ab");
        std::fs::create_dir_all(&stray).expect("mkdir");
        std::fs::write(stray.join(format!("{}.blobs", "ab".repeat(32))), b"x\n").expect("write");
        let store = DiskStore::open(dir.path().to_path_buf(), 0).expect("reopen");
        assert!(store.contains_for(&key, &a) && store.contains_for(&key, &b));
        assert!(
            !store.contains_for(&key, &c),
            "no crash leftover proves c holds the chunk"
        );
        assert!(store.get_for(&key, &c).is_none());
        assert!(store.contains_for(&other_key, &c));
        assert!(!stray.join(format!("{}.blobs", "ab".repeat(32))).exists());
        assert_eq!(store.usage().0, on_disk(dir.path()));
    }

    #[test]
    fn unfinished_writes_are_cleared_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        DiskStore::open(dir.path().to_path_buf(), 0).expect("open");
        std::fs::write(dir.path().join("wip").join("left-over"), b"x").expect("write");
        let store = DiskStore::open(dir.path().to_path_buf(), 0).expect("reopen");
        assert_eq!(
            std::fs::read_dir(&store.inner.wip).expect("list").count(),
            0
        );
        assert_eq!(store.usage(), (0, 0));
    }

    #[test]
    fn budget_evicts_least_recently_used_first_and_before_writing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let budget = 3 * (1000 + TAG_LINE);
        let store = DiskStore::open(dir.path().to_path_buf(), budget).expect("open");
        let b = blob(1);
        let (a, da) = chunk(1, 1000);
        let (k2, d2) = chunk(2, 1000);
        let (k3, d3) = chunk(3, 1000);
        store.put(&a, &da, &b).expect("put a");
        store.put(&k2, &d2, &b).expect("put b");
        store.put(&k3, &d3, &b).expect("put c");
        assert_eq!(store.usage().0, budget);
        // Reading `a` makes the second the least recently used.
        assert!(matches!(store.get_for(&a, &b), Some(Found::Valid(_))));
        let (d, dd) = chunk(4, 1000);
        store.put(&d, &dd, &b).expect("put d");
        assert!(store.usage().0 <= budget, "{:?}", store.usage());
        assert!(on_disk(dir.path()) <= budget);
        assert!(!store.contains(&k2), "least recently used evicted");
        assert!(!store.path(&k2).exists(), "its file is gone");
        assert!(store.contains(&a) && store.contains(&d));
        assert!(store.evicted().entries >= 1);
        // Room is made before the write: with the index saying the store is full, a put
        // evicts first, so the files never add up to more than the budget.
        store.reserve(budget - 1000);
        assert!(store.usage().0 <= budget, "{:?}", store.usage());
        assert!(on_disk(dir.path()) + (budget - 1000) <= budget);
        let (e, de) = chunk(5, 800);
        assert_eq!(store.put(&e, &de, &b).expect("put e"), Stored::Written);
        assert!(on_disk(dir.path()) + (budget - 1000) <= budget);
        // A chunk larger than the whole budget is not written at all.
        let (big, dbig) = chunk(6, budget as usize + 1);
        assert_eq!(store.put(&big, &dbig, &b).expect("put"), Stored::TooLarge);
        assert!(!store.path(&big).exists());
    }

    #[test]
    fn prune_and_remove_and_reopen_keep_the_index_true() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = DiskStore::open(dir.path().to_path_buf(), 0).expect("open");
        let b = blob(1);
        let chunks: Vec<_> = (0..5).map(|n| chunk(n, 100 + n as usize)).collect();
        for (k, d) in &chunks {
            store.put(k, d, &b).expect("put");
        }
        assert_eq!(store.usage(), (510 + 5 * TAG_LINE, 5));
        let removed = store.remove(&chunks[4].0);
        assert_eq!(
            removed,
            Evicted {
                entries: 1,
                bytes: 104 + TAG_LINE
            }
        );
        assert_eq!(store.remove(&chunks[4].0), Evicted::default());
        let pruned = store.prune_to(250 + 3 * TAG_LINE);
        assert_eq!(pruned.entries, 2, "the two oldest go");
        assert!(!store.contains(&chunks[0].0) && !store.contains(&chunks[1].0));
        drop(store);
        let reopened = DiskStore::open(dir.path().to_path_buf(), 0).expect("reopen");
        assert_eq!(reopened.usage(), (205 + 2 * TAG_LINE, 2));
        assert_eq!(reopened.usage().0, on_disk(dir.path()));
        // A smaller budget at open applies at once.
        drop(reopened);
        let small = DiskStore::open(dir.path().to_path_buf(), 150 + TAG_LINE).expect("reopen");
        assert!(small.usage().0 <= 150 + TAG_LINE);
    }
}
