//! `lazysnap index IMAGE [--push]`: indexes the image's gzip layers for lazy pulling
//! (`lazysnap::layer::gzip_publish`) and, with `--push`, stores the index in the image's
//! repository next to it. Registry settings and credentials come from the config's
//! `[registry]` section (docker config, hosts.toml), as for the daemon.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use lazysnap::config::Config;
use lazysnap::format::gzip_index::build::TracedRange;
use lazysnap::layer::gzip_publish::{self, IndexOptions};
use lazysnap::prefetch::trace::Trace;
use lazysnap::registry::{self, Credentials, Reference, RegistryClient, Secret};

#[derive(Debug, Args)]
pub struct IndexArgs {
    /// The image, e.g. `registry.example.com/app:1` (it is read, never changed).
    image: String,
    /// Store the index in the image's repository, referring to the image manifest.
    #[arg(long)]
    push: bool,
    /// Also write each layer's index to DIR/<layer hex>.gzidx.
    #[arg(long, value_name = "DIR")]
    output: Option<PathBuf>,
    /// Uncompressed bytes between resume points (a lazy read fetches about this much).
    #[arg(long, value_name = "BYTES", default_value_t = gzip_publish::IndexOptions::default().span)]
    span: u64,
    /// Layers smaller than this (compressed) are listed as not indexed and pulled whole.
    #[arg(long, value_name = "BYTES", default_value_t = gzip_publish::DEFAULT_MIN_LAYER_BYTES)]
    min_layer_size: u64,
    /// Config file whose `[registry]` and `[limits]` apply. Default /etc/lazysnap/config.toml
    /// if it exists.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Credentials for the image's registry, `user:password` (else the docker config's).
    #[arg(
        long,
        value_name = "USER:PASSWORD",
        env = "LAZYSNAP_REGISTRY_AUTH",
        hide_env_values = true
    )]
    auth: Option<String>,
    /// A read trace of one of the image's layers (`lazysnap trace export`, from a node that
    /// ran the image): that layer's index gets a resume point before each range its
    /// containers read first, so that those are fetched with little more than their own
    /// bytes. Repeatable; the layer is read twice.
    #[arg(long, value_name = "FILE")]
    trace: Vec<PathBuf>,
    /// Print one JSON document instead of a table.
    #[arg(long)]
    json: bool,
}

/// The largest trace document read (a daemon's traces are far smaller: their entries are
/// bounded by `[prefetch]`'s limits).
const MAX_TRACE_BYTES: u64 = 64 << 20;

/// The traced ranges of each layer the documents at `paths` are traces of.
fn traced_ranges(paths: &[PathBuf]) -> anyhow::Result<HashMap<String, Vec<TracedRange>>> {
    let mut traced: HashMap<String, Vec<TracedRange>> = HashMap::new();
    for path in paths {
        let size = std::fs::metadata(path)
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        anyhow::ensure!(
            size <= MAX_TRACE_BYTES,
            "{} is {size} bytes; a trace document is at most {MAX_TRACE_BYTES}",
            path.display()
        );
        let document =
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let trace = Trace::from_document(&document).with_context(|| {
            format!(
                "{} is not a trace from `lazysnap trace export`",
                path.display()
            )
        })?;
        traced
            .entry(trace.layer)
            .or_default()
            .extend(trace.entries.into_iter().map(|e| TracedRange {
                path: e.path,
                offset: e.offset,
                bytes: e.bytes,
            }));
    }
    Ok(traced)
}

pub fn run(args: IndexArgs) -> anyhow::Result<()> {
    let config = Config::load(args.config.as_deref())?;
    config.validate()?;
    let reference = Reference::parse(&args.image)?;
    let traced = traced_ranges(&args.trace)?;
    let client = RegistryClient::new(registry::RegistryConfig {
        request_timeout: config.registry.request_timeout,
        read_deadline: config.registry.read_deadline,
        docker_config: config.registry.docker_config.clone(),
        hosts_dir: config.registry.hosts_dir.clone(),
    })?;
    if let Some(auth) = &args.auth {
        let (username, password) = auth.split_once(':').context("--auth takes user:password")?;
        client.set_credentials(
            &reference.host,
            Credentials {
                username: username.to_owned(),
                password: Secret(password.to_owned()),
            },
        );
    }
    let options = IndexOptions {
        span: args.span,
        min_layer_bytes: args.min_layer_size,
        limits: config.limits,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start tokio runtime")?;
    let started = std::time::Instant::now();
    let report = runtime
        .block_on(gzip_publish::index_image_traced(
            &client, &reference, options, &traced,
        ))
        .with_context(|| format!("indexing {}", args.image))?;
    if let Some(dir) = &args.output {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for layer in &report.layers {
            let hex = layer.digest.trim_start_matches("sha256:");
            for (bytes, ext) in [(&layer.index, "gzidx"), (&layer.windows, "gzwin")] {
                if let Some(bytes) = bytes {
                    let path = dir.join(format!("{hex}.{ext}"));
                    std::fs::write(&path, bytes)
                        .with_context(|| format!("writing {}", path.display()))?;
                }
            }
        }
    }
    let pushed = if args.push {
        Some(
            runtime
                .block_on(gzip_publish::push(&client, &reference, &report))
                .with_context(|| format!("pushing the index of {}", args.image))?,
        )
    } else {
        None
    };
    let took = started.elapsed();
    let layers: Vec<serde_json::Value> = report
        .layers
        .iter()
        .map(|l| {
            serde_json::json!({
                "digest": l.digest,
                "size": l.size,
                "indexed": l.index.is_some(),
                "skipped": l.skipped,
                // What the index adds to the registry: the document and its windows.
                "index_bytes": index_bytes(l),
                "index_blob_bytes": l.index.as_ref().map_or(0, |i| i.len()),
                "windows_bytes": l.windows.as_ref().map_or(0, |w| w.len()),
                "windows_digest": l.windows.as_ref().map(|w| registry::sha256_digest(w)),
                "spans": l.spans,
                "entries": l.entries,
                "traced_points": l.traced_points,
                "ms": l.took.as_millis() as u64,
            })
        })
        .collect();
    if args.json {
        let doc = serde_json::json!({
            "image": args.image,
            "manifest": report.manifest.digest,
            "layers": layers,
            "artifact": pushed.as_ref().map(|p| p.artifact.clone()),
            "referrers_tag": pushed.as_ref().map(|p| p.tag.clone()),
            "ms": took.as_millis() as u64,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!("image manifest {}", report.manifest.digest);
    println!(
        "{:<73} {:>12} {:>10} {:>6} {:>8} {:>7} {:>7}",
        "LAYER", "SIZE", "INDEX", "SPANS", "ENTRIES", "TRACED", "MS"
    );
    for l in &report.layers {
        let index = match (&l.index, &l.skipped) {
            (Some(_), _) => index_bytes(l).to_string(),
            (None, Some(why)) => format!("- ({why})"),
            (None, None) => "-".into(),
        };
        println!(
            "{:<73} {:>12} {:>10} {:>6} {:>8} {:>7} {:>7}",
            l.digest,
            l.size,
            index,
            l.spans,
            l.entries,
            l.traced_points,
            l.took.as_millis()
        );
    }
    if let Some(p) = pushed {
        println!("pushed artifact {} (referrers tag {})", p.artifact, p.tag);
    }
    println!("took {} ms", took.as_millis());
    Ok(())
}

/// The bytes a layer's index adds to the registry: its document and its windows blob.
fn index_bytes(layer: &gzip_publish::LayerReport) -> usize {
    layer.index.as_ref().map_or(0, |i| i.len()) + layer.windows.as_ref().map_or(0, |w| w.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_are_read_per_layer_and_a_document_that_is_not_one_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layer = format!("sha256:{}", "ab".repeat(32));
        let good = dir.path().join("good.json");
        let doc = serde_json::json!({
            "format": "lazysnap-trace/v1",
            "layer": layer,
            "mounts": 1,
            "updated_unix_ms": 1,
            "entries": [
                { "path": "usr/bin/dash", "offset": 0, "bytes": 4096, "since_mount_ms": 3 },
                { "path": "etc/passwd", "offset": 0, "bytes": 839, "since_mount_ms": 5 },
            ],
        });
        std::fs::write(&good, doc.to_string()).expect("write");
        let traced = traced_ranges(std::slice::from_ref(&good)).expect("ranges");
        assert_eq!(traced.len(), 1);
        let ranges = &traced[&layer];
        assert_eq!(ranges.len(), 2);
        assert_eq!(
            ranges[0],
            TracedRange {
                path: "usr/bin/dash".into(),
                offset: 0,
                bytes: 4096
            }
        );

        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, r#"{"format": "something else"}"#).expect("write");
        let err = traced_ranges(&[good, bad]).expect_err("not a trace");
        assert!(
            format!("{err:#}").contains("bad.json is not a trace"),
            "{err:#}"
        );
    }
}
