//! Manifests, referrers and monolithic blob uploads (OCI distribution): what indexing an
//! image and finding the index of an image need beyond ranged blob reads. Reads go to the
//! hosts.toml mirrors first, as containerd's do: content by digest to any mirror that may
//! pull, tags and referrers listings only to those that may also resolve; uploads go to the
//! origin. Content fetched by digest is checked against that digest here (a mirror whose
//! bytes fail is passed over); what the documents mean is the caller's business.

use bytes::Bytes;
use futures_util::future::{Either, FutureExt as _};
use reqwest::header::{ACCEPT, CONTENT_TYPE, LOCATION};
use reqwest::{Method, StatusCode};
use sha2::{Digest as _, Sha256};

use super::{read_body, Attempt, BodyError, RegistryClient, RegistryError, Target};
use crate::registry::Reference;

/// A response's status, headers, final URL and body.
type Response = (StatusCode, reqwest::header::HeaderMap, reqwest::Url, Bytes);

/// The manifest media types asked for when resolving a reference.
pub const MANIFEST_TYPES: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// What a request sends and accepts besides the usual headers.
#[derive(Clone, Default)]
pub(super) struct Extra {
    pub push: bool,
    pub accept: Option<&'static str>,
    /// Content type and body.
    pub body: Option<(String, Bytes)>,
}

impl Extra {
    pub(super) fn apply(&self, mut request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        if let Some(accept) = self.accept {
            request = request.header(ACCEPT, accept);
        }
        if let Some((content_type, body)) = &self.body {
            request = request
                .header(CONTENT_TYPE, content_type.as_str())
                .body(body.clone());
        }
        request
    }
}

/// A manifest as the registry served it.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub media_type: String,
    /// `sha256:` of `bytes`.
    pub digest: String,
    pub bytes: Bytes,
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

impl RegistryClient {
    fn origin_target(
        &self,
        reference: &Reference,
        path: &str,
        extra: Extra,
    ) -> Result<Target, RegistryError> {
        let endpoints = self.hosts.endpoints(reference)?;
        let endpoint =
            endpoints
                .iter()
                .find(|e| e.is_origin)
                .ok_or_else(|| RegistryError::NoEndpoint {
                    digest: path.to_owned(),
                })?;
        Ok(Target {
            client: self.client_for(endpoint)?,
            url: format!("{}/{}/{path}", endpoint.base, reference.repository),
            host: endpoint.host().to_owned(),
            repository: reference.repository.clone(),
            headers: endpoint.headers.clone(),
            extra,
        })
    }

    /// One request under the retry policy; the response's status, headers and body (at
    /// most `limit` bytes).
    async fn call(
        &self,
        target: &Target,
        method: Method,
        limit: u64,
    ) -> Result<Response, RegistryError> {
        let deadline = std::time::Instant::now() + self.config.read_deadline;
        self.with_retries(&target.host, deadline, || {
            self.call_once(target, method.clone(), limit)
        })
        .await
    }

    /// One request, one attempt.
    async fn call_once(
        &self,
        target: &Target,
        method: Method,
        limit: u64,
    ) -> Result<Response, Attempt> {
        let mut response = self.send(target, method, None).await?;
        let status = response.status();
        let headers = response.headers().clone();
        let url = response.url().clone();
        let body = match read_body(&mut response, limit, &self.stats.bytes).await {
            Ok(body) => body,
            Err(BodyError::TooLarge) => {
                return Err(Attempt::Fatal(RegistryError::TooLarge {
                    host: target.host.clone(),
                    what: target.url.clone(),
                    limit,
                }))
            }
            Err(BodyError::Read(reason)) => {
                return Err(Attempt::Retry(format!("reading body: {reason}")))
            }
        };
        Ok((status, headers, url, body))
    }

    /// A GET of `path` in `reference`'s repository from its hosts.toml mirrors (those that
    /// may resolve tags, when `resolve`), then its origin; `check` refuses a body, and a
    /// mirror whose body it refuses is passed over like one that failed.
    async fn get_from_hosts<T>(
        &self,
        reference: &Reference,
        path: &str,
        extra: Extra,
        resolve: bool,
        limit: u64,
        check: impl Fn(&Target, Response) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let base_url = |e: &super::Endpoint| format!("{}/{}/{path}", e.base, reference.repository);
        let route = super::Route {
            what: path,
            url: &base_url,
            extra,
            resolve,
            not_found_is_an_answer: true,
        };
        let check = &check;
        self.on_route(reference, route, |target| async move {
            let response = self.call_once(&target, Method::GET, limit).await?;
            check(&target, response).map_err(Attempt::Fatal)
        })
        .await
    }

    /// The manifest `object` (a tag or digest) of `reference`'s repository, at most `limit`
    /// bytes; when `object` is a digest the bytes are checked against it.
    pub async fn get_manifest(
        &self,
        reference: &Reference,
        object: &str,
        limit: u64,
    ) -> Result<Manifest, RegistryError> {
        let extra = Extra {
            accept: Some(MANIFEST_TYPES),
            ..Extra::default()
        };
        let by_digest = object.starts_with("sha256:");
        self.get_from_hosts(
            reference,
            &format!("manifests/{object}"),
            extra,
            !by_digest,
            limit,
            |target, (_, headers, _, bytes)| {
                let digest = sha256_digest(&bytes);
                if by_digest && digest != object {
                    return Err(RegistryError::BadResponse {
                        host: target.host.clone(),
                        what: format!("manifest {object}"),
                        reason: format!("its bytes hash to {digest}"),
                    });
                }
                let media_type = headers
                    .get(CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .split(';')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_owned();
                Ok(Manifest {
                    media_type,
                    digest,
                    bytes,
                })
            },
        )
        .await
    }

    /// The referrers of manifest `digest` with `artifact_type`, as an image index: from the
    /// first host, mirrors first, that has them under the OCI 1.1 referrers API or, on a
    /// registry without that API, under the referrers tag schema's tag `fallback_tag`.
    /// Both are asked of one host before the next, so a mirror that keeps the index under the
    /// tag answers without the origin being asked. `None` when no host has either.
    pub async fn find_referrers(
        &self,
        reference: &Reference,
        digest: &str,
        artifact_type: &str,
        fallback_tag: &str,
        limit: u64,
    ) -> Result<Option<Bytes>, RegistryError> {
        let repository_url = |e: &super::Endpoint| format!("{}/{}/", e.base, reference.repository);
        let what = format!("referrers/{digest}");
        // No filter (an empty type) lists every referrer: the caller picks among types.
        let filtered = if artifact_type.is_empty() {
            what.clone()
        } else {
            format!("{what}?artifactType={artifact_type}")
        };
        let filtered = &filtered;
        // Listings, not content: only hosts that may resolve are asked.
        let route = super::Route {
            what: &what,
            url: &repository_url,
            extra: Extra::default(),
            resolve: true,
            not_found_is_an_answer: true,
        };
        let found = self
            .on_route(reference, route, |repository| async move {
                let api = Target {
                    url: format!("{}{filtered}", repository.url),
                    extra: Extra {
                        accept: Some("application/vnd.oci.image.index.v1+json"),
                        ..Extra::default()
                    },
                    ..repository.clone()
                };
                let tag = Target {
                    url: format!("{}manifests/{fallback_tag}", repository.url),
                    extra: Extra {
                        accept: Some(MANIFEST_TYPES),
                        ..Extra::default()
                    },
                    ..repository
                };
                let host = tag.host.clone();
                let note = |has_api: bool| {
                    self.referrers_api
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(host.clone(), has_api);
                };
                let known = self
                    .referrers_api
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&host)
                    .copied();
                match known {
                    Some(false) => {
                        let (_, _, _, bytes) = self.call_once(&tag, Method::GET, limit).await?;
                        Ok(bytes)
                    }
                    Some(true) => match self.call_once(&api, Method::GET, limit).await {
                        Ok((_, _, _, bytes)) => Ok(bytes),
                        // A registry with the API may still answer 404 for one repository
                        // (one served by another backend, say): the tag, as before.
                        Err(Attempt::Fatal(e)) if e.is_not_found() => {
                            let (_, _, _, bytes) = self.call_once(&tag, Method::GET, limit).await?;
                            Ok(bytes)
                        }
                        Err(e) => Err(e),
                    },
                    None => {
                        // The first lookup at this host asks both at once: without the API
                        // (404) the tag costs no second round trip, and with it the tag is
                        // one small request more, this once.
                        // An API that answers does not wait for the tag's request.
                        let listing = Box::pin(self.call_once(&api, Method::GET, limit));
                        let tagging = Box::pin(self.call_once(&tag, Method::GET, limit));
                        let (listed, tagging) =
                            match futures_util::future::select(listing, tagging).await {
                                Either::Left((listed, tagging)) => (listed, tagging.left_future()),
                                Either::Right((tagged, listing)) => (
                                    listing.await,
                                    futures_util::future::ready(tagged).right_future(),
                                ),
                            };
                        match listed {
                            Ok((_, _, _, bytes)) => {
                                note(true);
                                Ok(bytes)
                            }
                            Err(Attempt::Fatal(e)) if e.is_not_found() => {
                                note(false);
                                let (_, _, _, bytes) = tagging.await?;
                                Ok(bytes)
                            }
                            Err(e) => Err(e),
                        }
                    }
                }
            })
            .await;
        match found {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The whole blob `digest` (at most `limit` bytes), checked against its digest.
    pub async fn get_blob(
        &self,
        reference: &Reference,
        digest: &str,
        limit: u64,
    ) -> Result<Bytes, RegistryError> {
        self.get_from_hosts(
            reference,
            &format!("blobs/{digest}"),
            Extra::default(),
            false,
            limit,
            |target, (_, _, _, bytes)| {
                let actual = sha256_digest(&bytes);
                if actual != digest {
                    return Err(RegistryError::BadResponse {
                        host: target.host.clone(),
                        what: format!("blob {digest}"),
                        reason: format!("its bytes hash to {actual}"),
                    });
                }
                Ok(bytes)
            },
        )
        .await
    }

    /// Uploads `bytes` as a blob (one POST, one PUT) unless the repository has it; returns
    /// its digest.
    pub async fn push_blob(
        &self,
        reference: &Reference,
        bytes: Bytes,
    ) -> Result<String, RegistryError> {
        let digest = sha256_digest(&bytes);
        let push = Extra {
            push: true,
            ..Extra::default()
        };
        let head = self.origin_target(reference, &format!("blobs/{digest}"), push.clone())?;
        match self.call(&head, Method::HEAD, 0).await {
            Ok(_) => return Ok(digest),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
        let start = self.origin_target(reference, "blobs/uploads/", push)?;
        let (status, headers, url, _) = self.call(&start, Method::POST, 64 << 10).await?;
        let bad = |reason: String| RegistryError::BadResponse {
            host: start.host.clone(),
            what: format!("uploading blob {digest}"),
            reason,
        };
        if status != StatusCode::ACCEPTED {
            return Err(bad(format!("status {status} starting the upload")));
        }
        let location = headers
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| bad("no Location for the upload".into()))?;
        let mut upload = url
            .join(location)
            .map_err(|e| bad(format!("upload location {location:?}: {e}")))?;
        upload.query_pairs_mut().append_pair("digest", &digest);
        let put = Target {
            url: upload.to_string(),
            extra: Extra {
                push: true,
                accept: None,
                body: Some(("application/octet-stream".into(), bytes)),
            },
            ..start.clone()
        };
        let (status, _, _, _) = self.call(&put, Method::PUT, 64 << 10).await?;
        if status != StatusCode::CREATED {
            return Err(bad(format!("status {status} finishing the upload")));
        }
        Ok(digest)
    }

    /// Stores a manifest under `object` (a tag, or its digest).
    pub async fn put_manifest(
        &self,
        reference: &Reference,
        object: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<String, RegistryError> {
        let digest = sha256_digest(&bytes);
        let extra = Extra {
            push: true,
            accept: None,
            body: Some((media_type.to_owned(), bytes)),
        };
        let target = self.origin_target(reference, &format!("manifests/{object}"), extra)?;
        let (status, _, _, _) = self.call(&target, Method::PUT, 64 << 10).await?;
        if status != StatusCode::CREATED && !status.is_success() {
            return Err(RegistryError::BadResponse {
                host: target.host,
                what: format!("manifest {object}"),
                reason: format!("status {status}"),
            });
        }
        Ok(digest)
    }
}
