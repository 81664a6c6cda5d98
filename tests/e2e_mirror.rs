//! Mirrors from containerd's `hosts.toml`: lazysnap reads lazy layers from the mirror listed
//! for the origin registry (`<hosts_dir>/127.0.0.1:PORT/hosts.toml`), and the origin sees none
//! of those reads; when the mirror goes down, reads of uncached files go to the origin and
//! succeed, and lazysnap logs the mirror's failure once per layer, not once per chunk.

mod harness;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use harness::auth::{self, AccessEntry, AuthRegistry};
use harness::{image, Stack};
use sha2::{Digest as _, Sha256};

const LAZYSNAP: &str = env!("CARGO_BIN_EXE_lazysnap");
const MIRROR_FAILED: &str = "mirror failed; trying the next host";

/// The origin's access log from entry `from` on (lazysnap's requests only).
fn lazysnap_requests(log: &Path, from: usize) -> Vec<AccessEntry> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    auth::parse_access_log(&auth::access_lines(&text))
        .into_iter()
        .skip(from)
        .filter(AccessEntry::by_lazysnap)
        .collect()
}

fn access_entries(log: &Path) -> usize {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    auth::parse_access_log(&auth::access_lines(&text)).len()
}

/// A stack whose lazysnap reads `hosts.toml` files from the returned directory, with short
/// deadlines so that a failing mirror does not slow the test down.
fn stack_with_hosts_dir(prefix: &str) -> (tempfile::TempDir, std::path::PathBuf, Stack) {
    let tmp = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("temp dir");
    let hosts_dir = tmp.path().join("certs.d");
    std::fs::create_dir_all(&hosts_dir).expect("create hosts dir");
    let config = tmp.path().join("lazysnap.toml");
    std::fs::write(
        &config,
        format!(
            "[registry]\nhosts_dir = \"{}\"\nrequest_timeout = \"2s\"\nread_deadline = \"10s\"\n",
            hosts_dir.display()
        ),
    )
    .expect("write lazysnap config");
    let stack = Stack::start_with(
        LAZYSNAP,
        vec!["--config".into(), config.display().to_string()],
    );
    (tmp, hosts_dir, stack)
}

#[test]
fn lazy_layers_are_read_from_the_mirror_and_from_the_origin_when_it_fails() {
    let started = Instant::now();
    let (tmp, hosts_dir, stack) = stack_with_hosts_dir("lazysnap-mirror-");
    let mut mirror = AuthRegistry::anonymous(tmp.path());

    // The eStargz image on the origin (small chunks, so one file is many chunks), copied to
    // the mirror with every digest kept.
    let spec = image::standard_image();
    let plain = stack.image_ref("app:gzip");
    image::push(&spec, &stack.dir, &plain);
    let lazy = stack.image_ref("app:esgz");
    stack.convert_and_push(
        &plain,
        &lazy,
        &["--estargz", "--estargz-chunk-size", "65536"],
    );
    mirror.copy_from(&lazy, "app:esgz");
    let manifest = |reference: &str| {
        let out = std::process::Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{reference}"))
            .output()
            .expect("run skopeo");
        assert!(out.status.success(), "skopeo inspect {reference}");
        out.stdout
    };
    assert_eq!(
        manifest(&lazy),
        manifest(&mirror.image_ref("app:esgz")),
        "the mirror holds the same manifest, so the same layer digests"
    );

    harness::stack::write_hosts_toml(&hosts_dir, &stack.registry_host, mirror.host());

    let origin_log = stack
        .registry
        .as_ref()
        .expect("origin registry")
        .log
        .clone();
    let origin_before_pull = access_entries(&origin_log);
    stack.rpull(&lazy);
    let layers = stack.lazy_layers();
    assert_eq!(
        layers.len(),
        3,
        "every layer mounted lazily: {layers:?}\n{}",
        stack.lazysnap_log()
    );
    let out = stack.run("lazysnap", &lazy, "first", "cat /data/small.txt");
    assert_eq!(out, "hello from layer 2\n");

    // Every layer's footer, TOC and file chunks came from the mirror, none from the origin.
    let from_mirror: Vec<AccessEntry> = mirror
        .requests()
        .into_iter()
        .filter(AccessEntry::by_lazysnap)
        .collect();
    for (digest, _) in &layers {
        assert!(
            from_mirror.iter().any(|r| r.is_range_get_of(digest)),
            "the mirror served ranges of {digest}:\n{}",
            mirror.access_log()
        );
    }
    let at_origin = lazysnap_requests(&origin_log, origin_before_pull);
    assert!(
        at_origin.is_empty(),
        "lazysnap asked the origin nothing while the mirror worked: {at_origin:?}"
    );
    // Nor did anyone else read the layers' blobs there (containerd took the manifest and the
    // config from the origin, which is its business).
    let origin_text = std::fs::read_to_string(&origin_log).unwrap_or_default();
    let layer_reads: Vec<AccessEntry> = auth::parse_access_log(&auth::access_lines(&origin_text))
        .into_iter()
        .skip(origin_before_pull)
        .filter(|r| r.method == "GET" && layers.iter().any(|(d, _)| r.path.ends_with(d.as_str())))
        .collect();
    assert!(
        layer_reads.is_empty(),
        "no layer blob was read from the origin: {layer_reads:?}"
    );
    assert!(
        !stack.lazysnap_log().contains(MIRROR_FAILED),
        "no mirror failure yet:\n{}",
        stack.lazysnap_log()
    );

    // The mirror goes away; an uncached file of the biggest layer is read from the origin.
    mirror.stop();
    let origin_before_outage_read = access_entries(&origin_log);
    let big = spec.layers[1]
        .iter()
        .find_map(|e| match e {
            image::Entry::File { path, data, .. } if path == "data/big.bin" => Some(data),
            _ => None,
        })
        .expect("big.bin in the standard image");
    let read_started = Instant::now();
    let out = stack.run(
        "lazysnap",
        &lazy,
        "second",
        "sha256sum /data/big.bin | cut -d' ' -f1",
    );
    let read_time = read_started.elapsed();
    assert_eq!(
        out.trim(),
        hex::encode(Sha256::digest(big)),
        "big.bin reads"
    );
    let (big_layer, _) = &layers[0];
    let at_origin = lazysnap_requests(&origin_log, origin_before_outage_read);
    let origin_gets = at_origin
        .iter()
        .filter(|r| r.is_range_get_of(big_layer))
        .count();
    assert!(
        origin_gets >= 2,
        "the origin served the chunks of {big_layer} in several requests: {at_origin:?}"
    );

    // One warning per layer and mirror, however many chunks went to the origin.
    let log = stack.lazysnap_log();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains(MIRROR_FAILED)).collect();
    let mut per_layer = BTreeMap::<&str, usize>::new();
    for line in &warnings {
        assert!(
            line.contains(&format!("mirror={}", mirror.host())),
            "the warning names the mirror: {line}"
        );
        let layer = layers
            .iter()
            .map(|(d, _)| d.as_str())
            .find(|d| line.contains(d))
            .unwrap_or_else(|| panic!("the warning names a lazy layer: {line}"));
        *per_layer.entry(layer).or_default() += 1;
    }
    assert_eq!(
        per_layer.get(big_layer.as_str()),
        Some(&1),
        "exactly one warning for {big_layer} after {origin_gets} reads from the origin:\n{}",
        warnings.join("\n")
    );
    assert!(
        per_layer.values().all(|n| *n == 1),
        "one warning per layer: {per_layer:?}"
    );
    eprintln!(
        "mirror down: big.bin read in {read_time:?} with {origin_gets} range GETs at the origin; {} mirror warning(s): {}",
        warnings.len(),
        warnings.first().copied().unwrap_or_default()
    );
    eprintln!("test took {:?}", started.elapsed());
}

/// A plain gzip image whose gzip index was pushed to the mirror only (the origin has the
/// image but no index, as when a mirror team indexes what it serves): lazysnap finds the
/// index through the mirror from hosts.toml, as it reads blobs, and mounts the layers
/// lazily without asking the origin anything.
#[test]
fn a_gzip_index_is_found_through_the_mirror() {
    let (tmp, hosts_dir, stack) = stack_with_hosts_dir("lazysnap-mirror-index-");
    let mirror = AuthRegistry::anonymous(tmp.path());

    let spec = image::standard_image();
    let plain = stack.image_ref("app:gzip");
    image::push(&spec, &stack.dir, &plain);
    mirror.copy_from(&plain, "app:gzip");
    // Indexed on the mirror alone; `index` reads the image there and pushes beside it.
    let index_config = tmp.path().join("index.toml");
    std::fs::write(&index_config, "").expect("write index config");
    let out = std::process::Command::new(LAZYSNAP)
        .args(["index", &mirror.image_ref("app:gzip"), "--push"])
        .args(["--min-layer-size", "0", "--config"])
        .arg(&index_config)
        .output()
        .expect("run lazysnap index");
    assert!(
        out.status.success(),
        "lazysnap index on the mirror failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    harness::stack::write_hosts_toml(&hosts_dir, &stack.registry_host, mirror.host());

    let origin_log = stack
        .registry
        .as_ref()
        .expect("origin registry")
        .log
        .clone();
    let origin_before_pull = access_entries(&origin_log);
    let mirror_before_pull = mirror.requests().len();
    stack.rpull(&plain);
    let layers = stack.lazy_layers();
    assert_eq!(
        layers.len(),
        spec.layers.len(),
        "every layer mounted lazily through the mirror's index: {layers:?}\n{}",
        stack.lazysnap_log()
    );
    let out = stack.run("lazysnap", &plain, "indexed", "cat /data/small.txt");
    assert_eq!(out, "hello from layer 2\n");

    let at_origin = lazysnap_requests(&origin_log, origin_before_pull);
    assert!(
        at_origin.is_empty(),
        "lazysnap asked the origin nothing, neither for the index nor for the layers: {at_origin:?}"
    );
    let at_mirror: Vec<AccessEntry> = mirror
        .requests()
        .into_iter()
        .skip(mirror_before_pull)
        .filter(AccessEntry::by_lazysnap)
        .filter(|r| r.method == "GET" && r.path.contains("/manifests/sha256-"))
        .collect();
    assert!(
        !at_mirror.is_empty(),
        "the mirror answered the index lookup (referrers tag schema):\n{}",
        mirror.access_log()
    );
    assert!(
        !stack.lazysnap_log().contains(MIRROR_FAILED),
        "no mirror failure:\n{}",
        stack.lazysnap_log()
    );
}
