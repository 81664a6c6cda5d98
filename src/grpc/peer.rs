//! Who is calling the control API: the kernel's credentials of the process at the other end
//! of each accepted connection (SO_PEERCRED, SO_PEERGROUPS), checked against "root or a member
//! of the control group".
//!
//! The socket's mode and group already keep other users out, but a mode is one chmod away from
//! open (an operator widening it, a bind mount into a container); the peer check holds
//! whatever the file says. The verdict is made once per connection, at accept, where it is
//! logged; every request on a refused connection then gets `PermissionDenied` from the
//! interceptor, so the caller learns why instead of seeing the connection drop.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::unistd::Gid;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::server::Connected;
use tonic::{Request, Status};

/// Who may call: root always, and members of `group` if one is configured.
#[derive(Debug, Clone)]
pub struct ControlAccess {
    /// The group's id and name (for messages).
    group: Option<(Gid, String)>,
}

impl ControlAccess {
    pub fn new(group: Option<(Gid, String)>) -> Self {
        ControlAccess { group }
    }

    fn admits(&self, uid: u32, gid: u32, groups: &[u32]) -> bool {
        uid == 0
            || self.group.as_ref().is_some_and(|(wanted, _)| {
                let wanted = wanted.as_raw();
                gid == wanted || groups.contains(&wanted)
            })
    }

    /// Whom the control API admits, for a refusal message.
    fn admitted(&self) -> String {
        match &self.group {
            Some((gid, name)) => format!("root and members of group {name} ({gid})"),
            None => "root only (no control_group is configured)".to_owned(),
        }
    }

    /// Reads the credentials of the peer of `stream` and decides; a refusal is logged here,
    /// once per connection.
    pub fn check(&self, stream: UnixStream) -> CheckedStream {
        let caller = match credentials(&stream) {
            Ok((uid, gid, pid, groups)) => {
                let admitted = self.admits(uid, gid, &groups);
                if !admitted {
                    tracing::warn!(
                        uid,
                        gid,
                        pid,
                        admits = %self.admitted(),
                        "control API: refusing a caller that is neither root nor in the control group"
                    );
                }
                Caller {
                    uid: Some(uid),
                    admitted,
                    admits: self.admitted(),
                }
            }
            Err(error) => {
                // Without credentials there is nothing to admit on: refuse.
                tracing::warn!(%error, "control API: cannot read the caller's credentials; refusing it");
                Caller {
                    uid: None,
                    admitted: false,
                    admits: self.admitted(),
                }
            }
        };
        CheckedStream {
            inner: stream,
            caller,
        }
    }
}

/// The verdict on one connection, which tonic hands to every request on it as an extension.
#[derive(Debug, Clone)]
pub struct Caller {
    uid: Option<u32>,
    admitted: bool,
    admits: String,
}

/// Refuses every request whose connection was not admitted at accept.
pub fn interceptor(request: Request<()>) -> Result<Request<()>, Status> {
    match request.extensions().get::<Caller>() {
        Some(caller) if caller.admitted => Ok(request),
        Some(Caller {
            uid: Some(uid),
            admits,
            ..
        }) => Err(Status::permission_denied(format!(
            "permission denied: the control API admits {admits}; this caller is uid {uid}"
        ))),
        Some(Caller { admits, .. }) => Err(Status::permission_denied(format!(
            "permission denied: the control API admits {admits}, and the caller's credentials \
             could not be read"
        ))),
        // Every connection comes through `check`; a request without a verdict is a bug here,
        // and refusing is the safe side of it.
        None => Err(Status::permission_denied(
            "permission denied: the caller's credentials are unknown",
        )),
    }
}

/// (uid, gid, pid, supplementary groups) of the process that connected. SO_PEERCRED and
/// SO_PEERGROUPS are the credentials it had at connect(2), which is what the socket file's
/// permissions were checked against too.
fn credentials(stream: &UnixStream) -> io::Result<(u32, u32, i32, Vec<u32>)> {
    let cred = getsockopt(&stream.as_fd(), PeerCredentials).map_err(io::Error::from)?;
    let groups = peer_groups(stream)?;
    Ok((cred.uid(), cred.gid(), cred.pid(), groups))
}

/// SO_PEERGROUPS (Linux 4.13): the peer's supplementary groups; nix has no wrapper for it.
fn peer_groups(stream: &UnixStream) -> io::Result<Vec<u32>> {
    let fd = stream.as_raw_fd();
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = libc::socklen_t::try_from(groups.len() * std::mem::size_of::<libc::gid_t>())
            .map_err(|_| io::Error::other("too many groups"))?;
        // SAFETY: `groups` is valid for `len` bytes, and the kernel writes at most `len` bytes
        // and stores the length it needs (or used) in `len`.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let count = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(count);
            return Ok(groups);
        }
        let err = io::Error::last_os_error();
        // ERANGE: the buffer was too small; `len` now says how much is needed.
        if err.raw_os_error() == Some(libc::ERANGE) && count > groups.len() {
            groups.resize(count, 0);
            continue;
        }
        return Err(err);
    }
}

/// An accepted connection with the verdict on its peer.
#[derive(Debug)]
pub struct CheckedStream {
    inner: UnixStream,
    caller: Caller,
}

impl Connected for CheckedStream {
    type ConnectInfo = Caller;

    fn connect_info(&self) -> Caller {
        self.caller.clone()
    }
}

impl AsyncRead for CheckedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CheckedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_group_members_are_admitted() {
        let none = ControlAccess::new(None);
        assert!(none.admits(0, 0, &[]));
        assert!(!none.admits(1000, 1000, &[4]));
        let adm = ControlAccess::new(Some((Gid::from_raw(4), "adm".into())));
        assert!(adm.admits(0, 0, &[]));
        assert!(adm.admits(1000, 4, &[]), "primary group");
        assert!(adm.admits(1000, 1000, &[27, 4]), "supplementary group");
        assert!(!adm.admits(1000, 1000, &[27]));
    }

    #[tokio::test]
    async fn the_peer_is_this_process() {
        let (a, _b) = UnixStream::pair().expect("pair");
        let (uid, gid, pid, groups) = credentials(&a).expect("credentials");
        assert_eq!(uid, nix::unistd::geteuid().as_raw());
        assert_eq!(gid, nix::unistd::getegid().as_raw());
        assert_eq!(pid, std::process::id() as i32);
        let ours: Vec<u32> = nix::unistd::getgroups()
            .expect("getgroups")
            .into_iter()
            .map(Gid::as_raw)
            .collect();
        let mut groups = groups;
        groups.sort_unstable();
        let mut ours = ours;
        ours.sort_unstable();
        assert_eq!(groups, ours);
    }

    #[test]
    fn refusals_name_the_uid() {
        let access = ControlAccess::new(Some((Gid::from_raw(4), "adm".into())));
        let mut request = Request::new(());
        request.extensions_mut().insert(Caller {
            uid: Some(65534),
            admitted: false,
            admits: access.admitted(),
        });
        let status = interceptor(request).expect_err("refused");
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(
            status.message().contains("uid 65534"),
            "{}",
            status.message()
        );
        assert!(
            status.message().contains("group adm"),
            "{}",
            status.message()
        );
    }
}
