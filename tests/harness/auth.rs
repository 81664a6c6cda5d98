//! Private registries for tests: a `docker-registry` of its own (config, storage and log in a
//! directory the test names, a free loopback port) that demands HTTP basic credentials
//! (`htpasswd`, bcrypt) or bearer tokens, and for the latter a small token server implementing
//! the Docker registry token flow (`GET /token?service=..&scope=..` with basic credentials →
//! an RS256 JWT whose `x5c` certificate is the registry's `rootcertbundle`). Without auth it is
//! a second plain registry, e.g. a mirror.
//!
//! Registry 2.8 accepts `htpasswd` over plain HTTP (it only says nothing about it), so the
//! tests need no TLS. bcrypt hashes use the lowest cost: the registry checks the hash on every
//! request, and at the usual cost 12 each ranged read would spend ~250 ms in bcrypt.
//!
//! Everything is killed by its own PID when dropped.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use nix::sys::signal::Signal;

use super::image::{self, ImageSpec};
use super::process::{free_port, wait_for, Proc};
use super::stack::Stack;

/// The `service` the token registry names in its challenges and expects as `aud`.
pub const TOKEN_SERVICE: &str = "lazysnap-test-registry";
/// The `iss` of the test tokens.
pub const TOKEN_ISSUER: &str = "lazysnap-test-token-server";

/// How a registry checks who is asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthKind {
    /// No authentication: a plain registry (a mirror, say).
    Anonymous,
    /// HTTP basic against an htpasswd file.
    Basic,
    /// Bearer tokens from `TokenServer`.
    Token,
}

/// A docker-registry with its own storage, log and (optionally) authentication.
pub struct AuthRegistry {
    pub kind: AuthKind,
    pub dir: PathBuf,
    host: String,
    user: String,
    password: String,
    registry: Option<Proc>,
    log: PathBuf,
    token_server: Option<TokenServer>,
}

impl AuthRegistry {
    /// A registry demanding HTTP basic credentials `user:password` (bcrypt htpasswd entry).
    pub fn basic(dir: &Path, user: &str, password: &str) -> AuthRegistry {
        let name = "basic-registry";
        let htpasswd = dir.join(format!("{name}.htpasswd"));
        let hash = bcrypt::hash(password, 4).expect("bcrypt hash");
        std::fs::write(&htpasswd, format!("{user}:{hash}\n")).expect("write htpasswd");
        let auth = format!(
            "auth:\n  htpasswd:\n    realm: lazysnap-test\n    path: {}\n",
            htpasswd.display()
        );
        Self::start(dir, name, AuthKind::Basic, &auth, user, password, None)
    }

    /// A registry demanding bearer tokens, with a token server that hands them out for
    /// `user:password`.
    pub fn token(dir: &Path, user: &str, password: &str) -> AuthRegistry {
        let name = "token-registry";
        let server = TokenServer::start(dir, user, password);
        let auth = format!(
            "auth:\n  token:\n    realm: {}\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
            server.realm(),
            server.cert.display()
        );
        Self::start(
            dir,
            name,
            AuthKind::Token,
            &auth,
            user,
            password,
            Some(server),
        )
    }

    /// A registry without authentication (e.g. a mirror).
    pub fn anonymous(dir: &Path) -> AuthRegistry {
        Self::start(dir, "plain-registry", AuthKind::Anonymous, "", "", "", None)
    }

    fn start(
        dir: &Path,
        name: &str,
        kind: AuthKind,
        auth: &str,
        user: &str,
        password: &str,
        token_server: Option<TokenServer>,
    ) -> AuthRegistry {
        super::packages::ensure();
        let port = free_port();
        let name = format!("{name}-{port}");
        let config = dir.join(format!("{name}.yml"));
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
                dir.join(format!("{name}-data")).display()
            ),
        )
        .expect("write registry config");
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve").arg(&config);
        let log = dir.join(format!("{name}.log"));
        let mut proc = Proc::spawn(&name, cmd, &log);
        let host = format!("127.0.0.1:{port}");
        wait_for(
            "the registry to listen",
            Duration::from_secs(20),
            &mut proc,
            || TcpStream::connect(&host).is_ok(),
        );
        AuthRegistry {
            kind,
            dir: dir.to_path_buf(),
            host,
            user: user.into(),
            password: password.into(),
            registry: Some(proc),
            log,
            token_server,
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.host
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("registry port")
    }

    /// `127.0.0.1:PORT/name`.
    pub fn image_ref(&self, name: &str) -> String {
        format!("{}/{name}", self.host)
    }

    /// `user:password`, for `ctr --user` and skopeo's `--creds`.
    pub fn creds(&self) -> String {
        format!("{}:{}", self.user, self.password)
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    /// The registry's log file (its own log and the access log).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Every log file this registry (and its token server) wrote.
    pub fn log_files(&self) -> Vec<PathBuf> {
        let mut out = vec![self.log.clone()];
        if let Some(server) = &self.token_server {
            out.push(server.log.clone());
        }
        out
    }

    /// The registry's access log: one line per request, in the common log format.
    pub fn access_log(&self) -> String {
        access_lines(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// The access log parsed.
    pub fn requests(&self) -> Vec<AccessEntry> {
        parse_access_log(&self.access_log())
    }

    pub fn token_server(&self) -> Option<&TokenServer> {
        self.token_server.as_ref()
    }

    /// Token requests the token server answered with a token (empty without one).
    pub fn tokens_issued(&self) -> Vec<TokenRequest> {
        self.token_server
            .as_ref()
            .map(TokenServer::tokens_issued)
            .unwrap_or_default()
    }

    /// Pushes `spec` as `name` (`repo:tag`) with skopeo, with this registry's credentials.
    pub fn push(&self, spec: &ImageSpec, name: &str) {
        let reference = self.image_ref(name);
        let layout = self
            .dir
            .join(format!("layout-{}", name.replace([':', '/'], "-")));
        let _ = std::fs::remove_dir_all(&layout);
        image::write_layout(spec, &layout, "latest");
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        if self.kind != AuthKind::Anonymous {
            cmd.arg("--dest-creds").arg(self.creds());
        }
        let out = cmd
            .arg(format!("oci:{}:latest", layout.display()))
            .arg(format!("docker://{reference}"))
            .output()
            .expect("run skopeo");
        assert!(
            out.status.success(),
            "skopeo copy to {reference} failed:\n{}",
            self.redact(&String::from_utf8_lossy(&out.stderr))
        );
    }

    /// Copies `source` (on an anonymous registry) here as `name` with skopeo, keeping every
    /// digest (manifest and blobs); fails if they would change.
    pub fn copy_from(&self, source: &str, name: &str) {
        let mut cmd = Command::new("skopeo");
        cmd.args([
            "copy",
            "--quiet",
            "--preserve-digests",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
        ]);
        if self.kind != AuthKind::Anonymous {
            cmd.arg("--dest-creds").arg(self.creds());
        }
        let out = cmd
            .arg(format!("docker://{source}"))
            .arg(format!("docker://{}", self.image_ref(name)))
            .output()
            .expect("run skopeo");
        assert!(
            out.status.success(),
            "skopeo copy {source} to {} failed:\n{}",
            self.host,
            self.redact(&String::from_utf8_lossy(&out.stderr))
        );
    }

    /// `text` with this registry's password replaced, for panic messages.
    pub fn redact(&self, text: &str) -> String {
        if self.password.is_empty() {
            text.to_owned()
        } else {
            text.replace(&self.password, "<password>")
        }
    }

    /// Runs `ctr ARGS` on `stack`, panicking with the password redacted on failure.
    pub fn ctr(&self, stack: &Stack, args: &[&str]) -> String {
        stack.try_ctr(args).unwrap_or_else(|e| {
            panic!("{}\n{}", self.redact(&e), self.redact(&stack.diagnostics()))
        })
    }

    /// Runs `ctr-remote ARGS` on `stack`, panicking with the password redacted on failure.
    pub fn ctr_remote(&self, stack: &Stack, args: &[&str]) -> String {
        stack.try_ctr_remote(args).unwrap_or_else(|e| {
            panic!("{}\n{}", self.redact(&e), self.redact(&stack.diagnostics()))
        })
    }

    /// Pulls `source` from this registry with its credentials, converts it with
    /// `ctr-remote image convert --oci FLAGS` into `target`, pushes that with the credentials,
    /// and forgets both locally, so a later pull starts from nothing.
    pub fn convert_and_push(&self, stack: &Stack, source: &str, target: &str, flags: &[&str]) {
        let creds = self.creds();
        self.ctr(
            stack,
            &["images", "pull", "--plain-http", "--user", &creds, source],
        );
        let mut args = vec!["image", "convert", "--oci"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&[source, target]);
        self.ctr_remote(stack, &args);
        stack
            .try_push(&["--plain-http", "--user", &creds, target])
            .unwrap_or_else(|e| {
                panic!("{}\n{}", self.redact(&e), self.redact(&stack.diagnostics()))
            });
        self.ctr(stack, &["images", "rm", "--sync", source, target]);
        self.ctr(stack, &["content", "prune", "references"]);
    }

    /// `ctr-remote image rpull --user USER:PASSWORD --snapshotter lazysnap REFERENCE`.
    pub fn rpull(&self, stack: &Stack, reference: &str) -> String {
        let creds = self.creds();
        self.ctr_remote(
            stack,
            &[
                "image",
                "rpull",
                "--plain-http",
                "--user",
                &creds,
                "--snapshotter",
                "lazysnap",
                reference,
            ],
        )
    }

    /// Stops the registry and its token server (SIGTERM, then SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut proc) = self.registry.take() {
            proc.stop(Signal::SIGTERM, Duration::from_secs(5));
        }
        if let Some(server) = &mut self.token_server {
            server.stop();
        }
    }
}

impl Drop for AuthRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `docker config.json` giving `user:password` for `host`.
pub fn docker_config(host: &str, user: &str, password: &str) -> String {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    serde_json::json!({ "auths": { host: { "auth": auth } } }).to_string()
}

/// A fresh random hex string (for passwords nothing else in a log could contain).
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    hex::encode(buf)
}

/// Only the access-log lines of a registry log (the rest is the registry's own logrus log).
pub fn access_lines(log: &str) -> String {
    log.lines()
        .filter(|l| !l.starts_with("time=") && l.contains("] \""))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// One request of a registry's access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessEntry {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub bytes: u64,
    pub user_agent: String,
}

impl AccessEntry {
    /// A request lazysnap's registry client made.
    pub fn by_lazysnap(&self) -> bool {
        self.user_agent.starts_with("lazysnap/")
    }

    /// A ranged blob read (`GET .../blobs/DIGEST` answered 206).
    pub fn is_range_get_of(&self, digest: &str) -> bool {
        self.method == "GET"
            && self.status == 206
            && self.path.contains("/blobs/")
            && self.path.ends_with(digest)
    }
}

/// Parses common-log-format lines: `ADDR - USER [TIME] "METHOD PATH PROTO" STATUS BYTES
/// "REFERER" "AGENT"`.
pub fn parse_access_log(text: &str) -> Vec<AccessEntry> {
    text.lines()
        .filter_map(|line| {
            let (_, rest) = line.split_once("] \"")?;
            let (request, rest) = rest.split_once('"')?;
            let mut request = request.split(' ');
            let method = request.next()?.to_owned();
            let path = request.next()?.to_owned();
            let mut rest = rest.trim_start().splitn(3, ' ');
            let status = rest.next()?.parse().ok()?;
            let bytes = rest.next()?.parse().unwrap_or(0);
            let quoted: Vec<&str> = rest.next().unwrap_or("").split('"').collect();
            // `"referer" "agent"` splits into ["", referer, " ", agent, ""]
            let user_agent = quoted.get(3).copied().unwrap_or("").to_owned();
            Some(AccessEntry {
                method,
                path,
                status,
                bytes,
                user_agent,
            })
        })
        .collect()
}

/// One request the token server answered.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub method: String,
    /// The user named in the basic credentials (whether or not they were right).
    pub user: Option<String>,
    pub service: Option<String>,
    pub scopes: Vec<String>,
    pub user_agent: String,
    pub status: u16,
    /// The JWT handed out, on a 200.
    pub token: Option<String>,
}

impl TokenRequest {
    pub fn by_lazysnap(&self) -> bool {
        self.user_agent.starts_with("lazysnap/")
    }
}

struct TokenShared {
    user: String,
    password: String,
    key: PathBuf,
    /// The certificate's DER, base64 (standard alphabet), for the JWT header's `x5c`.
    x5c: String,
    log: Mutex<std::fs::File>,
    requests: Mutex<Vec<TokenRequest>>,
    serial: AtomicU64,
}

/// The Docker registry token flow on `127.0.0.1:PORT/token`, one thread per connection.
pub struct TokenServer {
    port: u16,
    pub cert: PathBuf,
    pub log: PathBuf,
    stopping: Arc<AtomicBool>,
    shared: Arc<TokenShared>,
    thread: Option<JoinHandle<()>>,
}

impl TokenServer {
    /// Generates an RSA key and a self-signed certificate in `dir` and starts serving.
    pub fn start(dir: &Path, user: &str, password: &str) -> TokenServer {
        ensure_openssl();
        let key = dir.join("token-key.pem");
        let cert = dir.join("token-cert.pem");
        let out = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=lazysnap test token issuer"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("run openssl req");
        assert!(
            out.status.success(),
            "openssl req failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pem = std::fs::read_to_string(&cert).expect("read certificate");
        let x5c: String = pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect::<Vec<_>>()
            .concat();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind token server");
        let port = listener.local_addr().expect("token server address").port();
        let log = dir.join(format!("token-server-{port}.log"));
        let shared = Arc::new(TokenShared {
            user: user.into(),
            password: password.into(),
            key,
            x5c,
            log: Mutex::new(std::fs::File::create(&log).expect("create token server log")),
            requests: Mutex::default(),
            serial: AtomicU64::new(0),
        });
        let stopping = Arc::new(AtomicBool::new(false));
        let thread = {
            let shared = shared.clone();
            let stopping = stopping.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let shared = shared.clone();
                    std::thread::spawn(move || serve_token_request(&shared, stream));
                }
            })
        };
        TokenServer {
            port,
            cert,
            log,
            stopping,
            shared,
            thread: Some(thread),
        }
    }

    /// The token endpoint's URL, the registry's `realm`.
    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The requests answered with a token.
    pub fn tokens_issued(&self) -> Vec<TokenRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.token.is_some())
            .collect()
    }

    /// Every token handed out.
    pub fn tokens(&self) -> Vec<String> {
        self.requests()
            .into_iter()
            .filter_map(|r| r.token)
            .collect()
    }

    pub fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stopping.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        let _ = thread.join();
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Installs the `openssl` CLI when it is missing (as root), as `packages::ensure` does for the
/// other tools.
fn ensure_openssl() {
    if Path::new("/usr/bin/openssl").exists() {
        return;
    }
    super::require_root();
    for args in [
        &["update", "-qq"][..],
        &["install", "-y", "-qq", "openssl"][..],
    ] {
        let out = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .expect("run apt-get");
        assert!(
            out.status.success(),
            "apt-get {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Answers one HTTP/1.1 request and closes the connection.
fn serve_token_request(shared: &TokenShared, stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
        return; // the stop() wake-up, or a client that went away
    }
    let mut headers = BTreeMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
        }
    }
    // Read any body (containerd POSTs a form first), so closing does not reset the connection
    // before the client has read the answer.
    let body_len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; body_len.min(1 << 20)];
    let _ = reader.read_exact(&mut body);

    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("").to_owned();
    let target = parts.next().unwrap_or("").to_owned();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let mut scopes = Vec::new();
    let mut service = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "scope" => scopes.extend(percent_decode(v).split(' ').map(str::to_owned)),
            "service" => service = Some(percent_decode(v)),
            _ => {}
        }
    }
    scopes.retain(|s| !s.is_empty());
    let presented = headers
        .get("authorization")
        .and_then(|v| {
            v.strip_prefix("Basic ")
                .or_else(|| v.strip_prefix("basic "))
        })
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|d| String::from_utf8(d).ok())
        .and_then(|d| d.split_once(':').map(|(u, p)| (u.to_owned(), p.to_owned())));
    let user = presented.as_ref().map(|(u, _)| u.clone());
    let authorized = presented
        .as_ref()
        .is_some_and(|(u, p)| *u == shared.user && *p == shared.password);

    let (status, body, token) = if path != "/token" {
        (404, r#"{"error":"not found"}"#.to_owned(), None)
    } else if method != "GET" {
        // containerd tries the OAuth2 POST first and falls back to GET on 405.
        (405, r#"{"error":"use GET"}"#.to_owned(), None)
    } else if !authorized {
        (
            401,
            r#"{"error":"authentication required"}"#.to_owned(),
            None,
        )
    } else {
        let token = sign_token(shared, &scopes, service.as_deref());
        let now = unix_now();
        let body = serde_json::json!({
            "token": token,
            "access_token": token,
            "expires_in": 300,
            "issued_at": rfc3339(now),
        })
        .to_string();
        (200, body, Some(token))
    };
    let reason = match status {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        _ => "Method Not Allowed",
    };
    let mut answer = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status == 401 {
        answer.push_str("WWW-Authenticate: Basic realm=\"lazysnap-test-token\"\r\n");
    }
    answer.push_str("\r\n");
    answer.push_str(&body);
    let mut stream = stream;
    let _ = stream.write_all(answer.as_bytes());
    let _ = stream.flush();

    let user_agent = headers.get("user-agent").cloned().unwrap_or_default();
    // The log names the request, never the credentials or the token.
    if let Ok(mut log) = shared.log.lock() {
        let _ = writeln!(
            log,
            "{} {method} {path} service={service:?} scopes={scopes:?} user={user:?} agent={user_agent:?} -> {status}",
            rfc3339(unix_now())
        );
    }
    shared
        .requests
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(TokenRequest {
            method,
            user,
            service,
            scopes,
            user_agent,
            status,
            token,
        });
}

/// An RS256 JWT granting exactly `scopes` (`type:name:action,action`), signed with the
/// server's key, its certificate in `x5c`.
fn sign_token(shared: &TokenShared, scopes: &[String], service: Option<&str>) -> String {
    let b64 = |data: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data);
    let access: Vec<serde_json::Value> = scopes
        .iter()
        .filter_map(|scope| {
            let (kind, rest) = scope.split_once(':')?;
            let (name, actions) = rest.rsplit_once(':')?;
            Some(serde_json::json!({
                "type": kind,
                "name": name,
                "actions": actions.split(',').collect::<Vec<_>>(),
            }))
        })
        .collect();
    let now = unix_now();
    let serial = shared.serial.fetch_add(1, Ordering::SeqCst);
    let header = serde_json::json!({ "typ": "JWT", "alg": "RS256", "x5c": [shared.x5c] });
    let claims = serde_json::json!({
        "iss": TOKEN_ISSUER,
        "sub": shared.user,
        "aud": service.unwrap_or(TOKEN_SERVICE),
        "exp": now + 300,
        "nbf": now - 10,
        "iat": now,
        "jti": format!("{serial}-{}", random_hex(8)),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(&shared.key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run openssl dgst");
    child
        .stdin
        .take()
        .expect("openssl stdin")
        .write_all(signing_input.as_bytes())
        .expect("write to openssl");
    let out = child.wait_with_output().expect("openssl dgst");
    assert!(
        out.status.success(),
        "openssl dgst -sign failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!("{signing_input}.{}", b64(&out.stdout))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a Unix time (days to civil date, Howard Hinnant's algorithm).
fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `%XX` and `+` decoding of a query value.
fn percent_decode(input: &str) -> String {
    let bytes = input.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
