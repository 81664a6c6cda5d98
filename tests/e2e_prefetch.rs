//! Learning from observed reads, through a real containerd: a container's start is recorded
//! as a read trace per layer; the trace, exported to another node or kept on this one, makes
//! the next mount of the layer prefetch what the start needs, so fewer of the container's
//! reads wait on the registry. Also landmark prefetch of `ctr-remote image optimize`d images.

mod harness;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use harness::{image, python, Stack};
use serde_json::Value;

const LAZYSNAP: &str = env!("CARGO_BIN_EXE_lazysnap");

/// A config whose trace window outlasts a slow start on a loaded CI machine; traces are
/// saved every 2 s within it.
fn config(extra: &str) -> (tempfile::TempDir, Vec<String>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("lazysnap.toml");
    std::fs::write(
        &path,
        format!("[prefetch]\ntrace_window = \"30s\"\n{extra}"),
    )
    .expect("write config");
    (dir, vec!["--config".into(), path.display().to_string()])
}

/// Pushes the Python image as gzip and as eStargz; returns the eStargz reference.
fn push_python(stack: &Stack) -> String {
    let plain = stack.image_ref("python:gzip");
    image::push(&python::python_image(), &stack.dir, &plain);
    let lazy = stack.image_ref("python:esgz");
    stack.convert_and_push(&plain, &lazy, &["--estargz"]);
    lazy
}

/// Runs the Python workload and returns its output and how long `ctr run` took.
fn run_python(stack: &Stack, image: &str, id: &str) -> (String, Duration) {
    run_python_with(stack, image, id, python::PYTHON_WORKLOAD)
}

/// Like `run_python`, with another shell command.
fn run_python_with(stack: &Stack, image: &str, id: &str, workload: &str) -> (String, Duration) {
    let started = Instant::now();
    let out = stack.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "lazysnap",
        image,
        id,
        "/bin/sh",
        "-c",
        workload,
    ]);
    (out, started.elapsed())
}

fn stats(stack: &Stack) -> Value {
    stack.cli_json(&["cache", "stats"])
}

fn number(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("field {field} missing or not a number in {v}"))
}

/// Waits until at least `at_least` layers have a saved trace and no trace has changed for
/// longer than the 2 s save interval (everything the workload read is in); returns them by
/// digest.
fn wait_for_traces(stack: &Stack, at_least: usize) -> BTreeMap<String, u64> {
    let mut traces = BTreeMap::new();
    let mut stable_since = Instant::now();
    stack.eventually("read traces to be saved", Duration::from_secs(40), || {
        let listed = stack.cli_json(&["trace", "ls"]);
        let now: BTreeMap<String, u64> = listed["traces"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                (
                    t["digest"].as_str().unwrap_or_default().to_owned(),
                    number(t, "entries"),
                )
            })
            .filter(|(_, entries)| *entries > 0)
            .collect();
        if now != traces {
            traces = now;
            stable_since = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(400));
        traces.len() >= at_least && stable_since.elapsed() > Duration::from_secs(3)
    });
    traces
}

/// Waits until containerd's GC has removed every lazysnap snapshot.
fn wait_until_no_snapshots(stack: &Stack) {
    stack.eventually(
        "containerd's GC to remove every snapshot",
        Duration::from_secs(30),
        || {
            stack
                .ctr(&["snapshots", "--snapshotter", "lazysnap", "ls"])
                .lines()
                .nth(1)
                .is_none()
        },
    );
}

/// Waits until no lazy layer is still prefetching.
fn wait_until_prefetched(stack: &Stack) {
    stack.eventually("prefetch to finish", Duration::from_secs(60), || {
        let mounts = stack.cli_json(&["mounts"]);
        let mounts = mounts["mounts"].as_array().cloned().unwrap_or_default();
        !mounts.is_empty() && mounts.iter().all(|m| m["state"] == "ready")
    });
}

#[test]
fn a_trace_from_another_node_cuts_the_reads_that_wait_on_the_registry() {
    let (_cfg, args) = config("");
    let mut stack = Stack::start_with(LAZYSNAP, args);
    let lazy = push_python(&stack);

    // Node A, empty cache: every chunk the start reads comes from the registry.
    stack.rpull(&lazy);
    let (out, cold_time) = run_python(&stack, &lazy, "cold");
    assert_eq!(out.trim(), "1");
    let cold = stats(&stack);
    let traces = wait_for_traces(&stack, 1);
    let exported: Vec<PathBuf> = traces
        .keys()
        .map(|digest| {
            let file = stack
                .dir
                .join(format!("{}.trace.json", digest.replace(':', "-")));
            stack.cli(&["trace", "export", digest, "-o", &file.display().to_string()]);
            file
        })
        .collect();

    // Node B: another root, another containerd, an empty cache; only the traces come along.
    stack.new_node();
    assert_eq!(
        number(&stats(&stack), "fetched_bytes"),
        0,
        "node B starts empty"
    );
    for file in &exported {
        let imported = stack.cli_json(&["trace", "import", &file.display().to_string()]);
        assert!(number(&imported["summary"], "entries") > 0, "{imported}");
        assert!(
            number(&imported["summary"], "names") > 0,
            "the names node A's kernel asked travel with the trace: {imported}"
        );
    }
    let replays_before = replays(&stack);
    stack.rpull(&lazy);
    wait_until_prefetched(&stack);
    stack.eventually(
        "node B's mounts to replay node A's names",
        Duration::from_secs(30),
        || replays(&stack) > replays_before,
    );
    let (out, warm_time) = run_python(&stack, &lazy, "with-trace");
    assert_eq!(out.trim(), "1");
    let traced = stats(&stack);

    let (cold_waits, traced_waits) = (
        number(&cold, "demand_network_reads"),
        number(&traced, "demand_network_reads"),
    );
    eprintln!(
        "cold: {cold_time:?}, {cold_waits} reads waited on the registry, {} bytes fetched\n\
         with another node's trace: {warm_time:?}, {traced_waits} reads waited, {} bytes \
         fetched, {} prefetched ({} of them read)",
        number(&cold, "fetched_bytes"),
        number(&traced, "fetched_bytes"),
        number(&traced, "prefetch_bytes"),
        number(&traced, "prefetch_used_bytes"),
    );
    assert!(cold_waits > 0, "the cold start had to wait: {cold}");
    assert!(
        traced_waits * 4 <= cold_waits,
        "a trace should remove most network waits: {traced_waits} vs {cold_waits}"
    );
    assert!(number(&traced, "prefetch_bytes") > 0, "{traced}");
    assert!(number(&traced, "prefetch_used_bytes") > 0, "{traced}");
}

#[test]
fn a_trace_learned_on_the_same_node_prefetches_the_next_mount() {
    let (_cfg, args) = config("");
    let stack = Stack::start_with(LAZYSNAP, args);
    let lazy = push_python(&stack);
    // The image holds no compiled modules: a Python that writes them looks up a new random
    // temporary name for each, which no trace can know. Without `-B`, the second start
    // asks only those.
    let workload = python::PYTHON_WORKLOAD.replacen("python3 -c", "python3 -B -c", 1);
    assert_ne!(workload, python::PYTHON_WORKLOAD);
    stack.rpull(&lazy);
    let names_before = number(&stats(&stack), "name_requests");
    let (out, _) = run_python_with(&stack, &lazy, "first", &workload);
    assert_eq!(out.trim(), "1");
    let first = stats(&stack);
    let names_first = number(&first, "name_requests") - names_before;
    wait_for_traces(&stack, 1);

    // The image goes, the cache is emptied: only the trace is left.
    stack.ctr(&["images", "rm", "--sync", &lazy]);
    wait_until_no_snapshots(&stack);
    let pruned = stack.cli_json(&["cache", "prune", "--to", "0"]);
    assert_eq!(number(&pruned, "disk_used_bytes"), 0, "{pruned}");

    let replays_before = replays(&stack);
    stack.rpull(&lazy);
    wait_until_prefetched(&stack);
    // Each new mount asks the names its trace keeps before the container does.
    let mounts = stack.cli_json(&["mounts"])["mounts"]
        .as_array()
        .map_or(0, Vec::len);
    assert!(mounts > 0, "the image is mounted lazily");
    stack.eventually(
        "the mounts to replay their traced names",
        Duration::from_secs(30),
        || replays(&stack) >= replays_before + mounts,
    );
    let names_before = number(&stats(&stack), "name_requests");
    let (out, _) = run_python_with(&stack, &lazy, "second", &workload);
    assert_eq!(out.trim(), "1");
    let second = stats(&stack);
    let names_second = number(&second, "name_requests") - names_before;
    let waits_first = number(&first, "demand_network_reads");
    let waits_second = number(&second, "demand_network_reads") - waits_first;
    eprintln!("same node: {waits_first} reads waited on the registry at first, {waits_second} after learning; the daemon answered {names_first} name requests during the first start, {names_second} during the second");
    assert!(
        number(&second, "prefetch_bytes") > 0,
        "the second mount prefetched: {second}"
    );
    assert!(
        waits_second * 4 <= waits_first,
        "{waits_second} vs {waits_first}"
    );
    assert!(
        names_first >= 50,
        "a python start asks a layer hundreds of names: {names_first}"
    );
    assert!(
        names_second * 10 <= names_first,
        "the kernel answered the second start's names from what the replay left: {names_second} vs {names_first}"
    );
}

/// How many times the daemon has replayed a layer's traced names into a new mount.
fn replays(stack: &Stack) -> usize {
    stack
        .lazysnap_log()
        .matches("replayed the layer's traced names")
        .count()
}

#[test]
fn a_landmark_optimized_image_prefetches_its_prioritized_files_on_mount() {
    let (_cfg, args) = config("");
    let stack = Stack::start_with(LAZYSNAP, args);
    let mut spec = image::standard_image();
    spec.layers.push(vec![
        image::Entry::dir("app"),
        image::Entry::file("app/needed.bin", image::pseudo_random(2 << 20, 11)),
        image::Entry::file("app/unused.bin", image::pseudo_random(8 << 20, 12)),
    ]);
    let plain = stack.image_ref("landmark:gzip");
    image::push(&spec, &stack.dir, &plain);
    let optimized = stack.image_ref("landmark:opt");
    stack.ctr(&["images", "pull", "--plain-http", &plain]);
    stack.ctr_remote(&[
        "image",
        "optimize",
        "--oci",
        "--period",
        "3",
        "--entrypoint",
        r#"["/bin/sh", "-c"]"#,
        "--args",
        r#"["cat /app/needed.bin > /dev/null"]"#,
        &plain,
        &optimized,
    ]);
    stack.push(&["--plain-http", &optimized]);
    stack.ctr(&["images", "rm", "--sync", &plain, &optimized]);
    stack.ctr(&["content", "prune", "references"]);

    stack.rpull(&optimized);
    wait_until_prefetched(&stack);
    let prefetched = stats(&stack);
    let prefetch_bytes = number(&prefetched, "prefetch_bytes");
    eprintln!("landmark prefetch fetched {prefetch_bytes} bytes before any container ran");
    assert!(
        prefetch_bytes >= 2 << 20,
        "the prioritized file was prefetched: {prefetched}"
    );
    assert!(
        prefetch_bytes < 8 << 20,
        "files after the landmark were not: {prefetched}"
    );
    let before = number(&prefetched, "demand_network_reads");
    let out = stack.run(
        "lazysnap",
        &optimized,
        "reader",
        "sha256sum < /app/needed.bin",
    );
    let expected = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(image::pseudo_random(2 << 20, 11)))
    };
    assert!(out.starts_with(&expected), "{out}");
    let after = stats(&stack);
    assert_eq!(
        number(&after, "demand_network_reads"),
        before,
        "reading the prioritized file never waited on the registry: {after}"
    );
}

#[test]
fn a_small_disk_budget_holds_while_several_images_run_correctly() {
    const BUDGET: u64 = 6 << 20;
    let (_cfg, args) = config(&format!(
        "[cache]\ndisk_budget_bytes = {BUDGET}\nmemory_bytes = 1048576\n"
    ));
    let stack = Stack::start_with(LAZYSNAP, args);
    let mut images = Vec::new();
    for n in 0..3u64 {
        let data = image::pseudo_random(4 << 20, 100 + n);
        let spec = image::ImageSpec {
            layers: vec![
                image::busybox_layer(),
                vec![
                    image::Entry::dir("data"),
                    image::Entry::file("data/file.bin", data.clone()),
                ],
            ],
            blobs: Vec::new(),
            cmd: vec!["/bin/sh".into()],
        };
        let plain = stack.image_ref(&format!("budget{n}:gzip"));
        image::push(&spec, &stack.dir, &plain);
        let lazy = stack.image_ref(&format!("budget{n}:esgz"));
        stack.convert_and_push(&plain, &lazy, &["--estargz"]);
        let expected = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(&data))
        };
        images.push((lazy, expected));
    }
    // Twice round, so the second round reads data the budget has evicted.
    for round in 0..2 {
        for (n, (lazy, expected)) in images.iter().enumerate() {
            if round == 0 {
                stack.rpull(lazy);
            }
            let out = stack.run(
                "lazysnap",
                lazy,
                &format!("budget-{round}-{n}"),
                "sha256sum < /data/file.bin",
            );
            assert!(
                out.starts_with(expected.as_str()),
                "image {n} round {round}: {out}"
            );
            let s = stats(&stack);
            assert!(
                number(&s, "disk_used_bytes") <= BUDGET,
                "over budget after image {n}: {s}"
            );
            assert_eq!(number(&s, "disk_budget_bytes"), BUDGET);
        }
    }
    let s = stats(&stack);
    eprintln!("budget {BUDGET}: {s}");
    assert!(number(&s, "evicted_bytes") > 0, "something had to go: {s}");
}

/// Pushes an image whose top layer holds `data` at /data/file.bin, converted to eStargz with
/// `flags`; returns the eStargz reference and the file's sha256.
fn push_data_image(stack: &Stack, name: &str, data: Vec<u8>, flags: &[&str]) -> (String, String) {
    let expected = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&data))
    };
    let spec = image::ImageSpec {
        layers: vec![
            image::busybox_layer(),
            vec![
                image::Entry::dir("data"),
                image::Entry::file("data/file.bin", data),
            ],
        ],
        blobs: Vec::new(),
        cmd: vec!["/bin/sh".into()],
    };
    let plain = stack.image_ref(&format!("{name}:gzip"));
    image::push(&spec, &stack.dir, &plain);
    let lazy = stack.image_ref(&format!("{name}:esgz"));
    let mut convert = vec!["--estargz"];
    convert.extend_from_slice(flags);
    stack.convert_and_push(&plain, &lazy, &convert);
    (lazy, expected)
}

#[test]
fn background_fetch_makes_layers_independent_of_the_registry() {
    let (_cfg, args) = config("background_fetch = true\n");
    let mut stack = Stack::start_with(LAZYSNAP, args);
    let (lazy, expected) = push_data_image(
        &stack,
        "background",
        image::pseudo_random(12 << 20, 31),
        &[],
    );
    stack.rpull(&lazy);
    stack.eventually(
        "background fetch to cache every layer",
        Duration::from_secs(60),
        || {
            let listed = stack.cli_json(&["cache", "ls"]);
            let rows = listed["layers"].as_array().cloned().unwrap_or_default();
            !rows.is_empty()
                && rows
                    .iter()
                    .all(|r| number(r, "cached_chunks") == number(r, "total_chunks"))
        },
    );
    wait_until_prefetched(&stack);
    // No registry any more: everything must come from the cache.
    stack.stop_registry();
    let out = stack.run("lazysnap", &lazy, "offline", "sha256sum < /data/file.bin");
    assert!(out.starts_with(&expected), "{out}");
    let s = stats(&stack);
    assert_eq!(
        number(&s, "demand_network_reads"),
        0,
        "no read waited on the (stopped) registry: {s}"
    );
    assert!(number(&s, "prefetch_bytes") >= 12 << 20, "{s}");
}

#[test]
fn readahead_turns_a_sequential_read_into_few_network_waits() {
    let (_cfg, args) = config("");
    let stack = Stack::start_with(LAZYSNAP, args);
    // 64 KiB chunks: without readahead every other 128 KiB read of the kernel would wait.
    let (lazy, expected) = push_data_image(
        &stack,
        "readahead",
        image::pseudo_random(32 << 20, 41),
        &["--estargz-chunk-size", "65536"],
    );
    stack.rpull(&lazy);
    let out = stack.run(
        "lazysnap",
        &lazy,
        "sequential",
        "sha256sum < /data/file.bin",
    );
    assert!(out.starts_with(&expected), "{out}");
    let s = stats(&stack);
    let waits = number(&s, "demand_network_reads");
    let chunks = (32 << 20) / 65536;
    eprintln!("sequential read of {chunks} chunks: {waits} reads waited on the registry; {s}");
    assert!(
        number(&s, "prefetch_bytes") > 16 << 20,
        "readahead fetched most of it: {s}"
    );
    assert!(waits * 8 < chunks, "{waits} waits for {chunks} chunks");
}

/// Bytes of the files under `dir` that are in the page cache now, by `fincore`.
fn resident_bytes(dir: &std::path::Path) -> u64 {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => dirs.push(path),
                Ok(t) if t.is_file() => files.push(path),
                _ => {}
            }
        }
    }
    if files.is_empty() {
        return 0;
    }
    let out = std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--raw", "--output", "RES"])
        .args(&files)
        .output()
        .expect("run fincore");
    assert!(out.status.success(), "fincore: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .sum()
}

/// Empties the kernel's page cache, as a node that has done other work since would have it.
fn drop_page_cache() {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("drop caches");
}

#[test]
fn a_layer_mounted_again_brings_its_traced_files_into_memory_before_the_container_starts() {
    const SIZE: usize = 8 << 20;
    let (_cfg, args) = config("");
    let stack = Stack::start_with(LAZYSNAP, args);
    let (lazy, expected) = push_data_image(&stack, "preload", image::pseudo_random(SIZE, 7), &[]);
    stack.rpull(&lazy);
    let out = stack.run("lazysnap", &lazy, "first", "sha256sum < /data/file.bin");
    assert!(out.starts_with(&expected), "{out}");
    wait_for_traces(&stack, 1);

    // The image goes; the layers' bytes stay in the store, and nothing of them in memory.
    stack.ctr(&["images", "rm", "--sync", &lazy]);
    wait_until_no_snapshots(&stack);
    let store = stack.lazysnap_root().join("cache");
    drop_page_cache();
    let cold = resident_bytes(&store);

    let fetched_before = number(&stats(&stack), "fetched_bytes");
    stack.rpull(&lazy);
    wait_until_prefetched(&stack);
    let warm = resident_bytes(&store);
    eprintln!("store bytes in memory: {cold} after dropping caches, {warm} after the mount");
    assert!(
        warm >= cold + (SIZE as u64) * 9 / 10,
        "the traced file was read into memory on mount: {cold} -> {warm}\n{}",
        stack.diagnostics()
    );
    assert!(
        stack.lazysnap_log().lines().any(
            |l| l.contains("prefetched the layer's traced") && !l.contains("preloaded_bytes=0")
        ),
        "{}",
        stack.diagnostics()
    );
    // Without passthrough (the default) the container reads through the mount's own page
    // cache: the mount asks the kernel to read the traced bytes ahead through itself.
    stack.eventually(
        "the mount to read its stored traced bytes ahead",
        Duration::from_secs(30),
        || {
            stack
                .lazysnap_log()
                .contains("asked the kernel to read the layer's stored traced bytes ahead")
        },
    );
    let mut mounted = 0;
    stack.eventually(
        "the traced file to be in the mount's page cache",
        Duration::from_secs(30),
        || {
            mounted = mountpoints(&stack).iter().map(|m| resident_bytes(m)).sum();
            mounted >= (SIZE as u64) * 9 / 10
        },
    );
    let served_before = number(&stats(&stack), "served_bytes");
    let out = stack.run("lazysnap", &lazy, "second", "sha256sum < /data/file.bin");
    assert!(out.starts_with(&expected), "{out}");
    let after = stats(&stack);
    let served = number(&after, "served_bytes") - served_before;
    eprintln!("mounted file bytes in memory before the second start: {mounted}; bytes the daemon served to it: {served}");
    assert!(
        served < (SIZE as u64) / 10,
        "the second start read the traced file from the kernel's cache, not from the daemon: {served} bytes served"
    );
    assert_eq!(
        number(&after, "fetched_bytes"),
        fetched_before,
        "nothing came from the registry again"
    );
}

/// The mountpoints of the daemon's lazy mounts.
fn mountpoints(stack: &Stack) -> Vec<std::path::PathBuf> {
    stack.cli_json(&["mounts"])["mounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["mountpoint"].as_str())
        .filter(|m| !m.is_empty())
        .map(std::path::PathBuf::from)
        .collect()
}
