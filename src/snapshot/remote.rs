//! How the snapshotter sees lazily pulled layers: a small `RemoteFs` trait that mounts a layer
//! described by containerd's labels at a directory, with no knowledge of formats, registries or
//! FUSE here. The implementation lives in `crate::mount`.
//!
//! containerd's remote-snapshot protocol: when `Prepare` carries `containerd.io/snapshot.ref`
//! (the chain ID the layer will be committed as), a snapshotter that can provide the layer
//! itself commits that target and answers AlreadyExists; containerd then skips download and
//! unpack. Anything else (no labels, not a lazy format, a failure) answers with ordinary mounts
//! and containerd applies the layer tar itself, so every image still works.

use std::path::{Path, PathBuf};

use super::types::Labels;

/// The label containerd's unpacker sets on a layer's Prepare: the committed name it wants.
pub const TARGET_REF_LABEL: &str = "containerd.io/snapshot.ref";
/// Marks snapshots committed by the remote path, as stargz-snapshotter does, so operators can
/// tell them apart in `ctr snapshots info`.
pub const REMOTE_LABEL: &str = "containerd.io/snapshot/remote";
pub const REMOTE_LABEL_VALUE: &str = "remote snapshot";

/// What a remote layer needs to be mounted again after a restart, kept in the metadata store
/// with the snapshot. Opaque to the snapshotter.
pub type RemoteState = serde_json::Value;

/// The cause behind a `RemoteError`: the implementation's own typed error.
pub type RemoteCause = Box<dyn std::error::Error + Send + Sync>;

/// Why a layer was not mounted remotely, or not unmounted. `NotLazy` and `Failed` both send
/// the layer down the ordinary path; they differ only in how loudly that is logged.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The labels do not describe a lazily pullable layer (plain gzip, no reference, ...).
    #[error("not a lazy layer")]
    NotLazy(#[source] RemoteCause),
    /// It looked like a lazy layer but could not be mounted.
    #[error("lazy mount failed")]
    Failed(#[source] RemoteCause),
    /// A mounted layer is no longer served at its mountpoint (its FUSE connection was aborted,
    /// it was unmounted behind the daemon's back, or it does not answer in time).
    #[error("lazy layer {layer} at {} is not served: {reason}", mountpoint.display())]
    Dead {
        layer: String,
        mountpoint: PathBuf,
        reason: String,
    },
    #[error("unmounting {}", mountpoint.display())]
    Unmount {
        mountpoint: std::path::PathBuf,
        #[source]
        source: RemoteCause,
    },
}

/// Mounts layers whose contents are fetched on demand. Every method blocks (it may wait on a
/// registry or the kernel): call them from a blocking thread, never an async worker, as the
/// snapshotter does.
///
/// `lower` is the parent chain the layer is stacked on, as the directories overlayfs would
/// take as `lowerdir`s, nearest first. A layer whose tar implies directories it does not list
/// gives them the attributes they have there, as unpacking on top of those layers would.
pub trait RemoteFs: Send + Sync {
    /// Mounts the layer `labels` describe at `mountpoint` (an existing, empty directory) and
    /// returns the state `remount` needs. On error nothing is left mounted.
    fn mount(
        &self,
        mountpoint: &Path,
        labels: &Labels,
        lower: &[PathBuf],
    ) -> Result<RemoteState, RemoteError>;
    /// Mounts a layer again from its saved state: after a daemon restart, or to repair a mount
    /// that died (`check`).
    fn remount(
        &self,
        mountpoint: &Path,
        state: &RemoteState,
        lower: &[PathBuf],
    ) -> Result<(), RemoteError>;
    /// Unmounts whatever `mount`/`remount` mounted at `mountpoint`.
    fn unmount(&self, mountpoint: &Path) -> Result<(), RemoteError>;
    /// Whether the layer mounted at `mountpoint` is really mounted there and served: `Dead`
    /// otherwise. Cheap (a stat or two, or a recent answer) and bounded in time, even when the
    /// file system hangs.
    fn check(&self, mountpoint: &Path) -> Result<(), RemoteError>;
    /// Mountpoints still mounted from an earlier run whose connections this file system
    /// holds and takes over in `remount`: a restore must leave them mounted.
    fn held_mountpoints(&self) -> Vec<PathBuf> {
        Vec::new()
    }
    /// Every saved layer has been remounted: what is still held for no snapshot can go.
    fn restore_done(&self) {}
}
