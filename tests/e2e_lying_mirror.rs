//! A registry mirror that lies with endless bodies, through real containerd and
//! docker-registry: the mirror named in lazysnap's `hosts.toml` for the origin answers a range
//! GET with a valid-looking `206 Partial Content` and then zeros without end (chunked, or
//! delimited only by the connection closing), or announces a 3 GiB `Content-Length`. A
//! container reading a multi-MiB file of a lazy layer still gets the right bytes, promptly,
//! from the origin; lazysnap's memory stays flat, the mirror gets out no more than the range
//! and the socket buffers before lazysnap hangs up, and the log names the mirror's failure.
//!
//! The mirror is an in-process HTTP/1.1 server on 127.0.0.1. It is an honest pull-through
//! proxy of the origin while the image is pulled (so lazysnap's reads of footer and TOC go to
//! it, proving it is in use) and starts lying once armed; HEADs and everything but range GETs
//! are always proxied.

mod harness;

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::estargz::{self, File};
use harness::image::{self, ImageSpec};
use harness::process::poll_until;
use harness::Stack;
use sha2::{Digest as _, Sha256};

const LAZYSNAP: &str = env!("CARGO_BIN_EXE_lazysnap");
const MIRROR_FAILED: &str = "mirror failed; trying the next host";

/// What the lying mirror would send for one range if nobody hung up: 3 GiB.
const ENDLESS: u64 = 3 << 30;
/// Bytes of the file the container reads (one chunk of the eStargz layer).
const BIG: usize = 6 << 20;

/// How the mirror answers a range GET.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Proxies it to the origin.
    Honest = 0,
    /// 206, `Transfer-Encoding: chunked`, zeros without end.
    Chunked = 1,
    /// 206, no length at all (`Connection: close`), zeros without end.
    UntilClose = 2,
    /// 206 announcing `Content-Length: ENDLESS`, then zeros.
    Announced = 3,
}

/// One lie told: the range asked for and what got out before the client hung up.
#[derive(Debug, Clone)]
struct Lie {
    range_len: u64,
    /// Body bytes the kernel took from the mirror (so at most what lazysnap could read).
    written: u64,
    /// The mirror's writes failed (lazysnap closed the connection), rather than the mirror
    /// stopping at `ENDLESS` or a write stalling for 20 s.
    hung_up: bool,
}

struct State {
    origin: String,
    mode: AtomicU8,
    honest_range_gets: AtomicUsize,
    open_lies: AtomicUsize,
    lies: Mutex<Vec<Lie>>,
    stop: AtomicBool,
}

struct LyingMirror {
    host: String,
    state: Arc<State>,
}

impl LyingMirror {
    fn start(origin: &str) -> LyingMirror {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the mirror");
        let host = listener.local_addr().expect("mirror address").to_string();
        let state = Arc::new(State {
            origin: origin.to_owned(),
            mode: AtomicU8::new(Mode::Honest as u8),
            honest_range_gets: AtomicUsize::new(0),
            open_lies: AtomicUsize::new(0),
            lies: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if shared.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let state = shared.clone();
                std::thread::spawn(move || {
                    let _ = serve(&state, stream);
                });
            }
        });
        LyingMirror { host, state }
    }

    fn set_mode(&self, mode: Mode) {
        self.state.mode.store(mode as u8, Ordering::SeqCst);
    }

    fn honest_range_gets(&self) -> usize {
        self.state.honest_range_gets.load(Ordering::SeqCst)
    }

    fn lies(&self) -> Vec<Lie> {
        self.state
            .lies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until every lying connection has ended; false after `timeout`.
    fn lies_ended(&self, timeout: Duration) -> bool {
        poll_until(timeout, Duration::from_millis(20), || {
            self.state.open_lies.load(Ordering::SeqCst) == 0
        })
    }
}

impl Drop for LyingMirror {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(&self.host);
    }
}

/// One request per connection, then close.
fn serve(state: &State, mut client: TcpStream) -> io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = client.read(&mut buf)?;
        if n == 0 || head.len() > 64 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_owned();
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or("/").to_owned();
    let headers: Vec<(String, String)> = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let range = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("range"))
        .and_then(|(_, v)| v.strip_prefix("bytes="))
        .map(str::to_owned);
    let mode = match state.mode.load(Ordering::SeqCst) {
        1 => Mode::Chunked,
        2 => Mode::UntilClose,
        3 => Mode::Announced,
        _ => Mode::Honest,
    };
    match range {
        Some(range) if method == "GET" && path.contains("/blobs/") && mode != Mode::Honest => {
            state.open_lies.fetch_add(1, Ordering::SeqCst);
            let result = lie(state, mode, &path, &range, &mut client);
            state.open_lies.fetch_sub(1, Ordering::SeqCst);
            result
        }
        range => {
            if range.is_some() && method == "GET" {
                state.honest_range_gets.fetch_add(1, Ordering::SeqCst);
            }
            proxy(&state.origin, &method, &path, &headers, &mut client).map(|_| ())
        }
    }
}

/// Forwards the request to the origin with `Connection: close` (the origin then says so too,
/// so the client does not reuse the connection) and copies the answer back.
fn proxy(
    origin: &str,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    client: &mut TcpStream,
) -> io::Result<u64> {
    let mut upstream = TcpStream::connect(origin)?;
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: {origin}\r\nConnection: close\r\n");
    for (k, v) in headers {
        if !k.eq_ignore_ascii_case("host") && !k.eq_ignore_ascii_case("connection") {
            request.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    request.push_str("\r\n");
    upstream.write_all(request.as_bytes())?;
    io::copy(&mut upstream, client)
}

/// The blob's real size, from a HEAD at the origin, so the lie's Content-Range looks right.
fn origin_size(origin: &str, path: &str) -> Option<u64> {
    let mut upstream = TcpStream::connect(origin).ok()?;
    upstream
        .write_all(
            format!("HEAD {path} HTTP/1.1\r\nHost: {origin}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .ok()?;
    let mut answer = String::new();
    upstream.read_to_string(&mut answer).ok()?;
    answer.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    })
}

/// A valid 206 head for `range` (`a-b`), then zeros until `ENDLESS` or until the client
/// hangs up.
fn lie(
    state: &State,
    mode: Mode,
    path: &str,
    range: &str,
    client: &mut TcpStream,
) -> io::Result<()> {
    let (a, b) = range.split_once('-').unwrap_or(("0", "0"));
    let (a, b): (u64, u64) = (a.parse().unwrap_or(0), b.parse().unwrap_or(0));
    let total = origin_size(&state.origin, path).unwrap_or(ENDLESS);
    let length = match mode {
        Mode::Chunked => "Transfer-Encoding: chunked\r\n".to_owned(),
        Mode::UntilClose => "Connection: close\r\n".to_owned(),
        Mode::Announced => format!("Content-Length: {ENDLESS}\r\n"),
        Mode::Honest => unreachable!("honest requests are proxied"),
    };
    let head = format!(
        "HTTP/1.1 206 Partial Content\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {a}-{b}/{total}\r\n{length}\r\n"
    );
    client.write_all(head.as_bytes())?;
    // A client that neither reads nor hangs up would hold the thread forever: give up after
    // 20 s of a stalled write (recorded as not hung up, which fails the test).
    client.set_write_timeout(Some(Duration::from_secs(20)))?;
    let zeros = vec![0u8; 64 * 1024];
    let mut framed = format!("{:x}\r\n", zeros.len()).into_bytes();
    framed.extend_from_slice(&zeros);
    framed.extend_from_slice(b"\r\n");
    let chunk: &[u8] = if mode == Mode::Chunked {
        &framed
    } else {
        &zeros
    };
    let mut written = 0u64;
    let mut hung_up = false;
    while written < ENDLESS {
        match client.write_all(chunk) {
            Ok(()) => written += zeros.len() as u64,
            Err(e) => {
                hung_up = !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                );
                break;
            }
        }
    }
    state
        .lies
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Lie {
            range_len: b.saturating_sub(a) + 1,
            written,
            hung_up,
        });
    Ok(())
}

/// `VmHWM` (peak resident set) and `VmRSS` of process `pid`, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn lazysnap_pid(stack: &Stack) -> u32 {
    stack
        .lazysnap
        .as_ref()
        .and_then(|p| p.pid())
        .expect("lazysnap's pid")
}

/// The current lazysnap's own log (not earlier nodes').
fn current_log(stack: &Stack) -> String {
    stack
        .lazysnap
        .as_ref()
        .and_then(|p| std::fs::read_to_string(&p.log).ok())
        .unwrap_or_default()
}

#[test]
fn a_mirror_sending_endless_bodies_is_cut_off_and_reads_come_from_the_origin() {
    let started = Instant::now();
    let cfg = tempfile::Builder::new()
        .prefix("lazysnap-lying-mirror-")
        .tempdir()
        .expect("temp dir");
    let hosts_dir = cfg.path().join("certs.d");
    std::fs::create_dir_all(&hosts_dir).expect("create hosts dir");
    let config = cfg.path().join("lazysnap.toml");
    // lazysnap's default timeouts (10 s a request, 30 s a read): what ends a lie must be the
    // cut-off at the range's length, not a timeout.
    std::fs::write(
        &config,
        format!("[registry]\nhosts_dir = \"{}\"\n", hosts_dir.display()),
    )
    .expect("write lazysnap config");
    let mut stack = Stack::start_with(
        LAZYSNAP,
        vec!["--config".into(), config.display().to_string()],
    );
    let mirror = LyingMirror::start(&stack.registry_host);
    harness::stack::write_hosts_toml(&hosts_dir, &stack.registry_host, &mirror.host);

    // busybox unpacked by containerd, under one lazy eStargz layer whose big.bin is a single
    // 6 MiB chunk: the read of it is one range GET of about 6 MiB.
    let big = image::pseudo_random(BIG, 77);
    let want = hex::encode(Sha256::digest(&big));
    let files = [
        File::new("app/small.txt", "small\n"),
        File::new("app/big.bin", big),
    ];
    let spec = ImageSpec {
        layers: vec![image::busybox_layer()],
        blobs: vec![estargz::layer(&["app/"], &files).into()],
        cmd: vec!["/bin/sh".into()],
    };
    let reference = stack.image_ref("liar:1");
    image::push(&spec, &stack.dir, &reference);

    for (n, mode) in [Mode::UntilClose, Mode::Chunked, Mode::Announced]
        .into_iter()
        .enumerate()
    {
        if n > 0 {
            // A fresh lazysnap (and containerd): nothing cached, the mirror not yet known to
            // have failed.
            stack.new_node();
        }
        mirror.set_mode(Mode::Honest);
        let honest_before = mirror.honest_range_gets();
        stack.rpull(&reference);
        let layers = stack.lazy_layers();
        assert_eq!(layers.len(), 1, "the app layer is lazy: {layers:?}");
        let (layer, _) = &layers[0];
        assert!(
            mirror.honest_range_gets() > honest_before,
            "{mode:?}: lazysnap read the layer's footer and TOC from the mirror"
        );
        let pid = lazysnap_pid(&stack);
        let (hwm_before, _) = memory_kib(pid);
        let origin_before = stack.registry_blob_bytes_of(layer);
        let lies_before = mirror.lies().len();

        mirror.set_mode(mode);
        let read_started = Instant::now();
        let out = stack.run(
            "lazysnap",
            &reference,
            &format!("read-{n}"),
            "sha256sum /app/big.bin | cut -d' ' -f1",
        );
        let read_time = read_started.elapsed();
        assert_eq!(out.trim(), want, "{mode:?}: big.bin has its real bytes");
        assert!(
            read_time < Duration::from_secs(30),
            "{mode:?}: the container took {read_time:?}"
        );

        assert!(
            mirror.lies_ended(Duration::from_secs(10)),
            "{mode:?}: lazysnap still holds a lying connection open"
        );
        let lies: Vec<Lie> = mirror.lies().into_iter().skip(lies_before).collect();
        assert!(
            !lies.is_empty(),
            "{mode:?}: the mirror was asked for big.bin"
        );
        for lie in &lies {
            assert!(
                lie.hung_up,
                "{mode:?}: lazysnap hung up on the endless body: {lie:?}"
            );
            assert!(
                lie.written < 64 << 20,
                "{mode:?}: the mirror got {} bytes out for a range of {}: {lie:?}",
                lie.written,
                lie.range_len
            );
        }
        let from_origin = stack.registry_blob_bytes_of(layer) - origin_before;
        assert!(
            from_origin >= BIG as u64,
            "{mode:?}: big.bin came from the origin ({from_origin} bytes of {layer})"
        );

        let (hwm, rss) = memory_kib(pid);
        assert!(
            hwm < 200 << 10,
            "{mode:?}: lazysnap's peak resident set reached {} MiB",
            hwm >> 10
        );

        let log = current_log(&stack);
        let failures: Vec<&str> = log.lines().filter(|l| l.contains(MIRROR_FAILED)).collect();
        assert!(
            failures
                .iter()
                .any(|l| l.contains(&format!("mirror={}", mirror.host))
                    && l.contains(layer.as_str())
                    && l.contains("sent more than")),
            "{mode:?}: the log names the mirror's failure and why:\n{}",
            failures.join("\n")
        );
        assert_eq!(
            failures.len(),
            1,
            "{mode:?}: one warning for the layer and mirror:\n{}",
            failures.join("\n")
        );

        let line =
            format!(
            "{mode:?}: container read big.bin in {read_time:.2?}; {} lie(s), mirror got out {} \
             bytes for ranges of {} bytes; {from_origin} bytes from the origin; lazysnap VmHWM \
             {} MiB (before the lie {} MiB), VmRSS {} MiB",
            lies.len(),
            lies.iter().map(|l| l.written.to_string()).collect::<Vec<_>>().join("+"),
            lies.iter().map(|l| l.range_len.to_string()).collect::<Vec<_>>().join("+"),
            hwm >> 10,
            hwm_before >> 10,
            rss >> 10
        );
        eprintln!("{line}");
        eprintln!("  {}", failures[0]);
    }
    eprintln!("test took {:?}", started.elapsed());
}
