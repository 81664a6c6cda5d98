//! Memory and time are bounded by configuration, never by input: layers whose TOC claims
//! more than `[limits]` allows — a 2^62-byte file, 50,000 nested directories, honest chunks
//! larger than `max_chunk_bytes`, a million entries, chunk arithmetic that overflows u64,
//! names over NAME_MAX — are refused when their index is built, with a log line naming the
//! limit and the value, and take the ordinary path (containerd downloads and unpacks them).
//! Meanwhile the daemon stays up, a container on a good lazy image keeps reading, and
//! lazysnap's peak RSS stays bounded.

mod harness;

use harness::estargz::{self, File};
use harness::image;
use harness::Stack;

const LAZYSNAP: &str = env!("CARGO_BIN_EXE_lazysnap");
/// lazysnap's peak resident memory over the whole test must stay below this.
const MAX_RSS_KIB: u64 = 300 << 10;

fn files(case: &str) -> Vec<File> {
    vec![
        File::new("app/hello.txt", "hello\n"),
        File::new("app/case", case),
    ]
}

/// `VmHWM` (peak) and `VmRSS` of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("memory field")
    };
    (field("VmHWM:"), field("VmRSS:"))
}

#[test]
fn layers_over_the_limits_take_the_ordinary_path_and_the_daemon_stays_small() {
    let stack = Stack::start(LAZYSNAP);
    let pid = stack
        .lazysnap
        .as_ref()
        .and_then(|p| p.pid())
        .expect("lazysnap pid");

    // The victim: a good lazy image, read after every case.
    let victim = image::push_over_busybox(
        &stack,
        "victim",
        estargz::layer(&["app/"], &files("victim")).into(),
    );
    stack.rpull(&victim);
    assert_eq!(
        stack.lazysnap_log().matches("layer mounted lazily").count(),
        1
    );
    let mut runs = 0;
    let mut victim_reads = |stack: &Stack, case: &str| {
        runs += 1;
        let out = stack.run(
            "lazysnap",
            &victim,
            &format!("victim-{runs}"),
            "cat /app/hello.txt /app/case",
        );
        assert_eq!(out, "hello\nvictim", "after {case}");
    };
    victim_reads(&stack, "the start");

    let big = 80usize << 20;
    let cases: Vec<(&str, estargz::Layer, String, Option<&str>)> = vec![
        (
            "size-2-62",
            estargz::layer_with_toc(
                &[estargz::Dir::new("app/", 0o755, 0, 0)],
                &files("size"),
                |entries| {
                    let e = entries
                        .iter_mut()
                        .find(|e| e["name"] == "app/hello.txt")
                        .expect("entry");
                    e["size"] = (1u64 << 62).into();
                },
                "",
            ),
            "TOC entry \"app/hello.txt\": chunk of 4611686018427387904 bytes exceeds the limit of 67108864 ([limits] max_chunk_bytes)".into(),
            Some("hello\n"),
        ),
        (
            "deep",
            estargz::layer_with_toc(
                &[estargz::Dir::new("app/", 0o755, 0, 0)],
                &files("deep"),
                |_| {},
                &format!(r#"{{"name":"{}","type":"dir"}}"#, vec!["a"; 50_000].join("/")),
            ),
            "path depth of 50000 exceeds the limit of 512 ([limits] max_path_depth)".into(),
            None,
        ),
        (
            "big-chunk",
            estargz::layer(
                &["app/"],
                &[
                    File::new("app/hello.txt", "hello\n"),
                    File::new("app/zeros", vec![0u8; big]),
                ],
            ),
            format!("chunk of {big} bytes exceeds the limit of 67108864 ([limits] max_chunk_bytes)"),
            Some("hello\n"),
        ),
        (
            "million",
            estargz::layer_with_toc(&[estargz::Dir::new("app/", 0o755, 0, 0)], &files("million"), |_| {}, &{
                let mut extra = String::with_capacity(40 << 20);
                for i in 0..1_000_000 {
                    if i > 0 {
                        extra.push(',');
                    }
                    extra.push_str(&format!(r#"{{"name":"m/{i}","type":"dir"}}"#));
                }
                extra
            }),
            "TOC of more than 500000 entries exceeds the limit of 500000 ([limits] max_entries)"
                .into(),
            Some("hello\n"),
        ),
        (
            "overflow",
            estargz::layer_with_toc(
                &[estargz::Dir::new("app/", 0o755, 0, 0)],
                &files("overflow"),
                |entries| {
                    let e = entries
                        .iter_mut()
                        .find(|e| e["name"] == "app/hello.txt")
                        .expect("entry");
                    e["innerOffset"] = u64::MAX.into();
                },
                "",
            ),
            "inner offset 18446744073709551615 plus length 6 overflows".into(),
            Some("hello\n"),
        ),
        (
            "long-name",
            estargz::layer_with_toc(
                &[estargz::Dir::new("app/", 0o755, 0, 0)],
                &files("longname"),
                |_| {},
                &format!(r#"{{"name":"app/{}","type":"dir"}}"#, "n".repeat(300)),
            ),
            "name component of 300 bytes exceeds the limit of 255 ([limits] max_name_bytes)"
                .into(),
            Some("hello\n"),
        ),
    ];
    for (case, layer, message, expect) in cases {
        let started = std::time::Instant::now();
        let reference = image::push_over_busybox(&stack, case, layer.into());
        // The TOC lies about the tar (or only is too big): the tar itself is sound, so the
        // ordinary path unpacks it.
        stack.rpull(&reference);
        let log = stack.lazysnap_log();
        let line = log
            .lines()
            .find(|l| l.contains(&message))
            .unwrap_or_else(|| panic!("{case}: no log line with {message:?}:\n{log}"));
        assert!(line.contains("falling back"), "{case}: {line}");
        assert_eq!(
            log.matches("layer mounted lazily").count(),
            1,
            "{case}: only the victim is lazy"
        );
        if let Some(expect) = expect {
            assert_eq!(
                stack.run("lazysnap", &reference, case, "cat /app/hello.txt"),
                expect,
                "{case}: unpacked by the ordinary path"
            );
        }
        victim_reads(&stack, case);
        let (peak, now) = memory_kib(pid);
        eprintln!(
            "{case}: {:?}; lazysnap peak RSS {} MiB, now {} MiB",
            started.elapsed(),
            peak >> 10,
            now >> 10
        );
        assert!(peak < MAX_RSS_KIB, "{case}: lazysnap peak RSS {peak} KiB");
    }
    // Still the same daemon.
    assert_eq!(
        stack.lazysnap.as_ref().and_then(|p| p.pid()),
        Some(pid),
        "lazysnap was not restarted"
    );
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
}
