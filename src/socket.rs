//! The daemon's Unix sockets, created with the owner, group and mode they are meant to have
//! from the moment their path exists, whatever the process umask.
//!
//! A socket's mode decides who may connect (connect(2) needs write permission on it), so a
//! socket that is briefly 0777 (umask 0) is briefly open to every local user. Two ways avoid
//! that window: binding under a restrictive umask, or binding where nobody else can reach and
//! moving the socket into place once it is right. The umask is process-wide, and by the time
//! the sockets are bound other threads are running (FUSE sessions of restored layers, tokio's
//! blocking pool writing the cache), so narrowing it would race with their file creation. So
//! each socket is bound inside a fresh 0700 directory beside its final path, given its mode
//! and group there, and renamed into place: rename(2) is atomic and keeps the inode, so the
//! final path never names a socket with any other mode.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::unistd::Gid;
use tokio::net::UnixListener;

/// Who may connect to a socket, as its file mode and group say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketAccess {
    /// Permission bits of the socket file.
    pub mode: u32,
    /// Group owning the socket; `None` keeps the daemon's own (root's).
    pub group: Option<Gid>,
}

impl SocketAccess {
    /// Root only: containerd's socket and the CRI image service, whose callers run as root.
    pub const ROOT_ONLY: SocketAccess = SocketAccess {
        mode: 0o600,
        group: None,
    };

    /// The control socket: root, plus `group` if one is configured.
    pub fn control(group: Option<Gid>) -> SocketAccess {
        match group {
            Some(gid) => SocketAccess {
                mode: 0o660,
                group: Some(gid),
            },
            None => Self::ROOT_ONLY,
        }
    }
}

/// Why a socket could not be set up; every variant names the path.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("create socket dir {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("socket {} is in use by another process (is lazysnap already running?)", path.display())]
    InUse { path: PathBuf },
    #[error("remove stale socket {}: {source}", path.display())]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bind {}: {source}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("set mode {mode:o} and group of socket {}: {source}", path.display())]
    Permissions {
        path: PathBuf,
        mode: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("move socket into place at {}: {source}", path.display())]
    Rename {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Binds a Unix socket at `address` with `access`, replacing a stale socket file from an
/// earlier run but refusing to take over one another live process still answers on. Must be
/// called inside a tokio runtime.
pub fn bind(address: &Path, access: SocketAccess) -> Result<UnixListener, SocketError> {
    if let Some(dir) = address.parent() {
        create_socket_dir(dir)?;
    }
    if address.exists() {
        if std::os::unix::net::UnixStream::connect(address).is_ok() {
            return Err(SocketError::InUse {
                path: address.into(),
            });
        }
        std::fs::remove_file(address).map_err(|source| SocketError::RemoveStale {
            path: address.into(),
            source,
        })?;
    }
    let dir = address.parent().unwrap_or(Path::new("/"));
    // tempfile makes the directory 0700 regardless of the umask: nobody but root can reach
    // the socket inside it before it has its final mode.
    let private = tempfile::Builder::new()
        .prefix(".lazysnap-bind-")
        .tempdir_in(dir)
        .map_err(|source| SocketError::Bind {
            path: address.into(),
            source,
        })?;
    let staged = private.path().join("socket");
    let listener =
        std::os::unix::net::UnixListener::bind(&staged).map_err(|source| SocketError::Bind {
            path: address.into(),
            source,
        })?;
    let permissions = |source| SocketError::Permissions {
        path: address.into(),
        mode: access.mode,
        source,
    };
    if let Some(gid) = access.group {
        nix::unistd::chown(&staged, None, Some(gid)).map_err(|e| permissions(e.into()))?;
    }
    // chmod after chown: chown clears nothing on a socket, but this order is the one that is
    // right for every file type.
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(access.mode))
        .map_err(permissions)?;
    std::fs::rename(&staged, address).map_err(|source| SocketError::Rename {
        path: address.into(),
        source,
    })?;
    // The private directory is empty now; dropping `private` removes it.
    drop(private);
    listener
        .set_nonblocking(true)
        .and_then(|()| UnixListener::from_std(listener))
        .map_err(|source| SocketError::Bind {
            path: address.into(),
            source,
        })
}

/// Creates the socket directory if it is missing, 0755 whatever the umask: group members
/// must be able to reach the control socket inside it, and nobody else may add files there.
/// An existing directory is left as the operator made it.
fn create_socket_dir(dir: &Path) -> Result<(), SocketError> {
    if dir.is_dir() {
        return Ok(());
    }
    let failed = |source| SocketError::CreateDir {
        path: dir.into(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(failed)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(failed)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    /// Binding under umask 0 still gives the modes asked for, and the staging directory is
    /// gone afterwards.
    #[test]
    fn modes_hold_under_umask_0() {
        let dir = tempfile::tempdir().expect("temp dir");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _guard = runtime.enter();
        // The umask is process-wide: restoring it at once keeps short the window in which
        // other tests' threads create files with wider modes (harmless in a temp dir).
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        let root_only = bind(&dir.path().join("sub/a.sock"), SocketAccess::ROOT_ONLY);
        let gid = nix::unistd::getegid();
        let control = bind(
            &dir.path().join("sub/c.sock"),
            SocketAccess::control(Some(gid)),
        );
        nix::sys::stat::umask(old);
        let (_a, _c) = (root_only.expect("bind a"), control.expect("bind c"));
        let a = std::fs::metadata(dir.path().join("sub/a.sock")).expect("stat a");
        assert_eq!(a.mode() & 0o7777, 0o600);
        let c = std::fs::metadata(dir.path().join("sub/c.sock")).expect("stat c");
        assert_eq!(c.mode() & 0o7777, 0o660);
        assert_eq!(c.gid(), gid.as_raw());
        let sub = std::fs::metadata(dir.path().join("sub")).expect("stat dir");
        assert_eq!(sub.mode() & 0o7777, 0o755);
        let left: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .expect("list")
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left.len(), 2, "only the two sockets are left: {left:?}");
    }

    #[test]
    fn a_live_socket_is_not_taken_over() {
        let dir = tempfile::tempdir().expect("temp dir");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _guard = runtime.enter();
        let path = dir.path().join("x.sock");
        let _live = bind(&path, SocketAccess::ROOT_ONLY).expect("first bind");
        let err = bind(&path, SocketAccess::ROOT_ONLY).expect_err("second bind");
        assert!(matches!(err, SocketError::InUse { .. }), "{err}");
    }
}
