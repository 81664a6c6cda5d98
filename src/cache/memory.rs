//! The memory tier: a size-bounded moka cache of recently used chunks, so the chunks a
//! container touches again and again are not re-read and re-verified from disk.

use bytes::Bytes;
use moka::future::Cache;

use super::ChunkKey;

pub struct MemoryTier {
    cache: Cache<ChunkKey, Bytes>,
}

impl MemoryTier {
    pub fn new(max_bytes: u64) -> Self {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_key: &ChunkKey, value: &Bytes| {
                u32::try_from(value.len()).unwrap_or(u32::MAX)
            })
            .build();
        MemoryTier { cache }
    }

    pub async fn get(&self, key: &ChunkKey) -> Option<Bytes> {
        self.cache.get(key).await
    }

    pub fn contains(&self, key: &ChunkKey) -> bool {
        self.cache.contains_key(key)
    }

    pub async fn insert(&self, key: ChunkKey, bytes: Bytes) {
        self.cache.insert(key, bytes).await;
    }

    pub async fn remove(&self, key: &ChunkKey) {
        self.cache.invalidate(key).await;
    }

    /// (bytes, entries) held now; moka's figures, which lag inserts by a little.
    pub fn usage(&self) -> (u64, u64) {
        (self.cache.weighted_size(), self.cache.entry_count())
    }
}
