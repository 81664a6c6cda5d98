//! Containment of lazy mounts, through a real containerd and registry: a lazy layer whose
//! mount dies under a live daemon (FUSE connection aborted, or `umount -l`) is reported dead by
//! `lazysnap mounts` and mounted again before the next container gets it, instead of that
//! container silently getting the empty directory underneath; and directories a layer implies
//! without listing them look as they do after a normal pull.

mod harness;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use harness::estargz::{self, Dir, File};
use harness::image::{self, Entry, ImageSpec};
use harness::Stack;

const LAZYSNAP: &str = env!("CARGO_BIN_EXE_lazysnap");

/// What a container of the standard image sees of its top layer: a file it adds, a file of the
/// layer below, and a file the top layer deletes with a whiteout.
const SCRIPT: &str =
    "cat /top.txt /data/small.txt; if [ -e /data/gone ]; then echo GONE-IS-BACK; fi";
const EXPECTED: &str = "layer 3\nhello from layer 2\n";

fn fusectl_mounted() -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(2) == Some("fusectl"))
}

/// Aborts the FUSE connection behind `mountpoint`, as an operator (or a crash of the kernel
/// side) would: `/sys/fs/fuse/connections/<minor of st_dev>/abort`.
fn abort_connection(mountpoint: &Path) {
    if !fusectl_mounted() {
        let status = Command::new("mount")
            .args(["-t", "fusectl", "fusectl", "/sys/fs/fuse/connections"])
            .status()
            .expect("run mount");
        assert!(status.success(), "mount fusectl");
    }
    let dev = std::fs::metadata(mountpoint)
        .expect("stat mountpoint")
        .dev();
    let abort = format!(
        "/sys/fs/fuse/connections/{}/abort",
        nix::sys::stat::minor(dev)
    );
    std::fs::write(&abort, "1").unwrap_or_else(|e| panic!("write {abort}: {e}"));
    // Until the FUSE session notices and unmounts itself, the mount answers ENOTCONN; then
    // what is left is the empty directory underneath.
    match std::fs::read_dir(mountpoint) {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{e}"),
        Ok(mut entries) => assert!(entries.next().is_none(), "the directory underneath"),
    }
}

fn lazy_unmount(mountpoint: &Path) {
    let status = Command::new("umount")
        .arg("-l")
        .arg(mountpoint)
        .status()
        .expect("run umount");
    assert!(status.success(), "umount -l {}", mountpoint.display());
    assert!(
        std::fs::read_dir(mountpoint)
            .expect("the directory underneath")
            .next()
            .is_none(),
        "what is left at the mountpoint is the empty directory"
    );
}

/// (mountpoint, state) of every lazy mount, from `lazysnap mounts --json`.
fn mount_states(stack: &Stack) -> Vec<(PathBuf, String)> {
    let json = stack.cli_json(&["mounts"]);
    json["mounts"]
        .as_array()
        .expect("mounts array")
        .iter()
        .map(|m| {
            (
                PathBuf::from(m["mountpoint"].as_str().expect("mountpoint")),
                m["state"].as_str().expect("state").to_owned(),
            )
        })
        .collect()
}

fn state_of(stack: &Stack, mountpoint: &Path) -> String {
    mount_states(stack)
        .into_iter()
        .find(|(p, _)| p == mountpoint)
        .map(|(_, s)| s)
        .unwrap_or_else(|| panic!("{} not listed", mountpoint.display()))
}

fn dead_layer_is_repaired(name: &str, kill: fn(&Path)) {
    let stack = Stack::start(LAZYSNAP);
    let plain = stack.image_ref(&format!("{name}:gzip"));
    image::push(&image::standard_image(), &stack.dir, &plain);
    let lazy = stack.image_ref(&format!("{name}:lazy"));
    stack.convert_and_push(&plain, &lazy, &["--estargz"]);
    stack.rpull(&lazy);
    assert_eq!(stack.run("lazysnap", &lazy, "before", SCRIPT), EXPECTED);

    // The top layer: it adds /top.txt and deletes /data/gone.
    let states = mount_states(&stack);
    assert_eq!(states.len(), 3, "{states:?}");
    let top = states
        .iter()
        .map(|(p, _)| p.clone())
        .find(|p| p.join("top.txt").exists())
        .expect("the top layer's mount");

    kill(&top);
    let started = std::time::Instant::now();
    let state = state_of(&stack, &top);
    let listed_in = started.elapsed();
    assert_eq!(state, "dead", "{}", stack.lazysnap_log());
    let table = stack.cli(&["mounts"]);
    assert!(table.contains("dead"), "{table}");
    for (point, state) in mount_states(&stack) {
        if point != top {
            assert_ne!(state, "dead", "{} is alive", point.display());
        }
    }

    let out = stack.run("lazysnap", &lazy, "after", SCRIPT);
    assert_eq!(
        out,
        EXPECTED,
        "the new container sees the layer, not the empty directory\n{}",
        stack.lazysnap_log()
    );
    let log = stack.lazysnap_log();
    let line = log
        .lines()
        .find(|l| l.contains("lazy layer mount was dead; mounted it again"))
        .unwrap_or_else(|| panic!("a log line says the layer was repaired:\n{log}"));
    assert!(line.contains("sha256:"), "names the layer: {line}");
    assert!(
        line.contains(&top.display().to_string()),
        "names the mountpoint: {line}"
    );
    assert!(line.contains("WARN"), "at warn: {line}");
    assert_ne!(state_of(&stack, &top), "dead");
    assert_eq!(stack.run("lazysnap", &lazy, "again", SCRIPT), EXPECTED);
    eprintln!("{name}: `lazysnap mounts` listed the dead mount in {listed_in:?}; repaired: {line}");
}

#[test]
fn aborted_fuse_connection_is_reported_and_repaired() {
    harness::require_root();
    dead_layer_is_repaired("abort", abort_connection);
}

#[test]
fn lazily_unmounted_layer_is_reported_and_repaired() {
    harness::require_root();
    dead_layer_is_repaired("umountl", lazy_unmount);
}

/// A layer that names `app/new.txt` without `app/` (as umoci writes layers) over layers where
/// `app` is `0750 1000:1001`: the container sees `app` as a normal pull shows it, whether the
/// layer below is lazy (FUSE) or unpacked.
#[test]
fn implied_directories_look_as_in_a_normal_pull() {
    harness::require_root();
    let stack = Stack::start(LAZYSNAP);
    let mut base = image::busybox_layer();
    base.push(Entry::Dir {
        path: "srv".into(),
        mode: 0o710,
        uid: 7,
        gid: 8,
    });
    base.push(Entry::file("srv/base.txt", "base\n"));
    let lower = estargz::layer_with_dirs(
        &[
            Dir::new("app/", 0o750, 1000, 1001),
            Dir::new("app/sub/", 0o700, 1000, 1001),
        ],
        &[
            File::new("app/old.txt", "old\n"),
            File::new("app/sub/old.txt", "old\n"),
        ],
    );
    // No directory entries at all.
    let top = estargz::layer_with_dirs(
        &[],
        &[
            File::new("app/new.txt", "new\n"),
            File::new("app/sub/new.txt", "new\n"),
            File::new("srv/top.txt", "top\n"),
            File::new("fresh/dir/f.txt", "fresh\n"),
        ],
    );
    let spec = ImageSpec {
        layers: vec![base],
        blobs: vec![lower.into(), top.into()],
        cmd: vec!["/bin/sh".into()],
    };
    let reference = stack.image_ref("implied:1");
    image::push(&spec, &stack.dir, &reference);
    stack.rpull(&reference);
    let log = stack.lazysnap_log();
    assert_eq!(
        log.matches("layer mounted lazily").count(),
        2,
        "both eStargz layers are lazy:\n{log}"
    );
    stack.pull("overlayfs", &reference);
    let ours = stack.run("lazysnap", &reference, "implied-lazy", harness::DESCRIBE_FS);
    let theirs = stack.run(
        "overlayfs",
        &reference,
        "implied-plain",
        harness::DESCRIBE_FS,
    );
    // The hand-made layers' tar streams carry their TOC as a file, which unpacking shows and
    // the lazy mount (like stargz-snapshotter's) does not: not what this test is about.
    let theirs: String = theirs
        .lines()
        .filter(|l| !l.starts_with("/stargz.index.json|"))
        .map(|l| format!("{l}\n"))
        .collect();
    let diff = harness::diff_lines(&theirs, &ours);
    assert!(
        diff.is_empty(),
        "container views differ (- overlayfs, + lazysnap):\n{diff}"
    );
    for line in [
        "/app|directory|750|1000|1001",
        "/app/sub|directory|700|1000|1001",
        "/srv|directory|710|7|8",
        "/fresh|directory|755|0|0",
        "/fresh/dir|directory|755|0|0",
        "/app/new.txt|regular file|644|0|0",
    ] {
        assert!(
            ours.lines().any(|l| l.starts_with(line)),
            "{line} in:\n{ours}"
        );
    }
}
