//! Lazy mounts across daemon restarts, the `LazyLayers` side of `crate::takeover`: a new
//! mount's FUSE fd goes to the fd store under its [`ConnectionName`]; at start the fds an
//! earlier daemon left are matched to mountpoints, and `remount` serves them instead of
//! mounting (`mod.rs`); what no snapshot claims is unmounted; at stop the mounts are left for
//! the next daemon, or unmounted.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use lazysnap_fuse as fuse;

use super::{health, LazyLayers, Mounted};
use crate::report::TakeoverReport;
use crate::takeover::{ConnectionName, FdStore};

/// A connection an earlier daemon served, waiting for its layer to be restored here.
pub(super) struct HeldConnection {
    pub(super) name: String,
    pub(super) init: fuse::InitParams,
    pub(super) fd: OwnedFd,
}

/// The fds an earlier daemon left, by the mountpoint their names give. Names that are not a
/// mount's are dropped from the store.
pub(super) fn by_mountpoint(
    held: Vec<(String, OwnedFd)>,
    fd_store: &FdStore,
) -> HashMap<PathBuf, HeldConnection> {
    let mut by_mountpoint = HashMap::new();
    for (name, fd) in held {
        match ConnectionName::decode(&name) {
            Some(decoded) => {
                by_mountpoint.insert(
                    decoded.mountpoint,
                    HeldConnection {
                        name,
                        init: decoded.init,
                        fd,
                    },
                );
            }
            None => {
                tracing::warn!(%name, "dropping a held fd whose name is not a lazysnap mount's");
                drop(fd);
                if let Err(e) = fd_store.remove(&name) {
                    tracing::warn!(%name, error = %crate::error_chain(&e), "cannot drop a held fd");
                }
            }
        }
    }
    by_mountpoint
}

impl LazyLayers {
    /// Hands a new mount's connection to the fd store, so it outlives this daemon; returns
    /// the name it is held under. A mount that cannot be held still serves, until the daemon
    /// stops.
    pub(super) fn hold(&self, mountpoint: &Path, handle: &fuse::MountHandle) -> Option<String> {
        if !self.fd_store.holds() {
            return None;
        }
        let name = ConnectionName {
            mountpoint: mountpoint.to_path_buf(),
            init: handle.init_params(),
        }
        .encode();
        let Some(name) = name else {
            tracing::warn!(mountpoint = %mountpoint.display(), "mountpoint too long to name its held fd; this mount will not survive a restart");
            return None;
        };
        let held = handle
            .connection()
            .map_err(crate::takeover::TakeoverError::Dup)
            .and_then(|fd| self.fd_store.put(&name, fd.as_fd()));
        match held {
            Ok(()) => Some(name),
            Err(e) => {
                tracing::warn!(mountpoint = %mountpoint.display(), error = %crate::error_chain(&e), "cannot hold the mount's FUSE fd; this mount will not survive a restart");
                None
            }
        }
    }

    /// Stops holding a connection that is going (unmounted, or dead).
    pub(super) fn unhold(&self, name: Option<&str>) {
        if let Some(name) = name {
            if let Err(e) = self.fd_store.remove(name) {
                tracing::warn!(%name, error = %crate::error_chain(&e), "cannot drop a held FUSE fd");
            }
        }
    }

    /// Takes the held connection at `mountpoint`, if an earlier daemon left one there.
    pub(super) fn take_held(&self, mountpoint: &Path) -> Option<HeldConnection> {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(mountpoint)
    }

    /// How the last start took connections over.
    pub fn takeover_report(&self) -> TakeoverReport {
        TakeoverReport {
            fd_store: self.fd_store.kind(),
            ..*self.takeover.lock().unwrap_or_else(|p| p.into_inner())
        }
    }

    /// Stops serving, as the daemon exits. With the fds held (and not `unmount`), the mounts
    /// stay as they are for the next daemon to take over, and containers keep them;
    /// otherwise they are unmounted (detached where busy) and no longer held. Returns how
    /// many were left mounted: then the process must exit without stopping the runtime
    /// (see `daemon::Stopped`).
    pub fn shutdown(&self, unmount: bool) -> usize {
        let mounted: Vec<(PathBuf, Mounted)> = self.mounted().drain().collect();
        let keep = self.fd_store.holds() && !unmount;
        let (mut kept, mut unmounted) = (0, 0);
        for (mountpoint, m) in mounted {
            self.end_tasks(&m);
            if keep && m.held_as.is_some() {
                m.handle.release();
                kept += 1;
                continue;
            }
            if let Err(e) = m.handle.unmount() {
                tracing::warn!(mountpoint = %mountpoint.display(), error = %crate::error_chain(&e), "cannot unmount lazy layer");
            }
            self.unhold(m.held_as.as_deref());
            unmounted += 1;
        }
        // What was stored since the last background flush is made durable before the process
        // goes, so the next daemon does not fetch it again.
        self.store.flush();
        tracing::info!(
            kept,
            unmounted,
            fd_store = self.fd_store.kind(),
            "lazy layers: {kept} left mounted for the next daemon, {unmounted} unmounted"
        );
        kept
    }

    /// Mountpoints of held connections not taken over yet.
    pub(super) fn held_mountpoints_now(&self) -> Vec<PathBuf> {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Held connections no saved layer claimed are unmounted and dropped; the takeover's
    /// figures are logged.
    pub(super) fn drop_unclaimed(&self) {
        let left: Vec<(PathBuf, String)> = self
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(mountpoint, held)| (mountpoint, held.name))
            .collect();
        for (mountpoint, name) in &left {
            tracing::warn!(mountpoint = %mountpoint.display(), "a held FUSE connection matches no saved lazy layer; unmounting it");
            self.drop_held(mountpoint, name);
        }
        let report = {
            let mut report = self.takeover.lock().unwrap_or_else(|p| p.into_inner());
            report.dropped += left.len() as u64;
            report.duration_ms = self.takeover_started.elapsed().as_millis() as u64;
            *report
        };
        if report.taken_over > 0 || report.dropped > 0 {
            tracing::info!(
                taken_over = report.taken_over,
                dropped = report.dropped,
                duration_ms = report.duration_ms,
                fd_store = self.fd_store.kind(),
                "took over {} lazy layer FUSE connections of the previous daemon in {} ms",
                report.taken_over,
                report.duration_ms
            );
        }
    }

    /// Unmounts a held connection that will not be served (its fd closes with it), if a
    /// FUSE filesystem is still mounted at its mountpoint, and stops holding it.
    pub(super) fn drop_held(&self, mountpoint: &Path, name: &str) {
        if health::is_fuse_mount(mountpoint) {
            if let Err(e) = fuse::detach_mount(mountpoint) {
                tracing::warn!(mountpoint = %mountpoint.display(), error = %crate::error_chain(&e), "cannot unmount a held FUSE connection");
            }
        }
        self.unhold(Some(name));
    }
}
