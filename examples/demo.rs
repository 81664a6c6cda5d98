//! The README's main job: starts a private registry, containerd and lazysnap, pushes a sample
//! image, then pulls and runs it through each snapshotter and prints pull time and time to the
//! container's first output side by side.

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
    eprintln!("starting registry, lazysnap and containerd ...");
    let stack = Stack::start(&lazysnap);
    let reference = stack.image_ref("demo:1");
    image::push(&image::standard_image(), &stack.dir, &reference);

    println!(
        "{:<12} {:>12} {:>22}",
        "snapshotter", "pull", "run to first output"
    );
    for snapshotter in ["overlayfs", "lazysnap"] {
        let pull = timed(|| {
            stack.ctr(&[
                "images",
                "pull",
                "--plain-http",
                "--snapshotter",
                snapshotter,
                &reference,
            ]);
        });
        let mut output = String::new();
        let run = timed(|| {
            output = stack.run(
                snapshotter,
                &reference,
                &format!("demo-{snapshotter}"),
                "head -c 19 /data/small.txt",
            );
        });
        assert_eq!(
            output, "hello from layer 2\n",
            "unexpected container output"
        );
        println!("{snapshotter:<12} {:>10.0}ms {:>20.0}ms", ms(pull), ms(run));
        stack.ctr(&["images", "rm", "--sync", &reference]);
    }
}

fn timed(f: impl FnOnce()) -> Duration {
    let start = Instant::now();
    f();
    start.elapsed()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
