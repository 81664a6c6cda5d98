//! The CRI image service, fronted for the kubelet: every `runtime.v1.ImageService` call is
//! forwarded to containerd's CRI unchanged, as raw protobuf bytes, so no field is lost whatever
//! CRI version the two ends speak. Only `PullImage` is looked into: the pull secret the kubelet
//! sends with it is kept, in memory only, as the credentials of that image's repository, so
//! that lazysnap can fetch the layers of private images lazily too. This is what
//! stargz-snapshotter's CRI keychain does; the kubelet is pointed at this socket with
//! `--image-service-endpoint`.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::Engine as _;
use bytes::{Buf, BufMut, Bytes};
use prost::Message as _;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{http, BoxFuture, Service};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use super::proto::cri;
use crate::registry::{Credentials, Reference, RegistryClient, Secret};

/// The gRPC service name the kubelet calls.
const SERVICE: &str = "runtime.v1.ImageService";

/// Forwards the CRI image service to containerd.
#[derive(Clone)]
pub struct CriImageProxy {
    upstream: Channel,
    registry: RegistryClient,
}

impl CriImageProxy {
    /// A proxy to containerd's CRI at `containerd` (a Unix socket). The connection is made
    /// lazily, so lazysnap may start before containerd.
    pub fn new(containerd: &Path, registry: RegistryClient) -> Result<Self, Status> {
        let path = containerd.to_str().ok_or_else(|| {
            Status::invalid_argument(format!("{} is not UTF-8", containerd.display()))
        })?;
        let upstream = Endpoint::from_shared(format!("unix://{path}"))
            .map_err(|e| Status::invalid_argument(format!("containerd address {path}: {e}")))?
            .connect_lazy();
        Ok(CriImageProxy { upstream, registry })
    }

    /// Keeps the credentials of a `PullImage` request for the image's repository; returns the
    /// image it names.
    fn note_credentials(&self, request: &Bytes) -> Option<String> {
        let pull = cri::PullImageRequest::decode(request.clone()).ok()?;
        let image = pull.image.map(|i| i.image)?;
        let Some(credentials) = pull.auth.as_ref().and_then(credentials_of) else {
            return Some(image);
        };
        match Reference::parse(&image) {
            Ok(reference) => {
                tracing::info!(image = %image, user = %credentials.username, "pull credentials given through CRI kept for the image's repository");
                self.registry
                    .set_repository_credentials(&reference, credentials);
            }
            Err(e) => {
                tracing::warn!(error = %e, "CRI pull of an image reference lazysnap cannot parse")
            }
        }
        Some(image)
    }

    async fn forward(
        &self,
        path: &str,
        request: Request<Bytes>,
    ) -> Result<Response<Bytes>, Status> {
        let pulling = if path.ends_with("/PullImage") {
            self.note_credentials(request.get_ref())
        } else {
            None
        };
        let mut client = tonic::client::Grpc::new(self.upstream.clone());
        client
            .ready()
            .await
            .map_err(|e| Status::unavailable(format!("containerd's CRI is not reachable: {e}")))?;
        let path = http::uri::PathAndQuery::try_from(path)
            .map_err(|e| Status::internal(format!("method path {path:?}: {e}")))?;
        let result = client.unary(request, path, RawCodec).await;
        match pulling {
            Some(image) => result.map_err(|status| explain_pull_failure(status, &image)),
            None => result,
        }
    }
}

/// containerd reports a refused pull secret as a registry status deep in its message; a
/// kubelet's user should read at once that authentication failed, and for which image.
fn explain_pull_failure(status: Status, image: &str) -> Status {
    let message = status.message().to_ascii_lowercase();
    let refused = status.code() == tonic::Code::Unauthenticated
        || message.contains("401 unauthorized")
        || message.contains("403 forbidden")
        || message.contains("authorization failed");
    if refused {
        Status::unauthenticated(format!(
            "authentication failed pulling {image}: {}",
            status.message()
        ))
    } else {
        status
    }
}

/// The credentials in a CRI `AuthConfig`: a username and password, given as such or as a
/// docker-style `auth` field. Tokens (`identity_token`, `registry_token`) are not used by
/// lazysnap; containerd still gets them.
fn credentials_of(auth: &cri::AuthConfig) -> Option<Credentials> {
    let (username, password) = if !auth.username.is_empty() {
        (auth.username.clone(), auth.password.clone())
    } else if !auth.auth.is_empty() {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.auth.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (user, pass) = text.split_once(':')?;
        (user.to_owned(), pass.to_owned())
    } else {
        return None;
    };
    Some(Credentials {
        username,
        password: Secret(password),
    })
}

impl tonic::server::NamedService for CriImageProxy {
    const NAME: &'static str = SERVICE;
}

impl<B> Service<http::Request<B>> for CriImageProxy
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = Method {
            proxy: Arc::new(self.clone()),
            path: request.uri().path().to_owned(),
        };
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawCodec);
            Ok(grpc.unary(method, request).await)
        })
    }
}

/// One forwarded call.
struct Method {
    proxy: Arc<CriImageProxy>,
    path: String,
}

impl tonic::server::UnaryService<Bytes> for Method {
    type Response = Bytes;
    type Future = BoxFuture<Response<Bytes>, Status>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        let (proxy, path) = (self.proxy.clone(), self.path.clone());
        Box::pin(async move { proxy.forward(&path, request).await })
    }
}

/// Passes message bytes through untouched.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        let len = src.remaining();
        Ok(Some(src.copy_to_bytes(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_from_fields_or_docker_auth() {
        let plain = cri::AuthConfig {
            username: "u".into(),
            password: "p".into(),
            ..Default::default()
        };
        let c = credentials_of(&plain).expect("plain");
        assert_eq!((c.username.as_str(), c.password.0.as_str()), ("u", "p"));
        let encoded = cri::AuthConfig {
            auth: base64::engine::general_purpose::STANDARD.encode("user:pa:ss"),
            ..Default::default()
        };
        let c = credentials_of(&encoded).expect("auth field");
        assert_eq!(
            (c.username.as_str(), c.password.0.as_str()),
            ("user", "pa:ss")
        );
        assert!(credentials_of(&cri::AuthConfig::default()).is_none());
        let garbage = cri::AuthConfig {
            auth: "%%%".into(),
            ..Default::default()
        };
        assert!(credentials_of(&garbage).is_none());
    }

    #[test]
    fn credentials_never_print() {
        let c = credentials_of(&cri::AuthConfig {
            username: "u".into(),
            password: "hunter2".into(),
            ..Default::default()
        })
        .expect("creds");
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
