//! A FUSE connection apart from the process serving it: we mount onto our own `/dev/fuse` fd,
//! keep the kernel's INIT request as [`InitParams`], and can serve a connection whose
//! handshake another process did (a restarted daemon taking over a mount whose fd was held
//! elsewhere while it was gone).
//!
//! fuser's `Session::from_fd` insists on reading an INIT request first, which a connection
//! already initialised never sends again. So fuser does its handshake over a socket pair fed
//! with an INIT request (the kernel's own for a fresh mount, one rebuilt from the saved
//! parameters for a takeover), and only then is the real `/dev/fuse` file put under the fd
//! number fuser reads from. The filesystem's `init` thus sees the same capabilities it saw
//! when the kernel first asked, and makes the same choices.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::str::FromStr;

use fuser::{Filesystem, Session};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

/// `FUSE_INIT` in `fuse_in_header.opcode`.
const FUSE_INIT: u32 = 26;
/// `fuse_notify_code::FUSE_NOTIFY_RESEND` (Linux 6.9, protocol 7.40).
const FUSE_NOTIFY_RESEND: i32 = 7;
/// `sizeof(struct fuse_in_header)`.
const IN_HEADER_LEN: usize = 40;
/// `sizeof(struct fuse_init_in)` since protocol 7.36 (with `flags2` and the unused words).
const INIT_IN_LEN: usize = 64;
/// `sizeof(struct fuse_out_header)`.
const OUT_HEADER_LEN: usize = 16;
/// The protocol major version this code speaks (and fuser with it).
const KERNEL_MAJOR: u32 = 7;
/// A read from `/dev/fuse` needs room for the largest request the kernel may send; before
/// INIT that is a write of the default size, so this is ample.
const INIT_READ_BUFFER: usize = 1 << 20;

/// What the kernel offered in its INIT request: enough to let a new process's filesystem
/// initialise itself exactly as the first one did, without the kernel asking again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitParams {
    /// Protocol major version (7).
    pub major: u32,
    /// Protocol minor version.
    pub minor: u32,
    /// The kernel's readahead limit, in bytes.
    pub max_readahead: u32,
    /// Capability flags, low word.
    pub flags: u32,
    /// Capability flags, high word (meaningful with `FUSE_INIT_EXT` in `flags`).
    pub flags2: u32,
}

impl InitParams {
    /// Reads the parameters from an INIT request as the kernel sent it.
    ///
    /// # Errors
    /// `InvalidData` if `request` is not a whole INIT request.
    pub fn from_request(request: &[u8]) -> io::Result<Self> {
        let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
        if request.len() < IN_HEADER_LEN + 16 {
            return Err(invalid("FUSE request too short for INIT"));
        }
        let word = |at: usize| {
            u32::from_ne_bytes([
                request[at],
                request[at + 1],
                request[at + 2],
                request[at + 3],
            ])
        };
        if word(4) != FUSE_INIT {
            return Err(invalid("first FUSE request is not INIT"));
        }
        let body = IN_HEADER_LEN;
        Ok(Self {
            major: word(body),
            minor: word(body + 4),
            max_readahead: word(body + 8),
            flags: word(body + 12),
            flags2: if request.len() >= body + 20 {
                word(body + 16)
            } else {
                0
            },
        })
    }

    /// An INIT request carrying these parameters, as the kernel would send it.
    pub fn to_request(&self, unique: u64) -> Vec<u8> {
        let len = IN_HEADER_LEN + INIT_IN_LEN;
        let mut out = Vec::with_capacity(len);
        // fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding.
        out.extend_from_slice(&(len as u32).to_ne_bytes());
        out.extend_from_slice(&FUSE_INIT.to_ne_bytes());
        out.extend_from_slice(&unique.to_ne_bytes());
        out.extend_from_slice(&0u64.to_ne_bytes());
        out.extend_from_slice(&[0u8; 12]);
        out.extend_from_slice(&[0u8; 4]);
        // fuse_init_in: major, minor, max_readahead, flags, flags2, unused[11].
        for word in [
            self.major,
            self.minor,
            self.max_readahead,
            self.flags,
            self.flags2,
        ] {
            out.extend_from_slice(&word.to_ne_bytes());
        }
        out.resize(len, 0);
        out
    }
}

/// `major.minor.max_readahead.flags.flags2`, flags in hex: short, and free of the characters
/// fd names may not hold (systemd's `FDNAME=` refuses `:`).
impl fmt::Display for InitParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}.{}.{:x}.{:x}",
            self.major, self.minor, self.max_readahead, self.flags, self.flags2
        )
    }
}

impl FromStr for InitParams {
    type Err = io::Error;

    fn from_str(s: &str) -> io::Result<Self> {
        let invalid = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{s:?} is not major.minor.readahead.flags.flags2"),
            )
        };
        let mut parts = s.split('.');
        let mut next = |radix: u32| {
            parts
                .next()
                .and_then(|p| u32::from_str_radix(p, radix).ok())
                .ok_or_else(invalid)
        };
        let params = Self {
            major: next(10)?,
            minor: next(10)?,
            max_readahead: next(10)?,
            flags: next(16)?,
            flags2: next(16)?,
        };
        if parts.next().is_some() {
            return Err(invalid());
        }
        Ok(params)
    }
}

/// Opens `/dev/fuse` and mounts a connection on it at `mountpoint` with mount(2) (root
/// only). `data` is the option string after the `fd=...` ones fuser would write too.
pub(crate) fn mount_connection(
    mountpoint: &Path,
    fsname: &str,
    flags: nix::mount::MsFlags,
    data: &str,
) -> io::Result<OwnedFd> {
    use std::os::unix::fs::MetadataExt;

    let device = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?;
    let mode = std::fs::metadata(mountpoint)?.mode() & libc::S_IFMT;
    let options = format!(
        "fd={},rootmode={:o},user_id={},group_id={},{data}",
        device.as_raw_fd(),
        mode,
        nix::unistd::geteuid(),
        nix::unistd::getegid()
    );
    nix::mount::mount(
        Some(fsname),
        mountpoint,
        Some("fuse"),
        flags,
        Some(options.as_str()),
    )
    .map_err(|errno| {
        io::Error::new(
            io::Error::from(errno).kind(),
            format!("mount(2) with {options:?}: {errno}"),
        )
    })?;
    Ok(device.into())
}

/// Reads the kernel's first request on a fresh connection, which must be INIT.
pub(crate) fn read_init(device: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; INIT_READ_BUFFER];
    let len = loop {
        match nix::unistd::read(device, &mut buf) {
            Ok(len) => break len,
            Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => continue,
            Err(errno) => return Err(errno.into()),
        }
    };
    buf.truncate(len);
    InitParams::from_request(&buf)?;
    Ok(buf)
}

/// A fuser session over `device`, initialised with `init` (an INIT request). With
/// `answer_kernel`, fuser's INIT reply goes to the kernel (a fresh connection); otherwise
/// the kernel was answered long ago and the reply is dropped.
pub(crate) fn session_over<FS: Filesystem>(
    filesystem: FS,
    device: BorrowedFd<'_>,
    init: &[u8],
    answer_kernel: bool,
    config: fuser::Config,
) -> io::Result<Session<FS>> {
    let params = InitParams::from_request(init)?;
    if params.major != KERNEL_MAJOR {
        // fuser would answer with its own version and wait for another INIT forever.
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("FUSE protocol {}.{} is not 7.x", params.major, params.minor),
        ));
    }
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    nix::unistd::write(&theirs, init)?;
    let session = Session::from_fd(filesystem, ours, config.acl, config)?;
    let mut reply = vec![0u8; 4096];
    let len = nix::unistd::read(&theirs, &mut reply)?;
    if len < OUT_HEADER_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "fuser's INIT reply is too short",
        ));
    }
    if answer_kernel {
        nix::unistd::write(device, &reply[..len])?;
    }
    let target = session.as_fd().as_raw_fd();
    // SAFETY: dup3 takes two fd numbers and flags and touches no memory. `target` is the
    // socket fuser's session owns; dup3 atomically makes that number refer to the
    // `/dev/fuse` file instead (closing the socket), so fuser's `File` stays a valid, owned
    // fd, now on the connection. Nothing else uses `target` concurrently: the session has
    // no thread yet.
    let rc = unsafe { libc::dup3(device.as_raw_fd(), target, libc::O_CLOEXEC) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(session)
}

/// Asks the kernel to queue again every request this connection's readers took but never
/// answered (`FUSE_NOTIFY_RESEND`), so a new process answers what a dead one read.
///
/// # Errors
/// `EINVAL` on kernels before 6.9, which know no such notification.
pub(crate) fn notify_resend(device: BorrowedFd<'_>) -> io::Result<()> {
    nix::unistd::write(device, &resend_notification())?;
    Ok(())
}

/// `fuse_out_header { len: 16, error: FUSE_NOTIFY_RESEND, unique: 0 }`: a notification is an
/// "answer" to request 0 whose error field names the notification.
fn resend_notification() -> [u8; OUT_HEADER_LEN] {
    let mut out = [0u8; OUT_HEADER_LEN];
    out[..4].copy_from_slice(&(OUT_HEADER_LEN as u32).to_ne_bytes());
    out[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> InitParams {
        InitParams {
            major: 7,
            minor: 45,
            max_readahead: 131_072,
            flags: 0x73ff_fffb,
            flags2: 0x1f,
        }
    }

    #[test]
    fn init_request_round_trips() {
        let request = params().to_request(9);
        assert_eq!(request.len(), 104);
        assert_eq!(&request[..4], &104u32.to_ne_bytes());
        assert_eq!(&request[8..16], &9u64.to_ne_bytes());
        assert_eq!(InitParams::from_request(&request).expect("parse"), params());
    }

    #[test]
    fn other_requests_are_not_init() {
        let mut request = params().to_request(1);
        request[4] = 1; // FUSE_LOOKUP
        assert!(InitParams::from_request(&request).is_err());
        assert!(InitParams::from_request(&request[..20]).is_err());
    }

    #[test]
    fn text_form_round_trips_and_has_no_colon() {
        let text = params().to_string();
        assert_eq!(text, "7.45.131072.73fffffb.1f");
        assert_eq!(text.parse::<InitParams>().expect("parse"), params());
        for bad in ["7.45.1.2", "7.45.1.2.3.4", "7.x.1.2.3", ""] {
            assert!(bad.parse::<InitParams>().is_err(), "{bad}");
        }
    }

    #[test]
    fn resend_notification_is_a_bare_header() {
        let n = resend_notification();
        assert_eq!(&n[..4], &16u32.to_ne_bytes());
        assert_eq!(&n[4..8], &7i32.to_ne_bytes());
        assert_eq!(&n[8..], &[0u8; 8]);
    }
}
