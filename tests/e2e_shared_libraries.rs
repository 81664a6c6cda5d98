//! A container's read of the start of a dynamically linked program fetches the libraries the
//! program names, from another lazy layer of the same image, before anything reads them:
//! through a real containerd and docker-registry, with prefetch off so that no other
//! mechanism asks for the library's layer.

mod harness;

use std::time::{Duration, Instant};

use harness::estargz::{self, File};
use harness::image::{self, ImageSpec};
use harness::throttle::Throttle;
use harness::Stack;
use sha2::{Digest as _, Sha256};

const LAZYSNAP: &str = env!("CARGO_BIN_EXE_lazysnap");

/// lazysnap's range requests for blob `digest` in the registry's access log.
fn lazysnap_requests_of(stack: &Stack, digest: &str) -> usize {
    let log = stack
        .registry
        .as_ref()
        .and_then(|r| std::fs::read_to_string(&r.log).ok())
        .unwrap_or_default();
    log.lines()
        .filter(|l| l.contains("/blobs/") && l.contains(digest) && l.contains("lazysnap/"))
        .count()
}

#[test]
fn reading_a_program_fetches_the_libraries_it_needs_from_the_layer_below() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("lazysnap.toml");
    std::fs::write(&config, "[prefetch]\nenabled = false\n").expect("write config");
    let stack = Stack::start_with(
        LAZYSNAP,
        vec!["--config".into(), config.display().to_string()],
    );
    let registry: std::net::SocketAddr = format!("127.0.0.1:{}", stack.registry_port())
        .parse()
        .expect("registry address");
    let throttle = Throttle::start(registry, Duration::from_millis(20), 1000.0);

    // This machine's /usr/bin/true names libc.so.6; the "library" is only ever read by
    // lazysnap, so any bytes do.
    let program = std::fs::read("/usr/bin/true").expect("read /usr/bin/true");
    let library = image::pseudo_random(300_000, 3);
    let lib_dir = "usr/lib/x86_64-linux-gnu";
    let libs = estargz::layer(
        &["usr/", "usr/lib/", &format!("{lib_dir}/")],
        &[
            File::new(&format!("{lib_dir}/libc.so.6"), library),
            File::new(
                &format!("{lib_dir}/libunrelated.so.1"),
                image::pseudo_random(300_000, 4),
            ),
        ],
    );
    let libs_digest = format!("sha256:{}", hex::encode(Sha256::digest(&libs.blob)));
    let app = estargz::layer(&["app/"], &[File::new("app/prog", program)]);
    let spec = ImageSpec {
        layers: vec![image::busybox_layer()],
        blobs: vec![libs.into(), app.into()],
        cmd: vec!["/bin/sh".into()],
    };
    image::push(&spec, &stack.dir, &stack.image_ref("libs:1"));
    let reference = format!("{}/libs:1", throttle.addr());
    stack.rpull(&reference);
    let resolving = lazysnap_requests_of(&stack, &libs_digest);
    assert!(resolving > 0, "the library layer was resolved");

    // Only the program's first bytes are read; nothing in the container touches the library.
    let out = stack.run(
        "lazysnap",
        &reference,
        "libs",
        "head -c 4 /app/prog | tail -c 3",
    );
    assert_eq!(out.trim(), "ELF");

    let deadline = Instant::now() + Duration::from_secs(10);
    while lazysnap_requests_of(&stack, &libs_digest) == resolving && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = stack.lazysnap_log();
    assert!(
        lazysnap_requests_of(&stack, &libs_digest) > resolving,
        "the library's layer was not asked for its bytes:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("fetching a program's libraries") && l.contains("fetching=1")),
        "lazysnap did not fetch the program's one library:\n{log}"
    );
}
