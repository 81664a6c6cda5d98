//! The snapshotter's error type. Each variant corresponds to one of the gRPC codes containerd
//! acts upon (the mapping lives in `grpc::status`), and every message names the key involved.

use std::path::PathBuf;

/// Everything a snapshot operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {key:?} not found")]
    NotFound { key: String },
    #[error("parent snapshot {parent:?} of {key:?} not found")]
    ParentNotFound { key: String, parent: String },
    #[error("snapshot {key:?} already exists")]
    AlreadyExists { key: String },
    #[error("parent snapshot {parent:?} of {key:?} is not committed")]
    ParentNotCommitted { key: String, parent: String },
    #[error("snapshot {key:?} is not active and cannot be committed")]
    NotActive { key: String },
    #[error("cannot remove snapshot {key:?}: it has child snapshots")]
    HasChildren { key: String },
    #[error("cannot update field {field:?} of snapshot {key:?}")]
    ImmutableField { key: String, field: String },
    #[error("invalid snapshot key: {reason}")]
    InvalidKey { reason: &'static str },
    #[error("invalid filter {filter:?}: {reason}")]
    InvalidFilter { filter: String, reason: String },
    #[error("lazy layer of snapshot id {id} could not be mounted after a restart; remove the image and pull it again")]
    LayerUnavailable { id: u64 },
    #[error("lazy layer {layer} of snapshot {key:?} at {} died and could not be mounted again ({cause}); remove the image and pull it again if this persists", mountpoint.display())]
    LayerDead {
        key: String,
        layer: String,
        mountpoint: PathBuf,
        cause: String,
        #[source]
        source: Box<crate::snapshot::RemoteError>,
    },
    #[error("metadata store")]
    Store(#[from] crate::snapshot::store::StoreError),
    #[error("{action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl SnapshotError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| SnapshotError::Io {
            action,
            path,
            source,
        }
    }
}
