//! The results: a Markdown report, a JSON file with every sample, and an SVG bar chart of
//! time to first output, under `results/<UTC time>/`, copied to `results/latest/`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{Args, Row, Sample, Scenario, Setup};

/// Writes everything; returns the run's directory.
pub fn write(args: &Args, rows: &[Row], setup: &Setup, elapsed: Duration) -> PathBuf {
    let stamp = utc_stamp();
    let dir = args.results.join(&stamp);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    let machine = machine();
    render(&dir, args, rows, setup, elapsed, &machine, &stamp);
    let json = serde_json::json!({
        "time_utc": stamp,
        "machine": machine,
        "link": { "rtt_ms": args.rtt_ms, "mbit": args.mbit },
        "runs": args.runs,
        "data_mib": args.data_mib,
        "lazysnap_config": args.lazysnap_config,
        "elapsed_s": elapsed.as_secs_f64(),
        "setup": setup.steps.iter().map(|(n, d)| serde_json::json!({"step": n, "s": d.as_secs_f64()})).collect::<Vec<_>>(),
        "rows": rows.iter().map(|r| serde_json::json!({
            "image": r.image,
            "scenario": r.scenario.name(),
            "format": r.format.tag(),
            "error": r.error,
            "median": summary(&r.samples),
            "samples": r.samples,
        })).collect::<Vec<_>>(),
    });
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_vec_pretty(&json).expect("json"),
    )
    .expect("write results.json");
    let latest = args.results.join("latest");
    let _ = std::fs::remove_dir_all(&latest);
    std::fs::create_dir_all(&latest).expect("create results/latest");
    for f in ["results.md", "results.json", "chart.svg"] {
        std::fs::copy(dir.join(f), latest.join(f)).expect("copy to results/latest");
    }
    dir
}

/// Writes `results.md` and `chart.svg` into `dir`.
pub fn render(
    dir: &Path,
    args: &Args,
    rows: &[Row],
    setup: &Setup,
    elapsed: Duration,
    machine: &str,
    stamp: &str,
) {
    let md = markdown(args, rows, setup, elapsed, machine, stamp);
    std::fs::write(dir.join("results.md"), &md).expect("write results.md");
    std::fs::write(dir.join("chart.svg"), svg(args, rows, machine)).expect("write chart.svg");
}

/// `--render DIR`: rewrites `DIR/results.md` and `DIR/chart.svg` from `DIR/results.json`, so
/// a change to the report needs no new measurements.
pub fn rerender(dir: &Path, mut args: Args) {
    let path = dir.join("results.json");
    let text = std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let json: serde_json::Value =
        serde_json::from_slice(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()));
    args.rtt_ms = json["link"]["rtt_ms"].as_f64().unwrap_or(args.rtt_ms);
    args.mbit = json["link"]["mbit"].as_f64().unwrap_or(args.mbit);
    args.runs = json["runs"].as_u64().map_or(args.runs, |r| r as usize);
    args.data_mib = json["data_mib"].as_u64().unwrap_or(args.data_mib);
    args.lazysnap_config = json["lazysnap_config"].as_str().map(str::to_owned);
    let setup = Setup {
        steps: json["setup"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                (
                    s["step"].as_str().unwrap_or_default().to_owned(),
                    Duration::from_secs_f64(s["s"].as_f64().unwrap_or(0.0)),
                )
            })
            .collect(),
    };
    let rows: Vec<Row> = json["rows"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| Row {
            image: r["image"].as_str().unwrap_or_default().to_owned(),
            scenario: Scenario::ALL
                .into_iter()
                .find(|s| r["scenario"] == s.name())
                .expect("a known scenario"),
            format: crate::Format::ALL
                .into_iter()
                .find(|f| r["format"] == f.tag())
                .expect("a known format"),
            samples: serde_json::from_value(r["samples"].clone()).expect("samples"),
            error: r["error"].as_str().map(str::to_owned),
        })
        .collect();
    let elapsed = Duration::from_secs_f64(json["elapsed_s"].as_f64().unwrap_or(0.0));
    render(
        dir,
        &args,
        &rows,
        &setup,
        elapsed,
        json["machine"].as_str().unwrap_or_default(),
        json["time_utc"].as_str().unwrap_or_default(),
    );
}

/// "2025-01-31T12-34-56Z" (no colons, so it is a portable directory name).
fn utc_stamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86400, secs % 86400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}-{:02}-{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// "CPU model, N cores, M GiB, Linux x.y, Debian z".
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let debian = std::fs::read_to_string("/etc/debian_version").unwrap_or_default();
    format!(
        "{cpu}, {cores} cores, {:.0} GiB memory, Linux {}, Debian {}",
        mem_kib as f64 / 1048576.0,
        kernel.trim(),
        debian.trim()
    )
}

/// The medians a row is judged by, for readers of results.json.
fn summary(samples: &[Sample]) -> serde_json::Value {
    let med = |v: Option<Vec<f64>>| v.filter(|v| !v.is_empty()).map(|v| median(&v));
    serde_json::json!({
        "pull_s": med(collect(samples, |x| Some(x.pull_ms / 1000.0))),
        "first_output_s": med(collect(samples, |x| Some(x.first_output_ms / 1000.0))),
        "total_s": med(collect(samples, |x| Some(x.total_ms() / 1000.0))),
        "fetched_mib": med(collect(samples, |x| x.fetched_bytes.map(mib))),
        "demand_reads": med(collect(samples, |x| x.demand_reads.map(|n| n as f64))),
        "fetch_amplification": med(collect(samples, Sample::fetch_amplification)),
    })
}

pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    }
}

fn min_max(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(*v), hi.max(*v))
        })
}

/// "median (min–max)" with `digits` decimals, or just the median when the runs agree.
fn spread(values: &[f64], digits: usize) -> String {
    if values.is_empty() {
        return "n/a".into();
    }
    let m = median(values);
    let (lo, hi) = min_max(values);
    if format!("{lo:.digits$}") == format!("{hi:.digits$}") {
        format!("{m:.digits$}")
    } else {
        format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})")
    }
}

fn seconds(values: &[f64]) -> String {
    let s: Vec<f64> = values.iter().map(|v| v / 1000.0).collect();
    let m = median(&s);
    let digits = if m < 10.0 { 2 } else { 1 };
    format!("{} s", spread(&s, digits))
}

fn collect(samples: &[Sample], f: impl Fn(&Sample) -> Option<f64>) -> Option<Vec<f64>> {
    samples.iter().map(f).collect()
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

fn image_names(rows: &[Row]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for r in rows {
        if !names.contains(&r.image) {
            names.push(r.image.clone());
        }
    }
    names
}

fn normal_row<'a>(rows: &'a [Row], image: &str) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.image == image && r.scenario == Scenario::Normal && r.error.is_none())
}

fn markdown(
    args: &Args,
    rows: &[Row],
    setup: &Setup,
    elapsed: Duration,
    machine: &str,
    stamp: &str,
) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# lazysnap benchmark suite, {stamp}\n");
    let _ = writeln!(o, "- machine: {machine}");
    let _ = writeln!(
        o,
        "- link: {} ms round trip, {} Mbit/s each way, shared by all connections (a throttling TCP proxy in front of a registry on loopback)",
        args.rtt_ms, args.mbit
    );
    let _ = writeln!(
        o,
        "- lazysnap: {}; every figure is the median (min–max) of {} run(s)",
        args.lazysnap_config
            .as_ref()
            .map_or("default configuration".to_owned(), |c| format!(
                "configuration {c}"
            )),
        args.runs
    );
    let _ = writeln!(
        o,
        "- pull: `ctr images pull` (normal) or `ctr-remote image rpull` (lazysnap); first output: from starting `ctr run` to the container's first line; total = pull + first output; page cache dropped before every pull\n"
    );

    for image in image_names(rows) {
        let _ = writeln!(o, "## {image}\n");
        let _ = writeln!(o, "| scenario | format | pull | first output | total | over the link | fetched by lazysnap | reads waiting on the network | fetch amplification | lazysnap peak RSS | containerd peak RSS |");
        let _ = writeln!(
            o,
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for r in rows.iter().filter(|r| r.image == image) {
            let head = format!("| {} | {} |", r.scenario.label(), r.format.label());
            if let Some(e) = &r.error {
                let _ = writeln!(
                    o,
                    "{head} failed: {} | | | | | | | | |",
                    e.replace('|', "/")
                );
                continue;
            }
            let s = &r.samples;
            let opt = |v: Option<Vec<f64>>, digits: usize, unit: &str| {
                v.map_or("n/a".into(), |v| {
                    format!("{} {unit}", spread(&v, digits))
                        .trim_end()
                        .to_owned()
                })
            };
            let _ = writeln!(
                o,
                "{head} {} | {} | {} | {} MiB | {} | {} | {} | {} | {} |",
                seconds(&s.iter().map(|x| x.pull_ms).collect::<Vec<_>>()),
                seconds(&s.iter().map(|x| x.first_output_ms).collect::<Vec<_>>()),
                seconds(&s.iter().map(Sample::total_ms).collect::<Vec<_>>()),
                spread(&s.iter().map(|x| mib(x.link_bytes)).collect::<Vec<_>>(), 1),
                opt(collect(s, |x| x.fetched_bytes.map(mib)), 1, "MiB"),
                opt(collect(s, |x| x.demand_reads.map(|n| n as f64)), 0, ""),
                opt(collect(s, Sample::fetch_amplification), 2, ""),
                opt(
                    collect(s, |x| x.lazysnap_hwm_kib.map(|k| k as f64 / 1024.0)),
                    0,
                    "MiB"
                ),
                opt(
                    collect(s, |x| x.containerd_hwm_kib.map(|k| k as f64 / 1024.0)),
                    0,
                    "MiB"
                ),
            );
        }
        let imports: Vec<f64> = rows
            .iter()
            .filter(|r| r.image == image)
            .flat_map(|r| r.samples.iter().filter_map(|s| s.import_ms))
            .collect();
        if !imports.is_empty() {
            let _ = writeln!(
                o,
                "\nImporting the traces on node B (before the pull, in no column): {} ms.",
                spread(&imports, 0)
            );
        }
        let _ = writeln!(o);
        data_table(&mut o, rows, &image);
    }

    let _ = writeln!(o, "## Where lazysnap is not ahead\n");
    let notes = not_ahead(args, rows);
    if notes.is_empty() {
        let _ = writeln!(o, "Nowhere in this run.\n");
    } else {
        for n in notes {
            let _ = writeln!(o, "- {n}");
        }
        let _ = writeln!(o);
    }

    let _ = writeln!(o, "## Setup\n");
    for (step, d) in &setup.steps {
        let _ = writeln!(o, "- {step}: {:.1} s", d.as_secs_f64());
    }
    let _ = writeln!(
        o,
        "\nThe whole run, setup included: {:.1} min.",
        elapsed.as_secs_f64() / 60.0
    );
    o
}

/// The data image's reads, normal beside each lazy format that measured them.
fn data_table(o: &mut String, rows: &[Row], image: &str) {
    let cols: Vec<&Row> = rows
        .iter()
        .filter(|r| {
            r.image == image
                && r.error.is_none()
                && matches!(r.scenario, Scenario::Normal | Scenario::Cold)
                && !r.samples.is_empty()
                && r.samples.iter().all(|s| s.data.is_some())
        })
        .collect();
    if cols.is_empty() {
        return;
    }
    let entries = cols[0].samples[0]
        .data
        .as_ref()
        .map_or(0, |d| d.stat_entries);
    let _ = writeln!(o, "### {image}: reads after the start\n");
    let mut header = "| work |".to_owned();
    let mut rule = "| --- |".to_owned();
    for c in &cols {
        let name = match c.scenario {
            Scenario::Normal => "overlayfs (normal pull)".to_owned(),
            _ => format!("lazysnap, {}", c.format.label()),
        };
        let _ = write!(header, " {name} |");
        rule.push_str(" ---: |");
    }
    let _ = writeln!(o, "{header}\n{rule}");
    type Pick = fn(&crate::DataSample) -> Option<f64>;
    let num = |pick: Pick, digits: usize, unit: &'static str| {
        move |c: &Row| {
            collect(&c.samples, |s| s.data.as_ref().and_then(pick))
                .map_or(String::new(), |v| format!("{} {unit}", spread(&v, digits)))
        }
    };
    let lookups = |pick: fn(&crate::DataSample) -> Option<&crate::measure::Lookups>| {
        move |c: &Row| {
            let l: Option<Vec<&crate::measure::Lookups>> = c
                .samples
                .iter()
                .map(|s| s.data.as_ref().and_then(pick))
                .collect();
            l.map_or(String::new(), |l| {
                let m = |f: fn(&crate::measure::Lookups) -> u64| {
                    median(&l.iter().map(|x| f(x) as f64).collect::<Vec<_>>())
                };
                format!(
                    "{:.0} / {:.0} / {:.1} MiB",
                    m(|x| x.hits),
                    m(|x| x.misses),
                    m(|x| x.served_bytes) / 1048576.0
                )
            })
        }
    };
    // Ratios to overlayfs, from medians taken in this same run (the machine is shared).
    fn median_of(c: &Row, pick: Pick) -> Option<f64> {
        collect(&c.samples, |s| s.data.as_ref().and_then(pick)).map(|v| median(&v))
    }
    let normal: Option<&Row> = cols
        .iter()
        .copied()
        .find(|c| c.scenario == Scenario::Normal);
    let ratio = |pick: Pick| {
        let base = normal.and_then(|n| median_of(n, pick));
        move |c: &Row| match (base, median_of(c, pick)) {
            (Some(n), Some(l)) if n > 0.0 && c.scenario != Scenario::Normal => {
                format!("{:.2}×", l / n)
            }
            _ => String::new(),
        }
    };
    type Cell = Box<dyn Fn(&Row) -> String>;
    let lines: Vec<(String, Cell)> = vec![
        (
            format!("`stat` of all {entries} entries (caches dropped)"),
            Box::new(num(|d| Some(d.stat_ms), 0, "ms")),
        ),
        (
            "sequential read, cold (lazysnap: over the link)".into(),
            Box::new(num(|d| Some(d.cold_read_mbps), 0, "MB/s")),
        ),
        (
            "sequential read, warm (page cache dropped)".into(),
            Box::new(num(|d| Some(d.warm_read_mbps), 0, "MB/s")),
        ),
        (
            "random 4 KiB reads (page cache dropped, after the sequential reads)".into(),
            Box::new(num(|d| Some(d.random_reads_per_s), 0, "/s")),
        ),
        (
            "`stat` walk, × overlayfs (lower is better)".into(),
            Box::new(ratio(|d| Some(d.stat_ms))),
        ),
        (
            "warm sequential read, × overlayfs".into(),
            Box::new(ratio(|d| Some(d.warm_read_mbps))),
        ),
        (
            "random 4 KiB reads, × overlayfs".into(),
            Box::new(ratio(|d| Some(d.random_reads_per_s))),
        ),
        (
            "fetched by lazysnap during the cold read".into(),
            Box::new(num(|d| d.cold_read_fetched.map(mib), 0, "MiB")),
        ),
        (
            "lazysnap store, warm read: pread hits / misses / served by the daemon".into(),
            Box::new(lookups(|d| d.warm_read_lookups.as_ref())),
        ),
        (
            "lazysnap store, random reads: pread hits / misses / served by the daemon".into(),
            Box::new(lookups(|d| d.random_read_lookups.as_ref())),
        ),
        (
            "chunk size of /data/big.bin (from the store's records)".into(),
            Box::new(num(
                |d| Some(d.layer_bytes? as f64 / d.layer_chunks?.max(1) as f64 / 1024.0),
                0,
                "KiB",
            )),
        ),
        (
            "lazysnap peak RSS after the cold read".into(),
            Box::new(num(
                |d| d.lazysnap_hwm_after_cold_kib.map(|k| k as f64 / 1024.0),
                0,
                "MiB",
            )),
        ),
        (
            "lazysnap peak RSS after the warm read".into(),
            Box::new(num(
                |d| d.lazysnap_hwm_after_warm_kib.map(|k| k as f64 / 1024.0),
                0,
                "MiB",
            )),
        ),
        (
            "lazysnap largest RSS sampled every 10 ms during the reads".into(),
            Box::new(num(
                |d| d.lazysnap_rss_sampled_max_kib.map(|k| k as f64 / 1024.0),
                0,
                "MiB",
            )),
        ),
        (
            "lazysnap peak RSS after all the reads".into(),
            Box::new(num(
                |d| d.lazysnap_hwm_kib.map(|k| k as f64 / 1024.0),
                0,
                "MiB",
            )),
        ),
    ];
    for (name, cell) in lines {
        let _ = write!(o, "| {name} |");
        for c in &cols {
            let _ = write!(o, " {} |", cell(c));
        }
        let _ = writeln!(o);
    }
    let _ = writeln!(o);
}

/// Every lazy row whose total is not below the normal pull's, and every data figure where
/// lazysnap is behind overlayfs, with the measured split.
fn not_ahead(args: &Args, rows: &[Row]) -> Vec<String> {
    let mut notes = Vec::new();
    let link_mb_s = args.mbit / 8.0;
    for image in image_names(rows) {
        let Some(normal) = normal_row(rows, &image) else {
            continue;
        };
        let n_pull = median(&normal.samples.iter().map(|s| s.pull_ms).collect::<Vec<_>>());
        let n_first = median(
            &normal
                .samples
                .iter()
                .map(|s| s.first_output_ms)
                .collect::<Vec<_>>(),
        );
        let n_total = median(
            &normal
                .samples
                .iter()
                .map(Sample::total_ms)
                .collect::<Vec<_>>(),
        );
        for r in rows
            .iter()
            .filter(|r| r.image == image && r.scenario != Scenario::Normal && r.error.is_none())
        {
            let s = &r.samples;
            let pull = median(&s.iter().map(|x| x.pull_ms).collect::<Vec<_>>());
            let first = median(&s.iter().map(|x| x.first_output_ms).collect::<Vec<_>>());
            let total = median(&s.iter().map(Sample::total_ms).collect::<Vec<_>>());
            let fetched_mib = median(
                &s.iter()
                    .map(|x| mib(x.fetched_bytes.unwrap_or(0)))
                    .collect::<Vec<_>>(),
            );
            let wait_count = median(
                &s.iter()
                    .map(|x| x.demand_reads.unwrap_or(0) as f64)
                    .collect::<Vec<_>>(),
            );
            if total < n_total && first > n_first + 100.0 {
                // Ahead in total, but the start itself is slower: say what it waited for.
                let cause = if wait_count >= 1.0 {
                    format!(
                        "{wait_count:.0} of its reads waited on the network ({:.2} s if each paid one {} ms round trip alone) and lazysnap fetched {fetched_mib:.1} MiB during pull and start ({:.2} s at the link's {link_mb_s:.0} MB/s)",
                        wait_count * args.rtt_ms / 1000.0,
                        args.rtt_ms,
                        fetched_mib * 1.048576 / link_mb_s
                    )
                } else {
                    format!(
                        "no read waited on the network ({fetched_mib:.1} MiB fetched in all), so the difference is serving the files through FUSE from lazysnap's cache instead of from an unpacked directory"
                    )
                };
                notes.push(format!(
                    "{image}, {} ({}): ahead in total ({:.2} s vs {:.2} s), but the start itself, pull excluded, took {:.2} s vs {:.2} s on overlayfs: {cause}.",
                    r.scenario.label(),
                    r.format.label(),
                    total / 1000.0,
                    n_total / 1000.0,
                    first / 1000.0,
                    n_first / 1000.0,
                ));
                continue;
            }
            if total < n_total {
                continue;
            }
            let fetched = median(
                &s.iter()
                    .map(|x| mib(x.fetched_bytes.unwrap_or(0)))
                    .collect::<Vec<_>>(),
            );
            let waits = median(
                &s.iter()
                    .map(|x| x.demand_reads.unwrap_or(0) as f64)
                    .collect::<Vec<_>>(),
            );
            notes.push(format!(
                "{image}, {} ({}): total {:.2} s vs {:.2} s normal. Pull {:.2} s vs {:.2} s; first output {:.2} s vs {:.2} s, the phase that dominates. lazysnap fetched {fetched:.1} MiB ({:.2} s at the link's {link_mb_s:.0} MB/s) and {waits:.0} container reads waited on the network ({:.2} s if each paid one {} ms round trip alone).",
                r.scenario.label(),
                r.format.label(),
                total / 1000.0,
                n_total / 1000.0,
                pull / 1000.0,
                n_pull / 1000.0,
                first / 1000.0,
                n_first / 1000.0,
                fetched * 1.048576 / link_mb_s,
                waits * args.rtt_ms / 1000.0,
                args.rtt_ms,
            ));
        }
        // Memory: lazysnap is a daemon the normal path does not need.
        let hwm_mib = |r: &Row, f: fn(&Sample) -> Option<u64>| {
            collect(&r.samples, |x| f(x).map(|k| k as f64 / 1024.0)).map(|v| median(&v))
        };
        let lazy_hwm: Vec<(String, f64)> = rows
            .iter()
            .filter(|r| r.image == image && r.scenario != Scenario::Normal && r.error.is_none())
            .filter_map(|r| {
                hwm_mib(r, |x| x.lazysnap_hwm_kib)
                    .map(|m| (format!("{} {}", r.scenario.name(), r.format.label()), m))
            })
            .collect();
        if let (Some(lo), Some(hi), Some(ctr)) = (
            lazy_hwm.iter().min_by(|a, b| a.1.total_cmp(&b.1)),
            lazy_hwm.iter().max_by(|a, b| a.1.total_cmp(&b.1)),
            hwm_mib(normal, |x| x.containerd_hwm_kib),
        ) {
            notes.push(format!(
                "{image}, memory: lazysnap is a daemon the normal path does without. Its peak RSS at the end of a start was {:.0} MiB ({}) to {:.0} MiB ({}), beside containerd's {ctr:.0} MiB peak on the normal path (unpacking included); warm rows run on a node that already started the image, so their peak includes the earlier start.",
                lo.1, lo.0, hi.1, hi.0
            ));
        }
        // Data figures.
        let normal_data: Option<Vec<&crate::DataSample>> =
            normal.samples.iter().map(|s| s.data.as_ref()).collect();
        let Some(normal_data) = normal_data else {
            continue;
        };
        let nd = |f: fn(&crate::DataSample) -> f64| {
            median(&normal_data.iter().map(|d| f(d)).collect::<Vec<_>>())
        };
        for r in rows
            .iter()
            .filter(|r| r.image == image && r.scenario == Scenario::Cold && r.error.is_none())
        {
            let Some(data): Option<Vec<&crate::DataSample>> =
                r.samples.iter().map(|s| s.data.as_ref()).collect()
            else {
                continue;
            };
            let ld = |f: &dyn Fn(&crate::DataSample) -> f64| {
                median(&data.iter().map(|d| f(d)).collect::<Vec<_>>())
            };
            let who = format!("{image}, lazysnap {}", r.format.label());
            let (lc, nc) = (ld(&|d| d.cold_read_mbps), nd(|d| d.cold_read_mbps));
            if lc < nc {
                notes.push(format!(
                    "{who}: cold sequential read {lc:.0} MB/s vs {nc:.0} MB/s from overlayfs's local disk. Every byte crosses the link first, whose capacity is {link_mb_s:.0} MB/s; the read reached {:.0} % of it.",
                    100.0 * lc / link_mb_s
                ));
            }
            let chunk_kib = ld(&|d| match (d.layer_bytes, d.layer_chunks) {
                (Some(b), Some(c)) if c > 0 => b as f64 / c as f64 / 1024.0,
                _ => f64::NAN,
            });
            let look = |f: fn(&crate::DataSample) -> Option<&crate::measure::Lookups>,
                        g: fn(&crate::measure::Lookups) -> u64| {
                ld(&move |d| f(d).map_or(f64::NAN, |l| g(l) as f64))
            };
            let (lw, nw) = (ld(&|d| d.warm_read_mbps), nd(|d| d.warm_read_mbps));
            if lw < nw {
                notes.push(format!(
                    "{who}: warm sequential read {lw:.0} MB/s vs {nw:.0} MB/s. Nothing crossed the link; the daemon answered {:.0} chunk reads from its store by pread ({:.0} missed; chunks of {chunk_kib:.0} KiB) and served {:.1} MiB itself: what it did not serve, the kernel read from the stored file by passthrough.",
                    look(|d| d.warm_read_lookups.as_ref(), |l| l.hits),
                    look(|d| d.warm_read_lookups.as_ref(), |l| l.misses),
                    look(|d| d.warm_read_lookups.as_ref(), |l| l.served_bytes) / 1048576.0,
                ));
            }
            let (lr, nr) = (ld(&|d| d.random_reads_per_s), nd(|d| d.random_reads_per_s));
            if lr < nr {
                let hits = look(|d| d.random_read_lookups.as_ref(), |l| l.hits);
                let served = ld(&|d| {
                    d.random_read_lookups
                        .as_ref()
                        .map_or(f64::NAN, |l| l.served_bytes as f64)
                });
                notes.push(format!(
                    "{who}: random 4 KiB reads {lr:.0}/s ({:.2} ms each) vs {nr:.0}/s. A read the kernel does not pass through is a FUSE round trip to the daemon and one pread of the store ({hits:.0} such reads, {:.1} MiB served by the daemon).",
                    1000.0 / lr,
                    served / 1048576.0
                ));
            }
            let (ls, ns) = (ld(&|d| d.stat_ms), nd(|d| d.stat_ms));
            if ls > ns {
                notes.push(format!(
                    "{who}: stat of every entry {ls:.0} ms vs {ns:.0} ms: each lookup and getattr is a FUSE round trip to the daemon (the metadata is local, from the TOC; nothing is fetched)."
                ));
            }
        }
    }
    notes
}

/// Horizontal stacked bars per image: pull, then time to first output, with min–max whiskers
/// of the total; one panel per image, each with its own scale.
fn svg(args: &Args, rows: &[Row], machine: &str) -> String {
    const W: f64 = 960.0;
    const LABEL_W: f64 = 220.0;
    const RIGHT: f64 = 90.0;
    const BAR_H: f64 = 16.0;
    const GAP: f64 = 6.0;
    let color = |s: Scenario| match s {
        Scenario::Normal => ("#7f7f7f", "#c7c7c7"),
        Scenario::Cold => ("#1f77b4", "#aec7e8"),
        Scenario::Trace => ("#2ca02c", "#98df8a"),
        Scenario::Warm => ("#ff7f0e", "#ffbb78"),
    };
    let mut body = String::new();
    let mut y = 78.0;
    for image in image_names(rows) {
        let items: Vec<&Row> = rows
            .iter()
            .filter(|r| r.image == image && r.error.is_none() && !r.samples.is_empty())
            .collect();
        if items.is_empty() {
            continue;
        }
        let max = items
            .iter()
            .flat_map(|r| r.samples.iter().map(|s| s.total_ms() / 1000.0))
            .fold(0.0f64, f64::max);
        let (step, top) = ticks(max);
        let plot_w = W - LABEL_W - RIGHT;
        let x = |v: f64| LABEL_W + v / top * plot_w;
        let _ = writeln!(
            body,
            r#"<text x="10" y="{:.1}" font-size="15" font-weight="bold">{image}</text>"#,
            y
        );
        y += 10.0;
        let panel_top = y;
        let panel_h = items.len() as f64 * (BAR_H + GAP);
        // grid and tick labels
        let mut t = 0.0;
        while t <= top + 1e-9 {
            let _ = writeln!(
                body,
                r##"<line x1="{0:.1}" y1="{1:.1}" x2="{0:.1}" y2="{2:.1}" stroke="#ddd"/><text x="{0:.1}" y="{3:.1}" font-size="11" text-anchor="middle">{4}</text>"##,
                x(t),
                panel_top,
                panel_top + panel_h,
                panel_top + panel_h + 13.0,
                fmt_tick(t, step)
            );
            t += step;
        }
        let _ = writeln!(
            body,
            r#"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">seconds from the start of the pull</text>"#,
            LABEL_W + plot_w / 2.0,
            panel_top + panel_h + 27.0
        );
        for r in items {
            let s = &r.samples;
            let pull = median(&s.iter().map(|x| x.pull_ms / 1000.0).collect::<Vec<_>>());
            let first = median(
                &s.iter()
                    .map(|x| x.first_output_ms / 1000.0)
                    .collect::<Vec<_>>(),
            );
            let (lo, hi) = min_max(&s.iter().map(|x| x.total_ms() / 1000.0).collect::<Vec<_>>());
            let total = median(&s.iter().map(|x| x.total_ms() / 1000.0).collect::<Vec<_>>());
            let (dark, light) = color(r.scenario);
            let short = match r.scenario {
                Scenario::Normal => "normal",
                Scenario::Cold => "cold",
                Scenario::Trace => "with trace",
                Scenario::Warm => "warm",
            };
            let label = format!("{short} · {}", r.format.label());
            let mid = y + BAR_H / 2.0;
            let _ = writeln!(
                body,
                r#"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="end">{}</text>"#,
                LABEL_W - 8.0,
                mid + 4.0,
                escape(&label)
            );
            let _ = writeln!(
                body,
                r#"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="{BAR_H}" fill="{dark}"><title>pull {pull:.2} s</title></rect>"#,
                x(0.0),
                (x(pull) - x(0.0)).max(0.5)
            );
            let _ = writeln!(
                body,
                r#"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="{BAR_H}" fill="{light}"><title>first output {first:.2} s after the pull</title></rect>"#,
                x(pull),
                (x(pull + first) - x(pull)).max(0.5)
            );
            let _ = writeln!(
                body,
                r##"<line x1="{:.1}" y1="{mid:.1}" x2="{:.1}" y2="{mid:.1}" stroke="#333"/><line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#333"/><line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#333"/>"##,
                x(lo),
                x(hi),
                x(lo),
                mid - 4.0,
                x(lo),
                mid + 4.0,
                x(hi),
                mid - 4.0,
                x(hi),
                mid + 4.0
            );
            let _ = writeln!(
                body,
                r#"<text x="{:.1}" y="{:.1}" font-size="11">{:.2} s</text>"#,
                x(hi) + 6.0,
                mid + 4.0,
                total
            );
            y += BAR_H + GAP;
        }
        y += 50.0;
    }
    let height = y;
    let mut legend = String::new();
    let mut lx = 10.0;
    for s in Scenario::ALL {
        let (dark, light) = color(s);
        let _ = write!(
            legend,
            r#"<rect x="{lx}" y="40" width="12" height="12" fill="{dark}"/><rect x="{:.0}" y="40" width="12" height="12" fill="{light}"/><text x="{:.0}" y="50" font-size="12">{}</text>"#,
            lx + 12.0,
            lx + 30.0,
            escape(s.label())
        );
        lx += 60.0 + s.label().len() as f64 * 6.6;
    }
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height:.0}" viewBox="0 0 {W} {height:.0}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">
<rect width="100%" height="100%" fill="white"/>
<text x="10" y="20" font-size="16" font-weight="bold">Time to first output: pull (dark) + start until the first line (light); whiskers: min–max of {runs} runs</text>
<text x="10" y="34" font-size="11">link {rtt} ms RTT, {mbit} Mbit/s; {machine}</text>
{legend}
{body}</svg>
"##,
        runs = args.runs,
        rtt = args.rtt_ms,
        mbit = args.mbit,
        machine = escape(machine),
    )
}

/// A tick step of 1, 2 or 5 × 10^n giving at most about 8 ticks, and the axis end.
fn ticks(max: f64) -> (f64, f64) {
    let max = if max > 0.0 { max } else { 1.0 };
    let raw = max / 8.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    (step, (max / step).ceil() * step)
}

fn fmt_tick(t: f64, step: f64) -> String {
    if step >= 1.0 {
        format!("{t:.0}")
    } else if step >= 0.1 {
        format!("{t:.1}")
    } else {
        format!("{t:.2}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
