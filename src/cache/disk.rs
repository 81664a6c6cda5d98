//! The disk tier: one file per chunk at `chunks/<2 hex>/<64 hex>`, written into `wip/` and
//! renamed into place, so a reader sees a whole file or none. Files are not fsynced: a torn file
//! left by a crash fails verification on its next read and is dropped, which costs one refetch
//! and nothing else.
//!
//! An in-memory index (built by scanning the directory at open, ordered by the files' mtimes)
//! knows every entry's size and when it was last used, so the store can keep within a byte
//! budget by evicting the least recently used chunks. Eviction only unlinks files: a reader
//! holds a chunk's bytes in memory once it has read them, so evicting never breaks a read in
//! progress; the worst it does is make a later read fetch the chunk again.

use std::collections::HashMap;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use super::{CacheError, ChunkKey};

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
}

/// Sizes and recency of the entries on disk. `clock` is a logical time: every use takes the
/// next tick, so ordering by tick is least-recently-used order.
#[derive(Default)]
struct Index {
    entries: HashMap<ChunkKey, Entry>,
    used: u64,
    clock: u64,
}

#[derive(Clone, Copy)]
struct Entry {
    size: u64,
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

    fn insert(&mut self, key: ChunkKey, size: u64) {
        self.clock += 1;
        let entry = Entry {
            size,
            last_use: self.clock,
        };
        if let Some(old) = self.entries.insert(key, entry) {
            self.used -= old.size;
        }
        self.used += size;
    }

    fn remove(&mut self, key: &ChunkKey) -> Option<Entry> {
        let old = self.entries.remove(key)?;
        self.used -= old.size;
        Some(old)
    }
}

impl DiskStore {
    /// Opens the store under `dir`, discarding unfinished writes of an earlier run, and keeps
    /// it within `budget` bytes (0 = no limit).
    pub fn open(dir: PathBuf, budget: u64) -> Result<Self, CacheError> {
        let chunks = dir.join("chunks");
        let wip = dir.join("wip");
        let io = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| CacheError::Io {
                action,
                path,
                source,
            }
        };
        if wip.exists() {
            std::fs::remove_dir_all(&wip).map_err(io("clear", &wip))?;
        }
        std::fs::create_dir_all(&chunks).map_err(io("create", &chunks))?;
        std::fs::create_dir_all(&wip).map_err(io("create", &wip))?;
        let index = scan(&chunks).map_err(io("scan", &chunks))?;
        let store = DiskStore {
            inner: Arc::new(Inner {
                chunks,
                wip,
                budget,
                index: Mutex::new(index),
                evicted_entries: AtomicU64::new(0),
                evicted_bytes: AtomicU64::new(0),
            }),
        };
        // A budget lowered since the last run applies at once.
        store.enforce_budget();
        Ok(store)
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        self.inner.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, key: &ChunkKey) -> PathBuf {
        let hex = key.as_str();
        self.inner.chunks.join(&hex[..2]).join(hex)
    }

    pub fn contains(&self, key: &ChunkKey) -> bool {
        self.index().entries.contains_key(key)
    }

    /// The stored size of `key`, if it is on disk.
    pub fn size_of(&self, key: &ChunkKey) -> Option<u64> {
        self.index().entries.get(key).map(|e| e.size)
    }

    /// Reads and verifies `key`; a file that fails verification is removed.
    pub fn get(&self, key: &ChunkKey) -> Option<Found> {
        if !self.contains(key) {
            return None;
        }
        let path = self.path(key);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) => {
                if e.kind() != ErrorKind::NotFound {
                    tracing::warn!(chunk = %key, path = %path.display(), error = %e, "cache read failed; treating as a miss");
                }
                self.index().remove(key);
                return None;
            }
        };
        if ChunkKey::of(&bytes) != *key {
            tracing::warn!(chunk = %key, path = %path.display(), "cached chunk is corrupt; removing it");
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "removing corrupt chunk failed");
            }
            self.index().remove(key);
            return Some(Found::Corrupt);
        }
        self.index().touch(key);
        Some(Found::Valid(Bytes::from(bytes)))
    }

    /// Stores `bytes` under `key` (already verified by the caller), then evicts the least
    /// recently used entries if the store is over its budget.
    pub fn put(&self, key: &ChunkKey, bytes: &[u8]) -> Result<(), CacheError> {
        if self.contains(key) {
            self.index().touch(key);
            return Ok(());
        }
        let target = self.path(key);
        let io = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| CacheError::Io {
                action,
                path,
                source,
            }
        };
        let mut tmp = tempfile::NamedTempFile::new_in(&self.inner.wip)
            .map_err(io("create temporary file in", &self.inner.wip))?;
        tmp.write_all(bytes).map_err(io("write", tmp.path()))?;
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        }
        tmp.persist(&target).map_err(|e| CacheError::Io {
            action: "rename into",
            path: target.clone(),
            source: e.error,
        })?;
        self.index().insert(key.clone(), bytes.len() as u64);
        self.enforce_budget();
        Ok(())
    }

    /// Removes `key` if it is stored.
    pub fn remove(&self, key: &ChunkKey) -> Evicted {
        let Some(entry) = self.index().remove(key) else {
            return Evicted::default();
        };
        self.unlink(key, entry.size)
    }

    fn unlink(&self, key: &ChunkKey, size: u64) -> Evicted {
        let path = self.path(key);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "evicting chunk failed");
                return Evicted::default();
            }
        }
        self.inner.evicted_entries.fetch_add(1, Ordering::Relaxed);
        self.inner.evicted_bytes.fetch_add(size, Ordering::Relaxed);
        Evicted {
            entries: 1,
            bytes: size,
        }
    }

    /// Evicts least recently used entries until at most `target` bytes are stored.
    pub fn prune_to(&self, target: u64) -> Evicted {
        let victims: Vec<(ChunkKey, u64)> = {
            let mut index = self.index();
            if index.used <= target {
                return Evicted::default();
            }
            let mut order: Vec<(u64, ChunkKey, u64)> = index
                .entries
                .iter()
                .map(|(k, e)| (e.last_use, k.clone(), e.size))
                .collect();
            order.sort_unstable_by_key(|(last_use, _, _)| *last_use);
            let mut victims = Vec::new();
            for (_, key, size) in order {
                if index.used <= target {
                    break;
                }
                index.remove(&key);
                victims.push((key, size));
            }
            victims
        };
        let mut total = Evicted::default();
        for (key, size) in victims {
            total += self.unlink(&key, size);
        }
        total
    }

    /// Keeps within the budget. Evicting down to 90% of it, not just under it, spares the
    /// sort over all entries on every following put.
    fn enforce_budget(&self) {
        let budget = self.inner.budget;
        if budget == 0 || self.index().used <= budget {
            return;
        }
        let evicted = self.prune_to(budget / 10 * 9);
        tracing::debug!(
            entries = evicted.entries,
            bytes = evicted.bytes,
            budget,
            "evicted least recently used chunks to keep within the disk budget"
        );
    }

    pub fn budget(&self) -> u64 {
        self.inner.budget
    }

    /// Total bytes and number of chunk files on disk.
    pub fn usage(&self) -> (u64, u64) {
        let index = self.index();
        (index.used, index.entries.len() as u64)
    }

    /// Every eviction since open (budget, prune and evict on request).
    pub fn evicted(&self) -> Evicted {
        Evicted {
            entries: self.inner.evicted_entries.load(Ordering::Relaxed),
            bytes: self.inner.evicted_bytes.load(Ordering::Relaxed),
        }
    }
}

/// The index of what an earlier run left, oldest file first.
fn scan(chunks: &Path) -> std::io::Result<Index> {
    let mut found = Vec::new();
    for shard in std::fs::read_dir(chunks)? {
        for entry in std::fs::read_dir(shard?.path())? {
            let entry = entry?;
            let Some(key) = entry.file_name().to_str().and_then(ChunkKey::from_digest) else {
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
        index.insert(key, size);
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

    #[test]
    fn corrupt_and_torn_files_are_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = DiskStore::open(dir.path().to_path_buf(), 0).expect("open");
        let data = b"some chunk".to_vec();
        let key = ChunkKey::of(&data);
        store.put(&key, &data).expect("put");
        // Simulate a torn write: the file holds only part of the chunk.
        std::fs::write(store.path(&key), &data[..4]).expect("truncate");
        assert!(matches!(store.get(&key), Some(Found::Corrupt)));
        assert!(store.get(&key).is_none(), "corrupt file removed");
        assert_eq!(store.usage(), (0, 0), "index follows the removal");
        store.put(&key, &data).expect("put again");
        assert!(matches!(store.get(&key), Some(Found::Valid(b)) if b == data));
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
    fn budget_evicts_least_recently_used_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = DiskStore::open(dir.path().to_path_buf(), 3000).expect("open");
        let (a, da) = chunk(1, 1000);
        let (b, db) = chunk(2, 1000);
        let (c, dc) = chunk(3, 1000);
        store.put(&a, &da).expect("put a");
        store.put(&b, &db).expect("put b");
        store.put(&c, &dc).expect("put c");
        // Reading `a` makes `b` the least recently used.
        assert!(matches!(store.get(&a), Some(Found::Valid(_))));
        let (d, dd) = chunk(4, 1000);
        store.put(&d, &dd).expect("put d");
        assert!(store.usage().0 <= 3000, "{:?}", store.usage());
        assert!(!store.contains(&b), "least recently used evicted");
        assert!(!store.path(&b).exists(), "its file is gone");
        assert!(store.contains(&a) && store.contains(&d));
        assert!(store.evicted().entries >= 1);
    }

    #[test]
    fn prune_and_remove_and_reopen_keep_the_index_true() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = DiskStore::open(dir.path().to_path_buf(), 0).expect("open");
        let chunks: Vec<_> = (0..5).map(|n| chunk(n, 100 + n as usize)).collect();
        for (k, d) in &chunks {
            store.put(k, d).expect("put");
        }
        assert_eq!(store.usage(), (510, 5));
        let removed = store.remove(&chunks[4].0);
        assert_eq!(
            removed,
            Evicted {
                entries: 1,
                bytes: 104
            }
        );
        assert_eq!(store.remove(&chunks[4].0), Evicted::default());
        let pruned = store.prune_to(250);
        assert_eq!(pruned.entries, 2, "the two oldest go");
        assert!(!store.contains(&chunks[0].0) && !store.contains(&chunks[1].0));
        drop(store);
        let reopened = DiskStore::open(dir.path().to_path_buf(), 0).expect("reopen");
        assert_eq!(reopened.usage(), (205, 2));
        // A smaller budget at open applies at once.
        drop(reopened);
        let small = DiskStore::open(dir.path().to_path_buf(), 150).expect("reopen small");
        assert!(small.usage().0 <= 150);
    }
}
