//! Issue 2's acceptance tests through a real containerd: lazysnap as an ordinary (overlayfs)
//! snapshotter must give containers exactly the file system containerd's own overlayfs
//! snapshotter gives them, survive SIGKILL, and leave nothing behind when images are removed.

mod harness;

use std::time::Duration;

use harness::{image, Stack};

const LAZYSNAP: &str = env!("CARGO_BIN_EXE_lazysnap");

fn push_standard(stack: &Stack) -> String {
    let reference = stack.image_ref("standard:1");
    image::push(&image::standard_image(), &stack.dir, &reference);
    reference
}

#[test]
fn container_sees_the_same_tree_as_with_overlayfs() {
    let stack = Stack::start(LAZYSNAP);
    let reference = push_standard(&stack);
    for snapshotter in ["lazysnap", "overlayfs"] {
        stack.pull(snapshotter, &reference);
    }
    let ours = stack.run(
        "lazysnap",
        &reference,
        "describe-lazysnap",
        harness::DESCRIBE_FS,
    );
    let theirs = stack.run(
        "overlayfs",
        &reference,
        "describe-overlayfs",
        harness::DESCRIBE_FS,
    );
    let diff = harness::diff_lines(&theirs, &ours);
    assert!(
        diff.is_empty(),
        "container views differ (- overlayfs, + lazysnap):\n{diff}"
    );

    // Every layer is there, whiteouts and opaque directories hide what they must.
    let has = |path: &str| ours.lines().any(|l| l.starts_with(&format!("{path}|")));
    for present in [
        "/bin/busybox",
        "/data/small.txt",
        "/data/big.bin",
        "/data/hardlink",
        "/data/null",
        "/data/fifo",
        "/data/opaque/new",
        "/top.txt",
        "/data/deep/a/b/c.txt",
    ] {
        assert!(has(present), "{present} missing:\n{ours}");
    }
    for absent in ["/data/gone", "/data/opaque/old1", "/data/opaque/old2"] {
        assert!(!has(absent), "{absent} should be hidden:\n{ours}");
    }
    let line = |path: &str| {
        ours.lines()
            .find(|l| l.starts_with(&format!("{path}|")))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        line("/data/setuid").contains("|4755|"),
        "{}",
        line("/data/setuid")
    );
    assert!(
        line("/data/owned").contains("|640|1000|1001|"),
        "{}",
        line("/data/owned")
    );
    assert!(
        line("/data/hardlink").contains("|2|"),
        "hard link count: {}",
        line("/data/hardlink")
    );

    // The container writes to its rw layer: a new file and a copy-up of a lower file.
    let out = stack.run(
        "lazysnap",
        &reference,
        "writer",
        "echo new > /data/new.txt && echo appended >> /data/modified && cat /data/new.txt /data/modified && cat /data/small.txt",
    );
    assert_eq!(
        out,
        "new\nmodified in layer 3\nappended\nhello from layer 2\n"
    );
}

#[test]
fn pulled_image_runs_after_lazysnap_is_killed_and_restarted() {
    let mut stack = Stack::start(LAZYSNAP);
    let reference = push_standard(&stack);
    stack.pull("lazysnap", &reference);
    let before = stack.ctr(&["snapshots", "--snapshotter", "lazysnap", "ls"]);
    stack.kill_lazysnap();
    stack.start_lazysnap();
    // containerd's gRPC client redials a restarted proxy plugin with backoff (about a second);
    // calls in that window fail with Unavailable, as with any restarted plugin.
    let mut after = String::new();
    stack.eventually(
        "containerd to reconnect to lazysnap",
        Duration::from_secs(15),
        || match stack.try_ctr(&["snapshots", "--snapshotter", "lazysnap", "ls"]) {
            Ok(out) => {
                after = out;
                true
            }
            Err(_) => false,
        },
    );
    assert_eq!(before, after, "snapshots lost across SIGKILL");
    let out = stack.run(
        "lazysnap",
        &reference,
        "after-restart",
        "cat /data/small.txt /top.txt",
    );
    assert_eq!(out, "hello from layer 2\nlayer 3\n");
}

#[test]
fn removing_the_image_leaves_nothing_behind() {
    let stack = Stack::start(LAZYSNAP);
    let reference = push_standard(&stack);
    stack.pull("lazysnap", &reference);
    stack.run("lazysnap", &reference, "short-lived", "cat /top.txt");
    let listed = stack.ctr(&["snapshots", "--snapshotter", "lazysnap", "ls"]);
    assert!(
        listed.lines().count() > 3,
        "expected the image's layers:\n{listed}"
    );

    stack.ctr(&["images", "rm", "--sync", &reference]);
    let root = stack.lazysnap_root();
    stack.eventually(
        "containerd's GC to remove every snapshot",
        Duration::from_secs(30),
        || {
            let listed = stack.ctr(&["snapshots", "--snapshotter", "lazysnap", "ls"]);
            listed.lines().nth(1).is_none()
        },
    );
    let left: Vec<_> = std::fs::read_dir(root.join("snapshots"))
        .expect("list snapshots dir")
        .map(|e| e.map(|e| e.path()))
        .collect();
    assert!(left.is_empty(), "directories left under the root: {left:?}");
    assert!(
        Stack::mounts_under(&root).is_empty(),
        "mounts left: {:?}",
        Stack::mounts_under(&root)
    );
}
