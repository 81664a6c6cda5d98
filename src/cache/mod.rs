//! Where verified chunk bytes live, behind one seam: the layer reader sees only
//! [`ChunkStore`] — is a chunk ready, read a range of it, put a verified chunk, evict — so a
//! second representation (decompressed files served by pread) can replace or sit beside the
//! first without the reader changing.
//!
//! The implementation today, [`ChunkCache`], keeps decompressed chunk bytes on local disk and,
//! for hot data, in memory, shared by every layer and image that contains the same chunk.
//! Entries are addressed by the sha256 of their bytes ([`ChunkKey`]), so identical chunks of
//! different layers are stored once, and every read from disk is checked against its key: a
//! torn write (crash, full disk) or bit rot is detected, dropped and reported as a miss, never
//! served. The store knows chunk specs and bytes; which chunk a file offset needs is the layer
//! reader's job.

mod disk;
mod memory;

use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

pub use disk::{DiskStore, Evicted};
pub use memory::MemoryTier;

use crate::chunk::{ChunkDigest, ChunkSpec, VerifiedChunk};
use crate::BoxFuture;

/// Where a chunk file is on disk: the lowercase hex sha256 of its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkKey(String);

impl ChunkKey {
    /// Accepts `sha256:<hex>` or bare hex; anything else is not a content address.
    pub fn from_digest(digest: &str) -> Option<Self> {
        ChunkDigest::parse(digest).map(|d| ChunkKey::from(&d))
    }

    /// The key of `bytes`, for checking what a file holds.
    pub fn of(bytes: &[u8]) -> Self {
        ChunkKey::from(&ChunkDigest::of(bytes))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&ChunkDigest> for ChunkKey {
    fn from(digest: &ChunkDigest) -> Self {
        ChunkKey(digest.hex())
    }
}

impl std::fmt::Display for ChunkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.0)
    }
}

/// Errors of the store. Reads never fail with these (a broken entry is a miss); writes report
/// them so the caller can log that the data will have to be fetched again.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("storing chunk {digest}: the storing task failed")]
    Task {
        digest: ChunkDigest,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// Hit and miss counters of the whole cache.
#[derive(Debug, Default)]
pub struct CacheCounters {
    pub memory_hits: AtomicU64,
    pub disk_hits: AtomicU64,
    pub misses: AtomicU64,
    /// Disk entries found corrupt and dropped.
    pub corrupt: AtomicU64,
}

/// The figures of a store, for `lazysnap cache stats` and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StoreStats {
    pub memory_hits: u64,
    pub disk_hits: u64,
    pub misses: u64,
    pub corrupt: u64,
    pub disk_used_bytes: u64,
    pub disk_entries: u64,
    /// 0 = no budget.
    pub disk_budget_bytes: u64,
    pub memory_used_bytes: u64,
    pub memory_entries: u64,
    pub evicted: Evicted,
}

/// Where verified chunk bytes live. Readiness is explicit: a chunk is ready once `put` has
/// stored it, and `read` of a ready chunk needs no network; a store may still lose a ready
/// chunk (eviction, damage found on read), which `read` reports as `None`.
pub trait ChunkStore: Send + Sync {
    /// Whether the chunk's bytes are here, without reading them.
    fn is_ready(&self, chunk: &ChunkSpec) -> bool;
    /// Bytes `range` (relative to the chunk's start) of a ready chunk; `None` if it is not.
    fn read<'a>(&'a self, chunk: &'a ChunkSpec, range: Range<u64>) -> BoxFuture<'a, Option<Bytes>>;
    /// Stores a chunk's verified bytes and makes it ready.
    fn put<'a>(
        &'a self,
        chunk: &'a ChunkSpec,
        bytes: VerifiedChunk,
    ) -> BoxFuture<'a, Result<(), CacheError>>;
    /// Drops these chunks.
    fn evict(&self, chunks: Vec<ChunkSpec>) -> BoxFuture<'_, Evicted>;
    /// Evicts least recently used data down to `target` bytes.
    fn prune_to(&self, target: u64) -> BoxFuture<'_, Evicted>;
    /// How many of `chunks` are here, and their bytes.
    fn present(&self, chunks: &[ChunkSpec]) -> (u64, u64);
    fn stats(&self) -> StoreStats;
}

/// Memory in front of disk, content-addressed.
pub struct ChunkCache {
    memory: MemoryTier,
    disk: DiskStore,
    counters: Arc<CacheCounters>,
}

impl ChunkCache {
    /// `dir` holds the disk tier, kept within `disk_budget` bytes (0 = no limit);
    /// `memory_bytes` bounds the memory tier.
    pub fn open(dir: PathBuf, memory_bytes: u64, disk_budget: u64) -> Result<Self, CacheError> {
        Ok(ChunkCache {
            memory: MemoryTier::new(memory_bytes),
            disk: DiskStore::open(dir, disk_budget)?,
            counters: Arc::default(),
        })
    }

    /// The bytes stored under `key`, from memory or (verified) from disk.
    pub async fn get(&self, key: &ChunkKey) -> Option<Bytes> {
        if let Some(bytes) = self.memory.get(key).await {
            self.counters.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Some(bytes);
        }
        let disk = self.disk.clone();
        let owned = key.clone();
        let found = tokio::task::spawn_blocking(move || disk.get(&owned))
            .await
            .ok()
            .flatten();
        match found {
            Some(disk::Found::Valid(bytes)) => {
                self.counters.disk_hits.fetch_add(1, Ordering::Relaxed);
                self.memory.insert(key.clone(), bytes.clone()).await;
                Some(bytes)
            }
            Some(disk::Found::Corrupt) => {
                self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
            None => {
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Whether `key` is cached, without reading or verifying it.
    pub fn contains(&self, key: &ChunkKey) -> bool {
        self.memory.contains(key) || self.disk.contains(key)
    }

    /// Stores verified bytes. The memory tier always takes them, so a failing disk (full, read
    /// only) degrades to fetching again later but never fails the read that brought them.
    pub async fn put_verified(&self, chunk: VerifiedChunk) -> Result<(), CacheError> {
        let digest = *chunk.digest();
        let key = ChunkKey::from(&digest);
        let bytes = chunk.into_bytes();
        self.memory.insert(key.clone(), bytes.clone()).await;
        let disk = self.disk.clone();
        tokio::task::spawn_blocking(move || disk.put(&key, &bytes))
            .await
            .map_err(|source| CacheError::Task { digest, source })?
    }

    pub fn counters(&self) -> &CacheCounters {
        &self.counters
    }

    /// Drops `keys` from both tiers.
    pub async fn evict_keys(&self, keys: impl IntoIterator<Item = ChunkKey>) -> Evicted {
        let mut total = Evicted::default();
        for key in keys {
            self.memory.remove(&key).await;
            let disk = self.disk.clone();
            total += tokio::task::spawn_blocking(move || disk.remove(&key))
                .await
                .unwrap_or_default();
        }
        total
    }

    /// (bytes, entries) in the memory tier.
    pub fn memory_usage(&self) -> (u64, u64) {
        self.memory.usage()
    }
}

impl ChunkStore for ChunkCache {
    fn is_ready(&self, chunk: &ChunkSpec) -> bool {
        self.contains(&ChunkKey::from(&chunk.digest))
    }

    fn read<'a>(&'a self, chunk: &'a ChunkSpec, range: Range<u64>) -> BoxFuture<'a, Option<Bytes>> {
        Box::pin(async move {
            let bytes = self.get(&ChunkKey::from(&chunk.digest)).await?;
            let end = (range.end as usize).min(bytes.len());
            let start = (range.start as usize).min(end);
            Some(bytes.slice(start..end))
        })
    }

    fn put<'a>(
        &'a self,
        _chunk: &'a ChunkSpec,
        bytes: VerifiedChunk,
    ) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(self.put_verified(bytes))
    }

    fn evict(&self, chunks: Vec<ChunkSpec>) -> BoxFuture<'_, Evicted> {
        let mut keys: Vec<ChunkKey> = chunks.iter().map(|c| ChunkKey::from(&c.digest)).collect();
        keys.sort_unstable();
        keys.dedup();
        Box::pin(self.evict_keys(keys))
    }

    /// The memory tier is left alone: it has its own bound, and what it holds is by
    /// definition hot.
    fn prune_to(&self, target: u64) -> BoxFuture<'_, Evicted> {
        let disk = self.disk.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || disk.prune_to(target))
                .await
                .unwrap_or_default()
        })
    }

    fn present(&self, chunks: &[ChunkSpec]) -> (u64, u64) {
        let mut seen = std::collections::HashSet::new();
        let (mut count, mut bytes) = (0, 0);
        for chunk in chunks {
            let key = ChunkKey::from(&chunk.digest);
            if let Some(size) = self.disk.size_of(&key) {
                if seen.insert(key) {
                    count += 1;
                    bytes += size;
                }
            }
        }
        (count, bytes)
    }

    fn stats(&self) -> StoreStats {
        let c = &self.counters;
        let (disk_used_bytes, disk_entries) = self.disk.usage();
        let (memory_used_bytes, memory_entries) = self.memory.usage();
        StoreStats {
            memory_hits: c.memory_hits.load(Ordering::Relaxed),
            disk_hits: c.disk_hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            corrupt: c.corrupt.load(Ordering::Relaxed),
            disk_used_bytes,
            disk_entries,
            disk_budget_bytes: self.disk.budget(),
            memory_used_bytes,
            memory_entries,
            evicted: self.disk.evicted(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_through_both_tiers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = Bytes::from_static(b"chunk bytes");
        let key = ChunkKey::of(&data);
        {
            let cache = ChunkCache::open(dir.path().to_path_buf(), 1 << 20, 0).expect("open");
            assert_eq!(cache.get(&key).await, None);
            let verified =
                crate::chunk::verify(&ChunkDigest::of(&data), data.clone()).expect("verified");
            cache.put_verified(verified).await.expect("put");
            assert_eq!(cache.get(&key).await, Some(data.clone()));
            assert_eq!(cache.counters().memory_hits.load(Ordering::Relaxed), 1);
        }
        // A new cache (daemon restart) finds it on disk.
        let cache = ChunkCache::open(dir.path().to_path_buf(), 1 << 20, 0).expect("reopen");
        assert!(cache.contains(&key));
        assert_eq!(cache.get(&key).await, Some(data));
        assert_eq!(cache.counters().disk_hits.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn wrong_bytes_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = ChunkCache::open(dir.path().to_path_buf(), 1 << 20, 0).expect("open");
        // Only verified bytes can be stored: the type makes the check, once, before the store.
        let expected = ChunkDigest::of(b"expected");
        let err =
            crate::chunk::verify(&expected, Bytes::from_static(b"other")).expect_err("mismatch");
        assert_eq!(err.actual, ChunkDigest::of(b"other"));
        assert_eq!(cache.get(&ChunkKey::from(&expected)).await, None);
    }

    #[test]
    fn keys_accept_only_sha256_hex() {
        let hex = "a".repeat(64);
        assert!(ChunkKey::from_digest(&format!("sha256:{hex}")).is_some());
        assert!(ChunkKey::from_digest(&hex).is_some());
        assert!(ChunkKey::from_digest("sha256:../../etc/passwd").is_none());
        assert!(ChunkKey::from_digest(&"A".repeat(64)).is_none());
    }
}
