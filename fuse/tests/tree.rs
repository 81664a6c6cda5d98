//! A layer with every kind of entry, mounted through the real kernel and inspected with the
//! system calls any program (and overlayfs) would use: it must look like an extracted tar.

mod common;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::{lgetxattr, lgetxattr_sized, llistxattr, mounts_at, pattern, Mounted};
use lazysnap_fuse::{Device, FileKind, Ino, MemorySource, Meta, MountOptions};

const BIG_LEN: usize = 3 * 1024 * 1024 + 12_345;
const MANY: usize = 3000;

fn mtime() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789)
}

/// Every kind of entry a layer holds, with owners, modes and times that differ from the
/// defaults so a dropped field shows.
fn layer() -> MemorySource {
    let mut src = MemorySource::new();
    let dir = src.dir(
        Ino::ROOT,
        "dir",
        Meta::new(0o750).owner(1000, 1001).mtime(mtime()),
    );
    let file = src.file(
        dir,
        "file",
        Meta::new(0o640).owner(1000, 1001).mtime(mtime()),
        &b"hello, layer\n"[..],
    );
    src.hardlink(Ino::ROOT, "hardlink", file);
    src.file(dir, "setuid", Meta::new(0o4755), &b"#!/bin/true\n"[..]);
    src.file(Ino::ROOT, "big", Meta::new(0o644), pattern(BIG_LEN));
    src.file(Ino::ROOT, "empty", Meta::new(0o600), bytes::Bytes::new());
    src.symlink(Ino::ROOT, "link", Meta::new(0o777), "dir/file");
    src.symlink(Ino::ROOT, "abs-link", Meta::new(0o777), "/etc/passwd");
    let null = Device { major: 1, minor: 3 };
    src.special(
        Ino::ROOT,
        "null",
        FileKind::CharDevice,
        null,
        Meta::new(0o666),
    );
    let sdb1 = Device {
        major: 8,
        minor: 17,
    };
    let disk = Meta::new(0o660).owner(0, 6);
    src.special(Ino::ROOT, "sdb1", FileKind::BlockDevice, sdb1, disk);
    src.special(
        Ino::ROOT,
        "fifo",
        FileKind::Fifo,
        Device::NONE,
        Meta::new(0o644),
    );
    src.special(
        Ino::ROOT,
        "sock",
        FileKind::Socket,
        Device::NONE,
        Meta::new(0o755),
    );
    src.whiteout(Ino::ROOT, "gone");
    let opaque = src.dir(Ino::ROOT, "opaque", Meta::new(0o755));
    src.opaque(opaque);
    src.file(opaque, "inner", Meta::new(0o644), &b"inner"[..]);
    let tagged = src.file(Ino::ROOT, "tagged", Meta::new(0o644), &b"x"[..]);
    src.set_xattr(tagged, "user.comment", &b"made by a test"[..]);
    src.set_xattr(tagged, "security.capability", file_caps());
    src.set_xattr(tagged, "trusted.note", &b"root only"[..]);
    let many = src.dir(Ino::ROOT, "many", Meta::new(0o755));
    for i in 0..MANY {
        src.file(many, &many_name(i), Meta::new(0o644), bytes::Bytes::new());
    }
    src
}

/// `cap_net_bind_service+ep` (capability 10) as `setcap` stores it (VFS_CAP_REVISION_2); the kernel checks the
/// format of this xattr on the way out, so it has to be real.
fn file_caps() -> Vec<u8> {
    let mut caps = vec![0u8; 20];
    caps[..4].copy_from_slice(&0x0200_0001u32.to_le_bytes());
    caps[4..8].copy_from_slice(&(1u32 << 10).to_le_bytes());
    caps
}

/// Long names, so listing `many` takes many readdir rounds.
fn many_name(i: usize) -> String {
    format!("entry-{i:05}-with-a-long-name-to-fill-the-kernel-buffer-sooner")
}

fn mounted() -> (Arc<MemorySource>, Mounted) {
    let src = Arc::new(layer());
    let mounted = Mounted::new(Arc::clone(&src), MountOptions::default());
    (src, mounted)
}

fn errno_of(err: &std::io::Error) -> i32 {
    err.raw_os_error().unwrap_or(0)
}

#[test]
fn stat_shows_every_kind_as_extracted() {
    let (_src, m) = mounted();
    // (path, S_IFMT | perm, uid, gid, size, nlink, rdev)
    let expected: [(&str, u32, u32, u32, u64, u64, u64); 14] = [
        ("", libc::S_IFDIR | 0o755, 0, 0, 4096, 5, 0),
        ("dir", libc::S_IFDIR | 0o750, 1000, 1001, 4096, 2, 0),
        ("dir/file", libc::S_IFREG | 0o640, 1000, 1001, 13, 2, 0),
        ("hardlink", libc::S_IFREG | 0o640, 1000, 1001, 13, 2, 0),
        ("dir/setuid", libc::S_IFREG | 0o4755, 0, 0, 12, 1, 0),
        ("big", libc::S_IFREG | 0o644, 0, 0, BIG_LEN as u64, 1, 0),
        ("empty", libc::S_IFREG | 0o600, 0, 0, 0, 1, 0),
        ("link", libc::S_IFLNK | 0o777, 0, 0, 8, 1, 0),
        (
            "null",
            libc::S_IFCHR | 0o666,
            0,
            0,
            0,
            1,
            libc::makedev(1, 3),
        ),
        (
            "sdb1",
            libc::S_IFBLK | 0o660,
            0,
            6,
            0,
            1,
            libc::makedev(8, 17),
        ),
        ("fifo", libc::S_IFIFO | 0o644, 0, 0, 0, 1, 0),
        ("sock", libc::S_IFSOCK | 0o755, 0, 0, 0, 1, 0),
        ("gone", libc::S_IFCHR, 0, 0, 0, 1, 0),
        ("opaque", libc::S_IFDIR | 0o755, 0, 0, 4096, 2, 0),
    ];
    for (path, mode, uid, gid, size, nlink, rdev) in expected {
        let meta = fs::symlink_metadata(m.path(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        let got = (
            meta.mode(),
            meta.uid(),
            meta.gid(),
            meta.size(),
            meta.nlink(),
            meta.rdev(),
        );
        assert_eq!(got, (mode, uid, gid, size, nlink, rdev), "{path}");
        let blocks = match mode & libc::S_IFMT {
            libc::S_IFDIR | libc::S_IFREG => size.div_ceil(4096) * 8,
            _ => 0,
        };
        assert_eq!(meta.blocks(), blocks, "{path} st_blocks");
        assert_eq!(meta.blksize(), 4096, "{path} st_blksize");
    }
    let dir = fs::symlink_metadata(m.path("dir")).expect("stat dir");
    assert_eq!(
        (dir.mtime(), dir.mtime_nsec()),
        (1_700_000_000, 123_456_789)
    );
    assert_eq!(dir.modified().ok(), Some(mtime()));
    assert_eq!(fs::metadata(&m.mountpoint).map(|m| m.ino()).ok(), Some(1));
}

#[test]
fn hard_links_share_an_inode() {
    let (_src, m) = mounted();
    let a = fs::metadata(m.path("dir/file")).expect("stat file");
    let b = fs::metadata(m.path("hardlink")).expect("stat link");
    assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()));
    assert_eq!(a.nlink(), 2);
    assert_eq!(
        fs::read(m.path("hardlink")).ok(),
        fs::read(m.path("dir/file")).ok()
    );
}

#[test]
fn readdir_lists_names_types_and_dot_entries() {
    let (_src, m) = mounted();
    let mut listed = BTreeMap::new();
    for entry in fs::read_dir(&m.mountpoint).expect("read_dir") {
        let entry = entry.expect("entry");
        // d_type from the listing itself, not a stat: overlayfs relies on it.
        let kind = entry.file_type().expect("d_type");
        let kind = if kind.is_dir() {
            "dir"
        } else if kind.is_file() {
            "file"
        } else if kind.is_symlink() {
            "symlink"
        } else if kind.is_char_device() {
            "char"
        } else if kind.is_block_device() {
            "block"
        } else if kind.is_fifo() {
            "fifo"
        } else if kind.is_socket() {
            "socket"
        } else {
            "unknown"
        };
        listed.insert(entry.file_name().into_string().expect("utf-8"), kind);
    }
    let expected: BTreeMap<String, &str> = [
        ("dir", "dir"),
        ("hardlink", "file"),
        ("big", "file"),
        ("empty", "file"),
        ("link", "symlink"),
        ("abs-link", "symlink"),
        ("null", "char"),
        ("sdb1", "block"),
        ("fifo", "fifo"),
        ("sock", "socket"),
        ("gone", "char"),
        ("opaque", "dir"),
        ("tagged", "file"),
        ("many", "dir"),
    ]
    .into_iter()
    .map(|(name, kind)| (name.to_owned(), kind))
    .collect();
    assert_eq!(listed, expected);

    // `.` and `..` carry the right inode numbers; std hides them, getdents does not.
    let sub = m.path("dir");
    let sub_ino = fs::metadata(&sub).expect("stat dir").ino();
    let mut dots = BTreeMap::new();
    let mut raw = nix::dir::Dir::open(
        &sub,
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY,
        nix::sys::stat::Mode::empty(),
    )
    .expect("opendir");
    for entry in raw.iter() {
        let entry = entry.expect("getdents");
        dots.insert(
            entry.file_name().to_string_lossy().into_owned(),
            entry.ino(),
        );
    }
    assert_eq!(dots.get("."), Some(&sub_ino));
    assert_eq!(dots.get(".."), Some(&1));
    assert!(dots.contains_key("file") && dots.contains_key("setuid"));
}

#[test]
fn a_large_directory_lists_completely_in_order() {
    let (_src, m) = mounted();
    // Twice: the second listing may come from the kernel's directory cache.
    for round in 0..2 {
        let names: Vec<String> = fs::read_dir(m.path("many"))
            .expect("read_dir")
            .map(|entry| {
                entry
                    .expect("entry")
                    .file_name()
                    .into_string()
                    .expect("utf-8")
            })
            .collect();
        let expected: Vec<String> = (0..MANY).map(many_name).collect();
        assert_eq!(names.len(), MANY, "round {round}");
        assert_eq!(names, expected, "round {round}");
    }
    assert!(fs::metadata(m.path("many").join(many_name(MANY - 1))).is_ok());
}

/// Counts the lookups that reach the source, passing everything on.
struct CountingLookups {
    inner: MemorySource,
    lookups: std::sync::atomic::AtomicUsize,
}

impl lazysnap_fuse::LayerSource for CountingLookups {
    fn lookup(
        &self,
        parent: Ino,
        name: &std::ffi::OsStr,
    ) -> Result<lazysnap_fuse::Attr, lazysnap_fuse::SourceError> {
        self.lookups
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.lookup(parent, name)
    }
    fn getattr(&self, ino: Ino) -> Result<lazysnap_fuse::Attr, lazysnap_fuse::SourceError> {
        self.inner.getattr(ino)
    }
    fn readdir(
        &self,
        dir: Ino,
        offset: u64,
        add: &mut dyn FnMut(lazysnap_fuse::DirEntry<'_>) -> std::ops::ControlFlow<()>,
    ) -> Result<(), lazysnap_fuse::SourceError> {
        self.inner.readdir(dir, offset, add)
    }
    fn readlink(&self, ino: Ino) -> Result<std::ffi::OsString, lazysnap_fuse::SourceError> {
        self.inner.readlink(ino)
    }
    fn listxattr(&self, ino: Ino) -> Result<Vec<std::ffi::OsString>, lazysnap_fuse::SourceError> {
        self.inner.listxattr(ino)
    }
    fn getxattr(
        &self,
        ino: Ino,
        name: &std::ffi::OsStr,
    ) -> Result<bytes::Bytes, lazysnap_fuse::SourceError> {
        self.inner.getxattr(ino, name)
    }
    fn read(
        &self,
        ino: Ino,
        offset: u64,
        len: u32,
    ) -> impl std::future::Future<Output = Result<bytes::Bytes, lazysnap_fuse::SourceError>> + Send
    {
        self.inner.read(ino, offset, len)
    }
}

#[test]
fn a_listing_brings_its_entries_attributes_so_a_tree_walk_needs_no_lookups() {
    let src = Arc::new(CountingLookups {
        inner: layer(),
        lookups: std::sync::atomic::AtomicUsize::new(0),
    });
    let m = Mounted::new(Arc::clone(&src), MountOptions::default());
    let before = src.lookups.load(std::sync::atomic::Ordering::SeqCst);
    let mut stated = 0;
    for entry in fs::read_dir(m.path("many")).expect("read_dir") {
        let meta = fs::symlink_metadata(entry.expect("entry").path()).expect("lstat");
        assert!(meta.is_file() || meta.is_dir() || meta.file_type().is_symlink());
        stated += 1;
    }
    assert_eq!(stated, MANY);
    let lookups = src.lookups.load(std::sync::atomic::Ordering::SeqCst) - before;
    // READDIRPLUS: each listed entry arrives with its attributes; only `many` itself is
    // looked up.
    assert!(
        lookups < MANY / 100,
        "{lookups} lookups for a walk of {MANY} entries"
    );
}

#[test]
fn readlink_returns_targets() {
    let (_src, m) = mounted();
    assert_eq!(fs::read_link(m.path("link")).ok(), Some("dir/file".into()));
    assert_eq!(
        fs::read_link(m.path("abs-link")).ok(),
        Some("/etc/passwd".into())
    );
    assert_eq!(
        fs::read(m.path("link")).ok(),
        Some(b"hello, layer\n".to_vec())
    );
    let not_a_link = fs::read_link(m.path("dir/file")).expect_err("regular file");
    assert_eq!(errno_of(&not_a_link), libc::EINVAL);
}

#[test]
fn missing_names_fail_like_a_local_filesystem() {
    let (_src, m) = mounted();
    // Twice: the second answer comes from the kernel's negative dentry.
    for _ in 0..2 {
        let err = fs::metadata(m.path("no-such-file")).expect_err("missing");
        assert_eq!(errno_of(&err), libc::ENOENT);
    }
    let err = fs::metadata(m.path("dir/file/below")).expect_err("below a file");
    assert_eq!(errno_of(&err), libc::ENOTDIR);
}

#[test]
fn xattrs_pass_through_including_trusted() {
    let (_src, m) = mounted();
    let opaque = m.path("opaque");
    assert_eq!(
        llistxattr(&opaque).ok(),
        Some(vec!["trusted.overlay.opaque".to_owned()])
    );
    assert_eq!(
        lgetxattr(&opaque, "trusted.overlay.opaque").ok(),
        Some(b"y".to_vec())
    );

    let tagged = m.path("tagged");
    let mut names = llistxattr(&tagged).expect("listxattr");
    names.sort();
    assert_eq!(
        names,
        ["security.capability", "trusted.note", "user.comment"]
    );
    assert_eq!(
        lgetxattr(&tagged, "user.comment").ok(),
        Some(b"made by a test".to_vec())
    );
    assert_eq!(
        lgetxattr(&tagged, "security.capability").ok(),
        Some(file_caps())
    );
    assert_eq!(
        lgetxattr(&tagged, "trusted.note").ok(),
        Some(b"root only".to_vec())
    );

    // A size query, a buffer too small, a missing name.
    let (_, len) = lgetxattr_sized(&tagged, "user.comment", 0).expect("size query");
    assert_eq!(len, 14);
    let small = lgetxattr_sized(&tagged, "user.comment", 4).expect_err("buffer too small");
    assert_eq!(errno_of(&small), libc::ERANGE);
    let missing = lgetxattr(&tagged, "user.missing").expect_err("missing xattr");
    assert_eq!(errno_of(&missing), libc::ENODATA);
    assert_eq!(llistxattr(&m.path("dir/file")).ok(), Some(Vec::new()));
}

#[test]
fn a_layer_without_xattrs_keeps_none_and_serves_as_before() {
    let mut src = MemorySource::new();
    let dir = src.dir(Ino::ROOT, "dir", Meta::new(0o755));
    src.file(dir, "file", Meta::new(0o644), &b"plain\n"[..]);
    let m = Mounted::new(Arc::new(src), MountOptions::default());
    let file = m.path("dir/file");
    // As on a filesystem without xattr support: the kernel answers for the whole mount once
    // it has heard so, and the second question does not reach the source.
    for _ in 0..2 {
        let err = lgetxattr(&file, "security.capability").expect_err("no xattrs");
        assert_eq!(errno_of(&err), libc::EOPNOTSUPP);
    }
    let err = llistxattr(&file).expect_err("no xattr list");
    assert_eq!(errno_of(&err), libc::EOPNOTSUPP);
    assert_eq!(fs::read(&file).expect("read"), b"plain\n");
}

#[test]
fn writes_fail_with_erofs() {
    let (_src, m) = mounted();
    let attempts: [(&str, std::io::Result<()>); 7] = [
        (
            "open for writing",
            OpenOptions::new()
                .write(true)
                .open(m.path("dir/file"))
                .map(drop),
        ),
        ("create", File::create(m.path("new")).map(drop)),
        ("mkdir", fs::create_dir(m.path("newdir"))),
        ("unlink", fs::remove_file(m.path("big"))),
        ("rename", fs::rename(m.path("big"), m.path("bigger"))),
        (
            "chmod",
            fs::set_permissions(m.path("big"), fs::Permissions::from_mode(0o777)),
        ),
        (
            "setxattr",
            common::lsetxattr(&m.path("big"), "user.x", b"1"),
        ),
    ];
    for (what, result) in attempts {
        let err = result.expect_err(what);
        assert_eq!(errno_of(&err), libc::EROFS, "{what}: {err}");
    }
}

#[test]
fn reads_are_byte_exact_at_any_offset() {
    let (_src, m) = mounted();
    let expected = pattern(BIG_LEN);
    let file = File::open(m.path("big")).expect("open big");
    let cases: [(u64, usize); 10] = [
        (0, 1),
        (1, 4095),
        (4095, 2),
        (4096, 4096),
        (131_071, 131_073),
        (1_000_000, 1 << 20),
        ((BIG_LEN - 10) as u64, 10),
        ((BIG_LEN - 10) as u64, 100), // straddles EOF
        (BIG_LEN as u64, 100),        // at EOF
        (BIG_LEN as u64 + 4096, 100), // past EOF
    ];
    for (offset, len) in cases {
        let mut buf = vec![0u8; len];
        let mut got = 0;
        // A read may return less than asked; keep going until EOF or full.
        while got < len {
            match file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(err) => panic!("read_at({offset}, {len}): {err}"),
            }
        }
        let start = (offset as usize).min(BIG_LEN);
        let end = (start + len).min(BIG_LEN);
        assert_eq!(got, end - start, "length at {offset}+{len}");
        assert!(
            buf[..got] == expected[start..end],
            "bytes at {offset}+{len}"
        );
    }
    let whole = fs::read(m.path("big")).expect("read whole");
    assert!(whole == expected, "whole file");
    assert_eq!(fs::read(m.path("empty")).ok(), Some(Vec::new()));
    let err = fs::read(m.path("dir")).expect_err("read a directory");
    assert_eq!(err.kind(), ErrorKind::IsADirectory);
}

#[test]
fn device_nodes_open_as_devices() {
    let (_src, m) = mounted();
    // The layer's 1:3 is the host's /dev/null: opening it works only without `nodev`.
    let mut null = File::open(m.path("null")).expect("open char device");
    let mut buf = Vec::new();
    assert_eq!(null.read_to_end(&mut buf).ok(), Some(0));
}

#[test]
fn the_mount_is_named_read_only_and_open_to_all() {
    require_mount_named("lazysnap:sha256:0123", "lazysnap");
}

fn require_mount_named(fsname: &str, subtype: &str) {
    let options = MountOptions {
        fsname: fsname.to_owned(),
        subtype: subtype.to_owned(),
        ..MountOptions::default()
    };
    let m = Mounted::new(Arc::new(layer()), options);
    let mounts = mounts_at(&m.mountpoint);
    let [info] = mounts.as_slice() else {
        panic!(
            "expected one mount at {}: {mounts:?}",
            m.mountpoint.display()
        );
    };
    assert_eq!(info.fstype, format!("fuse.{subtype}"));
    assert_eq!(info.source, fsname);
    let flags: Vec<&str> = info.mount_options.split(',').collect();
    assert!(flags.contains(&"ro"), "{flags:?}");
    assert!(
        !flags.contains(&"nodev") && !flags.contains(&"nosuid"),
        "{flags:?}"
    );
    let options: Vec<&str> = info.super_options.split(',').collect();
    assert!(options.contains(&"default_permissions"), "{options:?}");
    assert!(options.contains(&"allow_other"), "{options:?}");
}
