//! Resolving lazy layers through a real containerd and docker-registry: one ranged request per
//! layer (its last bytes hold the footer and the TOC), and the image's other layers resolved
//! ahead, in the background, on its first layer's Prepare, so containerd's later Prepares do
//! not each wait a round trip, not even for a TOC larger than those last bytes. The same layers
//! pulled again in another image come from their saved state, with no request. A TOC that
//! does not match its own layer's label still falls back to the ordinary path.

mod harness;

use std::time::Duration;

use harness::estargz::{self, File};
use harness::image::{self, BlobLayer, ImageSpec};
use harness::throttle::Throttle;
use harness::Stack;

const LAZYSNAP: &str = env!("CARGO_BIN_EXE_lazysnap");

/// The emulated round trip between lazysnap and the registry.
const RTT: Duration = Duration::from_millis(300);

/// Prefetch off: the only blob requests are the ones resolving makes (and containerd's own
/// download of plain layers).
fn config() -> (tempfile::TempDir, Vec<String>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("lazysnap.toml");
    std::fs::write(&path, "[prefetch]\nenabled = false\n").expect("write config");
    (dir, vec!["--config".into(), path.display().to_string()])
}

fn files(case: &str, n: usize) -> Vec<File> {
    vec![
        File::new(&format!("{case}/hello.txt"), format!("hello from {case}\n")),
        File::new(
            &format!("{case}/data.bin"),
            image::pseudo_random(200_000 + n * 500_000, n as u64 + 7),
        ),
    ]
}

/// busybox (plain gzip) under `tops`, pushed straight to the registry as `name:1`; returns
/// the reference through `via` (the throttle).
fn push(stack: &Stack, via: &Throttle, name: &str, tops: Vec<BlobLayer>) -> String {
    let spec = ImageSpec {
        layers: vec![image::busybox_layer()],
        blobs: tops,
        cmd: vec!["/bin/sh".into()],
    };
    image::push(&spec, &stack.dir, &stack.image_ref(&format!("{name}:1")));
    format!("{}/{name}:1", via.addr())
}

/// lazysnap's requests for blob `digest` in the registry's access log: (method, status).
fn lazysnap_requests_of(stack: &Stack, digest: &str) -> Vec<(String, String)> {
    let log = stack
        .registry
        .as_ref()
        .and_then(|r| std::fs::read_to_string(&r.log).ok())
        .unwrap_or_default();
    log.lines()
        .filter(|l| l.contains("/blobs/") && l.contains(digest) && l.contains("lazysnap/"))
        .filter_map(|l| {
            let request = l.split('"').nth(1)?;
            let method = request.split(' ').next()?.to_owned();
            let status = l.split("HTTP/1.1\" ").nth(1)?.split(' ').next()?.to_owned();
            Some((method, status))
        })
        .collect()
}

/// Seconds since midnight of a log line's RFC 3339 timestamp.
fn seconds(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?;
    let time = stamp.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn layers_resolve_in_one_request_each_and_ahead_of_their_prepares() {
    let (_config, args) = config();
    let stack = Stack::start_with(LAZYSNAP, args);
    let registry: std::net::SocketAddr = format!("127.0.0.1:{}", stack.registry_port())
        .parse()
        .expect("registry address");
    let throttle = Throttle::start(registry, RTT, 1000.0);

    let mut tops: Vec<BlobLayer> = ["one", "two", "three"]
        .iter()
        .enumerate()
        .map(|(n, case)| estargz::layer(&[&format!("{case}/")], &files(case, n)).into())
        .collect();
    // A layer of many small files: its TOC is larger than the suffix resolving fetches, so
    // its rest is fetched ahead too.
    let mut many = files("many", 0);
    many.extend((0..2500).map(|i| File::new(&format!("many/f{i}"), format!("file {i}\n"))));
    tops.push(estargz::layer(&["many/"], &many).into());
    let reference = push(&stack, &throttle, "ahead", tops.clone());
    stack.rpull(&reference);

    let log = strip_ansi(&stack.lazysnap_log());
    assert!(
        log.contains("stargz.layers") || log.contains("cri.image-layers"),
        "Prepare labels name the image's layers:\n{log}"
    );
    let layers = stack.lazy_layers();
    assert_eq!(layers.len(), 4, "{log}");

    // (a) One ranged GET per lazy layer whose TOC is in its last bytes: no HEAD, no separate
    // footer or TOC request; two for the layer whose TOC begins before them.
    // That second request is made ahead, not by the layer's Prepare: a Prepare fetching the
    // index itself would be a third.
    let mut two_requests = 0;
    for (digest, _) in &layers {
        let requests = lazysnap_requests_of(&stack, digest);
        let get = ("GET".to_owned(), "206".to_owned());
        if requests.len() == 2 {
            two_requests += 1;
            assert!(
                log.lines()
                    .any(|l| l.contains("fetched the layer's index ahead") && l.contains(digest)),
                "layer {digest}'s index was not fetched ahead:\n{log}"
            );
        }
        assert!(
            requests == vec![get.clone()] || requests == vec![get.clone(), get],
            "layer {digest}: {requests:?}"
        );
    }
    assert_eq!(
        two_requests, 1,
        "only the many-file layer needs a second request"
    );

    // (b) Resolved ahead: every lazy layer's Prepare found its bytes fetched (or being
    // fetched) in the background, so the mounts follow each other without a round trip each.
    for (digest, _) in &layers {
        assert!(
            log.lines()
                .any(|l| l.contains("using the suffix fetched ahead") && l.contains(digest)),
            "layer {digest} was not resolved ahead:\n{log}"
        );
    }
    let mounted: Vec<f64> = log
        .lines()
        .filter(|l| l.contains("layer mounted lazily"))
        .filter_map(seconds)
        .collect();
    assert_eq!(mounted.len(), 4, "{log}");
    let spread = mounted[3] - mounted[0];
    eprintln!(
        "4 lazy layers mounted within {:.0} ms of each other (round trip {} ms)",
        spread * 1000.0,
        RTT.as_millis()
    );
    // The many-file layer's index arrives a round trip after its suffix, both ahead; one after
    // the other, the four layers would take at least five.
    assert!(
        spread < 2.0 * RTT.as_secs_f64(),
        "mounting took {spread:.3}s, one round trip per layer would be {:.3}s:\n{log}",
        5.0 * RTT.as_secs_f64()
    );

    // (c) The contents read correctly.
    let out = stack.run(
        "lazysnap",
        &reference,
        "ahead",
        "cat /one/hello.txt /two/hello.txt /three/hello.txt && wc -c < /three/data.bin",
    );
    assert_eq!(
        out,
        "hello from one\nhello from two\nhello from three\n1200000\n"
    );

    // (d) The same layers in another image, over another base (so containerd prepares each
    // of them again): resolved from the saved state, no request for any of them, and the
    // TOC is not fetched again.
    let before: Vec<_> = layers
        .iter()
        .map(|(digest, _)| lazysnap_requests_of(&stack, digest))
        .collect();
    let mut again = vec![estargz::layer(&["zero/"], &files("zero", 0)).into()];
    again.extend(tops);
    let reference = push(&stack, &throttle, "again", again);
    stack.rpull(&reference);
    let log = strip_ansi(&stack.lazysnap_log());
    for ((digest, _), before) in layers.iter().zip(before) {
        assert_eq!(
            lazysnap_requests_of(&stack, digest),
            before,
            "layer {digest} was asked of the registry again:\n{log}"
        );
        assert!(
            log.lines()
                .any(|l| l.contains("reusing saved layer state") && l.contains(digest)),
            "layer {digest} was not taken from its saved state:\n{log}"
        );
    }
    let out = stack.run(
        "lazysnap",
        &reference,
        "again",
        "cat /zero/hello.txt /many/f2499",
    );
    assert_eq!(out, "hello from zero\nfile 2499\n");
}

#[test]
fn a_layer_whose_toc_does_not_match_its_own_label_falls_back() {
    let (_config, args) = config();
    let stack = Stack::start_with(LAZYSNAP, args);
    let registry: std::net::SocketAddr = format!("127.0.0.1:{}", stack.registry_port())
        .parse()
        .expect("registry address");
    let throttle = Throttle::start(registry, Duration::from_millis(20), 1000.0);

    let good: BlobLayer = estargz::layer(&["good/"], &files("good", 0)).into();
    let mut lying: BlobLayer = estargz::layer(&["lying/"], &files("lying", 1)).into();
    lying.annotations[0].1 = format!("sha256:{}", "1".repeat(64));
    let reference = push(&stack, &throttle, "lying", vec![good, lying]);
    stack.rpull(&reference);

    let log = strip_ansi(&stack.lazysnap_log());
    // The lying layer's bytes were fetched ahead too, but its own Prepare checked them
    // against its own label and refused them.
    assert!(log.contains("TOC digest is"), "{log}");
    assert_eq!(log.matches("layer mounted lazily").count(), 1, "{log}");
    assert_eq!(
        log.matches("using the suffix fetched ahead").count(),
        2,
        "{log}"
    );
    assert_eq!(stack.lazy_layers().len(), 1, "{log}");
    let out = stack.run(
        "lazysnap",
        &reference,
        "lying",
        "cat /good/hello.txt /lying/hello.txt && wc -c < /lying/data.bin",
    );
    assert_eq!(out, "hello from good\nhello from lying\n700000\n");
}
