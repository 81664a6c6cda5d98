//! An emulated WAN link between a client and a server on loopback: a TCP proxy that delays
//! every byte by half a round trip and limits each direction of the link, shared by all
//! connections as one uplink would be, to a given bandwidth, so benchmarks can put a "remote" registry in front of containerd and lazysnap.
//!
//! Each direction is modelled as a serialising link: a chunk of `n` bytes occupies the link for
//! `n * 8 / bits_per_second`, queued behind earlier chunks of any connection (opening more
//! connections does not buy more bandwidth), and arrives half a round trip after
//! it left. Chunks in flight overlap, so pipelined requests pay the latency once, as on a real
//! link. A new connection also costs one round trip before its first byte leaves, as TCP's
//! handshake does.
//!
//! Plain std threads, as the harness is synchronous: per connection one reader and one writer
//! per direction, joined by a bounded channel (memory stays bounded; a full channel stops the
//! reader, and TCP's flow control then stops the sender). Dropping the [`Throttle`] shuts every
//! socket down, which wakes every blocked thread, and joins them all.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The most bytes one read takes off a socket: one chunk on the link.
const CHUNK: usize = 16 * 1024;

/// The longest a sleeping writer goes without looking at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(20);

/// A running proxy; dropping it stops the listener and every connection.
pub struct Throttle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

struct Shared {
    upstream: SocketAddr,
    /// Half the round-trip time: how long a byte is in flight.
    one_way: Duration,
    bytes_per_sec: f64,
    /// Chunks queued per direction: enough for twice the bandwidth-delay product.
    queue_chunks: usize,
    stop: AtomicBool,
    /// Bytes delivered to clients.
    down: AtomicU64,
    /// Bytes delivered to the upstream server.
    up: AtomicU64,
    /// When each direction of the link is next free, over all connections.
    link_up: Mutex<Instant>,
    link_down: Mutex<Instant>,
    conns: Mutex<Conns>,
}

#[derive(Default)]
struct Conns {
    next_id: u64,
    /// Both sockets of every live connection, so `drop` can shut them down.
    sockets: HashMap<u64, (TcpStream, TcpStream)>,
    threads: Vec<JoinHandle<()>>,
}

impl Shared {
    fn conns(&self) -> MutexGuard<'_, Conns> {
        // A panicking forwarder must not keep `drop` from shutting the others down.
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

impl Throttle {
    /// Listens on a free 127.0.0.1 port and forwards every connection to `upstream` over a link
    /// of round-trip time `rtt` and `mbit` megabits per second in each direction.
    pub fn start(upstream: SocketAddr, rtt: Duration, mbit: f64) -> Throttle {
        assert!(
            mbit > 0.0 && mbit.is_finite(),
            "throttle bandwidth must be positive, got {mbit} Mbit/s"
        );
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the throttle's listener");
        let addr = listener.local_addr().expect("the throttle's address");
        let one_way = rtt / 2;
        let bytes_per_sec = mbit * 1e6 / 8.0;
        let bdp_chunks = (bytes_per_sec * one_way.as_secs_f64() / CHUNK as f64).ceil() as usize;
        // Small reads (HTTP requests) make chunks far smaller than CHUNK, hence the headroom.
        let queue_chunks = 2 * bdp_chunks + 64;
        let shared = Arc::new(Shared {
            upstream,
            one_way,
            bytes_per_sec,
            queue_chunks,
            stop: AtomicBool::new(false),
            down: AtomicU64::new(0),
            up: AtomicU64::new(0),
            link_up: Mutex::new(Instant::now()),
            link_down: Mutex::new(Instant::now()),
            conns: Mutex::new(Conns::default()),
        });
        let acceptor = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("throttle-accept".into())
                .spawn(move || accept_loop(listener, shared))
                .expect("spawn the throttle's accept thread")
        };
        Throttle {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Bytes delivered to clients so far (server to client).
    pub fn bytes_down(&self) -> u64 {
        self.shared.down.load(Ordering::SeqCst)
    }

    /// Bytes delivered to the upstream server so far (client to server).
    pub fn bytes_up(&self) -> u64 {
        self.shared.up.load(Ordering::SeqCst)
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        {
            // Set under the lock, so the acceptor cannot register a connection after the
            // sockets below were shut down.
            let _conns = self.shared.conns();
            self.shared.stop.store(true, Ordering::SeqCst);
        }
        // The acceptor is blocked in accept(); a connection of our own wakes it.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let threads = {
            let mut conns = self.shared.conns();
            for (client, upstream) in conns.sockets.values() {
                let _ = client.shutdown(Shutdown::Both);
                let _ = upstream.shutdown(Shutdown::Both);
            }
            std::mem::take(&mut conns.threads)
        };
        for thread in threads {
            let _ = thread.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for client in listener.incoming() {
        if shared.stopping() {
            return;
        }
        let accepted = Instant::now();
        let client = match client {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                eprintln!("throttle: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let upstream = match TcpStream::connect_timeout(&shared.upstream, Duration::from_secs(5)) {
            Ok(u) => u,
            Err(_) => {
                // The server is down: the client sees its connection reset, as it would.
                reset(&client);
                continue;
            }
        };
        // Latency is the link's business; Nagle would only add delays of its own.
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let (Ok(client_ref), Ok(upstream_ref)) = (client.try_clone(), upstream.try_clone()) else {
            reset(&client);
            continue;
        };
        let mut conns = shared.conns();
        if shared.stopping() {
            return;
        }
        let id = conns.next_id;
        conns.next_id += 1;
        conns.sockets.insert(id, (client_ref, upstream_ref));
        conns.threads.retain(|t| !t.is_finished());
        let shared2 = shared.clone();
        match std::thread::Builder::new()
            .name(format!("throttle-conn-{id}"))
            .spawn(move || {
                forward(&shared2, client, upstream, accepted);
                shared2.conns().sockets.remove(&id);
            }) {
            Ok(thread) => conns.threads.push(thread),
            Err(e) => {
                eprintln!("throttle: spawn a connection thread: {e}");
                if let Some((client, _)) = conns.sockets.remove(&id) {
                    reset(&client);
                }
            }
        }
    }
}

/// What a reader hands its writer.
enum Msg {
    /// Bytes to deliver at the instant they arrive at the far end.
    Data(Vec<u8>, Instant),
    /// The sender shut down its writing side; pass the FIN on when it arrives.
    Eof(Instant),
    /// The sender's connection failed (reset); the whole connection is being torn down.
    Reset,
}

/// Forwards both directions of one connection until both are finished.
fn forward(shared: &Shared, client: TcpStream, upstream: TcpStream, accepted: Instant) {
    let sockets = (|| {
        Ok::<_, std::io::Error>((
            client.try_clone()?,
            client.try_clone()?,
            upstream.try_clone()?,
            upstream.try_clone()?,
        ))
    })();
    let Ok((client_r, client_w, upstream_r, upstream_w)) = sockets else {
        abort(&client, &upstream);
        return;
    };
    let abort_all = || abort(&client, &upstream);
    let abort_all: &(dyn Fn() + Sync) = &abort_all;
    std::thread::scope(|s| {
        let (up_tx, up_rx) = sync_channel(shared.queue_chunks);
        let (down_tx, down_rx) = sync_channel(shared.queue_chunks);
        // The client's first byte leaves one round trip after its connect, as the handshake
        // of a real connection would have taken that long.
        let up_free = accepted + 2 * shared.one_way;
        s.spawn(move || read_side(shared, client_r, up_tx, up_free, &shared.link_up, abort_all));
        s.spawn(move || write_side(shared, upstream_w, up_rx, &shared.up, abort_all));
        s.spawn(move || {
            read_side(
                shared,
                upstream_r,
                down_tx,
                accepted,
                &shared.link_down,
                abort_all,
            )
        });
        s.spawn(move || write_side(shared, client_w, down_rx, &shared.down, abort_all));
    });
}

/// Reads `src` and schedules each chunk on the link: it leaves once the chunks before it (of
/// every connection in this direction) have, not before `not_before`, and arrives `one_way`
/// after it finished leaving.
fn read_side(
    shared: &Shared,
    mut src: TcpStream,
    tx: SyncSender<Msg>,
    not_before: Instant,
    link: &Mutex<Instant>,
    abort_all: &dyn Fn(),
) {
    // This connection's own last departure, so its chunks stay in order.
    let mut own_free = not_before;
    loop {
        let mut buf = vec![0u8; CHUNK];
        let read = src.read(&mut buf);
        let now = Instant::now();
        let msg = match read {
            Ok(0) => Msg::Eof(own_free.max(now) + shared.one_way),
            Ok(n) => {
                buf.truncate(n);
                let occupied = Duration::from_secs_f64(n as f64 / shared.bytes_per_sec);
                let mut free = link.lock().unwrap_or_else(|p| p.into_inner());
                let start = (*free).max(now).max(own_free);
                *free = start + occupied;
                own_free = *free;
                Msg::Data(buf, own_free + shared.one_way)
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) if shared.stopping() => return,
            Err(_) => {
                // The data still queued is lost, as a reset loses it.
                abort_all();
                Msg::Reset
            }
        };
        let last = !matches!(msg, Msg::Data(..));
        // A send fails only when the writer has gone, i.e. the connection is being torn down.
        if tx.send(msg).is_err() || last {
            return;
        }
    }
}

/// Delivers the chunks of one direction to `dst`, each at its arrival time.
fn write_side(
    shared: &Shared,
    mut dst: TcpStream,
    rx: Receiver<Msg>,
    counter: &AtomicU64,
    abort_all: &dyn Fn(),
) {
    // recv fails once the reader has gone and the queue is empty.
    while let Ok(msg) = rx.recv() {
        match msg {
            Msg::Data(buf, at) => {
                if !sleep_until(at, &shared.stop) {
                    return;
                }
                if dst.write_all(&buf).is_err() {
                    // The receiver went away: so does the sender's side.
                    abort_all();
                    return;
                }
                counter.fetch_add(buf.len() as u64, Ordering::SeqCst);
            }
            Msg::Eof(at) => {
                if sleep_until(at, &shared.stop) {
                    let _ = dst.shutdown(Shutdown::Write);
                }
                return;
            }
            Msg::Reset => return,
        }
    }
}

/// Sleeps until `at`; false when the throttle is being stopped first.
fn sleep_until(at: Instant, stop: &AtomicBool) -> bool {
    loop {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        let now = Instant::now();
        if now >= at {
            return true;
        }
        std::thread::sleep((at - now).min(STOP_POLL));
    }
}

/// Tears a connection down on both sides: every blocked thread wakes up, and each peer gets a
/// reset once the last handle closes.
fn abort(client: &TcpStream, upstream: &TcpStream) {
    for socket in [client, upstream] {
        set_linger_zero(socket);
        let _ = socket.shutdown(Shutdown::Both);
    }
}

/// Closes `socket` with a reset rather than a FIN.
fn reset(socket: &TcpStream) {
    set_linger_zero(socket);
    let _ = socket.shutdown(Shutdown::Both);
}

/// SO_LINGER with a zero timeout: closing the socket sends RST. std has no stable setter.
fn set_linger_zero(socket: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the fd is open for the lifetime of `socket`, and `linger` is a valid value of
    // the size passed.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server running `serve` on each connection, until the test process ends.
    fn server(serve: fn(TcpStream)) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind test server");
        let addr = listener.local_addr().expect("test server address");
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                std::thread::spawn(move || serve(conn));
            }
        });
        addr
    }

    fn echo(mut conn: TcpStream) {
        let mut buf = [0u8; 8192];
        while let Ok(n) = conn.read(&mut buf) {
            if n == 0 || conn.write_all(&buf[..n]).is_err() {
                return;
            }
        }
    }

    /// Sends 1,000,000 bytes, then closes.
    fn source(mut conn: TcpStream) {
        let _ = conn.write_all(&vec![7u8; 1_000_000]);
    }

    /// Sends until the peer goes away.
    fn endless(mut conn: TcpStream) {
        let buf = [1u8; 65536];
        while conn.write_all(&buf).is_ok() {}
    }

    #[test]
    fn bytes_arrive_intact_both_ways_and_eof_propagates() {
        let throttle = Throttle::start(server(echo), Duration::from_millis(2), 1000.0);
        let mut conn = TcpStream::connect(throttle.addr()).expect("connect");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut writer = conn.try_clone().expect("clone");
        let sent = data.clone();
        let sender = std::thread::spawn(move || {
            writer.write_all(&sent).expect("send");
            // The echo server sees EOF only if our FIN crosses the proxy.
            writer.shutdown(Shutdown::Write).expect("shutdown");
        });
        let mut back = Vec::new();
        conn.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        // read_to_end ends only when the server's FIN crosses back.
        conn.read_to_end(&mut back).expect("read echo until EOF");
        sender.join().expect("sender");
        assert!(back == data, "echoed bytes differ from the sent ones");
        assert_eq!(throttle.bytes_up(), data.len() as u64);
        assert_eq!(throttle.bytes_down(), data.len() as u64);
    }

    #[test]
    fn a_round_trip_takes_at_least_the_rtt() {
        let rtt = Duration::from_millis(60);
        let throttle = Throttle::start(server(echo), rtt, 100.0);
        let mut conn = TcpStream::connect(throttle.addr()).expect("connect");
        let mut byte = [0u8; 1];
        for round in 0..2 {
            let start = Instant::now();
            conn.write_all(b"x").expect("send");
            conn.read_exact(&mut byte).expect("receive");
            let took = start.elapsed();
            assert!(took >= rtt, "round trip {round} took {took:?} < {rtt:?}");
        }
    }

    #[test]
    fn bandwidth_is_limited() {
        // 1 MB at 80 Mbit/s is 100 ms on the wire.
        let throttle = Throttle::start(server(source), Duration::from_millis(2), 80.0);
        let start = Instant::now();
        let mut conn = TcpStream::connect(throttle.addr()).expect("connect");
        let mut got = Vec::new();
        conn.read_to_end(&mut got).expect("read");
        let took = start.elapsed();
        assert_eq!(got.len(), 1_000_000);
        assert!(took >= Duration::from_millis(100), "1 MB took {took:?}");
        // Far from exact on a busy CI machine, but a link that does not pipeline is slower.
        assert!(took < Duration::from_millis(1000), "1 MB took {took:?}");
    }

    #[test]
    fn drop_stops_everything() {
        let throttle = Throttle::start(server(endless), Duration::from_millis(40), 10.0);
        let addr = throttle.addr();
        let mut conn = TcpStream::connect(addr).expect("connect");
        let mut buf = [0u8; 4096];
        conn.read_exact(&mut buf).expect("first bytes");
        let start = Instant::now();
        drop(throttle);
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "drop took {:?}",
            start.elapsed()
        );
        // What was delivered may still be read; then the connection must end, not hang.
        conn.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        loop {
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) => {
                    assert!(
                        !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
                        "connection still open after drop"
                    );
                    break;
                }
            }
        }
        assert!(
            TcpStream::connect(addr).is_err(),
            "the listener still accepts"
        );
    }
}
