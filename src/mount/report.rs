//! What `LazyLayers` reports to operators (`crate::report::LazyNode`): node figures, mounts,
//! the saved layers with what of them is cached, and eviction on request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{LazyLayers, Mounted};
use crate::cache::Evicted;
use crate::chunk::BlobId;
use crate::format::BoxFuture;
use crate::layer::{self, Fetches, LayerCounters, LayerError};
use crate::metadata::LayerIndex;
use crate::prefetch::TraceStore;
use crate::registry::RegistryClient;
use crate::report::{LayerReport, LazyNode, MountReport, Stats, Totals};

/// Figures of one layer since the daemon started, kept when it is unmounted.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Retired {
    fetched_bytes: u64,
    fetched_chunks: u64,
    last_access_ms: u64,
}

fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

fn add(totals: &mut Totals, c: &LayerCounters) {
    totals.fetched_bytes += get(&c.fetched_bytes);
    totals.fetches += get(&c.fetches);
    totals.served_bytes += get(&c.served_bytes);
    totals.prefetch_bytes += get(&c.prefetch_bytes);
    totals.prefetch_used_bytes += get(&c.prefetch_used_bytes);
    totals.demand_network_reads += get(&c.demand_network_reads);
    totals.read_chunk_bytes += get(&c.read_chunk_bytes);
    totals.name_requests += get(&c.name_requests);
}

impl LazyLayers {
    /// Keeps the figures of a mount that is going, and logs them.
    pub(super) fn retire(&self, mounted: &Mounted) {
        let c = mounted.reader.counters();
        tracing::info!(
            layer = %mounted.digest,
            fetched_bytes = get(&c.fetched_bytes),
            fetches = get(&c.fetches),
            served_bytes = get(&c.served_bytes),
            chunk_hits = get(&c.chunk_hits),
            chunk_misses = get(&c.chunk_misses),
            demand_network_reads = get(&c.demand_network_reads),
            read_chunk_bytes = get(&c.read_chunk_bytes),
            name_requests = get(&c.name_requests),
            prefetch_bytes = get(&c.prefetch_bytes),
            prefetch_used_bytes = get(&c.prefetch_used_bytes),
            "unmounting lazy layer"
        );
        add(
            &mut self
                .retired_totals
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
            c,
        );
        {
            let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
            let r = retired.entry(mounted.digest.clone()).or_default();
            r.fetched_bytes += get(&c.fetched_bytes);
            r.fetched_chunks += get(&c.chunk_misses);
            r.last_access_ms = r.last_access_ms.max(get(&c.last_access_ms));
        }
        if let Some(recorder) = mounted.recorder.clone() {
            // What was read since the last periodic save still belongs in the trace.
            let (digest, index, store) = (
                mounted.digest.clone(),
                mounted.index.clone(),
                self.traces.clone(),
            );
            self.runtime.spawn(async move {
                let mut first = false;
                crate::prefetch::flush_trace(
                    &digest, &recorder, &index, &store, &mut None, &mut first,
                )
                .await;
            });
        }
        let registry = self.resolver.registry().stats();
        let store = self.store.stats();
        tracing::debug!(
            hits = store.hits,
            misses = store.misses,
            corrupt = store.corrupt,
            registry_requests = get(&registry.requests),
            registry_bytes = get(&registry.bytes),
            registry_retries = get(&registry.retries),
            "totals"
        );
    }

    /// Removes the saved state of every layer no snapshot mounts. Brief blocking file I/O.
    fn prune_unmounted_states(&self) {
        let _lifecycle = self.lifecycle();
        let mounted: Vec<String> = self.mounted().values().map(|m| m.digest.clone()).collect();
        let keep: Vec<&str> = mounted.iter().map(String::as_str).collect();
        let freed = self.states.remove_all_but(&keep);
        if freed > 0 {
            tracing::info!(
                bytes = freed,
                "removed the saved state of layers no snapshot mounts"
            );
        }
        self.store.reserve(self.states.disk_usage());
    }

    /// Totals over every lazy layer since the daemon started.
    pub fn totals(&self) -> Totals {
        let mut totals = *self
            .retired_totals
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for m in self.mounted().values() {
            add(&mut totals, m.reader.counters());
        }
        totals
    }

    /// The index of layer `digest`: the mounted one's, or built again from its saved state.
    /// Blocking when the layer is not mounted.
    /// A layer's index and the blob its bytes are stored under.
    fn index_of(&self, digest: &str) -> Result<(Arc<LayerIndex>, BlobId), LayerError> {
        let mounted = self
            .mounted()
            .values()
            .find(|m| m.digest == digest)
            .map(|m| (m.index.clone(), *m.reader.blob_id()));
        match mounted {
            Some(found) => Ok(found),
            None => {
                let state = self.states.load(digest)?;
                let blob = BlobId::new(digest, state.source.toc_digest.as_deref());
                Ok((
                    Arc::new(layer::open(self.resolver.formats(), &state)?.index),
                    blob,
                ))
            }
        }
    }
}

impl LazyNode for LazyLayers {
    fn stats(&self) -> Stats {
        Stats {
            totals: self.totals(),
            store: self.store.stats(),
        }
    }

    fn check_mounts(&self) {
        self.check_all_mounts();
    }

    fn mounts(&self) -> Vec<MountReport> {
        let mut out: Vec<MountReport> = self
            .mounted()
            .iter()
            .map(|(point, m)| {
                let c = m.reader.counters();
                MountReport {
                    digest: m.digest.clone(),
                    reference: m.reference.clone(),
                    mountpoint: point.clone(),
                    activity: m.activity.get(),
                    mounted_unix_ms: m.mounted_unix_ms,
                    fetched_bytes: get(&c.fetched_bytes),
                    served_bytes: get(&c.served_bytes),
                    taken_over: m.taken_over,
                    verification: m.reader.verdict().label(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.mountpoint.cmp(&b.mountpoint));
        out
    }

    fn takeover(&self) -> crate::report::TakeoverReport {
        self.takeover_report()
    }

    /// Opens each unmounted layer's saved index: for the operator's occasional look, not for
    /// a hot path.
    fn layers(&self) -> Vec<LayerReport> {
        struct Live {
            index: Arc<LayerIndex>,
            references: Vec<String>,
            fetched_bytes: u64,
            fetched_chunks: u64,
            last_access_ms: u64,
        }
        let mut live: HashMap<String, Live> = HashMap::new();
        for m in self.mounted().values() {
            let c = m.reader.counters();
            let entry = live.entry(m.digest.clone()).or_insert_with(|| Live {
                index: m.index.clone(),
                references: Vec::new(),
                fetched_bytes: 0,
                fetched_chunks: 0,
                last_access_ms: 0,
            });
            if !entry.references.contains(&m.reference) {
                entry.references.push(m.reference.clone());
            }
            entry.fetched_bytes += get(&c.fetched_bytes);
            entry.fetched_chunks += get(&c.chunk_misses);
            entry.last_access_ms = entry
                .last_access_ms
                .max(get(&c.last_access_ms))
                .max(m.mounted_unix_ms);
        }
        let retired = self
            .retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut out = Vec::new();
        for dir in self.states.list() {
            let state = match self.states.load_dir(&dir) {
                Ok(state) => state,
                Err(e) => {
                    tracing::debug!(error = %crate::error_chain(&e), "skipping layer dir");
                    continue;
                }
            };
            let digest = state.source.digest.clone();
            let live = live.remove(&digest);
            let index = match &live {
                Some(l) => l.index.clone(),
                None => match layer::open(self.resolver.formats(), &state) {
                    Ok(opened) => Arc::new(opened.index),
                    Err(e) => {
                        tracing::warn!(layer = %digest, error = %crate::error_chain(&e), "saved layer unreadable");
                        continue;
                    }
                },
            };
            let chunks = index.chunks_in_blob_order();
            let blob = BlobId::new(&digest, state.source.toc_digest.as_deref());
            let (cached_chunks, cached_bytes) = self.store.present(&blob, &chunks);
            let old = retired.get(&digest).copied().unwrap_or_default();
            let mut references = live
                .as_ref()
                .map(|l| l.references.clone())
                .unwrap_or_default();
            if !references.contains(&state.source.reference) {
                references.push(state.source.reference.clone());
            }
            out.push(LayerReport {
                trace_present: self.traces.contains(&digest),
                digest,
                references,
                cached_bytes,
                layer_bytes: chunks.iter().map(|c| c.len).sum(),
                cached_chunks,
                total_chunks: chunks.len() as u64,
                fetched_bytes: old.fetched_bytes + live.as_ref().map_or(0, |l| l.fetched_bytes),
                fetched_chunks: old.fetched_chunks + live.as_ref().map_or(0, |l| l.fetched_chunks),
                last_access_unix_ms: old
                    .last_access_ms
                    .max(live.as_ref().map_or(0, |l| l.last_access_ms)),
                mounted: live.is_some(),
            });
        }
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        out
    }

    /// Drops every stored file of layer `digest` (mounted or not; a mounted layer fetches
    /// again what it reads next).
    fn evict_layer(
        self: Arc<Self>,
        digest: String,
    ) -> BoxFuture<'static, Result<Evicted, LayerError>> {
        Box::pin(async move {
            // Building an unmounted layer's index reads and parses its saved state.
            let me = self.clone();
            let layer = digest.clone();
            let (index, blob) = tokio::task::spawn_blocking(move || me.index_of(&digest))
                .await
                .map_err(|source| LayerError::Task { layer, source })??;
            Ok(self.store.evict(&blob, index.chunks_in_blob_order()).await)
        })
    }

    /// Saved states of layers no snapshot mounts go first (they are not needed to open any
    /// mount, and a pull of the layer resolves it again), then chunks down to the target.
    fn prune(&self, target: Option<u64>) -> BoxFuture<'_, (Evicted, u64)> {
        Box::pin(async move {
            self.prune_unmounted_states();
            let target = target.unwrap_or(self.store.stats().disk_budget_bytes);
            let evicted = self.store.prune_to(target).await;
            (evicted, self.store.stats().disk_used_bytes)
        })
    }

    fn verify_store(&self) -> BoxFuture<'_, crate::cache::VerifyReport> {
        self.store.verify()
    }

    fn traces(&self) -> &Arc<TraceStore> {
        &self.traces
    }

    fn fetches(&self) -> &Arc<Fetches> {
        &self.fetches
    }

    fn registry(&self) -> &RegistryClient {
        self.resolver.registry()
    }
}
