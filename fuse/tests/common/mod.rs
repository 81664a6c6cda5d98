//! Shared scaffolding for the kernel tests: root check, mounting a source in a temp dir,
//! reading the mount table, xattr calls std lacks, and offset-dependent file contents.

#![allow(dead_code)] // each test binary uses its own part

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lazysnap_fuse::{mount, LayerSource, MountHandle, MountOptions};
use tempfile::TempDir;

/// Fails the test at once, with the reason, when not run as root.
/// Polls `done` until it holds, panicking with `what` once `limit` has passed.
pub fn wait_until(limit: std::time::Duration, what: &str, done: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the lazysnap-fuse kernel tests mount FUSE and overlayfs and must run as root"
    );
}

/// A source mounted in a fresh temp dir, with the runtime serving its reads.
pub struct Mounted {
    /// `None` once the test has unmounted it.
    pub handle: Option<MountHandle>,
    pub mountpoint: PathBuf,
    /// Scratch space beside the mountpoint (overlay upper/work dirs, other lowers).
    pub dir: TempDir,
    pub runtime: tokio::runtime::Runtime,
}

impl Mounted {
    pub fn new<S: LayerSource>(source: Arc<S>, options: MountOptions) -> Self {
        require_root();
        let dir = tempfile::tempdir().expect("temp dir");
        let mountpoint = dir.path().join("layer");
        std::fs::create_dir(&mountpoint).expect("mountpoint");
        // The mount table shows canonical paths (/tmp may be a symlink).
        let mountpoint = mountpoint.canonicalize().expect("canonical mountpoint");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let handle = mount(source, &mountpoint, options, runtime.handle().clone())
            .unwrap_or_else(|err| panic!("mount: {err:?}"));
        Self {
            handle: Some(handle),
            mountpoint,
            dir,
            runtime,
        }
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.mountpoint.join(relative)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // Unmount before the temp dir goes, or its removal would walk into the mount.
        if let Some(handle) = self.handle.take() {
            if let Err(err) = handle.unmount() {
                eprintln!("unmount in test teardown: {err:?}");
            }
        }
    }
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone)]
pub struct MountInfo {
    pub mountpoint: PathBuf,
    pub mount_options: String,
    pub fstype: String,
    pub source: String,
    pub super_options: String,
}

/// The mounts at `path`, bottom first.
pub fn mounts_at(path: &Path) -> Vec<MountInfo> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    table
        .lines()
        .filter_map(parse_mountinfo)
        .filter(|info| info.mountpoint == path)
        .collect()
}

fn parse_mountinfo(line: &str) -> Option<MountInfo> {
    let (left, right) = line.split_once(" - ")?;
    let left: Vec<&str> = left.split(' ').collect();
    let right: Vec<&str> = right.split(' ').collect();
    Some(MountInfo {
        mountpoint: PathBuf::from(unescape(left.get(4)?)),
        mount_options: (*left.get(5)?).to_owned(),
        fstype: (*right.first()?).to_owned(),
        source: unescape(right.get(1)?),
        super_options: (*right.get(2)?).to_owned(),
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(value) = u8::from_str_radix(digits, 8) {
                out.push(value);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("path without NUL")
}

fn c_name(name: &str) -> CString {
    CString::new(name).expect("name without NUL")
}

/// `lgetxattr` into a buffer of `size` bytes; returns the value (or, with `size` 0, an empty
/// vector and the length the kernel reported).
pub fn lgetxattr_sized(path: &Path, name: &str, size: usize) -> io::Result<(Vec<u8>, usize)> {
    let (path, name) = (c_path(path), c_name(name));
    let mut buf = vec![0u8; size];
    // SAFETY: both strings are NUL-terminated and `buf` has room for `size` bytes.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    buf.truncate(n.min(size));
    Ok((buf, n))
}

/// The value of xattr `name` of `path` (not following a symlink).
pub fn lgetxattr(path: &Path, name: &str) -> io::Result<Vec<u8>> {
    let (_, len) = lgetxattr_sized(path, name, 0)?;
    lgetxattr_sized(path, name, len).map(|(value, _)| value)
}

/// The xattr names of `path` (not following a symlink), in the order listed.
pub fn llistxattr(path: &Path) -> io::Result<Vec<String>> {
    let path = c_path(path);
    // SAFETY: a NULL buffer of size 0 asks only for the length.
    let len = unsafe { libc::llistxattr(path.as_ptr(), std::ptr::null_mut(), 0) };
    if len < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; len as usize];
    // SAFETY: `buf` has room for `buf.len()` bytes.
    let n = unsafe { libc::llistxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf
        .split(|&b| b == 0)
        .filter(|name| !name.is_empty())
        .map(|name| String::from_utf8_lossy(name).into_owned())
        .collect())
}

/// `lsetxattr`, for the overlay copy-up tests.
pub fn lsetxattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let (path, name) = (c_path(path), c_name(name));
    // SAFETY: both strings are NUL-terminated; `value` is valid for its length.
    let rc = unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// File contents where every byte depends on its absolute offset, with no short period, so a
/// read from the wrong offset cannot match by accident.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(0x9E37_79B9).rotate_right(13) ^ (i >> 8)) as u8)
        .collect()
}

/// Implements the named [`LayerSource`] metadata methods by handing them to `self.inner` (a
/// [`lazysnap_fuse::MemorySource`]): test sources differ from it in how they read, and write
/// only that. `delegate_to_inner!(lookup, getattr, readdir, readlink, listxattr, getxattr);`
#[macro_export]
macro_rules! delegate_to_inner {
    ($($method:ident),* $(,)?) => { $( $crate::delegate_to_inner!(@one $method); )* };
    (@one lookup) => {
        fn lookup(
            &self,
            parent: ::lazysnap_fuse::Ino,
            name: &::std::ffi::OsStr,
        ) -> Result<::lazysnap_fuse::Attr, ::lazysnap_fuse::SourceError> {
            self.inner.lookup(parent, name)
        }
    };
    (@one getattr) => {
        fn getattr(
            &self,
            ino: ::lazysnap_fuse::Ino,
        ) -> Result<::lazysnap_fuse::Attr, ::lazysnap_fuse::SourceError> {
            self.inner.getattr(ino)
        }
    };
    (@one readdir) => {
        fn readdir(
            &self,
            dir: ::lazysnap_fuse::Ino,
            offset: u64,
            add: &mut dyn FnMut(::lazysnap_fuse::DirEntry<'_>) -> ::std::ops::ControlFlow<()>,
        ) -> Result<(), ::lazysnap_fuse::SourceError> {
            self.inner.readdir(dir, offset, add)
        }
    };
    (@one readlink) => {
        fn readlink(
            &self,
            ino: ::lazysnap_fuse::Ino,
        ) -> Result<::std::ffi::OsString, ::lazysnap_fuse::SourceError> {
            self.inner.readlink(ino)
        }
    };
    (@one listxattr) => {
        fn listxattr(
            &self,
            ino: ::lazysnap_fuse::Ino,
        ) -> Result<Vec<::std::ffi::OsString>, ::lazysnap_fuse::SourceError> {
            self.inner.listxattr(ino)
        }
    };
    (@one getxattr) => {
        fn getxattr(
            &self,
            ino: ::lazysnap_fuse::Ino,
            name: &::std::ffi::OsStr,
        ) -> Result<::bytes::Bytes, ::lazysnap_fuse::SourceError> {
            self.inner.getxattr(ino, name)
        }
        fn has_xattrs(&self) -> bool {
            self.inner.has_xattrs()
        }
    };
}
