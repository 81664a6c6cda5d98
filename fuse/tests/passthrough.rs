//! Kernel passthrough: files the source has complete on local disk are read by the kernel
//! straight from there, opens of one inode never mix modes, and overlayfs still stacks.

mod common;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use common::{pattern, Mounted};
use lazysnap_fuse::{Ino, LayerSource, MemorySource, Meta, MountOptions, SourceError};
use nix::mount::{umount2, MntFlags, MsFlags};

const LEN: usize = 2 << 20;

/// A [`MemorySource`] that can offer backing files and counts the reads it serves itself.
struct Cached {
    inner: MemorySource,
    /// Inode → the local copy of its contents.
    backing: HashMap<Ino, PathBuf>,
    /// Whether the local copies are offered now (a cache can gain or lose a file).
    offering: AtomicBool,
    reads: AtomicUsize,
}

impl LayerSource for Cached {
    crate::delegate_to_inner!(lookup, getattr, readdir, readlink, listxattr, getxattr);

    async fn read(&self, ino: Ino, offset: u64, len: u32) -> Result<Bytes, SourceError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read(ino, offset, len).await
    }

    fn backing_file(&self, ino: Ino) -> Option<File> {
        if !self.offering.load(Ordering::SeqCst) {
            return None;
        }
        File::open(self.backing.get(&ino)?).ok()
    }
}

struct Setup {
    source: Arc<Cached>,
    mounted: Mounted,
    /// Holds the local copies; dropped after the mount.
    _scratch: tempfile::TempDir,
}

impl Setup {
    /// Files `a` and `b` with the same contents; `a` has a local copy in a scratch dir.
    fn new(offering: bool) -> Self {
        let scratch = tempfile::tempdir().expect("scratch dir");
        let local = scratch.path().join("a.cached");
        fs::write(&local, pattern(LEN)).expect("write the local copy");
        Self::with_copy_at(offering, local, scratch)
    }

    /// As [`Setup::new`], with `a`'s local copy opened from `local`.
    fn with_copy_at(offering: bool, local: PathBuf, scratch: tempfile::TempDir) -> Self {
        let mut tree = MemorySource::new();
        let a = tree.file(Ino::ROOT, "a", Meta::new(0o644), pattern(LEN));
        tree.file(Ino::ROOT, "b", Meta::new(0o644), pattern(LEN));
        let source = Arc::new(Cached {
            inner: tree,
            backing: HashMap::from([(a, local)]),
            offering: AtomicBool::new(offering),
            reads: AtomicUsize::new(0),
        });
        let options = MountOptions {
            passthrough: true,
            ..MountOptions::default()
        };
        let mounted = Mounted::new(Arc::clone(&source), options);
        Self {
            source,
            mounted,
            _scratch: scratch,
        }
    }

    fn reads(&self) -> usize {
        self.source.reads.load(Ordering::SeqCst)
    }
}

/// Detaches an overlay mount however the test ends.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = umount2(&self.0, MntFlags::MNT_DETACH);
    }
}

fn read_at(file: &File, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset).expect("read_exact_at");
    buf
}

#[test]
fn a_file_with_a_local_copy_never_reaches_the_source() {
    let s = Setup::new(true);
    let data = fs::read(s.mounted.path("a")).expect("read a");
    assert!(data == pattern(LEN));
    assert_eq!(s.reads(), 0, "passthrough reads went to the source");

    // A file without a local copy is served as usual.
    let data = fs::read(s.mounted.path("b")).expect("read b");
    assert!(data == pattern(LEN));
    assert!(s.reads() > 0);
}

#[test]
fn opens_of_one_inode_keep_the_mode_of_the_first() {
    let s = Setup::new(false);
    let expected = pattern(LEN);

    // First open: no local copy yet, so through the page cache.
    let first = File::open(s.mounted.path("a")).expect("open without a copy");
    assert!(read_at(&first, 0, 4096) == expected[..4096]);
    let served = s.reads();
    assert!(served > 0);

    // The copy appears; a second open while the first is held must not switch modes (the
    // kernel would fail it with EIO) and reads on.
    s.source.offering.store(true, Ordering::SeqCst);
    let second = File::open(s.mounted.path("a")).expect("second open, same mode");
    assert!(read_at(&second, 1 << 20, 4096) == expected[1 << 20..(1 << 20) + 4096]);
    assert!(
        s.reads() > served,
        "the second open was not through the page cache"
    );
    drop((first, second));

    // All closed: the next open picks passthrough, and the source sees no more reads even for
    // ranges never read before.
    let third = File::open(s.mounted.path("a")).expect("open with a copy");
    let served = s.reads();
    assert!(read_at(&third, LEN as u64 - 8192, 8192) == expected[LEN - 8192..]);
    assert_eq!(
        s.reads(),
        served,
        "passthrough open read through the source"
    );

    // The copy goes away while a passthrough open is held: later opens stay passthrough.
    s.source.offering.store(false, Ordering::SeqCst);
    let fourth = File::open(s.mounted.path("a")).expect("open after the copy went");
    assert!(read_at(&fourth, 700_000, 100_000) == expected[700_000..800_000]);
    assert_eq!(s.reads(), served);
}

#[test]
fn a_backing_file_on_a_stacked_filesystem_falls_back_to_reads() {
    common::require_root();
    // The local copy is opened through an overlay mount, which the kernel refuses as a
    // backing file at stacking depth 1.
    let scratch = tempfile::tempdir().expect("scratch dir");
    let lower = scratch.path().join("lower");
    let (empty, merged) = (scratch.path().join("empty"), scratch.path().join("merged"));
    for dir in [&lower, &empty, &merged] {
        fs::create_dir(dir).expect("mkdir");
    }
    fs::write(lower.join("a.cached"), pattern(LEN)).expect("write the local copy");
    // Without an upper dir overlayfs wants two lower dirs.
    let options = format!("lowerdir={}:{}", lower.display(), empty.display());
    nix::mount::mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        MsFlags::MS_RDONLY,
        Some(options.as_str()),
    )
    .expect("mount overlay");
    let overlay = Unmount(merged.clone());

    let s = Setup::with_copy_at(true, merged.join("a.cached"), scratch);
    let data = fs::read(s.mounted.path("a")).expect("read a");
    assert!(data == pattern(LEN));
    assert!(s.reads() > 0, "the stacked copy was used");
    // The overlay first: the scratch dir it sits in goes with the fixture.
    drop(overlay);
    drop(s);
}

#[test]
fn overlayfs_stacks_on_a_passthrough_mount() {
    let s = Setup::new(true);
    let scratch = s.mounted.dir.path();
    let (upper, work, merged) = (
        scratch.join("upper"),
        scratch.join("work"),
        scratch.join("merged"),
    );
    for dir in [&upper, &work, &merged] {
        fs::create_dir(dir).expect("mkdir");
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        s.mounted.mountpoint.display(),
        upper.display(),
        work.display()
    );
    nix::mount::mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .expect("overlay on a passthrough mount (max_stack_depth 1)");
    let _overlay = Unmount(merged.clone());

    let mut data = Vec::new();
    File::open(merged.join("a"))
        .and_then(|mut f| f.read_to_end(&mut data))
        .expect("read through the overlay");
    assert!(data == pattern(LEN));
    assert_eq!(s.reads(), 0);
    let mut f = OpenOptions::new()
        .append(true)
        .open(merged.join("a"))
        .expect("copy up");
    f.write_all(b"tail").expect("append");
    drop(f);
    assert_eq!(
        fs::metadata(upper.join("a")).map(|m| m.len()).ok(),
        Some(LEN as u64 + 4)
    );
    umount2(&merged, MntFlags::empty()).expect("unmount overlay");
}
