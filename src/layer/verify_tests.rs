//! The whole-blob check on a real gzip-index layer read through a layer reader: an honest
//! blob is verified and cached by the one walk; a blob whose every span matches the index but
//! whose bytes are not the layer's (its gzip header changed) is found bad, and a bad layer
//! serves nothing, cached chunks included.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use super::*;
use crate::cache::{ChunkStore, LocalStore};
use crate::chunk::{BlobId, ChunkDigest};
use crate::format::gzip_index::{build::build, GzipIndexFormat};
use crate::format::{LayerFormat, Opened, Resolved};
use crate::layer::Fetches;
use crate::metadata::{LayerIndex, Limits};
use crate::test_utils::{gzip_tar, FixtureBlob};

const SPAN: u64 = 1 << 20;

/// Incompressible bytes, so the blob spans several walk windows.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A layer's blob, its digest and its files (name, bytes).
type Layer = (Vec<u8>, String, Vec<(String, Vec<u8>)>);

/// A gzip tar of a few files, `size` bytes in all.
fn layer(size: usize) -> Layer {
    let files: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| (format!("f{i}"), noise(size / 4, i)))
        .chain([("small".to_owned(), b"small\n".to_vec())])
        .collect();
    let (blob, digest) = gzip_tar(&files, flate2::Compression::fast());
    (blob, digest, files)
}

fn open(blob: &[u8], digest: &str) -> Opened {
    let index = build(digest, blob.len() as u64, blob, SPAN, &Limits::default()).expect("index");
    // Version 2, the windows inside: these tests count the requests for the layer alone.
    let encoded = index.encode_v2().expect("encode");
    GzipIndexFormat::default()
        .open(&Resolved {
            params: serde_json::json!({
                "index_digest": format!("sha256:{}", hex::encode(Sha256::digest(&encoded))),
            }),
            index: encoded,
        })
        .expect("open")
}

struct Setup {
    _dir: tempfile::TempDir,
    index: LayerIndex,
    layout: Vec<ChunkSpec>,
    blob: Arc<FixtureBlob>,
    store: Arc<LocalStore>,
    reader: Arc<LayerReader>,
    verdict: Arc<VerdictCell>,
}

/// A reader of the layer indexed from `indexed`, whose registry serves `served`.
fn setup(indexed: &[u8], digest: &str, served: Vec<u8>) -> Setup {
    let opened = open(indexed, digest);
    let blob = Arc::new(FixtureBlob {
        blob: served,
        requests: AtomicUsize::new(0),
        ..FixtureBlob::default()
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(LocalStore::open(dir.path(), 0).expect("store"));
    let verdict = Arc::new(VerdictCell::new(true, None));
    let reader = Arc::new(
        LayerReader::new(
            blob.clone(),
            BlobId::new(digest, None),
            opened.decoder,
            store.clone(),
            Arc::new(Fetches::new(2)),
        )
        .with_verdict(verdict.clone()),
    );
    let layout = opened.index.chunks_in_blob_order();
    Setup {
        _dir: dir,
        index: opened.index,
        layout,
        blob,
        store,
        reader,
        verdict,
    }
}

fn read_file(s: &Setup, name: &str) -> Result<bytes::Bytes, ReadError> {
    let ino = s.index.resolve(name).expect("file");
    let size = s.index.node(ino).expect("node").size;
    futures_executor(s.reader.read(s.index.chunks_for(ino, 0, size), 0..size))
}

fn futures_executor<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

#[test]
fn an_honest_blob_is_verified_and_cached_by_one_walk() {
    let (blob, digest, files) = layer(10 << 20);
    assert!(blob.len() as u64 > 2 * WINDOW, "several windows");
    let s = setup(&blob, &digest, blob.clone());
    // A container read something first: those spans are cached, and the walk fetches their
    // compressed bytes again only to hash them.
    assert_eq!(read_file(&s, "f1").expect("read").as_ref(), &files[1].1[..]);
    let requests_before = s.blob.requests.load(Ordering::SeqCst);
    let fetched_before = s.reader.counters().fetched_bytes.load(Ordering::Relaxed);
    let verdict = futures_executor(walk(
        &s.reader,
        &s.layout,
        blob.len() as u64,
        &digest,
        Priority::Background,
    ))
    .expect("walk");
    assert_eq!(verdict, Verdict::Verified);
    let walked = s.reader.counters().fetched_bytes.load(Ordering::Relaxed) - fetched_before;
    let windows = (s.blob.requests.load(Ordering::SeqCst) - requests_before) as u64;
    assert!(
        windows <= (blob.len() as u64).div_ceil(WINDOW),
        "{windows} requests for {} bytes",
        blob.len()
    );
    assert!(
        walked >= blob.len() as u64 && walked <= blob.len() as u64 + 2 * windows,
        "every byte fetched once by the walk, but the byte or two spans share: {walked} of {}",
        blob.len()
    );
    assert!(
        s.reader.is_cached(&s.layout),
        "the walk stored what was missing"
    );
    let requests = s.blob.requests.load(Ordering::SeqCst);
    for (name, data) in &files {
        assert_eq!(read_file(&s, name).expect("read").as_ref(), &data[..]);
    }
    assert_eq!(
        s.blob.requests.load(Ordering::SeqCst),
        requests,
        "all from the store"
    );
}

#[test]
fn a_blob_consistent_with_the_index_but_not_the_layer_is_bad_and_serves_nothing() {
    let (blob, digest, files) = layer(6 << 20);
    // The gzip header's MTIME: no span covers it, so every span still matches the index.
    let mut tampered = blob.clone();
    tampered[4] ^= 0x5a;
    let got = format!("sha256:{}", hex::encode(Sha256::digest(&tampered)));
    let s = setup(&blob, &digest, tampered);
    assert_eq!(
        read_file(&s, "small").expect("spans verify").as_ref(),
        b"small\n"
    );
    let verdict = futures_executor(walk(
        &s.reader,
        &s.layout,
        blob.len() as u64,
        &digest,
        Priority::Background,
    ))
    .expect("walk");
    assert_eq!(
        verdict,
        Verdict::Bad {
            expected: digest.clone(),
            got
        }
    );
    assert!(
        s.reader.is_cached(&s.layout),
        "every span matched its digest"
    );
    assert_eq!(s.verdict.label(), "pending", "the walk only reports");
    assert!(s.verdict.set(verdict));
    assert!(!s.verdict.set(Verdict::Verified), "a verdict stands");
    assert_eq!(s.verdict.label(), "bad");
    for (name, _) in &files {
        let err = read_file(&s, name).expect_err("a bad layer serves nothing");
        assert!(matches!(err, ReadError::LayerBad { .. }), "{err}");
    }
    let (ino, chunks) = {
        let ino = s.index.resolve("small").expect("file");
        (ino, s.index.chunks_for(ino, 0, 6).to_vec())
    };
    assert!(s.index.node(ino).is_some());
    assert!(
        s.reader.backing_file(&chunks).is_none(),
        "no passthrough around the refusal"
    );
    let err = futures_executor(s.reader.warm(&chunks, Priority::Prefetch)).expect_err("no warm");
    assert!(matches!(err, ReadError::LayerBad { .. }), "{err}");
    // What the mount does with a bad layer: its chunks leave the store.
    futures_executor(s.store.evict(s.reader.blob_id(), s.layout.clone()));
    assert!(!s.reader.is_cached(&s.layout));
}

#[test]
fn digests_the_walk_cannot_check_are_an_error_not_a_verdict() {
    let (blob, digest, _) = layer(1 << 20);
    let s = setup(&blob, &digest, blob.clone());
    let err = futures_executor(walk(
        &s.reader,
        &s.layout,
        blob.len() as u64,
        "sha512:00",
        Priority::Background,
    ))
    .expect_err("sha512");
    assert!(matches!(err, VerifyError::Algorithm(_)), "{err}");
    let failing = FixtureBlob {
        blob: blob.clone(),
        fail: true,
        ..FixtureBlob::default()
    };
    let opened = open(&blob, &digest);
    let dir = tempfile::tempdir().expect("tempdir");
    let reader = LayerReader::new(
        Arc::new(failing),
        BlobId::new(&digest, None),
        opened.decoder,
        Arc::new(LocalStore::open(dir.path(), 0).expect("store")),
        Arc::new(Fetches::new(2)),
    );
    let err = futures_executor(walk(
        &reader,
        &s.layout,
        blob.len() as u64,
        &digest,
        Priority::Background,
    ))
    .expect_err("a registry that fails");
    assert!(matches!(err, VerifyError::Fetch { .. }), "{err}");
}

fn spec(start: u64, end: u64) -> ChunkSpec {
    ChunkSpec {
        id: crate::chunk::ChunkId(0),
        file: Default::default(),
        file_offset: 0,
        len: 1,
        blob_range: start..end,
        inner_offset: 0,
        within: 0,
        digest: ChunkDigest::of(b""),
    }
}

#[test]
fn steps_take_in_the_chunks_they_cut_unless_huge() {
    let w = WINDOW;
    let size = 10 * w;
    // Chunks sharing a byte with the one before, as gzip-index spans do.
    let layout = vec![
        spec(0, 10),
        spec(9, w + 100),
        spec(w + 99, w + 300),
        spec(w + 299, 2 * w),
    ];
    assert_eq!(window(&layout, 0, size), 0..w + 100);
    assert_eq!(
        within(&layout, &(0..w + 100)).len(),
        2,
        "every chunk starting in the window lies in the widened one"
    );
    assert_eq!(
        window(&layout, w + 100, size),
        w + 99..2 * w + 100,
        "the next step reaches back for the chunk it would cut"
    );
    assert_eq!(within(&layout, &(w + 99..2 * w + 100)).len(), 2);
    let huge = vec![spec(0, 10), spec(10, 5 * w)];
    assert_eq!(window(&huge, 0, size), 0..w, "never past two windows");
    assert_eq!(
        within(&huge, &(0..w)).len(),
        1,
        "the huge chunk is left out"
    );
    assert_eq!(
        window(&huge, 3 * w, size).start,
        3 * w,
        "nor back more than a window"
    );
    assert_eq!(window(&layout, 9 * w + 5, size), 9 * w + 5..size);
    assert_eq!(window(&[], 0, 7), 0..7);
}
