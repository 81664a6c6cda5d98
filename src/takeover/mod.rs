//! Lazy mounts outlive the daemon: each mount's `/dev/fuse` fd is held outside the daemon
//! (systemd's fd store under systemd, else a holder process of our own), and the next daemon
//! (restarted, crashed, or a new version) takes the fds back and serves the same
//! connections, so containers reading from lazy layers never notice.
//!
//! This module only keeps fds and their names; matching them to saved layers and serving
//! them is `crate::mount`'s job.
//! - `scm`: sending and receiving fds over Unix sockets.
//! - `systemd`: `sd_notify` (`FDSTORE=1`, `READY=1`) and `LISTEN_FDS`.
//! - `holder`: the `lazysnap fd-holder` process and the daemon's client of it.
//! - `name`: what a held fd is called: its mountpoint and INIT parameters.

mod holder;
mod name;
mod scm;
mod systemd;

use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;

pub use holder::{run as run_holder, HolderError};
pub use name::ConnectionName;

/// Where the fds are held.
#[derive(Debug)]
pub enum FdStore {
    /// systemd's fd store (`$NOTIFY_SOCKET` is set).
    Systemd(systemd::Notifier),
    /// A `lazysnap fd-holder` process.
    Holder(holder::Client),
    /// Nowhere: mounts die with the daemon (no holder could be started).
    None,
}

/// Why an fd could not be stored or dropped.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("systemd fd store")]
    Systemd(#[source] std::io::Error),
    #[error(transparent)]
    Holder(#[from] HolderError),
    #[error("duplicate the mount's FUSE fd")]
    Dup(#[source] std::io::Error),
}

impl FdStore {
    /// Opens the store this daemon runs with, and takes back what it holds from an earlier
    /// run: under systemd the fds it passed (`LISTEN_FDS`), otherwise those of the holder at
    /// `holder_socket` (started as `exe fd-holder` if none runs).
    pub fn open(holder_socket: &Path, exe: &Path) -> (Self, Vec<(String, OwnedFd)>) {
        if let Some(notifier) = systemd::Notifier::from_env() {
            match notifier {
                Ok(notifier) => return (Self::Systemd(notifier), systemd::take_listen_fds()),
                Err(e) => {
                    tracing::warn!(error = %e, "NOTIFY_SOCKET is set but unusable; holding FUSE fds in a holder process instead");
                }
            }
        }
        match holder::Client::connect_or_start(holder_socket, exe) {
            Ok(client) => match client.list() {
                Ok(held) => (Self::Holder(client), held),
                Err(e) => {
                    tracing::warn!(error = %crate::error_chain(&e), "cannot list the fds the holder keeps");
                    (Self::Holder(client), Vec::new())
                }
            },
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "no fd holder: lazy mounts will not survive a restart of lazysnap");
                (Self::None, Vec::new())
            }
        }
    }

    /// Whether fds put here outlive the daemon.
    pub fn holds(&self) -> bool {
        !matches!(self, Self::None)
    }

    /// What the store is, for log lines and reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Systemd(_) => "systemd",
            Self::Holder(_) => "holder",
            Self::None => "none",
        }
    }

    /// Holds `fd` under `name`, replacing what was held under that name.
    pub fn put(&self, name: &str, fd: BorrowedFd<'_>) -> Result<(), TakeoverError> {
        match self {
            Self::Systemd(n) => n.store(name, fd).map_err(TakeoverError::Systemd),
            Self::Holder(c) => Ok(c.put(name, fd)?),
            Self::None => Ok(()),
        }
    }

    /// Stops holding the fd named `name`.
    pub fn remove(&self, name: &str) -> Result<(), TakeoverError> {
        match self {
            Self::Systemd(n) => n.remove(name).map_err(TakeoverError::Systemd),
            Self::Holder(c) => Ok(c.remove(name)?),
            Self::None => Ok(()),
        }
    }
}

/// Tells systemd the daemon serves (`READY=1`, for `Type=notify`), when run by systemd.
pub fn notify_ready(status: &str) {
    if let Some(notifier) = systemd::Notifier::from_env() {
        if let Err(e) = notifier.and_then(|n| n.ready(status)) {
            tracing::warn!(error = %e, "cannot tell systemd the daemon is ready");
        }
    }
}
