//! The operator commands' side of the control API: connects to the daemon's control socket,
//! makes one call on a small runtime and turns transport failures and gRPC statuses into
//! messages an operator can act on. It knows the socket and the generated client, nothing of
//! how answers are shown (that is `output` and each command).

use std::future::Future;
use std::io;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Response, Status};

use lazysnap::grpc::proto::control::control_client::ControlClient;

pub type Client = ControlClient<Channel>;

/// A local socket answers at once or not at all; this only bounds a daemon that accepted the
/// connection but hangs.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to `socket` and makes the single call `rpc`, returning its message.
pub fn call<T, F, Fut>(socket: &Path, rpc: F) -> anyhow::Result<T>
where
    F: FnOnce(Client) -> Fut,
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    // One short request per invocation: a current-thread runtime starts no worker threads and
    // there is nothing to run in parallel.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start tokio runtime")?;
    runtime.block_on(async {
        let client = connect(socket).await?;
        let response = rpc(client)
            .await
            .map_err(|status| status_error(socket, &status))?;
        Ok(response.into_inner())
    })
}

/// Opens a channel to the control socket; fails with a message naming the socket.
pub async fn connect(socket: &Path) -> anyhow::Result<Client> {
    // tonic 0.14 dials `unix://PATH` itself, so no hand-written connector is needed; the price is
    // that the path must be UTF-8. `unix://` (not `unix:`) keeps a path starting with `//` intact.
    let path = socket.to_str().with_context(|| {
        format!(
            "control socket path {} is not valid UTF-8",
            socket.display()
        )
    })?;
    let endpoint = Endpoint::from_shared(format!("unix://{path}"))
        .with_context(|| format!("invalid control socket path {}", socket.display()))?
        .connect_timeout(CONNECT_TIMEOUT);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| unreachable_error(socket, &e))?;
    Ok(ControlClient::new(channel))
}

/// `cannot reach the lazysnap daemon at SOCKET: REASON (HINT)`, with the operating system's
/// reason when there is one rather than tonic's "transport error".
fn unreachable_error(socket: &Path, error: &(dyn std::error::Error + 'static)) -> anyhow::Error {
    let io_error = error_chain(error).find_map(|e| e.downcast_ref::<io::Error>());
    let (reason, hint) = match io_error {
        Some(e) => (os_message(e), hint(e.kind())),
        None => (
            error_chain(error)
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(": "),
            hint(io::ErrorKind::Other),
        ),
    };
    anyhow!(
        "cannot reach the lazysnap daemon at {}: {reason} ({hint})",
        socket.display()
    )
}

fn error_chain<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(error), |e| e.source())
}

fn hint(kind: io::ErrorKind) -> &'static str {
    match kind {
        io::ErrorKind::PermissionDenied => {
            "the control socket is not open to this user; try with sudo"
        }
        io::ErrorKind::TimedOut => "is the daemon stuck? see its log",
        _ => "is `lazysnap serve` running?",
    }
}

/// The operating system's text without Rust's " (os error N)" suffix.
fn os_message(error: &io::Error) -> String {
    let text = error.to_string();
    match (error.raw_os_error(), text.rfind(" (os error ")) {
        (Some(_), Some(at)) => text[..at].to_owned(),
        _ => text,
    }
}

/// The daemon's own message is meant for the operator (`no trace for layer sha256:…`), so it is
/// shown as it is; only a status without one, or a service the socket does not serve at all,
/// gets words from here.
fn status_error(socket: &Path, status: &Status) -> anyhow::Error {
    let message = status.message();
    match status.code() {
        Code::Unimplemented if message.is_empty() => anyhow!(
            "{} does not serve lazysnap's control API (is it the containerd socket, or an older \
             lazysnap?)",
            socket.display()
        ),
        code if message.is_empty() => anyhow!("the daemon failed: {}", code.description()),
        _ => anyhow!("{message}"),
    }
}

#[cfg(test)]
mod tests {
    use tonic::Request;

    use lazysnap::grpc::proto::control::control_server::{Control, ControlServer};
    use lazysnap::grpc::proto::control::*;

    use super::*;

    #[test]
    fn os_message_drops_the_errno_suffix() {
        let e = io::Error::from_raw_os_error(2);
        let text = os_message(&e);
        assert!(!text.contains("os error"), "{text}");
        assert!(!text.is_empty());
        let custom = io::Error::other("custom (os error 3)");
        assert_eq!(os_message(&custom), "custom (os error 3)");
    }

    #[test]
    fn status_message_is_shown_as_is() {
        let socket = Path::new("/run/lazysnap/control.sock");
        let e = status_error(socket, &Status::not_found("no trace for layer sha256:abc"));
        assert_eq!(e.to_string(), "no trace for layer sha256:abc");
        let e = status_error(socket, &Status::unimplemented(""));
        assert!(e.to_string().contains("/run/lazysnap/control.sock"), "{e}");
        let e = status_error(socket, &Status::internal(""));
        assert!(e.to_string().starts_with("the daemon failed: "), "{e}");
    }

    /// A daemon stand-in: fixed answers, and `NotFound` for any trace but `sha256:abc`.
    struct FakeControl;

    #[tonic::async_trait]
    impl Control for FakeControl {
        async fn cache_stats(
            &self,
            _: Request<CacheStatsRequest>,
        ) -> Result<Response<CacheStatsResponse>, Status> {
            Ok(Response::new(CacheStatsResponse {
                disk_used_bytes: 123,
                ..Default::default()
            }))
        }
        async fn cache_list(
            &self,
            _: Request<CacheListRequest>,
        ) -> Result<Response<CacheListResponse>, Status> {
            Ok(Response::new(CacheListResponse::default()))
        }
        async fn cache_evict(
            &self,
            _: Request<CacheEvictRequest>,
        ) -> Result<Response<CacheEvictResponse>, Status> {
            Ok(Response::new(CacheEvictResponse::default()))
        }
        async fn cache_prune(
            &self,
            request: Request<CachePruneRequest>,
        ) -> Result<Response<CachePruneResponse>, Status> {
            Ok(Response::new(CachePruneResponse {
                disk_used_bytes: request.into_inner().target_bytes.unwrap_or(7),
                ..Default::default()
            }))
        }
        async fn cache_verify(
            &self,
            _: Request<CacheVerifyRequest>,
        ) -> Result<Response<CacheVerifyResponse>, Status> {
            Ok(Response::new(CacheVerifyResponse::default()))
        }
        async fn trace_list(
            &self,
            _: Request<TraceListRequest>,
        ) -> Result<Response<TraceListResponse>, Status> {
            Ok(Response::new(TraceListResponse::default()))
        }
        async fn trace_show(
            &self,
            request: Request<TraceShowRequest>,
        ) -> Result<Response<TraceShowResponse>, Status> {
            let digest = request.into_inner().digest;
            if digest != "sha256:abc" {
                return Err(Status::not_found(format!("no trace for layer {digest}")));
            }
            Ok(Response::new(TraceShowResponse::default()))
        }
        async fn trace_export(
            &self,
            _: Request<TraceExportRequest>,
        ) -> Result<Response<TraceExportResponse>, Status> {
            Ok(Response::new(TraceExportResponse::default()))
        }
        async fn trace_import(
            &self,
            _: Request<TraceImportRequest>,
        ) -> Result<Response<TraceImportResponse>, Status> {
            Ok(Response::new(TraceImportResponse::default()))
        }
        async fn mounts(
            &self,
            _: Request<MountsRequest>,
        ) -> Result<Response<MountsResponse>, Status> {
            Ok(Response::new(MountsResponse::default()))
        }
    }

    #[test]
    fn calls_reach_a_daemon_on_the_socket_and_its_errors_come_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("control.sock");
        // The fake serves from its own thread and runtime, as the daemon would from its process;
        // `call` builds a runtime of its own and must not run inside another.
        let server = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let listener = server
            .block_on(async { tokio::net::UnixListener::bind(&socket) })
            .expect("bind");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = std::thread::spawn(move || {
            server.block_on(
                tonic::transport::Server::builder()
                    .add_service(ControlServer::new(FakeControl))
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::UnixListenerStream::new(listener),
                        async {
                            let _ = stopped.await;
                        },
                    ),
            )
        });

        let stats = call(&socket, |mut c| async move {
            c.cache_stats(CacheStatsRequest {}).await
        })
        .expect("cache stats");
        assert_eq!(stats.disk_used_bytes, 123);
        let pruned = call(&socket, |mut c| async move {
            c.cache_prune(CachePruneRequest {
                target_bytes: Some(0),
            })
            .await
        })
        .expect("cache prune");
        assert_eq!(pruned.disk_used_bytes, 0);
        let e = call(&socket, |mut c| async move {
            c.trace_show(TraceShowRequest {
                digest: "sha256:def".to_owned(),
            })
            .await
        })
        .expect_err("unknown trace");
        assert_eq!(e.to_string(), "no trace for layer sha256:def");

        let _ = stop.send(());
        serving.join().expect("server thread").expect("serve");
    }

    #[test]
    fn missing_socket_is_named_in_the_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("control.sock");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let e = runtime
            .block_on(connect(&socket))
            .expect_err("connect to a missing socket fails");
        let text = e.to_string();
        assert!(
            text.starts_with(&format!(
                "cannot reach the lazysnap daemon at {}: ",
                socket.display()
            )),
            "{text}"
        );
        assert!(text.contains("No such file or directory"), "{text}");
        assert!(text.contains("lazysnap serve"), "{text}");
    }
}
