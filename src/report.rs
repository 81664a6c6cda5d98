//! What the node's lazy layers report to operators (control API, metrics), as domain types,
//! and the [`LazyNode`] trait through which those front ends ask for them. The front ends know
//! this trait, not the machinery behind it (`crate::mount`).

use std::path::PathBuf;
use std::sync::Arc;

use crate::cache::{Evicted, StoreStats, VerifyReport};
use crate::format::BoxFuture;
use crate::layer::{Fetches, LayerError};
use crate::prefetch::{Activity, TraceStore};
use crate::registry::RegistryClient;

/// Totals over every lazy layer since the daemon started.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub fetched_bytes: u64,
    pub fetches: u64,
    pub served_bytes: u64,
    pub prefetch_bytes: u64,
    pub prefetch_used_bytes: u64,
    pub demand_network_reads: u64,
    /// Compressed bytes of the chunks containers read, each once per layer.
    pub read_chunk_bytes: u64,
    /// Lookups, listings and symlink reads the daemon answered.
    pub name_requests: u64,
}

/// The cache and fetch figures of the whole node, for `lazysnap cache stats` and metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub totals: Totals,
    pub store: StoreStats,
}

impl Stats {
    /// Store lookups answered, of all lookups; 0 when there were none.
    pub fn hit_ratio(&self) -> f64 {
        let hits = self.store.hits;
        let lookups = hits + self.store.misses;
        if lookups == 0 {
            0.0
        } else {
            hits as f64 / lookups as f64
        }
    }
}

/// One layer this node knows (mounted now or saved from before), for `lazysnap cache ls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerReport {
    pub digest: String,
    pub references: Vec<String>,
    pub cached_bytes: u64,
    pub layer_bytes: u64,
    pub cached_chunks: u64,
    pub total_chunks: u64,
    pub fetched_bytes: u64,
    pub fetched_chunks: u64,
    pub last_access_unix_ms: u64,
    pub trace_present: bool,
    pub mounted: bool,
}

/// One mount of a lazy layer, for `lazysnap mounts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountReport {
    pub digest: String,
    pub reference: String,
    pub mountpoint: PathBuf,
    pub activity: Activity,
    pub mounted_unix_ms: u64,
    pub fetched_bytes: u64,
    pub served_bytes: u64,
    /// Served on the connection an earlier daemon left, not mounted anew.
    pub taken_over: bool,
    /// The whole-blob check: "" where the format needs none, "pending", "verified", "bad".
    pub verification: &'static str,
}

/// How this daemon took over the FUSE connections the previous one left at its start.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TakeoverReport {
    /// Where the fds are held: "systemd", "holder" or "none".
    pub fd_store: &'static str,
    /// Connections served again without remounting.
    pub taken_over: u64,
    /// Held connections that matched no saved layer (or could not be served), unmounted.
    pub dropped: u64,
    /// From taking the fds back to the last connection served again.
    pub duration_ms: u64,
}

/// The node's lazy layers as operators see them.
pub trait LazyNode: Send + Sync {
    fn stats(&self) -> Stats;
    /// The lazy layers mounted now.
    fn mounts(&self) -> Vec<MountReport>;
    /// How the connections of the previous daemon were taken over.
    fn takeover(&self) -> TakeoverReport {
        TakeoverReport::default()
    }
    /// Checks now that each mount is still served, so `mounts` reports a dead one as
    /// `Activity::Dead`. Blocking (bounded): call it off the async workers.
    fn check_mounts(&self) {}
    /// Every layer this node has saved, with what of it is cached. Reads saved state from
    /// disk: call it off the async workers.
    fn layers(&self) -> Vec<LayerReport>;
    /// Drops every cached chunk of layer `digest`.
    fn evict_layer(
        self: Arc<Self>,
        digest: String,
    ) -> BoxFuture<'static, Result<Evicted, LayerError>>;
    /// Evicts least recently used data down to `target` bytes (the disk budget if `None`);
    /// returns what went and the bytes left.
    fn prune(&self, target: Option<u64>) -> BoxFuture<'_, (Evicted, u64)>;
    /// Re-hashes the local store, dropping what no longer matches.
    fn verify_store(&self) -> BoxFuture<'_, VerifyReport>;
    fn traces(&self) -> &Arc<TraceStore>;
    fn fetches(&self) -> &Arc<Fetches>;
    fn registry(&self) -> &RegistryClient;
}
