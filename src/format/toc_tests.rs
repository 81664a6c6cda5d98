//! Index rules on hand-written TOCs (hostile ones included) and on the real fixtures.

use std::ffi::OsStr;

use base64::Engine as _;

use super::*;
use crate::metadata::{NodeKind, ROOT};

fn toc(entries: serde_json::Value) -> Toc {
    serde_json::from_value(serde_json::json!({ "version": 1, "entries": entries }))
        .expect("toc json")
}

const D: &str = "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

fn build(entries: serde_json::Value) -> Result<LayerIndex, MetadataError> {
    build_index(&toc(entries), 10_000, &Limits::default())
}

fn ino(index: &LayerIndex, path: &str) -> Option<u64> {
    path.split('/')
        .try_fold(ROOT, |dir, name| index.lookup(dir, OsStr::new(name)))
}

#[test]
fn whiteouts_opaque_dirs_and_hidden_files() {
    let index = build(serde_json::json!([
        {"name": "stargz.index.json", "type": "reg", "size": 3, "offset": 100, "chunkDigest": D},
        {"name": ".no.prefetch.landmark", "type": "reg", "size": 1, "offset": 200, "chunkDigest": D},
        {"name": "a/.wh.gone", "type": "reg"},
        {"name": "a/b/.wh..wh..opq", "type": "reg"},
        {"name": "a/b/new", "type": "reg", "size": 3, "offset": 300, "chunkDigest": D},
    ]))
    .expect("build");
    assert!(index
        .lookup(ROOT, OsStr::new("stargz.index.json"))
        .is_none());
    assert!(index
        .lookup(ROOT, OsStr::new(".no.prefetch.landmark"))
        .is_none());
    let gone = index
        .node(ino(&index, "a/gone").expect("whiteout"))
        .expect("node");
    assert_eq!(
        (gone.kind, gone.rdev, gone.perm),
        (NodeKind::CharDevice, (0, 0), 0)
    );
    let b = index.node(ino(&index, "a/b").expect("b")).expect("node");
    assert!(b
        .xattrs
        .iter()
        .any(|(k, v)| k.as_ref() == "trusted.overlay.opaque" && v.as_ref() == b"y"));
    assert!(ino(&index, "a/b/.wh..wh..opq").is_none());
    let a = index
        .node(ino(&index, "a").expect("implicit dir"))
        .expect("node");
    assert_eq!((a.perm, a.nlink), (0o755, 3));
}

#[test]
fn hard_links_share_an_inode() {
    let index = build(serde_json::json!([
        {"name": "f", "type": "reg", "size": 3, "offset": 100, "chunkDigest": D},
        {"name": "g", "type": "hardlink", "linkName": "f"},
        {"name": "./h", "type": "hardlink", "linkName": "/f"},
    ]))
    .expect("build");
    let f = ino(&index, "f").expect("f");
    assert_eq!(ino(&index, "g"), Some(f));
    assert_eq!(ino(&index, "h"), Some(f));
    assert_eq!(index.node(f).expect("node").nlink, 3);
    assert_eq!(index.file_bytes, 3);
}

#[test]
fn the_largest_file_counts_regular_files_only() {
    let index = build(serde_json::json!([
        {"name": "small", "type": "reg", "size": 3, "offset": 100, "chunkDigest": D},
        {"name": "big", "type": "reg", "size": 7, "offset": 200, "chunkDigest": D},
        {"name": "link", "type": "symlink", "linkName": "a-much-longer-target-than-seven"},
        {"name": "dir", "type": "dir"},
    ]))
    .expect("build");
    assert_eq!(index.largest_file(), 7);
    let empty = build(serde_json::json!([{"name": "dir", "type": "dir"}])).expect("build");
    assert_eq!(empty.largest_file(), 0);
}

#[test]
fn hostile_entries_are_refused_by_name() {
    for (entries, needle) in [
        (
            serde_json::json!([{"name": "../../etc/x", "type": "reg"}]),
            "../../etc/x",
        ),
        (
            serde_json::json!([{"name": "a/../../b", "type": "dir"}]),
            "a/../../b",
        ),
        (
            serde_json::json!([{"name": "x", "type": "reg"}, {"name": "x", "type": "symlink", "linkName": "y"}]),
            "duplicate",
        ),
        (
            serde_json::json!([{"name": "x", "type": "hardlink", "linkName": "missing"}]),
            "missing",
        ),
        (
            serde_json::json!([{"name": "x", "type": "reg", "size": 5, "offset": 20000, "chunkDigest": D}]),
            "outside the blob",
        ),
        (
            serde_json::json!([{"name": "x", "type": "reg", "size": 5, "offset": 100, "chunkSize": 2, "chunkDigest": D}]),
            "cover 2 of 5",
        ),
        (
            serde_json::json!([{"name": "x", "type": "reg", "size": 5, "offset": 100}]),
            "chunkDigest",
        ),
        (
            serde_json::json!([{"name": "x", "type": "chunk", "offset": 100}]),
            "without a preceding file",
        ),
    ] {
        let e = build(entries).expect_err("hostile TOC refused");
        assert!(
            e.to_string().contains(needle),
            "{e} should mention {needle}"
        );
    }
    // an absolute path is normalised, not refused, as tar extractors do
    let index = build(serde_json::json!([{"name": "/abs/file", "type": "dir"}])).expect("build");
    assert!(ino(&index, "abs/file").is_some());
}

#[tokio::test]
async fn real_estargz_fixture_indexes() {
    let (_, opened) = crate::test_utils::open_fixture("estargz").await;
    let index = opened.index;
    let multi = ino(&index, "dir/multi-chunk.txt").expect("file");
    let node = index.node(multi).expect("node");
    assert!(node.chunks.len() >= 3);
    let middle = index.chunks_for(multi, 70_000, 140_000);
    assert!(middle.len() >= 2 && middle[0].file_offset <= 70_000);
    assert_eq!(ino(&index, "dir/hard"), ino(&index, "dir/small.txt"));
    let link = index
        .node(ino(&index, "dir/link").expect("link"))
        .expect("node");
    assert_eq!(link.link_target.as_ref(), b"small.txt");
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("field")
}

#[test]
#[ignore = "a measurement: cargo test --lib measure_index_memory -- --ignored --nocapture"]
fn measure_index_memory() {
    let n: usize = std::env::var("ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let mut json = String::from(r#"{"version":1,"entries":["#);
    for i in 0..n {
        if i > 0 {
            json.push(',');
        }
        json.push_str(&format!(
            r#"{{"name":"usr/lib/python3/dist-packages/pkg{}/module_{i}.py","type":"reg","size":1000,"mode":420,"modtime":"2023-11-14T22:13:20Z","offset":{},"digest":"{D}","chunkDigest":"{D}"}}"#,
            i / 100,
            100 + i as u64 * 100
        ));
    }
    json.push_str("]}");
    let json = json.into_bytes();
    let limits = Limits {
        max_entries: u64::MAX,
        ..Limits::default()
    };
    let rss0 = status_kib("VmRSS:");
    let toc = crate::format::parse_toc(&json, u64::MAX).expect("parse");
    let rss_toc = status_kib("VmRSS:");
    let index = build_index(&toc, 100 + n as u64 * 100 + 100, &limits).expect("build");
    let rss_built = status_kib("VmRSS:");
    drop(toc);
    let rss_index = status_kib("VmRSS:");
    println!(
        "{n} entries: JSON {} B/entry; parsed TOC +{} B/entry; built (TOC still held) +{} B/entry; index alone {} B/entry ({} inodes)",
        json.len() / n,
        (rss_toc - rss0) * 1024 / n as u64,
        (rss_built - rss_toc) * 1024 / n as u64,
        (rss_index.saturating_sub(rss0)) * 1024 / n as u64,
        index.len()
    );
    println!(
        "size_of: Node {} TocEntry {} ChunkSpec {}",
        std::mem::size_of::<crate::metadata::Node>(),
        std::mem::size_of::<TocEntry>(),
        std::mem::size_of::<ChunkSpec>()
    );
}

fn build_with(entries: serde_json::Value, limits: Limits) -> Result<LayerIndex, MetadataError> {
    build_index(&toc(entries), 10_000, &limits)
}

fn refused(entries: serde_json::Value, limits: Limits, needle: &str) {
    let e = build_with(entries, limits).expect_err("over a limit");
    assert!(
        e.to_string().contains(needle),
        "{e}\nshould contain {needle}"
    );
}

#[test]
fn each_limit_is_enforced_and_named() {
    let d = Limits::default();
    let long = "n".repeat(300);
    refused(
        serde_json::json!([{"name": format!("a/{long}"), "type": "dir"}]),
        d,
        "name component of 300 bytes exceeds the limit of 255 ([limits] max_name_bytes)",
    );
    // 255 bytes is fine
    build_with(
        serde_json::json!([{"name": "n".repeat(255), "type": "dir"}]),
        d,
    )
    .expect("NAME_MAX itself is allowed");
    refused(
        serde_json::json!([{"name": "a/b/c/d", "type": "dir"}]),
        Limits {
            max_path_depth: 3,
            ..d
        },
        "path depth of 4 exceeds the limit of 3 ([limits] max_path_depth)",
    );
    let deep = vec!["x".repeat(200); 30].join("/");
    refused(
        serde_json::json!([{"name": deep, "type": "dir"}]),
        d,
        "path of 6029 bytes exceeds the limit of 4096 ([limits] max_path_bytes)",
    );
    refused(
        serde_json::json!([{"name": "l", "type": "symlink", "linkName": "t".repeat(5000)}]),
        d,
        "symlink target of 5000 bytes exceeds the limit of 4096 ([limits] max_link_bytes)",
    );
    let b64 = |n: usize| base64::engine::general_purpose::STANDARD.encode(vec![7u8; n]);
    refused(
        serde_json::json!([{"name": "x", "type": "dir", "xattrs": {"user.a": b64(70_000)}}]),
        d,
        "value of xattr \"user.a\" of 70000 bytes exceeds the limit of 65536 ([limits] max_xattr_value_bytes)",
    );
    refused(
        serde_json::json!([{"name": "x", "type": "dir", "xattrs": {format!("user.{long}"): b64(1)}}]),
        d,
        "([limits] max_xattr_name_bytes)",
    );
    let many: serde_json::Map<String, serde_json::Value> = (0..5)
        .map(|i| (format!("user.{i}"), b64(60_000).into()))
        .collect();
    refused(
        serde_json::json!([{"name": "x", "type": "dir", "xattrs": many}]),
        d,
        "extended attributes of 300030 bytes exceeds the limit of 262144 ([limits] max_xattr_bytes)",
    );
    let small = Limits {
        max_entries: 3,
        ..d
    };
    refused(
        serde_json::json!([{"name": "a", "type": "fifo"}, {"name": "b", "type": "hardlink", "linkName": "a"}, {"name": "c", "type": "hardlink", "linkName": "a"}, {"name": "d", "type": "hardlink", "linkName": "a"}]),
        small,
        "layer of 4 entries exceeds the limit of 3 ([limits] max_entries)",
    );
    // implied directories are inodes too
    refused(
        serde_json::json!([{"name": "a/b/c/d", "type": "dir"}]),
        small,
        "inodes exceeds the limit of 3 ([limits] max_entries)",
    );
}

#[test]
fn chunk_claims_are_bounded_with_checked_arithmetic() {
    let d = Limits::default();
    // the measured abort: a 2^62-byte file in one chunk
    refused(
        serde_json::json!([{"name": "big", "type": "reg", "size": 1u64 << 62, "offset": 100, "chunkDigest": D}]),
        d,
        "chunk of 4611686018427387904 bytes exceeds the limit of 67108864 ([limits] max_chunk_bytes)",
    );
    // honest but large chunks
    refused(
        serde_json::json!([{"name": "big", "type": "reg", "size": 100u64 << 20, "offset": 100, "chunkDigest": D}]),
        d,
        "([limits] max_chunk_bytes)",
    );
    refused(
        serde_json::json!([{"name": "x", "type": "reg", "size": 10, "offset": 100, "chunkSize": u64::MAX, "chunkDigest": D}]),
        d,
        "([limits] max_chunk_bytes)",
    );
    refused(
        serde_json::json!([{"name": "x", "type": "reg", "size": 5, "offset": 100, "innerOffset": u64::MAX, "chunkDigest": D}]),
        d,
        "inner offset 18446744073709551615 plus length 5 overflows",
    );
    refused(
        serde_json::json!([{"name": "x", "type": "reg", "size": 5, "offset": 100, "innerOffset": 64u64 << 20, "chunkDigest": D}]),
        d,
        "chunk with the bytes its stream decodes before it of 67108869 bytes exceeds the limit",
    );
    // lengths that overflow u64 when added, with the chunk limit out of the way
    let unlimited = Limits {
        max_chunk_bytes: u64::MAX,
        ..d
    };
    refused(
        serde_json::json!([
            {"name": "x", "type": "reg", "size": 5, "offset": 100, "chunkSize": 1u64 << 63, "chunkDigest": D},
            {"name": "x", "type": "chunk", "offset": 200, "chunkOffset": 1u64 << 63, "chunkSize": 1u64 << 63, "chunkDigest": D},
        ]),
        unlimited,
        "chunk lengths overflow",
    );
    // a chunk's compressed extent stops where a stream of its size must end, not at the
    // next chunk (here: the TOC, 9,900 bytes on)
    let limits = Limits {
        max_chunk_bytes: 1000,
        ..d
    };
    let index = build_with(
        serde_json::json!([{"name": "x", "type": "reg", "size": 5, "offset": 100, "chunkDigest": D}]),
        limits,
    )
    .expect("build");
    let x = ino(&index, "x").expect("x");
    let chunk = &index.node(x).expect("node").chunks[0];
    assert_eq!(
        chunk.blob_range,
        100..100 + Limits::extent_bound(5).min(9_900)
    );
}

#[test]
fn toc_entry_count_is_refused_while_parsing() {
    let json = br#"{"version":1,"entries":[{"name":"a","type":"dir"},{"name":"b","type":"dir"},{"name":"c","type":"dir"}]}"#;
    assert_eq!(
        crate::format::parse_toc(json, 3)
            .expect("at the limit")
            .entries
            .len(),
        3
    );
    let e = crate::format::parse_toc(json, 2).expect_err("over");
    assert!(
        e.to_string()
            .contains("TOC of more than 2 entries exceeds the limit of 2 ([limits] max_entries)"),
        "{e}"
    );
    let e = crate::format::parse_toc(b"{\"version\":1,\"entries\":[1]}", 2).expect_err("bad");
    assert!(e.to_string().contains("not valid JSON"), "{e}");
    let e = crate::format::parse_toc(b"{\"entries\":[]}", 2).expect_err("no version");
    assert!(
        crate::error_chain(&e).contains("version"),
        "{}",
        crate::error_chain(&e)
    );
}

#[test]
fn long_entry_names_are_cut_in_messages() {
    let name = "y".repeat(100_000);
    let e = build_with(
        serde_json::json!([{"name": name, "type": "dir"}]),
        Limits::default(),
    )
    .expect_err("too long");
    let text = e.to_string();
    assert!(text.len() < 1000, "{}", text.len());
    assert!(text.contains("(100000 bytes)"), "{text}");
}

#[test]
fn trace_paths_cost_only_what_is_asked_for() {
    // 400 nested directories and a file at the bottom; a few inodes asked for.
    let deep = vec!["d"; 400].join("/");
    let index = build_with(
        serde_json::json!([
            {"name": format!("{deep}/f"), "type": "reg", "size": 3, "offset": 100, "chunkDigest": D},
            {"name": "top", "type": "hardlink", "linkName": format!("{deep}/f")},
        ]),
        Limits::default(),
    )
    .expect("build");
    let f = index.resolve(&format!("{deep}/f")).expect("f");
    let d1 = index.resolve("d").expect("d");
    let paths = index.paths_of(&[f, d1, 9_999_999].into_iter().collect());
    assert_eq!(paths.len(), 2);
    assert_eq!(paths[&d1], "d");
    let fp = &paths[&f];
    assert!(fp == "top" || fp == &format!("{deep}/f"), "{fp}");
    assert_eq!(index.resolve(fp), Some(f));
}
