//! The end-to-end harness shared by every e2e test: a real `docker-registry`, a real
//! `containerd` with lazysnap registered as a proxy plugin, and `lazysnap serve`, each on
//! loopback or its own Unix socket inside one temporary directory, torn down (processes killed
//! by their own PIDs, mounts detached, directory removed) even when a test panics.
//!
//! Tests need root (containerd, mounts); CI runs as root. Missing Debian packages are installed
//! when running as root.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod auth;
pub mod corpus;
pub mod data;
pub mod debian;
pub mod estargz;
pub mod image;
pub mod layout;
pub mod metrics;
pub mod packages;
pub mod process;
pub mod python;
pub mod stack;
pub mod throttle;
pub mod tools;

// Not every test binary starts a whole stack.
#[allow(unused_imports)]
pub use stack::Stack;

/// The containerd namespace the tests and the bench run containers in. runc keeps its state
/// per namespace under `/run/containerd/runc/<namespace>`, shared by every containerd on the
/// machine, so two suites run side by side (e.g. from two worktrees) set
/// `LAZYSNAP_TEST_NAMESPACE` to keep their container ids apart.
pub fn namespace() -> String {
    std::env::var("LAZYSNAP_TEST_NAMESPACE").unwrap_or_else(|_| "lazysnap-test".to_string())
}

/// The busybox applets the test images link, for the scripts containers run.
pub const APPLETS: &[&str] = &[
    "sh",
    "find",
    "stat",
    "sha256sum",
    "cat",
    "ls",
    "readlink",
    "sort",
    "echo",
    "mkdir",
    "cut",
    "head",
    "wc",
    "test",
    "[",
    "printf",
    "xargs",
    "tr",
    "rm",
    "dd",
    "true",
    "sleep",
    "md5sum",
];

/// The script a container runs to describe its own file system, one line per path:
/// `path|type|mode|uid|gid|size|sha256|link target|nlink`. Directory sizes and link counts
/// depend on the file system below overlayfs, not on the image, so they are left out.
pub const DESCRIBE_FS: &str = r#"find / -xdev \( -path /proc -o -path /sys -o -path /dev \) -prune -o -print | sort | while read -r p; do
  t=$(stat -c %F "$p")
  l="$p|$t|$(stat -c '%a|%u|%g' "$p")"
  case "$t" in
    "regular file"|"regular empty file") l="$l|$(stat -c '%s|%h' "$p")|$(sha256sum < "$p" | cut -d' ' -f1)";;
    "symbolic link") l="$l|$(readlink "$p")";;
    "character special file"|"block special file") l="$l|$(stat -c '%t,%T' "$p")";;
  esac
  echo "$l"
done"#;

/// Fails the test with a clear message unless running as root.
pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "end-to-end tests need root (they run containerd and mount file systems); run them with sudo or as root, as CI does"
    );
}

/// A readable line diff of two describe-fs outputs; empty when they are equal.
pub fn diff_lines(left: &str, right: &str) -> String {
    let l: std::collections::BTreeSet<&str> = left.lines().collect();
    let r: std::collections::BTreeSet<&str> = right.lines().collect();
    let mut out = String::new();
    for line in l.difference(&r) {
        out.push_str(&format!("- {line}\n"));
    }
    for line in r.difference(&l) {
        out.push_str(&format!("+ {line}\n"));
    }
    out
}

/// The value of xattr `name` on `rel` in whichever snapshot under `snapshots` holds it.
pub fn layer_xattr(snapshots: &std::path::Path, rel: &str, name: &str) -> Option<Vec<u8>> {
    for entry in std::fs::read_dir(snapshots).ok()?.flatten() {
        let path = entry.path().join("fs").join(rel);
        if path.exists() {
            let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
            let c_name = std::ffi::CString::new(name).ok()?;
            let mut buf = vec![0u8; 256];
            // SAFETY: both strings are NUL-terminated and `buf` is valid for its length.
            let n = unsafe {
                libc::lgetxattr(
                    c_path.as_ptr(),
                    c_name.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if n < 0 {
                return None;
            }
            buf.truncate(n as usize);
            return Some(buf);
        }
    }
    None
}
