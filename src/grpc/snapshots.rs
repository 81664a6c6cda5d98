//! containerd's Snapshots service, a thin tonic wrapper over `Snapshotter`. Every call runs on
//! the blocking pool: snapshot operations do synchronous file-system and database work that must
//! not stall the runtime's workers.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::convert;
use super::proto::snapshots::{self as pb, snapshots_server::Snapshots};
use crate::snapshot::{SnapshotError, Snapshotter};

/// How many infos go into one List response message; keeps messages far below gRPC's 4 MiB
/// default limit even with many labels.
const LIST_BATCH: usize = 100;

/// The gRPC face of a `Snapshotter`.
pub struct SnapshotsService {
    snapshotter: Arc<Snapshotter>,
}

impl SnapshotsService {
    pub fn new(snapshotter: Arc<Snapshotter>) -> Self {
        SnapshotsService { snapshotter }
    }

    async fn run<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Snapshotter) -> Result<T, SnapshotError> + Send + 'static,
    ) -> Result<T, Status> {
        let snapshotter = Arc::clone(&self.snapshotter);
        tokio::task::spawn_blocking(move || op(&snapshotter))
            .await
            .map_err(|e| Status::internal(format!("snapshot operation panicked: {e}")))?
            .map_err(Status::from)
    }
}

type ListStream = Pin<Box<dyn Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for SnapshotsService {
    async fn prepare(
        &self,
        request: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        tracing::debug!(key = %r.key, parent = %r.parent, labels = ?r.labels, "prepare");
        let mounts = self
            .run(move |s| {
                s.prepare(
                    &r.key,
                    convert::parent(&r.parent),
                    convert::labels(r.labels),
                )
            })
            .await?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: convert::mounts(mounts),
        }))
    }

    async fn view(
        &self,
        request: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        tracing::debug!(key = %r.key, parent = %r.parent, "view");
        let mounts = self
            .run(move |s| {
                s.view(
                    &r.key,
                    convert::parent(&r.parent),
                    convert::labels(r.labels),
                )
            })
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: convert::mounts(mounts),
        }))
    }

    async fn mounts(
        &self,
        request: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let key = request.into_inner().key;
        let mounts = self.run(move |s| s.mounts(&key)).await?;
        Ok(Response::new(pb::MountsResponse {
            mounts: convert::mounts(mounts),
        }))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        tracing::debug!(key = %r.key, name = %r.name, "commit");
        self.run(move |s| s.commit(&r.name, &r.key, convert::labels(r.labels)))
            .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let key = request.into_inner().key;
        tracing::debug!(%key, "remove");
        self.run(move |s| s.remove(&key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let key = request.into_inner().key;
        let info = self.run(move |s| s.stat(&key)).await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(convert::info(info)),
        }))
    }

    async fn update(
        &self,
        request: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let info = convert::update_info(r.info)?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let info = self.run(move |s| s.update(&info, &paths)).await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(convert::info(info)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let filters = request.into_inner().filters;
        // Collected before streaming: the store is read in one snapshot and released, so a Stat
        // or Prepare containerd issues while consuming the stream can never wait on it.
        let infos = self.run(move |s| s.list(&filters)).await?;
        let batches: Vec<Result<pb::ListSnapshotsResponse, Status>> = infos
            .chunks(LIST_BATCH)
            .map(|batch| {
                Ok(pb::ListSnapshotsResponse {
                    info: batch.iter().cloned().map(convert::info).collect(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        request: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let key = request.into_inner().key;
        let usage = self.run(move |s| s.usage(&key)).await?;
        Ok(Response::new(pb::UsageResponse {
            size: usage.size,
            inodes: usage.inodes,
        }))
    }

    async fn cleanup(&self, _request: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        self.run(|s| s.cleanup()).await?;
        Ok(Response::new(()))
    }
}
