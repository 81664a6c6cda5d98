//! The gzip-index format end to end without a registry: a real gzip tar (every kind of
//! entry, PAX xattrs, a whiteout, an opaque directory, files across spans) is indexed, the
//! document round-trips, the layer's tree is right, and every file read through its span
//! pieces and the span decoder comes out exactly as written.

use std::collections::BTreeMap;
use std::io::Write;

use super::build::{build, build_with, plan_cuts, TracedRange};
use super::file::{GzipIndex, TarKind};
use super::zran::Cuts;
use super::*;
use crate::metadata::NodeKind;
use crate::test_utils::FixtureBlob;

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

/// A version 3 document opened as the daemon opens it.
fn open_doc(doc: Vec<u8>) -> Opened {
    GzipIndexFormat::default()
        .open(&Resolved {
            params: serde_json::json!({ "index_digest": format!("sha256:{}", hex::encode(Sha256::digest(&doc))) }),
            index: doc,
        })
        .expect("open")
}

/// The index as `lazysnap index` pushes it (version 3), opened, and its windows blob as a
/// registry serves it.
fn open_v3(index: &GzipIndex) -> (Opened, FixtureBlob) {
    let encoded = index.encode().expect("encode");
    (
        open_doc(encoded.index),
        FixtureBlob {
            blob: encoded.windows,
            ..FixtureBlob::default()
        },
    )
}

/// Decodes `chunk` as the reader does: its span's window fetched first, and held meanwhile.
async fn decode_fetching(
    opened: &Opened,
    windows: &dyn BlobSource,
    chunk: &ChunkSpec,
    compressed: &[u8],
) -> Result<Vec<u8>, FormatError> {
    let _held = opened
        .decoder
        .fetch_extra(std::slice::from_ref(chunk), Some(windows))
        .await?;
    opened.decoder.decode(chunk, compressed)
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
    // Version 2 holds the windows itself; version 3 names them in a blob of their own.
    let v2 = index.encode_v2().expect("encode");
    let mut whole = index.clone();
    for p in &mut whole.checkpoints {
        p.used = None;
    }
    assert_eq!(
        GzipIndex::decode(&v2, &Limits::default()).expect("v2"),
        whole
    );
    let v3 = index.encode().expect("encode");
    let mut decoded = GzipIndex::decode(&v3.index, &Limits::default()).expect("decode");
    assert!(decoded.checkpoints.iter().all(|p| p.window.is_empty()));
    assert_eq!(decoded.window_refs.len(), index.checkpoints.len());
    let named = decoded.windows.clone().expect("a windows blob");
    assert_eq!(
        named.digest,
        format!("sha256:{}", hex::encode(Sha256::digest(&v3.windows)))
    );
    assert_eq!(named.size, v3.windows.len() as u64);
    assert!(
        v3.index.len() * 4 < v2.len(),
        "without its windows the document is a fraction: {} of {}",
        v3.index.len(),
        v2.len()
    );
    decoded.with_windows(&v3.windows).expect("windows");
    // The windows blob keeps the bytes of each window its span reads, and no others.
    let mut sparse = index.clone();
    let (mut kept, mut all) = (0, 0);
    for p in sparse
        .checkpoints
        .iter_mut()
        .filter(|p| !p.window.is_empty())
    {
        let used = p
            .used
            .clone()
            .unwrap_or_else(|| vec![(0, p.window.len() as u16)]);
        let mut window = vec![0; p.window.len()];
        for (start, len) in &used {
            let range = usize::from(*start)..usize::from(*start) + usize::from(*len);
            window[range.clone()].copy_from_slice(&p.window[range]);
            kept += usize::from(*len);
        }
        all += p.window.len();
        p.window = window;
        p.used = Some(used);
    }
    assert_eq!(decoded, sparse);
    assert!(kept * 2 < all, "windows keep {kept} of {all} bytes");
    let encoded = v2;
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

#[tokio::test]
async fn every_file_reads_back_through_its_span_pieces() {
    let (blob, files, index) = indexed();
    let (opened, spans_seen) = read_back(&blob, &files, &index).await;
    let layer = &opened.index;
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

/// Reads every file of `files` back through `index`'s pieces, checking each piece's digest
/// and the bytes; returns the opened index and the chunks read.
async fn read_back(
    blob: &[u8],
    files: &[(String, Vec<u8>)],
    index: &GzipIndex,
) -> (Opened, std::collections::HashSet<crate::chunk::ChunkId>) {
    let (opened, windows) = open_v3(index);
    let layer = &opened.index;
    let mut spans_seen = std::collections::HashSet::new();
    for (name, data) in files {
        let ino = layer.resolve(name).expect("file");
        let node = layer.node(ino).expect("node");
        assert_eq!(node.size, data.len() as u64, "{name}");
        let mut got = Vec::new();
        for piece in &node.chunks {
            let compressed = &blob[piece.blob_range.start as usize..piece.blob_range.end as usize];
            let unit = decode_fetching(&opened, &windows, piece, compressed)
                .await
                .expect("decode");
            assert_eq!(crate::chunk::ChunkDigest::of(&unit), piece.digest, "{name}");
            got.extend_from_slice(
                &unit[piece.within as usize..(piece.within + piece.len) as usize],
            );
            spans_seen.insert(piece.id);
        }
        assert_eq!(&got, data, "{name}");
    }
    (opened, spans_seen)
}

/// The compressed bytes a read of `len` bytes of `name` at `offset` fetches: its pieces'.
fn fetched_for(opened: &Opened, name: &str, offset: u64, len: u64) -> u64 {
    let layer = &opened.index;
    let node = layer
        .node(layer.resolve(name).expect("file"))
        .expect("node");
    node.chunks
        .iter()
        .filter(|c| c.file_offset < offset + len && c.file_offset + c.len > offset)
        .map(|c| c.blob_range.end - c.blob_range.start)
        .sum()
}

#[tokio::test]
async fn an_index_cut_for_traced_ranges_fetches_them_alone() {
    let (blob, files) = layer();
    let size = blob.len() as u64;
    let limits = Limits::default();
    let span = 256 << 10;
    let plain = build_with(DIGEST, size, &blob[..], span, &limits, Cuts::default()).expect("index");
    assert!(plain.boundaries.len() > 4, "{:?}", plain.boundaries);
    let traced = [
        // Two ranges of one file close enough to be fetched as one, a range past the file's
        // end, a file through its hard link, a name the layer does not have.
        ("usr/big.txt", 500 << 10, 9000),
        ("usr/big.txt", (500 << 10) + 9000 + 4096, 2000),
        ("usr/second.txt", 200 << 10, 1 << 20),
        ("usr/hard", 0, 6),
        ("usr/none", 0, 10),
    ]
    .map(|(path, offset, bytes)| TracedRange {
        path: path.into(),
        offset,
        bytes,
    });
    let cuts = plan_cuts(&plain.index, &plain.boundaries, &traced);
    let start_of = |name: &str| {
        plain
            .index
            .entries
            .iter()
            .find(|e| e.name == name)
            .expect("entry")
            .offset
    };
    let (big, second) = (start_of("usr/big.txt"), start_of("usr/second.txt"));
    assert_eq!(cuts.ends.len(), 3, "{cuts:?}");
    assert!(cuts
        .ends
        .contains(&(big + (500 << 10) + 9000 + 4096 + 2000)));
    assert!(cuts.ends.contains(&(second + (300 << 10))));
    for (&point, start) in cuts
        .points
        .iter()
        .zip([big + (500 << 10), second + (200 << 10)])
    {
        assert!(
            plain.boundaries.contains(&point) && point <= start,
            "{point} {start}"
        );
    }
    let cut = build_with(DIGEST, size, &blob[..], span, &limits, cuts.clone()).expect("index");
    for point in &cuts.points {
        assert!(
            cut.index.checkpoints.iter().any(|p| p.out == *point),
            "point {point}"
        );
    }
    for end in &cuts.ends {
        assert!(
            cut.index.parts.iter().any(|p| p.out_end == *end),
            "end {end}"
        );
    }
    // The index is valid, and every file still reads back exactly, cut or not.
    let (opened_cut, _) = read_back(&blob, &files, &cut.index).await;
    let (opened_plain, _) = read_back(&blob, &files, &plain.index).await;
    let (cut_bytes, plain_bytes) = (
        fetched_for(&opened_cut, "usr/big.txt", 500 << 10, 9000),
        fetched_for(&opened_plain, "usr/big.txt", 500 << 10, 9000),
    );
    assert!(
        cut_bytes * 2 < plain_bytes,
        "the traced range fetches {cut_bytes} bytes, against {plain_bytes} without cuts"
    );
}

#[test]
fn an_index_that_is_not_the_saved_one_is_refused() {
    let (_, _, index) = indexed();
    let encoded = index.encode().expect("encode").index;
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
    let bytes = bytes::Bytes::from(index.encode().expect("encode").index);
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

#[tokio::test]
async fn a_window_that_does_not_chain_fails_the_span_before_it() {
    let (blob, _, index) = indexed();
    for version in [2, 3] {
        let open = |index: &GzipIndex| match version {
            2 => (
                open_doc(index.encode_v2().expect("encode")),
                FixtureBlob::default(),
            ),
            _ => open_v3(index),
        };
        let (good, windows) = open(&index);
        // Every span decodes, and chains, with the honest index.
        let spans: Vec<ChunkSpec> = good.index.chunks_in_blob_order();
        for c in &spans {
            let compressed = &blob[c.blob_range.start as usize..c.blob_range.end as usize];
            decode_fetching(&good, &windows, c, compressed)
                .await
                .expect("honest span");
        }
        // A forged window for point 2 is caught when span 1's last part is decoded (with
        // the rest of the span).
        let span1_end = index.checkpoints[2].out;
        let last_part = index
            .parts
            .iter()
            .position(|p| p.out_end == span1_end)
            .expect("a part ends at each resume point");
        let mut forged_index = index.clone();
        // A byte the span reads (a version 3 window keeps no others).
        let at = forged_index.checkpoints[2]
            .used
            .as_ref()
            .and_then(|u| u.first())
            .map_or(100, |(start, _)| usize::from(*start));
        forged_index.checkpoints[2].window[at] ^= 0xff;
        let (forged, windows) = open(&forged_index);
        let span1 = forged
            .index
            .chunks_in_blob_order()
            .into_iter()
            .find(|c| c.id == ChunkId(last_part as u32))
            .expect("span 1's last part");
        // Version 3 compares a window with the span before it when the window is at hand
        // (else that span's end becomes the window): a read of span 2 brought it.
        let span2: Vec<ChunkSpec> = forged
            .index
            .chunks_in_blob_order()
            .into_iter()
            .filter(|c| index.span_of_part(c.id.0 as usize) == Some(2))
            .take(1)
            .collect();
        assert_eq!(span2.len(), 1, "a file in span 2");
        let _held = forged
            .decoder
            .fetch_extra(&span2, Some(&windows))
            .await
            .expect("span 2's window");
        let compressed = &blob[span1.blob_range.start as usize..span1.blob_range.end as usize];
        let err = decode_fetching(&forged, &windows, &span1, compressed)
            .await
            .expect_err("forged window");
        assert!(
            err.to_string().contains("window of resume point 2"),
            "version {version}: {err}"
        );
    }
}

#[tokio::test]
async fn a_tampered_window_fails_its_span_and_is_never_used() {
    let (blob, files, index) = indexed();
    let encoded = index.encode().expect("encode");
    let opened = open_doc(encoded.index.clone());
    // The registry serves other bytes for the windows blob than its digest (a byte flipped
    // in the middle of every answer).
    let lying = FixtureBlob {
        blob: encoded.windows.clone(),
        corrupt: true,
        ..FixtureBlob::default()
    };
    let (name, data) = &files[0];
    let ino = opened.index.resolve(name).expect("file");
    let node = opened.index.node(ino).expect("node");
    let later: Vec<&ChunkSpec> = node
        .chunks
        .iter()
        .filter(|c| index.span_of_part(c.id.0 as usize).is_some_and(|k| k > 0))
        .collect();
    assert!(!later.is_empty(), "{name} reaches past the first span");
    for piece in &later {
        let compressed = &blob[piece.blob_range.start as usize..piece.blob_range.end as usize];
        let err = decode_fetching(&opened, &lying, piece, compressed)
            .await
            .expect_err("a tampered window");
        assert!(
            err.to_string().contains("does not match its digest")
                || err.to_string().contains("does not decompress"),
            "{err}"
        );
    }
    // Nothing tampered was kept: with an honest registry the same pieces decode right.
    let honest = FixtureBlob {
        blob: encoded.windows,
        ..FixtureBlob::default()
    };
    for piece in &later {
        let compressed = &blob[piece.blob_range.start as usize..piece.blob_range.end as usize];
        let unit = decode_fetching(&opened, &honest, piece, compressed)
            .await
            .expect("honest window");
        let got = &unit[piece.within as usize..(piece.within + piece.len) as usize];
        assert_eq!(
            got,
            &data[piece.file_offset as usize..(piece.file_offset + piece.len) as usize]
        );
    }
    // Without its window at hand a span does not decode at all.
    let fresh = open_doc(encoded.index);
    let piece = later[0];
    let compressed = &blob[piece.blob_range.start as usize..piece.blob_range.end as usize];
    assert!(fresh.decoder.decode(piece, compressed).is_err());
}

#[tokio::test]
async fn windows_are_fetched_together_and_kept() {
    let (blob, _, index) = indexed();
    let (opened, windows) = open_v3(&index);
    let layout = opened.index.chunks_in_blob_order();
    let extra = opened
        .decoder
        .fetch_extra(&layout, Some(&windows))
        .await
        .expect("windows");
    // Every span but the first has a window; they lie together in the blob: one request.
    assert_eq!(extra.held.len(), index.checkpoints.len() - 1);
    assert_eq!(extra.requests, 1);
    assert_eq!(extra.fetched_bytes, windows.blob.len() as u64);
    drop(extra);
    // The decoder kept them: no request for them again.
    let again = opened
        .decoder
        .fetch_extra(&layout, Some(&windows))
        .await
        .expect("kept");
    assert_eq!((again.requests, again.fetched_bytes), (0, 0));
    for c in &layout {
        let compressed = &blob[c.blob_range.start as usize..c.blob_range.end as usize];
        opened.decoder.decode(c, compressed).expect("decode");
    }
    // A span decoded to its end gives the next one's window: a decoder that fetched none
    // decodes the spans in order once it has the first window... or none at all.
    let (fresh, _) = open_v3(&index);
    let mut last_parts: Vec<&ChunkSpec> = Vec::new();
    for k in 0..index.checkpoints.len() {
        let end = index.span_out(k).expect("span").end;
        if let Some(c) = layout.iter().find(|c| {
            index
                .part_out(c.id.0 as usize)
                .is_some_and(|p| p.end == end)
        }) {
            last_parts.push(c);
        }
    }
    for c in last_parts {
        let compressed = &blob[c.blob_range.start as usize..c.blob_range.end as usize];
        fresh
            .decoder
            .decode(c, compressed)
            .expect("each window from the span before");
    }
}

#[tokio::test]
async fn a_read_fetches_its_span_only_up_to_the_end_of_its_part() {
    let (blob, _, index) = indexed();
    let (opened, windows) = open_v3(&index);
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
    let owned: Vec<ChunkSpec> = first_span.iter().map(|c| (*c).clone()).collect();
    let _held = opened
        .decoder
        .fetch_extra(&owned, Some(&windows))
        .await
        .expect("window");
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
        let encoded = ix.encode().expect("encode").index;
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

#[tokio::test]
async fn a_window_that_leaves_out_bytes_its_span_reads_fails_the_span() {
    let (blob, _, index) = indexed();
    // Point 2's window claims its span reads nothing of it but the last stretch: the span's
    // start reads bytes the window no longer keeps.
    let mut forged = index.clone();
    let used = forged.checkpoints[2].used.clone().expect("known use");
    assert!(
        used.len() > 1,
        "the span reads several stretches of its window"
    );
    forged.checkpoints[2].used = used.last().map(|last| vec![*last]);
    let (opened, windows) = open_v3(&forged);
    let span2: Vec<ChunkSpec> = opened
        .index
        .chunks_in_blob_order()
        .into_iter()
        .filter(|c| index.span_of_part(c.id.0 as usize) == Some(2))
        .collect();
    let first = span2.first().expect("a file in span 2");
    let compressed = &blob[first.blob_range.start as usize..first.blob_range.end as usize];
    let err = decode_fetching(&opened, &windows, first, compressed)
        .await
        .expect_err("a window short of what its span reads");
    assert!(err.to_string().contains("leaves out bytes"), "{err}");
}

/// A fetch holds the windows it fetched until it decodes, and its decode looks them up by
/// resume point: however many windows pass through the cache meanwhile (a busy prefetch),
/// and whatever else is put for that point (the end of the span before, kept whole), the
/// lookup finds a window while one is held.
#[test]
fn a_held_window_is_found_however_busy_the_cache() {
    let cache = WindowCache::default();
    let window = |byte: u8| {
        Arc::new(Window {
            bytes: vec![byte; 16],
            kept: None,
        })
    };
    let held = window(1);
    let _ = cache.put(7, held.clone());
    // The span before ends: its tail is put for point 7 too, and then many more windows.
    let _ = cache.put(7, window(2));
    for k in 100..100 + 4 * KEPT_WINDOWS {
        let _ = cache.put(k, window(3));
    }
    let found = cache
        .get(7)
        .expect("a window for point 7 while one is held");
    assert!(Arc::ptr_eq(&found, &held), "the held window itself");
    drop((found, held));
    for k in 1000..1000 + 2 * KEPT_WINDOWS {
        let _ = cache.put(k, window(4));
    }
    assert!(
        cache.get(7).is_none(),
        "held by nobody and pushed out of the recent: forgotten"
    );
}

#[test]
fn a_second_fetch_of_a_held_window_holds_the_one_kept() {
    let cache = WindowCache::default();
    let window = |byte: u8| {
        Arc::new(Window {
            bytes: vec![byte; 16],
            kept: None,
        })
    };
    // Two fetches bring point 7's window at once; the first one's is kept.
    let first = cache.put(7, window(1));
    let second = cache.put(7, window(2));
    assert!(
        Arc::ptr_eq(&first, &second),
        "the second fetch holds the kept window, not its own copy"
    );
    // The first fetch decodes and lets go; a busy prefetch pushes point 7 out of the recent.
    drop(first);
    for k in 100..100 + 4 * KEPT_WINDOWS {
        let _ = cache.put(k, window(3));
    }
    let found = cache
        .get(7)
        .expect("the second fetch still holds point 7's window, so its decode finds it");
    assert!(Arc::ptr_eq(&found, &second));
}
