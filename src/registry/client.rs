//! HTTP against registries. `try_*` functions make one attempt; `with_retries` is the one
//! place that decides what is retried (connection errors, timeouts, 429 and 5xx), with
//! exponential backoff and jitter, and never past the caller's deadline, so a read of an
//! unreachable registry fails within a bounded time instead of hanging a container.

use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_RANGE, RANGE, WWW_AUTHENTICATE};
use reqwest::StatusCode;

use super::auth::{Challenge, Credentials, Secret};
use super::hosts::{self, Endpoint};
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

/// Why a registry request failed. Messages name host, digest and range, never secrets.
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
        last: String,
    },
    #[error("registry {host} sent a bad answer for {what}: {reason}")]
    BadResponse {
        host: String,
        what: String,
        reason: String,
    },
    #[error("http client: {0}")]
    Client(String),
    #[error("registry hosts configuration: {0}")]
    Hosts(String),
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

/// Bearer tokens by (host, scope), with their expiry.
type TokenCache = HashMap<(String, String), (Secret, Instant)>;
/// HTTP clients by TLS settings (skip_verify, extra CAs) of hosts.toml entries.
type ClientCache = HashMap<(bool, Vec<PathBuf>), reqwest::Client>;

/// How long a blob's redirected URL (usually a signed object-storage URL) is reused; such URLs
/// typically live 10 to 20 minutes, and a failure drops it earlier.
const REDIRECT_REUSE: Duration = Duration::from_secs(5 * 60);

/// Where one attempt goes: an endpoint's client, URL and identity.
#[derive(Clone)]
struct Target {
    client: reqwest::Client,
    url: String,
    host: String,
    repository: String,
    headers: Vec<(String, String)>,
}

/// A shared client: one connection pool, one token cache.
#[derive(Clone)]
pub struct RegistryClient {
    http: reqwest::Client,
    config: RegistryConfig,
    /// (host, scope) → bearer token and its expiry.
    tokens: Arc<Mutex<TokenCache>>,
    credentials: Arc<Mutex<HashMap<String, Credentials>>>,
    /// (host, repository) → credentials given for images of that repository (a kubelet's pull
    /// secret, through the CRI image proxy); held in memory only and preferred to `credentials`.
    repository_credentials: Arc<Mutex<HashMap<(String, String), Credentials>>>,
    stats: Arc<RegistryStats>,
    clients: Arc<Mutex<ClientCache>>,
    /// digest → (final URL after redirects, when it was learnt).
    redirects: Arc<Mutex<HashMap<String, (String, Instant)>>>,
    /// (digest, mirror) pairs whose fallback was logged, so a layer logs it once, not per chunk.
    fallbacks_logged: Arc<Mutex<std::collections::HashSet<(String, String)>>>,
    /// Mirrors that failed, skipped until the instant given, so a mirror that hangs costs one
    /// read a timeout, not every read.
    mirrors_down: Arc<Mutex<HashMap<String, Instant>>>,
    /// Hosts that asked for basic auth: later requests send it up front instead of paying a
    /// 401 round trip each.
    basic_hosts: Arc<Mutex<std::collections::HashSet<String>>>,
}

/// How long a failed mirror is skipped before it is tried again.
const MIRROR_RETRY_AFTER: Duration = Duration::from_secs(30);

impl RegistryClient {
    pub fn new(config: RegistryConfig) -> Result<Self, RegistryError> {
        // reqwest is built without a default crypto provider (ring is smaller and faster to
        // build than aws-lc); installing it twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = build_client(&config, false, &[])?;
        let client = RegistryClient {
            http,
            config,
            tokens: Arc::default(),
            credentials: Arc::default(),
            repository_credentials: Arc::default(),
            stats: Arc::default(),
            clients: Arc::default(),
            redirects: Arc::default(),
            fallbacks_logged: Arc::default(),
            mirrors_down: Arc::default(),
            basic_hosts: Arc::default(),
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
                .send(&target, reqwest::Method::GET, Some(range))
                .await?;
            if response.url().as_str() != target.url {
                self.redirects
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(
                        digest.to_owned(),
                        (response.url().to_string(), Instant::now()),
                    );
            }
            self.take_range(response, &target.host, digest, range).await
        })
        .await
    }

    fn redirect_for(&self, digest: &str) -> Option<String> {
        let redirects = self.redirects.lock().unwrap_or_else(|p| p.into_inner());
        let (url, learnt) = redirects.get(digest)?;
        (learnt.elapsed() < REDIRECT_REUSE).then(|| url.clone())
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
            Err(Attempt::Fatal(e)) => Err(e.to_string()),
        }
    }

    /// Checks that `response` is exactly the requested range and returns its bytes.
    async fn take_range(
        &self,
        response: reqwest::Response,
        host: &str,
        digest: &str,
        range: &Range<u64>,
    ) -> Result<Bytes, Attempt> {
        let bad = |reason: String| {
            Attempt::Fatal(RegistryError::BadResponse {
                host: host.to_owned(),
                what: format!("blob {digest} bytes {}..{}", range.start, range.end),
                reason,
            })
        };
        // A 200 would be the whole blob: never take it for the range we asked for.
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
        let body = response
            .bytes()
            .await
            .map_err(|e| Attempt::Retry(format!("reading body: {e}")))?;
        self.stats
            .bytes
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        if body.len() as u64 != range.end - range.start {
            return Err(Attempt::Retry(format!(
                "short body: {} of {} bytes",
                body.len(),
                range.end - range.start
            )));
        }
        Ok(body)
    }

    /// Tries the mirrors of `reference`'s host in order, one attempt each, then the origin
    /// under the retry policy, all within one read deadline. A mirror's failure is logged once
    /// per blob and mirror.
    async fn on_endpoints<T, F, Fut>(
        &self,
        reference: &Reference,
        digest: &str,
        mut attempt: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut(Target) -> Fut,
        Fut: Future<Output = Result<T, Attempt>>,
    {
        let endpoints = hosts::endpoints(self.config.hosts_dir.as_deref(), reference)
            .map_err(|e| RegistryError::Hosts(e.to_string()))?;
        let deadline = Instant::now() + self.config.read_deadline;
        for endpoint in &endpoints {
            if !endpoint.is_origin && self.mirror_is_down(endpoint.host()) {
                continue;
            }
            let target = Target {
                client: self.client_for(endpoint)?,
                url: endpoint.blob_url(&reference.repository, digest),
                host: endpoint.host().to_owned(),
                repository: reference.repository.clone(),
                headers: endpoint.headers.clone(),
            };
            if endpoint.is_origin {
                return self
                    .with_retries(&target.host, deadline, || attempt(target.clone()))
                    .await;
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            let reason = match tokio::time::timeout(remaining, attempt(target.clone())).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(Attempt::Retry(reason))) => reason,
                Ok(Err(Attempt::Fatal(e))) => e.to_string(),
                Err(_) => "deadline reached".to_owned(),
            };
            self.mirrors_down
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(target.host.clone(), Instant::now() + MIRROR_RETRY_AFTER);
            let first = self
                .fallbacks_logged
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((digest.to_owned(), target.host.clone()));
            if first {
                tracing::warn!(mirror = %target.host, digest, %reason, "mirror failed; trying the next host");
            }
        }
        Err(RegistryError::Hosts(format!(
            "no host to read {digest} from"
        )))
    }

    fn mirror_is_down(&self, host: &str) -> bool {
        let mut down = self.mirrors_down.lock().unwrap_or_else(|p| p.into_inner());
        match down.get(host) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                down.remove(host);
                false
            }
            None => false,
        }
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
        range: Option<&Range<u64>>,
    ) -> Result<reqwest::Response, Attempt> {
        let scope = format!("repository:{}:pull", target.repository);
        let mut authorization = self.known_authorization(target, &scope);
        let mut fresh = false;
        for _ in 0..2 {
            let mut request = target.client.request(method.clone(), &target.url);
            if let Some(range) = range {
                request = request.header(RANGE, range_header(range));
            }
            for (name, value) in &target.headers {
                request = request.header(name, value);
            }
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
        let (token, expiry) = tokens.get(&(host.to_owned(), scope.to_owned()))?;
        (*expiry > Instant::now()).then(|| bearer(token)).flatten()
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
                let response = request
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
                let body: serde_json::Value = response
                    .json()
                    .await
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
                let expiry =
                    Instant::now() + Duration::from_secs(lifetime.saturating_sub(5).max(1));
                let value = bearer(&Secret(token.clone()))
                    .ok_or_else(|| unauthorized("token is not valid header text"))?;
                self.tokens
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert((target.host.clone(), scope), (Secret(token), expiry));
                Ok(value)
            }
            None => Err(unauthorized(
                "401 without a usable WWW-Authenticate challenge",
            )),
        }
    }
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
        let pem = std::fs::read(path)
            .map_err(|e| RegistryError::Hosts(format!("CA file {}: {e}", path.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| RegistryError::Hosts(format!("CA file {}: {e}", path.display())))?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder
        .build()
        .map_err(|e| RegistryError::Client(e.to_string()))
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
