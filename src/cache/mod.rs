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
//!
//! **Scope.** Bytes are shared, proof is not: a chunk is served to a layer only if that
//! layer's own blob ([`BlobId`]) was verified to hold it. A layer's index only *claims* its
//! chunks' digests, and a file's digest is public knowledge (SBOMs list them), so serving any
//! cached chunk whose digest an index names would let one image read another's files. A blob
//! that names a chunk cached for other blobs fetches it once from itself and verifies it; the
//! chunk is still stored once, and its record gains the blob (see `disk`).

mod disk;
mod memory;

use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

pub use disk::{DiskStore, Evicted, Stored};
pub use memory::MemoryTier;

use crate::chunk::{BlobId, ChunkDigest, ChunkSpec, VerifiedChunk};
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

/// Where verified chunk bytes live. Readiness is explicit: a chunk is ready for a blob once
/// `put` has stored it for that blob, and `read` of a ready chunk needs no network; a store may
/// still lose a ready chunk (eviction, damage found on read), which `read` reports as `None`.
/// Every question about a chunk's bytes names the blob asking: a chunk put for one blob is not
/// ready for another (see the module's "Scope").
pub trait ChunkStore: Send + Sync {
    /// Whether the chunk's bytes are here for `blob`, without reading them.
    fn is_ready(&self, blob: &BlobId, chunk: &ChunkSpec) -> bool;
    /// Bytes `range` (relative to the chunk's start) of a chunk ready for `blob`; `None` if it
    /// is not.
    fn read<'a>(
        &'a self,
        blob: &'a BlobId,
        chunk: &'a ChunkSpec,
        range: Range<u64>,
    ) -> BoxFuture<'a, Option<Bytes>>;
    /// Stores a chunk's bytes, verified as fetched from `blob`, and makes it ready for `blob`.
    fn put<'a>(
        &'a self,
        blob: &'a BlobId,
        chunk: &'a ChunkSpec,
        bytes: VerifiedChunk,
    ) -> BoxFuture<'a, Result<(), CacheError>>;
    /// Drops these chunks, for every blob.
    fn evict(&self, chunks: Vec<ChunkSpec>) -> BoxFuture<'_, Evicted>;
    /// Evicts least recently used data down to `target` bytes (reserved bytes included).
    fn prune_to(&self, target: u64) -> BoxFuture<'_, Evicted>;
    /// How many of `chunks` are here for `blob`, and their bytes.
    fn present(&self, blob: &BlobId, chunks: &[ChunkSpec]) -> (u64, u64);
    /// Sets the bytes kept next to the store that count against its disk budget but that it
    /// cannot evict (saved layer state), evicting chunks to make room for them. Blocking (it
    /// may unlink files), but brief.
    fn reserve(&self, bytes: u64) -> Evicted;
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

    /// The bytes stored under `key` for `blob`, from memory or (verified) from disk.
    pub async fn get(&self, blob: &BlobId, key: &ChunkKey) -> Option<Bytes> {
        if let Some(bytes) = self.memory.get(blob, key).await {
            self.counters.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Some(bytes);
        }
        let disk = self.disk.clone();
        let (owned, b) = (key.clone(), *blob);
        let found = tokio::task::spawn_blocking(move || disk.get_for(&owned, &b))
            .await
            .ok()
            .flatten();
        match found {
            Some(disk::Found::Valid(bytes)) => {
                self.counters.disk_hits.fetch_add(1, Ordering::Relaxed);
                self.memory.insert(*blob, key.clone(), bytes.clone()).await;
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

    /// Whether `key` is cached for `blob`, without reading or verifying it.
    pub fn contains(&self, blob: &BlobId, key: &ChunkKey) -> bool {
        self.memory.contains(blob, key) || self.disk.contains_for(key, blob)
    }

    /// Stores bytes verified as fetched from `blob`. The memory tier always takes them, so a
    /// failing disk (full, read only) degrades to fetching again later but never fails the
    /// read that brought them.
    pub async fn put_verified(
        &self,
        blob: &BlobId,
        chunk: VerifiedChunk,
    ) -> Result<(), CacheError> {
        let digest = *chunk.digest();
        let key = ChunkKey::from(&digest);
        let bytes = chunk.into_bytes();
        self.memory.insert(*blob, key.clone(), bytes.clone()).await;
        let disk = self.disk.clone();
        let blob = *blob;
        tokio::task::spawn_blocking(move || disk.put(&key, &bytes, &blob))
            .await
            .map_err(|source| CacheError::Task { digest, source })?
            .map(drop)
    }

    pub fn counters(&self) -> &CacheCounters {
        &self.counters
    }

    /// Drops `keys` from both tiers.
    pub async fn evict_keys(&self, keys: impl IntoIterator<Item = ChunkKey>) -> Evicted {
        let mut total = Evicted::default();
        for key in keys {
            self.memory.remove_key(&key);
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
    fn is_ready(&self, blob: &BlobId, chunk: &ChunkSpec) -> bool {
        self.contains(blob, &ChunkKey::from(&chunk.digest))
    }

    fn read<'a>(
        &'a self,
        blob: &'a BlobId,
        chunk: &'a ChunkSpec,
        range: Range<u64>,
    ) -> BoxFuture<'a, Option<Bytes>> {
        Box::pin(async move {
            let bytes = self.get(blob, &ChunkKey::from(&chunk.digest)).await?;
            let end = (range.end as usize).min(bytes.len());
            let start = (range.start as usize).min(end);
            Some(bytes.slice(start..end))
        })
    }

    fn put<'a>(
        &'a self,
        blob: &'a BlobId,
        _chunk: &'a ChunkSpec,
        bytes: VerifiedChunk,
    ) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(self.put_verified(blob, bytes))
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

    fn present(&self, blob: &BlobId, chunks: &[ChunkSpec]) -> (u64, u64) {
        let mut seen = std::collections::HashSet::new();
        let (mut count, mut bytes) = (0, 0);
        for chunk in chunks {
            let key = ChunkKey::from(&chunk.digest);
            if let Some(size) = self.disk.size_for(&key, blob) {
                if seen.insert(key) {
                    count += 1;
                    bytes += size;
                }
            }
        }
        (count, bytes)
    }

    fn reserve(&self, bytes: u64) -> Evicted {
        self.disk.reserve(bytes)
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

    fn blob(n: u8) -> BlobId {
        BlobId::new(&format!("sha256:{}", hex::encode([n; 32])), None)
    }

    #[tokio::test]
    async fn round_trip_through_both_tiers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = Bytes::from_static(b"chunk bytes");
        let key = ChunkKey::of(&data);
        let a = blob(1);
        {
            let cache = ChunkCache::open(dir.path().to_path_buf(), 1 << 20, 0).expect("open");
            assert_eq!(cache.get(&a, &key).await, None);
            let verified =
                crate::chunk::verify(&ChunkDigest::of(&data), data.clone()).expect("verified");
            cache.put_verified(&a, verified).await.expect("put");
            assert_eq!(cache.get(&a, &key).await, Some(data.clone()));
            assert_eq!(cache.counters().memory_hits.load(Ordering::Relaxed), 1);
        }
        // A new cache (daemon restart) finds it on disk.
        let cache = ChunkCache::open(dir.path().to_path_buf(), 1 << 20, 0).expect("reopen");
        assert!(cache.contains(&a, &key));
        assert_eq!(cache.get(&a, &key).await, Some(data));
        assert_eq!(cache.counters().disk_hits.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_chunk_is_served_only_to_blobs_it_was_verified_from() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = Bytes::from_static(b"a private file");
        let digest = ChunkDigest::of(&data);
        let key = ChunkKey::from(&digest);
        let (victim, attacker, other) = (blob(1), blob(2), blob(3));
        let spec = ChunkSpec {
            id: crate::chunk::ChunkId(0),
            file_offset: 0,
            len: data.len() as u64,
            blob_range: 0..1,
            inner_offset: 0,
            within: 0,
            digest,
        };
        {
            let cache = ChunkCache::open(dir.path().to_path_buf(), 1 << 20, 0).expect("open");
            let verified = crate::chunk::verify(&digest, data.clone()).expect("verified");
            cache.put(&victim, &spec, verified).await.expect("put");
            assert!(cache.is_ready(&victim, &spec));
            assert!(
                !cache.is_ready(&attacker, &spec),
                "not proven for the attacker"
            );
            assert_eq!(cache.read(&attacker, &spec, 0..4).await, None);
            assert_eq!(
                cache.present(&attacker, std::slice::from_ref(&spec)),
                (0, 0)
            );
            // Another blob that really holds the bytes proves it by fetching: then it reads,
            // and the chunk is still one file.
            let verified = crate::chunk::verify(&digest, data.clone()).expect("verified");
            cache.put(&other, &spec, verified).await.expect("put");
            assert_eq!(
                cache.read(&other, &spec, 0..9).await.as_deref(),
                Some(&b"a private"[..])
            );
            assert_eq!(cache.stats().disk_entries, 1);
        }
        // Scopes survive a restart, and stay scopes.
        let cache = ChunkCache::open(dir.path().to_path_buf(), 1 << 20, 0).expect("reopen");
        assert!(cache.is_ready(&victim, &spec) && cache.is_ready(&other, &spec));
        assert!(!cache.is_ready(&attacker, &spec));
        assert_eq!(cache.get(&attacker, &key).await, None);
        assert_eq!(cache.get(&other, &key).await, Some(data));
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
        assert_eq!(cache.get(&blob(1), &ChunkKey::from(&expected)).await, None);
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
