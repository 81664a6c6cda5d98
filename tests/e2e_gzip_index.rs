//! Lazy pulling of an unmodified plain gzip image through its gzip index: the harness pushes
//! an image as ordinary gzip layers, `lazysnap index --push` stores the index next to it (an
//! artifact referring to the image manifest, found through the referrers tag schema on
//! docker-registry 2.8), and `ctr-remote image rpull` through lazysnap mounts every layer
//! lazily. A tampered index is refused or fails reads with EIO; it never serves wrong bytes.

mod harness;

use std::process::Command;

use harness::image::{self, Entry};
use harness::Stack;
use lazysnap::format::gzip_index::build;
use lazysnap::format::gzip_index::file::GzipIndex;
use lazysnap::layer::gzip_publish::{self, IndexOptions};
use lazysnap::metadata::Limits;
use lazysnap::registry::{Reference, RegistryClient, RegistryConfig};

const LAZYSNAP: &str = env!("CARGO_BIN_EXE_lazysnap");
const SPAN: u64 = 1 << 20;

/// Text-like bytes that compress about as well as real files do.
fn pseudo_text(len: usize, seed: u64) -> Vec<u8> {
    let words: [&[u8]; 8] = [
        b"import ", b"return ", b"layer ", b"self.", b"value, ", b"def ", b"\n    ", b"None",
    ];
    let mut out = Vec::with_capacity(len);
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    while out.len() < len {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        out.extend_from_slice(words[(x >> 33) as usize % words.len()]);
        if x.is_multiple_of(5) {
            out.extend_from_slice(format!("{}", x % 100_000).as_bytes());
        }
    }
    out.truncate(len);
    out
}

/// The standard image plus a larger layer of application files; `variant` changes the
/// middle layers' bytes so that two images share only busybox.
fn image_spec(variant: u64) -> image::ImageSpec {
    let mut spec = image::standard_image();
    spec.layers[1].push(Entry::file("data/variant", format!("variant {variant}\n")));
    spec.layers.push(vec![
        Entry::dir("app"),
        Entry::file("app/lib.py", pseudo_text(12 << 20, variant)),
        Entry::file("app/model.bin", image::pseudo_random(1 << 20, 40 + variant)),
        Entry::file("app/hello.txt", "hello from the app layer\n"),
    ]);
    spec
}

fn client() -> RegistryClient {
    RegistryClient::new(RegistryConfig::default()).expect("registry client")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn manifest_digest(reference: &str) -> String {
    let reference = Reference::parse(reference).expect("reference");
    runtime()
        .block_on(lazysnap::layer::image_manifest(&client(), &reference))
        .expect("manifest")
        .digest
}

fn index(stack: &Stack, reference: &str) -> serde_json::Value {
    index_with(stack, reference, &[])
}

/// `lazysnap index --push` of `reference` with 1 MiB spans and `extra` arguments.
fn index_with(stack: &Stack, reference: &str, extra: &[&str]) -> serde_json::Value {
    let config = stack.dir.join("index-config.toml");
    std::fs::write(&config, "").expect("config");
    let out = Command::new(LAZYSNAP)
        .args([
            "index",
            reference,
            "--push",
            "--json",
            "--min-layer-size",
            "0",
        ])
        .args(["--span", &SPAN.to_string(), "--config"])
        .arg(&config)
        .args(extra)
        .output()
        .expect("run lazysnap index");
    assert!(
        out.status.success(),
        "lazysnap index failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("index --json")
}

fn lazily_mounted(stack: &Stack) -> usize {
    stack.lazysnap_log().matches("layer mounted lazily").count()
}

#[test]
fn plain_gzip_image_is_pulled_lazily_through_its_index() {
    harness::require_root();
    let mut stack = Stack::start(LAZYSNAP);
    let plain = stack.image_ref("gzidx:plain");
    image::push(&image_spec(1), &stack.dir, &plain);
    let digest = manifest_digest(&plain);

    let report = index(&stack, &plain);
    assert_eq!(report["manifest"], digest.as_str());
    let layers = report["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 4);
    assert!(layers.iter().all(|l| l["indexed"] == true), "{report:#}");
    let layer_bytes: u64 = layers.iter().map(|l| l["size"].as_u64().unwrap_or(0)).sum();
    let index_bytes: u64 = layers
        .iter()
        .map(|l| l["index_bytes"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        manifest_digest(&plain),
        digest,
        "indexing leaves the image alone"
    );

    let before = stack.registry_blob_bytes();
    stack.rpull(&plain);
    let at_pull = stack.registry_blob_bytes() - before;
    assert_eq!(
        lazily_mounted(&stack),
        4,
        "every layer mounted lazily:\n{}",
        stack.lazysnap_log()
    );
    assert!(
        at_pull * 20 <= layer_bytes,
        "the lazy pull fetched {at_pull} bytes, more than 5% of the layers' {layer_bytes}"
    );
    // The first Prepare's lookup started fetching every layer's index, as soon as the
    // referrers listing named them: the later Prepares took theirs from there.
    let log = stack.lazysnap_log();
    assert!(log.contains("fetched_with_the_listing=4"), "{log}");
    assert_eq!(
        log.matches("using the gzip index fetched ahead").count(),
        4,
        "{log}"
    );

    // The shell and what it loads first, then one small file of the app layer alone.
    let out = stack.run("lazysnap", &plain, "small2", "cat /data/small.txt");
    assert_eq!(out, "hello from layer 2\n");
    let before = stack.registry_blob_bytes();
    let out = stack.run("lazysnap", &plain, "small", "cat /app/hello.txt");
    assert_eq!(out, "hello from the app layer\n");
    let small_read = stack.registry_blob_bytes() - before;
    assert!(
        small_read <= 2 * SPAN && small_read * 5 <= layer_bytes,
        "a small read fetched {small_read} of {layer_bytes} bytes"
    );

    // The same tree as a normal pull of the same image.
    let ours = stack.run("lazysnap", &plain, "describe-lazy", harness::DESCRIBE_FS);
    let full_before = stack.registry_blob_bytes();
    stack.pull("overlayfs", &plain);
    let full = stack.registry_blob_bytes() - full_before;
    let theirs = stack.run("overlayfs", &plain, "describe-plain", harness::DESCRIBE_FS);
    let diff = harness::diff_lines(&theirs, &ours);
    assert!(
        diff.is_empty(),
        "container views differ (- overlayfs, + lazysnap):\n{diff}"
    );
    assert!(ours.contains("/app/lib.py") && ours.lines().count() > 40);
    let sums = "sha256sum /app/lib.py /app/model.bin /data/big.bin /data/hardlink /data/opaque/new";
    assert_eq!(
        stack.run("lazysnap", &plain, "sums-lazy", sums),
        stack.run("overlayfs", &plain, "sums-plain", sums)
    );
    assert_eq!(
        harness::layer_xattr(
            &stack.lazysnap_root().join("snapshots"),
            "data/xattr",
            "user.lazysnap"
        )
        .as_deref(),
        Some(b"yes".as_slice()),
        "the PAX xattr is served"
    );
    assert_eq!(manifest_digest(&plain), digest);
    eprintln!(
        "gzip-index: layers {layer_bytes} B, indexes {index_bytes} B ({:.2}%), rpull fetched {at_pull} B ({:.2}%), a small read {small_read} B, a normal pull {full} B",
        index_bytes as f64 * 100.0 / layer_bytes as f64,
        at_pull as f64 * 100.0 / layer_bytes as f64,
    );

    // A restarted daemon mounts the layers again from their saved state and index, without
    // asking the registry. A layer the reads above completed gets its whole-blob check about
    // a second after they pause, over the registry; killed before it ends, the next daemon
    // would rightly run it again. So the kill waits for the registry to stay quiet.
    let mut quiet_since = (stack.registry_requests(), std::time::Instant::now());
    let waiting = std::time::Instant::now();
    while quiet_since.1.elapsed() < std::time::Duration::from_secs(3) {
        assert!(
            waiting.elapsed() < std::time::Duration::from_secs(60),
            "the registry never went quiet:\n{}",
            stack.lazysnap_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
        let now = stack.registry_requests();
        if now != quiet_since.0 {
            quiet_since = (now, std::time::Instant::now());
        }
    }
    stack.kill_lazysnap();
    let requests = stack.registry_requests();
    stack.start_lazysnap();
    let log = stack.lazysnap_log();
    assert_eq!(log.matches("remounted lazy layer").count(), 4, "{log}");
    assert_eq!(
        stack.registry_requests(),
        requests,
        "no registry request to remount"
    );
    let out = stack.run_after_restart(&plain, "after-restart", &["cat", "/app/hello.txt"]);
    assert_eq!(out, "hello from the app layer\n");

    // A tampered index: layer 2's claims another size (refused: ordinary path), the app
    // layer's part digests are wrong (mounted, but its reads fail with EIO).
    let tampered = stack.image_ref("gzidx:tampered");
    image::push(&image_spec(2), &stack.dir, &tampered);
    let reference = Reference::parse(&tampered).expect("reference");
    let rt = runtime();
    let registry = client();
    let options = IndexOptions {
        span: SPAN,
        min_layer_bytes: 0,
        limits: Limits::default(),
    };
    let mut report = rt
        .block_on(gzip_publish::index_image(&registry, &reference, options))
        .expect("index");
    for (k, layer) in report.layers.iter_mut().enumerate() {
        let (Some(bytes), Some(windows)) = (&layer.index, &layer.windows) else {
            continue;
        };
        let mut ix = GzipIndex::decode(bytes, &Limits::default()).expect("decode");
        ix.with_windows(windows).expect("windows");
        match k {
            1 => ix.compressed_size += 1,
            3 => {
                for part in &mut ix.parts {
                    part.digest = lazysnap::chunk::ChunkDigest::of(b"not these bytes");
                }
            }
            _ => continue,
        }
        let encoded = ix.encode().expect("encode");
        layer.index = Some(encoded.index.into());
        layer.windows = Some(encoded.windows.into());
    }
    rt.block_on(gzip_publish::push(&registry, &reference, &report))
        .expect("push tampered");
    let mounted_before = lazily_mounted(&stack);
    stack.rpull(&tampered);
    let log = stack.lazysnap_log();
    assert!(
        log.contains("does not fit the layer"),
        "the tampered layer index is refused with a reason:\n{log}"
    );
    assert_eq!(
        lazily_mounted(&stack) - mounted_before,
        2,
        "layer 3 and the app layer are lazy, layer 2 took the ordinary path:\n{log}"
    );
    let out = stack.run(
        "lazysnap",
        &tampered,
        "tampered",
        "cat /data/variant; if cat /app/hello.txt; then echo READ-OK; else echo READ-FAILED; fi",
    );
    assert!(out.starts_with("variant 2\n"), "{out}");
    assert!(
        out.contains("READ-FAILED") && !out.contains("hello from the app layer"),
        "wrong span digests fail the read, never serve bytes: {out}"
    );
}

/// The app layer's (the largest's) entry in an index report.
fn app_layer(report: &serde_json::Value) -> &serde_json::Value {
    report["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .max_by_key(|l| l["size"].as_u64().unwrap_or(0))
        .expect("the app layer")
}

/// The digest of the app layer's windows blob in an index report.
fn app_windows(report: &serde_json::Value) -> String {
    app_layer(report)["windows_digest"]
        .as_str()
        .expect("the app layer's windows blob")
        .to_owned()
}

#[test]
fn tampered_windows_fail_reads_and_previous_indexes_still_serve() {
    harness::require_root();
    let stack = Stack::start(LAZYSNAP);

    // The registry serves other bytes for the app layer's windows blob than its digest
    // names (docker-registry does not check what it serves): every byte flipped, so every
    // window is hit (a span that reads nothing of its window has a frame of a dozen bytes).
    // Reads needing a window fail with EIO; the first span of each layer needs none, and
    // other layers are untouched.
    let reference = stack.image_ref("gzidx:windows");
    image::push(&image_spec(4), &stack.dir, &reference);
    let report = index(&stack, &reference);
    let windows = app_windows(&report);
    let hex = windows.trim_start_matches("sha256:");
    let data = stack
        .path("registry-data")
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data");
    let mut blob = std::fs::read(&data).expect("read the windows blob");
    for b in blob.iter_mut() {
        *b ^= 0x5a;
    }
    std::fs::write(&data, &blob).expect("tamper the windows blob");
    stack.rpull(&reference);
    assert_eq!(lazily_mounted(&stack), 4, "{}", stack.lazysnap_log());
    let out = stack.run(
        "lazysnap",
        &reference,
        "tampered-windows",
        "cat /data/small.txt; if cat /app/hello.txt; then echo READ-OK; else echo READ-FAILED; fi",
    );
    assert!(out.starts_with("hello from layer 2\n"), "{out}");
    assert!(
        out.contains("READ-FAILED") && !out.contains("hello from the app layer"),
        "a tampered window fails the read, never serves bytes: {out}\n{}",
        stack.lazysnap_log()
    );
    let log = stack.lazysnap_log();
    assert!(
        log.contains("does not match its digest") || log.contains("does not decompress"),
        "{log}"
    );

    // Indexes pushed by the previous build (artifact type v1, version 2 documents with
    // their whole windows inside, 1 MiB spans) are still found and read.
    let old = stack.image_ref("gzidx:previous");
    image::push(&image_spec(5), &stack.dir, &old);
    let parsed = Reference::parse(&old).expect("reference");
    let rt = runtime();
    let registry = client();
    let options = IndexOptions {
        span: 256 << 10,
        min_layer_bytes: 0,
        limits: Limits::default(),
    };
    let mut report = rt
        .block_on(gzip_publish::index_image(&registry, &parsed, options))
        .expect("index");
    for layer in &mut report.layers {
        if layer.windows.take().is_none() {
            continue;
        }
        let blob = rt
            .block_on(registry.get_blob(&parsed, &layer.digest, 64 << 20))
            .expect("the layer");
        let ix = build::build(
            &layer.digest,
            blob.len() as u64,
            &blob[..],
            SPAN,
            &Limits::default(),
        )
        .expect("index as the previous build did");
        layer.index = Some(ix.encode_v2().expect("encode").into());
    }
    rt.block_on(gzip_publish::push(&registry, &parsed, &report))
        .expect("push as the previous build did");
    let mounted = lazily_mounted(&stack);
    stack.rpull(&old);
    // Busybox, the layer the two images share, is mounted already.
    assert_eq!(
        lazily_mounted(&stack) - mounted,
        3,
        "{}",
        stack.lazysnap_log()
    );
    let sums = "sha256sum /app/lib.py /app/model.bin /data/big.bin";
    let lazy = stack.run("lazysnap", &old, "previous-lazy", sums);
    stack.pull("overlayfs", &old);
    assert_eq!(lazy, stack.run("overlayfs", &old, "previous-plain", sums));
    // docker-registry has no referrers API: the daemon asked it once (with the referrers
    // tag at the same time), and went to the tag alone for the second image (whose index
    // was found, as the reads above show).
    assert_eq!(
        stack.registry_log_lines("\"GET /v2/gzidx/referrers/"),
        1,
        "the referrers API is asked once per registry"
    );
}

/// The mounts' verification state by layer digest, from `lazysnap mounts --json`.
fn verification(stack: &Stack) -> Vec<(String, String)> {
    let listed = stack.cli_json(&["mounts"]);
    let mut out: Vec<(String, String)> = listed["mounts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (
                m["digest"].as_str().unwrap_or_default().to_owned(),
                m["verification"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[test]
fn a_blob_that_matches_its_index_but_not_its_digest_is_found_bad_once_fetched() {
    harness::require_root();
    let cfg = tempfile::tempdir().expect("tempdir");
    let config = cfg.path().join("lazysnap.toml");
    std::fs::write(&config, "[prefetch]\nbackground_fetch = true\n").expect("config");
    let mut stack = Stack::start_with(
        LAZYSNAP,
        vec!["--config".into(), config.display().to_string()],
    );
    let reference = stack.image_ref("gzidx:verify");
    image::push(&image_spec(3), &stack.dir, &reference);
    let report = index(&stack, &reference);
    let layers = report["layers"].as_array().expect("layers").clone();
    let app = layers
        .iter()
        .max_by_key(|l| l["size"].as_u64().unwrap_or(0))
        .and_then(|l| l["digest"].as_str())
        .expect("the app layer")
        .to_owned();

    // The registry serves other bytes for the app layer than its digest names: its gzip
    // header's MTIME changed, which no span covers, so every span still matches the index
    // (built from the honest blob). docker-registry does not check blobs it serves.
    let hex = app.trim_start_matches("sha256:");
    let data = stack
        .path("registry-data")
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data");
    let mut blob = std::fs::read(&data).expect("read the app layer's blob");
    blob[4] ^= 0x5a;
    std::fs::write(&data, &blob).expect("tamper the app layer's blob");
    let got = {
        use sha2::Digest as _;
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&blob)))
    };

    stack.rpull(&reference);
    assert_eq!(lazily_mounted(&stack), 4, "{}", stack.lazysnap_log());
    let mut states = Vec::new();
    stack.eventually(
        "every layer's background fetch to reach a verdict",
        std::time::Duration::from_secs(120),
        || {
            states = verification(&stack);
            states.len() == 4 && states.iter().all(|(_, v)| v == "verified" || v == "bad")
        },
    );
    for (digest, state) in &states {
        let expected = if *digest == app { "bad" } else { "verified" };
        assert_eq!(state, expected, "layer {digest}: {states:?}");
    }
    let log = stack.lazysnap_log();
    let bad_lines: Vec<&str> = log.lines().filter(|l| l.contains("layer is bad")).collect();
    assert_eq!(bad_lines.len(), 1, "one warning for the bad layer:\n{log}");
    assert!(
        bad_lines[0].contains(&app) && bad_lines[0].contains(&got),
        "the warning names the layer and both digests: {}",
        bad_lines[0]
    );
    assert_eq!(log.matches("layer verified").count(), 3, "{log}");
    let table = stack.cli(&["mounts"]);
    assert!(
        table
            .lines()
            .any(|l| l.contains(&app[..19]) && l.ends_with("BAD")),
        "{table}"
    );

    // Reads of the bad layer fail, also of what its background fetch had stored; the other
    // layers serve as before.
    let script =
        "cat /data/small.txt; if cat /app/hello.txt; then echo READ-OK; else echo READ-FAILED; fi";
    let out = stack.run("lazysnap", &reference, "bad-layer", script);
    assert!(out.starts_with("hello from layer 2\n"), "{out}");
    assert!(
        out.contains("READ-FAILED") && !out.contains("hello from the app layer"),
        "a bad layer serves nothing: {out}"
    );

    // A restarted daemon keeps the verdicts: nothing is checked again, nothing fetched.
    stack.kill_lazysnap();
    let requests = stack.registry_requests();
    stack.start_lazysnap();
    assert_eq!(verification(&stack), states, "verdicts survive a restart");
    let out = stack.run_after_restart(&reference, "bad-after-restart", &["/bin/sh", "-c", script]);
    assert!(
        out.starts_with("hello from layer 2\n") && out.contains("READ-FAILED"),
        "{out}"
    );
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(
        stack.registry_requests(),
        requests,
        "no layer is fetched or checked again after the restart"
    );
    assert_eq!(
        stack.lazysnap_log().matches("layer verified").count(),
        3,
        "no second check"
    );

    // The registry serves the right bytes again. Once the image is gone, so is the bad
    // verdict: a new pull checks the layer anew and serves it.
    blob[4] ^= 0x5a;
    std::fs::write(&data, &blob).expect("restore the app layer's blob");
    stack.ctr(&["images", "rm", "--sync", &reference]);
    stack.eventually(
        "the layers' snapshots to be removed",
        std::time::Duration::from_secs(30),
        || verification(&stack).is_empty(),
    );
    assert!(
        stack
            .lazysnap_log()
            .contains("the last mount of a layer found bad is gone"),
        "{}",
        stack.lazysnap_log()
    );
    stack.rpull(&reference);
    stack.eventually(
        "the app layer's new verdict",
        std::time::Duration::from_secs(120),
        || {
            verification(&stack)
                .iter()
                .any(|(d, v)| *d == app && v == "verified")
        },
    );
    let out = stack.run("lazysnap", &reference, "good-again", script);
    assert!(
        out.contains("hello from the app layer") && out.contains("READ-OK"),
        "the layer serves once checked good: {out}"
    );
}

/// The referrers listing names the index blobs so that they are fetched before the artifact
/// manifest is there; a listing that names others (the fallback tag is anyone's to write) is
/// a hint the checked artifact overrules: every layer still mounts lazily, from its own index.
#[test]
fn index_blobs_a_listing_names_wrongly_are_not_used() {
    harness::require_root();
    let stack = Stack::start(LAZYSNAP);
    let reference = stack.image_ref("gzidx:listing");
    image::push(&image_spec(3), &stack.dir, &reference);
    let digest = manifest_digest(&reference);
    let report = index(&stack, &reference);
    let layers: Vec<(String, String)> = report["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().unwrap_or_default().to_owned(),
                l["index_blob_bytes"].to_string(),
            )
        })
        .collect();
    assert_eq!(layers.len(), 4, "{report:#}");

    // Each layer's entry in the listing's annotation now names the next layer's index blob.
    let parsed = Reference::parse(&reference).expect("reference");
    let rt = runtime();
    let registry = client();
    let tag = lazysnap::layer::fallback_tag(&digest);
    let listing = rt
        .block_on(registry.get_manifest(&parsed, &tag, 1 << 20))
        .expect("listing");
    let mut doc: serde_json::Value = serde_json::from_slice(&listing.bytes).expect("json");
    let key = lazysnap::format::gzip_index::INDEXES_ANNOTATION;
    let entry = doc["manifests"]
        .as_array_mut()
        .and_then(|m| m.last_mut())
        .expect("the artifact's entry");
    let named = entry["annotations"][key]
        .as_str()
        .expect("annotation")
        .to_owned();
    let pairs: Vec<(&str, &str)> = named
        .split(',')
        .map(|p| p.split_once('=').expect("layer=index"))
        .collect();
    assert_eq!(pairs.len(), 4, "{named}");
    let swapped: Vec<String> = pairs
        .iter()
        .enumerate()
        .map(|(i, (layer, _))| format!("{layer}={}", pairs[(i + 1) % pairs.len()].1))
        .collect();
    entry["annotations"][key] = swapped.join(",").into();
    rt.block_on(registry.put_manifest(
        &parsed,
        &tag,
        &listing.media_type,
        serde_json::to_vec(&doc).expect("json").into(),
    ))
    .expect("put the listing");

    stack.rpull(&reference);
    let log = stack.lazysnap_log();
    assert!(log.contains("fetched_with_the_listing=0"), "{log}");
    assert_eq!(lazily_mounted(&stack), 4, "{log}");
    let out = stack.run(
        "lazysnap",
        &reference,
        "listing",
        "cat /data/variant /app/hello.txt",
    );
    assert_eq!(out, "variant 3\nhello from the app layer\n");
}

/// `lazysnap index --trace` with the read trace of a start: the app layer's index gets a
/// resume point before each range the start read, so that another node prefetching that
/// trace fetches a fraction of the compressed bytes it fetches through the plain index (from
/// each span's resume point on), and reads the same bytes.
#[test]
fn an_index_made_with_a_trace_prefetches_the_traced_ranges_alone() {
    harness::require_root();
    let mut stack = Stack::start(LAZYSNAP);
    let reference = stack.image_ref("gzidx:traced");
    image::push(&image_spec(4), &stack.dir, &reference);
    let digest = manifest_digest(&reference);
    let plain = index(&stack, &reference);
    let app = app_layer(&plain)["digest"]
        .as_str()
        .expect("the app layer's digest")
        .to_owned();
    // Small reads inside a 12 MiB file, at places 1 MiB spans do not start at.
    let reads = "for k in 300 700 1100 1500 1900 2300 2700; do \
        dd if=/app/lib.py bs=4096 skip=$k count=1 2>/dev/null | sha256sum; done";

    stack.rpull(&reference);
    let first = stack.run("lazysnap", &reference, "first", reads);
    assert_eq!(first.lines().count(), 7, "{first}");
    // The recorder saves its trace every 2 s.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let trace = stack.dir.join("app-trace.json");
    let trace = trace.to_str().expect("utf-8 path").to_owned();
    stack.cli(&["trace", "export", &app, "-o", &trace]);

    // A node given the trace prefetches what it names, then reads: app layer bytes fetched.
    let prefetched = |stack: &mut Stack, id: &str| -> (u64, String) {
        stack.new_node();
        stack.cli(&["trace", "import", &trace]);
        let before = stack.registry_blob_bytes_of(&app);
        stack.rpull(&reference);
        let done = format!("prefetched the layer's traced and prioritized files layer={app}");
        stack.eventually(
            "the trace prefetch",
            std::time::Duration::from_secs(60),
            || stack.lazysnap_log().contains(&done),
        );
        let fetched = stack.registry_blob_bytes_of(&app) - before;
        (fetched, stack.run("lazysnap", &reference, id, reads))
    };
    let (plain_bytes, through_plain) = prefetched(&mut stack, "plain");
    assert_eq!(through_plain, first);

    let traced = index_with(&stack, &reference, &["--trace", &trace]);
    assert_eq!(app_layer(&traced)["digest"], app.as_str());
    assert!(
        app_layer(&traced)["traced_points"].as_u64().unwrap_or(0) >= 3,
        "{traced:#}"
    );
    assert_eq!(
        manifest_digest(&reference),
        digest,
        "the image is unchanged"
    );
    let (traced_bytes, through_traced) = prefetched(&mut stack, "traced");
    assert_eq!(through_traced, first, "the same bytes");
    eprintln!(
        "app layer bytes the trace prefetch fetched: {plain_bytes} through the plain index, {traced_bytes} through the one made with the trace"
    );
    assert!(
        traced_bytes * 3 < plain_bytes * 2,
        "{traced_bytes} bytes through the index made with the trace, {plain_bytes} without"
    );
}
