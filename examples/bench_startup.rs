//! Benchmark (not a test): how long a Python container takes to start when its image comes
//! over an emulated WAN link, pulled the normal way and with lazysnap — cold, with an access
//! trace recorded on another node, and warm from lazysnap's cache. Prints a Markdown table.
//!
//! ```text
//! cargo build --release --bin lazysnap --example bench_startup
//! target/release/examples/bench_startup --lazysnap target/release/lazysnap \
//!     [--rtt-ms 20] [--mbit 200] [--runs 3] [--scenarios 1,2,3,4]
//! ```
//!
//! As root. Starts a private registry, containerd and lazysnap (`harness::Stack`), pushes the
//! Python image built from this machine's Python (`harness::python`) as gzip and as eStargz,
//! and puts a throttling proxy (`harness::throttle`) in front of the registry. Every pull and
//! every lazy read refers to the image by the proxy's address, so containerd's downloads and
//! lazysnap's range requests all cross the link; only the setup pushes go around it. Each
//! measured run starts on a fresh node (`Stack::new_node`: empty containerd and lazysnap
//! state, same registry) unless the scenario is about the state a node kept.
//!
//! Scenarios:
//! 1. normal: `ctr images pull` into overlayfs (gzip image), then `ctr run`.
//! 2. lazysnap cold: `ctr-remote image rpull` of the eStargz image, then `ctr run`.
//! 3. lazysnap with a trace from another node: node A runs cold once and exports each layer's
//!    access trace (`lazysnap trace ls/export`); node B imports them, then rpull and run.
//! 4. lazysnap warm: on a node that has run the image, `ctr images rm --sync`, rpull, run;
//!    the chunks come from lazysnap's cache.

#[path = "../tests/harness/mod.rs"]
mod harness;

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use harness::python::{python_image, PYTHON_WORKLOAD};
use harness::throttle::Throttle;
use harness::{image, Stack};

struct Args {
    lazysnap: String,
    rtt: Duration,
    mbit: f64,
    runs: usize,
    scenarios: Vec<usize>,
}

const NAMES: [&str; 4] = [
    "normal pull (overlayfs, gzip)",
    "lazysnap cold (eStargz)",
    "lazysnap with trace from another node",
    "lazysnap warm (image removed, cache kept)",
];

/// One measured start.
struct Sample {
    pull: Duration,
    run: Duration,
    /// Bytes the link carried to this node (registry to client) during the run.
    link_bytes: u64,
    /// lazysnap's `fetched_bytes` and `demand_network_reads` during the run, when it has them.
    fetched: Option<u64>,
    demand_reads: Option<u64>,
    /// Scenario 3: importing the traces before the pull (not part of pull or run).
    import: Option<Duration>,
}

/// What the benchmark shares between scenarios.
struct Bench<'a> {
    stack: &'a mut Stack,
    throttle: &'a Throttle,
    runs: usize,
    /// Image references through the throttle.
    plain: String,
    lazy: String,
}

fn main() {
    let args = parse_args();
    eprintln!("starting registry, lazysnap and containerd in a temporary directory ...");
    let mut stack = Stack::start(&args.lazysnap);

    eprintln!("building the Python image from this machine's Python and pushing it ...");
    let spec = python_image();
    let direct_plain = stack.image_ref("python:gzip");
    let direct_lazy = stack.image_ref("python:esgz");
    image::push(&spec, &stack.dir, &direct_plain);
    eprintln!("converting it to eStargz with ctr-remote ...");
    stack.convert_and_push(&direct_plain, &direct_lazy, &["--estargz"]);

    let registry = stack
        .registry_host
        .parse()
        .expect("the registry listens on an IP address and port");
    let throttle = Throttle::start(registry, args.rtt, args.mbit);
    let mut bench = Bench {
        plain: format!("{}/python:gzip", throttle.addr()),
        lazy: format!("{}/python:esgz", throttle.addr()),
        stack: &mut stack,
        throttle: &throttle,
        runs: args.runs,
    };

    let mut results: Vec<(usize, Result<Vec<Sample>, String>)> = Vec::new();
    for &n in &args.scenarios {
        eprintln!("scenario {n}: {} ...", NAMES[n - 1]);
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| match n {
            1 => normal(&mut bench),
            2 => lazy_cold(&mut bench),
            3 => with_trace(&mut bench),
            4 => warm(&mut bench),
            _ => unreachable!("scenario numbers are checked when parsing"),
        }));
        let outcome = outcome.unwrap_or_else(|panic| {
            // The panic message, with the logs, is already on stderr.
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("panicked");
            // Its first lines name what failed; the logs after them are too long for a table.
            let head: Vec<&str> = message
                .lines()
                .filter(|l| !l.trim().is_empty())
                .take(2)
                .collect();
            Err(head.join("\n"))
        });
        if let Err(e) = &outcome {
            eprintln!("scenario {n} failed: {e}");
        }
        results.push((n, outcome));
    }

    print_table(&args, &results);
    let failed = results.iter().any(|(_, r)| r.is_err());
    // Tear down before exiting: process::exit skips destructors.
    drop(throttle);
    drop(stack);
    if failed {
        std::process::exit(1);
    }
}

/// Scenario 1: the ordinary path, containerd downloading and unpacking every layer.
fn normal(b: &mut Bench) -> Result<Vec<Sample>, String> {
    let mut samples = Vec::new();
    for i in 0..b.runs {
        b.stack.new_node();
        let before = b.throttle.bytes_down();
        let pull = timed(|| {
            b.stack.pull("overlayfs", &b.plain);
        });
        let run = run_workload(b, "overlayfs", &b.plain, &format!("normal-{i}"))?;
        samples.push(Sample {
            pull,
            run,
            link_bytes: b.throttle.bytes_down() - before,
            fetched: None,
            demand_reads: None,
            import: None,
        });
        progress(1, i, samples.last());
    }
    Ok(samples)
}

/// Scenario 2: lazy pull on a node that has never seen the image.
fn lazy_cold(b: &mut Bench) -> Result<Vec<Sample>, String> {
    let mut samples = Vec::new();
    let mut stats = true;
    for i in 0..b.runs {
        b.stack.new_node();
        if stats {
            // Cold starts do not depend on the statistics CLI: without it, measure the rest.
            if let Err(e) = cache_stats(b.stack) {
                eprintln!("{e}\n(reporting lazysnap's statistics as n/a)");
                stats = false;
            }
        }
        samples.push(lazy_start(b, &format!("cold-{i}"), None, stats)?);
        progress(2, i, samples.last());
    }
    Ok(samples)
}

/// Scenario 3: node A records which chunks a start reads; node B imports that before pulling.
fn with_trace(b: &mut Bench) -> Result<Vec<Sample>, String> {
    b.stack.new_node();
    b.stack.rpull(&b.lazy);
    run_workload(b, "lazysnap", &b.lazy, "trace-a")?;
    let listing = cli_json(b.stack, &["trace", "ls"])?;
    let traces = listing["traces"]
        .as_array()
        .ok_or_else(|| format!("`lazysnap trace ls --json` has no \"traces\" array: {listing}"))?;
    let mut files = Vec::new();
    for (i, trace) in traces.iter().enumerate() {
        let digest = trace["digest"].as_str().ok_or_else(|| {
            format!("trace {i} of `lazysnap trace ls --json` has no digest: {trace}")
        })?;
        let file = b.stack.dir.join(format!("trace-{i}.json"));
        let file_arg = file.to_str().expect("temp dir paths are UTF-8");
        b.stack
            .try_cli(&["trace", "export", digest, "-o", file_arg])
            .map_err(|e| format!("exporting the trace of {digest} failed: {e}"))?;
        files.push(file);
    }
    if files.is_empty() {
        return Err("node A recorded no traces (`lazysnap trace ls` is empty after a run)".into());
    }
    eprintln!("  node A exported {} trace(s)", files.len());

    let mut samples = Vec::new();
    for i in 0..b.runs {
        b.stack.new_node();
        samples.push(lazy_start(b, &format!("trace-b-{i}"), Some(&files), true)?);
        progress(3, i, samples.last());
    }
    Ok(samples)
}

/// Scenario 4: the same node starts the image again after removing it; lazysnap's cache
/// still holds the chunks the first start read.
fn warm(b: &mut Bench) -> Result<Vec<Sample>, String> {
    b.stack.new_node();
    b.stack.rpull(&b.lazy);
    run_workload(b, "lazysnap", &b.lazy, "warm-prime")?;
    let mut samples = Vec::new();
    for i in 0..b.runs {
        b.stack.ctr(&["images", "rm", "--sync", &b.lazy]);
        samples.push(lazy_start(b, &format!("warm-{i}"), None, true)?);
        progress(4, i, samples.last());
    }
    Ok(samples)
}

/// Imports `traces` (if any), rpulls and runs on the current node, measuring the link and,
/// with `stats`, lazysnap's statistics over exactly that.
fn lazy_start(
    b: &mut Bench,
    id: &str,
    traces: Option<&[PathBuf]>,
    stats: bool,
) -> Result<Sample, String> {
    let before = b.throttle.bytes_down();
    let stats_before = if stats {
        Some(cache_stats(b.stack)?)
    } else {
        None
    };
    let import = match traces {
        None => None,
        Some(files) => {
            let start = Instant::now();
            for file in files {
                let file = file.to_str().expect("temp dir paths are UTF-8");
                b.stack
                    .try_cli(&["trace", "import", file])
                    .map_err(|e| format!("importing trace {file} failed: {e}"))?;
            }
            Some(start.elapsed())
        }
    };
    let pull = timed(|| {
        b.stack.rpull(&b.lazy);
    });
    let run = run_workload(b, "lazysnap", &b.lazy, id)?;
    let link_bytes = b.throttle.bytes_down() - before;
    let (fetched, demand_reads) = match stats_before {
        Some((fetched, demand)) => {
            let after = cache_stats(b.stack)?;
            (
                Some(after.0.saturating_sub(fetched)),
                Some(after.1.saturating_sub(demand)),
            )
        }
        None => (None, None),
    };
    Ok(Sample {
        pull,
        run,
        link_bytes,
        fetched,
        demand_reads,
        import,
    })
}

/// `ctr run --rm` of the Python workload; its duration, from starting ctr until it exits
/// after the container printed `1`, stands for "run to first output" (it includes container
/// creation and teardown, the same in every scenario).
fn run_workload(b: &Bench, snapshotter: &str, image: &str, id: &str) -> Result<Duration, String> {
    let mut out = String::new();
    let took = timed(|| out = b.stack.run(snapshotter, image, id, PYTHON_WORKLOAD));
    if out.trim() != "1" {
        return Err(format!(
            "the Python workload printed {out:?} instead of \"1\" ({snapshotter}, {image})"
        ));
    }
    Ok(took)
}

/// lazysnap's cumulative (`fetched_bytes`, `demand_network_reads`) on the current node.
fn cache_stats(stack: &Stack) -> Result<(u64, u64), String> {
    let json = cli_json(stack, &["cache", "stats"])?;
    let field = |name: &str| {
        json[name].as_u64().ok_or_else(|| {
            format!("`lazysnap cache stats --json` has no number \"{name}\": {json}")
        })
    };
    Ok((field("fetched_bytes")?, field("demand_network_reads")?))
}

/// `lazysnap ARGS --json`, parsed; the CLI's own error when it fails.
fn cli_json(stack: &Stack, args: &[&str]) -> Result<serde_json::Value, String> {
    let mut with_json = args.to_vec();
    with_json.push("--json");
    let out = stack.try_cli(&with_json)?;
    serde_json::from_str(&out).map_err(|e| {
        format!(
            "`lazysnap {}` printed no JSON ({e}): {out}",
            with_json.join(" ")
        )
    })
}

fn progress(scenario: usize, run: usize, sample: Option<&Sample>) {
    if let Some(s) = sample {
        eprintln!(
            "  scenario {scenario} run {}: pull {:.0} ms, run {:.0} ms, {:.1} MiB over the link",
            run + 1,
            ms(s.pull),
            ms(s.run),
            mib(s.link_bytes)
        );
    }
}

fn print_table(args: &Args, results: &[(usize, Result<Vec<Sample>, String>)]) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!();
    println!(
        "machine: {cores} cores (nproc); link: rtt {} ms, {} Mbit/s each way (throttling proxy in front of a registry on loopback); median (min–max) of {} run(s)",
        args.rtt.as_millis(),
        args.mbit,
        args.runs
    );
    println!();
    println!("| scenario | pull | run (first output) | total | bytes over link | fetched by lazysnap | demand reads waiting on network |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut imports = Vec::new();
    for (n, result) in results {
        let name = NAMES[n - 1];
        let samples = match result {
            Ok(s) if !s.is_empty() => s,
            Ok(_) => {
                println!("| {name} | no runs | | | | | |");
                continue;
            }
            Err(e) => {
                // One table row: the message's lines joined; the whole of it is on stderr.
                let e: Vec<&str> = e.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
                println!(
                    "| {name} | failed: {} | | | | | |",
                    e.join(" ").replace('|', "/")
                );
                continue;
            }
        };
        let durations = |f: fn(&Sample) -> Duration| {
            spread(
                &samples.iter().map(|s| ms(f(s))).collect::<Vec<_>>(),
                "ms",
                0,
            )
        };
        let optional = |f: fn(&Sample) -> Option<u64>, scale: fn(u64) -> f64, unit, digits| {
            let values: Option<Vec<f64>> = samples.iter().map(|s| f(s).map(scale)).collect();
            values.map_or("n/a".to_owned(), |v| spread(&v, unit, digits))
        };
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} |",
            durations(|s| s.pull),
            durations(|s| s.run),
            durations(|s| s.pull + s.run),
            spread(
                &samples
                    .iter()
                    .map(|s| mib(s.link_bytes))
                    .collect::<Vec<_>>(),
                "MiB",
                1
            ),
            optional(|s| s.fetched, mib, "MiB", 1),
            optional(|s| s.demand_reads, |n| n as f64, "", 0),
        );
        imports.extend(samples.iter().filter_map(|s| s.import).map(ms));
    }
    println!();
    println!("run (first output): duration of `ctr run --rm` until it exits after printing 1 (includes container create and teardown); total = pull + run.");
    if !imports.is_empty() {
        println!(
            "trace import on node B (before the pull, in neither column): {}",
            spread(&imports, "ms", 0)
        );
    }
}

/// "median unit (min–max)", or just the value when all runs agree.
fn spread(values: &[f64], unit: &str, digits: usize) -> String {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let median = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    let (min, max) = (v[0], v[v.len() - 1]);
    let unit = if unit.is_empty() {
        String::new()
    } else {
        format!(" {unit}")
    };
    if format!("{min:.digits$}") == format!("{max:.digits$}") {
        format!("{median:.digits$}{unit}")
    } else {
        format!("{median:.digits$}{unit} ({min:.digits$}–{max:.digits$})")
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

fn timed(f: impl FnOnce()) -> Duration {
    let start = Instant::now();
    f();
    start.elapsed()
}

fn parse_args() -> Args {
    let mut args = Args {
        lazysnap: "target/release/lazysnap".into(),
        rtt: Duration::from_millis(20),
        mbit: 200.0,
        runs: 3,
        scenarios: vec![1, 2, 3, 4],
    };
    let usage = "usage: bench_startup --lazysnap PATH [--rtt-ms 20] [--mbit 200] [--runs 3] [--scenarios 1,2,3,4]";
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| panic!("{arg} needs a value\n{usage}"))
        };
        match arg.as_str() {
            "--lazysnap" => args.lazysnap = value(),
            "--rtt-ms" => {
                let v = value();
                let ms: f64 = v
                    .parse()
                    .unwrap_or_else(|_| panic!("--rtt-ms {v:?} is not a number"));
                args.rtt = Duration::from_secs_f64(ms / 1000.0);
            }
            "--mbit" => {
                let v = value();
                args.mbit = v
                    .parse()
                    .ok()
                    .filter(|m: &f64| *m > 0.0)
                    .unwrap_or_else(|| panic!("--mbit {v:?} is not a positive number"));
            }
            "--runs" => {
                let v = value();
                args.runs = v
                    .parse()
                    .ok()
                    .filter(|r| *r > 0)
                    .unwrap_or_else(|| panic!("--runs {v:?} is not a positive number"));
            }
            "--scenarios" => {
                let v = value();
                args.scenarios = v
                    .split(',')
                    .map(|s| {
                        s.trim()
                            .parse()
                            .ok()
                            .filter(|n| (1..=4).contains(n))
                            .unwrap_or_else(|| panic!("--scenarios {v:?}: each must be 1 to 4"))
                    })
                    .collect();
            }
            "--help" | "-h" => {
                println!("{usage}");
                std::process::exit(0);
            }
            other => panic!("unknown argument {other:?}\n{usage}"),
        }
    }
    args
}
