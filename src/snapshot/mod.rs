//! containerd's snapshotter semantics over overlayfs, as containerd's own `overlayfs`
//! snapshotter implements them: each snapshot owns `snapshots/<id>/fs` (its layer, the
//! `upperdir` while active) and `work` (overlayfs' workdir), and mounts stack the parents' `fs`
//! dirs as `lowerdir`s, nearest parent first.
//!
//! Metadata lives in `store` (one transaction per operation). Directories are staged under a
//! temporary name and renamed into place inside the transaction, so a crash leaves at worst an
//! unnamed directory, which `cleanup` removes. This module knows nothing of gRPC; `grpc`
//! translates.

mod error;
pub mod filter;
mod mountinfo;
pub mod remote;
pub mod store;
pub mod types;
mod usage;

use std::collections::HashSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

pub use error::SnapshotError;
pub use remote::{RemoteError, RemoteFs, RemoteState};
use store::{Durability, Record, Store};
pub use types::{Info, Kind, Labels, Mount, Usage};

/// containerd adds `index=off` whenever the overlay module has the parameter, so that an upper
/// dir can be mounted again over other lowers; do the same so mounts look identical.
const OVERLAY_INDEX_PARAM: &str = "/sys/module/overlay/parameters/index";

/// The snapshotter: a metadata store plus the snapshot directories under `root`.
pub struct Snapshotter {
    store: Store,
    snapshots_dir: PathBuf,
    overlay_options: Vec<String>,
    remote: Option<Arc<dyn RemoteFs>>,
    /// Remote layers that could not be mounted again after a restart. Their `fs` dirs are
    /// empty, so any mount stacking them is refused rather than handing containerd a layer
    /// with silently missing files.
    unavailable: Mutex<HashSet<u64>>,
    /// Held while a dead lazy mount is repaired, so that two calls finding it dead do not
    /// both mount it again.
    repairing: Mutex<()>,
    /// Held shared while a snapshot directory is being made and recorded, exclusively by
    /// `cleanup`: otherwise cleanup could read the records, then find a directory that a
    /// concurrent Prepare has made since, and remove it as an orphan under a live snapshot.
    making_dirs: RwLock<()>,
}

impl Snapshotter {
    /// Opens (or initialises) the snapshotter state under `root`, for ordinary layers only.
    pub fn open(root: &Path) -> Result<Self, SnapshotError> {
        Self::open_with(root, None)
    }

    /// Opens the snapshotter state under `root`; layers that `remote` can mount are pulled
    /// lazily.
    pub fn open_with(
        root: &Path,
        remote: Option<Arc<dyn RemoteFs>>,
    ) -> Result<Self, SnapshotError> {
        let snapshots_dir = root.join("snapshots");
        std::fs::create_dir_all(&snapshots_dir)
            .map_err(SnapshotError::io("create", &snapshots_dir))?;
        // Snapshot contents may include setuid binaries and secrets of other tenants' images:
        // only root may traverse the state directory, as containerd does for its own.
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
            .map_err(SnapshotError::io("chmod", root))?;
        let store = Store::open(&root.join("metadata.redb"))?;
        let mut overlay_options = Vec::new();
        if Path::new(OVERLAY_INDEX_PARAM).exists() {
            overlay_options.push("index=off".to_owned());
        }
        Ok(Snapshotter {
            store,
            snapshots_dir,
            overlay_options,
            remote,
            unavailable: Mutex::default(),
            repairing: Mutex::default(),
            making_dirs: RwLock::new(()),
        })
    }

    /// Creates an active (writable) snapshot of `parent` and returns how to mount it; or, for
    /// a layer the remote file system can provide, commits the target containerd asked for and
    /// answers AlreadyExists (see `remote`).
    pub fn prepare(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<Vec<Mount>, SnapshotError> {
        let target = labels.get(remote::TARGET_REF_LABEL).cloned();
        let (Some(remote), Some(target)) = (self.remote.clone(), target) else {
            return self.create(Kind::Active, key, parent, labels);
        };
        if self.store.get(&target)?.is_some() {
            return Err(SnapshotError::AlreadyExists { key: target });
        }
        let creating = std::time::Instant::now();
        // Not fsynced: every way out below ends with a durable write (the commit, a removal,
        // or `sync` before handing the active snapshot to containerd), and a crash before
        // that loses only a snapshot containerd was never told of (its directory, and the
        // mount in it, go at the next start). The fsync it spares is milliseconds on an idle
        // disk and tens of them on a busy one, on every lazy layer's Prepare.
        let mounts = self.create_with(
            Kind::Active,
            key,
            parent,
            labels.clone(),
            Durability::Deferred,
        )?;
        let record = self.get(key)?;
        let fs = self.fs_dir(record.id);
        let lower = self.lower_dirs(&self.store.parent_ids(&record)?);
        let create_ms = creating.elapsed().as_millis() as u64;
        let mounting = std::time::Instant::now();
        let state = match remote.mount(&fs, &labels, &lower) {
            Ok(state) => state,
            Err(RemoteError::NotLazy(why)) => {
                tracing::info!(key, %target, reason = %crate::error_chain(&*why), "layer is not lazy; containerd will download and unpack it");
                self.store.sync()?;
                return Ok(mounts);
            }
            Err(e) => {
                tracing::warn!(key, %target, error = %crate::error_chain(&e), "lazy mount failed; falling back to download and unpack");
                self.store.sync()?;
                return Ok(mounts);
            }
        };
        let mount_ms = mounting.elapsed().as_millis() as u64;
        let committing = std::time::Instant::now();
        match self.commit_remote(&target, key, labels, state) {
            Ok(()) => {
                // Where a lazy Prepare's time goes, beside the layer's own `lazy layer ready`.
                tracing::debug!(
                    key,
                    create_ms,
                    mount_ms,
                    commit_ms = committing.elapsed().as_millis() as u64,
                    "lazy prepare timings"
                );
                tracing::info!(key, %target, "layer mounted lazily");
                Err(SnapshotError::AlreadyExists { key: target })
            }
            Err(e) => {
                // The FUSE mount must not outlive a snapshot that does not record it.
                if let Err(u) = remote.unmount(&fs) {
                    tracing::warn!(mountpoint = %fs.display(), error = %crate::error_chain(&u), "unmounting after failed commit failed");
                }
                if matches!(e, SnapshotError::AlreadyExists { .. }) {
                    // Another Prepare committed the same layer meanwhile: ours is redundant.
                    self.remove(key)?;
                }
                Err(e)
            }
        }
    }

    /// Commits a remotely mounted active snapshot without measuring it: walking a lazy layer
    /// would cost metadata lookups for nothing, as its bytes are not on this disk.
    fn commit_remote(
        &self,
        name: &str,
        key: &str,
        mut labels: Labels,
        state: RemoteState,
    ) -> Result<(), SnapshotError> {
        labels.insert(
            remote::REMOTE_LABEL.to_owned(),
            remote::REMOTE_LABEL_VALUE.to_owned(),
        );
        self.commit_record(name, key, labels, Usage::default(), Some(state))
    }

    /// Renames the active snapshot `key` to the committed snapshot `name` in one transaction.
    fn commit_record(
        &self,
        name: &str,
        key: &str,
        labels: Labels,
        usage: Usage,
        remote: Option<RemoteState>,
    ) -> Result<(), SnapshotError> {
        self.store.write(|tx| {
            let record = tx
                .get(key)?
                .ok_or_else(|| SnapshotError::NotFound { key: key.into() })?;
            if record.kind != Kind::Active {
                return Err(SnapshotError::NotActive { key: key.into() });
            }
            if tx.get(name)?.is_some() {
                return Err(SnapshotError::AlreadyExists { key: name.into() });
            }
            tx.delete(key)?;
            let now = SystemTime::now();
            let committed = Record {
                kind: Kind::Committed,
                labels,
                created_at: now,
                updated_at: now,
                usage,
                remote,
                ..record
            };
            tx.put(name, &committed)?;
            Ok(())
        })
    }

    /// Mounts again, after a restart, every remote layer the store records, once stale mounts
    /// of the previous run are detached. A layer that cannot be mounted is logged and its
    /// snapshot refuses to be mounted until it is removed.
    pub fn restore_remote_mounts(&self) -> Result<(), SnapshotError> {
        // Mounts whose connections the remote file system holds stay: it serves them again.
        let held = self
            .remote
            .as_ref()
            .map(|r| r.held_mountpoints())
            .unwrap_or_default();
        let detached = mountinfo::detach_under(&self.snapshots_dir, &held)
            .map_err(SnapshotError::io("read mounts under", &self.snapshots_dir))?;
        if detached > 0 {
            tracing::info!(count = detached, "detached stale mounts of an earlier run");
        }
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        // Parents first: a layer's implied directories read their attributes through the
        // layers below it, which must be mounted by then.
        let mut layers = Vec::new();
        for (key, record) in self.store.all()? {
            if record.remote.is_some() {
                let parents = self.store.parent_ids(&record)?;
                layers.push((parents.len(), key, record, parents));
            }
        }
        layers.sort_by_key(|(depth, ..)| *depth);
        for (_, key, record, parents) in layers {
            let Some(state) = &record.remote else {
                continue;
            };
            let fs = self.fs_dir(record.id);
            match remote.remount(&fs, state, &self.lower_dirs(&parents)) {
                Ok(()) => tracing::info!(%key, "remounted lazy layer"),
                Err(e) => {
                    tracing::error!(%key, error = %crate::error_chain(&e), "cannot mount lazy layer again; containers using it cannot start until the image is pulled again");
                    self.unavailable_ids().insert(record.id);
                }
            }
        }
        remote.restore_done();
        Ok(())
    }

    fn unavailable_ids(&self) -> std::sync::MutexGuard<'_, HashSet<u64>> {
        // A poisoned lock only means another thread panicked while inserting an id; the set
        // itself is still valid.
        self.unavailable.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Creates a read-only view of `parent` and returns how to mount it.
    pub fn view(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<Vec<Mount>, SnapshotError> {
        self.create(Kind::View, key, parent, labels)
    }

    /// Returns the mounts that `prepare`/`view` returned for `key`.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>, SnapshotError> {
        let record = self.get(key)?;
        self.mounts_of(&record)
    }

    /// Turns the active snapshot `key` into the committed snapshot `name`.
    pub fn commit(&self, name: &str, key: &str, labels: Labels) -> Result<(), SnapshotError> {
        check_key(name)?;
        let record = self.get(key)?;
        if record.kind != Kind::Active {
            return Err(SnapshotError::NotActive { key: key.into() });
        }
        // Measured outside the transaction: a large layer would otherwise hold the store's one
        // writer while walking the tree. The layer cannot change under us: containerd commits
        // only after it has finished writing and unmounted.
        let fs = self.fs_dir(record.id);
        let usage = usage::disk_usage(&fs).map_err(SnapshotError::io("measure", &fs))?;
        self.commit_record(name, key, labels, usage, None)
    }

    /// Removes `key`; refused while other snapshots name it as their parent.
    pub fn remove(&self, key: &str) -> Result<(), SnapshotError> {
        let record = self.store.write(|tx| {
            let record = tx
                .get(key)?
                .ok_or_else(|| SnapshotError::NotFound { key: key.into() })?;
            if tx.has_children(key)? {
                return Err(SnapshotError::HasChildren { key: key.into() });
            }
            tx.delete(key)?;
            Ok(record)
        })?;
        let dir = self.snapshot_dir(record.id);
        if record.remote.is_some() {
            self.unavailable_ids().remove(&record.id);
            if let Some(remote) = &self.remote {
                if let Err(e) = remote.unmount(&self.fs_dir(record.id)) {
                    tracing::warn!(key, error = %crate::error_chain(&e), "unmounting lazy layer failed");
                }
            }
        }
        // After the commit the directory is an orphan whatever happens next, so a failure here
        // only delays the space being freed until the next Cleanup.
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(key, dir = %dir.display(), error = %crate::error_chain(&e), "removing snapshot directory failed; cleanup will retry");
        }
        Ok(())
    }

    pub fn stat(&self, key: &str) -> Result<Info, SnapshotError> {
        Ok(self.get(key)?.info(key))
    }

    /// Updates the labels of `info.name` following containerd's field-path rules: no paths or
    /// `labels` replaces all labels, `labels.KEY` copies one (deleting it when absent from
    /// `info`); every other field is immutable.
    pub fn update(&self, info: &Info, fieldpaths: &[String]) -> Result<Info, SnapshotError> {
        let key = info.name.as_str();
        self.store.write(|tx| {
            let mut record = tx
                .get(key)?
                .ok_or_else(|| SnapshotError::NotFound { key: key.into() })?;
            if fieldpaths.is_empty() {
                record.labels = info.labels.clone();
            }
            for path in fieldpaths {
                if path == "labels" {
                    record.labels = info.labels.clone();
                } else if let Some(label) = path.strip_prefix("labels.") {
                    match info.labels.get(label) {
                        Some(value) => record.labels.insert(label.to_owned(), value.clone()),
                        None => record.labels.remove(label),
                    };
                } else {
                    return Err(SnapshotError::ImmutableField {
                        key: key.into(),
                        field: path.clone(),
                    });
                }
            }
            record.updated_at = SystemTime::now();
            tx.put(key, &record)?;
            Ok(record.info(key))
        })
    }

    /// The space `key` takes itself: measured now for an active snapshot, as recorded at commit
    /// otherwise.
    pub fn usage(&self, key: &str) -> Result<Usage, SnapshotError> {
        let record = self.get(key)?;
        if record.kind != Kind::Active {
            return Ok(record.usage);
        }
        let fs = self.fs_dir(record.id);
        usage::disk_usage(&fs).map_err(SnapshotError::io("measure", &fs))
    }

    /// Every snapshot matching any of `filters` (all when there are none).
    pub fn list(&self, filters: &[String]) -> Result<Vec<Info>, SnapshotError> {
        let filters =
            filter::parse_all(filters).map_err(|(filter, e)| SnapshotError::InvalidFilter {
                filter,
                reason: e.to_string(),
            })?;
        Ok(self
            .store
            .all()?
            .into_iter()
            .map(|(key, record)| record.info(&key))
            .filter(|info| filter::matches_any(&filters, info))
            .collect())
    }

    /// Removes every directory under `snapshots/` that no record names: leftovers of removed
    /// snapshots whose deletion failed, and of operations interrupted by a crash.
    pub fn cleanup(&self) -> Result<(), SnapshotError> {
        let _exclusive = self.making_dirs.write().unwrap_or_else(|p| p.into_inner());
        let known: HashSet<String> = self
            .store
            .all()?
            .into_iter()
            .map(|(_, record)| record.id.to_string())
            .collect();
        let entries = std::fs::read_dir(&self.snapshots_dir)
            .map_err(SnapshotError::io("list", &self.snapshots_dir))?;
        for entry in entries {
            let entry = entry.map_err(SnapshotError::io("list", &self.snapshots_dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if known.contains(&name) {
                continue;
            }
            let path = entry.path();
            tracing::info!(dir = %path.display(), "removing orphaned snapshot directory");
            mountinfo::detach_under(&path, &[])
                .map_err(SnapshotError::io("read mounts under", &path))?;
            std::fs::remove_dir_all(&path).map_err(SnapshotError::io("remove", &path))?;
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Record, SnapshotError> {
        self.store
            .get(key)?
            .ok_or_else(|| SnapshotError::NotFound { key: key.into() })
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
    ) -> Result<Vec<Mount>, SnapshotError> {
        self.create_with(kind, key, parent, labels, Durability::Immediate)
    }

    /// `create`, its record written with `durability`.
    fn create_with(
        &self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: Labels,
        durability: Durability,
    ) -> Result<Vec<Mount>, SnapshotError> {
        check_key(key)?;
        let _making = self.making_dirs.read().unwrap_or_else(|p| p.into_inner());
        let staging = self.stage(kind)?;
        let mut placed = None;
        let result = self.store.write_with(durability, |tx| {
            if tx.get(key)?.is_some() {
                return Err(SnapshotError::AlreadyExists { key: key.into() });
            }
            let parent_id = match parent {
                None => None,
                Some(parent) => {
                    let record = tx
                        .get(parent)?
                        .ok_or_else(|| SnapshotError::ParentNotFound {
                            key: key.into(),
                            parent: parent.into(),
                        })?;
                    if record.kind != Kind::Committed {
                        return Err(SnapshotError::ParentNotCommitted {
                            key: key.into(),
                            parent: parent.into(),
                        });
                    }
                    Some(record.id)
                }
            };
            if let Some(parent_id) = parent_id {
                self.inherit_owner(&staging.join("fs"), parent_id)?;
            }
            let now = SystemTime::now();
            let record = Record {
                id: tx.next_id()?,
                kind,
                parent: parent.map(str::to_owned),
                labels,
                created_at: now,
                updated_at: now,
                usage: Usage::default(),
                remote: None,
            };
            tx.put(key, &record)?;
            let target = self.snapshot_dir(record.id);
            // An id is only burnt when its transaction commits, so a directory of that name can
            // be left from a crashed attempt; no record owns it.
            if target.exists() {
                std::fs::remove_dir_all(&target).map_err(SnapshotError::io("remove", &target))?;
            }
            std::fs::rename(&staging, &target).map_err(SnapshotError::io("rename", &staging))?;
            placed = Some(target);
            Ok(record)
        });
        match result {
            Ok(record) => self.mounts_of(&record),
            Err(e) => {
                let leftover = placed.unwrap_or(staging);
                if let Err(cleanup) = std::fs::remove_dir_all(&leftover) {
                    tracing::warn!(dir = %leftover.display(), error = %cleanup, "removing staged snapshot directory failed; cleanup will retry");
                }
                Err(e)
            }
        }
    }

    /// Makes a fresh directory with `fs` (and `work` for active snapshots) under a name no
    /// record uses.
    fn stage(&self, kind: Kind) -> Result<PathBuf, SnapshotError> {
        let staging = tempfile::Builder::new()
            .prefix("new-")
            .tempdir_in(&self.snapshots_dir)
            .map_err(SnapshotError::io(
                "create staging dir in",
                &self.snapshots_dir,
            ))?
            .keep();
        let fs = staging.join("fs");
        std::fs::create_dir(&fs).map_err(SnapshotError::io("create", &fs))?;
        // The layer's root must be 0755 whatever the daemon's umask: it becomes the container's
        // `/` when there is no parent.
        std::fs::set_permissions(&fs, std::fs::Permissions::from_mode(0o755))
            .map_err(SnapshotError::io("chmod", &fs))?;
        if kind == Kind::Active {
            let work = staging.join("work");
            std::fs::create_dir(&work).map_err(SnapshotError::io("create", &work))?;
            std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o711))
                .map_err(SnapshotError::io("chmod", &work))?;
        }
        Ok(staging)
    }

    /// overlayfs takes the root's owner from the upper dir; copy the parent's so that an image
    /// whose root belongs to a non-root user keeps it (as containerd does).
    fn inherit_owner(&self, fs: &Path, parent_id: u64) -> Result<(), SnapshotError> {
        let parent_fs = self.fs_dir(parent_id);
        let meta = std::fs::metadata(&parent_fs).map_err(SnapshotError::io("stat", &parent_fs))?;
        std::os::unix::fs::chown(fs, Some(meta.uid()), Some(meta.gid()))
            .map_err(SnapshotError::io("chown", fs))
    }

    fn mounts_of(&self, record: &Record) -> Result<Vec<Mount>, SnapshotError> {
        let chain = self.store.parents(record)?;
        let parents: Vec<u64> = chain.iter().map(|(_, r)| r.id).collect();
        {
            let unavailable = self.unavailable_ids();
            if let Some(id) = parents.iter().find(|id| unavailable.contains(id)) {
                return Err(SnapshotError::LayerUnavailable { id: *id });
            }
        }
        self.ensure_served(&chain)?;
        Ok(self.overlay_mounts(record.id, record.kind, &parents))
    }

    /// The `fs` dirs of `ids`, as overlayfs stacks them (nearest first).
    fn lower_dirs(&self, ids: &[u64]) -> Vec<PathBuf> {
        ids.iter().map(|id| self.fs_dir(*id)).collect()
    }

    /// Checks that every lazy layer in `chain` (a parent chain, nearest first) is still served
    /// at its `fs` dir, and mounts again the ones that died, farthest first, so each is
    /// mounted over live layers. A layer that cannot be repaired fails the call: handing out
    /// its empty directory would silently drop the layer's files from the container.
    fn ensure_served(&self, chain: &[(String, Record)]) -> Result<(), SnapshotError> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        for (i, (key, record)) in chain.iter().enumerate().rev() {
            let Some(state) = &record.remote else {
                continue;
            };
            let fs = self.fs_dir(record.id);
            let Err(dead) = remote.check(&fs) else {
                continue;
            };
            let lower: Vec<u64> = chain[i + 1..].iter().map(|(_, r)| r.id).collect();
            self.repair(remote.as_ref(), key, state, &fs, &lower, dead)?;
        }
        Ok(())
    }

    /// Mounts a dead lazy layer again from its saved state: whatever is left at `fs` is
    /// detached first.
    fn repair(
        &self,
        remote: &dyn RemoteFs,
        key: &str,
        state: &RemoteState,
        fs: &Path,
        lower: &[u64],
        dead: RemoteError,
    ) -> Result<(), SnapshotError> {
        let _one = self.repairing.lock().unwrap_or_else(|p| p.into_inner());
        // Another call may have repaired it while this one waited.
        if remote.check(fs).is_ok() {
            return Ok(());
        }
        let (layer, cause) = match &dead {
            RemoteError::Dead { layer, reason, .. } => (layer.clone(), reason.clone()),
            other => (String::new(), crate::error_chain(other)),
        };
        // Not `unmount`: that means the snapshot is going, and the layer's saved state (which
        // the remount needs) would go with its last mount. `remount` replaces the dead entry.
        let failed = |source: RemoteError| {
            let e = SnapshotError::LayerDead {
                key: key.to_owned(),
                layer: layer.clone(),
                mountpoint: fs.to_path_buf(),
                cause: cause.clone(),
                source: Box::new(source),
            };
            tracing::error!(key, %layer, mountpoint = %fs.display(), error = %crate::error_chain(&e), "cannot repair dead lazy layer mount");
            e
        };
        let detached = mountinfo::detach_all_at(fs).map_err(|e| {
            failed(RemoteError::Unmount {
                mountpoint: fs.to_path_buf(),
                source: Box::new(e),
            })
        })?;
        remote
            .remount(fs, state, &self.lower_dirs(lower))
            .map_err(failed)?;
        tracing::warn!(key, %layer, mountpoint = %fs.display(), %cause, detached, "lazy layer mount was dead; mounted it again");
        Ok(())
    }

    /// The same mounts containerd's overlayfs snapshotter returns: a bind mount when there is a
    /// single layer (overlayfs needs at least two), overlay otherwise.
    fn overlay_mounts(&self, id: u64, kind: Kind, parents: &[u64]) -> Vec<Mount> {
        let path = |id: u64| self.fs_dir(id).display().to_string();
        let bind = |source: String, mode: &str| Mount {
            kind: "bind".into(),
            source,
            options: vec![mode.into(), "rbind".into()],
        };
        if parents.is_empty() {
            let mode = if kind == Kind::View { "ro" } else { "rw" };
            return vec![bind(path(id), mode)];
        }
        let mut options = self.overlay_options.clone();
        if kind == Kind::Active {
            options.push(format!(
                "workdir={}",
                self.snapshot_dir(id).join("work").display()
            ));
            options.push(format!("upperdir={}", path(id)));
        } else if let [only] = parents {
            return vec![bind(path(*only), "ro")];
        }
        let lower: Vec<String> = parents.iter().map(|p| path(*p)).collect();
        options.push(format!("lowerdir={}", lower.join(":")));
        vec![Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options,
        }]
    }

    fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.snapshots_dir.join(id.to_string())
    }

    fn fs_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("fs")
    }
}

fn check_key(key: &str) -> Result<(), SnapshotError> {
    if key.is_empty() {
        return Err(SnapshotError::InvalidKey {
            reason: "key must not be empty",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
