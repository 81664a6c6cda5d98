//! Benchmark suite (not a test): what lazy pulling buys, side by side — startup, bytes fetched,
//! daemon memory, and read throughput — for a corpus of images built here from Debian packages,
//! each pulled over an emulated WAN link the normal way (overlayfs, gzip) and with lazysnap
//! (eStargz, eStargz optimized by `ctr-remote image optimize`, zstd:chunked, and the unchanged
//! gzip image with an index made by `lazysnap index --push`, or by `lazysnap index --push
//! --trace` with the traces of a start from the plain index). Writes a Markdown
//! table, a JSON file and an SVG chart under `results/<UTC time>/` and `results/latest/`.
//!
//! ```text
//! scripts/bench                      # installs what is missing, builds, runs the defaults
//! target/release/examples/bench_suite --lazysnap target/release/lazysnap \
//!     [--rtt-ms 20] [--mbit 200] [--runs 3] [--images python,tools,data] \
//!     [--formats gzip,esgz,esgz-opt,zstd,gzip-index,gzip-index-trace] \
//!     [--scenarios normal,cold,trace,warm] \
//!     [--data-mib 1024] [--results results] [--work /var/tmp/lazysnap-bench] [--fresh] \
//!     [--lazysnap-config FILE]
//! target/release/examples/bench_suite --render results/latest   # rewrite the report from
//!                                                               # its results.json
//! ```
//!
//! As root. The real stack of the e2e tests (`harness::Stack`: docker-registry, containerd
//! with lazysnap as a proxy plugin, lazysnap), with a throttling proxy (`harness::throttle`)
//! in front of the registry: every pull and every lazy read crosses the link; only the setup
//! pushes go around it. The corpus (`harness::corpus`, `tools`, `data`) is built under
//! `--work` and reused by later runs (`--fresh` rebuilds it).
//!
//! Scenarios, each run `--runs` times, every run on a fresh node (empty containerd and
//! lazysnap state, same registry), with the page cache dropped before each pull. The runs go
//! in rounds: each round runs every scenario and format of an image once, so that rows are
//! measured side by side rather than minutes apart:
//! - normal: `ctr images pull` of the gzip image into overlayfs, then `ctr run`;
//! - cold: `ctr-remote image rpull` of a lazy image into lazysnap, then `ctr run`;
//! - trace: node A starts the image once and exports its read traces; node B imports them,
//!   then rpull and run (lazysnap prefetches what A read); both nodes anew each round;
//! - warm: a node that started the image (untimed) removes it (`ctr images rm --sync`) and
//!   starts it again; the chunks come from lazysnap's cache.
//!
//! For every run: the pull alone, time to first output (from starting `ctr run` to the first
//! line the container prints), bytes the link carried, lazysnap's fetched bytes and the reads
//! that waited on the network, and peak RSS (VmHWM) of lazysnap and containerd. For `data`,
//! after the start in the normal and cold scenarios: `stat` of every file, cold and warm
//! sequential read of the big file, and random 4 KiB reads, on the snapshot's mount.

#[path = "../tests/harness/mod.rs"]
mod harness;

#[path = "bench_suite/measure.rs"]
mod measure;
#[path = "bench_suite/report.rs"]
mod report;

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use harness::corpus::CorpusImage;
use harness::throttle::Throttle;
use harness::Stack;

pub use measure::{DataSample, Sample};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Gzip,
    Esgz,
    EsgzOpt,
    Zstd,
    /// The gzip image unchanged, with its gzip index pushed next to it.
    GzipIndex,
    /// The gzip image under a manifest of its own (an annotation apart), with an index made
    /// with the read traces of a start (`lazysnap index --trace`), as `ctr-remote image
    /// optimize` makes eStargz optimized.
    GzipIndexTraced,
}

impl Format {
    pub const ALL: [Format; 6] = [
        Format::Gzip,
        Format::Esgz,
        Format::EsgzOpt,
        Format::Zstd,
        Format::GzipIndex,
        Format::GzipIndexTraced,
    ];

    /// The tag in the registry and the name on the command line.
    pub fn tag(self) -> &'static str {
        match self {
            Format::Gzip => "gzip",
            Format::Esgz => "esgz",
            Format::EsgzOpt => "esgz-opt",
            Format::Zstd => "zstd",
            Format::GzipIndex => "gzip-index",
            Format::GzipIndexTraced => "gzip-index-trace",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Format::Gzip => "gzip",
            Format::Esgz => "eStargz",
            Format::EsgzOpt => "eStargz optimized",
            Format::Zstd => "zstd:chunked",
            Format::GzipIndex => "gzip + index",
            Format::GzipIndexTraced => "gzip + index made with a trace",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    Normal,
    Cold,
    Trace,
    Warm,
}

impl Scenario {
    pub const ALL: [Scenario; 4] = [
        Scenario::Normal,
        Scenario::Cold,
        Scenario::Trace,
        Scenario::Warm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Normal => "normal",
            Scenario::Cold => "cold",
            Scenario::Trace => "trace",
            Scenario::Warm => "warm",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Scenario::Normal => "normal pull (overlayfs)",
            Scenario::Cold => "lazysnap cold",
            Scenario::Trace => "lazysnap, trace from another node",
            Scenario::Warm => "lazysnap warm (cached)",
        }
    }
}

pub struct Args {
    pub lazysnap: String,
    pub rtt_ms: f64,
    pub mbit: f64,
    pub runs: usize,
    pub images: Vec<String>,
    pub formats: Vec<Format>,
    pub scenarios: Vec<Scenario>,
    pub data_mib: u64,
    pub results: PathBuf,
    pub work: PathBuf,
    pub fresh: bool,
    pub lazysnap_config: Option<String>,
    /// Only rewrite this results directory's report from its results.json.
    pub render: Option<PathBuf>,
}

/// One row of the results: an image started in one scenario from one format.
pub struct Row {
    pub image: String,
    pub scenario: Scenario,
    pub format: Format,
    pub samples: Vec<Sample>,
    pub error: Option<String>,
}

/// How long each part of the setup took, for the report.
#[derive(Default)]
pub struct Setup {
    pub steps: Vec<(String, Duration)>,
}

pub struct Bench<'a> {
    pub stack: &'a mut Stack,
    pub throttle: &'a Throttle,
    pub args: &'a Args,
}

fn main() {
    let args = parse_args();
    if let Some(dir) = args.render.clone() {
        report::rerender(&dir, args);
        println!(
            "{}",
            std::fs::read_to_string(dir.join("results.md")).unwrap_or_default()
        );
        return;
    }
    let started = Instant::now();
    // lazysnap's own default level: the harness asks for debug, whose per-read lines would
    // cost the lazy path time no production node spends.
    // BENCH_LAZYSNAP_LOG asks for more, to see where a run's time goes.
    let level = std::env::var("BENCH_LAZYSNAP_LOG").unwrap_or_else(|_| "info".to_owned());
    std::env::set_var("RUST_LOG", level);
    eprintln!("starting registry, lazysnap and containerd in a temporary directory ...");
    let lazysnap_args = match &args.lazysnap_config {
        Some(file) => vec!["--config".to_owned(), file.clone()],
        None => Vec::new(),
    };
    let mut stack = Stack::start_with(&args.lazysnap, lazysnap_args);

    let mut setup = Setup::default();
    let corpus = build_corpus(&mut stack, &args, &mut setup);

    let registry = stack
        .registry_host
        .parse()
        .expect("the registry listens on an IP address and port");
    let throttle = Throttle::start(
        registry,
        Duration::from_secs_f64(args.rtt_ms / 1000.0),
        args.mbit,
    );
    let mut bench = Bench {
        stack: &mut stack,
        throttle: &throttle,
        args: &args,
    };

    let mut rows = Vec::new();
    for image in &corpus {
        let mut image_rows: Vec<Row> = args
            .scenarios
            .iter()
            .flat_map(|&scenario| args.formats.iter().map(move |&format| (scenario, format)))
            .filter(|&(scenario, format)| match scenario {
                Scenario::Normal => format == Format::Gzip,
                _ => format != Format::Gzip,
            })
            .map(|(scenario, format)| Row {
                image: image.name.to_owned(),
                scenario,
                format,
                samples: Vec::new(),
                error: None,
            })
            .collect();
        // Round by round, every row once a round: rows measured minutes apart on a shared
        // machine would differ by its drift as much as by what they measure.
        for round in 0..args.runs {
            for row in image_rows.iter_mut().filter(|row| row.error.is_none()) {
                eprintln!(
                    "{} / {} / {}, round {} of {} ...",
                    image.name,
                    row.scenario.label(),
                    row.format.label(),
                    round + 1,
                    args.runs
                );
                let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    measure::scenario(&mut bench, image, row.scenario, row.format, round)
                }));
                match outcome {
                    Ok(Ok(sample)) => row.samples.push(sample),
                    Ok(Err(e)) => row.error = Some(e),
                    Err(panic) => row.error = Some(panic_message(panic)),
                }
                if let Some(e) = &row.error {
                    // A row that failed once is not run again: its figures would mix with
                    // whatever broke it.
                    eprintln!("  failed: {e}");
                }
            }
        }
        rows.extend(image_rows);
    }

    let elapsed = started.elapsed();
    let dir = report::write(&args, &rows, &setup, elapsed);
    println!(
        "{}",
        std::fs::read_to_string(dir.join("results.md")).unwrap_or_default()
    );
    eprintln!(
        "wrote {} (results.md, results.json, chart.svg) and {}; the whole run took {:.1} min",
        dir.display(),
        args.results.join("latest").display(),
        elapsed.as_secs_f64() / 60.0
    );
    let failed = rows.iter().any(|r| r.error.is_some());
    // Tear down before exiting: process::exit skips destructors.
    drop(throttle);
    drop(stack);
    if failed {
        std::process::exit(1);
    }
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("panicked");
    // The first lines name what failed; the logs after them went to stderr with the panic.
    message
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Builds the images asked for (or reuses what `--work` holds), pushes each in every format to
/// the registry, and returns them.
fn build_corpus(stack: &mut Stack, args: &Args, setup: &mut Setup) -> Vec<CorpusImage> {
    if args.fresh {
        eprintln!("--fresh: removing {}", args.work.display());
        let _ = std::fs::remove_dir_all(&args.work);
    }
    std::fs::create_dir_all(&args.work).expect("create the work directory");
    let layout = args.work.join("layout");
    let mut corpus = Vec::new();
    for name in &args.images {
        let t = Instant::now();
        eprintln!("building image {name} ...");
        let image = match name.as_str() {
            "python" => harness::corpus::python(&args.work, &layout),
            "tools" => harness::tools::tools(&args.work, &layout),
            "data" => harness::data::data(&layout, args.data_mib),
            other => unreachable!("image {other} is checked when parsing"),
        };
        setup.steps.push((format!("build {name}"), t.elapsed()));

        // A registry this image was pushed to before, kept as hard links.
        let key = match name.as_str() {
            "data" => format!("data-{}m", args.data_mib),
            other => other.to_owned(),
        };
        let saved = args.work.join("registry").join(&key);
        let registry_data = stack.path("registry-data");
        if saved.is_dir() {
            let t = Instant::now();
            link_tree(&saved, &registry_data);
            setup
                .steps
                .push((format!("restore {name} in 5 formats"), t.elapsed()));
            // The index is what the build under test makes, as the conversions are not: it
            // is part of lazysnap, and its format moves with it.
            if args.formats.contains(&Format::GzipIndex) {
                push_index(stack, name, &args.lazysnap, setup);
            }
        } else {
            push_formats(stack, &layout, &image, setup, &args.lazysnap);
            let tmp = args.work.join("registry").join(format!("{key}.tmp"));
            let _ = std::fs::remove_dir_all(&tmp);
            link_tree(&registry_data, &tmp);
            std::fs::rename(&tmp, &saved).expect("keep the registry");
        }
        corpus.push(image);
    }
    corpus
}

/// Pushes `image` as gzip and converts it to the three lazy formats on node 0.
fn push_formats(
    stack: &Stack,
    layout: &Path,
    image: &CorpusImage,
    setup: &mut Setup,
    lazysnap: &str,
) {
    let name = image.name;
    let direct = |f: Format| stack.image_ref(&format!("{name}:{}", f.tag()));
    let t = Instant::now();
    harness::layout::push(layout, name, &direct(Format::Gzip));
    setup
        .steps
        .push((format!("push {name} (gzip)"), t.elapsed()));

    // The same image under another tag (same manifest, same digest), and its gzip index.
    harness::layout::push(layout, name, &direct(Format::GzipIndex));
    push_index(stack, name, lazysnap, setup);

    // The three conversions at once (each compresses on one core, mostly): pull the source
    // once, convert, push the results, then forget everything locally.
    let t = Instant::now();
    eprintln!("  converting {name} to eStargz, zstd:chunked and optimized eStargz at once ...");
    let plain = direct(Format::Gzip);
    stack.ctr(&["images", "pull", "--plain-http", &plain]);
    let workload = serde_json::to_string(&[&image.workload]).expect("json");
    let (esgz, zstd, opt) = (
        direct(Format::Esgz),
        direct(Format::Zstd),
        direct(Format::EsgzOpt),
    );
    let jobs: Vec<(Format, Vec<&str>)> = vec![
        (
            Format::Esgz,
            vec!["image", "convert", "--oci", "--estargz", &plain, &esgz],
        ),
        (
            Format::Zstd,
            vec!["image", "convert", "--oci", "--zstdchunked", &plain, &zstd],
        ),
        (
            Format::EsgzOpt,
            vec![
                "image",
                "optimize",
                "--oci",
                "--period",
                "3",
                "--entrypoint",
                r#"["/bin/sh", "-c"]"#,
                "--args",
                &workload,
                &plain,
                &opt,
            ],
        ),
    ];
    let took: Vec<(Format, Duration)> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|(format, cmd)| {
                s.spawn(move || {
                    let t = Instant::now();
                    stack.ctr_remote(cmd);
                    (*format, t.elapsed())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    for target in [&esgz, &zstd, &opt] {
        stack.ctr(&["images", "push", "--plain-http", target]);
    }
    stack.ctr(&["images", "rm", "--sync", &esgz, &zstd, &opt]);
    for (format, d) in took {
        setup.steps.push((
            format!(
                "convert {name} to {} (in parallel with the others)",
                format.label()
            ),
            d,
        ));
    }
    setup.steps.push((
        format!("convert and push {name} in 3 formats, all told"),
        t.elapsed(),
    ));
    // eStargz alone, to compare with `lazysnap index` (the three above share the cores).
    let alone = stack.image_ref(&format!("{name}:esgz-alone"));
    let alone_t = Instant::now();
    stack.ctr_remote(&["image", "convert", "--oci", "--estargz", &plain, &alone]);
    setup.steps.push((
        format!("convert {name} to eStargz alone (to compare with indexing)"),
        alone_t.elapsed(),
    ));
    stack.ctr(&["images", "rm", "--sync", &plain, &alone]);
    stack.ctr(&["content", "prune", "references"]);
}

/// Hard-links every file of `from` into `to` (directories created, existing files kept).
/// `lazysnap index --push` of the image's `gzip-index` tag (a newer index supersedes an
/// older one in the referrers listing).
fn push_index(stack: &Stack, name: &str, lazysnap: &str, setup: &mut Setup) {
    let reference = stack.image_ref(&format!("{name}:{}", Format::GzipIndex.tag()));
    let t = Instant::now();
    let out = std::process::Command::new(lazysnap)
        .args(["index", "--push", "--json", &reference])
        .output()
        .expect("run lazysnap index");
    assert!(
        out.status.success(),
        "lazysnap index failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    setup
        .steps
        .push((format!("index {name} (lazysnap index --push)"), t.elapsed()));
    if let Ok(report) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
        let layers = report["layers"].as_array().cloned().unwrap_or_default();
        let sum = |key: &str| -> u64 { layers.iter().filter_map(|l| l[key].as_u64()).sum() };
        eprintln!(
            "  gzip index of {name}: {} bytes for {} bytes of layers ({:.2}%)",
            sum("index_bytes"),
            sum("size"),
            sum("index_bytes") as f64 * 100.0 / sum("size").max(1) as f64
        );
    }
}

/// Links `from`'s files into `to`, but copies the registry's `link` files (a tag's or a
/// revision's digest): a push rewrites a tag's in place, which must not reach the saved copy.
fn link_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("create {}: {e}", to.display()));
    for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("list {}: {e}", from.display()))
    {
        let entry = entry.expect("list registry dir");
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type().expect("file type");
        if kind.is_dir() {
            link_tree(&src, &dst);
        } else if !dst.exists() {
            let made = if entry.file_name() == "link" {
                std::fs::copy(&src, &dst).map(drop)
            } else {
                std::fs::hard_link(&src, &dst)
            };
            made.unwrap_or_else(|e| panic!("link {} to {}: {e}", src.display(), dst.display()));
        }
    }
}

fn parse_args() -> Args {
    let mut args = Args {
        lazysnap: "target/release/lazysnap".into(),
        rtt_ms: 20.0,
        mbit: 200.0,
        runs: 3,
        images: vec!["python".into(), "tools".into(), "data".into()],
        formats: Format::ALL.to_vec(),
        scenarios: Scenario::ALL.to_vec(),
        data_mib: 1024,
        results: "results".into(),
        work: "/var/tmp/lazysnap-bench".into(),
        fresh: false,
        lazysnap_config: None,
        render: None,
    };
    let usage = "usage: bench_suite [--lazysnap PATH] [--rtt-ms 20] [--mbit 200] [--runs 3] \
                 [--images python,tools,data] [--formats gzip,esgz,esgz-opt,zstd,gzip-index] \
                 [--scenarios normal,cold,trace,warm] [--data-mib 1024] [--results DIR] \
                 [--work DIR] [--fresh] [--lazysnap-config FILE] | --render RESULTS_DIR";
    let fail = |msg: String| -> ! {
        eprintln!("{msg}\n{usage}");
        std::process::exit(2)
    };
    let positive = |flag: &str, v: &str| -> f64 {
        v.parse::<f64>()
            .ok()
            .filter(|x| *x > 0.0 && x.is_finite())
            .unwrap_or_else(|| fail(format!("{flag} {v:?} is not a positive number")))
    };
    let list = |v: &str| -> Vec<String> {
        v.split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect()
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        if arg == "--help" || arg == "-h" {
            println!("{usage}");
            std::process::exit(0);
        }
        if arg == "--fresh" {
            args.fresh = true;
            continue;
        }
        let v = it
            .next()
            .unwrap_or_else(|| fail(format!("{arg} needs a value")));
        match arg.as_str() {
            "--lazysnap" => args.lazysnap = v,
            "--rtt-ms" => {
                args.rtt_ms = v
                    .parse::<f64>()
                    .ok()
                    .filter(|x| *x >= 0.0)
                    .unwrap_or_else(|| fail(format!("--rtt-ms {v:?} is not a number")))
            }
            "--mbit" => args.mbit = positive("--mbit", &v),
            "--runs" => args.runs = positive("--runs", &v) as usize,
            "--data-mib" => args.data_mib = positive("--data-mib", &v) as u64,
            "--results" => args.results = v.into(),
            "--work" => args.work = v.into(),
            "--lazysnap-config" => args.lazysnap_config = Some(v),
            "--render" => args.render = Some(v.into()),
            "--images" => {
                args.images = list(&v);
                for i in &args.images {
                    if !["python", "tools", "data"].contains(&i.as_str()) {
                        fail(format!("--images: unknown image {i:?}"));
                    }
                }
            }
            "--formats" => {
                args.formats = list(&v)
                    .iter()
                    .map(|f| {
                        Format::ALL
                            .into_iter()
                            .find(|x| x.tag() == f)
                            .unwrap_or_else(|| fail(format!("--formats: unknown format {f:?}")))
                    })
                    .collect()
            }
            "--scenarios" => {
                args.scenarios = list(&v)
                    .iter()
                    .map(|s| {
                        Scenario::ALL
                            .into_iter()
                            .find(|x| x.name() == s)
                            .unwrap_or_else(|| fail(format!("--scenarios: unknown scenario {s:?}")))
                    })
                    .collect()
            }
            other => fail(format!("unknown argument {other:?}")),
        }
    }
    if args.runs == 0 {
        fail("--runs must be at least 1".into());
    }
    args
}
