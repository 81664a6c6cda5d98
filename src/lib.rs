//! lazysnap: a containerd remote snapshotter.
//!
//! # Layout
//! - `config`: the TOML configuration tree, defaults and validation.
//! - `chunk`: what every lazy-layer module says about a chunk: its identity, the digest it is
//!   verified against, verified bytes; a leaf.
//! - `metadata`: tar entries → layer index (inodes, attributes, chunk maps); pure, knows no
//!   format.
//! - `format`: the format seam (`LayerFormat`, `ChunkDecoder`): eStargz and zstd:chunked find
//!   and verify their TOC, gzip-index its index in the registry; each builds the index and
//!   decodes chunks.
//! - `cache`: the store seam (`ChunkStore`) and the local store: decompressed files, one
//!   sparse file per file of a layer, verified on the way in, read by `pread` or kernel
//!   passthrough, within a disk budget (LRU).
//! - `layer`: lazy layers: resolving a layer through the formats, its saved state, and file
//!   ranges → chunks → store or one deduplicated fetch.
//! - `mount`: wires lazy layers (layer + fuse crate) into the snapshotter's `RemoteFs`, and
//!   reports on them (`report::LazyNode`).
//! - `report`: what the node reports to operators, and the `LazyNode` trait the control API
//!   and metrics ask it through.
//! - `registry`: OCI registry client: ranged blob reads, auth, retries; a leaf.
//! - `snapshot`: containerd's snapshot semantics over overlayfs and an embedded metadata store;
//!   knows nothing of gRPC.
//! - `grpc`: containerd's Snapshots service over `snapshot` (tonic), proto ↔ domain conversion
//!   and error → status mapping; the control API over `report`; the CRI image proxy that hands
//!   pull secrets to `registry`.
//! - `prefetch`: read traces, trace/landmark prefetch, readahead, background fetch; over
//!   `layer` and `metadata`.
//! - `metrics`: the Prometheus endpoint over the same figures as the control API.
//! - `takeover`: holding lazy mounts' FUSE fds outside the daemon (systemd's fd store or
//!   the `fd-holder` process) so the next daemon takes the connections over; a leaf.
//! - `socket`: binding the daemon's Unix sockets with their mode and group, umask-proof.
//! - `daemon`: wiring for `lazysnap serve`: state dir, sockets, signals.
//!
//! Dependencies point one way: `daemon → {grpc, metrics} → {snapshot, report}`;
//! `snapshot → (RemoteFs) ← mount → {layer, prefetch, fuse, takeover}`; `layer → {format, registry,
//! cache}`; `format → metadata → chunk`; `cache → chunk`; `prefetch → layer`. `config`,
//! `registry` and `chunk` are leaves.

pub mod cache;
pub mod chunk;
pub mod config;
pub mod daemon;
pub mod format;
pub mod grpc;
pub mod layer;
pub mod metadata;
pub mod metrics;
pub mod mount;
pub mod prefetch;
pub mod registry;
pub mod report;
pub mod snapshot;
pub mod socket;
pub mod takeover;
#[cfg(test)]
pub(crate) mod test_utils;

pub use format::BoxFuture;

/// An error and its sources, `: `-separated, for a log line or a status message: each error's
/// own message says only its part, so the chain is printed once, in order.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
