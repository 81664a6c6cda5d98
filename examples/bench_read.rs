//! Benchmark (not a test): sequential read throughput of a large file in a lazily pulled
//! eStargz layer through lazysnap's FUSE mount — cold (fetched from the registry on loopback),
//! warm (from lazysnap's disk cache, page cache dropped) and hot (page cache) — beside the same
//! file unpacked by containerd's overlayfs snapshotter. Prints a table.
//!
//! `cargo run --release --example bench_read -- --lazysnap target/release/lazysnap [--mib 256]`
//! (root; drops the page cache between runs).

#[path = "../tests/harness/mod.rs"]
mod harness;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use harness::{image, Stack};

fn main() {
    let mut args = std::env::args().skip(1);
    let mut lazysnap = "target/release/lazysnap".to_owned();
    let mut mib: usize = 256;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--lazysnap" => lazysnap = args.next().expect("--lazysnap needs a path"),
            "--mib" => {
                mib = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--mib needs a number")
            }
            other => panic!("unknown argument {other:?}"),
        }
    }
    let stack = Stack::start(&lazysnap);
    let spec = image::ImageSpec {
        layers: vec![
            image::busybox_layer(),
            vec![
                image::Entry::dir("big"),
                image::Entry::file("big/file.bin", image::pseudo_random(mib << 20, 5)),
            ],
        ],
        blobs: Vec::new(),
        cmd: vec!["/bin/sh".into()],
    };
    let plain = stack.image_ref("bench:gzip");
    let lazy = stack.image_ref("bench:estargz");
    eprintln!("building a {mib} MiB layer and converting it to eStargz ...");
    image::push(&spec, &stack.dir, &plain);
    stack.convert_and_push(&plain, &lazy, &["--estargz"]);
    stack.rpull(&lazy);
    stack.pull("overlayfs", &plain);

    let fuse_file = find(&stack.lazysnap_root().join("snapshots"));
    let overlay_file = find(
        &stack
            .dir
            .join("containerd-root/io.containerd.snapshotter.v1.overlayfs/snapshots"),
    );
    println!("| path | MB/s |");
    println!("| --- | ---: |");
    drop_caches();
    println!(
        "| lazysnap FUSE, cold (fetch from registry on loopback) | {:.0} |",
        read_mbps(&fuse_file)
    );
    drop_caches();
    println!(
        "| lazysnap FUSE, warm (lazysnap disk cache, page cache dropped) | {:.0} |",
        read_mbps(&fuse_file)
    );
    println!(
        "| lazysnap FUSE, hot (page cache) | {:.0} |",
        read_mbps(&fuse_file)
    );
    drop_caches();
    println!(
        "| overlayfs snapshot, cold (page cache dropped) | {:.0} |",
        read_mbps(&overlay_file)
    );
    println!(
        "| overlayfs snapshot, hot (page cache) | {:.0} |",
        read_mbps(&overlay_file)
    );
    println!("\n{mib} MiB incompressible file, 1 MiB reads, 2-core VM; registry on 127.0.0.1");
}

/// The first `big/file.bin` below `dir` (snapshot dirs are numbered, names unknown).
fn find(dir: &Path) -> PathBuf {
    for entry in std::fs::read_dir(dir).expect("list snapshots").flatten() {
        let candidate = entry.path().join("fs/big/file.bin");
        if candidate.exists() {
            return candidate;
        }
    }
    panic!("no big/file.bin under {}", dir.display());
}

fn read_mbps(path: &Path) -> f64 {
    let mut file = std::fs::File::open(path).expect("open");
    let mut buf = vec![0u8; 1 << 20];
    let start = Instant::now();
    let mut total = 0usize;
    loop {
        let n = file.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        total += n;
    }
    total as f64 / start.elapsed().as_secs_f64() / 1e6
}

fn drop_caches() {
    // sync first so dirty pages do not skew the next read.
    let _ = std::process::Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("drop caches (needs root)");
}
