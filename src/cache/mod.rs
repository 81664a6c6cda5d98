//! The chunk cache: verified, decompressed chunk bytes kept on local disk and, for hot data, in
//! memory, shared by every layer and image that contains the same chunk.
//!
//! Entries are content-addressed by the sha256 of their bytes, so identical chunks of different
//! layers are stored once, and every read from disk is checked against its key: a torn write
//! (crash, full disk) or bit rot is detected, dropped and reported as a miss, never served. The
//! cache knows only keys and bytes; which chunk a file offset needs is the layer reader's job.

mod disk;
mod memory;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

pub use disk::{DiskStore, Evicted};
pub use memory::MemoryTier;

/// A cache key: the lowercase hex sha256 of an entry's bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkKey(String);

impl ChunkKey {
    /// Accepts `sha256:<hex>` or bare hex; anything else is not a content address.
    pub fn from_digest(digest: &str) -> Option<Self> {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        let valid = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        valid.then(|| ChunkKey(hex.to_owned()))
    }

    /// The key of `bytes`, for callers that must verify before trusting.
    pub fn of(bytes: &[u8]) -> Self {
        ChunkKey(hex::encode(Sha256::digest(bytes)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ChunkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.0)
    }
}

/// Errors of the cache. Reads never fail with these (a broken entry is a miss); writes report
/// them so the caller can log that the data will have to be fetched again.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("refusing to store chunk {key}: its bytes hash to {actual}")]
    DigestMismatch { key: ChunkKey, actual: ChunkKey },
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

/// Memory in front of disk.
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
    pub async fn put(&self, key: ChunkKey, bytes: Bytes) -> Result<(), CacheError> {
        let actual = ChunkKey::of(&bytes);
        if actual != key {
            return Err(CacheError::DigestMismatch { key, actual });
        }
        self.memory.insert(key.clone(), bytes.clone()).await;
        let disk = self.disk.clone();
        tokio::task::spawn_blocking(move || disk.put(&key, &bytes))
            .await
            .map_err(|e| CacheError::Io {
                action: "store chunk",
                path: PathBuf::new(),
                source: std::io::Error::other(e),
            })?
    }

    pub fn counters(&self) -> &CacheCounters {
        &self.counters
    }

    /// Drops `keys` from both tiers.
    pub async fn evict(&self, keys: impl IntoIterator<Item = ChunkKey>) -> Evicted {
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

    /// Evicts least recently used disk entries down to `target` bytes. The memory tier is
    /// left alone: it has its own bound, and what it holds is by definition hot.
    pub async fn prune_to(&self, target: u64) -> Evicted {
        let disk = self.disk.clone();
        tokio::task::spawn_blocking(move || disk.prune_to(target))
            .await
            .unwrap_or_default()
    }

    /// (bytes, entries) in the memory tier.
    pub fn memory_usage(&self) -> (u64, u64) {
        self.memory.usage()
    }

    pub fn disk(&self) -> &DiskStore {
        &self.disk
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
            cache.put(key.clone(), data.clone()).await.expect("put");
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
        let key = ChunkKey::of(b"expected");
        let err = cache
            .put(key.clone(), Bytes::from_static(b"other"))
            .await
            .expect_err("mismatch");
        assert!(matches!(err, CacheError::DigestMismatch { .. }));
        assert_eq!(cache.get(&key).await, None);
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
