//! Is a lazy layer still served at its mountpoint? A mount can die under a live daemon: its
//! FUSE connection aborted (`/sys/fs/fuse/connections/N/abort`), or unmounted behind the
//! daemon's back (`umount -l`). The directory left behind is empty, and a container stacking it
//! would silently miss the layer's files, so the snapshotter checks before handing a layer out.
//!
//! (After an abort the mount stays and answers `ENOTCONN` until the repair detaches it; after
//! `umount -l` what is left is the empty directory underneath. Either way the probe below
//! fails.)
//!
//! A probe is two system calls on the mountpoint: `stat`, whose device must still be the one
//! the FUSE mount had when it was made (after `umount -l` it is the directory underneath), and
//! `statfs`, which the kernel always sends to the FUSE server (after an abort it fails with
//! `ENOTCONN`) and whose type must be FUSE's. It runs on a thread of its own and is waited for
//! at most [`PROBE_TIMEOUT`], so a hung connection cannot hang the snapshotter; while such a
//! probe is stuck, the mount counts as dead without another thread being spent on it. A good
//! answer is trusted for [`TRUST_OK_FOR`], so a burst of Prepare calls costs a lock each.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::statfs::{statfs, FUSE_SUPER_MAGIC};

/// How long a probe may take before the mount counts as hung.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a good probe is trusted on the hot path.
pub const TRUST_OK_FOR: Duration = Duration::from_secs(1);

/// The health of one mount: when it last answered, and whether a probe is still out.
#[derive(Debug, Default)]
pub struct Health {
    last_ok: Mutex<Option<Instant>>,
    /// Set while a probe thread has not returned (it may be stuck in the kernel).
    probing: Arc<AtomicBool>,
}

impl Health {
    /// Checks the mount at `mountpoint`, made with device `dev`: `Err(reason)` when it is not
    /// served. With `fresh`, a recent good answer is not enough (an operator's look).
    pub fn check(&self, mountpoint: &Path, dev: u64, fresh: bool) -> Result<(), String> {
        if !fresh {
            let last = *self.last_ok.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < TRUST_OK_FOR) {
                return Ok(());
            }
        }
        let result = self.probe_bounded(mountpoint.to_path_buf(), dev);
        *self.last_ok.lock().unwrap_or_else(|p| p.into_inner()) = result.is_ok().then(Instant::now);
        result
    }

    fn probe_bounded(&self, mountpoint: PathBuf, dev: u64) -> Result<(), String> {
        if self.probing.swap(true, Ordering::AcqRel) {
            return Err(format!(
                "an earlier check has not returned in {}s (the FUSE server does not answer)",
                PROBE_TIMEOUT.as_secs()
            ));
        }
        let (tx, rx) = mpsc::channel();
        let probing = self.probing.clone();
        let spawned = std::thread::Builder::new()
            .name("lazysnap-check".to_owned())
            .spawn(move || {
                let result = probe(&mountpoint, dev);
                probing.store(false, Ordering::Release);
                // The checker may have given up waiting.
                let _ = tx.send(result);
            });
        if let Err(e) = spawned {
            self.probing.store(false, Ordering::Release);
            return Err(format!("cannot start a check: {e}"));
        }
        match rx.recv_timeout(PROBE_TIMEOUT) {
            Ok(result) => result,
            Err(_) => Err(format!(
                "the FUSE server did not answer within {}s",
                PROBE_TIMEOUT.as_secs()
            )),
        }
    }
}

/// One look at the mountpoint, unbounded: run it off the caller's thread.
pub fn probe(mountpoint: &Path, dev: u64) -> Result<(), String> {
    let meta = std::fs::symlink_metadata(mountpoint).map_err(|e| describe("stat", &e))?;
    if meta.dev() != dev {
        return Err(format!(
            "not mounted: the mountpoint is on device {}:{}, the layer's FUSE mount was {}:{} (unmounted or detached behind the daemon's back)",
            nix::sys::stat::major(meta.dev()),
            nix::sys::stat::minor(meta.dev()),
            nix::sys::stat::major(dev),
            nix::sys::stat::minor(dev),
        ));
    }
    let fs = statfs(mountpoint).map_err(|e| describe("statfs", &std::io::Error::from(e)))?;
    if fs.filesystem_type() != FUSE_SUPER_MAGIC {
        return Err("not mounted: the mountpoint is not a FUSE file system".to_owned());
    }
    Ok(())
}

/// Whether a FUSE file system is mounted exactly at `mountpoint`, from the mount table alone:
/// nothing is asked of the file system, which may have no server (a held connection).
pub fn is_fuse_mount(mountpoint: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = escape_mountinfo(&mountpoint.to_string_lossy());
    table.lines().any(|line| {
        let point = line.split(' ').nth(4);
        let fstype = line
            .split_once(" - ")
            .and_then(|(_, rest)| rest.split(' ').next());
        point == Some(wanted.as_str())
            && fstype.is_some_and(|t| t == "fuse" || t.starts_with("fuse."))
    })
}

/// mountinfo writes space, tab, newline and backslash as `\ooo` octal.
fn escape_mountinfo(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        match c {
            ' ' | '\t' | '\n' | '\\' => out.push_str(&format!("\\{:03o}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

fn describe(call: &str, e: &std::io::Error) -> String {
    if e.raw_os_error() == Some(libc::ENOTCONN) {
        format!("{call}: FUSE connection aborted ({e})")
    } else {
        format!("{call}: {e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_table_paths_are_escaped_as_the_kernel_does() {
        assert_eq!(escape_mountinfo("/a b\\c"), "/a\\040b\\134c");
        assert!(!is_fuse_mount(Path::new("/")), "the root is not FUSE here");
    }
    use std::sync::Arc;

    #[test]
    fn a_plain_directory_is_not_the_mount() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = std::fs::metadata(dir.path()).expect("stat").dev();
        // the directory's own device but not FUSE: refused by statfs's type
        let err = probe(dir.path(), dev).expect_err("not FUSE");
        assert!(err.contains("not a FUSE file system"), "{err}");
        // a different device: what `umount -l` leaves
        let err = probe(dir.path(), dev + 1).expect_err("wrong device");
        assert!(err.contains("not mounted"), "{err}");
        let health = Health::default();
        assert!(health.check(dir.path(), dev, false).is_err());
        assert!(!health.probing.load(Ordering::Acquire), "probe returned");
        let err = probe(&dir.path().join("missing"), dev).expect_err("gone");
        assert!(err.starts_with("stat: "), "{err}");
    }

    /// A root directory and nothing else.
    struct EmptyRoot;

    impl lazysnap_fuse::LayerSource for EmptyRoot {
        fn lookup(
            &self,
            _: lazysnap_fuse::Ino,
            _: &std::ffi::OsStr,
        ) -> Result<lazysnap_fuse::Attr, lazysnap_fuse::SourceError> {
            Err(lazysnap_fuse::SourceError::NotFound)
        }
        fn getattr(
            &self,
            ino: lazysnap_fuse::Ino,
        ) -> Result<lazysnap_fuse::Attr, lazysnap_fuse::SourceError> {
            Ok(lazysnap_fuse::Attr {
                ino,
                kind: lazysnap_fuse::FileKind::Directory,
                perm: 0o755,
                nlink: 2,
                uid: 0,
                gid: 0,
                rdev: lazysnap_fuse::Device { major: 0, minor: 0 },
                size: 4096,
                blocks: 8,
                mtime: std::time::SystemTime::UNIX_EPOCH,
            })
        }
        fn readdir(
            &self,
            _: lazysnap_fuse::Ino,
            _: u64,
            _: &mut dyn FnMut(lazysnap_fuse::DirEntry<'_>) -> std::ops::ControlFlow<()>,
        ) -> Result<(), lazysnap_fuse::SourceError> {
            Ok(())
        }
        fn readlink(
            &self,
            _: lazysnap_fuse::Ino,
        ) -> Result<std::ffi::OsString, lazysnap_fuse::SourceError> {
            Err(lazysnap_fuse::SourceError::NotSymlink)
        }
        fn listxattr(
            &self,
            _: lazysnap_fuse::Ino,
        ) -> Result<Vec<std::ffi::OsString>, lazysnap_fuse::SourceError> {
            Ok(Vec::new())
        }
        fn getxattr(
            &self,
            _: lazysnap_fuse::Ino,
            _: &std::ffi::OsStr,
        ) -> Result<bytes::Bytes, lazysnap_fuse::SourceError> {
            Err(lazysnap_fuse::SourceError::NoAttribute)
        }
        async fn read(
            &self,
            _: lazysnap_fuse::Ino,
            _: u64,
            _: u32,
        ) -> Result<bytes::Bytes, lazysnap_fuse::SourceError> {
            Err(lazysnap_fuse::SourceError::IsDirectory)
        }
    }

    fn fusectl() -> bool {
        let mounted = std::fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split(' ').nth(2) == Some("fusectl"));
        mounted
            || nix::mount::mount(
                Some("fusectl"),
                "/sys/fs/fuse/connections",
                Some("fusectl"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .is_ok()
    }

    /// A real FUSE mount: alive, then its connection aborted; and what a check costs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_live_mount_passes_and_an_aborted_one_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let handle = lazysnap_fuse::mount(
            Arc::new(EmptyRoot),
            dir.path(),
            lazysnap_fuse::MountOptions::default(),
            tokio::runtime::Handle::current(),
        )
        .expect("mount");
        let point = dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || {
            let dev = std::fs::metadata(&point).expect("stat").dev();
            let health = Health::default();
            const N: u32 = 2000;
            let started = Instant::now();
            for _ in 0..N {
                probe(&point, dev).expect("alive");
            }
            let probe_cost = started.elapsed() / N;
            let started = Instant::now();
            for _ in 0..N {
                health.check(&point, dev, true).expect("alive");
            }
            let bounded_cost = started.elapsed() / N;
            let started = Instant::now();
            for _ in 0..N {
                health.check(&point, dev, false).expect("alive");
            }
            let cached_cost = started.elapsed() / N;
            eprintln!(
                "check of a live FUSE mount: probe {probe_cost:?}, probe on its own thread {bounded_cost:?}, trusted recent answer {cached_cost:?}"
            );
            if fusectl() {
                let abort = format!(
                    "/sys/fs/fuse/connections/{}/abort",
                    nix::sys::stat::minor(dev)
                );
                std::fs::write(&abort, "1").expect("abort");
                // fuser's session ends on the abort and unmounts: the probe finds either the
                // aborted connection or the directory underneath.
                let err = health.check(&point, dev, true).expect_err("aborted");
                assert!(
                    err.contains("FUSE connection aborted") || err.contains("not mounted"),
                    "{err}"
                );
            }
        })
        .await
        .expect("join");
        // Aborted: the unmount may or may not find it; detach whatever is left.
        let _ = handle.unmount();
        let _ = nix::mount::umount2(dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}
