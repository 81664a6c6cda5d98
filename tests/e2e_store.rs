//! The local store of decompressed files, through real containerd and docker-registry: what a
//! container reads through `pread` and through kernel passthrough equals the source; a daemon
//! killed while a large file is being filled keeps, after its restart, every chunk it had
//! stored (none is fetched again), and the container reading through the kill gets correct
//! bytes; a damaged store file is caught by `lazysnap cache verify`, dropped, and fetched
//! again.

mod harness;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use sha2::Digest;

use harness::image::{self, Entry};
use harness::throttle::Throttle;
use harness::Stack;

const LAZYSNAP: &str = env!("CARGO_BIN_EXE_lazysnap");
const CHUNK: usize = 1 << 20;

fn number(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("field {field} missing or not a number in {v}"))
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

fn drop_caches() {
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").expect("drop caches");
}

/// `[prefetch]` off, so every byte fetched is one a container asked for (and readahead).
fn config(dir: &Path, extra: &str) -> Vec<String> {
    let path = dir.join(format!("lazysnap-{}.toml", extra.len()));
    std::fs::write(&path, format!("[prefetch]\nenabled = false\n{extra}")).expect("config");
    vec!["--config".into(), path.display().to_string()]
}

/// busybox plus `data/big.bin` (and a small file), converted to eStargz with 1 MiB chunks.
fn push_image(stack: &Stack, name: &str, big: &[u8]) -> String {
    let mut spec = image::standard_image();
    spec.layers.push(vec![
        Entry::dir("data"),
        Entry::file("data/big.bin", big.to_vec()),
        Entry::file("data/small.txt", "small\n"),
    ]);
    let plain = stack.image_ref(&format!("{name}:gzip"));
    image::push(&spec, &stack.dir, &plain);
    let lazy = stack.image_ref(&format!("{name}:lazy"));
    stack.convert_and_push(
        &plain,
        &lazy,
        &["--estargz", "--estargz-chunk-size", &CHUNK.to_string()],
    );
    lazy
}

/// Lazy mounts (FUSE) of the node's daemon.
fn lazy_mounts(stack: &Stack) -> usize {
    let root = stack.lazysnap_root();
    let text = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    text.lines()
        .filter(|l| l.contains(" - fuse.lazysnap "))
        .filter(|l| {
            l.split(' ')
                .nth(4)
                .is_some_and(|p| Path::new(p).starts_with(&root))
        })
        .count()
}

/// The daemon's FUSE dispatch threads: fuser names them `fuser-N`.
fn dispatch_threads(stack: &Stack) -> usize {
    let pid = stack
        .lazysnap
        .as_ref()
        .and_then(|p| p.pid())
        .expect("lazysnap runs");
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the daemon's threads")
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| {
                comm.trim_end()
                    .strip_prefix("fuser-")
                    .is_some_and(|n| n.parse::<u32>().is_ok())
            })
        })
        .count()
}

/// Files of the local store, largest first.
fn store_files(root: &Path) -> Vec<(u64, PathBuf)> {
    let mut out = Vec::new();
    let mut stack = vec![root.join("cache").join("files")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_none() {
                let len = entry.metadata().map_or(0, |m| m.len());
                out.push((len, path));
            }
        }
    }
    out.sort_by(|a, b| b.cmp(a));
    out
}

#[test]
fn reads_through_pread_and_passthrough_equal_the_source_and_verify_catches_damage() {
    let cfg = tempfile::tempdir().expect("tempdir");
    let big = image::pseudo_random(12 * CHUNK + 12_345, 42);
    let mut stack = Stack::start_with(
        LAZYSNAP,
        // Passthrough for layers holding a file this large: big.bin's layer just qualifies.
        config(
            cfg.path(),
            &format!(
                "[fuse]\npassthrough = \"on\"\npassthrough_min_file_bytes = {}\n",
                big.len()
            ),
        ),
    );
    let want = sha256_hex(&big);
    let reference = push_image(&stack, "store", &big);
    stack.rpull(&reference);
    let sum = "sha256sum /data/big.bin | cut -d' ' -f1";

    // Cold: through FUSE, fetched, streamed into the store, read back by pread.
    let out = stack.run("lazysnap", &reference, "cold", sum);
    assert_eq!(out.trim(), want, "cold read");
    let cold = stack.cli_json(&["cache", "stats"]);
    assert!(number(&cold, "disk_chunks") >= 13, "{cold}");
    let (largest, _) = store_files(&stack.lazysnap_root())[0].clone();
    assert_eq!(largest, big.len() as u64, "the stored file is the file");

    // Warm, page cache dropped: the file is complete, so the kernel reads it directly and
    // the daemon serves none of its bytes. It still serves the busybox layer's (sh,
    // sha256sum: 2 MB), whose files are all below the threshold.
    drop_caches();
    let out = stack.run("lazysnap", &reference, "passthrough", sum);
    assert_eq!(out.trim(), want, "read through passthrough");
    let warm = stack.cli_json(&["cache", "stats"]);
    let log = stack.lazysnap_log();
    assert!(
        !log.contains("kernel cannot do FUSE passthrough"),
        "this kernel (6.9+) does passthrough"
    );
    assert!(
        number(&warm, "served_bytes") - number(&cold, "served_bytes") < big.len() as u64 / 2,
        "passthrough reads bypass the daemon: {cold} then {warm}"
    );
    assert_eq!(
        number(&warm, "fetched_bytes"),
        number(&cold, "fetched_bytes")
    );
    let mounts = lazy_mounts(&stack);
    assert!(mounts >= 1, "the layers are mounted lazily");
    assert_eq!(
        dispatch_threads(&stack),
        2 * mounts,
        "two per mount by default"
    );

    // Passthrough on, but only for layers holding a file of 64 MiB (the default), which this
    // one does not: through its mounts, taken over, the daemon serves every byte, by pread
    // from the store, nothing fetched. One dispatch thread per mount, which the mounts taken
    // over get too.
    stack.lazysnap_args = config(
        cfg.path(),
        "[fuse]\npassthrough = \"on\"\ndispatch_threads = 1\n",
    );
    stack.kill_lazysnap();
    stack.start_lazysnap();
    drop_caches();
    let out = stack.run_after_restart(&reference, "pread", &["/bin/sh", "-c", sum]);
    assert_eq!(out.trim(), want, "read through pread");
    let pread = stack.cli_json(&["cache", "stats"]);
    assert!(
        number(&pread, "served_bytes") >= big.len() as u64,
        "the daemon served the file: {pread}"
    );
    assert_eq!(
        number(&pread, "fetched_bytes"),
        0,
        "a restarted daemon fetched nothing: {pread}"
    );
    assert_eq!(lazy_mounts(&stack), mounts, "the mounts were taken over");
    assert_eq!(dispatch_threads(&stack), mounts, "`dispatch_threads = 1`");

    // A damaged byte in the store: `cache verify` finds it, drops the file, and the next read
    // fetches it again and is right.
    let verify = stack.cli_json(&["cache", "verify"]);
    assert_eq!(number(&verify, "corrupt_chunks"), 0, "{verify}");
    let (_, path) = store_files(&stack.lazysnap_root())[0].clone();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open store file");
    std::os::unix::fs::FileExt::write_all_at(&file, b"\xff\x00\xff", 5 * CHUNK as u64 + 7)
        .expect("damage");
    drop(file);
    let err = stack
        .try_cli(&["cache", "verify"])
        .expect_err("damage makes verify fail");
    assert!(err.contains("did not match"), "{err}");
    assert!(!path.exists(), "the damaged file was dropped");
    let after = stack.cli_json(&["cache", "stats"]);
    assert!(number(&after, "corrupt_entries") >= 1, "{after}");
    drop_caches();
    let out = stack.run("lazysnap", &reference, "refetched", sum);
    assert_eq!(out.trim(), want, "read after verify");
    let refetched = stack.cli_json(&["cache", "stats"]);
    assert!(
        number(&refetched, "fetched_bytes") >= big.len() as u64,
        "the dropped file was fetched again: {refetched}"
    );
}

#[test]
fn a_daemon_killed_while_filling_a_file_keeps_what_it_stored() {
    let cfg = tempfile::tempdir().expect("tempdir");
    let mut stack = Stack::start_with(LAZYSNAP, config(cfg.path(), ""));
    let registry: std::net::SocketAddr = format!("127.0.0.1:{}", stack.registry_port())
        .parse()
        .expect("registry address");
    // 40 Mbit/s: the 24 MiB file takes about five seconds to fill.
    let throttle = Throttle::start(registry, Duration::from_millis(5), 40.0);
    let big = image::pseudo_random(24 * CHUNK, 7);
    let want = sha256_hex(&big);
    let direct = push_image(&stack, "killed", &big);
    let reference = direct.replacen(&stack.registry_host, &throttle.addr().to_string(), 1);
    stack.rpull(&reference);

    // The reading container; started again (under a new name) if it ends before a third of
    // the file is stored, so a container that failed to start does not fail the test.
    let start_reader = |id: String| {
        let ctr = stack.containerd_socket();
        let reference = reference.clone();
        std::thread::spawn(move || {
            std::process::Command::new("ctr")
                .arg("--address")
                .arg(ctr)
                .args(["--namespace", crate::harness::namespace().as_str()])
                .args([
                    "run",
                    "--rm",
                    "--snapshotter",
                    "lazysnap",
                    &reference,
                    &id,
                    "/bin/sh",
                    "-c",
                    "sha256sum /data/big.bin",
                ])
                .output()
        })
    };
    let mut reader = start_reader("filling-0".into());
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let mut attempt = 0;
    while number(&stack.cli_json(&["cache", "stats"]), "disk_chunks") < 8 {
        assert!(
            std::time::Instant::now() < deadline,
            "a third of the file was not stored in time\n{}",
            stack.diagnostics()
        );
        if reader.is_finished() {
            let out = reader.join().expect("reader thread");
            eprintln!("the reading container ended early, starting it again: {out:?}");
            attempt += 1;
            assert!(attempt < 3, "the reading container keeps failing: {out:?}");
            reader = start_reader(format!("filling-{attempt}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Chunks ready now are made durable within about 100 ms (a flush round); those that
    // become ready while we wait may not be, and are not counted.
    let stored = number(&stack.cli_json(&["cache", "stats"]), "disk_chunks");
    std::thread::sleep(Duration::from_millis(600));
    stack.kill_lazysnap();
    // What the killed daemon recorded of the big file: the lengths its record lines vouch
    // for (busybox's chunks count in `disk_chunks` too).
    let (_, path) = store_files(&stack.lazysnap_root())[0].clone();
    let record = std::fs::read_to_string(path.with_extension("map")).expect("record");
    let present_big: u64 = record
        .lines()
        .filter_map(|l| l.split(' ').nth(1)?.parse::<u64>().ok())
        .sum();
    assert!(present_big >= 4 * CHUNK as u64, "{present_big}: {record}");
    let down = throttle.bytes_down();

    // The container's read waits on the held FUSE connection; the next daemon takes it over
    // and finishes the file from what the store kept.
    stack.start_lazysnap();
    let kept = number(&stack.cli_json(&["cache", "stats"]), "disk_chunks");
    assert!(
        kept >= stored,
        "every chunk stored before the kill is still there: {stored} then {kept}"
    );
    let out = reader.join().expect("reader thread").expect("run ctr");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&want),
        "the container reading through the kill got the right bytes: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fetched = throttle.bytes_down() - down;
    let missing = big.len() as u64 - present_big;
    assert!(
        fetched <= missing + missing / 20 + (512 << 10),
        "only what was not stored is fetched again: {fetched} bytes for {missing} missing"
    );

    // And a new container reads it all from the store.
    let down = throttle.bytes_down();
    let out = stack.run_after_restart(
        &reference,
        "after-kill",
        &["/bin/sh", "-c", "sha256sum /data/big.bin | cut -d' ' -f1"],
    );
    assert_eq!(out.trim(), want, "correct bytes after the restart");
    assert!(
        throttle.bytes_down() - down < 256 << 10,
        "nothing of the file fetched again"
    );
}
