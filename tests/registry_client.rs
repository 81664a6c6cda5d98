//! The registry client against real `docker-registry` processes: ranged reads, mirrors from a
//! containerd-style hosts directory with fallback to the origin, reuse of a redirected blob URL
//! (through a tiny redirecting front, the one behaviour docker-registry's filesystem storage
//! cannot show), and a bounded failure when every host is down. Servers that lie about sizes
//! (a huge body for a small range, a whole blob instead of a range, an endless token answer)
//! are tiny in-process fronts on 127.0.0.1: the client must refuse them without buffering.

mod harness;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::process::{free_port, wait_for, Proc};
use lazysnap::registry::{Reference, RegistryClient, RegistryConfig, RegistryError};
use sha2::{Digest as _, Sha256};

fn start_registry(dir: &Path, storage: &Path, name: &str) -> (Proc, u16) {
    harness::packages::ensure();
    let port = free_port();
    let config = dir.join(format!("{name}.yml"));
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            storage.display()
        ),
    )
    .expect("registry config");
    let mut cmd = Command::new("docker-registry");
    cmd.arg("serve").arg(&config);
    let mut proc = Proc::spawn(name, cmd, &dir.join(format!("{name}.log")));
    wait_for("the registry", Duration::from_secs(20), &mut proc, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    (proc, port)
}

/// Uploads `data` as a blob of repository `t` with the registry's monolithic upload API.
fn push_blob(port: u16, data: &[u8]) -> String {
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(data)));
    let http = |request: String, body: &[u8]| -> String {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream.write_all(request.as_bytes()).expect("send");
        stream.write_all(body).expect("send body");
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    };
    let answer = http(
        "POST /v2/t/blobs/uploads/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned(),
        b"",
    );
    let location = answer
        .lines()
        .find_map(|l| l.strip_prefix("Location: "))
        .expect("upload location")
        .trim()
        .to_owned();
    let path = location
        .split_once("127.0.0.1")
        .map_or(location.as_str(), |(_, rest)| {
            rest.split_once('/').map_or(rest, |(_, p)| p)
        });
    let path = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    let sep = if path.contains('?') { '&' } else { '?' };
    let answer = http(
        format!(
            "PUT {path}{sep}digest={digest} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
            data.len()
        ),
        data,
    );
    assert!(
        answer.starts_with("HTTP/1.1 201"),
        "upload failed: {answer}"
    );
    digest
}

fn blob_gets(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"GET /v2/t/blobs/"))
        .count()
}

fn client(hosts_dir: Option<&Path>, deadline: Duration) -> RegistryClient {
    RegistryClient::new(RegistryConfig {
        request_timeout: Duration::from_secs(2),
        read_deadline: deadline,
        docker_config: None,
        hosts_dir: hosts_dir.map(Path::to_path_buf),
    })
    .expect("client")
}

#[tokio::test(flavor = "multi_thread")]
async fn mirror_first_then_origin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = dir.path().join("storage");
    let (_origin, origin_port) = start_registry(dir.path(), &storage, "origin");
    let data = harness::image::pseudo_random(300_000, 9);
    let digest = push_blob(origin_port, &data);
    // The mirror serves the same storage, as a pull-through cache would.
    let (mut mirror, mirror_port) = start_registry(dir.path(), &storage, "mirror");
    let hosts = dir.path().join("certs.d");
    std::fs::create_dir_all(hosts.join(format!("127.0.0.1:{origin_port}"))).expect("hosts dir");
    std::fs::write(
        hosts.join(format!("127.0.0.1:{origin_port}/hosts.toml")),
        format!("server = \"http://127.0.0.1:{origin_port}\"\n[host.\"http://127.0.0.1:{mirror_port}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"),
    )
    .expect("hosts.toml");
    let reference = Reference::parse(&format!("127.0.0.1:{origin_port}/t:1")).expect("reference");
    let client = client(Some(&hosts), Duration::from_secs(10));

    let bytes = client
        .read_range(&reference, &digest, 1000..5000)
        .await
        .expect("read via mirror");
    assert_eq!(bytes.as_ref(), &data[1000..5000]);
    assert_eq!(
        client.blob_size(&reference, &digest).await.expect("size"),
        data.len() as u64
    );
    assert_eq!(
        blob_gets(&dir.path().join("mirror.log")),
        1,
        "the mirror served the read"
    );
    assert_eq!(
        blob_gets(&dir.path().join("origin.log")),
        0,
        "the origin was not asked"
    );

    mirror.stop(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(5));
    for start in [0u64, 100_000, 200_000] {
        let bytes = client
            .read_range(&reference, &digest, start..start + 4096)
            .await
            .expect("read falls back to the origin");
        assert_eq!(bytes.as_ref(), &data[start as usize..start as usize + 4096]);
    }
    assert_eq!(blob_gets(&dir.path().join("origin.log")), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn redirected_blob_url_is_reused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_origin, origin_port) = start_registry(dir.path(), &dir.path().join("storage"), "origin");
    let data = harness::image::pseudo_random(100_000, 4);
    let digest = push_blob(origin_port, &data);

    // A front that answers every request with a redirect to the real registry.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let front_port = listener.local_addr().expect("addr").port();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let mut buf = vec![0u8; 4096];
            let n = stream.read(&mut buf).await.unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]).into_owned();
            let path = request.split_whitespace().nth(1).unwrap_or("/").to_owned();
            let answer = format!(
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:{origin_port}{path}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = stream.write_all(answer.as_bytes()).await;
        }
    });
    let reference = Reference::parse(&format!("127.0.0.1:{front_port}/t:1")).expect("reference");
    let client = client(None, Duration::from_secs(10));
    for start in [0u64, 50_000, 90_000] {
        let bytes = client
            .read_range(&reference, &digest, start..start + 1000)
            .await
            .expect("read");
        assert_eq!(bytes.as_ref(), &data[start as usize..start as usize + 1000]);
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "later reads go straight to the redirected URL"
    );
    assert_eq!(blob_gets(&dir.path().join("origin.log")), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_registry_fails_within_the_deadline() {
    let port = free_port();
    let reference = Reference::parse(&format!("127.0.0.1:{port}/t:1")).expect("reference");
    let client = client(None, Duration::from_secs(2));
    let started = Instant::now();
    let err = client
        .read_range(&reference, &format!("sha256:{}", "0".repeat(64)), 0..10)
        .await
        .expect_err("nothing listens");
    assert!(matches!(err, RegistryError::Unavailable { .. }), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
}

/// What a hostile front answers.
#[derive(Clone, Copy)]
enum Lie {
    /// A valid 206 head for the range asked, then `HUGE` bytes with no length (until close).
    EndlessPartial,
    /// A 206 announcing `HUGE` bytes in Content-Length.
    AnnouncedPartial,
    /// 200 and the "whole blob" of `HUGE` bytes, ignoring Range.
    WholeBlob,
    /// A bearer challenge whose token endpoint answers `HUGE` bytes with no length.
    EndlessToken,
}

/// Half a gigabyte: far more than any test may hold in memory.
const HUGE: u64 = 512 * 1024 * 1024;

/// Starts a front answering every request with `lie`; returns its port and a channel that
/// gets, per connection, how many body bytes the front managed to write before the client
/// hung up.
async fn hostile_front(lie: Lie) -> (u16, tokio::sync::mpsc::UnboundedReceiver<u64>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (sent_tx, sent_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let sent_tx = sent_tx.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                // Requests on this connection until one gets an endless body: the client
                // asks for its token on the connection the challenge came on.
                loop {
                    let mut head = Vec::new();
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    let range = head
                        .lines()
                        .find_map(|l| l.strip_prefix("range: ").or(l.strip_prefix("Range: ")))
                        .and_then(|r| r.trim().strip_prefix("bytes="))
                        .unwrap_or("0-0")
                        .to_owned();
                    let answer = match lie {
                    Lie::EndlessPartial => format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {range}/{HUGE}\r\nConnection: close\r\n\r\n"
                    ),
                    Lie::AnnouncedPartial => format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {range}/{HUGE}\r\nContent-Length: {HUGE}\r\n\r\n"
                    ),
                    Lie::WholeBlob => {
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {HUGE}\r\n\r\n")
                    }
                    Lie::EndlessToken if path.starts_with("/token") => {
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n".to_owned()
                    }
                    Lie::EndlessToken => format!(
                        "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"front\"\r\nContent-Length: 0\r\n\r\n"
                    ),
                };
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                    if !answer.contains("Content-Length: 0") {
                        break;
                    }
                }
                // Zeros (spaces for JSON), written as fast as the client takes them.
                let filler = if matches!(lie, Lie::EndlessToken) {
                    b' '
                } else {
                    0
                };
                let chunk = vec![filler; 64 * 1024];
                let mut sent = 0u64;
                while sent < HUGE {
                    if stream.write_all(&chunk).await.is_err() {
                        break;
                    }
                    sent += chunk.len() as u64;
                }
                let _ = sent_tx.send(sent);
            });
        }
    });
    (port, sent_rx)
}

/// This process's resident set, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Reads 64 bytes from a front telling `lie` and returns the error, checking that it came
/// fast, that the front could not push its whole body through, and that memory stayed flat.
async fn read_from_liar(lie: Lie) -> (RegistryError, u16, String) {
    let (port, mut sent) = hostile_front(lie).await;
    let reference = Reference::parse(&format!("127.0.0.1:{port}/t:1")).expect("reference");
    let digest = format!("sha256:{}", "ab".repeat(32));
    let client = client(None, Duration::from_secs(20));
    let rss_before = rss_kib();
    let started = Instant::now();
    let err = client
        .read_range(&reference, &digest, 0..64)
        .await
        .expect_err("a lying registry gives an error, not bytes");
    let elapsed = started.elapsed();
    let grown_mib = rss_kib().saturating_sub(rss_before) / 1024;
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}: {err}");
    assert!(grown_mib < 64, "memory grew by {grown_mib} MiB: {err}");
    // The front learns the client hung up when its writes fail.
    let written = tokio::time::timeout(Duration::from_secs(10), sent.recv())
        .await
        .expect("the client hung up")
        .expect("a connection");
    assert!(
        written < HUGE,
        "the front wrote its whole {HUGE}-byte body, so it was read"
    );
    (err, port, digest)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endless_range_body_is_cut_off_at_the_range_length() {
    let (err, port, digest) = read_from_liar(Lie::EndlessPartial).await;
    assert!(
        matches!(&err, RegistryError::TooLarge { limit: 64, .. }),
        "{err:?}"
    );
    let message = err.to_string();
    for needle in [
        format!("127.0.0.1:{port}"),
        digest,
        "0..64".to_owned(),
        "sent more than 64 bytes".to_owned(),
    ] {
        assert!(message.contains(&needle), "{message:?} lacks {needle:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_announced_huge_range_body_is_refused_before_reading() {
    let (err, _, _) = read_from_liar(Lie::AnnouncedPartial).await;
    assert!(
        matches!(&err, RegistryError::TooLarge { limit: 64, .. }),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_whole_blob_for_a_range_is_refused_without_reading_it() {
    let (err, _, _) = read_from_liar(Lie::WholeBlob).await;
    assert!(
        matches!(&err, RegistryError::BadResponse { reason, .. } if reason.contains("instead of 206")),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endless_token_answer_is_cut_off() {
    let (err, port, _) = read_from_liar(Lie::EndlessToken).await;
    assert!(
        matches!(&err, RegistryError::TooLarge { limit: 1_048_576, what, .. } if what.contains("token")),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains(&format!("http://127.0.0.1:{port}/token")),
        "{err}"
    );
}
