//! The operator's view through a live daemon: every `lazysnap cache|trace|mounts` command in
//! table and `--json` form, checked against what the test did (which file a container read,
//! what the registry's access log says was sent), the Prometheus endpoint, and the clear
//! error when no daemon answers.

mod harness;

use std::time::Duration;

use harness::{image, metrics, process::free_port, Stack};
use serde_json::Value;

const LAZYSNAP: &str = env!("CARGO_BIN_EXE_lazysnap");

fn number(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("field {field} missing or not a number in {v}"))
}

#[test]
fn every_cli_command_reports_what_the_daemon_did() {
    let port = free_port();
    let cfg = tempfile::tempdir().expect("tempdir");
    let config = cfg.path().join("lazysnap.toml");
    std::fs::write(
        &config,
        format!("[prefetch]\ntrace_window = \"3s\"\n[metrics]\naddress = \"127.0.0.1:{port}\"\n"),
    )
    .expect("config");
    let stack = Stack::start_with(
        LAZYSNAP,
        vec!["--config".into(), config.display().to_string()],
    );

    let mut spec = image::standard_image();
    spec.layers.push(vec![
        image::Entry::dir("app"),
        image::Entry::file("app/read-me.bin", image::pseudo_random(1 << 20, 21)),
        image::Entry::file("app/never-read.bin", image::pseudo_random(6 << 20, 22)),
    ]);
    let plain = stack.image_ref("cli:gzip");
    image::push(&spec, &stack.dir, &plain);
    let lazy = stack.image_ref("cli:esgz");
    stack.convert_and_push(&plain, &lazy, &["--estargz"]);
    stack.rpull(&lazy);
    let layers = stack.lazy_layers();
    let (app_layer, app_blob_size) = layers.first().cloned().expect("lazy layers");

    // mounts: every lazy layer, mounted under lazysnap's root.
    let mounts = stack.cli_json(&["mounts"]);
    let rows = mounts["mounts"].as_array().cloned().unwrap_or_default();
    assert_eq!(rows.len(), layers.len(), "{mounts}");
    for row in &rows {
        let point = row["mountpoint"].as_str().expect("mountpoint");
        assert!(
            point.starts_with(&stack.lazysnap_root().display().to_string()),
            "{row}"
        );
        assert!(
            Stack::mounts_under(std::path::Path::new(point)).len() == 1,
            "{row}"
        );
        assert_eq!(row["reference"], lazy.as_str(), "{row}");
        assert!(
            ["ready", "prefetching"].contains(&row["state"].as_str().unwrap_or("")),
            "{row}"
        );
    }
    let table = stack.cli(&["mounts"]);
    assert!(table.contains(&app_layer[..19]), "{table}");

    let out = stack.run("lazysnap", &lazy, "reader", "sha256sum < /app/read-me.bin");
    let expected = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(image::pseudo_random(1 << 20, 21)))
    };
    assert!(out.starts_with(&expected), "{out}");

    // cache stats: what lazysnap says it fetched is what the registry says it sent, less the
    // footers and TOCs read at pull time (which are not layer data).
    let stats = stack.cli_json(&["cache", "stats"]);
    let fetched = number(&stats, "fetched_bytes");
    let registry_sent: u64 = layers
        .iter()
        .map(|(digest, _)| stack.registry_blob_bytes_of(digest))
        .sum();
    let metadata_bytes: u64 = layers
        .iter()
        .map(|(digest, _)| {
            let dir = stack
                .lazysnap_root()
                .join("layers")
                .join(digest.replace(':', "-"));
            let state: Value =
                serde_json::from_slice(&std::fs::read(dir.join("layer.json")).expect("layer.json"))
                    .expect("layer state");
            // the footer read (64 KiB at most) and the TOC, where the eStargz format saved it
            state["params"]["location"]["len"]
                .as_u64()
                .expect("toc len")
                + (64 << 10)
        })
        .sum();
    eprintln!(
        "lazysnap fetched {fetched} bytes; the registry sent {registry_sent} for these layers"
    );
    assert!(fetched >= 1 << 20, "at least the file read: {stats}");
    assert!(fetched <= registry_sent, "{fetched} > {registry_sent}");
    assert!(
        registry_sent <= fetched + metadata_bytes,
        "registry sent {registry_sent}, lazysnap counts {fetched} + metadata {metadata_bytes}"
    );
    assert!(
        fetched < app_blob_size,
        "the unread 6 MiB stayed in the registry: {stats}"
    );
    assert!(number(&stats, "served_bytes") >= 1 << 20, "{stats}");
    assert!(number(&stats, "misses") > 0, "{stats}");
    assert!(number(&stats, "disk_files") > 0, "{stats}");
    assert!(number(&stats, "disk_chunks") > 0, "{stats}");
    assert!(number(&stats, "disk_used_bytes") >= 1 << 20, "{stats}");
    assert_eq!(
        number(&stats, "disk_budget_bytes"),
        0,
        "no budget configured"
    );
    assert!(number(&stats, "demand_network_reads") > 0, "{stats}");
    let ratio = stats["hit_ratio"].as_f64().expect("hit_ratio");
    assert!((0.0..=1.0).contains(&ratio), "{stats}");
    let table = stack.cli(&["cache", "stats"]);
    assert!(table.to_lowercase().contains("hit"), "{table}");

    // metrics: the same counters.
    let text = metrics::scrape(port);
    assert_eq!(
        metrics::value(&text, "lazysnap_fetched_bytes_total") as u64,
        number(&stack.cli_json(&["cache", "stats"]), "fetched_bytes")
    );
    assert!(
        metrics::value(&text, "lazysnap_fetch_duration_seconds_count") > 0.0,
        "{text}"
    );
    assert_eq!(
        metrics::value(&text, "lazysnap_mounted_layers") as usize,
        layers.len()
    );

    // cache ls: the app layer holds the file read and not the file never read.
    let listed = stack.cli_json(&["cache", "ls"]);
    let rows = listed["layers"].as_array().cloned().unwrap_or_default();
    assert_eq!(rows.len(), layers.len(), "{listed}");
    let app = rows
        .iter()
        .find(|r| r["digest"] == app_layer.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("{app_layer} not in {listed}"));
    assert!(number(&app, "cached_bytes") >= 1 << 20, "{app}");
    assert!(
        number(&app, "cached_bytes") < number(&app, "layer_bytes"),
        "{app}"
    );
    assert!(number(&app, "layer_bytes") >= 7 << 20, "{app}");
    assert!(
        number(&app, "cached_chunks") <= number(&app, "total_chunks"),
        "{app}"
    );
    assert!(number(&app, "fetched_bytes") > 0, "{app}");
    assert!(number(&app, "last_access_unix_ms") > 0, "{app}");
    assert_eq!(app["mounted"], true, "{app}");
    assert!(
        app["references"]
            .as_array()
            .is_some_and(|r| r.iter().any(|x| x == lazy.as_str())),
        "{app}"
    );
    let table = stack.cli(&["cache", "ls"]);
    assert!(table.contains(&app_layer[..19]), "{table}");

    // trace ls / show: the file the container read is in the app layer's trace.
    stack.eventually(
        "the trace of the app layer",
        Duration::from_secs(20),
        || {
            stack.cli_json(&["trace", "ls"])["traces"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t["digest"] == app_layer.as_str()))
        },
    );
    let shown = stack.cli_json(&["trace", "show", &app_layer]);
    let entries = shown["entries"].as_array().cloned().unwrap_or_default();
    assert!(
        entries.iter().any(|e| e["path"] == "app/read-me.bin"),
        "{shown}"
    );
    assert!(
        !entries.iter().any(|e| e["path"] == "app/never-read.bin"),
        "{shown}"
    );
    assert_eq!(number(&shown["summary"], "entries") as usize, entries.len());
    let table = stack.cli(&["trace", "show", &app_layer]);
    assert!(table.contains("app/read-me.bin"), "{table}");
    let table = stack.cli(&["trace", "ls"]);
    assert!(table.contains(&app_layer[..19]), "{table}");
    assert_eq!(
        stack.cli_json(&["cache", "ls"])["layers"]
            .as_array()
            .and_then(|r| r
                .iter()
                .find(|r| r["digest"] == app_layer.as_str())
                .cloned())
            .map(|r| r["trace_present"].clone()),
        Some(Value::Bool(true))
    );

    // trace export / import: a round trip through a file, and a refused bad document.
    let file = stack.dir.join("app.trace.json");
    stack.cli(&[
        "trace",
        "export",
        &app_layer,
        "-o",
        &file.display().to_string(),
    ]);
    let doc: Value =
        serde_json::from_slice(&std::fs::read(&file).expect("exported")).expect("json");
    assert_eq!(doc["layer"], app_layer.as_str());
    let imported = stack.cli_json(&["trace", "import", &file.display().to_string()]);
    assert_eq!(
        number(&imported["summary"], "entries") as usize,
        entries.len(),
        "{imported}"
    );
    let bad = stack.dir.join("bad.trace.json");
    std::fs::write(&bad, b"{\"format\":\"something else\"}").expect("write");
    let err = stack
        .try_cli(&["trace", "import", &bad.display().to_string()])
        .expect_err("a bad document is refused");
    assert!(err.contains("invalid trace document"), "{err}");
    let err = stack
        .try_cli(&[
            "trace",
            "show",
            "sha256:0000000000000000000000000000000000000000000000000000000000000000",
        ])
        .expect_err("no such trace");
    assert!(err.contains("no trace for layer"), "{err}");

    // cache evict: the app layer's chunks go, the layer still reads (fetched again).
    let cached_before = number(&app, "cached_bytes");
    let evicted = stack.cli_json(&["cache", "evict", &app_layer]);
    assert!(
        number(&evicted, "evicted_bytes") >= cached_before,
        "{evicted} vs {app}"
    );
    let after = stack.cli_json(&["cache", "ls"]);
    let app_after = after["layers"]
        .as_array()
        .and_then(|r| {
            r.iter()
                .find(|r| r["digest"] == app_layer.as_str())
                .cloned()
        })
        .expect("app row");
    assert_eq!(number(&app_after, "cached_bytes"), 0, "{app_after}");
    let out = stack.run(
        "lazysnap",
        &lazy,
        "reader-2",
        "sha256sum < /app/read-me.bin",
    );
    assert!(out.starts_with(&expected), "{out}");
    let err = stack
        .try_cli(&["cache", "evict", "not-a-digest"])
        .expect_err("bad digest");
    assert!(err.contains("not-a-digest"), "{err}");

    // cache prune: down to nothing but the saved state of the mounted layers, which counts
    // against the disk budget and cannot go while they are mounted.
    let state_bytes = || -> u64 {
        let mut total = 0;
        for dir in std::fs::read_dir(stack.lazysnap_root().join("layers"))
            .expect("layers")
            .flatten()
        {
            for f in std::fs::read_dir(dir.path()).expect("layer dir").flatten() {
                total += f.metadata().expect("stat").len();
            }
        }
        total
    };
    let pruned = stack.cli_json(&["cache", "prune", "--to", "0"]);
    assert!(state_bytes() > 0);
    assert_eq!(
        number(&pruned, "disk_used_bytes"),
        state_bytes(),
        "{pruned}"
    );
    assert!(number(&pruned, "evicted_entries") > 0, "{pruned}");
    let table = stack.cli(&["cache", "prune", "--to", "0"]);
    assert!(!table.is_empty());
    assert_eq!(
        number(&stack.cli_json(&["cache", "stats"]), "disk_used_bytes"),
        state_bytes()
    );

    // No daemon: a clear error naming the socket.
    let out = std::process::Command::new(LAZYSNAP)
        .args(["cache", "stats", "--control", "/nonexistent/control.sock"])
        .output()
        .expect("run lazysnap");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/control.sock"), "{err}");
}
