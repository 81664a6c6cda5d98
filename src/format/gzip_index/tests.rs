//! The gzip-index format end to end without a registry: a real gzip tar (every kind of
//! entry, PAX xattrs, a whiteout, an opaque directory, files across spans) is indexed, the
//! document round-trips, the layer's tree is right, and every file read through its span
//! pieces and the span decoder comes out exactly as written.

use std::collections::BTreeMap;
use std::io::Write;

use super::build::build;
use super::file::{GzipIndex, TarKind};
use super::*;
use crate::metadata::NodeKind;

fn text(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        out.extend_from_slice(format!("line {} {}\n", x >> 40, x % 977).as_bytes());
    }
    out.truncate(len);
    out
}

/// A gzip tar with `files` and a few special entries; returns (blob, files).
fn layer() -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let files = vec![
        ("usr/big.txt".to_owned(), text(700 << 10, 1)),
        ("usr/small.txt".to_owned(), b"small\n".to_vec()),
        ("usr/empty".to_owned(), Vec::new()),
        ("usr/second.txt".to_owned(), text(300 << 10, 2)),
    ];
    let mut tar = tar::Builder::new(Vec::new());
    let mut dir = header();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    tar.append_data(&mut dir, "usr/", std::io::empty())
        .expect("dir");
    for (name, data) in &files {
        let mut h = header();
        h.set_mode(0o644);
        h.set_uid(1000);
        h.set_size(data.len() as u64);
        tar.append_data(&mut h, name, &data[..]).expect("file");
    }
    tar.append_pax_extensions([("SCHILY.xattr.user.k", b"v".as_slice())])
        .expect("pax");
    let mut h = header();
    h.set_mode(0o600);
    h.set_size(2);
    tar.append_data(&mut h, "usr/xattr", &b"x\n"[..])
        .expect("xattr file");
    let mut link = header();
    link.set_entry_type(tar::EntryType::Symlink);
    link.set_size(0);
    tar.append_link(&mut link, "usr/link", "small.txt")
        .expect("symlink");
    let mut hard = header();
    hard.set_entry_type(tar::EntryType::Link);
    hard.set_size(0);
    tar.append_link(&mut hard, "usr/hard", "usr/small.txt")
        .expect("hardlink");
    let mut wh = header();
    wh.set_size(0);
    wh.set_mode(0o644);
    tar.append_data(&mut wh, "usr/.wh.gone", std::io::empty())
        .expect("whiteout");
    tar.append_data(&mut wh, "opq/.wh..wh..opq", std::io::empty())
        .expect("opaque");
    let tar = tar.into_inner().expect("tar");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).expect("gzip");
    (gz.finish().expect("gzip"), files)
}

/// A header with every numeric field set, as real tar writers leave them.
fn header() -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_mode(0o644);
    h
}

const DIGEST: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// A layer's blob, its files (name, bytes) and its index.
type Indexed = (Vec<u8>, Vec<(String, Vec<u8>)>, GzipIndex);

fn indexed() -> Indexed {
    let (blob, files) = layer();
    let index = build(
        DIGEST,
        blob.len() as u64,
        &blob[..],
        128 << 10,
        &Limits::default(),
    )
    .expect("index");
    (blob, files, index)
}

#[test]
fn the_document_round_trips_and_knows_every_entry() {
    let (blob, _, index) = indexed();
    assert!(
        index.checkpoints.len() >= 5,
        "{} spans",
        index.checkpoints.len()
    );
    assert!(
        index.parts.len() > index.checkpoints.len(),
        "spans are cut into parts"
    );
    assert_eq!(index.compressed_size, blob.len() as u64);
    let encoded = index.encode().expect("encode");
    let decoded = GzipIndex::decode(&encoded, &Limits::default()).expect("decode");
    assert_eq!(decoded, index);
    let xattr = index
        .entries
        .iter()
        .find(|e| e.name == "usr/xattr")
        .expect("xattr entry");
    assert_eq!(xattr.xattrs, vec![("user.k".to_owned(), b"v".to_vec())]);
    assert!(index
        .entries
        .iter()
        .any(|e| e.kind == TarKind::HardLink("usr/small.txt".into())));
    // Windows compress like the data: the index is a small fraction of the layer.
    assert!(
        encoded.len() * 5 < blob.len(),
        "{} of {}",
        encoded.len(),
        blob.len()
    );
}

#[test]
fn every_file_reads_back_through_its_span_pieces() {
    let (blob, files, index) = indexed();
    let encoded = index.encode().expect("encode");
    let format = GzipIndexFormat::default();
    let resolved = Resolved {
        params: serde_json::json!({ "index_digest": format!("sha256:{}", hex::encode(Sha256::digest(&encoded))) }),
        index: encoded.clone(),
    };
    let opened = format.open(&resolved).expect("open");
    let layer = &opened.index;
    let mut spans_seen = std::collections::HashSet::new();
    for (name, data) in &files {
        let ino = layer.resolve(name).expect("file");
        let node = layer.node(ino).expect("node");
        assert_eq!(node.size, data.len() as u64, "{name}");
        let mut got = Vec::new();
        for piece in &node.chunks {
            let compressed = &blob[piece.blob_range.start as usize..piece.blob_range.end as usize];
            let unit = opened.decoder.decode(piece, compressed).expect("decode");
            assert_eq!(crate::chunk::ChunkDigest::of(&unit), piece.digest, "{name}");
            got.extend_from_slice(
                &unit[piece.within as usize..(piece.within + piece.len) as usize],
            );
            spans_seen.insert(piece.id);
        }
        assert_eq!(&got, data, "{name}");
    }
    assert!(spans_seen.len() > 3, "files cross spans");
    // Whiteout and opaque directory as overlayfs wants them; hard link shares the inode.
    let gone = layer
        .node(layer.resolve("usr/gone").expect("whiteout"))
        .expect("node");
    assert_eq!((gone.kind, gone.rdev), (NodeKind::CharDevice, (0, 0)));
    let opq = layer
        .node(layer.resolve("opq").expect("opq"))
        .expect("node");
    assert!(opq
        .xattrs
        .iter()
        .any(|(k, v)| &**k == "trusted.overlay.opaque" && &**v == b"y"));
    assert_eq!(layer.resolve("usr/hard"), layer.resolve("usr/small.txt"));
    let link = layer
        .node(layer.resolve("usr/link").expect("link"))
        .expect("node");
    assert_eq!(&*link.link_target, b"small.txt");
}

#[test]
fn an_index_that_is_not_the_saved_one_is_refused() {
    let (_, _, index) = indexed();
    let encoded = index.encode().expect("encode");
    let resolved = Resolved {
        params: serde_json::json!({ "index_digest": format!("sha256:{}", "1".repeat(64)) }),
        index: encoded,
    };
    let err = GzipIndexFormat::default()
        .open(&resolved)
        .expect_err("refused");
    assert!(
        matches!(err, FormatError::TocDigestMismatch { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn resolve_checks_the_index_is_for_this_layer() {
    let (blob, _, index) = indexed();
    let bytes = bytes::Bytes::from(index.encode().expect("encode"));
    let external = ExternalIndex {
        digest: format!("sha256:{}", hex::encode(Sha256::digest(&bytes))),
        bytes,
    };
    let annotations = BTreeMap::new();
    let source = crate::test_utils::FixtureBlob {
        blob: blob.clone(),
        ..Default::default()
    };
    let probe = |digest: &'static str, size: u64| Probe {
        hints: LayerHints {
            digest,
            annotations: &annotations,
            external: Some(&external),
        },
        blob_size: size,
        tail: bytes::Bytes::new(),
        tail_offset: size,
        blob: &source,
    };
    let format = GzipIndexFormat::default();
    let ok = format
        .resolve(&probe(DIGEST, blob.len() as u64))
        .await
        .expect("resolve");
    assert!(ok.is_some());
    let other = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    for p in [
        probe(other, blob.len() as u64),
        probe(DIGEST, blob.len() as u64 + 1),
    ] {
        let err = format.resolve(&p).await.expect_err("another layer");
        assert!(err.to_string().contains("does not fit"), "{err}");
    }
    assert!(format
        .accepts(&LayerHints {
            digest: DIGEST,
            annotations: &annotations,
            external: None
        })
        .is_err());
}

#[test]
fn a_window_that_does_not_chain_fails_the_span_before_it() {
    let (blob, _, mut index) = indexed();
    let encoded = index.encode().expect("encode");
    let good = GzipIndexFormat::default()
        .open(&Resolved {
            params: serde_json::json!({ "index_digest": format!("sha256:{}", hex::encode(Sha256::digest(&encoded))) }),
            index: encoded,
        })
        .expect("open");
    // Every span decodes, and chains, with the honest index.
    let spans: Vec<ChunkSpec> = good.index.chunks_in_blob_order();
    for c in &spans {
        let compressed = &blob[c.blob_range.start as usize..c.blob_range.end as usize];
        good.decoder.decode(c, compressed).expect("honest span");
    }
    // A forged window for point 2 is caught when span 1's last part is decoded (with the
    // rest of the span).
    let span1_end = index.checkpoints[2].out;
    let last_part = index
        .parts
        .iter()
        .position(|p| p.out_end == span1_end)
        .expect("a part ends at each resume point");
    index.checkpoints[2].window[100] ^= 0xff;
    let encoded = index.encode().expect("encode");
    let forged = GzipIndexFormat::default()
        .open(&Resolved {
            params: serde_json::json!({ "index_digest": format!("sha256:{}", hex::encode(Sha256::digest(&encoded))) }),
            index: encoded,
        })
        .expect("open");
    let span1 = forged
        .index
        .chunks_in_blob_order()
        .into_iter()
        .find(|c| c.id == ChunkId(last_part as u32))
        .expect("span 1's last part");
    let compressed = &blob[span1.blob_range.start as usize..span1.blob_range.end as usize];
    let err = forged
        .decoder
        .decode(&span1, compressed)
        .expect_err("forged window");
    assert!(
        err.to_string().contains("window of resume point 2"),
        "{err}"
    );
}

#[test]
fn a_read_fetches_its_span_only_up_to_the_end_of_its_part() {
    let (blob, _, index) = indexed();
    let encoded = index.encode().expect("encode");
    let opened = GzipIndexFormat::default()
        .open(&Resolved {
            params: serde_json::json!({ "index_digest": format!("sha256:{}", hex::encode(Sha256::digest(&encoded))) }),
            index: encoded,
        })
        .expect("open");
    let layout = opened.index.chunks_in_blob_order();
    let mut shorter = 0;
    for c in &layout {
        let j = c.id.0 as usize;
        let k = index.span_of_part(j).expect("span");
        let span_blob = index.span_blob(k).expect("span blob");
        assert_eq!(c.blob_range.start, span_blob.start, "from the resume point");
        assert!(c.blob_range.end <= span_blob.end, "never past the span");
        if c.blob_range.end < span_blob.end {
            shorter += 1;
        }
    }
    assert!(shorter > 0, "no piece stops short of its span's end");
    // The parts of one span decoded together are the parts decoded one by one.
    let parts_of = |k: usize| -> Vec<&ChunkSpec> {
        let mut seen = std::collections::HashSet::new();
        layout
            .iter()
            .filter(|c| index.span_of_part(c.id.0 as usize) == Some(k))
            .filter(|c| seen.insert(c.id))
            .collect()
    };
    let first_span = (0..index.checkpoints.len())
        .map(parts_of)
        .max_by_key(|p| p.len())
        .expect("spans");
    assert!(first_span.len() > 1, "a span has several parts");
    let longest = first_span
        .iter()
        .map(|c| c.blob_range.end)
        .max()
        .expect("parts");
    let start = first_span[0].blob_range.start as usize;
    let together = opened
        .decoder
        .decode_shared(&first_span, &blob[start..longest as usize])
        .expect("decode together");
    for (c, bytes) in first_span.iter().zip(&together) {
        let alone = opened
            .decoder
            .decode(c, &blob[start..c.blob_range.end as usize])
            .expect("decode alone");
        assert_eq!(&alone, bytes);
        assert_eq!(crate::chunk::ChunkDigest::of(bytes), c.digest);
    }
}

#[test]
fn parts_that_do_not_tile_the_stream_or_overreach_are_refused() {
    let (_, _, index) = indexed();
    let boundary = index.checkpoints[1].out;
    let at = index
        .parts
        .iter()
        .position(|p| p.out_end == boundary)
        .expect("a part ends at the resume point");
    type Tamper = Box<dyn Fn(&mut GzipIndex)>;
    let cases: Vec<(&str, Tamper)> = vec![
        ("out of order", Box::new(|ix| ix.parts.swap(0, 1))),
        (
            "a resume point inside a part",
            Box::new(move |ix| {
                ix.parts.remove(at);
            }),
        ),
        (
            "short of the layer's end",
            Box::new(|ix| {
                ix.parts.pop();
            }),
        ),
        (
            "more compressed bytes than the layer",
            Box::new(|ix| ix.parts[2].blob_end = ix.compressed_size + 1),
        ),
        (
            "more compressed bytes than the output can need",
            Box::new(|ix| {
                ix.compressed_size = u64::MAX / 2;
                ix.parts[0].blob_end = 1 << 40;
            }),
        ),
    ];
    for (what, tamper) in cases {
        let mut ix = index.clone();
        tamper(&mut ix);
        let encoded = ix.encode().expect("encode");
        let err = GzipIndex::decode(&encoded, &Limits::default()).expect_err(what);
        assert!(
            matches!(err, super::file::IndexFileError::Invalid(_)),
            "{what}: {err}"
        );
    }
}

/// Incompressible data is where deflate writers (zlib, pigz, Go's compress/flate) emit stored
/// blocks; their boundaries are resume points like any other block's.
#[test]
fn stored_blocks_are_cut_into_spans_too() {
    let data: Vec<u8> = (0..4u64 << 20)
        .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
        .collect();
    let (blob, _) =
        crate::test_utils::gzip_tar(&[("big.bin".to_owned(), data)], flate2::Compression::none());
    let index = build(
        DIGEST,
        blob.len() as u64,
        &blob[..],
        1 << 20,
        &Limits::default(),
    )
    .expect("index");
    assert!(
        index.checkpoints.len() >= 4,
        "{} spans for 4 MiB of stored blocks",
        index.checkpoints.len()
    );
}
