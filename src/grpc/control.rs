//! lazysnap's own control API (`lazysnap.v1.Control`, `proto/lazysnap/v1/control.proto`) over
//! the lazy-layer machinery: cache figures and management, read traces, mounts. Protobuf
//! types stop here; the answers come from a `crate::report::LazyNode` in domain types.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::proto::control::{self as pb, control_server::Control};
use crate::layer::LayerError;
use crate::prefetch::{Trace, TraceError};
use crate::report::LazyNode;

pub struct ControlService {
    /// None when `[fuse] lazy_pull` is off: there is no cache or trace to show.
    layers: Option<Arc<dyn LazyNode>>,
}

impl ControlService {
    pub fn new(layers: Option<Arc<dyn LazyNode>>) -> Self {
        ControlService { layers }
    }

    fn layers(&self) -> Result<Arc<dyn LazyNode>, Status> {
        self.layers.clone().ok_or_else(|| {
            Status::failed_precondition(
                "lazy pulling is off ([fuse] lazy_pull = false): there is no local store or trace",
            )
        })
    }
}

/// Runs operator work that touches the file system off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("worker failed: {e}")))
}

fn trace_status(e: TraceError) -> Status {
    let message = crate::error_chain(&e);
    match e {
        TraceError::NotFound { .. } => Status::not_found(message),
        TraceError::Invalid { .. } => Status::invalid_argument(message),
        TraceError::Io { .. } => Status::internal(message),
    }
}

fn summary(trace: &Trace) -> pb::TraceSummary {
    pb::TraceSummary {
        digest: trace.layer.clone(),
        entries: trace.entries.len() as u64,
        bytes: trace.bytes(),
        mounts: trace.mounts,
        updated_unix_ms: trace.updated_unix_ms,
        names: trace.names.len() as u64,
    }
}

fn require_digest(digest: &str) -> Result<(), Status> {
    if digest.starts_with("sha256:") && crate::chunk::ChunkDigest::parse(digest).is_some() {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "{digest:?} is not a layer digest (sha256:<64 hex>)"
        )))
    }
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn cache_stats(
        &self,
        _: Request<pb::CacheStatsRequest>,
    ) -> Result<Response<pb::CacheStatsResponse>, Status> {
        let s = self.layers()?.stats();
        Ok(Response::new(pb::CacheStatsResponse {
            disk_used_bytes: s.store.disk_used_bytes,
            disk_budget_bytes: s.store.disk_budget_bytes,
            disk_files: s.store.disk_files,
            disk_chunks: s.store.disk_chunks,
            hits: s.store.hits,
            misses: s.store.misses,
            hit_ratio: s.hit_ratio(),
            fetched_bytes: s.totals.fetched_bytes,
            fetches: s.totals.fetches,
            served_bytes: s.totals.served_bytes,
            prefetch_bytes: s.totals.prefetch_bytes,
            prefetch_used_bytes: s.totals.prefetch_used_bytes,
            prefetch_wasted_bytes: s
                .totals
                .prefetch_bytes
                .saturating_sub(s.totals.prefetch_used_bytes),
            demand_network_reads: s.totals.demand_network_reads,
            evicted_entries: s.store.evicted.entries,
            evicted_bytes: s.store.evicted.bytes,
            corrupt_entries: s.store.corrupt,
            read_chunk_bytes: s.totals.read_chunk_bytes,
            name_requests: s.totals.name_requests,
        }))
    }

    async fn cache_list(
        &self,
        _: Request<pb::CacheListRequest>,
    ) -> Result<Response<pb::CacheListResponse>, Status> {
        let layers = self.layers()?;
        let rows = blocking(move || layers.layers()).await?;
        Ok(Response::new(pb::CacheListResponse {
            layers: rows
                .into_iter()
                .map(|r| pb::LayerRow {
                    digest: r.digest,
                    references: r.references,
                    cached_bytes: r.cached_bytes,
                    layer_bytes: r.layer_bytes,
                    cached_chunks: r.cached_chunks,
                    total_chunks: r.total_chunks,
                    fetched_bytes: r.fetched_bytes,
                    fetched_chunks: r.fetched_chunks,
                    last_access_unix_ms: r.last_access_unix_ms,
                    trace_present: r.trace_present,
                    mounted: r.mounted,
                })
                .collect(),
        }))
    }

    async fn cache_evict(
        &self,
        request: Request<pb::CacheEvictRequest>,
    ) -> Result<Response<pb::CacheEvictResponse>, Status> {
        let layers = self.layers()?;
        let digest = request.into_inner().digest;
        require_digest(&digest)?;
        let evicted = layers
            .evict_layer(digest.clone())
            .await
            .map_err(|e| match e {
                LayerError::Unknown { .. } => Status::not_found(e.to_string()),
                e => Status::internal(crate::error_chain(&e)),
            })?;
        tracing::info!(layer = %digest, entries = evicted.entries, bytes = evicted.bytes, "evicted layer from the cache on request");
        Ok(Response::new(pb::CacheEvictResponse {
            evicted_entries: evicted.entries,
            evicted_bytes: evicted.bytes,
        }))
    }

    async fn cache_prune(
        &self,
        request: Request<pb::CachePruneRequest>,
    ) -> Result<Response<pb::CachePruneResponse>, Status> {
        let layers = self.layers()?;
        let target = request.into_inner().target_bytes;
        let (evicted, disk_used_bytes) = layers.prune(target).await;
        tracing::info!(
            target = ?target,
            entries = evicted.entries,
            bytes = evicted.bytes,
            "pruned the cache on request"
        );
        Ok(Response::new(pb::CachePruneResponse {
            evicted_entries: evicted.entries,
            evicted_bytes: evicted.bytes,
            disk_used_bytes,
        }))
    }

    async fn cache_verify(
        &self,
        _: Request<pb::CacheVerifyRequest>,
    ) -> Result<Response<pb::CacheVerifyResponse>, Status> {
        let layers = self.layers()?;
        let r = layers.verify_store().await;
        tracing::info!(
            chunks = r.chunks,
            corrupt = r.corrupt_chunks,
            dropped_files = r.dropped_files,
            "verified the local store on request"
        );
        Ok(Response::new(pb::CacheVerifyResponse {
            chunks: r.chunks,
            bytes: r.bytes,
            corrupt_chunks: r.corrupt_chunks,
            dropped_files: r.dropped_files,
            dropped_bytes: r.dropped_bytes,
        }))
    }

    async fn trace_list(
        &self,
        _: Request<pb::TraceListRequest>,
    ) -> Result<Response<pb::TraceListResponse>, Status> {
        let layers = self.layers()?;
        let traces = blocking(move || layers.traces().list()).await?;
        Ok(Response::new(pb::TraceListResponse {
            traces: traces.iter().map(summary).collect(),
        }))
    }

    async fn trace_show(
        &self,
        request: Request<pb::TraceShowRequest>,
    ) -> Result<Response<pb::TraceShowResponse>, Status> {
        let layers = self.layers()?;
        let digest = request.into_inner().digest;
        require_digest(&digest)?;
        let trace = blocking(move || layers.traces().get(&digest))
            .await?
            .map_err(trace_status)?;
        Ok(Response::new(pb::TraceShowResponse {
            summary: Some(summary(&trace)),
            entries: trace
                .entries
                .into_iter()
                .map(|e| pb::TraceEntry {
                    path: e.path,
                    offset: e.offset,
                    bytes: e.bytes,
                    since_mount_ms: e.since_mount_ms,
                })
                .collect(),
        }))
    }

    async fn trace_export(
        &self,
        request: Request<pb::TraceExportRequest>,
    ) -> Result<Response<pb::TraceExportResponse>, Status> {
        let layers = self.layers()?;
        let digest = request.into_inner().digest;
        require_digest(&digest)?;
        let document = blocking(move || layers.traces().export(&digest))
            .await?
            .map_err(trace_status)?;
        Ok(Response::new(pb::TraceExportResponse { document }))
    }

    async fn trace_import(
        &self,
        request: Request<pb::TraceImportRequest>,
    ) -> Result<Response<pb::TraceImportResponse>, Status> {
        let layers = self.layers()?;
        let document = request.into_inner().document;
        let trace = blocking(move || layers.traces().import(&document))
            .await?
            .map_err(trace_status)?;
        tracing::info!(layer = %trace.layer, entries = trace.entries.len(), "imported read trace");
        Ok(Response::new(pb::TraceImportResponse {
            summary: Some(summary(&trace)),
        }))
    }

    async fn mounts(
        &self,
        _: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let takeover = self.layers.as_ref().map(|l| {
            let t = l.takeover();
            pb::Takeover {
                fd_store: t.fd_store.to_owned(),
                connections: t.taken_over,
                dropped: t.dropped,
                duration_ms: t.duration_ms,
            }
        });
        let mounts = match self.layers.clone() {
            // Checking a mount is a stat or two through FUSE: off the async workers.
            Some(layers) => {
                blocking(move || {
                    layers.check_mounts();
                    layers.mounts()
                })
                .await?
            }
            None => Vec::new(),
        };
        Ok(Response::new(pb::MountsResponse {
            mounts: mounts
                .into_iter()
                .map(|m| pb::MountRow {
                    digest: m.digest,
                    reference: m.reference,
                    mountpoint: m.mountpoint.display().to_string(),
                    state: m.activity.as_str().into(),
                    mounted_unix_ms: m.mounted_unix_ms,
                    fetched_bytes: m.fetched_bytes,
                    served_bytes: m.served_bytes,
                    taken_over: m.taken_over,
                    verification: m.verification.into(),
                })
                .collect(),
            takeover,
        }))
    }
}
