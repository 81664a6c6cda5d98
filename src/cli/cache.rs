//! `lazysnap cache stats|ls|evict|prune|verify`: the local store of a running daemon, asked
//! over the control API. Evicting, pruning and verifying are requests to the daemon, which owns
//! the store; this command never writes store state itself.

use clap::{Args, Subcommand};

use lazysnap::grpc::proto::control::{
    CacheEvictRequest, CacheListRequest, CachePruneRequest, CacheStatsRequest, CacheStatsResponse,
    CacheVerifyRequest, LayerRow,
};

use super::client;
use super::output::{self, Align, Table};
use super::ControlArgs;

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Totals of the cache and of fetching since the daemon started.
    Stats(StatsArgs),
    /// One row per layer this node knows: how much of it is cached, traced, mounted.
    Ls(LsArgs),
    /// Drop one layer's cached chunks (the layer stays usable and refetches on demand).
    Evict(EvictArgs),
    /// Evict the least recently used files until the local store fits a size.
    Prune(PruneArgs),
    /// Re-hash every chunk in the local store and drop the files holding one that no longer
    /// matches its digest (they are fetched again when read). Exits 1 if any was found.
    Verify(StatsArgs),
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    #[command(flatten)]
    control: ControlArgs,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    #[command(flatten)]
    pub control: ControlArgs,
}

#[derive(Debug, Args)]
pub struct EvictArgs {
    /// The layer's digest, e.g. sha256:0123… (in full, as `cache ls --json` shows it).
    #[arg(value_name = "DIGEST")]
    digest: String,
    #[command(flatten)]
    control: ControlArgs,
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Prune until the disk cache holds at most SIZE (default: the configured budget). SIZE is
    /// bytes, or a number with a unit K, M, G or T, which are binary multiples of 1024 however
    /// written: 512K, 100M, 1.5G, 2GiB and 500MB (= 500 MiB) all work; 0 empties the cache.
    #[arg(long = "to", value_name = "SIZE", value_parser = parse_size)]
    to: Option<u64>,
    #[command(flatten)]
    control: ControlArgs,
}

pub fn run(command: CacheCommand) -> anyhow::Result<()> {
    match command {
        CacheCommand::Stats(args) => stats(args),
        CacheCommand::Ls(args) => ls(args),
        CacheCommand::Evict(args) => evict(args),
        CacheCommand::Prune(args) => prune(args),
        CacheCommand::Verify(args) => verify(args),
    }
}

fn verify(args: StatsArgs) -> anyhow::Result<()> {
    let report = client::call(args.control.socket(), |mut c| async move {
        c.cache_verify(CacheVerifyRequest {}).await
    })?;
    if args.control.json {
        output::emit_json(&report)?;
    } else {
        output::emit(&format!(
            "checked {} chunks ({}): {} corrupt; dropped {} files ({})\n",
            report.chunks,
            output::human_bytes(report.bytes),
            report.corrupt_chunks,
            report.dropped_files,
            output::human_bytes(report.dropped_bytes)
        ))?;
    }
    if report.corrupt_chunks > 0 {
        anyhow::bail!(
            "{} stored chunks did not match their digests and were dropped",
            report.corrupt_chunks
        );
    }
    Ok(())
}

fn stats(args: StatsArgs) -> anyhow::Result<()> {
    let stats = client::call(args.control.socket(), |mut c| async move {
        c.cache_stats(CacheStatsRequest {}).await
    })?;
    if args.control.json {
        return output::emit_json(&stats);
    }
    output::emit(&render_stats(&stats))
}

fn render_stats(s: &CacheStatsResponse) -> String {
    use output::human_bytes as hb;
    let disk = if s.disk_budget_bytes == 0 {
        format!("{} (no budget)", hb(s.disk_used_bytes))
    } else {
        format!(
            "{} of {} budget {} {}",
            hb(s.disk_used_bytes),
            hb(s.disk_budget_bytes),
            output::bar(s.disk_used_bytes, s.disk_budget_bytes),
            output::percent(s.disk_used_bytes, s.disk_budget_bytes),
        )
    };
    let mut t = Table::headless(&[Align::Left, Align::Left]);
    t.row(["disk used".to_owned(), disk]);
    t.row([
        "stored".to_owned(),
        format!("{} chunks in {} files", s.disk_chunks, s.disk_files),
    ]);
    t.row(["hits".to_owned(), s.hits.to_string()]);
    t.row(["misses".to_owned(), s.misses.to_string()]);
    t.row(["hit ratio".to_owned(), output::ratio(s.hit_ratio)]);
    t.row([
        "fetched".to_owned(),
        format!("{} in {} requests", hb(s.fetched_bytes), s.fetches),
    ]);
    t.row(["served".to_owned(), hb(s.served_bytes)]);
    let amplification = if s.read_chunk_bytes == 0 {
        "nothing read yet".to_owned()
    } else {
        format!(
            "{:.2} ({} fetched for {} of chunks read)",
            s.fetched_bytes as f64 / s.read_chunk_bytes as f64,
            hb(s.fetched_bytes),
            hb(s.read_chunk_bytes)
        )
    };
    t.row(["fetch amplification".to_owned(), amplification]);
    t.row([
        "prefetched".to_owned(),
        format!(
            "{} ({} used, {} wasted)",
            hb(s.prefetch_bytes),
            hb(s.prefetch_used_bytes),
            hb(s.prefetch_wasted_bytes)
        ),
    ]);
    t.row([
        "network waits".to_owned(),
        format!(
            "{} demand reads waited on the registry",
            s.demand_network_reads
        ),
    ]);
    t.row([
        "name requests".to_owned(),
        format!(
            "{} lookups, listings and symlink reads answered",
            s.name_requests
        ),
    ]);
    t.row([
        "evicted".to_owned(),
        format!("{} entries ({})", s.evicted_entries, hb(s.evicted_bytes)),
    ]);
    t.row([
        "corrupt".to_owned(),
        format!("{} entries dropped", s.corrupt_entries),
    ]);
    t.render()
}

fn ls(args: LsArgs) -> anyhow::Result<()> {
    let list = client::call(args.control.socket(), |mut c| async move {
        c.cache_list(CacheListRequest {}).await
    })?;
    if args.control.json {
        return output::emit_json(&list);
    }
    if list.layers.is_empty() {
        return output::emit("no layers known to the daemon\n");
    }
    output::emit(&render_layers(&list.layers, output::now_unix_ms()))
}

fn render_layers(layers: &[LayerRow], now_ms: u64) -> String {
    let mut t = Table::new(&[
        ("DIGEST", Align::Left),
        ("REFERENCES", Align::Left),
        ("CACHED", Align::Right),
        ("SIZE", Align::Right),
        ("", Align::Left),
        ("%", Align::Right),
        ("CHUNKS", Align::Right),
        ("FETCHED", Align::Right),
        ("LAST ACCESS", Align::Left),
        ("TRACE", Align::Left),
        ("MOUNTED", Align::Left),
    ]);
    for layer in layers {
        let references = if layer.references.is_empty() {
            "-".to_owned()
        } else {
            layer.references.join(", ")
        };
        t.row([
            output::short_digest(&layer.digest),
            references,
            output::human_bytes(layer.cached_bytes),
            output::human_bytes(layer.layer_bytes),
            output::bar(layer.cached_bytes, layer.layer_bytes),
            output::percent(layer.cached_bytes, layer.layer_bytes),
            format!("{}/{}", layer.cached_chunks, layer.total_chunks),
            output::human_bytes(layer.fetched_bytes),
            output::relative_time(layer.last_access_unix_ms, now_ms),
            output::yes_no(layer.trace_present).to_owned(),
            output::yes_no(layer.mounted).to_owned(),
        ]);
    }
    t.render()
}

fn evict(args: EvictArgs) -> anyhow::Result<()> {
    let digest = args.digest;
    let request = CacheEvictRequest {
        digest: digest.clone(),
    };
    let evicted = client::call(args.control.socket(), |mut c| async move {
        c.cache_evict(request).await
    })?;
    if args.control.json {
        return output::emit_json(&evicted);
    }
    output::emit(&format!(
        "evicted {} entries ({}) of {digest}\n",
        evicted.evicted_entries,
        output::human_bytes(evicted.evicted_bytes)
    ))
}

fn prune(args: PruneArgs) -> anyhow::Result<()> {
    let request = CachePruneRequest {
        target_bytes: args.to,
    };
    let pruned = client::call(args.control.socket(), |mut c| async move {
        c.cache_prune(request).await
    })?;
    if args.control.json {
        return output::emit_json(&pruned);
    }
    output::emit(&format!(
        "evicted {} entries ({}); the disk cache now holds {}\n",
        pruned.evicted_entries,
        output::human_bytes(pruned.evicted_bytes),
        output::human_bytes(pruned.disk_used_bytes)
    ))
}

/// Parses a `--to SIZE`: plain bytes (`1048576`), or a number, integral or decimal, followed by a
/// unit `K`, `M`, `G` or `T`, optionally spelled `KB`/`KiB` etc. and in any case. Every unit is a
/// binary multiple of 1024 (`500MB` is 500 MiB): a cache budget is counted in pages and chunks,
/// and one meaning per letter is easier to remember than two. Fractions of a byte round down.
pub fn parse_size(input: &str) -> Result<u64, String> {
    let bad = |why: &str| format!("invalid size {input:?}: {why}");
    let text = input.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(bad(
                "expected bytes or a number with a unit K, M, G or T (e.g. 512K, 100M, 2GiB)",
            ))
        }
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return Err(bad("expected a number, e.g. 512K, 100M, 2GiB or 0"));
    }
    if fraction.contains('.') {
        return Err(bad("more than one decimal point"));
    }
    if shift == 0 && !fraction.is_empty() {
        return Err(bad("a number of bytes must be whole"));
    }
    // 24 digits hold any u64 of bytes at any unit's precision; more only add rounding noise.
    if fraction.len() > 24 {
        return Err(bad("too many decimal places"));
    }
    let too_large = || bad("larger than 16 EiB");
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| too_large())?
    };
    let scale = 10u128.pow(fraction.len() as u32);
    let fraction: u128 = if fraction.is_empty() {
        0
    } else {
        fraction.parse().map_err(|_| too_large())?
    };
    let bytes = whole
        .checked_mul(1 << shift)
        .and_then(|b| b.checked_add((fraction << shift) / scale))
        .ok_or_else(too_large)?;
    u64::try_from(bytes).map_err(|_| too_large())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lazysnap::grpc::proto::control::CacheListResponse;

    #[test]
    fn size_accepts_bytes_and_binary_units() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("100M"), Ok(100 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("500MB"), Ok(500 << 20));
        assert_eq!(parse_size("3T"), Ok(3 << 40));
        assert_eq!(parse_size("0G"), Ok(0));
        assert_eq!(parse_size("12b"), Ok(12));
        assert_eq!(parse_size("64kib"), Ok(64 << 10));
        assert_eq!(parse_size(" 2 GiB "), Ok(2 << 30));
    }

    #[test]
    fn size_accepts_fractions_of_a_unit() {
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size(".5K"), Ok(512));
        assert_eq!(parse_size("1.K"), Ok(1024));
        // 0.001 KiB is 1.024 bytes: rounded down.
        assert_eq!(parse_size("0.001K"), Ok(1));
    }

    #[test]
    fn size_errors_name_the_input() {
        for bad in [
            "", "abc", "12X", "1.5", "1..5G", "-1G", "G", ".", "1e3", "10 M B", "1,5G",
        ] {
            let err = parse_size(bad).expect_err(bad);
            assert!(err.contains(&format!("{bad:?}")), "{bad}: {err}");
        }
    }

    #[test]
    fn size_overflow_is_an_error() {
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        assert!(parse_size("18446744073709551616").is_err());
        assert!(parse_size("16777216T").unwrap_err().contains("larger than"));
        assert!(parse_size("99999999999999999999999999999999999999999G").is_err());
    }

    #[test]
    fn layer_json_uses_proto_field_names() {
        let row = LayerRow {
            digest: format!("sha256:{}", "ab".repeat(32)),
            references: vec!["registry.example/app:1".to_owned()],
            cached_bytes: 1,
            layer_bytes: 2,
            cached_chunks: 3,
            total_chunks: 4,
            fetched_bytes: 5,
            fetched_chunks: 6,
            last_access_unix_ms: 7,
            trace_present: true,
            mounted: false,
        };
        let json = serde_json::to_value(CacheListResponse {
            layers: vec![row.clone()],
        })
        .expect("serialize");
        assert_eq!(
            json,
            serde_json::json!({"layers": [{
                "digest": row.digest,
                "references": ["registry.example/app:1"],
                "cached_bytes": 1,
                "layer_bytes": 2,
                "cached_chunks": 3,
                "total_chunks": 4,
                "fetched_bytes": 5,
                "fetched_chunks": 6,
                "last_access_unix_ms": 7,
                "trace_present": true,
                "mounted": false,
            }]})
        );
    }

    #[test]
    fn stats_json_uses_proto_field_names() {
        let json = serde_json::to_value(CacheStatsResponse {
            disk_used_bytes: 123,
            hit_ratio: 0.5,
            ..Default::default()
        })
        .expect("serialize");
        let object = json.as_object().expect("object");
        assert_eq!(object.len(), 19);
        assert_eq!(json["disk_chunks"], 0);
        assert_eq!(json["name_requests"], 0);
        assert_eq!(json["disk_used_bytes"], 123);
        assert_eq!(json["hit_ratio"], 0.5);
        assert_eq!(json["demand_network_reads"], 0);
    }

    #[test]
    fn layers_table_shortens_digests_and_draws_bars() {
        let now = 1_700_000_000_000;
        let rows = [
            LayerRow {
                digest: format!("sha256:{}", "0123456789abcdef".repeat(4)),
                references: vec!["r/a:1".to_owned(), "r/a:latest".to_owned()],
                cached_bytes: 3 << 19,
                layer_bytes: 3 << 20,
                cached_chunks: 12,
                total_chunks: 24,
                fetched_bytes: 1 << 20,
                last_access_unix_ms: now - 12_000,
                trace_present: true,
                mounted: true,
                ..Default::default()
            },
            LayerRow {
                digest: "sha256:feed".to_owned(),
                layer_bytes: 100,
                ..Default::default()
            },
        ];
        let text = render_layers(&rows, now);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("DIGEST  "), "{text}");
        assert!(
            lines[1].starts_with("sha256:0123456789ab  r/a:1, r/a:latest  1.5 MiB  3.0 MiB"),
            "{text}"
        );
        assert!(lines[1].contains("[#####-----]  50%   12/24"), "{text}");
        assert!(lines[1].ends_with("12s ago      yes    yes"), "{text}");
        assert!(lines[2].contains("[----------]   0%"), "{text}");
        assert!(lines[2].ends_with("never        no     no"), "{text}");
        // Columns line up: every row's bar starts at the same place.
        let at: Vec<usize> = lines[1..].iter().map(|l| l.find('[').unwrap()).collect();
        assert_eq!(at[0], at[1], "{text}");
    }
}
