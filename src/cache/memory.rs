//! The memory tier: a size-bounded moka cache of recently used chunks, so the chunks a
//! container touches again and again are not re-read and re-verified from disk. Entries are
//! keyed by blob and chunk: a chunk in memory for one blob is not there for another (the bytes
//! themselves are shared, reference-counted, when several blobs hold the same chunk).

use bytes::Bytes;
use moka::future::Cache;

use super::ChunkKey;
use crate::chunk::BlobId;

pub struct MemoryTier {
    cache: Cache<(BlobId, ChunkKey), Bytes>,
}

impl MemoryTier {
    pub fn new(max_bytes: u64) -> Self {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_key: &(BlobId, ChunkKey), value: &Bytes| {
                u32::try_from(value.len()).unwrap_or(u32::MAX)
            })
            .support_invalidation_closures()
            .build();
        MemoryTier { cache }
    }

    pub async fn get(&self, blob: &BlobId, key: &ChunkKey) -> Option<Bytes> {
        self.cache.get(&(*blob, key.clone())).await
    }

    pub fn contains(&self, blob: &BlobId, key: &ChunkKey) -> bool {
        self.cache.contains_key(&(*blob, key.clone()))
    }

    pub async fn insert(&self, blob: BlobId, key: ChunkKey, bytes: Bytes) {
        self.cache.insert((blob, key), bytes).await;
    }

    /// Drops `key` for every blob.
    pub fn remove_key(&self, key: &ChunkKey) {
        let key = key.clone();
        if let Err(e) = self.cache.invalidate_entries_if(move |(_, k), _| *k == key) {
            tracing::warn!(error = %e, "dropping a chunk from the memory tier failed");
        }
    }

    /// (bytes, entries) held now; moka's figures, which lag inserts by a little.
    pub fn usage(&self) -> (u64, u64) {
        (self.cache.weighted_size(), self.cache.entry_count())
    }
}
