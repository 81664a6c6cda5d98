//! The chunk cache's containment, through real containerd and docker-registry: a chunk is
//! served to a layer only if that layer's own blob was verified to hold it; saved layer state
//! is compressed, counted in the disk budget, reused by another snapshot of the same layer
//! without a registry request, and removed with its last snapshot or by `cache prune`; and
//! the disk budget holds on disk at every moment, not just after each write.

mod harness;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sha2::Digest;

use harness::estargz::{self, File};
use harness::image::{self, BlobLayer, ImageSpec};
use harness::Stack;

const LAZYSNAP: &str = env!("CARGO_BIN_EXE_lazysnap");

/// busybox (plain gzip) under `blobs`; pushed as `name:1`.
fn push(stack: &Stack, name: &str, blobs: Vec<BlobLayer>) -> String {
    let spec = ImageSpec {
        layers: vec![image::busybox_layer()],
        blobs,
        cmd: vec!["/bin/sh".into()],
    };
    let reference = stack.image_ref(&format!("{name}:1"));
    image::push(&spec, &stack.dir, &reference);
    reference
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

fn blob_digest(layer: &BlobLayer) -> String {
    format!("sha256:{}", sha256_hex(&layer.blob))
}

fn number(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("field {field} missing or not a number in {v}"))
}

/// Registry access-log lines naming `digest` (HEAD and GET of the blob).
fn registry_lines_of(stack: &Stack, digest: &str) -> usize {
    let log = stack
        .registry
        .as_ref()
        .and_then(|r| std::fs::read_to_string(&r.log).ok())
        .unwrap_or_default();
    log.lines()
        .filter(|l| l.contains("/blobs/") && l.contains(digest))
        .count()
}

/// Bytes of the regular files under `dirs`, each file counted once (by inode). Files of the
/// local store count the blocks they take (they are sparse); others, their length.
fn on_disk(dirs: &[&Path]) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    for dir in dirs {
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
                    continue;
                };
                if meta.is_dir() {
                    stack.push(e.path());
                } else if meta.is_file() && seen.insert(meta.ino()) {
                    let sparse =
                        e.path().extension().is_none() && e.path().starts_with(dir.join("files"));
                    total += if sparse {
                        meta.blocks() * 512
                    } else {
                        meta.len()
                    };
                }
            }
        }
    }
    total
}

/// What lazysnap keeps on disk that counts against its budget: the local store and saved
/// layer state.
fn lazysnap_disk(root: &Path) -> u64 {
    on_disk(&[&root.join("cache"), &root.join("layers")])
}

#[test]
fn chunks_are_served_only_to_layers_whose_blob_holds_them_and_saved_state_is_scoped() {
    let stack = Stack::start(LAZYSNAP);
    let root = stack.lazysnap_root();
    let layers = root.join("layers");

    // The victim's private file, under one chunk: its chunk digest is the file's sha256,
    // which an SBOM of the victim's image would publish.
    let private = image::pseudo_random(200_000, 77);
    let private_sha = sha256_hex(&private);
    let claimed = format!("sha256:{private_sha}");
    let victim: BlobLayer = estargz::layer(
        &["secret/"],
        &[
            File::new("secret/private.bin", private.clone()),
            File::new("secret/case", "victim"),
        ],
    )
    .into();
    let victim_digest = blob_digest(&victim);
    // The attacker's layer claims that digest for a file of the same size holding other bytes.
    let attacker: BlobLayer = estargz::layer(
        &["b/"],
        &[File::claiming(
            "b/stolen.bin",
            image::pseudo_random(private.len(), 78),
            &claimed,
        )],
    )
    .into();
    // A third image's layer really holds the same bytes, in another blob.
    let honest: BlobLayer = estargz::layer(
        &["c/"],
        &[
            File::new("c/copy.bin", private.clone()),
            File::new("c/case", "honest"),
        ],
    )
    .into();
    let honest_digest = blob_digest(&honest);
    assert_ne!(honest_digest, victim_digest);
    // A fourth image holds the victim's very layer, one layer higher up (so containerd
    // prepares a snapshot of its own for it while the victim's is still there).
    let middle: BlobLayer =
        estargz::layer(&["m/"], &[File::new("m/case", "same blob, higher up")]).into();

    let a = push(&stack, "victim", vec![victim.clone()]);
    let b = push(&stack, "attacker", vec![attacker]);
    let c = push(&stack, "honest", vec![honest]);
    let d = push(&stack, "sameblob", vec![middle, victim]);

    // A: the victim reads its file; the chunk is now cached, for A's blob.
    stack.rpull(&a);
    let out = stack.run("lazysnap", &a, "a", "sha256sum < /secret/private.bin");
    assert!(out.starts_with(&private_sha), "{out}");
    let victim_state = layers.join(victim_digest.replace(':', "-"));
    assert!(
        victim_state.join("index.zst").exists() && victim_state.join("layer.json").exists(),
        "saved state is compressed"
    );
    assert!(!victim_state.join("index").exists());

    // B: the chunk its TOC names is in the cache, but not for B's blob: B fetches its own
    // bytes, which do not match, and the read fails. The victim's bytes never reach B.
    stack.rpull(&b);
    let out = stack.run(
        "lazysnap",
        &b,
        "b",
        "if sha256sum < /b/stolen.bin 2>/dev/null; then echo READ; else echo EIO; fi",
    );
    assert!(
        !out.contains(&private_sha),
        "the attacker read the victim's file: {out}"
    );
    assert_eq!(out.trim_end().lines().last(), Some("EIO"), "{out}");
    assert!(
        stack.lazysnap_log().contains("content hashes to"),
        "{}",
        stack.diagnostics()
    );

    // C: the same bytes in another blob read correctly, fetched once from C's own blob.
    let before = stack.registry_blob_bytes_of(&honest_digest);
    stack.rpull(&c);
    let out = stack.run("lazysnap", &c, "c", "sha256sum < /c/copy.bin");
    assert!(out.starts_with(&private_sha), "{out}");
    let fetched = stack.registry_blob_bytes_of(&honest_digest) - before;
    assert!(
        fetched >= private.len() as u64 / 2,
        "C proved its blob holds the chunk by fetching it: {fetched} bytes"
    );
    let out = stack.run("lazysnap", &c, "c2", "sha256sum < /c/copy.bin");
    assert!(out.starts_with(&private_sha), "{out}");
    assert_eq!(
        stack.registry_blob_bytes_of(&honest_digest) - before,
        fetched,
        "once"
    );

    // D: the victim's blob again, in another snapshot: the saved state is reused (no HEAD,
    // no footer, no TOC request for the blob) and the cached chunk is served (same blob).
    let lines = registry_lines_of(&stack, &victim_digest);
    let bytes = stack.registry_blob_bytes_of(&victim_digest);
    stack.rpull(&d);
    assert_eq!(
        registry_lines_of(&stack, &victim_digest),
        lines,
        "mounting the same layer again asked the registry nothing"
    );
    assert!(
        stack.lazysnap_log().contains("reusing saved layer state"),
        "{}",
        stack.diagnostics()
    );
    let out = stack.run(
        "lazysnap",
        &d,
        "d",
        "cat /m/case; echo; sha256sum < /secret/private.bin",
    );
    assert!(
        out.starts_with("same blob, higher up\n") && out.contains(&private_sha),
        "{out}"
    );
    assert_eq!(
        stack.registry_blob_bytes_of(&victim_digest),
        bytes,
        "the same blob reads what it proved without fetching"
    );

    // Saved state counts in the disk figures: what `cache stats` says is what is on disk.
    stack.eventually(
        "cache stats to match the files on disk",
        Duration::from_secs(10),
        || {
            let (stats, disk) = (stack.cli_json(&["cache", "stats"]), lazysnap_disk(&root));
            eprintln!("cache stats {stats}; on disk {disk}");
            number(&stats, "disk_used_bytes") == disk
        },
    );
    let state_bytes = on_disk(&[&layers]);
    assert!(state_bytes > 0);

    // cache prune: the state of a layer nothing mounts goes (here one an earlier version left
    // behind), the states of mounted layers stay.
    let leftover = layers.join(format!("sha256-{}", "e".repeat(64)));
    std::fs::create_dir_all(&leftover).expect("mkdir");
    for f in ["layer.json", "index.zst"] {
        std::fs::copy(victim_state.join(f), leftover.join(f)).expect("copy");
    }
    let pruned = stack.cli_json(&["cache", "prune", "--to", "0"]);
    assert!(!leftover.exists(), "unmounted layer's state pruned");
    assert!(victim_state.exists(), "a mounted layer's state stays");
    assert_eq!(
        number(&pruned, "disk_used_bytes"),
        on_disk(&[&layers]),
        "all that is left is the mounted layers' state: {pruned}"
    );
    assert_eq!(on_disk(&[&layers]), state_bytes);

    // The victim's layer outlives its last snapshot: A and D removed, containerd's GC
    // removes both snapshots of the layer, and its state stays for a pull to come.
    stack.ctr(&["images", "rm", "--sync", &a, &d]);
    stack.eventually(
        "the victim layer to be unmounted",
        Duration::from_secs(30),
        || {
            let listed = stack.cli_json(&["mounts"]);
            !listed["mounts"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|m| m["digest"].as_str() == Some(victim_digest.as_str()))
        },
    );
    assert!(
        victim_state.join("index.zst").exists(),
        "an unmounted layer's state is kept"
    );
    stack.eventually(
        "cache stats to count the kept state",
        Duration::from_secs(10),
        || {
            let (stats, disk) = (stack.cli_json(&["cache", "stats"]), lazysnap_disk(&root));
            eprintln!("cache stats {stats}; on disk {disk}");
            number(&stats, "disk_used_bytes") == disk
        },
    );
    // Pulled again, the image's layer mounts from its kept state, not resolved anew (its
    // data was pruned above, so reading it still fetches).
    // Lines of lazysnap's log that say `what` of the victim's layer.
    let said = |stack: &Stack, what: &str| {
        stack
            .lazysnap_log()
            .lines()
            .filter(|l| l.contains(what) && l.contains(&victim_digest))
            .count()
    };
    let reused = |stack: &Stack| said(stack, "reusing saved layer state");
    let resolved = |stack: &Stack| said(stack, "resolved layer");
    let (reused_before, resolved_before) = (reused(&stack), resolved(&stack));
    stack.rpull(&a);
    assert_eq!(
        (reused(&stack), resolved(&stack)),
        (reused_before + 1, resolved_before),
        "a re-pull after the image was removed took the layer from its kept state"
    );
    let out = stack.run("lazysnap", &a, "a-again", "cat /secret/case");
    assert!(out.starts_with("victim"), "{out}");

    // Removed again and pruned: an unmounted layer's state goes with `cache prune`, and the
    // next pull resolves the layer from the registry.
    stack.ctr(&["images", "rm", "--sync", &a]);
    stack.eventually(
        "cache prune to remove the unmounted layer's state",
        Duration::from_secs(30),
        || {
            stack.cli_json(&["cache", "prune", "--to", "0"]);
            !victim_state.exists()
        },
    );
    let (lines, resolved_before) = (registry_lines_of(&stack, &victim_digest), resolved(&stack));
    stack.rpull(&a);
    assert!(registry_lines_of(&stack, &victim_digest) > lines);
    assert_eq!(resolved(&stack), resolved_before + 1, "resolved anew");
    assert!(victim_state.join("index.zst").exists());
}

#[test]
fn the_disk_budget_holds_on_disk_while_images_are_read() {
    const BUDGET: u64 = 1 << 20;
    let cfg = tempfile::tempdir().expect("tempdir");
    let path = cfg.path().join("lazysnap.toml");
    std::fs::write(
        &path,
        format!("[cache]\ndisk_budget_bytes = {BUDGET}\nmemory_bytes = 4194304\n"),
    )
    .expect("write config");
    let stack = Stack::start_with(
        LAZYSNAP,
        vec!["--config".into(), path.display().to_string()],
    );
    let root = stack.lazysnap_root();

    // Three images of four 300 KB files (one chunk each), and one file larger than the whole
    // budget, which is served but never written to disk.
    let mut images = Vec::new();
    for n in 0..3u64 {
        let mut files = Vec::new();
        let mut script = String::new();
        for k in 0..4u64 {
            let name = format!("d{n}/f{k}.bin");
            let data = image::pseudo_random(300_000, 1000 + n * 10 + k);
            script.push_str(&format!("sha256sum < /{name}; "));
            files.push((sha256_hex(&data), File::new(&name, data)));
        }
        if n == 0 {
            let data = image::pseudo_random(BUDGET as usize + 200_000, 999);
            script.push_str("sha256sum < /d0/huge.bin; ");
            files.push((sha256_hex(&data), File::new("d0/huge.bin", data)));
        }
        let dir = format!("d{n}/");
        let layer = estargz::layer(
            &[&dir],
            &files.iter().map(|(_, f)| f.clone()).collect::<Vec<_>>(),
        );
        let reference = push(&stack, &format!("budget{n}"), vec![layer.into()]);
        let expected: Vec<String> = files.into_iter().map(|(sha, _)| sha).collect();
        images.push((reference, script, expected));
    }

    let done = Arc::new(AtomicBool::new(false));
    let max = Arc::new(AtomicU64::new(0));
    let samples = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (done, max, samples, root) = (done.clone(), max.clone(), samples.clone(), root.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                max.fetch_max(lazysnap_disk(&root), Ordering::Relaxed);
                samples.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    for round in 0..2 {
        for (n, (reference, script, expected)) in images.iter().enumerate() {
            if round == 0 {
                stack.rpull(reference);
            }
            let out = stack.run(
                "lazysnap",
                reference,
                &format!("budget-{round}-{n}"),
                script,
            );
            let got: Vec<&str> = out
                .lines()
                .map(|l| l.split(' ').next().unwrap_or(""))
                .collect();
            assert_eq!(got, *expected, "image {n} round {round}: {out}");
            let s = stack.cli_json(&["cache", "stats"]);
            assert!(number(&s, "disk_used_bytes") <= BUDGET, "{s}");
        }
    }
    done.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");
    let s = stack.cli_json(&["cache", "stats"]);
    let max = max.load(Ordering::Relaxed);
    eprintln!(
        "budget {BUDGET}: largest on-disk size sampled {max} over {} samples; {s}",
        samples.load(Ordering::Relaxed)
    );
    assert!(max <= BUDGET, "on disk {max} > budget {BUDGET}");
    assert!(max > BUDGET / 2, "the test filled the cache: {max}");
    assert!(number(&s, "evicted_bytes") > 0, "something had to go: {s}");
    assert!(
        stack
            .lazysnap_log()
            .contains("larger than the whole disk budget"),
        "{}",
        stack.diagnostics()
    );
    assert!(!std::fs::read_dir(root.join("cache/files"))
        .expect("files")
        .flatten()
        .any(|shard| std::fs::read_dir(shard.path())
            .into_iter()
            .flatten()
            .flatten()
            .any(|f| f.metadata().is_ok_and(|m| m.len() > BUDGET))));
}
