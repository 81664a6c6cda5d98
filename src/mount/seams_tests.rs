//! The format and store seams, shown from outside: a toy third format (uncompressed file
//! bytes with a JSON index at the end of the blob) and a toy store (a map in memory), both
//! written here in test code, are mounted over the FUSE crate through the same reader and
//! FUSE adapter the daemon uses, and files read through the kernel come out right.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use super::IndexSource;
use crate::cache::{CacheError, ChunkSink, ChunkStore, Evicted, Put, StoreStats, VerifyReport};
use crate::chunk::{BlobId, ChunkDigest, ChunkId, ChunkSpec, Verified};
use crate::format::{
    BoxFuture, ChunkDecoder, FormatError, Formats, LayerFormat, LayerHints, Opened, Probe, Resolved,
};
use crate::layer::{self, Fetches, LayerReader, LayerSource, LayerState};
use crate::metadata::{Entry, EntryKind, IndexBuilder};
use crate::prefetch::Readahead;
use crate::test_utils::FixtureBlob;

const MAGIC: &[u8; 8] = b"TOYLAYER";
/// The toy format cuts files into chunks of this many bytes.
const TOY_CHUNK: u64 = 1000;

/// The toy format: `files ‖ index JSON ‖ u64 LE index length ‖ MAGIC`, files stored raw.
struct ToyFormat;

#[derive(serde::Serialize, serde::Deserialize)]
struct ToyFile {
    name: String,
    offset: u64,
    size: u64,
    /// sha256 of each `TOY_CHUNK`-byte chunk.
    chunks: Vec<String>,
}

fn toy_blob(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut blob = Vec::new();
    let mut index = Vec::new();
    for (name, bytes) in files {
        index.push(ToyFile {
            name: (*name).to_owned(),
            offset: blob.len() as u64,
            size: bytes.len() as u64,
            chunks: bytes
                .chunks(TOY_CHUNK as usize)
                .map(|c| ChunkDigest::of(c).to_string())
                .collect(),
        });
        blob.extend_from_slice(bytes);
    }
    let json = serde_json::to_vec(&index).expect("json");
    blob.extend_from_slice(&json);
    blob.extend_from_slice(&(json.len() as u64).to_le_bytes());
    blob.extend_from_slice(MAGIC);
    blob
}

/// Raw bytes need no decoding: the extent is the chunk.
struct Raw;

impl ChunkDecoder for Raw {
    fn decode(&self, _chunk: &ChunkSpec, compressed: &[u8]) -> Result<Vec<u8>, FormatError> {
        Ok(compressed.to_vec())
    }
}

impl LayerFormat for ToyFormat {
    fn name(&self) -> &'static str {
        "toy"
    }

    fn accepts(&self, _hints: &LayerHints<'_>) -> Result<(), String> {
        Ok(())
    }

    fn resolve<'a>(
        &'a self,
        probe: &'a Probe<'a>,
    ) -> BoxFuture<'a, Result<Option<Resolved>, FormatError>> {
        Box::pin(async move {
            let tail = &probe.tail[probe.tail.len() - 16..];
            if &tail[8..] != MAGIC {
                return Ok(None);
            }
            let len = u64::from_le_bytes(tail[..8].try_into().expect("8 bytes"));
            let end = probe.blob_size - 16;
            let index = probe.blob.read_range(end - len..end).await?;
            Ok(Some(Resolved {
                params: serde_json::Value::Null,
                index: index.to_vec(),
            }))
        })
    }

    fn open(&self, resolved: &Resolved) -> Result<Opened, FormatError> {
        let files: Vec<ToyFile> = serde_json::from_slice(&resolved.index)?;
        let mut builder = IndexBuilder::new();
        let mut dir = Entry::new("dir", EntryKind::Dir);
        dir.mode = 0o750;
        builder.add(dir)?;
        for f in files {
            let mut entry = Entry::new(f.name, EntryKind::File);
            entry.mode = 0o644;
            entry.size = f.size;
            let mut at = 0;
            for digest in &f.chunks {
                let len = TOY_CHUNK.min(f.size - at);
                entry.chunks.push(ChunkSpec {
                    id: ChunkId(0),
                    file: Default::default(),
                    file_offset: at,
                    len,
                    blob_range: f.offset + at..f.offset + at + len,
                    inner_offset: 0,
                    within: 0,
                    digest: ChunkDigest::parse(digest)
                        .ok_or_else(|| crate::metadata::err(&entry.name, "bad chunk digest"))?,
                });
                at += len;
            }
            builder.add(entry)?;
        }
        Ok(Opened {
            index: builder.finish(),
            decoder: Arc::new(Raw),
            side_blob: None,
        })
    }
}

type ToyMap = Arc<Mutex<HashMap<(BlobId, ChunkDigest), Bytes>>>;

/// A store in a map, counting what it was asked; scoped by blob like any store must be.
#[derive(Default)]
struct ToyStore {
    chunks: ToyMap,
    puts: AtomicUsize,
}

/// Collects a chunk's bytes; the map takes them only on a commit with proof.
struct ToySink {
    chunks: ToyMap,
    key: (BlobId, ChunkDigest),
    bytes: Vec<u8>,
}

impl std::io::Write for ToySink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ChunkSink for ToySink {
    fn commit(self: Box<Self>, proof: Verified) -> Result<(), CacheError> {
        assert_eq!(
            *proof.digest(),
            self.key.1,
            "committed with the proof of its own bytes"
        );
        self.chunks
            .lock()
            .expect("lock")
            .insert(self.key, Bytes::from(self.bytes));
        Ok(())
    }
}

impl ChunkStore for ToyStore {
    fn is_ready(&self, blob: &BlobId, chunk: &ChunkSpec) -> bool {
        self.chunks
            .lock()
            .expect("lock")
            .contains_key(&(*blob, chunk.digest))
    }

    fn read<'a>(
        &'a self,
        blob: &'a BlobId,
        chunk: &'a ChunkSpec,
        range: std::ops::Range<u64>,
    ) -> BoxFuture<'a, Option<Bytes>> {
        let found = self
            .chunks
            .lock()
            .expect("lock")
            .get(&(*blob, chunk.digest))
            .cloned();
        Box::pin(async move {
            found.map(|b| {
                let end = (range.end as usize).min(b.len());
                b.slice((range.start as usize).min(end)..end)
            })
        })
    }

    fn put(&self, blob: &BlobId, chunk: &ChunkSpec) -> Result<Put, CacheError> {
        self.puts.fetch_add(1, Ordering::SeqCst);
        Ok(Put::Sink(Box::new(ToySink {
            chunks: self.chunks.clone(),
            key: (*blob, chunk.digest),
            bytes: Vec::new(),
        })))
    }

    fn verify(&self) -> BoxFuture<'_, VerifyReport> {
        Box::pin(async { VerifyReport::default() })
    }

    fn evict<'a>(&'a self, _blob: &'a BlobId, chunks: Vec<ChunkSpec>) -> BoxFuture<'a, Evicted> {
        let mut map = self.chunks.lock().expect("lock");
        let mut evicted = Evicted::default();
        for c in chunks {
            map.retain(|(_, digest), b| {
                let keep = *digest != c.digest;
                if !keep {
                    evicted += Evicted {
                        entries: 1,
                        bytes: b.len() as u64,
                    };
                }
                keep
            });
        }
        Box::pin(async move { evicted })
    }

    fn prune_to(&self, _target: u64) -> BoxFuture<'_, Evicted> {
        Box::pin(async { Evicted::default() })
    }

    fn present(&self, blob: &BlobId, chunks: &[ChunkSpec]) -> (u64, u64) {
        let map = self.chunks.lock().expect("lock");
        chunks
            .iter()
            .filter_map(|c| map.get(&(*blob, c.digest)))
            .fold((0, 0), |(n, b), x| (n + 1, b + x.len() as u64))
    }

    fn reserve(&self, _bytes: u64) -> Evicted {
        Evicted::default()
    }

    fn stats(&self) -> StoreStats {
        StoreStats::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_format_and_a_second_store_mount_through_the_seams() {
    if !std::path::Path::new("/dev/fuse").exists() || !nix::unistd::geteuid().is_root() {
        panic!("this test mounts FUSE: run it as root with /dev/fuse (CI does)");
    }
    let a: Vec<u8> = b"hello from a toy format\n".repeat(100);
    let b: Vec<u8> = (0..5000u32).flat_map(|i| i.to_le_bytes()).collect();
    let blob = Arc::new(FixtureBlob {
        blob: toy_blob(&[("dir/a.txt", a.clone()), ("dir/b.bin", b.clone())]),
        ..FixtureBlob::default()
    });

    // Resolve and open through the seam, as the daemon would: the formats list, the saved
    // state, `layer::open`.
    let formats = Formats::new(vec![Arc::new(ToyFormat)]);
    let (name, resolved) = crate::test_utils::resolve(&formats, &blob, &BTreeMap::new()).await;
    assert_eq!(name, "toy");
    let state = LayerState {
        source: LayerSource {
            reference: "example.invalid/toy:1".into(),
            digest: "sha256:toy".into(),
            toc_digest: None,
        },
        blob_size: blob.blob.len() as u64,
        format: name,
        resolved,
    };
    let opened = layer::open(&formats, &state).expect("opens");
    let index = Arc::new(opened.index);

    let store = Arc::new(ToyStore::default());
    let reader = Arc::new(LayerReader::new(
        blob.clone(),
        BlobId::new(&state.source.digest, None),
        opened.decoder,
        store.clone(),
        Arc::new(Fetches::new(2)),
    ));
    let source = Arc::new(IndexSource::new(
        index,
        reader,
        None,
        Readahead::new(0),
        tokio::runtime::Handle::current(),
        Arc::default(),
    ));
    let dir = tempfile::tempdir().expect("tempdir");
    let handle = lazysnap_fuse::mount(
        source,
        dir.path(),
        lazysnap_fuse::MountOptions::default(),
        tokio::runtime::Handle::current(),
    )
    .expect("mount");
    let root = dir.path().to_path_buf();
    let (got_a, got_b, mode) = tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::PermissionsExt;
        (
            std::fs::read(root.join("dir/a.txt")).expect("read a"),
            std::fs::read(root.join("dir/b.bin")).expect("read b"),
            std::fs::metadata(root.join("dir"))
                .expect("stat dir")
                .permissions()
                .mode(),
        )
    })
    .await
    .expect("join");
    handle.unmount().expect("unmount");
    assert_eq!(Sha256::digest(&got_a), Sha256::digest(&a), "a.txt");
    assert_eq!(Sha256::digest(&got_b), Sha256::digest(&b), "b.bin");
    assert_eq!(mode & 0o7777, 0o750);
    // Every chunk went through the toy store: 3 of a.txt, 20 of b.bin.
    assert_eq!(store.puts.load(Ordering::SeqCst), 3 + 20);
    assert!(blob.requests.load(Ordering::SeqCst) >= 2);
}
