//! systemd's file descriptor store, spoken directly: `sd_notify` datagrams to
//! `$NOTIFY_SOCKET` (`FDSTORE=1` with the fd attached, `FDSTOREREMOVE=1`, `READY=1`), and the
//! fds a restarted service gets back (`$LISTEN_FDS` from fd 3 on, named in
//! `$LISTEN_FDNAMES`, for `$LISTEN_PID`). The unit needs `Type=notify` and
//! `FileDescriptorStoreMax=`; without the latter systemd drops stored fds silently.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType, UnixAddr};

use super::scm;

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// Where to send notifications: `$NOTIFY_SOCKET`.
#[derive(Debug)]
pub struct Notifier {
    address: UnixAddr,
    socket: OwnedFd,
}

impl Notifier {
    /// The notifier `$NOTIFY_SOCKET` names, if it is set (we run under systemd).
    pub fn from_env() -> Option<io::Result<Self>> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        Some(Self::new(path.as_bytes()))
    }

    /// A notifier for `path`; a leading `@` names an abstract socket, as systemd writes it.
    pub fn new(path: &[u8]) -> io::Result<Self> {
        let address = match path.strip_prefix(b"@") {
            Some(name) => UnixAddr::new_abstract(name)?,
            None => UnixAddr::new(path)?,
        };
        let socket = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        Ok(Self { address, socket })
    }

    /// Sends one notification.
    pub fn notify(&self, message: &str, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        scm::send(
            self.socket.as_fd(),
            Some(&self.address),
            message.as_bytes(),
            fds,
        )
    }

    /// Stores `fd` under `name` (replacing one of the same name).
    pub fn store(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.notify(&store_message(name), &[fd])
    }

    /// Drops the fd stored under `name`.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        self.notify(&remove_message(name), &[])
    }

    /// Tells systemd the service is up (`Type=notify`).
    pub fn ready(&self, status: &str) -> io::Result<()> {
        self.notify(&format!("READY=1\nSTATUS={status}"), &[])
    }
}

/// systemd polls stored fds for errors only, and `/dev/fuse` reports one once its connection
/// is aborted (the mount is gone): such an fd leaves the store by itself, as it should.
pub fn store_message(name: &str) -> String {
    format!("FDSTORE=1\nFDNAME={name}")
}

pub fn remove_message(name: &str) -> String {
    format!("FDSTOREREMOVE=1\nFDNAME={name}")
}

/// The fds systemd passed to process `pid`, as `(name, fd number)`: nothing if
/// `LISTEN_PID` names another process (the variables were inherited, not meant for us) or
/// `LISTEN_FDS` is missing or malformed. Unnamed fds are called `unknown`, as systemd does.
pub fn listen_fds(
    pid: u32,
    listen_pid: Option<&str>,
    listen_fds: Option<&str>,
    names: Option<&str>,
) -> Vec<(String, RawFd)> {
    if let Some(listen_pid) = listen_pid {
        if listen_pid.trim().parse::<u32>().ok() != Some(pid) {
            return Vec::new();
        }
    }
    let Some(count) = listen_fds.and_then(|n| n.trim().parse::<RawFd>().ok()) else {
        return Vec::new();
    };
    let mut names = names.unwrap_or("").split(':');
    (0..count.max(0))
        .map(|i| {
            let name = names.next().filter(|n| !n.is_empty()).unwrap_or("unknown");
            (name.to_owned(), LISTEN_FDS_START + i)
        })
        .collect()
}

/// Takes ownership of the fds systemd passed this process. Call once, early: the numbers
/// are only ours to own until something else claims them.
pub fn take_listen_fds() -> Vec<(String, OwnedFd)> {
    let var = |name: &str| std::env::var(name).ok();
    let fds = listen_fds(
        std::process::id(),
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
    );
    fds.into_iter()
        .filter_map(|(name, raw)| {
            // Only fds that are really open: a stale LISTEN_FDS must not make us own (and
            // later close) a number something else opens meanwhile.
            // SAFETY: F_GETFD reads the fd's flags and touches no memory.
            if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
                return None;
            }
            // SAFETY: systemd passed these fds to this process (LISTEN_PID matched) and nothing
            // in it has claimed them: this runs once, before anything else looks at fd 3+n.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // They come without close-on-exec, and must not leak into children.
            let _ = nix::fcntl::fcntl(
                &fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            );
            Some((name, fd))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use nix::sys::socket::bind;

    use super::*;

    #[test]
    fn listen_fds_are_named_in_order_from_fd_3() {
        assert_eq!(
            listen_fds(42, Some("42"), Some("3"), Some("a:b:c")),
            vec![("a".into(), 3), ("b".into(), 4), ("c".into(), 5)]
        );
        // An empty name, fewer names than fds: systemd's "unknown".
        assert_eq!(
            listen_fds(42, None, Some("2"), Some(":x")),
            vec![("unknown".into(), 3), ("x".into(), 4)]
        );
        assert_eq!(
            listen_fds(42, None, Some("2"), Some("a")),
            vec![("a".into(), 3), ("unknown".into(), 4)]
        );
        assert_eq!(
            listen_fds(42, Some("42"), Some("1"), None),
            vec![("unknown".into(), 3)]
        );
    }

    #[test]
    fn listen_fds_for_another_process_or_malformed_are_ignored() {
        assert!(listen_fds(42, Some("41"), Some("3"), Some("a:b:c")).is_empty());
        assert!(listen_fds(42, Some("42"), Some("x"), None).is_empty());
        assert!(listen_fds(42, Some("42"), None, Some("a")).is_empty());
        assert!(listen_fds(42, Some("42"), Some("-1"), None).is_empty());
    }

    #[test]
    fn messages_follow_sd_notify() {
        assert_eq!(store_message("m1"), "FDSTORE=1\nFDNAME=m1");
        assert_eq!(remove_message("m1"), "FDSTOREREMOVE=1\nFDNAME=m1");
    }

    /// A datagram socket standing in for systemd's receives each notification whole, with
    /// the stored fd attached.
    #[test]
    fn notifications_reach_the_socket_with_their_fds() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify");
        let systemd = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket");
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&systemd),
            &UnixAddr::new(&path).expect("addr"),
        )
        .expect("bind");
        let notifier = Notifier::new(path.as_os_str().as_bytes()).expect("notifier");
        let file = tempfile::tempfile().expect("temp file");

        notifier.store("lazysnap~x", file.as_fd()).expect("store");
        let mut buf = [0u8; 512];
        let (len, fds) = scm::recv(systemd.as_fd(), &mut buf).expect("recv");
        assert_eq!(&buf[..len], store_message("lazysnap~x").as_bytes());
        assert_eq!(fds.len(), 1);
        let (ours, theirs) = (
            nix::sys::stat::fstat(&file).expect("fstat"),
            nix::sys::stat::fstat(&fds[0]).expect("fstat"),
        );
        assert_eq!((ours.st_dev, ours.st_ino), (theirs.st_dev, theirs.st_ino));

        notifier.remove("lazysnap~x").expect("remove");
        let (len, fds) = scm::recv(systemd.as_fd(), &mut buf).expect("recv");
        assert_eq!(&buf[..len], remove_message("lazysnap~x").as_bytes());
        assert!(fds.is_empty());

        notifier.ready("serving").expect("ready");
        let (len, _) = scm::recv(systemd.as_fd(), &mut buf).expect("recv");
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving");
    }

    #[test]
    fn abstract_socket_names_start_with_at() {
        let notifier = Notifier::new(b"@lazysnap-test-notify").expect("abstract");
        assert_eq!(
            notifier.address.as_abstract(),
            Some(&b"lazysnap-test-notify"[..])
        );
    }
}
