//! Format tests on real layers written by Debian's `ctr-remote image convert`
//! (`tests/fixtures/make-fixtures.sh`), plus damaged copies of them.

use super::*;

const MAXT: u64 = 64 << 20;

struct Fixture {
    blob: Vec<u8>,
    toc_digest: String,
}

fn fixture(name: &str) -> Fixture {
    let (blob, annotations) = crate::test_utils::fixture(name);
    let toc_digest = annotations
        .get(TOC_DIGEST_ANNOTATION)
        .expect("toc digest annotation")
        .clone();
    Fixture { blob, toc_digest }
}

fn tail(blob: &[u8]) -> &[u8] {
    &blob[blob.len().saturating_sub(MAX_FOOTER as usize)..]
}

fn load(f: &Fixture) -> (TocLocation, Toc) {
    let size = f.blob.len() as u64;
    let location = locate_toc(tail(&f.blob), size, MAXT).expect("footer");
    let compressed = &f.blob[location.offset as usize..(location.offset + location.len) as usize];
    let json = read_toc(&location, compressed, Some(&f.toc_digest), MAXT).expect("toc verifies");
    (location, parse_toc(&json, 500_000).expect("toc parses"))
}

/// Decompresses every chunk of every file and checks chunk and file digests.
fn verify_all_chunks(f: &Fixture, location: &TocLocation, toc: &Toc) -> usize {
    let mut offsets: Vec<u64> = toc
        .entries
        .iter()
        .map(|e| e.offset)
        .filter(|o| *o > 0)
        .collect();
    offsets.push(location.offset);
    offsets.sort_unstable();
    let mut files = std::collections::BTreeMap::<String, Vec<u8>>::new();
    let mut sizes = std::collections::BTreeMap::<String, (u64, String)>::new();
    for e in &toc.entries {
        if e.kind == "reg" {
            sizes.insert(e.name.clone(), (e.size, e.digest.clone()));
        }
        if (e.kind == "reg" && e.size > 0) || e.kind == "chunk" {
            let end = *offsets
                .iter()
                .find(|o| **o > e.offset)
                .expect("next offset");
            let size = sizes[&e.name].0;
            let len = if e.chunk_size > 0 {
                e.chunk_size
            } else {
                size - e.chunk_offset
            };
            let bytes = decompress_chunk(
                location.compression,
                &f.blob[e.offset as usize..end as usize],
                e.inner_offset,
                len,
            )
            .expect("chunk decompresses");
            assert_eq!(
                format!("sha256:{}", hex::encode(Sha256::digest(&bytes))),
                e.chunk_digest,
                "chunk of {} at {}",
                e.name,
                e.chunk_offset
            );
            files
                .entry(e.name.clone())
                .or_default()
                .extend_from_slice(&bytes);
        }
    }
    for (name, data) in &files {
        let (size, digest) = &sizes[name];
        assert_eq!(data.len() as u64, *size, "{name} size");
        assert_eq!(
            &format!("sha256:{}", hex::encode(Sha256::digest(data))),
            digest,
            "{name}"
        );
    }
    files.len()
}

#[test]
fn estargz_layer_from_ctr_remote() {
    let f = fixture("estargz");
    let (location, toc) = load(&f);
    assert_eq!(location.compression, Compression::Gzip);
    assert!(toc
        .entries
        .iter()
        .any(|e| e.name == "dir/multi-chunk.txt" && e.kind == "reg"));
    assert!(
        toc.entries.iter().filter(|e| e.kind == "chunk").count() >= 3,
        "the multi-chunk file has several chunks"
    );
    assert!(verify_all_chunks(&f, &location, &toc) >= 3);
}

#[test]
fn zstd_chunked_layer_from_ctr_remote() {
    let f = fixture("zstdchunked");
    let (location, toc) = load(&f);
    assert_eq!(location.compression, Compression::Zstd);
    assert!(verify_all_chunks(&f, &location, &toc) >= 3);
}

#[test]
fn toc_digest_mismatch_is_refused() {
    let f = fixture("estargz");
    let location = locate_toc(tail(&f.blob), f.blob.len() as u64, MAXT).expect("footer");
    let compressed = &f.blob[location.offset as usize..(location.offset + location.len) as usize];
    let wrong = format!("sha256:{}", "0".repeat(64));
    let err = read_toc(&location, compressed, Some(&wrong), MAXT).expect_err("wrong digest");
    assert!(
        matches!(err, FormatError::TocDigestMismatch { .. }),
        "{err}"
    );
}

#[test]
fn damaged_footers_are_refused() {
    let f = fixture("estargz");
    // truncated: the last bytes of the footer are gone
    let cut = &f.blob[..f.blob.len() - 10];
    assert!(matches!(
        locate_toc(tail(cut), cut.len() as u64, MAXT),
        Err(FormatError::NoFooter(_))
    ));
    // a plain gzip layer has no footer
    let mut plain = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut plain, &[0u8; 4096]).expect("gzip");
    let plain = plain.finish().expect("gzip");
    assert!(matches!(
        locate_toc(tail(&plain), plain.len() as u64, MAXT),
        Err(FormatError::NoFooter(_))
    ));
    // a footer pointing past the end of the blob
    let mut lying = f.blob.clone();
    let n = lying.len();
    lying[n - 51 + 16..n - 51 + 32].copy_from_slice(b"00000000ffffffff");
    let err = locate_toc(tail(&lying), n as u64, MAXT).expect_err("offset past the end");
    assert!(
        matches!(
            err,
            FormatError::TocOutOfBounds { .. } | FormatError::NoFooter(_)
        ),
        "{err}"
    );
}

#[test]
fn corrupt_chunk_bytes_fail_to_decompress_or_verify() {
    let f = fixture("estargz");
    let (location, toc) = load(&f);
    let entry = toc
        .entries
        .iter()
        .find(|e| e.name == "dir/multi-chunk.txt")
        .expect("entry");
    let mut blob = f.blob.clone();
    blob[entry.offset as usize + 20] ^= 0xff;
    let result = decompress_chunk(
        location.compression,
        &blob[entry.offset as usize..],
        0,
        entry.chunk_size,
    );
    let digest_ok = result
        .map(|b| format!("sha256:{}", hex::encode(Sha256::digest(b))) == entry.chunk_digest)
        .unwrap_or(false);
    assert!(
        !digest_ok,
        "a flipped byte must not produce the chunk's bytes"
    );
}

/// A probe whose tail is the blob's last `tail_len` bytes.
async fn resolve_with_tail(
    name: &str,
    tail_len: usize,
    expected: Option<&str>,
) -> (usize, Result<Option<Resolved>, FormatError>) {
    let (blob, mut annotations) = crate::test_utils::fixture(name);
    if let Some(expected) = expected {
        annotations.insert(TOC_DIGEST_ANNOTATION.to_owned(), expected.to_owned());
    }
    let size = blob.len() as u64;
    let source = crate::test_utils::FixtureBlob {
        blob: blob.clone(),
        requests: Default::default(),
        corrupt: false,
        fail: false,
        delay: std::time::Duration::ZERO,
    };
    let tail = bytes::Bytes::copy_from_slice(&blob[blob.len().saturating_sub(tail_len)..]);
    let probe = Probe {
        hints: LayerHints {
            digest: "sha256:fixture",
            annotations: &annotations,
            external: None,
        },
        blob_size: size,
        tail_offset: size - tail.len() as u64,
        tail,
        blob: &source,
    };
    let format: &dyn LayerFormat = if name == "estargz" {
        &Estargz::default()
    } else {
        &ZstdChunked::default()
    };
    let result = format.resolve(&probe).await;
    (
        source.requests.load(std::sync::atomic::Ordering::SeqCst),
        result,
    )
}

#[tokio::test]
async fn a_toc_within_the_suffix_needs_no_request() {
    for name in ["estargz", "zstdchunked"] {
        let whole = fixture(name).blob.len();
        let (requests, found) = resolve_with_tail(name, whole, None).await;
        assert_eq!(requests, 0, "{name}: the TOC was in the suffix");
        let from_suffix = found.expect("resolves").expect("claims the layer");
        let (requests, found) = resolve_with_tail(name, MAX_FOOTER as usize, None).await;
        assert_eq!(requests, 1, "{name}: only the footer was in the tail");
        assert_eq!(found.expect("resolves").expect("claims"), from_suffix);
        // Part of the TOC in the suffix: fetched whole.
        let location = locate_toc(tail(&fixture(name).blob), whole as u64, MAXT).expect("footer");
        let partial = (whole as u64 - location.offset - 1) as usize;
        let (requests, found) = resolve_with_tail(name, partial, None).await;
        assert_eq!(requests, 1, "{name}: the TOC began before the suffix");
        assert_eq!(found.expect("resolves").expect("claims"), from_suffix);
    }
}

#[tokio::test]
async fn a_toc_in_the_suffix_is_verified_against_the_label() {
    let whole = fixture("estargz").blob.len();
    let wrong = format!("sha256:{}", "0".repeat(64));
    let (requests, found) = resolve_with_tail("estargz", whole, Some(&wrong)).await;
    assert_eq!(requests, 0);
    assert!(
        matches!(found, Err(FormatError::TocDigestMismatch { .. })),
        "{found:?}"
    );
}

#[test]
fn the_index_range_is_the_footers_toc_for_its_own_format_only() {
    let limits = Limits::default();
    for (name, own, other) in [
        (
            "estargz",
            &Estargz { limits } as &dyn LayerFormat,
            &ZstdChunked { limits } as &dyn LayerFormat,
        ),
        (
            "zstdchunked",
            &ZstdChunked { limits } as &dyn LayerFormat,
            &Estargz { limits } as &dyn LayerFormat,
        ),
    ] {
        let f = fixture(name);
        let size = f.blob.len() as u64;
        let location = locate_toc(tail(&f.blob), size, MAXT).expect("footer");
        assert_eq!(
            own.index_range(tail(&f.blob), size),
            Some(location.offset..location.offset + location.len),
            "{name}"
        );
        assert_eq!(other.index_range(tail(&f.blob), size), None, "{name}");
        assert_eq!(own.index_range(&[0u8; 64], size), None, "{name}: no footer");
    }
}

#[tokio::test]
async fn unpinned_resolution_of_a_whole_toc_is_the_pinned_one() {
    for name in ["estargz", "zstdchunked"] {
        let f = fixture(name);
        let size = f.blob.len() as u64;
        let (_, pinned) = resolve_with_tail(name, f.blob.len(), None).await;
        let pinned = pinned.expect("resolves").expect("claims the layer");
        let (format, other): (&dyn LayerFormat, &dyn LayerFormat) = if name == "estargz" {
            (&Estargz::default(), &ZstdChunked::default())
        } else {
            (&ZstdChunked::default(), &Estargz::default())
        };
        assert_eq!(
            format.resolve_unpinned(&f.blob, size),
            Some(pinned),
            "{name}: same parameters and index as when pinned"
        );
        assert_eq!(
            other.resolve_unpinned(&f.blob, size),
            None,
            "{name}: not the other format's"
        );
        assert_eq!(
            format.resolve_unpinned(tail(&f.blob), size),
            None,
            "{name}: the TOC is not in the footer alone"
        );
    }
}
