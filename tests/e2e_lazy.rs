//! Lazy pulling through a real containerd: eStargz and zstd:chunked images converted by
//! Debian's `ctr-remote`, pulled with `ctr-remote image rpull --snapshotter lazysnap`, mounted
//! over FUSE, fetched on demand.

mod harness;

use std::time::{Duration, Instant};

use harness::{image, Stack};

const LAZYSNAP: &str = env!("CARGO_BIN_EXE_lazysnap");

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
    stack.ctr_remote(&[
        "image",
        "rpull",
        "--plain-http",
        "--snapshotter",
        "lazysnap",
        &lazy,
    ]);
    let pull_time = started.elapsed();
    let fetched_at_pull = stack.registry_blob_bytes() - before;
    assert_eq!(
        lazily_mounted_layers(&stack),
        3,
        "every layer mounted lazily:\n{}",
        stack.lazysnap_log()
    );

    stack.ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "overlayfs",
        &plain,
    ]);
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
    eprintln!(
        "{name}: rpull took {pull_time:?} and fetched {fetched_at_pull} blob bytes (manifest, config, footers, TOCs)"
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
    stack.ctr_remote(&[
        "image",
        "rpull",
        "--plain-http",
        "--snapshotter",
        "lazysnap",
        &lazy,
    ]);
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
