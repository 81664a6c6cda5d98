//! The fd holder: a small process of its own that keeps lazy mounts' `/dev/fuse` fds open
//! while no daemon runs (stopped, crashed, being upgraded), for where systemd's fd store is
//! not there. It is this binary (`lazysnap fd-holder`), started by the daemon in a session
//! of its own, so that signals and a crash of the daemon do not reach it.
//!
//! Protocol, on a Unix seqpacket socket (one message per request or answer, fds attached
//! with `SCM_RIGHTS`):
//! - `PUT <name>` + fd: hold the fd under that name (replacing one of the same name). `OK`.
//! - `DEL <name>`: close it. `OK`.
//! - `LIST`: one `FD <name>` + fd per held fd (copies: the holder keeps holding them), then
//!   `END`.
//!
//! Anything else is answered `ERR <why>`. The holder closes fds whose connection has ended
//! (the mount is gone: `/dev/fuse` polls as an error), exits when it holds nothing and no
//! daemon is connected (nothing to keep), and exits when its socket path is taken over by
//! another holder (it is stale: no daemon will find it again).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    accept4, bind, connect, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};

use super::scm;

/// Longest message: a name is at most 255 bytes.
const MAX_MESSAGE: usize = 1024;
/// How often a holder checks that its socket path is still its own.
const STALE_CHECK: Duration = Duration::from_secs(2);
/// How long a new holder waits for its first daemon before giving up.
const FIRST_CLIENT_WAIT: Duration = Duration::from_secs(30);

/// What the holder keeps, and how many daemons are connected.
#[derive(Debug, Default)]
struct Held {
    fds: HashMap<String, OwnedFd>,
    clients: usize,
    ever_connected: bool,
}

/// Runs the holder on `socket_path` until it has nothing left to hold (see the module doc).
/// With `detach`, first forks away from the caller (which then exits at once) into a new
/// session: the daemon reaps the short-lived parent, and the holder is nobody's child.
///
/// Call from a single-threaded process (it forks).
pub fn run(socket_path: &Path, detach: bool) -> io::Result<()> {
    if detach {
        // SAFETY: the process is single-threaded here (the CLI runs this before starting any
        // runtime or thread), so the child may run arbitrary code after fork.
        match unsafe { nix::unistd::fork() }? {
            nix::unistd::ForkResult::Parent { .. } => return Ok(()),
            nix::unistd::ForkResult::Child => {
                nix::unistd::setsid()?;
            }
        }
    }
    let listener = bind_listener(socket_path)?;
    let bound = std::fs::symlink_metadata(socket_path)?.ino();
    let held = Arc::new(Mutex::new(Held::default()));
    {
        let held = held.clone();
        let path = socket_path.to_path_buf();
        let started = Instant::now();
        std::thread::Builder::new()
            .name("stale-check".to_owned())
            .spawn(move || watch(&path, bound, &held, started))?;
    }
    loop {
        let raw = match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            Ok(raw) => raw,
            Err(nix::errno::Errno::EINTR | nix::errno::Errno::ECONNABORTED) => continue,
            Err(e) => return Err(e.into()),
        };
        // SAFETY: accept4 returned a new fd that nothing else owns.
        let client = unsafe { OwnedFd::from_raw_fd(raw) };
        lock(&held).clients += 1;
        lock(&held).ever_connected = true;
        let held = held.clone();
        std::thread::Builder::new()
            .name("client".to_owned())
            .spawn(move || {
                let _ = serve_client(client.as_fd(), &held);
                let mut held = lock(&held);
                held.clients -= 1;
                if held.clients == 0 && held.fds.is_empty() {
                    std::process::exit(0);
                }
            })?;
    }
}

fn lock(held: &Mutex<Held>) -> std::sync::MutexGuard<'_, Held> {
    held.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Exits when the socket path no longer names our socket (a newer holder took it, or it was
/// removed), or when no daemon came at all; closes fds of connections that ended.
fn watch(path: &Path, bound: u64, held: &Mutex<Held>, started: Instant) {
    loop {
        std::thread::sleep(STALE_CHECK);
        let ours = std::fs::symlink_metadata(path).is_ok_and(|m| m.ino() == bound);
        let mut state = lock(held);
        state.fds.retain(|_, fd| !ended(fd.as_fd()));
        if state.fds.is_empty() && state.clients == 0 && state.ever_connected {
            std::process::exit(0);
        }
        let unused =
            !state.ever_connected && state.fds.is_empty() && started.elapsed() > FIRST_CLIENT_WAIT;
        if !ours || unused {
            std::process::exit(0);
        }
    }
}

/// Whether `fd` polls as an error or hang-up right now: for `/dev/fuse`, its connection was
/// aborted (unmounted and gone); a socket or pipe whose peer is gone.
fn ended(fd: BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd, PollFlags::empty())];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0].revents().is_some_and(|r| {
            r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL)
        }),
        Err(_) => false,
    }
}

fn bind_listener(path: &Path) -> io::Result<OwnedFd> {
    let listener = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // Only reached when no holder answers there: whatever is at the path is stale.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    bind(listener.as_raw_fd(), &UnixAddr::new(path)?)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    listen(&listener, Backlog::new(16)?)?;
    Ok(listener)
}

fn serve_client(client: BorrowedFd<'_>, held: &Mutex<Held>) -> io::Result<()> {
    let mut buf = [0u8; MAX_MESSAGE];
    loop {
        let (len, mut fds) = scm::recv(client, &mut buf)?;
        if len == 0 {
            return Ok(());
        }
        let request = String::from_utf8_lossy(&buf[..len]).into_owned();
        let (verb, name) = request.split_once(' ').unwrap_or((request.as_str(), ""));
        match (verb, fds.pop()) {
            ("PUT", Some(fd)) if !name.is_empty() => {
                lock(held).fds.insert(name.to_owned(), fd);
                scm::send(client, None, b"OK", &[])?;
            }
            ("DEL", None) if !name.is_empty() => {
                lock(held).fds.remove(name);
                scm::send(client, None, b"OK", &[])?;
            }
            ("LIST", None) => {
                // Copies, so that sending (which may block) runs without the lock.
                let copies: Vec<(String, io::Result<OwnedFd>)> = lock(held)
                    .fds
                    .iter()
                    .map(|(name, fd)| (name.clone(), fd.try_clone()))
                    .collect();
                for (name, fd) in copies {
                    let fd = fd?;
                    scm::send(client, None, format!("FD {name}").as_bytes(), &[fd.as_fd()])?;
                }
                scm::send(client, None, b"END", &[])?;
            }
            _ => scm::send(
                client,
                None,
                format!(
                    "ERR cannot do {verb:?} with {} fds",
                    usize::from(!fds.is_empty())
                )
                .as_bytes(),
                &[],
            )?,
        }
    }
}

/// Why the holder could not be reached or refused a request.
#[derive(Debug, thiserror::Error)]
pub enum HolderError {
    #[error("fd holder at {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("fd holder at {} answered {answer:?}", path.display())]
    Refused { path: PathBuf, answer: String },
    #[error("fd holder at {} did not start", path.display())]
    NotStarted { path: PathBuf },
}

/// A daemon's connection to the holder. Requests are serialised: one answer per request.
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    socket: Mutex<OwnedFd>,
}

impl Client {
    /// Connects to the holder at `path`.
    pub fn connect(path: &Path) -> Result<Self, HolderError> {
        let io = |source| HolderError::Io {
            path: path.to_path_buf(),
            source,
        };
        let socket = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| io(e.into()))?;
        let address = UnixAddr::new(path).map_err(|e| io(e.into()))?;
        connect(socket.as_raw_fd(), &address).map_err(|e| io(e.into()))?;
        Ok(Self {
            path: path.to_path_buf(),
            socket: Mutex::new(socket),
        })
    }

    /// Connects to the holder at `path`, starting one (`exe fd-holder --socket path`) if
    /// none answers there.
    pub fn connect_or_start(path: &Path, exe: &Path) -> Result<Self, HolderError> {
        if let Ok(client) = Self::connect(path) {
            return Ok(client);
        }
        let status = std::process::Command::new(exe)
            .arg("fd-holder")
            .arg("--socket")
            .arg(path)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status()
            .map_err(|source| HolderError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        if !status.success() {
            return Err(HolderError::NotStarted {
                path: path.to_path_buf(),
            });
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match Self::connect(path) {
                Ok(client) => return Ok(client),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => {
                    return Err(HolderError::NotStarted {
                        path: path.to_path_buf(),
                    })
                }
            }
        }
    }

    fn io(&self, source: io::Error) -> HolderError {
        HolderError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn request(&self, message: &str, fd: Option<BorrowedFd<'_>>) -> Result<(), HolderError> {
        let socket = self.socket.lock().unwrap_or_else(PoisonError::into_inner);
        let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        scm::send(socket.as_fd(), None, message.as_bytes(), &fds).map_err(|e| self.io(e))?;
        let mut buf = [0u8; MAX_MESSAGE];
        let (len, _) = scm::recv(socket.as_fd(), &mut buf).map_err(|e| self.io(e))?;
        match &buf[..len] {
            b"OK" => Ok(()),
            answer => Err(HolderError::Refused {
                path: self.path.clone(),
                answer: String::from_utf8_lossy(answer).into_owned(),
            }),
        }
    }

    /// Hands `fd` to the holder under `name`.
    pub fn put(&self, name: &str, fd: BorrowedFd<'_>) -> Result<(), HolderError> {
        self.request(&format!("PUT {name}"), Some(fd))
    }

    /// Has the holder close the fd it holds under `name`.
    pub fn remove(&self, name: &str) -> Result<(), HolderError> {
        self.request(&format!("DEL {name}"), None)
    }

    /// Copies of every fd the holder holds, with their names.
    pub fn list(&self) -> Result<Vec<(String, OwnedFd)>, HolderError> {
        let socket = self.socket.lock().unwrap_or_else(PoisonError::into_inner);
        scm::send(socket.as_fd(), None, b"LIST", &[]).map_err(|e| self.io(e))?;
        let mut held = Vec::new();
        let mut buf = [0u8; MAX_MESSAGE];
        loop {
            let (len, mut fds) = scm::recv(socket.as_fd(), &mut buf).map_err(|e| self.io(e))?;
            let message = &buf[..len];
            if message == b"END" {
                return Ok(held);
            }
            match (message.strip_prefix(b"FD "), fds.pop()) {
                (Some(name), Some(fd)) => {
                    held.push((String::from_utf8_lossy(name).into_owned(), fd));
                }
                _ => {
                    return Err(HolderError::Refused {
                        path: self.path.clone(),
                        answer: String::from_utf8_lossy(message).into_owned(),
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same_file(a: &impl AsFd, b: &impl AsFd) -> bool {
        let (a, b) = (
            nix::sys::stat::fstat(a.as_fd()).expect("fstat"),
            nix::sys::stat::fstat(b.as_fd()).expect("fstat"),
        );
        (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
    }

    /// A holder process (this test binary running `holder_process`), killed when dropped.
    struct Holder(std::process::Child);

    impl Drop for Holder {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn spawn_holder(path: &Path) -> Holder {
        let exe = std::env::current_exe().expect("test binary");
        let child = std::process::Command::new(exe)
            .args([
                "--exact",
                "takeover::holder::tests::holder_process",
                "--ignored",
                "-q",
            ])
            .env("LAZYSNAP_TEST_HOLDER_SOCKET", path)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn holder");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !path.exists() {
            assert!(Instant::now() < deadline, "holder did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        Holder(child)
    }

    /// Runs a holder at `$LAZYSNAP_TEST_HOLDER_SOCKET`; only meaningful as the child of the
    /// tests here.
    #[test]
    #[ignore = "run by other tests as the holder process"]
    fn holder_process() {
        let Some(path) = std::env::var_os("LAZYSNAP_TEST_HOLDER_SOCKET") else {
            return;
        };
        run(Path::new(&path), false).expect("holder");
    }

    #[test]
    fn fds_put_are_listed_to_the_next_client_until_removed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("holder.sock");
        let mut holder = spawn_holder(&path);
        let (a, b) = (
            tempfile::tempfile().expect("file"),
            tempfile::tempfile().expect("file"),
        );
        {
            let daemon = Client::connect(&path).expect("connect");
            daemon.put("lazysnap~a", a.as_fd()).expect("put a");
            daemon.put("lazysnap~b", b.as_fd()).expect("put b");
            // Replacing keeps one entry per name.
            daemon.put("lazysnap~b", b.as_fd()).expect("put b again");
            // The first daemon goes (as a crash would close its socket).
        }
        let next = Client::connect(&path).expect("the next daemon connects");
        let mut held = next.list().expect("list");
        held.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(held.len(), 2);
        assert_eq!(held[0].0, "lazysnap~a");
        assert!(same_file(&held[0].1, &a));
        assert!(same_file(&held[1].1, &b));
        // Listing gives copies: the holder still has them.
        assert_eq!(next.list().expect("list again").len(), 2);

        next.remove("lazysnap~a").expect("remove");
        next.remove("lazysnap~b").expect("remove");
        assert!(next.list().expect("list").is_empty());
        assert!(
            holder.0.try_wait().expect("wait").is_none(),
            "a client is connected"
        );
        drop(next);
        // Nothing held, nobody connected: the holder has nothing to do and exits.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(status) = holder.0.try_wait().expect("wait") {
                assert!(status.success(), "{status}");
                break;
            }
            assert!(Instant::now() < deadline, "an empty holder must exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn malformed_requests_are_refused_and_the_connection_stays() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("holder.sock");
        let _holder = spawn_holder(&path);
        let client = Client::connect(&path).expect("connect");
        let err = client
            .request("PUT name-without-fd", None)
            .expect_err("no fd");
        assert!(matches!(err, HolderError::Refused { .. }), "{err}");
        assert!(client.request("HELLO", None).is_err());
        assert!(client.list().expect("still answers").is_empty());
    }

    /// A held fd whose other end is gone (for `/dev/fuse`: the connection ended) is closed,
    /// and a holder left with nothing and no daemon exits.
    #[test]
    fn fds_of_ended_connections_are_closed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("holder.sock");
        let mut holder = spawn_holder(&path);
        let (ours, theirs) = nix::unistd::pipe().expect("pipe");
        Client::connect(&path)
            .expect("connect")
            .put("lazysnap~pipe", ours.as_fd())
            .expect("put");
        drop(ours);
        assert!(!ended(theirs.as_fd()));
        // The write end goes: the held read end hangs up.
        drop(theirs);
        let deadline = Instant::now() + STALE_CHECK * 3;
        while holder.0.try_wait().expect("wait").is_none() {
            assert!(
                Instant::now() < deadline,
                "the holder must drop the ended fd and exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A holder whose socket path another holder took is stale: it exits, whatever it holds.
    #[test]
    fn a_holder_whose_socket_was_replaced_exits() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("holder.sock");
        let mut old = spawn_holder(&path);
        let file = tempfile::tempfile().expect("file");
        Client::connect(&path)
            .expect("connect")
            .put("lazysnap~x", file.as_fd())
            .expect("put");
        std::fs::remove_file(&path).expect("unlink");
        let _new = spawn_holder(&path);
        let deadline = Instant::now() + STALE_CHECK * 3;
        while old.0.try_wait().expect("wait").is_none() {
            assert!(Instant::now() < deadline, "the stale holder must exit");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(Client::connect(&path)
            .expect("the new holder answers")
            .list()
            .expect("list")
            .is_empty());
    }
}
