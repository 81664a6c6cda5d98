//! Index rules on hand-written TOCs (hostile ones included) and on the real fixtures.

use std::ffi::OsStr;

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
