//! The README's main job: starts a private registry, containerd and lazysnap, pushes a sample
//! image (busybox plus 96 MiB of application data the container never reads) as plain gzip
//! and as eStargz, then pulls and runs it the normal way (containerd's overlayfs snapshotter)
//! and lazily (lazysnap), printing pull time, time to the container's first output and bytes
//! fetched from the registry for each.

#[path = "../tests/harness/mod.rs"]
mod harness;

use std::time::{Duration, Instant};

use harness::{image, Stack};

fn main() {
    let mut args = std::env::args().skip(1);
    let mut lazysnap = "target/release/lazysnap".to_owned();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--lazysnap" => lazysnap = args.next().expect("--lazysnap needs a path"),
            other => panic!("unknown argument {other:?} (expected --lazysnap PATH)"),
        }
    }
    eprintln!("starting registry, lazysnap and containerd in a temporary directory ...");
    let stack = Stack::start(&lazysnap);
    let mut spec = image::standard_image();
    spec.layers.push(vec![
        image::Entry::dir("app"),
        image::Entry::file("app/model-a.bin", image::pseudo_random(48 << 20, 11)),
        image::Entry::file("app/model-b.bin", image::pseudo_random(48 << 20, 12)),
        image::Entry::file("app/greeting.txt", "hello from a lazily pulled image\n"),
    ]);
    let plain = stack.image_ref("demo:gzip");
    let lazy = stack.image_ref("demo:estargz");
    eprintln!("building the sample image and converting it to eStargz with ctr-remote ...");
    image::push(&spec, &stack.dir, &plain);
    stack.convert_and_push(&plain, &lazy, &["--estargz"]);

    let script = "cat /app/greeting.txt";
    println!(
        "{:<28} {:>10} {:>22} {:>16}",
        "", "pull", "run to first output", "bytes fetched"
    );
    let before = stack.registry_blob_bytes();
    let pull = timed(|| {
        stack.pull("overlayfs", &plain);
    });
    let (run, out) = timed_run(&stack, "overlayfs", &plain, "demo-normal", script);
    let fetched = stack.registry_blob_bytes() - before;
    assert_eq!(
        out, "hello from a lazily pulled image\n",
        "unexpected container output"
    );
    row("normal pull (overlayfs)", pull, run, fetched);

    let before = stack.registry_blob_bytes();
    let pull = timed(|| {
        stack.rpull(&lazy);
    });
    let (run, out) = timed_run(&stack, "lazysnap", &lazy, "demo-lazy", script);
    let fetched = stack.registry_blob_bytes() - before;
    assert_eq!(
        out, "hello from a lazily pulled image\n",
        "unexpected container output"
    );
    row("lazy pull (lazysnap, eStargz)", pull, run, fetched);
    println!("registry on loopback; image: busybox + 96 MiB of data the container does not read");
}

fn timed_run(
    stack: &Stack,
    snapshotter: &str,
    image: &str,
    id: &str,
    script: &str,
) -> (Duration, String) {
    let mut out = String::new();
    let took = timed(|| out = stack.run(snapshotter, image, id, script));
    (took, out)
}

fn row(name: &str, pull: Duration, run: Duration, fetched: u64) {
    println!(
        "{name:<28} {:>8.0}ms {:>20.0}ms {:>13.1}MiB",
        pull.as_secs_f64() * 1000.0,
        run.as_secs_f64() * 1000.0,
        fetched as f64 / (1 << 20) as f64
    );
}

fn timed(f: impl FnOnce()) -> Duration {
    let start = Instant::now();
    f();
    start.elapsed()
}
