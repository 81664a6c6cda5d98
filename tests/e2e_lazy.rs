//! Lazy pulling through a real containerd: eStargz and zstd:chunked images converted by
//! Debian's `ctr-remote`, pulled with `ctr-remote image rpull --snapshotter lazysnap`, mounted
//! over FUSE, fetched on demand.

mod harness;

use std::time::{Duration, Instant};

use harness::{image, Stack};

const LAZYSNAP: &str = env!("CARGO_BIN_EXE_lazysnap");

/// Prints `inode path` for every regular file with more than one name.
const HARDLINK_GROUPS: &str =
    "find / -xdev -type f -links +1 -exec stat -c '%i %n' {} + 2>/dev/null | sort -k2";

/// Pushes the standard image as plain gzip and converted with `flags`; returns both refs.
fn push_converted(stack: &Stack, name: &str, flags: &[&str]) -> (String, String) {
    let plain = stack.image_ref(&format!("{name}:gzip"));
    image::push(&image::standard_image(), &stack.dir, &plain);
    let lazy = stack.image_ref(&format!("{name}:lazy"));
    stack.convert_and_push(&plain, &lazy, flags);
    (plain, lazy)
}

fn lazily_mounted_layers(stack: &Stack) -> usize {
    stack.lazysnap_log().matches("layer mounted lazily").count()
}

fn same_tree_as_overlayfs(flags: &[&str], name: &str) {
    let stack = Stack::start(LAZYSNAP);
    let (plain, lazy) = push_converted(&stack, name, flags);

    let before = stack.registry_blob_bytes();
    let started = Instant::now();
    stack.rpull(&lazy);
    let pull_time = started.elapsed();
    let fetched_at_pull = stack.registry_blob_bytes() - before;
    assert_eq!(
        lazily_mounted_layers(&stack),
        3,
        "every layer mounted lazily:\n{}",
        stack.lazysnap_log()
    );
    // What a normal pull of the same image downloads: every layer.
    let before_full = stack.registry_blob_bytes();
    stack.pull("overlayfs", &lazy);
    let full = stack.registry_blob_bytes() - before_full;
    assert!(
        fetched_at_pull * 20 <= full,
        "the lazy pull fetched {fetched_at_pull} bytes, more than 5% of the image's {full}"
    );

    stack.pull("overlayfs", &plain);
    let ours = stack.run("lazysnap", &lazy, "describe-lazy", harness::DESCRIBE_FS);
    let theirs = stack.run("overlayfs", &plain, "describe-plain", harness::DESCRIBE_FS);
    let diff = harness::diff_lines(&theirs, &ours);
    assert!(
        diff.is_empty(),
        "container views differ (- overlayfs, + lazysnap):\n{diff}"
    );
    assert!(
        ours.lines().count() > 40,
        "the description covers the image:\n{ours}"
    );
    // Hard-link groups: which paths share an inode, compared as sets of names.
    let groups = |snapshotter: &str, image: &str, id: &str| {
        let out = stack.run(snapshotter, image, id, HARDLINK_GROUPS);
        let mut by_inode = std::collections::BTreeMap::<String, Vec<String>>::new();
        for line in out.lines() {
            if let Some((ino, path)) = line.split_once(' ') {
                by_inode
                    .entry(ino.to_owned())
                    .or_default()
                    .push(path.to_owned());
            }
        }
        let mut groups: Vec<Vec<String>> = by_inode.into_values().collect();
        groups.sort();
        groups
    };
    let ours_groups = groups("lazysnap", &lazy, "links-lazy");
    assert_eq!(ours_groups, groups("overlayfs", &plain, "links-plain"));
    assert!(
        ours_groups.iter().any(|g| g.len() == 2),
        "the image's hard link is a group: {ours_groups:?}"
    );

    // xattrs, read from the host on each snapshotter's copy of the layer.
    let lazy_value = harness::layer_xattr(
        &stack.lazysnap_root().join("snapshots"),
        "data/xattr",
        "user.lazysnap",
    );
    let plain_value = harness::layer_xattr(
        &stack
            .dir
            .join("containerd-root/io.containerd.snapshotter.v1.overlayfs/snapshots"),
        "data/xattr",
        "user.lazysnap",
    );
    assert_eq!(lazy_value.as_deref(), Some(b"yes".as_slice()));
    assert_eq!(lazy_value, plain_value);
    eprintln!(
        "{name}: rpull took {pull_time:?} and fetched {fetched_at_pull} of {full} compressed bytes ({:.2}%)",
        fetched_at_pull as f64 * 100.0 / full as f64
    );
}

#[test]
fn estargz_image_is_pulled_lazily_and_looks_the_same() {
    same_tree_as_overlayfs(&["--estargz"], "esgz");
}

#[test]
fn zstd_chunked_image_is_pulled_lazily_and_looks_the_same() {
    same_tree_as_overlayfs(&["--zstdchunked"], "zstdchunked");
}

#[test]
fn registry_outage_fails_reads_with_eio_in_time_and_recovers() {
    let config_dir = tempfile::tempdir().expect("tempdir");
    let config = config_dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[registry]\nread_deadline = \"2s\"\nrequest_timeout = \"1s\"\n[fuse]\nread_timeout = \"4s\"\n",
    )
    .expect("write config");
    let mut stack = Stack::start_with(
        LAZYSNAP,
        vec!["--config".into(), config.display().to_string()],
    );
    let (_, lazy) = push_converted(&stack, "outage", &["--estargz"]);
    stack.rpull(&lazy);
    // A long-lived container: reads before, during and after the outage.
    let out = stack.run("lazysnap", &lazy, "warm", "cat /data/small.txt");
    assert_eq!(out, "hello from layer 2\n");

    let port = stack.registry_port();
    stack.stop_registry();
    let started = Instant::now();
    let result = stack.try_ctr(&[
        "run", "--rm", "--snapshotter", "lazysnap", &lazy, "outage", "/bin/sh", "-c",
        "cat /data/small.txt; if cat /data/big.bin > /dev/null; then echo READ-OK; else echo READ-FAILED; fi",
    ]);
    let elapsed = started.elapsed();
    let out = result.unwrap_or_else(|e| panic!("container failed: {e}"));
    assert!(
        out.starts_with("hello from layer 2\n"),
        "cached file still reads: {out}"
    );
    assert!(
        out.contains("READ-FAILED"),
        "uncached data must fail, not succeed: {out}"
    );
    assert!(
        elapsed < Duration::from_secs(20),
        "the failing read took {elapsed:?}"
    );
    eprintln!("read of uncached data with the registry down failed after {elapsed:?} (deadline 2s, FUSE timeout 4s)");

    stack.start_registry(port);
    let out = stack.run(
        "lazysnap",
        &lazy,
        "recovered",
        "sha256sum /data/big.bin | cut -c1-8",
    );
    assert_eq!(
        out.len(),
        9,
        "after the registry is back, reads work: {out}"
    );
}

#[test]
fn reading_one_small_file_fetches_a_small_part_of_a_large_layer() {
    let stack = Stack::start(LAZYSNAP);
    let mut spec = image::standard_image();
    spec.layers.push(vec![
        image::Entry::dir("large"),
        image::Entry::file("large/blob-a.bin", image::pseudo_random(24 << 20, 7)),
        image::Entry::file("large/needle.txt", "the small file\n"),
        image::Entry::file("large/blob-b.bin", image::pseudo_random(24 << 20, 8)),
    ]);
    let plain = stack.image_ref("large:gzip");
    image::push(&spec, &stack.dir, &plain);
    let lazy = stack.image_ref("large:lazy");
    stack.convert_and_push(&plain, &lazy, &["--estargz"]);
    stack.rpull(&lazy);
    let (digest, size) = stack
        .lazy_layers()
        .into_iter()
        .next()
        .expect("a lazy layer");
    let before = stack.registry_blob_bytes_of(&digest);
    let out = stack.run("lazysnap", &lazy, "needle", "cat /large/needle.txt");
    assert_eq!(out, "the small file\n");
    let fetched = stack.registry_blob_bytes_of(&digest) - before;
    let percent = fetched as f64 * 100.0 / size as f64;
    eprintln!(
        "reading one small file fetched {fetched} of the layer's {size} bytes ({percent:.3}%)"
    );
    assert!(fetched * 100 < size, "fetched {fetched} of {size} bytes");
}

#[test]
fn restart_after_sigkill_remounts_from_saved_state() {
    let mut stack = Stack::start(LAZYSNAP);
    let (_, lazy) = push_converted(&stack, "restart", &["--estargz"]);
    stack.rpull(&lazy);
    assert_eq!(
        stack.run("lazysnap", &lazy, "first", "cat /top.txt"),
        "layer 3\n"
    );

    stack.kill_lazysnap();
    let requests = stack.registry_requests();
    stack.start_lazysnap();
    let log = stack.lazysnap_log();
    assert_eq!(log.matches("remounted lazy layer").count(), 3, "{log}");
    assert_eq!(
        stack.registry_requests(),
        requests,
        "remounting must not ask the registry for footers or TOCs"
    );
    let out = stack.run_after_restart(&lazy, "second", &["cat", "/top.txt", "/data/small.txt"]);
    assert_eq!(out, "layer 3\nhello from layer 2\n");
}
