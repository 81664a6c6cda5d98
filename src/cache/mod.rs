//! Where verified chunk bytes live, behind one seam: the layer reader sees only
//! [`ChunkStore`] — is a chunk ready, read a range of it, stream a chunk in, evict — so the
//! representation can change without the reader changing (the seams test mounts a toy store).
//!
//! The implementation, [`FileStore`] (`files`), keeps decompressed file contents: one sparse
//! file per file of a layer with each chunk's bytes at its file offset, so a read is a `pread`
//! of exactly the range asked for, and a complete file can be handed to the kernel (FUSE
//! passthrough). Bytes are verified once, as they stream in; nothing is hashed on the read
//! path. `lazysnap cache verify` re-hashes the store on demand.
//!
//! There is no memory tier: the page cache holds hot data better than a copy in the daemon
//! could, and the daemon's memory stays bounded by its configuration.
//!
//! **Scope.** Bytes are scoped to the blob ([`BlobId`]) they were verified from: a layer's
//! index only *claims* its chunks' digests, and a file's digest is public knowledge (SBOMs list
//! them), so serving bytes cached for another blob would let one image read another's files.
//! The same layer used by several images is one blob and shares everything.

mod files;

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use lazysnap_fuse::ReadBuf;

pub use files::{ChunkWriter, FileStore, Slot};

use crate::chunk::{BlobId, ChunkDigest, ChunkSpec, Verified};
use crate::BoxFuture;

/// Errors of the store. Reads never fail with these (a broken entry is a miss); writes report
/// them so the caller can serve the bytes from memory and log that they were not stored.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("chunk {digest}: what was written is not the verified chunk")]
    Mismatch { digest: ChunkDigest },
    #[error("chunk {digest}: its file was evicted while it was written")]
    Evicted { digest: ChunkDigest },
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

/// What `cache verify` found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VerifyReport {
    /// Chunks checked, and the bytes of those that matched.
    pub chunks: u64,
    pub bytes: u64,
    pub corrupt_chunks: u64,
    /// Files dropped because a chunk of theirs did not match.
    pub dropped_files: u64,
    pub dropped_bytes: u64,
}

/// Hit and miss counters of the store.
#[derive(Debug, Default)]
pub struct CacheCounters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Chunks `cache verify` found damaged (their files are dropped).
    pub corrupt: AtomicU64,
}

/// The figures of a store, for `lazysnap cache stats` and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StoreStats {
    pub hits: u64,
    pub misses: u64,
    pub corrupt: u64,
    pub disk_used_bytes: u64,
    /// Files in the store, and chunks present in them.
    pub disk_files: u64,
    pub disk_chunks: u64,
    /// 0 = no budget.
    pub disk_budget_bytes: u64,
    pub evicted: Evicted,
}

/// A place to stream one chunk's bytes into; `commit` makes the chunk ready once they were
/// verified.
pub trait ChunkSink: std::io::Write + Send {
    fn commit(self: Box<Self>, proof: Verified) -> Result<(), CacheError>;
}

impl ChunkSink for ChunkWriter {
    fn commit(self: Box<Self>, proof: Verified) -> Result<(), CacheError> {
        ChunkWriter::commit(*self, proof)
    }
}

/// What a store offers for a chunk about to be stored.
pub enum Put {
    /// It is ready already (another reader of the same blob stored it).
    Ready,
    /// It cannot be stored now (being written by someone else, larger than the budget): the
    /// caller keeps it in memory for its readers.
    Unavailable,
    /// Stream it here.
    Sink(Box<dyn ChunkSink>),
}

/// Where verified chunk bytes live. Readiness is explicit: a chunk is ready for a blob once
/// its bytes, fetched from that blob, were verified into the store, and `read` of a ready
/// chunk needs no network; a store may still lose a ready chunk (eviction, damage), which
/// `read` reports as `None`. Every question names the blob asking (see the module's "Scope").
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
    /// Bytes `range` of a file (offsets in the file) whose chunks covering it are `chunks`
    /// (consecutive, in file order), if every one is ready for `blob`: one read for all of
    /// them, where [`read`](Self::read) would take one per chunk and a copy to join them.
    /// `None` if any is not ready (or the store cannot), and the caller goes chunk by chunk.
    fn read_span<'a>(
        &'a self,
        _blob: &'a BlobId,
        _chunks: &'a [ChunkSpec],
        _range: Range<u64>,
    ) -> BoxFuture<'a, Option<Bytes>> {
        Box::pin(async { None })
    }
    /// [`read_span`](Self::read_span) into `buf` (as its answer), blocking: for a local-read
    /// thread, whose buffer it is. `None` as `read_span`.
    fn read_span_into(
        &self,
        _blob: &BlobId,
        _chunks: &[ChunkSpec],
        _range: Range<u64>,
        _buf: &mut ReadBuf,
    ) -> Option<()> {
        None
    }
    /// Where to stream a chunk fetched from `blob`. Blocking (it may make room on disk):
    /// called from the task that decodes.
    fn put(&self, blob: &BlobId, chunk: &ChunkSpec) -> Result<Put, CacheError>;
    /// Drops what holds these chunks of `blob`.
    fn evict<'a>(&'a self, blob: &'a BlobId, chunks: Vec<ChunkSpec>) -> BoxFuture<'a, Evicted>;
    /// Evicts least recently used data down to `target` bytes (reserved bytes included).
    fn prune_to(&self, target: u64) -> BoxFuture<'_, Evicted>;
    /// How many of `chunks` are here for `blob`, and their bytes.
    fn present(&self, blob: &BlobId, chunks: &[ChunkSpec]) -> (u64, u64);
    /// Sets the bytes kept next to the store that count against its disk budget but that it
    /// cannot evict (saved layer state), evicting to make room for them. Blocking, but brief.
    fn reserve(&self, bytes: u64) -> Evicted;
    fn stats(&self) -> StoreStats;
    /// A local file holding exactly the contents of the file whose chunks (in file order) are
    /// `chunks`, if the store has it complete: for kernel passthrough. Quick: no I/O but an
    /// open.
    fn backing_file(&self, _blob: &BlobId, _chunks: &[ChunkSpec]) -> Option<File> {
        None
    }
    /// Brings the ready ones of `chunks` of `blob` into memory ahead of their reads, in
    /// order, at most `max_bytes`; returns the bytes asked for. A hint: it may do nothing.
    /// Blocking, but it does not wait for the reads it starts.
    fn preload(&self, _blob: &BlobId, _chunks: &[ChunkSpec], _max_bytes: u64) -> u64 {
        0
    }
    /// Re-hashes what the store holds and drops what no longer matches.
    fn verify(&self) -> BoxFuture<'_, VerifyReport>;
    /// Makes what is ready durable now (at shutdown). Blocking.
    fn flush(&self) {}
}

/// The daemon's store: [`FileStore`] with its counters, as a [`ChunkStore`].
#[derive(Clone)]
pub struct LocalStore {
    files: FileStore,
    counters: Arc<CacheCounters>,
}

impl LocalStore {
    fn count_hits(&self, chunks: &[ChunkSpec]) {
        self.counters
            .hits
            .fetch_add(chunks.len() as u64, Ordering::Relaxed);
    }

    /// `dir` holds the store, kept within `disk_budget` bytes (0 = no limit).
    pub fn open(dir: &Path, disk_budget: u64) -> Result<Self, CacheError> {
        Ok(LocalStore {
            files: FileStore::open(dir, disk_budget)?,
            counters: Arc::default(),
        })
    }

    pub fn files(&self) -> &FileStore {
        &self.files
    }
}

impl ChunkStore for LocalStore {
    fn is_ready(&self, blob: &BlobId, chunk: &ChunkSpec) -> bool {
        self.files.is_ready(blob, chunk)
    }

    fn read<'a>(
        &'a self,
        blob: &'a BlobId,
        chunk: &'a ChunkSpec,
        range: Range<u64>,
    ) -> BoxFuture<'a, Option<Bytes>> {
        Box::pin(async move {
            if !self.files.is_ready(blob, chunk) {
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            let (files, blob, chunk) = (self.files.clone(), *blob, chunk.clone());
            // A pread may wait on the disk: off the async workers.
            let got = tokio::task::spawn_blocking(move || files.read(&blob, &chunk, range))
                .await
                .ok()
                .flatten();
            // A ready chunk that could not be read was evicted meanwhile or its file is
            // damaged (dropped, and logged by the store): either way a miss.
            let counter = if got.is_some() {
                &self.counters.hits
            } else {
                &self.counters.misses
            };
            counter.fetch_add(1, Ordering::Relaxed);
            got
        })
    }

    fn read_span<'a>(
        &'a self,
        blob: &'a BlobId,
        chunks: &'a [ChunkSpec],
        range: Range<u64>,
    ) -> BoxFuture<'a, Option<Bytes>> {
        Box::pin(async move {
            if chunks.is_empty() || !chunks.iter().all(|c| self.files.is_ready(blob, c)) {
                return None;
            }
            let (store, blob, owned) = (self.clone(), *blob, chunks.to_vec());
            // A pread may wait on the disk: off the async workers.
            let got =
                tokio::task::spawn_blocking(move || store.files.read_span(&blob, &owned, range))
                    .await
                    .ok()
                    .flatten();
            if got.is_some() {
                self.count_hits(chunks);
            }
            got
        })
    }

    fn read_span_into(
        &self,
        blob: &BlobId,
        chunks: &[ChunkSpec],
        range: Range<u64>,
        buf: &mut ReadBuf,
    ) -> Option<()> {
        self.files.read_span_into(blob, chunks, range, buf)?;
        self.count_hits(chunks);
        Some(())
    }

    fn put(&self, blob: &BlobId, chunk: &ChunkSpec) -> Result<Put, CacheError> {
        Ok(match self.files.begin(blob, chunk)? {
            Slot::Ready => Put::Ready,
            Slot::Unavailable => Put::Unavailable,
            Slot::Write(writer) => Put::Sink(Box::new(writer)),
        })
    }

    fn evict<'a>(&'a self, blob: &'a BlobId, chunks: Vec<ChunkSpec>) -> BoxFuture<'a, Evicted> {
        let (files, blob) = (self.files.clone(), *blob);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || files.evict(&blob, &chunks))
                .await
                .unwrap_or_default()
        })
    }

    fn prune_to(&self, target: u64) -> BoxFuture<'_, Evicted> {
        let files = self.files.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || files.prune_to(target))
                .await
                .unwrap_or_default()
        })
    }

    fn present(&self, blob: &BlobId, chunks: &[ChunkSpec]) -> (u64, u64) {
        self.files.present(blob, chunks)
    }

    fn reserve(&self, bytes: u64) -> Evicted {
        self.files.reserve(bytes)
    }

    fn stats(&self) -> StoreStats {
        let c = &self.counters;
        let (disk_used_bytes, disk_files, disk_chunks) = self.files.usage();
        StoreStats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            corrupt: c.corrupt.load(Ordering::Relaxed),
            disk_used_bytes,
            disk_files,
            disk_chunks,
            disk_budget_bytes: self.files.budget(),
            evicted: self.files.evicted(),
        }
    }

    fn backing_file(&self, blob: &BlobId, chunks: &[ChunkSpec]) -> Option<File> {
        self.files.complete_file(blob, chunks)
    }

    fn preload(&self, blob: &BlobId, chunks: &[ChunkSpec], max_bytes: u64) -> u64 {
        self.files.preload(blob, chunks, max_bytes)
    }

    fn flush(&self) {
        self.files.flush();
    }

    fn verify(&self) -> BoxFuture<'_, VerifyReport> {
        let files = self.files.clone();
        Box::pin(async move {
            let report = tokio::task::spawn_blocking(move || files.verify())
                .await
                .unwrap_or_default();
            self.counters
                .corrupt
                .fetch_add(report.corrupt_chunks, Ordering::Relaxed);
            report
        })
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;
    use crate::chunk::{ChunkId, FileKey, Hashing};

    fn blob(n: u8) -> BlobId {
        BlobId::new(&format!("sha256:{}", hex::encode([n; 32])), None)
    }

    /// A file of `parts.len()` chunks with these contents, as an index would describe it.
    fn file(parts: &[&[u8]]) -> Vec<ChunkSpec> {
        let mut at = 0;
        let mut chunks: Vec<ChunkSpec> = parts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let c = ChunkSpec {
                    id: ChunkId(i as u32),
                    file: FileKey::default(),
                    file_offset: at,
                    len: p.len() as u64,
                    blob_range: at..at + p.len() as u64,
                    inner_offset: 0,
                    within: 0,
                    digest: ChunkDigest::of(p),
                };
                at += p.len() as u64;
                c
            })
            .collect();
        let key = FileKey::of(at, &chunks);
        for c in &mut chunks {
            c.file = key;
        }
        chunks
    }

    /// Streams `bytes` into the store for `blob` the way the reader does.
    fn store(s: &LocalStore, blob: &BlobId, chunk: &ChunkSpec, bytes: &[u8]) -> Result<(), String> {
        match s.put(blob, chunk).map_err(|e| e.to_string())? {
            Put::Sink(sink) => {
                let mut h = Hashing::new(sink);
                h.write_all(bytes).map_err(|e| e.to_string())?;
                let (sink, proof) = h.verify(&chunk.digest).map_err(|e| e.to_string())?;
                sink.commit(proof).map_err(|e| e.to_string())
            }
            Put::Ready => Ok(()),
            Put::Unavailable => Err("unavailable".into()),
        }
    }

    #[tokio::test]
    async fn chunks_land_at_their_file_offsets_and_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let parts: [&[u8]; 3] = [b"first chunk ", b"second ", b"third"];
        let chunks = file(&parts);
        let a = blob(1);
        {
            let s = LocalStore::open(dir.path(), 0).expect("open");
            assert_eq!(s.read(&a, &chunks[1], 0..3).await, None);
            store(&s, &a, &chunks[2], parts[2]).expect("put third");
            assert!(s.backing_file(&a, &chunks).is_none(), "not complete yet");
            assert_eq!(s.read_span(&a, &chunks[1..], 14..20).await, None);
            store(&s, &a, &chunks[0], parts[0]).expect("put first");
            store(&s, &a, &chunks[1], parts[1]).expect("put second");
            assert_eq!(
                s.read(&a, &chunks[1], 2..6).await.as_deref(),
                Some(&b"cond"[..])
            );
            // Across chunks, in one read.
            assert_eq!(
                s.read_span(&a, &chunks[1..], 14..21).await.as_deref(),
                Some(&b"cond th"[..])
            );
            assert_eq!(
                s.read_span(&a, &chunks[1..], 2..21).await,
                None,
                "a range the chunks do not cover"
            );
            assert_eq!(s.read_span(&blob(2), &chunks, 0..5).await, None);
            let mut whole = String::new();
            std::io::Read::read_to_string(
                &mut s.backing_file(&a, &chunks).expect("complete"),
                &mut whole,
            )
            .expect("read");
            assert_eq!(whole, "first chunk second third");
            s.files().flush();
        }
        let s = LocalStore::open(dir.path(), 0).expect("reopen");
        assert!(chunks.iter().all(|c| s.is_ready(&a, c)));
        assert_eq!(
            s.read(&a, &chunks[2], 0..5).await.as_deref(),
            Some(&b"third"[..])
        );
        assert_eq!(s.stats().disk_chunks, 3);
        assert_eq!(s.stats().disk_files, 1);
    }

    #[test]
    fn preload_asks_for_ready_chunks_of_the_blob_in_order_within_its_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let parts: [&[u8]; 3] = [b"first chunk ", b"second ", b"third"];
        let chunks = file(&parts);
        let a = blob(1);
        let s = LocalStore::open(dir.path(), 0).expect("open");
        store(&s, &a, &chunks[0], parts[0]).expect("put first");
        store(&s, &a, &chunks[2], parts[2]).expect("put third");
        // The second is not here: skipped, not asked of the disk.
        assert_eq!(s.preload(&a, &chunks, u64::MAX), 12 + 5);
        // Another blob's bytes are not this blob's.
        assert_eq!(s.preload(&blob(2), &chunks, u64::MAX), 0);
        // The limit stops at the first chunk that would pass it, in the order given.
        assert_eq!(s.preload(&a, &chunks, 12), 12);
        assert_eq!(s.preload(&a, &chunks[2..], 4), 0);
        assert_eq!(s.preload(&a, &chunks, 0), 0);
    }

    #[tokio::test]
    async fn bytes_are_served_only_to_the_blob_they_came_from() {
        let dir = tempfile::tempdir().expect("tempdir");
        let parts: [&[u8]; 1] = [b"a private file"];
        let chunks = file(&parts);
        let s = LocalStore::open(dir.path(), 0).expect("open");
        store(&s, &blob(1), &chunks[0], parts[0]).expect("put");
        assert!(s.is_ready(&blob(1), &chunks[0]));
        assert!(
            !s.is_ready(&blob(2), &chunks[0]),
            "not proven for another blob"
        );
        assert_eq!(s.read(&blob(2), &chunks[0], 0..4).await, None);
        assert_eq!(s.present(&blob(2), &chunks), (0, 0));
        assert!(s.backing_file(&blob(2), &chunks).is_none());
    }

    #[tokio::test]
    async fn wrong_bytes_never_become_ready() {
        let dir = tempfile::tempdir().expect("tempdir");
        let parts: [&[u8]; 1] = [b"expected"];
        let chunks = file(&parts);
        let s = LocalStore::open(dir.path(), 0).expect("open");
        let err = store(&s, &blob(1), &chunks[0], b"other!!!").expect_err("mismatch");
        assert!(err.contains("hashes to"), "{err}");
        assert!(!s.is_ready(&blob(1), &chunks[0]));
        // The region is free again for an honest writer.
        store(&s, &blob(1), &chunks[0], parts[0]).expect("put");
        assert!(s.is_ready(&blob(1), &chunks[0]));
    }

    #[tokio::test]
    async fn a_crash_before_the_flush_loses_readiness_not_correctness() {
        let dir = tempfile::tempdir().expect("tempdir");
        let parts: [&[u8]; 2] = [b"durable ", b"not yet"];
        let chunks = file(&parts);
        let a = blob(1);
        let s = LocalStore::open(dir.path(), 0).expect("open");
        store(&s, &a, &chunks[0], parts[0]).expect("put");
        s.files().flush();
        // Simulate a crash: the second chunk's bytes are written, its record line is not, and
        // a torn line sits at the end of the record.
        let record = walk(dir.path())
            .into_iter()
            .find(|p| p.extension().is_some_and(|e| e == "map"))
            .expect("record");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&record)
            .expect("open record");
        f.write_all(b"8 7 ").expect("torn line");
        f.write_all(b"8 7 0000\n").expect("garbage line");
        drop(f);
        let reopened = LocalStore::open(dir.path(), 0).expect("reopen");
        assert!(reopened.is_ready(&a, &chunks[0]));
        assert!(!reopened.is_ready(&a, &chunks[1]), "no valid line for it");
        drop(s);
    }

    #[tokio::test]
    async fn verify_drops_a_damaged_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let parts: [&[u8]; 2] = [b"good bytes", b"more bytes"];
        let chunks = file(&parts);
        let a = blob(1);
        let s = LocalStore::open(dir.path(), 0).expect("open");
        for (c, p) in chunks.iter().zip(parts) {
            store(&s, &a, c, p).expect("put");
        }
        let clean = s.verify().await;
        assert_eq!(
            (clean.chunks, clean.corrupt_chunks, clean.dropped_files),
            (2, 0, 0)
        );
        let data = walk(dir.path())
            .into_iter()
            .find(|p| p.extension().is_none())
            .expect("data file");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&data)
            .expect("open");
        std::os::unix::fs::FileExt::write_all_at(&f, b"X", 12).expect("damage");
        let report = s.verify().await;
        assert_eq!((report.corrupt_chunks, report.dropped_files), (1, 1));
        assert!(!s.is_ready(&a, &chunks[0]) && !s.is_ready(&a, &chunks[1]));
        assert!(!data.exists());
    }

    #[tokio::test]
    async fn eviction_while_a_chunk_is_written_fails_its_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let parts: [&[u8]; 1] = [b"racing"];
        let chunks = file(&parts);
        let a = blob(1);
        let s = LocalStore::open(dir.path(), 0).expect("open");
        let Put::Sink(sink) = s.put(&a, &chunks[0]).expect("put") else {
            panic!("expected a sink");
        };
        // A second writer of the same region is turned away.
        assert!(matches!(
            s.put(&a, &chunks[0]).expect("put"),
            Put::Unavailable
        ));
        let mut h = Hashing::new(sink);
        h.write_all(parts[0]).expect("write");
        s.evict(&a, chunks.clone()).await;
        let (sink, proof) = h.verify(&chunks[0].digest).expect("verified");
        assert!(matches!(
            sink.commit(proof),
            Err(CacheError::Evicted { .. })
        ));
        assert!(!s.is_ready(&a, &chunks[0]));
    }

    #[tokio::test]
    async fn the_budget_evicts_least_recently_used_files_before_writing() {
        const BUDGET: u64 = 60_000;
        let big = vec![7u8; 8000];
        let files: Vec<Vec<ChunkSpec>> = (0..8u64)
            .map(|i| {
                let mut c = file(&[&big]);
                // Distinct files with the same bytes.
                c[0].blob_range = i * 9000..i * 9000 + 8000;
                let key = FileKey::of(8000, &c);
                c[0].file = key;
                c
            })
            .collect();
        let a = blob(1);
        let dir = tempfile::tempdir().expect("tempdir");
        let s = LocalStore::open(dir.path(), BUDGET).expect("open");
        for f in &files {
            store(&s, &a, &f[0], &big).expect("put");
            assert!(s.stats().disk_used_bytes <= BUDGET, "{:?}", s.stats());
        }
        assert!(!s.is_ready(&a, &files[0][0]), "the oldest went");
        assert!(s.is_ready(&a, &files[7][0]));
        assert!(s.stats().evicted.entries >= 1);
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p);
                }
            }
        }
        out
    }
}
