//! A deterministic fuzz of the TOC parser and the index builder: random and mutated TOCs
//! (random entries, huge numbers, deep paths, long names, bad digests, broken JSON), under
//! random limits. Nothing may panic; a TOC either is refused or gives an index that keeps its
//! invariants (chunks tile files, everything within the limits). A fixed seed and a fixed
//! number of cases keep it reproducible and a few seconds long; `TOC_FUZZ_CASES` runs more.

use std::collections::HashSet;

use serde_json::{json, Value};

use super::*;
use crate::metadata::{NodeKind, ROOT};

/// xorshift64*: enough randomness, no dependency, same sequence everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

const GOOD: &str = "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";
const TOC_OFFSET: u64 = 1 << 20;

fn number(rng: &mut Rng) -> u64 {
    match rng.below(8) {
        0 => 0,
        1 => u64::MAX,
        2 => u64::MAX - rng.below(10),
        3 => 1 << (rng.below(64)),
        4 => 4_611_686_018_427_387_904,
        5 => rng.below(TOC_OFFSET * 2),
        _ => rng.below(5000),
    }
}

fn name(rng: &mut Rng, known: &[String]) -> String {
    if !known.is_empty() && rng.chance(30) {
        return rng.pick(known).clone();
    }
    let parts = match rng.below(10) {
        0 if rng.chance(20) => 200 + rng.below(400),
        1 => 0,
        _ => 1 + rng.below(4),
    };
    let mut out: Vec<String> = Vec::new();
    for _ in 0..parts {
        let part = match rng.below(60) {
            0 => "..".to_owned(),
            1 => ".".to_owned(),
            2 => String::new(),
            3 => "n".repeat(250 + rng.below(20) as usize),
            4 => ".wh..wh..opq".to_owned(),
            5 => format!(".wh.{}", rng.pick(&["a", "b", "c"])),
            6 => "nul\0byte".to_owned(),
            7 => "é".repeat(1 + rng.below(200) as usize),
            8 => "stargz.index.json".to_owned(),
            9 => ".prefetch.landmark".to_owned(),
            _ => rng.pick(&["a", "b", "c", "d", "usr", "lib"]).to_string(),
        };
        out.push(part);
    }
    let mut name = out.join("/");
    if rng.chance(10) {
        name.insert(0, '/');
    }
    if rng.chance(10) {
        name.push('/');
    }
    name
}

/// A TOC field and how to make a random value for it.
type Field = fn(&mut Rng) -> Value;

/// An entry an honest converter could write: small file, good digest, in the blob.
fn honest_entry(rng: &mut Rng) -> Value {
    let parts = 1 + rng.below(4);
    let name: Vec<&str> = (0..parts)
        .map(|_| *rng.pick(&["a", "b", "c", "d", "usr", "lib"]))
        .collect();
    match rng.below(3) {
        0 => json!({"name": name.join("/"), "type": "dir", "mode": 0o755}),
        _ => json!({
            "name": name.join("/"), "type": "reg", "size": 1 + rng.below(5000),
            "offset": rng.below(TOC_OFFSET), "chunkDigest": GOOD,
        }),
    }
}

fn entry(rng: &mut Rng, known: &[String]) -> Value {
    let kind = *rng.pick(&[
        "dir", "dir", "reg", "reg", "reg", "reg", "chunk", "symlink", "hardlink", "char", "block",
        "fifo", "socket",
    ]);
    let mut e = json!({ "name": name(rng, known), "type": kind });
    let fields: &[(&str, Field)] = &[
        ("size", |r| number(r).into()),
        ("offset", |r| number(r).into()),
        ("chunkOffset", |r| number(r).into()),
        ("chunkSize", |r| number(r).into()),
        ("innerOffset", |r| number(r).into()),
        ("mode", |r| (r.next() as u32).into()),
        ("chunkDigest", |r| {
            (*r.pick(&[GOOD, "sha256:xyz", "", "md5:00", &GOOD[7..]])).into()
        }),
        ("modtime", |r| {
            (*r.pick(&["2023-11-14T22:13:20Z", "yesterday", "9999-99-99T00:00:00Z"])).into()
        }),
        ("linkName", |r| {
            (*r.pick(&["a", "a/b", "../x", "/a", "missing", ""])).into()
        }),
        ("xattrs", |r| match r.below(4) {
            0 => json!({"user.x": "eHl6"}),
            1 => json!({"user.bad": "!!!"}),
            2 if r.chance(10) => json!({ "user.big": big_xattr() }),
            _ => json!({}),
        }),
    ];
    for (key, make) in fields {
        if rng.chance(if kind == "reg" || kind == "chunk" {
            40
        } else {
            8
        }) {
            e[*key] = make(rng);
        }
    }
    if (kind == "reg" || kind == "chunk") && rng.chance(70) {
        e["chunkDigest"] = GOOD.into();
    }
    e
}

fn big_xattr() -> &'static str {
    static BIG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIG.get_or_init(|| {
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            vec![1u8; 70_000],
        )
    })
}

/// Random limits, sometimes small enough to be hit by small TOCs.
fn limits(rng: &mut Rng) -> Limits {
    let d = Limits::default();
    if rng.chance(50) {
        return d;
    }
    let mut small = |n: u64, default: u64| {
        if rng.chance(50) {
            1 + rng.below(n)
        } else {
            default
        }
    };
    Limits {
        max_toc_bytes: d.max_toc_bytes,
        max_entries: small(40, d.max_entries),
        max_chunk_bytes: small(3000, d.max_chunk_bytes),
        max_path_depth: small(6, d.max_path_depth),
        max_path_bytes: small(300, d.max_path_bytes),
        max_name_bytes: small(20, d.max_name_bytes),
        max_link_bytes: small(5, d.max_link_bytes),
        max_xattr_name_bytes: small(8, d.max_xattr_name_bytes),
        max_xattr_value_bytes: small(4, d.max_xattr_value_bytes),
        max_xattr_bytes: small(10, d.max_xattr_bytes),
    }
}

/// Flips, inserts or deletes a few bytes: broken JSON must be refused, not crash.
fn mangle(rng: &mut Rng, json: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        if json.is_empty() {
            return;
        }
        let at = rng.below(json.len() as u64) as usize;
        match rng.below(3) {
            0 => json[at] = *rng.pick(b"{}[],:\"0123456789e-\\"),
            1 => json.insert(at, *rng.pick(b"{}[],:\"9")),
            _ => {
                json.remove(at);
            }
        }
    }
}

fn check_invariants(index: &LayerIndex, limits: &Limits) {
    assert!(
        index.len() as u64 <= limits.max_entries,
        "inodes over the limit"
    );
    let mut chunk_ids = HashSet::new();
    for ino in index.inodes() {
        let node = index.node(ino).expect("every inode has a node");
        let mut prev: Option<&[u8]> = None;
        for (name, child) in &node.children {
            assert_eq!(node.kind, NodeKind::Dir, "only directories have children");
            assert!(!name.is_empty() && name.len() as u64 <= limits.max_name_bytes);
            assert!(!name.contains(&b'/') && !name.contains(&0));
            assert!(
                prev.is_none_or(|p| p < name.as_ref()),
                "children sorted, unique"
            );
            prev = Some(name);
            assert!(index.node(*child).is_some() && *child != ROOT);
        }
        if node.kind == NodeKind::Symlink {
            assert!(node.link_target.len() as u64 <= limits.max_link_bytes);
        }
        let mut next = 0u64;
        for c in &node.chunks {
            assert_eq!(node.kind, NodeKind::File);
            assert_eq!(c.file_offset, next, "chunks tile the file");
            assert!(c.len > 0 && c.len <= limits.max_chunk_bytes);
            let decoded = c.inner_offset.checked_add(c.len).expect("no overflow");
            assert!(decoded <= limits.max_chunk_bytes);
            assert!(c.blob_range.start <= c.blob_range.end && c.blob_range.end <= TOC_OFFSET);
            assert!(
                c.blob_range.end - c.blob_range.start <= Limits::extent_bound(decoded),
                "extent bounded by what the chunk can need"
            );
            assert!(chunk_ids.insert(c.id), "chunk ids unique");
            next = next.checked_add(c.len).expect("no overflow");
        }
        if node.kind == NodeKind::File {
            assert_eq!(next, node.size, "chunks cover the file");
            // any range, however wild, maps to chunks without panicking
            let _ = index.chunks_for(ino, node.size / 2, u64::MAX);
            let _ = index.chunks_for(ino, u64::MAX, 0);
        }
    }
    assert_eq!(index.chunks_in_blob_order().len(), chunk_ids.len());
    let all: HashSet<u64> = index.inodes().collect();
    let paths = index.paths_of(&all);
    assert_eq!(
        paths.len(),
        index.len() - 1,
        "every inode but the root has a path"
    );
    for (ino, path) in &paths {
        assert!(path.split('/').count() as u64 <= limits.max_path_depth);
        assert!(path.len() as u64 <= limits.max_path_bytes);
        let found = index.resolve(path).expect("a path resolves");
        let same = found == *ino;
        let node = index.node(*ino).expect("node");
        assert!(same || node.nlink > 1, "{path} resolves to its inode");
    }
}

#[test]
fn random_and_mutated_tocs_never_panic_and_keep_invariants() {
    let cases: u64 = std::env::var("TOC_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    // The real fixture's entries, to mutate.
    let (blob, annotations) = crate::test_utils::fixture("estargz");
    let expected = annotations
        .get(crate::format::TOC_DIGEST_ANNOTATION)
        .expect("annotation");
    let tail = &blob[blob.len() - crate::format::MAX_FOOTER as usize..];
    let location =
        crate::format::locate_toc(tail, blob.len() as u64, 64 << 20).expect("fixture footer");
    let compressed = &blob[location.offset as usize..(location.offset + location.len) as usize];
    let fixture_json = crate::format::read_toc(&location, compressed, Some(expected), 64 << 20)
        .expect("fixture toc");
    let fixture: Value = serde_json::from_slice(&fixture_json).expect("fixture json");
    let fixture_entries = fixture["entries"].as_array().expect("entries").clone();

    let mut rng = Rng(0x05ee_d1a2_55a9_u64);
    let (mut built, mut refused) = (0u64, 0u64);
    for case in 0..cases {
        let limits = limits(&mut rng);
        let mut entries: Vec<Value> = if rng.chance(40) {
            fixture_entries.clone()
        } else {
            Vec::new()
        };
        let mut known: Vec<String> = entries
            .iter()
            .filter_map(|e| e["name"].as_str().map(str::to_owned))
            .collect();
        let hostile = rng.below(100);
        for _ in 0..rng.below(if entries.is_empty() { 30 } else { 6 }) {
            let e = if rng.below(100) < hostile {
                entry(&mut rng, &known)
            } else {
                honest_entry(&mut rng)
            };
            if let Some(n) = e["name"].as_str() {
                known.push(n.to_owned());
            }
            let at = rng.below(entries.len() as u64 + 1) as usize;
            entries.insert(at, e);
        }
        // mutate some fixture fields in place
        for _ in 0..rng.below(3) * u64::from(hostile > 50) {
            if entries.is_empty() {
                break;
            }
            let at = rng.below(entries.len() as u64) as usize;
            let key = *rng.pick(&["size", "offset", "chunkOffset", "chunkSize", "innerOffset"]);
            entries[at][key] = number(&mut rng).into();
        }
        let mut json =
            serde_json::to_vec(&json!({"version": 1, "entries": entries})).expect("json");
        if rng.chance(10) {
            mangle(&mut rng, &mut json);
        }
        let toc_offset = if rng.chance(90) {
            TOC_OFFSET
        } else {
            number(&mut rng).min(TOC_OFFSET)
        };
        let outcome = crate::format::parse_toc(&json, limits.max_entries).and_then(|toc| {
            assert!(toc.entries.len() as u64 <= limits.max_entries);
            Ok(build_index(&toc, toc_offset, &limits)?)
        });
        match outcome {
            Ok(index) => {
                built += 1;
                check_invariants(&index, &limits);
            }
            Err(e) => {
                refused += 1;
                let text = crate::error_chain(&e);
                assert!(
                    text.len() < 4096,
                    "case {case}: message of {} bytes",
                    text.len()
                );
            }
        }
    }
    // Both outcomes must really be exercised, or the generator has gone wrong.
    assert!(
        built > cases / 10 && refused > cases / 10,
        "built {built}, refused {refused}"
    );
}
