//! Warms a freshly mounted layer's page cache with the traced bytes the store already holds,
//! by asking the kernel to read them ahead through the mount itself. Without passthrough,
//! each read a container makes of a lazily mounted file is a FUSE round trip until the kernel
//! has the file's pages (which then stay across opens: `KEEP_CACHE`); a warm start pays a few
//! hundred of them one after another, on its critical path, where a start on overlayfs reads
//! the disk directly. Asked ahead, the same bytes arrive as large asynchronous reads while
//! containerd is still setting the container up. With passthrough the store's own files are
//! warmed instead (`ChunkStore::preload`): reads of those never reach the mount's page cache.
//!
//! Like `names`, this works on any directory through ordinary system calls, and every path
//! (a trace's, possibly another node's) is resolved beneath the mount root.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::fcntl::{posix_fadvise, OFlag, PosixFadviseAdvice};

/// Bytes of one file to read ahead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    /// Relative, `/`-separated path in the layer.
    pub path: String,
    pub offset: u64,
    pub len: u64,
}

/// What a warming did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Warmed {
    /// Ranges asked for, and their bytes.
    pub ranges: usize,
    pub bytes: u64,
    /// Why it ended before the last range, if it did.
    pub stopped: Option<String>,
}

/// Asks the kernel to read `ranges` of files beneath `root` into its page cache, in order,
/// until done or `budget` has passed. Blocking, but only for as long as the kernel takes to
/// queue the reads: they are answered by the mount's own server, from its store.
pub fn warm(root: &Path, ranges: &[Range], budget: Duration) -> Warmed {
    let started = Instant::now();
    let mut done = Warmed::default();
    let root = match super::names::open_root(root) {
        Ok(fd) => fd,
        Err(e) => {
            done.stopped = Some(format!("open {}: {e}", root.display()));
            return done;
        }
    };
    // Consecutive ranges of one file (its chunks, in trace order) share one open.
    let mut open: Option<(&str, OwnedFd)> = None;
    for (i, range) in ranges.iter().enumerate() {
        // Checked before every range but the first, so that some progress is always made.
        if i > 0 && started.elapsed() > budget {
            done.stopped = Some(format!("its budget of {budget:?} ran out"));
            break;
        }
        if open.as_ref().is_none_or(|(path, _)| *path != range.path) {
            open = None;
            match super::names::open_beneath(&root, &range.path, OFlag::O_RDONLY) {
                Ok(fd) => open = Some((range.path.as_str(), fd)),
                // Gone, or a path that would leave the root: skipped, as by the names replay.
                Err(e) if super::names::skippable(e) => continue,
                Err(e) => {
                    done.stopped = Some(format!("open {:?}: {e}", range.path));
                    break;
                }
            }
        }
        let Some((_, fd)) = &open else { continue };
        let (Ok(offset), Ok(len)) = (i64::try_from(range.offset), i64::try_from(range.len)) else {
            continue;
        };
        match posix_fadvise(fd, offset, len, PosixFadviseAdvice::POSIX_FADV_WILLNEED) {
            Ok(()) => {
                done.ranges += 1;
                done.bytes += range.len;
            }
            Err(e) => {
                done.stopped = Some(format!("reading ahead {:?}: {e}", range.path));
                break;
            }
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(path: &str, offset: u64, len: u64) -> Range {
        Range {
            path: path.into(),
            offset,
            len,
        }
    }

    #[test]
    fn reads_ahead_what_exists_beneath_the_root_and_skips_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("usr/lib")).expect("dirs");
        std::fs::write(root.join("usr/lib/a.so"), vec![7u8; 64 << 10]).expect("file");
        std::fs::write(dir.path().join("outside"), b"secret").expect("outside");
        std::os::unix::fs::symlink("../outside", root.join("usr/link")).expect("symlink");
        let ranges = [
            range("usr/lib/a.so", 0, 32 << 10),
            range("usr/lib/a.so", 32 << 10, 32 << 10),
            range("usr/lib/missing.so", 0, 10),
            range("usr/link", 0, 6),
            range("../outside", 0, 6),
            range("/etc/passwd", 0, 6),
            // A directory opens and reads nothing ahead: counted, harmless.
            range("usr/lib", 0, 6),
        ];
        let done = warm(&root, &ranges, Duration::from_secs(5));
        assert_eq!(
            done,
            Warmed {
                ranges: 3,
                bytes: (64 << 10) + 6,
                stopped: None
            }
        );
    }

    #[test]
    fn stops_when_the_budget_is_spent_and_when_the_root_is_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a"), b"abc").expect("file");
        let done = warm(
            dir.path(),
            &[range("a", 0, 3), range("a", 0, 3)],
            Duration::ZERO,
        );
        assert_eq!(
            done.ranges, 1,
            "the first range is asked before the clock is read"
        );
        assert!(done.stopped.is_some_and(|s| s.contains("budget")));
        let done = warm(
            &dir.path().join("missing"),
            &[range("a", 0, 3)],
            Duration::from_secs(1),
        );
        assert!(done.stopped.is_some_and(|s| s.contains("missing")));
    }
}
