//! The disk tier: one file per chunk at `chunks/<2 hex>/<64 hex>`, written into `wip/` and
//! renamed into place, so a reader sees a whole file or none. Files are not fsynced: a torn file
//! left by a crash fails verification on its next read and is dropped, which costs one refetch
//! and nothing else.

use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use super::{CacheError, ChunkKey};

/// What a disk lookup found.
pub enum Found {
    Valid(Bytes),
    /// The file existed but did not match its key; it has been removed.
    Corrupt,
}

#[derive(Clone)]
pub struct DiskStore {
    inner: Arc<Dirs>,
}

struct Dirs {
    chunks: PathBuf,
    wip: PathBuf,
}

impl DiskStore {
    /// Opens the store under `dir`, discarding unfinished writes of an earlier run.
    pub fn open(dir: PathBuf) -> Result<Self, CacheError> {
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
        Ok(DiskStore {
            inner: Arc::new(Dirs { chunks, wip }),
        })
    }

    fn path(&self, key: &ChunkKey) -> PathBuf {
        let hex = key.as_str();
        self.inner.chunks.join(&hex[..2]).join(hex)
    }

    pub fn contains(&self, key: &ChunkKey) -> bool {
        self.path(key).exists()
    }

    /// Reads and verifies `key`; a file that fails verification is removed.
    pub fn get(&self, key: &ChunkKey) -> Option<Found> {
        let path = self.path(key);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(chunk = %key, path = %path.display(), error = %e, "cache read failed; treating as a miss");
                return None;
            }
        };
        if ChunkKey::of(&bytes) != *key {
            tracing::warn!(chunk = %key, path = %path.display(), "cached chunk is corrupt; removing it");
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "removing corrupt chunk failed");
            }
            return Some(Found::Corrupt);
        }
        Some(Found::Valid(Bytes::from(bytes)))
    }

    /// Stores `bytes` under `key` (already verified by the caller).
    pub fn put(&self, key: &ChunkKey, bytes: &[u8]) -> Result<(), CacheError> {
        let target = self.path(key);
        if target.exists() {
            return Ok(());
        }
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
        Ok(())
    }

    /// Total bytes and number of chunk files on disk.
    pub fn usage(&self) -> std::io::Result<(u64, u64)> {
        let mut bytes = 0;
        let mut files = 0;
        for shard in std::fs::read_dir(&self.inner.chunks)? {
            for entry in std::fs::read_dir(shard?.path())? {
                bytes += entry?.metadata()?.len();
                files += 1;
            }
        }
        Ok((bytes, files))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_and_torn_files_are_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = DiskStore::open(dir.path().to_path_buf()).expect("open");
        let data = b"some chunk".to_vec();
        let key = ChunkKey::of(&data);
        store.put(&key, &data).expect("put");
        // Simulate a torn write: the file holds only part of the chunk.
        std::fs::write(store.path(&key), &data[..4]).expect("truncate");
        assert!(matches!(store.get(&key), Some(Found::Corrupt)));
        assert!(store.get(&key).is_none(), "corrupt file removed");
        store.put(&key, &data).expect("put again");
        assert!(matches!(store.get(&key), Some(Found::Valid(b)) if b == data));
    }

    #[test]
    fn unfinished_writes_are_cleared_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        DiskStore::open(dir.path().to_path_buf()).expect("open");
        std::fs::write(dir.path().join("wip").join("left-over"), b"x").expect("write");
        let store = DiskStore::open(dir.path().to_path_buf()).expect("reopen");
        assert_eq!(
            std::fs::read_dir(&store.inner.wip).expect("list").count(),
            0
        );
        assert_eq!(store.usage().expect("usage"), (0, 0));
    }
}
