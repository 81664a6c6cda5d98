//! Real Debian roots for the benchmark corpus: a `debootstrap --variant=minbase` root of this
//! machine's release, and stages on top of it, each made by copying the stage below and running
//! `apt-get install` in a chroot — the way a Dockerfile's `RUN apt-get install` makes a layer.
//! Each stage becomes one image layer: the files it added or changed, and whiteouts for what
//! it removed. Roots are kept under a work directory and reused by later runs (a directory is
//! complete once renamed into place).
//!
//! Needs root, `debootstrap` and access to a Debian mirror (the same apt mirror this machine
//! installs from).

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::layout::{Layer, LayerWriter};

/// Paths whose contents never go into a layer: kernel and runtime file systems, apt's
/// downloads and lists (as a Dockerfile would `rm -rf /var/lib/apt/lists/*`), logs, and the
/// resolv.conf copied in for the chroot's apt.
const NOT_IN_LAYERS: &[&str] = &[
    "dev/",
    "proc/",
    "sys/",
    "run/",
    "tmp/",
    "var/cache/apt/",
    "var/lib/apt/lists/",
    "var/log/",
    "var/cache/debconf/",
    "etc/resolv.conf",
];

fn excluded(rel: &str) -> bool {
    // "dir/" excludes what is in dir, not dir itself.
    NOT_IN_LAYERS.iter().any(|p| {
        if p.ends_with('/') {
            rel.starts_with(p)
        } else {
            rel == *p
        }
    })
}

/// The Debian release this machine runs (`VERSION_CODENAME` of /etc/os-release).
pub fn codename() -> String {
    let text = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|s| s.trim_matches('"').to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "bookworm".into())
}

/// The first `deb.debian.org`-style mirror of the main archive in this machine's apt sources,
/// or Debian's default.
pub fn mirror() -> String {
    let mut texts = vec![std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default()];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            texts.push(std::fs::read_to_string(p).unwrap_or_default());
        }
    }
    for text in &texts {
        for line in text.lines() {
            let line = line.trim();
            // one-line format: "deb URL suite components"; deb822: "URIs: URL"
            let url = line
                .strip_prefix("deb ")
                .and_then(|r| r.split_whitespace().find(|w| w.contains("://")))
                .or_else(|| line.strip_prefix("URIs:").map(str::trim));
            if let Some(url) = url {
                let url = url.trim_end_matches('/');
                if url.ends_with("/debian") {
                    return url.to_owned();
                }
            }
        }
    }
    "http://deb.debian.org/debian".into()
}

fn run(what: &str, cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `work/minbase`: a minbase root, made with debootstrap unless a previous run left it.
pub fn minbase(work: &Path) -> PathBuf {
    let dir = work.join("minbase");
    if dir.is_dir() {
        return dir;
    }
    let tmp = work.join("minbase.tmp");
    remove_tree(&tmp);
    std::fs::create_dir_all(work).expect("create work dir");
    let (suite, url) = (codename(), mirror());
    eprintln!("  debootstrap --variant=minbase {suite} from {url} ...");
    run(
        "debootstrap",
        Command::new("debootstrap")
            .args(["--variant=minbase", &suite])
            .arg(&tmp)
            .arg(&url),
    );
    std::fs::rename(&tmp, &dir).expect("move minbase root into place");
    dir
}

/// `work/NAME`: `parent` plus `packages` installed with apt in a chroot (no recommends), then
/// `extra` run on the root, unless a previous run left it.
pub fn stage(
    work: &Path,
    name: &str,
    parent: &Path,
    packages: &[&str],
    extra: impl FnOnce(&Path),
) -> PathBuf {
    let dir = work.join(name);
    if dir.is_dir() {
        return dir;
    }
    let tmp = work.join(format!("{name}.tmp"));
    remove_tree(&tmp);
    run("cp -a", Command::new("cp").arg("-a").arg(parent).arg(&tmp));
    if !packages.is_empty() {
        eprintln!("  apt-get install {} in a chroot ...", packages.join(" "));
        let _ = std::fs::copy("/etc/resolv.conf", tmp.join("etc/resolv.conf"));
        let script = format!(
            "apt-get update -qq && apt-get install -y -qq --no-install-recommends {} && apt-get clean",
            packages.join(" ")
        );
        run(
            &format!(
                "apt-get install {} in {}",
                packages.join(" "),
                tmp.display()
            ),
            Command::new("chroot")
                .arg(&tmp)
                .args(["/usr/bin/env", "DEBIAN_FRONTEND=noninteractive", "LC_ALL=C"])
                .args(["/bin/sh", "-c", &script]),
        );
    }
    extra(&tmp);
    std::fs::rename(&tmp, &dir).expect("move stage into place");
    dir
}

fn remove_tree(dir: &Path) {
    if dir.exists() {
        std::fs::remove_dir_all(dir).unwrap_or_else(|e| panic!("remove {}: {e}", dir.display()));
    }
}

/// Relative paths of everything under `root` that can go into a layer, sorted (parents first).
fn walk(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let entries =
            std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("list {}: {e}", dir.display()));
        for entry in entries {
            let entry = entry.unwrap_or_else(|e| panic!("list {}: {e}", dir.display()));
            let name = entry.file_name();
            let name = name.to_str().expect("Debian's file names are UTF-8");
            let child = if rel.is_empty() {
                name.to_owned()
            } else {
                format!("{rel}/{name}")
            };
            if excluded(&child) {
                continue;
            }
            let kind = entry.file_type().expect("file type");
            out.insert(child.clone());
            if kind.is_dir() {
                stack.push((entry.path(), child));
            }
        }
    }
    out
}

/// Whether `rel` is the same in both roots: type, mode, owner, size, mtime, link target.
fn same(old: &Path, new: &Path, rel: &str) -> bool {
    let (a, b) = (old.join(rel), new.join(rel));
    let (Ok(ma), Ok(mb)) = (std::fs::symlink_metadata(&a), std::fs::symlink_metadata(&b)) else {
        return false;
    };
    if ma.mode() != mb.mode()
        || ma.uid() != mb.uid()
        || ma.gid() != mb.gid()
        || ma.file_type() != mb.file_type()
    {
        return false;
    }
    if ma.file_type().is_symlink() {
        return std::fs::read_link(&a).ok() == std::fs::read_link(&b).ok();
    }
    if ma.is_dir() {
        // A directory's mtime changes with its entries; its entries are compared one by one.
        return true;
    }
    ma.len() == mb.len() && ma.mtime() == mb.mtime() && ma.mtime_nsec() == mb.mtime_nsec()
}

/// Writes the layer that turns `old` (or nothing) into `new`: every entry of `new` that is
/// new or changed (with its parent directories), and a whiteout for every entry of `old` that
/// is gone (the topmost one of a removed tree).
pub fn write_diff(old: Option<&Path>, new: &Path, writer: &mut LayerWriter) -> usize {
    let new_paths = walk(new);
    let old_paths = old.map(walk).unwrap_or_default();
    let mut chosen: BTreeSet<String> = BTreeSet::new();
    for rel in &new_paths {
        let unchanged = old.is_some_and(|o| old_paths.contains(rel) && same(o, new, rel));
        if !unchanged {
            // Parents first, so the layer recreates them with their modes.
            let mut parent = rel.as_str();
            while let Some((p, _)) = parent.rsplit_once('/') {
                chosen.insert(p.to_owned());
                parent = p;
            }
            chosen.insert(rel.clone());
        }
    }
    let mut whiteouts: Vec<&String> = Vec::new();
    for rel in &old_paths {
        if new_paths.contains(rel) {
            continue;
        }
        // Only the topmost removed entry: a removed directory hides its contents.
        let parent_gone = rel
            .rsplit_once('/')
            .is_some_and(|(p, _)| !new_paths.contains(p));
        if !parent_gone {
            whiteouts.push(rel);
            if let Some((p, _)) = rel.rsplit_once('/') {
                let mut parent = p;
                chosen.insert(parent.to_owned());
                while let Some((pp, _)) = parent.rsplit_once('/') {
                    chosen.insert(pp.to_owned());
                    parent = pp;
                }
            }
        }
    }
    for rel in &chosen {
        writer.host_path(&new.join(rel), rel);
    }
    for rel in &whiteouts {
        writer.whiteout(rel);
    }
    chosen.len() + whiteouts.len()
}

/// The layer of `new` over `old`, written once into `layout` and remembered in
/// `layout/layers/NAME.json`, so a later run reuses it.
pub fn diff_layer(layout: &Path, name: &str, old: Option<&Path>, new: &Path) -> Layer {
    cached_layer(layout, name, || {
        let mut writer = LayerWriter::create(layout, 6);
        let entries = write_diff(old, new, &mut writer);
        let layer = writer.finish();
        eprintln!(
            "  layer {name}: {entries} entries, {:.1} MiB tar, {:.1} MiB gzip",
            layer.tar_size as f64 / 1048576.0,
            layer.size as f64 / 1048576.0
        );
        layer
    })
}

/// `make`'s layer, or the one a previous run wrote under `name`.
pub fn cached_layer(layout: &Path, name: &str, make: impl FnOnce() -> Layer) -> Layer {
    let record = layout.join("layers").join(format!("{name}.json"));
    if let Some(layer) = std::fs::read(&record)
        .ok()
        .and_then(|b| serde_json::from_slice::<Layer>(&b).ok())
    {
        let blob = layout
            .join("blobs/sha256")
            .join(layer.digest.trim_start_matches("sha256:"));
        if blob.metadata().is_ok_and(|m| m.len() == layer.size) {
            return layer;
        }
    }
    let layer = make();
    std::fs::create_dir_all(record.parent().expect("parent")).expect("create layers dir");
    std::fs::write(&record, serde_json::to_vec(&layer).expect("layer json"))
        .expect("write layer record");
    layer
}
