//! Layers that lie or attack, served from the test registry as eStargz: each is refused or
//! falls back to the ordinary path with a log line that says why, nothing outside the layer
//! is touched, and the daemon keeps serving everything else.

mod harness;

use harness::estargz::{self, File};
use harness::image::{self, BlobLayer};
use harness::Stack;

const LAZYSNAP: &str = env!("CARGO_BIN_EXE_lazysnap");

/// Two files; `case` makes each layer's content, and so its chain ID, unique: containerd
/// skips layers it already has.
fn good_files(case: &str) -> Vec<File> {
    vec![
        File::new("app/hello.txt", "hello\n"),
        File::new("app/data.bin", image::pseudo_random(300_000, 3)),
        File::new("app/case", case),
    ]
}

#[test]
fn mixed_image_lazy_and_plain_layers() {
    let stack = Stack::start(LAZYSNAP);
    let reference = image::push_over_busybox(
        &stack,
        "mixed",
        estargz::layer(&["app/"], &good_files("mixed")).into(),
    );
    stack.rpull(&reference);
    let log = stack.lazysnap_log();
    assert_eq!(log.matches("layer mounted lazily").count(), 1, "{log}");
    assert_eq!(
        log.matches("layer is not lazy").count(),
        1,
        "the busybox layer is plain gzip:\n{log}"
    );
    let out = stack.run(
        "lazysnap",
        &reference,
        "mixed",
        "cat /app/hello.txt && /bin/busybox true && echo ok",
    );
    assert_eq!(out, "hello\nok\n");
}

#[test]
fn hostile_layers_are_refused_and_the_daemon_keeps_serving() {
    let stack = Stack::start(LAZYSNAP);
    let root = stack.lazysnap_root();

    // A TOC entry that climbs out of the layer: not mounted lazily; containerd's own
    // extraction confines the path to the snapshot.
    let escape = estargz::layer(
        &["app/"],
        &[
            File::new("../../escaped.txt", "x"),
            File::new("app/hello.txt", "hello\n"),
        ],
    );
    let reference = image::push_over_busybox(&stack, "escape", escape.into());
    // falls back to unpacking
    stack.rpull(&reference);
    let log = stack.lazysnap_log();
    assert!(
        log.contains("\"../../escaped.txt\"") && log.contains("falling back"),
        "{log}"
    );
    assert!(!root.join("escaped.txt").exists() && !stack.dir.join("escaped.txt").exists());
    assert!(!root.join("snapshots/escaped.txt").exists());

    // An absolute name is confined to the layer, as tar extractors do: it mounts lazily and
    // shows up at the layer's root.
    let absolute = estargz::layer(
        &["app/"],
        &[
            File::new("/absolute.txt", "inside\n"),
            File::new("app/case", "absolute"),
        ],
    );
    let reference = image::push_over_busybox(&stack, "absolute", absolute.into());
    stack.rpull(&reference);
    assert_eq!(
        stack.run("lazysnap", &reference, "absolute", "cat /absolute.txt"),
        "inside\n"
    );
    assert!(!std::path::Path::new("/absolute.txt").exists());

    // A TOC that does not match the digest the manifest pins.
    let mut lying_toc: BlobLayer = estargz::layer(&["app/"], &good_files("tocdigest")).into();
    lying_toc.annotations[0].1 = format!("sha256:{}", "1".repeat(64));
    let reference = image::push_over_busybox(&stack, "tocdigest", lying_toc);
    // falls back to unpacking
    stack.rpull(&reference);
    assert!(
        stack.lazysnap_log().contains("TOC digest is"),
        "{}",
        stack.lazysnap_log()
    );
    assert_eq!(
        stack.run("lazysnap", &reference, "tocdigest", "cat /app/hello.txt"),
        "hello\n"
    );

    // A truncated footer: not recognised as lazy; containerd then finds the gzip stream cut.
    let mut cut: BlobLayer = estargz::layer(&["app/"], &good_files("cut")).into();
    cut.blob.truncate(cut.blob.len() - 20);
    let reference = image::push_over_busybox(&stack, "cut", cut);
    let pulled = stack.try_rpull(&reference);
    assert!(
        pulled.is_err(),
        "a truncated layer must not be pulled: {pulled:?}"
    );
    assert!(
        stack
            .lazysnap_log()
            .contains("no eStargz or zstd:chunked footer"),
        "{}",
        stack.lazysnap_log()
    );

    // A chunk whose bytes do not match its digest: the layer mounts (its TOC is fine), that
    // file's read fails with EIO, the other file reads.
    let mut files = good_files("chunk");
    files[1].lie_about_digest = true;
    let reference =
        image::push_over_busybox(&stack, "chunk", estargz::layer(&["app/"], &files).into());
    stack.rpull(&reference);
    let out = stack.run(
        "lazysnap",
        &reference,
        "chunk",
        "cat /app/hello.txt; if cat /app/data.bin > /dev/null 2>&1; then echo READ-OK; else echo EIO; fi",
    );
    assert_eq!(out, "hello\nEIO\n");
    assert!(
        stack.lazysnap_log().contains("content hashes to"),
        "{}",
        stack.lazysnap_log()
    );

    // The daemon still serves good lazy layers.
    let reference = image::push_over_busybox(
        &stack,
        "good",
        estargz::layer(&["app/"], &good_files("good")).into(),
    );
    stack.rpull(&reference);
    assert_eq!(
        stack.run("lazysnap", &reference, "good", "cat /app/hello.txt"),
        "hello\n"
    );
}
