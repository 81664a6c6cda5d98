//! Maps snapshot errors to the gRPC codes containerd branches on (`errdefs.FromGRPC`): NotFound,
//! AlreadyExists, FailedPrecondition and InvalidArgument change what containerd does next, so
//! each variant maps on its own; everything else is Internal and logged here.

use tonic::Status;

use crate::snapshot::SnapshotError;

impl From<SnapshotError> for Status {
    fn from(e: SnapshotError) -> Self {
        // Status carries no source chain: the whole chain goes into the message.
        let message = crate::error_chain(&e);
        match e {
            SnapshotError::NotFound { .. } | SnapshotError::ParentNotFound { .. } => {
                Status::not_found(message)
            }
            SnapshotError::AlreadyExists { .. } => Status::already_exists(message),
            SnapshotError::NotActive { .. } | SnapshotError::HasChildren { .. } => {
                Status::failed_precondition(message)
            }
            SnapshotError::ParentNotCommitted { .. }
            | SnapshotError::ImmutableField { .. }
            | SnapshotError::InvalidKey { .. }
            | SnapshotError::InvalidFilter { .. } => Status::invalid_argument(message),
            SnapshotError::LayerUnavailable { .. } | SnapshotError::LayerDead { .. } => {
                Status::unavailable(message)
            }
            SnapshotError::Io { ref source, .. }
                if source.raw_os_error() == Some(nix::libc::ENOSPC) =>
            {
                tracing::error!(error = %message, "snapshot operation failed: disk full");
                Status::resource_exhausted(message)
            }
            SnapshotError::Io { .. } | SnapshotError::Store(_) => {
                tracing::error!(error = %message, "snapshot operation failed");
                Status::internal(message)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn codes_containerd_depends_on() {
        let code = |e: SnapshotError| Status::from(e).code();
        assert_eq!(
            code(SnapshotError::NotFound { key: "k".into() }),
            Code::NotFound
        );
        assert_eq!(
            code(SnapshotError::AlreadyExists { key: "k".into() }),
            Code::AlreadyExists
        );
        assert_eq!(
            code(SnapshotError::HasChildren { key: "k".into() }),
            Code::FailedPrecondition
        );
        assert_eq!(
            code(SnapshotError::NotActive { key: "k".into() }),
            Code::FailedPrecondition
        );
        assert_eq!(
            code(SnapshotError::ParentNotCommitted {
                key: "k".into(),
                parent: "p".into()
            }),
            Code::InvalidArgument
        );
        let full = SnapshotError::Io {
            action: "write",
            path: "/x".into(),
            source: std::io::Error::from_raw_os_error(nix::libc::ENOSPC),
        };
        assert_eq!(code(full), Code::ResourceExhausted);
    }
}
