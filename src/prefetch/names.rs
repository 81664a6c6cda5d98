//! Replays a trace's names through a freshly mounted layer, before a container asks: each
//! lookup (found or not), listing and symlink read the kernel answers once is one it keeps
//! (entries, negative entries, listings and link targets are cached for the mount's TTL), so
//! the container's own requests are answered by the kernel instead of a round trip to the
//! daemon each. A container start asks a few hundred of them, one after another, overlayfs
//! asking each lower layer in turn; on a VM each round trip costs tens of microseconds
//! (waking the daemon's thread and then the caller), which is where a warm lazy start
//! loses to one on overlayfs.
//!
//! Works on any directory through ordinary system calls; knows nothing of FUSE. Paths come
//! from a trace, possibly another node's: every one is resolved beneath the mount root,
//! following no symlink and crossing no mount (`openat2`), so none can reach outside it.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};

use super::recorder::NameOp;
use super::trace::NameEntry;

/// What a replay did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// Requests made; `found` of them named something that exists.
    pub asked: usize,
    pub found: usize,
    /// Why the replay ended before the last name, if it did.
    pub stopped: Option<String>,
}

/// Asks `names` of the directory `root`, in order, until done or `budget` has passed.
/// Blocking. A name the layer lacks is not an error (that is what a negative entry is
/// for); an error that says the mount is gone or the kernel cannot do this ends the replay.
pub fn replay(root: &Path, names: &[NameEntry], budget: Duration) -> Replayed {
    let started = Instant::now();
    let mut done = Replayed::default();
    let root = match open_root(root) {
        Ok(fd) => fd,
        Err(e) => {
            done.stopped = Some(format!("open {}: {e}", root.display()));
            return done;
        }
    };
    for name in names {
        if started.elapsed() > budget {
            done.stopped = Some(format!("its budget of {budget:?} ran out"));
            break;
        }
        done.asked += 1;
        match ask(&root, name) {
            Ok(()) => done.found += 1,
            // Missing, or not a directory on the way: the kernel keeps that answer too. A
            // path that would leave the root (EXDEV, ELOOP) or that no name could have
            // (ENAMETOOLONG) is refused and skipped.
            Err(e) if skippable(e) => {}
            // Anything else (the mount gone, EIO, no openat2) will not get better.
            Err(e) => {
                done.stopped = Some(format!("{:?} of {:?}: {e}", name.op, name.path));
                break;
            }
        }
    }
    done
}

/// The mount root, for [`open_beneath`].
pub(crate) fn open_root(root: &Path) -> Result<OwnedFd, Errno> {
    nix::fcntl::open(
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
}

/// Opens a traced `path` beneath `root` only, following no symlink on the way or at the end
/// and crossing no mount: the traced paths go through directories of this layer only
/// (overlayfs resolves symlinks above the layers), so this loses nothing and a hostile path
/// gets nowhere.
pub(crate) fn open_beneath(root: &OwnedFd, path: &str, flags: OFlag) -> Result<OwnedFd, Errno> {
    let resolve = ResolveFlag::RESOLVE_BENEATH
        | ResolveFlag::RESOLVE_NO_SYMLINKS
        | ResolveFlag::RESOLVE_NO_XDEV;
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .resolve(resolve);
    openat2(root.as_fd(), path, how)
}

/// Errors that say a traced path names nothing here (missing, not a directory on the way)
/// or one that is refused (it would leave the root, or no name could be that long): the
/// path is skipped. Anything else (the mount gone, EIO, no `openat2`) will not get better.
pub(crate) fn skippable(e: Errno) -> bool {
    matches!(
        e,
        Errno::ENOENT
            | Errno::ENOTDIR
            | Errno::ELOOP
            | Errno::EXDEV
            | Errno::EINVAL
            | Errno::ENAMETOOLONG
    )
}

/// One request, as the kernel would get it from a container.
fn ask(root: &OwnedFd, name: &NameEntry) -> Result<(), Errno> {
    match name.op {
        // An O_PATH open looks every part up and opens nothing (no OPEN to the daemon).
        NameOp::Lookup => open_beneath(root, &name.path, OFlag::O_PATH).map(drop),
        NameOp::List => {
            let fd = open_beneath(root, &name.path, OFlag::O_RDONLY | OFlag::O_DIRECTORY)?;
            let mut dir = nix::dir::Dir::from_fd(fd)?;
            // Reading to the end is what leaves the whole listing in the kernel's cache; a
            // listing is as long as the layer's index says, which bounds it.
            for entry in dir.iter() {
                entry?;
            }
            Ok(())
        }
        NameOp::Readlink => {
            let fd = open_beneath(root, &name.path, OFlag::O_PATH)?;
            nix::fcntl::readlinkat(fd.as_fd(), "").map(drop)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(path: &str, op: NameOp) -> NameEntry {
        NameEntry {
            path: path.into(),
            op,
            since_mount_ms: 0,
        }
    }

    #[test]
    fn asks_every_kind_of_name_and_counts_what_exists() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("usr/lib")).expect("dirs");
        std::fs::write(dir.path().join("usr/lib/a.so"), b"x").expect("file");
        std::os::unix::fs::symlink("lib", dir.path().join("usr/lib64")).expect("symlink");
        let names = [
            name("usr/lib/a.so", NameOp::Lookup),
            name("usr/lib/missing.so", NameOp::Lookup),
            name("usr/lib", NameOp::List),
            name("usr/lib64", NameOp::Readlink),
            name("usr/lib64", NameOp::Lookup),
        ];
        let done = replay(dir.path(), &names, Duration::from_secs(10));
        assert_eq!(
            done,
            Replayed {
                asked: 5,
                found: 4,
                stopped: None
            }
        );
    }

    #[test]
    fn paths_never_lead_out_of_the_root() {
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(outside.path().join("secret")).expect("dir");
        let dir = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink(outside.path(), dir.path().join("out")).expect("symlink");
        let names = [
            name("out/secret", NameOp::Lookup),
            name("out/secret", NameOp::List),
            name("../secret", NameOp::Lookup),
            name(
                &format!("{}", outside.path().join("secret").display()),
                NameOp::List,
            ),
        ];
        let done = replay(dir.path(), &names, Duration::from_secs(10));
        assert_eq!(done.found, 0, "{done:?}");
        assert_eq!(
            done.asked, 4,
            "refusals are not failures of the mount: {done:?}"
        );
    }

    #[test]
    fn a_spent_budget_or_a_missing_root_ends_the_replay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let names = vec![name("a", NameOp::Lookup); 3];
        let done = replay(dir.path(), &names, Duration::ZERO);
        assert_eq!(done.asked, 0);
        assert!(
            done.stopped
                .as_deref()
                .is_some_and(|s| s.contains("budget")),
            "{done:?}"
        );
        let done = replay(&dir.path().join("gone"), &names, Duration::from_secs(1));
        assert!(
            done.stopped.as_deref().is_some_and(|s| s.contains("gone")),
            "{done:?}"
        );
    }
}
