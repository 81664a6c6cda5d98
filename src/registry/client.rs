//! HTTP against registries. `try_*` functions make one attempt; `with_retries` is the one
//! place that decides what is retried (connection errors, timeouts, 429 and 5xx), with
//! exponential backoff and jitter, and never past the caller's deadline, so a read of an
//! unreachable registry fails within a bounded time instead of hanging a container.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_RANGE, RANGE, WWW_AUTHENTICATE};
use reqwest::StatusCode;

use super::auth::{Challenge, Credentials, Secret};
use super::bounded::BoundedMap;
use super::hosts::{self, Endpoint, HostsCache, HostsError};
use super::reference::Reference;

/// Client settings.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// One HTTP attempt (connect + response) may take this long.
    pub request_timeout: Duration,
    /// A whole read, retries included, may take this long.
    pub read_deadline: Duration,
    /// Docker `config.json` whose `auths` supply credentials per host.
    pub docker_config: Option<PathBuf>,
    /// containerd-style hosts directory (`<dir>/<host>/hosts.toml`) naming mirrors.
    pub hosts_dir: Option<PathBuf>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            request_timeout: Duration::from_secs(10),
            read_deadline: Duration::from_secs(30),
            docker_config: None,
            hosts_dir: None,
        }
    }
}

/// Why a registry request failed. Messages name host, digest and range, never secrets or URL
/// query strings (signed blob URLs carry their credentials there). A cause is chained as the
/// `source()`, never repeated in the message, so printing the chain shows it once. Clone,
/// because one failed fetch is handed to every reader waiting for it; non-Clone causes are
/// behind `Arc`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    #[error("authentication failed at {host}: {reason}")]
    Unauthorized { host: String, reason: String },
    #[error("{what} not found at {host}")]
    NotFound { host: String, what: String },
    #[error("registry {host} unavailable after {attempts} attempts within {deadline:?}: {last}")]
    Unavailable {
        host: String,
        attempts: u32,
        deadline: Duration,
        /// The last attempt's failure, already stripped of URL query strings.
        last: String,
    },
    #[error("registry {host} sent a bad answer for {what}: {reason}")]
    BadResponse {
        host: String,
        what: String,
        reason: String,
    },
    /// The answer was (or announced it would be) longer than asked for or allowed; reading
    /// stopped there instead of buffering it.
    #[error("registry {host} sent more than {limit} bytes for {what}")]
    TooLarge {
        host: String,
        what: String,
        limit: u64,
    },
    #[error("cannot build the http client")]
    HttpClient {
        #[source]
        source: Arc<reqwest::Error>,
    },
    #[error("cannot read CA file {}", path.display())]
    CaFile {
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    #[error("CA file {} holds no usable PEM certificate", path.display())]
    CaCertificate {
        path: PathBuf,
        /// None when the file parsed but held no certificate at all.
        #[source]
        source: Option<Arc<reqwest::Error>>,
    },
    /// Transparent: the hosts error already names the file (and so the registry host), and
    /// callers that flatten errors to one line keep its reason.
    #[error(transparent)]
    Hosts(#[from] HostsError),
    #[error("no host left to read {digest} from")]
    NoEndpoint { digest: String },
}

impl RegistryError {
    /// The registry (or every mirror and then the origin) does not have what was asked for.
    pub fn is_not_found(&self) -> bool {
        matches!(self, RegistryError::NotFound { .. })
    }

    /// The registry refused the credentials, or none were configured for it.
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, RegistryError::Unauthorized { .. })
    }
}

/// Counters of everything the client did.
#[derive(Debug, Default)]
pub struct RegistryStats {
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
    pub retries: AtomicU64,
}

/// One attempt's failure: retried or final.
enum Attempt {
    Retry(String),
    Fatal(RegistryError),
}

/// Bearer tokens by (host, scope), until their expiry.
type TokenCache = BoundedMap<(String, String), Secret>;
/// HTTP clients by TLS settings (skip_verify, extra CAs) of hosts.toml entries.
type ClientCache = HashMap<(bool, Vec<PathBuf>), reqwest::Client>;

/// How long a blob's redirected URL (usually a signed object-storage URL) is reused; such URLs
/// typically live 10 to 20 minutes, and a failure drops it earlier.
const REDIRECT_REUSE: Duration = Duration::from_secs(5 * 60);

// Caps on what the client remembers. A long-lived daemon sees an unbounded stream of digests
// and repositories; these maps are caches, so past the cap the expired and then the
// soonest-expiring entries go (see `bounded`), costing a round trip or a log line again.
/// Redirected blob URLs remembered (one per blob being read, URLs of a few hundred bytes).
const MAX_REDIRECTS: usize = 4096;
/// (blob, mirror) fallbacks already logged.
const MAX_FALLBACKS_LOGGED: usize = 4096;
/// How long a logged fallback stays quiet: once per blob and mirror in practice, yet a mirror
/// that keeps failing for the same blob shows up again in the logs after a while.
const FALLBACK_LOG_QUIET: Duration = Duration::from_secs(60 * 60);
/// Bearer tokens (one per host and repository).
const MAX_TOKENS: usize = 1024;
/// Mirrors marked down (hosts named in hosts.toml, so few).
const MAX_MIRRORS_DOWN: usize = 1024;

/// The most a token endpoint's answer may be. Real ones are a few kilobytes (a JWT and some
/// fields); anything near this is broken or hostile and is refused rather than buffered.
const MAX_TOKEN_BODY: u64 = 1024 * 1024;
/// The most of an answer to [`RegistryClient::open_connection`] read to keep its connection.
const WARM_UP_BODY: usize = 16 * 1024;

/// What a walk over a repository's hosts asks each of them for.
struct Route<'a> {
    /// The resource, for logs: a blob digest or a manifest path.
    what: &'a str,
    /// Its URL on an endpoint.
    url: &'a (dyn Fn(&Endpoint) -> String + Sync),
    extra: oci::Extra,
    /// Only hosts that may resolve tags (a tag, a referrers listing): content by digest can be
    /// checked, what a name points at cannot.
    resolve: bool,
    /// A mirror's 404 is an answer about the resource, not a failure of the mirror: the next
    /// host is asked, and the mirror stays in use.
    not_found_is_an_answer: bool,
}

/// Where one attempt goes: an endpoint's client, URL and identity.
#[derive(Clone)]
struct Target {
    client: reqwest::Client,
    url: String,
    host: String,
    repository: String,
    headers: Vec<(String, String)>,
    /// Manifest and upload requests: what they send and accept, and whether they push.
    extra: oci::Extra,
}

#[path = "oci.rs"]
pub mod oci;

/// A shared client: one connection pool, one token cache.
#[derive(Clone)]
pub struct RegistryClient {
    http: reqwest::Client,
    config: RegistryConfig,
    /// (host, scope) → bearer token, until its expiry.
    tokens: Arc<Mutex<TokenCache>>,
    credentials: Arc<Mutex<HashMap<String, Credentials>>>,
    /// (host, repository) → credentials given for images of that repository (a kubelet's pull
    /// secret, through the CRI image proxy); held in memory only and preferred to `credentials`.
    repository_credentials: Arc<Mutex<HashMap<(String, String), Credentials>>>,
    stats: Arc<RegistryStats>,
    clients: Arc<Mutex<ClientCache>>,
    /// digest → final URL after redirects, until it is too old to trust.
    redirects: Arc<Mutex<BoundedMap<String, String>>>,
    /// (digest, mirror) pairs whose fallback was logged, so a layer logs it once, not per chunk.
    fallbacks_logged: Arc<Mutex<BoundedMap<(String, String), ()>>>,
    /// Mirrors that failed, skipped until their expiry, so a mirror that hangs costs one read
    /// a timeout, not every read.
    mirrors_down: Arc<Mutex<BoundedMap<String, ()>>>,
    /// Hosts that asked for basic auth: later requests send it up front instead of paying a
    /// 401 round trip each.
    basic_hosts: Arc<Mutex<HashSet<String>>>,
    /// Hosts whose OCI referrers API answered (true) or answered 404, i.e. they have none
    /// (false): a referrers lookup there asks the API alone, or the referrers tag alone.
    referrers_api: Arc<Mutex<HashMap<String, bool>>>,
    /// Parsed hosts.toml per registry host, so a chunk read does not read and parse the file.
    hosts: Arc<HostsCache>,
}

/// How long a failed mirror is skipped before it is tried again.
const MIRROR_RETRY_AFTER: Duration = Duration::from_secs(30);

impl RegistryClient {
    pub fn new(config: RegistryConfig) -> Result<Self, RegistryError> {
        // reqwest is built without a default crypto provider (ring is smaller and faster to
        // build than aws-lc); installing it twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = build_client(&config, false, &[])?;
        let hosts = HostsCache::new(config.hosts_dir.clone(), hosts::RECHECK_EVERY);
        let client = RegistryClient {
            http,
            config,
            tokens: Arc::new(Mutex::new(BoundedMap::new(MAX_TOKENS))),
            credentials: Arc::default(),
            repository_credentials: Arc::default(),
            stats: Arc::default(),
            clients: Arc::default(),
            redirects: Arc::new(Mutex::new(BoundedMap::new(MAX_REDIRECTS))),
            fallbacks_logged: Arc::new(Mutex::new(BoundedMap::new(MAX_FALLBACKS_LOGGED))),
            mirrors_down: Arc::new(Mutex::new(BoundedMap::new(MAX_MIRRORS_DOWN))),
            basic_hosts: Arc::default(),
            referrers_api: Arc::default(),
            hosts: Arc::new(hosts),
        };
        client.load_docker_config();
        Ok(client)
    }

    pub fn stats(&self) -> &RegistryStats {
        &self.stats
    }

    /// Credentials for `host`, used for basic auth and token requests.
    pub fn set_credentials(&self, host: &str, credentials: Credentials) {
        self.credentials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host.to_owned(), credentials);
    }

    /// Credentials for the images of `reference`'s repository, e.g. a pull secret. Replaces
    /// what was given for that repository before.
    pub fn set_repository_credentials(&self, reference: &Reference, credentials: Credentials) {
        self.repository_credentials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                (reference.host.clone(), reference.repository.clone()),
                credentials,
            );
        // A token obtained with other credentials must not outlive them.
        let scope = format!("repository:{}:pull", reference.repository);
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(host, s), _| !(host == &reference.host && s == &scope));
    }

    fn load_docker_config(&self) {
        let Some(path) = &self.config.docker_config else {
            return;
        };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read docker config; continuing without its credentials");
                return;
            }
        };
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
            tracing::warn!(path = %path.display(), "docker config is not valid JSON; ignoring it");
            return;
        };
        let Some(auths) = json.get("auths").and_then(|a| a.as_object()) else {
            return;
        };
        for (server, entry) in auths {
            let host = server
                .trim_start_matches("https://")
                .trim_start_matches("http://")
                .split('/')
                .next()
                .unwrap_or_default();
            let decoded = entry
                .get("auth")
                .and_then(|a| a.as_str())
                .and_then(|a| base64::engine::general_purpose::STANDARD.decode(a).ok())
                .and_then(|d| String::from_utf8(d).ok())
                .and_then(|d| d.split_once(':').map(|(u, p)| (u.to_owned(), p.to_owned())));
            let pair = decoded.or_else(|| {
                Some((
                    entry.get("username")?.as_str()?.to_owned(),
                    entry.get("password")?.as_str()?.to_owned(),
                ))
            });
            if let Some((username, password)) = pair {
                self.set_credentials(
                    host,
                    Credentials {
                        username,
                        password: Secret(password),
                    },
                );
            }
        }
    }

    fn credentials_for(&self, host: &str, repository: &str) -> Option<Credentials> {
        let given = self
            .repository_credentials
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(host.to_owned(), repository.to_owned()))
            .cloned();
        given.or_else(|| {
            self.credentials
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(host)
                .cloned()
        })
    }

    /// The size of blob `digest` (HEAD).
    pub async fn blob_size(
        &self,
        reference: &Reference,
        digest: &str,
    ) -> Result<u64, RegistryError> {
        self.on_endpoints(reference, digest, |target| async move {
            let response = self.send(&target, reqwest::Method::HEAD, None).await?;
            response
                .headers()
                .get(reqwest::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| {
                    Attempt::Fatal(RegistryError::BadResponse {
                        host: target.host.clone(),
                        what: format!("blob {digest}"),
                        reason: "no Content-Length".into(),
                    })
                })
        })
        .await
    }

    /// Opens one connection to where blobs of `reference` are read from first (the first
    /// mirror not known to be down, else the origin) and leaves it in the pool: one `GET /v2/`,
    /// unauthenticated, whose answer (200, or 401 from a registry that wants credentials) is
    /// read and dropped. Several of these at once, just before several requests are due,
    /// let those each find a connection open instead of paying a handshake (a round trip,
    /// and TLS's) of its own. Not retried, not counted; a failure costs only what it meant
    /// to save. Over HTTP/2 the requests share one connection anyway.
    pub async fn open_connection(&self, reference: &Reference) {
        let endpoint = match self.hosts.endpoints(reference) {
            Ok(endpoints) => endpoints
                .into_iter()
                .find(|e| e.is_origin || !self.mirror_is_down(e.host())),
            Err(_) => None,
        };
        let Some(endpoint) = endpoint else {
            return;
        };
        let Ok(client) = self.client_for(&endpoint) else {
            return;
        };
        let mut request = client.get(format!("{}/", endpoint.base));
        for (name, value) in &endpoint.headers {
            request = request.header(name, value);
        }
        let Ok(mut response) = request.send().await else {
            return;
        };
        // Read to its end, so the connection goes back to the pool; a body of more than a
        // few KiB is no ping's, and its connection is let go.
        let mut left = WARM_UP_BODY;
        while let Ok(Some(chunk)) = response.chunk().await {
            let Some(rest) = left.checked_sub(chunk.len()) else {
                return;
            };
            left = rest;
        }
    }

    /// Exactly bytes `range` of blob `digest`: from the URL the registry last redirected this
    /// blob to, while it is fresh, else from the mirrors and the origin in order.
    pub async fn read_range(
        &self,
        reference: &Reference,
        digest: &str,
        range: Range<u64>,
    ) -> Result<Bytes, RegistryError> {
        if let Some(url) = self.redirect_for(digest) {
            match self.read_redirected(&url, digest, &range).await {
                Ok(bytes) => return Ok(bytes),
                Err(reason) => {
                    tracing::debug!(digest, %reason, "redirected blob URL failed; asking the registry again");
                    self.redirects
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(digest);
                }
            }
        }
        let range = &range;
        self.on_endpoints(reference, digest, |target| async move {
            let response = self
                .send(
                    &target,
                    reqwest::Method::GET,
                    Some(RangeHeader::Exact(range)),
                )
                .await?;
            if response.url().as_str() != target.url {
                self.remember_redirect(digest, response.url().as_str());
            }
            self.take_range(response, &target.host, digest, range).await
        })
        .await
    }

    /// The last `n` bytes of blob `digest` (all of it when it is smaller) and the blob's size,
    /// in one request (`Range: bytes=-n`): a 206 gives the size in its Content-Range; a
    /// registry that ignores ranges and answers 200 with the whole blob is accepted only when
    /// the blob is at most `n` bytes (the body is cut off past that); a 416 is an empty blob.
    pub async fn read_suffix(
        &self,
        reference: &Reference,
        digest: &str,
        n: u64,
    ) -> Result<(u64, Bytes), RegistryError> {
        self.on_endpoints(reference, digest, |target| async move {
            let response = self
                .send(&target, reqwest::Method::GET, Some(RangeHeader::Suffix(n)))
                .await?;
            if response.url().as_str() != target.url {
                self.remember_redirect(digest, response.url().as_str());
            }
            self.take_suffix(response, &target.host, digest, n).await
        })
        .await
    }

    /// Checks that `response` is the last at most `n` bytes of the blob (or all of a blob of
    /// at most `n` bytes) and returns the blob's size and those bytes; the body is streamed
    /// and cut off past `n` bytes, like `take_range`.
    async fn take_suffix(
        &self,
        mut response: reqwest::Response,
        host: &str,
        digest: &str,
        n: u64,
    ) -> Result<(u64, Bytes), Attempt> {
        let what = || format!("blob {digest} last {n} bytes");
        let bad = |reason: String| {
            Attempt::Fatal(RegistryError::BadResponse {
                host: host.to_owned(),
                what: what(),
                reason,
            })
        };
        let status = response.status();
        let content_range = response
            .headers()
            .get(CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if status == StatusCode::RANGE_NOT_SATISFIABLE {
            return match suffix_total(content_range.as_deref().unwrap_or_default(), 0, n) {
                Ok(0) => Ok((0, Bytes::new())),
                Ok(_) => Err(bad("416 for a non-empty blob".to_owned())),
                Err(reason) => Err(bad(format!("status 416: {reason}"))),
            };
        }
        if status != StatusCode::PARTIAL_CONTENT && status != StatusCode::OK {
            return Err(bad(format!("status {status} instead of 206")));
        }
        let body = match read_body(&mut response, n, &self.stats.bytes).await {
            Ok(body) => body,
            Err(BodyError::TooLarge) => {
                return Err(Attempt::Fatal(RegistryError::TooLarge {
                    host: host.to_owned(),
                    what: what(),
                    limit: n,
                }))
            }
            Err(BodyError::Read(reason)) => {
                return Err(Attempt::Retry(format!("reading body: {reason}")))
            }
        };
        let got = body.len() as u64;
        if status == StatusCode::OK {
            // The whole blob, at most `n` bytes (read_body cut it off otherwise); a body
            // shorter than it announced is a broken transfer.
            if response.content_length().is_some_and(|l| l != got) {
                return Err(Attempt::Retry(format!("short body: {got} bytes")));
            }
            return Ok((got, body));
        }
        let total =
            suffix_total(content_range.as_deref().unwrap_or_default(), got, n).map_err(bad)?;
        if got != total.min(n) {
            return Err(Attempt::Retry(format!(
                "short body: {got} of {} bytes",
                total.min(n)
            )));
        }
        Ok((total, body))
    }

    fn remember_redirect(&self, digest: &str, url: &str) {
        let now = Instant::now();
        self.redirects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(digest.to_owned(), url.to_owned(), now + REDIRECT_REUSE, now);
    }

    /// Whether this is the first failure of `mirror` for `digest` in a while, i.e. worth a
    /// log line.
    fn first_fallback(&self, digest: &str, mirror: &str) -> bool {
        let now = Instant::now();
        self.fallbacks_logged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                (digest.to_owned(), mirror.to_owned()),
                (),
                now + FALLBACK_LOG_QUIET,
                now,
            )
    }

    fn redirect_for(&self, digest: &str) -> Option<String> {
        let redirects = self.redirects.lock().unwrap_or_else(|p| p.into_inner());
        redirects.get(digest, Instant::now()).cloned()
    }

    /// One GET of a redirected URL: no registry credentials go there (it is another host,
    /// usually object storage authorised by the URL's own signature).
    async fn read_redirected(
        &self,
        url: &str,
        digest: &str,
        range: &Range<u64>,
    ) -> Result<Bytes, String> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let response = self
            .http
            .get(url)
            .header(RANGE, range_header(range))
            .send()
            .await
            .map_err(|e| describe(&e))?;
        let host = response.url().host_str().unwrap_or_default().to_owned();
        match self.take_range(response, &host, digest, range).await {
            Ok(bytes) => Ok(bytes),
            Err(Attempt::Retry(reason)) => Err(reason),
            Err(Attempt::Fatal(e)) => Err(chain(&e)),
        }
    }

    /// Checks that `response` is exactly the requested range and returns its bytes. The body
    /// is streamed into a buffer of the range's size and reading stops as soon as the
    /// registry sends more, so a lying or broken server cannot make us buffer a whole blob
    /// (or an endless stream) for a small range.
    async fn take_range(
        &self,
        mut response: reqwest::Response,
        host: &str,
        digest: &str,
        range: &Range<u64>,
    ) -> Result<Bytes, Attempt> {
        let what = || format!("blob {digest} bytes {}..{}", range.start, range.end);
        let bad = |reason: String| {
            Attempt::Fatal(RegistryError::BadResponse {
                host: host.to_owned(),
                what: what(),
                reason,
            })
        };
        // A 200 would be the whole blob: never take it for the range we asked for. Its body
        // is not read; dropping the response closes the connection.
        if response.status() != StatusCode::PARTIAL_CONTENT {
            return Err(bad(format!("status {} instead of 206", response.status())));
        }
        let expected = format!("bytes {}-{}/", range.start, range.end.saturating_sub(1));
        let content_range = response
            .headers()
            .get(CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        if !content_range.starts_with(&expected) {
            return Err(bad(format!("Content-Range {content_range:?}")));
        }
        let len = range.end - range.start;
        match read_body(&mut response, len, &self.stats.bytes).await {
            Ok(body) if body.len() as u64 == len => Ok(body),
            Ok(body) => Err(Attempt::Retry(format!(
                "short body: {} of {len} bytes",
                body.len()
            ))),
            Err(BodyError::TooLarge) => Err(Attempt::Fatal(RegistryError::TooLarge {
                host: host.to_owned(),
                what: what(),
                limit: len,
            })),
            Err(BodyError::Read(reason)) => Err(Attempt::Retry(format!("reading body: {reason}"))),
        }
    }

    /// Tries the mirrors of `reference`'s host in order, one attempt each, then the origin
    /// under the retry policy, all within one read deadline, for blob `digest`. A mirror's
    /// failure is logged once per blob and mirror.
    async fn on_endpoints<T, F, Fut>(
        &self,
        reference: &Reference,
        digest: &str,
        attempt: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut(Target) -> Fut,
        Fut: Future<Output = Result<T, Attempt>>,
    {
        let route = Route {
            what: digest,
            url: &|e: &Endpoint| e.blob_url(&reference.repository, digest),
            extra: oci::Extra::default(),
            resolve: false,
            not_found_is_an_answer: false,
        };
        self.on_route(reference, route, attempt).await
    }

    /// [`Self::on_endpoints`] for any resource of the repository: the mirrors `route`
    /// allows, then the origin.
    async fn on_route<T, F, Fut>(
        &self,
        reference: &Reference,
        route: Route<'_>,
        mut attempt: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut(Target) -> Fut,
        Fut: Future<Output = Result<T, Attempt>>,
    {
        let endpoints = self.hosts.endpoints(reference)?;
        let deadline = Instant::now() + self.config.read_deadline;
        for endpoint in &endpoints {
            if !endpoint.is_origin
                && ((route.resolve && !endpoint.resolves) || self.mirror_is_down(endpoint.host()))
            {
                continue;
            }
            let target = Target {
                client: self.client_for(endpoint)?,
                url: (route.url)(endpoint),
                host: endpoint.host().to_owned(),
                repository: reference.repository.clone(),
                headers: endpoint.headers.clone(),
                extra: route.extra.clone(),
            };
            if endpoint.is_origin {
                return self
                    .with_retries(&target.host, deadline, || attempt(target.clone()))
                    .await;
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            let reason = match tokio::time::timeout(remaining, attempt(target.clone())).await {
                Ok(Ok(value)) => return Ok(value),
                // The mirror answered; what it lacks, the origin may have.
                Ok(Err(Attempt::Fatal(e))) if route.not_found_is_an_answer && e.is_not_found() => {
                    continue
                }
                Ok(Err(Attempt::Retry(reason))) => reason,
                Ok(Err(Attempt::Fatal(e))) => chain(&e),
                Err(_) => "deadline reached".to_owned(),
            };
            let now = Instant::now();
            self.mirrors_down
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(target.host.clone(), (), now + MIRROR_RETRY_AFTER, now);
            let first = self.first_fallback(route.what, &target.host);
            if first {
                tracing::warn!(mirror = %target.host, what = route.what, %reason, "mirror failed; trying the next host");
            }
        }
        Err(RegistryError::NoEndpoint {
            digest: route.what.to_owned(),
        })
    }

    fn mirror_is_down(&self, host: &str) -> bool {
        let mut down = self.mirrors_down.lock().unwrap_or_else(|p| p.into_inner());
        if down.get(host, Instant::now()).is_some() {
            return true;
        }
        down.remove(host);
        false
    }

    /// The HTTP client for an endpoint's TLS settings (one per distinct setting, so the
    /// connection pool is shared).
    fn client_for(&self, endpoint: &Endpoint) -> Result<reqwest::Client, RegistryError> {
        if !endpoint.skip_verify && endpoint.ca.is_empty() {
            return Ok(self.http.clone());
        }
        let key = (endpoint.skip_verify, endpoint.ca.clone());
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(client) = clients.get(&key) {
            return Ok(client.clone());
        }
        let client = build_client(&self.config, endpoint.skip_verify, &endpoint.ca)?;
        clients.insert(key, client.clone());
        Ok(client)
    }

    /// Runs `attempt` until it succeeds, fails for good, or the read deadline would pass.
    async fn with_retries<T, F, Fut>(
        &self,
        host: &str,
        deadline: Instant,
        mut attempt: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Attempt>>,
    {
        let mut attempts = 0u32;
        let mut backoff = Duration::from_millis(50);
        loop {
            attempts += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let last = match tokio::time::timeout(remaining, attempt()).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(Attempt::Fatal(e))) => return Err(e),
                Ok(Err(Attempt::Retry(reason))) => reason,
                Err(_) => "deadline reached".to_owned(),
            };
            // Jitter spreads the retries of many readers hitting one failure.
            let jitter = Duration::from_millis(u64::from(rand_u16() % 50));
            let wait = backoff + jitter;
            if Instant::now() + wait >= deadline {
                return Err(RegistryError::Unavailable {
                    host: host.to_owned(),
                    attempts,
                    deadline: self.config.read_deadline,
                    last,
                });
            }
            tracing::debug!(host, attempt = attempts, reason = %last, "retrying registry request");
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// One request, authenticating on a 401 challenge (once). Authorization known from earlier
    /// requests (a cached token, basic credentials for a basic-auth host) goes up front; if it
    /// is refused (a token revoked or expired early), a fresh challenge is answered instead.
    async fn send(
        &self,
        target: &Target,
        method: reqwest::Method,
        range: Option<RangeHeader<'_>>,
    ) -> Result<reqwest::Response, Attempt> {
        let access = if target.extra.push {
            "pull,push"
        } else {
            "pull"
        };
        let scope = format!("repository:{}:{access}", target.repository);
        let mut authorization = self.known_authorization(target, &scope);
        let mut fresh = false;
        for _ in 0..2 {
            let mut request = target.client.request(method.clone(), &target.url);
            if let Some(range) = &range {
                request = request.header(RANGE, range.value());
            }
            for (name, value) in &target.headers {
                request = request.header(name, value);
            }
            request = target.extra.apply(request);
            if let Some(value) = &authorization {
                request = request.header(AUTHORIZATION, value.clone());
            }
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let response = request
                .send()
                .await
                .map_err(|e| Attempt::Retry(describe(&e)))?;
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED && !fresh {
                if authorization.is_some() {
                    self.forget_token(&target.host, &scope);
                }
                let challenge = response
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(Challenge::parse);
                authorization = Some(self.authorize(target, challenge, &scope).await?);
                fresh = true;
                continue;
            }
            return match status {
                s if s.is_success() => Ok(response),
                // A suffix of an empty blob: the caller reads the total from Content-Range.
                StatusCode::RANGE_NOT_SATISFIABLE
                    if matches!(range, Some(RangeHeader::Suffix(_))) =>
                {
                    Ok(response)
                }
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                    self.forget_token(&target.host, &scope);
                    Err(Attempt::Fatal(RegistryError::Unauthorized {
                        host: target.host.clone(),
                        reason: format!("{status} with the credentials given"),
                    }))
                }
                StatusCode::NOT_FOUND => Err(Attempt::Fatal(RegistryError::NotFound {
                    host: target.host.clone(),
                    what: target
                        .url
                        .rsplit('/')
                        .next()
                        .unwrap_or(&target.url)
                        .to_owned(),
                })),
                s if s == StatusCode::TOO_MANY_REQUESTS || s.is_server_error() => {
                    Err(Attempt::Retry(format!("status {s}")))
                }
                s => Err(Attempt::Fatal(RegistryError::BadResponse {
                    host: target.host.clone(),
                    what: target.url.clone(),
                    reason: format!("status {s}"),
                })),
            };
        }
        Err(Attempt::Fatal(RegistryError::Unauthorized {
            host: target.host.clone(),
            reason: "credentials were refused".into(),
        }))
    }

    fn known_authorization(&self, target: &Target, scope: &str) -> Option<HeaderValue> {
        let host = &target.host;
        let wants_basic = self
            .basic_hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(host);
        if wants_basic {
            return self
                .credentials_for(host, &target.repository)
                .as_ref()
                .and_then(basic);
        }
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let token = tokens.get(&(host.to_owned(), scope.to_owned()), Instant::now())?;
        bearer(token)
    }

    fn forget_token(&self, host: &str, scope: &str) {
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(host.to_owned(), scope.to_owned()));
        self.basic_hosts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(host);
    }

    /// Answers a challenge: basic credentials, or a bearer token from the realm.
    async fn authorize(
        &self,
        target: &Target,
        challenge: Option<Challenge>,
        default_scope: &str,
    ) -> Result<HeaderValue, Attempt> {
        let unauthorized = |reason: &str| {
            Attempt::Fatal(RegistryError::Unauthorized {
                host: target.host.clone(),
                reason: reason.to_owned(),
            })
        };
        let credentials = self.credentials_for(&target.host, &target.repository);
        match challenge {
            Some(Challenge::Basic) => {
                let c = credentials.ok_or_else(|| {
                    unauthorized("basic auth required and no credentials configured")
                })?;
                let header = basic(&c)
                    .ok_or_else(|| unauthorized("credentials are not valid header text"))?;
                self.basic_hosts
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(target.host.clone());
                Ok(header)
            }
            Some(Challenge::Bearer {
                realm,
                service,
                scope,
            }) => {
                let scope = scope.unwrap_or_else(|| default_scope.to_owned());
                let mut request = target
                    .client
                    .get(&realm)
                    .query(&[("scope", scope.as_str())]);
                if let Some(service) = &service {
                    request = request.query(&[("service", service.as_str())]);
                }
                if let Some(c) = &credentials {
                    request = request.basic_auth(&c.username, Some(&c.password.0));
                }
                self.stats.requests.fetch_add(1, Ordering::Relaxed);
                let mut response = request
                    .send()
                    .await
                    .map_err(|e| Attempt::Retry(describe(&e)))?;
                if response.status().is_server_error() {
                    return Err(Attempt::Retry(format!(
                        "token endpoint: status {}",
                        response.status()
                    )));
                }
                if !response.status().is_success() {
                    return Err(unauthorized(&format!(
                        "token endpoint answered {}",
                        response.status()
                    )));
                }
                let body = match read_body(&mut response, MAX_TOKEN_BODY, &self.stats.bytes).await {
                    Ok(body) => body,
                    Err(BodyError::TooLarge) => {
                        return Err(Attempt::Fatal(RegistryError::TooLarge {
                            host: target.host.clone(),
                            what: format!("the token from {}", without_query(&realm)),
                            limit: MAX_TOKEN_BODY,
                        }))
                    }
                    Err(BodyError::Read(reason)) => {
                        return Err(Attempt::Retry(format!("token endpoint: {reason}")))
                    }
                };
                let body: serde_json::Value = serde_json::from_slice(&body)
                    .map_err(|_| unauthorized("token endpoint sent no JSON"))?;
                let token = body
                    .get("token")
                    .or_else(|| body.get("access_token"))
                    .and_then(|t| t.as_str())
                    .ok_or_else(|| unauthorized("token endpoint sent no token"))?
                    .to_owned();
                let lifetime = body
                    .get("expires_in")
                    .and_then(|e| e.as_u64())
                    .unwrap_or(60);
                // Renew a little early so a token never expires between check and use.
                let now = Instant::now();
                let expiry = now + Duration::from_secs(lifetime.saturating_sub(5).max(1));
                let value = bearer(&Secret(token.clone()))
                    .ok_or_else(|| unauthorized("token is not valid header text"))?;
                self.tokens
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert((target.host.clone(), scope), Secret(token), expiry, now);
                Ok(value)
            }
            None => Err(unauthorized(
                "401 without a usable WWW-Authenticate challenge",
            )),
        }
    }
}

/// The `Range` a request asks for.
#[derive(Clone, Copy)]
enum RangeHeader<'a> {
    /// Exactly these bytes.
    Exact(&'a Range<u64>),
    /// The last this many bytes (`bytes=-N`), whatever the blob's size.
    Suffix(u64),
}

impl RangeHeader<'_> {
    fn value(&self) -> String {
        match self {
            RangeHeader::Exact(range) => range_header(range),
            RangeHeader::Suffix(n) => format!("bytes=-{n}"),
        }
    }
}

/// The total size of a blob from a `Content-Range` answering a suffix request for at most
/// `n` bytes of which `got` came: `bytes a-b/TOTAL` with `b` the last byte and `a` where the
/// `got` bytes start, or `bytes */0` for an empty blob (with a 416).
fn suffix_total(content_range: &str, got: u64, n: u64) -> Result<u64, String> {
    let rest = content_range
        .strip_prefix("bytes ")
        .ok_or_else(|| format!("Content-Range {content_range:?}"))?;
    let (span, total) = rest
        .split_once('/')
        .ok_or_else(|| format!("Content-Range {content_range:?}"))?;
    let total: u64 = total
        .trim()
        .parse()
        .map_err(|_| format!("Content-Range {content_range:?} has no total size"))?;
    if span == "*" {
        return if total == 0 && got == 0 {
            Ok(0)
        } else {
            Err(format!("Content-Range {content_range:?} for a suffix"))
        };
    }
    let (a, b) = span
        .split_once('-')
        .and_then(|(a, b)| Some((a.trim().parse::<u64>().ok()?, b.trim().parse::<u64>().ok()?)))
        .ok_or_else(|| format!("Content-Range {content_range:?}"))?;
    let len = b.checked_sub(a).map(|l| l + 1);
    let want = total.min(n);
    if b.checked_add(1) != Some(total) || len != Some(want) || a != total - want {
        return Err(format!(
            "Content-Range {content_range:?} is not the last {want} bytes"
        ));
    }
    Ok(total)
}

fn range_header(range: &Range<u64>) -> String {
    format!("bytes={}-{}", range.start, range.end.saturating_sub(1))
}

/// A client with lazysnap's timeouts and, for hosts.toml entries, their TLS settings.
fn build_client(
    config: &RegistryConfig,
    skip_verify: bool,
    ca: &[PathBuf],
) -> Result<reqwest::Client, RegistryError> {
    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("lazysnap/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(config.request_timeout)
        .timeout(config.request_timeout)
        .pool_max_idle_per_host(16)
        .danger_accept_invalid_certs(skip_verify);
    for path in ca {
        let pem = std::fs::read(path).map_err(|e| RegistryError::CaFile {
            path: path.clone(),
            source: Arc::new(e),
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            RegistryError::CaCertificate {
                path: path.clone(),
                source: Some(Arc::new(e.without_url())),
            }
        })?;
        // An empty bundle would silently leave the mirror unverifiable; say so instead.
        if certs.is_empty() {
            return Err(RegistryError::CaCertificate {
                path: path.clone(),
                source: None,
            });
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(|e| RegistryError::HttpClient {
        source: Arc::new(e.without_url()),
    })
}

/// Why a body was not read whole.
enum BodyError {
    /// More than the limit was announced (Content-Length) or sent.
    TooLarge,
    /// The transport failed; already stripped of URL query strings.
    Read(String),
}

/// Reads `response`'s body, at most `limit` bytes: refused up front if its Content-Length
/// says more, and cut off as soon as more arrives (a chunked or lying body). The buffer is
/// sized once from the smaller of the two, so a range read does not reallocate. Counts the
/// bytes received in `counter`.
async fn read_body(
    response: &mut reqwest::Response,
    limit: u64,
    counter: &AtomicU64,
) -> Result<Bytes, BodyError> {
    let announced = response.content_length();
    if announced.is_some_and(|n| n > limit) {
        return Err(BodyError::TooLarge);
    }
    let capacity = usize::try_from(announced.unwrap_or(limit).min(limit)).unwrap_or(0);
    let mut body = BytesMut::with_capacity(capacity);
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| BodyError::Read(describe(&e)))?
    {
        counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        if (body.len() + chunk.len()) as u64 > limit {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// An error and its causes on one line, for logs and for failures kept as text.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// A URL for messages: scheme, host, port and path, without the query (which can carry
/// credentials).
fn without_query(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(url) => format!(
            "{}://{}{}{}",
            url.scheme(),
            url.host_str().unwrap_or(""),
            url.port().map(|p| format!(":{p}")).unwrap_or_default(),
            url.path()
        ),
        Err(_) => url.split(['?', '#']).next().unwrap_or_default().to_owned(),
    }
}

fn bearer(token: &Secret) -> Option<HeaderValue> {
    let mut value = HeaderValue::from_str(&format!("Bearer {}", token.0)).ok()?;
    value.set_sensitive(true);
    Some(value)
}

fn basic(c: &Credentials) -> Option<HeaderValue> {
    let encoded = base64::engine::general_purpose::STANDARD
        .encode(format!("{}:{}", c.username, c.password.0));
    let mut value = HeaderValue::from_str(&format!("Basic {encoded}")).ok()?;
    value.set_sensitive(true);
    Some(value)
}

/// reqwest errors without URLs' query strings (which can carry tokens on redirects).
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    match e.url() {
        Some(url) => format!(
            "{kind}: {}://{}{}{}",
            url.scheme(),
            url.host_str().unwrap_or(""),
            url.port().map(|p| format!(":{p}")).unwrap_or_default(),
            url.path()
        ),
        None => kind.to_owned(),
    }
}

/// A little randomness for jitter without another dependency.
fn rand_u16() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish() as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffix_content_ranges() {
        let n = 1000;
        assert_eq!(suffix_total("bytes 9000-9999/10000", 1000, n), Ok(10000));
        assert_eq!(suffix_total("bytes 0-499/500", 500, n), Ok(500));
        assert_eq!(suffix_total("bytes */0", 0, n), Ok(0));
        for bad in [
            "bytes 9000-9998/10000",
            "bytes 8000-9999/10000",
            "bytes 9001-9999/10000",
            "bytes 1-499/500",
            "bytes 9000-9999/*",
            "bytes */10",
            "items 0-1/2",
            "",
        ] {
            assert!(suffix_total(bad, 1000, n).is_err(), "{bad}");
        }
    }

    #[test]
    fn remembered_redirects_and_fallbacks_stay_bounded() {
        let client = RegistryClient::new(RegistryConfig::default()).expect("client");
        for i in 0..MAX_REDIRECTS + 500 {
            client.remember_redirect(&format!("sha256:{i}"), &format!("http://s/{i}"));
            assert!(client.first_fallback(&format!("sha256:{i}"), "mirror:5000"));
        }
        assert_eq!(client.redirects.lock().expect("lock").len(), MAX_REDIRECTS);
        assert_eq!(
            client.fallbacks_logged.lock().expect("lock").len(),
            MAX_FALLBACKS_LOGGED
        );
        let last = MAX_REDIRECTS + 499;
        assert_eq!(
            client.redirect_for(&format!("sha256:{last}")).as_deref(),
            Some(format!("http://s/{last}").as_str()),
            "the newest redirect is kept"
        );
        assert!(
            !client.first_fallback(&format!("sha256:{last}"), "mirror:5000"),
            "a recent fallback is not logged twice"
        );
    }

    #[test]
    fn error_messages_name_the_file_and_chain_the_cause_once() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing-ca.pem");
        let err = build_client(
            &RegistryConfig::default(),
            false,
            std::slice::from_ref(&missing),
        )
        .expect_err("no CA file");
        assert!(matches!(err, RegistryError::CaFile { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains("missing-ca.pem"), "{message}");
        let cause = std::error::Error::source(&err)
            .expect("a source")
            .to_string();
        assert!(!message.contains(&cause), "{message} repeats {cause}");
        assert_eq!(chain(&err), format!("{message}: {cause}"));
        let cloned = err.clone();
        assert_eq!(cloned.to_string(), message);

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let err = build_client(&RegistryConfig::default(), false, &[empty])
            .expect_err("no certificate in the file");
        assert!(
            matches!(err, RegistryError::CaCertificate { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn urls_in_messages_lose_their_query() {
        assert_eq!(
            without_query("https://auth.example:8443/token?scope=x&secret=s3cr3t"),
            "https://auth.example:8443/token"
        );
        assert_eq!(without_query("not a url?secret=1"), "not a url");
    }
}
