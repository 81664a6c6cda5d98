//! The Prometheus endpoint: `GET /metrics` on the address `[metrics] address` names, in the
//! text exposition format, rendered from the same figures the control API shows. A tiny
//! HTTP/1.1 responder, because one read-only path does not justify a web framework.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::report::LazyNode;

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    layers: Arc<dyn LazyNode>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let layers = layers.clone();
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, &*layers).await {
                            tracing::debug!(error = %e, "metrics request failed");
                        }
                    });
                }
                Err(e) => tracing::warn!(error = %e, "metrics accept failed"),
            },
        }
    }
}

/// Binds the metrics address, naming it in the error.
pub async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("bind metrics address {address}: {e}")))
}

async fn answer(mut stream: TcpStream, layers: &dyn LazyNode) -> std::io::Result<()> {
    // The request line is all we need; a client sending more than this before its headers
    // end is not a scraper.
    let mut request = vec![0u8; 4096];
    let mut len = 0;
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            let n = stream.read(&mut request[len..]).await?;
            len += n;
            if n == 0 || request[..len].windows(4).any(|w| w == b"\r\n\r\n") || len == request.len()
            {
                return Ok::<_, std::io::Error>(());
            }
        }
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return Ok(());
    }
    let line = String::from_utf8_lossy(&request[..len]);
    let path = line.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = if line.starts_with("GET ") && (path == "/metrics" || path == "/") {
        ("200 OK", render(layers))
    } else {
        ("404 Not Found", "not found: try GET /metrics\n".to_owned())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// The exposition text.
pub fn render(layers: &dyn LazyNode) -> String {
    let s = layers.stats();
    let t = s.totals;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    metric(
        "lazysnap_fetched_bytes_total",
        "counter",
        "Compressed bytes of layer data received from registries.",
        &[("", t.fetched_bytes as f64)],
    );
    metric(
        "lazysnap_fetches_total",
        "counter",
        "Range requests for layer data made to registries.",
        &[("", t.fetches as f64)],
    );
    metric(
        "lazysnap_served_bytes_total",
        "counter",
        "File bytes handed to containers.",
        &[("", t.served_bytes as f64)],
    );
    metric("lazysnap_prefetch_bytes_total", "counter", "Uncompressed bytes fetched ahead of containers' reads (trace, landmark, readahead, background).", &[("", t.prefetch_bytes as f64)]);
    metric(
        "lazysnap_prefetch_used_bytes_total",
        "counter",
        "Prefetched bytes a container read afterwards.",
        &[("", t.prefetch_used_bytes as f64)],
    );
    metric(
        "lazysnap_demand_network_reads_total",
        "counter",
        "Container reads that had to wait for a registry.",
        &[("", t.demand_network_reads as f64)],
    );
    metric(
        "lazysnap_read_chunk_bytes_total",
        "counter",
        "Compressed bytes of the chunks containers read, each chunk once per layer; a gzip-index span counts from its resume point to the end of the furthest part read (fetched_bytes divided by this is the fetch amplification).",
        &[("", t.read_chunk_bytes as f64)],
    );
    metric(
        "lazysnap_name_requests_total",
        "counter",
        "Lookups, directory listings and symlink reads the kernel brought to the daemon (those it answered from its caches never come).",
        &[("", t.name_requests as f64)],
    );
    metric(
        "lazysnap_cache_hits_total",
        "counter",
        "Chunk reads answered by the local store.",
        &[("", s.store.hits as f64)],
    );
    metric(
        "lazysnap_cache_misses_total",
        "counter",
        "Chunk lookups the cache could not answer.",
        &[("", s.store.misses as f64)],
    );
    metric(
        "lazysnap_cache_corrupt_total",
        "counter",
        "Disk cache entries found corrupt and dropped.",
        &[("", s.store.corrupt as f64)],
    );
    metric(
        "lazysnap_cache_evicted_bytes_total",
        "counter",
        "Bytes evicted from the disk cache.",
        &[("", s.store.evicted.bytes as f64)],
    );
    metric(
        "lazysnap_cache_disk_bytes",
        "gauge",
        "Bytes of chunks in the disk cache.",
        &[("", s.store.disk_used_bytes as f64)],
    );
    metric(
        "lazysnap_cache_disk_files",
        "gauge",
        "Files in the local store.",
        &[("", s.store.disk_files as f64)],
    );
    metric(
        "lazysnap_cache_disk_chunks",
        "gauge",
        "Chunks present in the local store.",
        &[("", s.store.disk_chunks as f64)],
    );
    metric(
        "lazysnap_cache_disk_budget_bytes",
        "gauge",
        "The disk cache's budget; 0 means none.",
        &[("", s.store.disk_budget_bytes as f64)],
    );
    let fetches = layers.fetches();
    metric(
        "lazysnap_fetches_in_flight",
        "gauge",
        "Range requests to registries on the wire now.",
        &[(
            "",
            fetches.in_flight.load(std::sync::atomic::Ordering::Relaxed) as f64,
        )],
    );
    metric(
        "lazysnap_demand_reads_waiting",
        "gauge",
        "Container reads waiting on a registry now.",
        &[("", fetches.demand_waiting() as f64)],
    );
    let mounts = layers.mounts();
    metric(
        "lazysnap_mounted_layers",
        "gauge",
        "Lazy layers mounted now.",
        &[("", mounts.len() as f64)],
    );
    let verification =
        |label: &str| mounts.iter().filter(|m| m.verification == label).count() as f64;
    metric(
        "lazysnap_mounted_layers_by_verification",
        "gauge",
        "Lazy layers mounted now whose format needs the whole-blob check, by its outcome (bad: the blob does not hash to the layer digest, its reads fail).",
        &[
            ("{verification=\"pending\"}", verification("pending")),
            ("{verification=\"verified\"}", verification("verified")),
            ("{verification=\"bad\"}", verification("bad")),
        ],
    );
    let takeover = layers.takeover();
    metric(
        "lazysnap_takeover_connections",
        "gauge",
        "FUSE connections of the previous daemon served again at this start, without remounting.",
        &[("", takeover.taken_over as f64)],
    );
    metric(
        "lazysnap_takeover_dropped_connections",
        "gauge",
        "Held FUSE connections that matched no saved layer at this start, unmounted.",
        &[("", takeover.dropped as f64)],
    );
    metric(
        "lazysnap_takeover_duration_seconds",
        "gauge",
        "Time from taking the held FUSE fds back to the last connection served again.",
        &[("", takeover.duration_ms as f64 / 1000.0)],
    );
    let (buckets, count, sum) = fetches.latency.snapshot();
    let _ = writeln!(out, "# HELP lazysnap_fetch_duration_seconds Time of one range request to a registry, retries included.\n# TYPE lazysnap_fetch_duration_seconds histogram");
    for (bound, n) in buckets {
        let _ = writeln!(
            out,
            "lazysnap_fetch_duration_seconds_bucket{{le=\"{bound}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "lazysnap_fetch_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
    );
    let _ = writeln!(out, "lazysnap_fetch_duration_seconds_sum {sum}");
    let _ = writeln!(out, "lazysnap_fetch_duration_seconds_count {count}");
    out
}
