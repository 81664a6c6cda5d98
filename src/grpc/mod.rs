//! The daemon's gRPC surface: containerd's Snapshots service (proxy plugin) on a Unix socket,
//! lazysnap's control API for the CLI on another, and optionally the CRI image service it
//! fronts for the kubelet. Protobuf types stop at `convert`, `control` and `cri_proxy`;
//! everything below speaks domain types.

mod control;
mod convert;
mod cri_proxy;
mod peer;
pub mod proto;
mod snapshots;
mod status;

use std::future::Future;
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::StreamExt;

pub use control::ControlService;
pub use cri_proxy::CriImageProxy;
pub use peer::ControlAccess;
pub use snapshots::SnapshotsService;

use crate::snapshot::Snapshotter;
use proto::control::control_server::ControlServer;
use proto::snapshots::snapshots_server::SnapshotsServer;

/// Serves the Snapshots service on `listener` until `shutdown` resolves; in-flight calls are
/// allowed to finish.
pub async fn serve(
    snapshotter: Arc<Snapshotter>,
    listener: UnixListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(SnapshotsServer::new(SnapshotsService::new(snapshotter)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
}

/// Serves the control API on `listener` until `shutdown` resolves, to the callers `access`
/// admits: each connection's peer is checked as it is accepted, and every request on a refused
/// connection is answered `PermissionDenied`.
pub async fn serve_control(
    control: ControlService,
    access: ControlAccess,
    listener: UnixListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let incoming =
        UnixListenerStream::new(listener).map(move |accepted| accepted.map(|s| access.check(s)));
    tonic::transport::Server::builder()
        .add_service(ControlServer::with_interceptor(control, peer::interceptor))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// Serves the CRI image service proxy on `listener` until `shutdown` resolves.
pub async fn serve_cri(
    proxy: CriImageProxy,
    listener: UnixListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(proxy)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
}
