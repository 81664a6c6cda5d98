//! Directories a layer implies but does not list (its tar names `a/b/f` without `a/` or
//! `a/b/`, as umoci and several builders write them) take their attributes from the layers
//! below, as they would in a normal pull: there the layer is unpacked on top of its parents,
//! so `a` keeps the mode, owner and mtime it has in the nearest layer below that has it; only
//! a directory no layer below has is made `0755 root:root`.
//!
//! The lower layers are the snapshot's parent chain as overlayfs stacks it (nearest first),
//! read as overlayfs would: a whiteout or a non-directory on the way hides the layers beneath,
//! and so does an opaque directory. The xattrs of the lower directory are not copied (the
//! opaque mark of a lower directory must not become this layer's); the node keeps its own.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::metadata::{LayerIndex, NodeKind, ROOT};

const OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque\0";

/// Gives each implied directory of `index` the attributes of the same path in `lower`
/// (nearest first); returns how many took them. Blocking (it stats the lower layers).
pub fn adopt_lower_attrs(index: &mut LayerIndex, lower: &[PathBuf]) -> usize {
    if lower.is_empty() || !index.inodes().any(|ino| is_implied(index, ino)) {
        return 0;
    }
    let mut implied = Vec::new();
    let mut stack = vec![(ROOT, PathBuf::new())];
    while let Some((ino, path)) = stack.pop() {
        let Some(node) = index.node(ino) else {
            continue;
        };
        if node.kind != NodeKind::Dir {
            continue;
        }
        if node.implied && ino != ROOT {
            implied.push((ino, path.clone()));
        }
        for (name, child) in &node.children {
            stack.push((*child, path.join(std::ffi::OsStr::from_bytes(name))));
        }
    }
    let mut adopted = 0;
    for (ino, rel) in implied {
        let Some(meta) = find_dir(lower, &rel) else {
            continue;
        };
        if let Some(node) = index.node_mut(ino) {
            node.perm = meta.mode() & 0o7777;
            node.uid = meta.uid();
            node.gid = meta.gid();
            node.mtime = mtime(&meta);
            adopted += 1;
        }
    }
    adopted
}

fn is_implied(index: &LayerIndex, ino: u64) -> bool {
    ino != ROOT && index.node(ino).is_some_and(|n| n.implied)
}

fn mtime(meta: &std::fs::Metadata) -> SystemTime {
    let secs = meta.mtime();
    let nanos = meta.mtime_nsec().clamp(0, 999_999_999) as u32;
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::new(secs as u64, nanos)
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
            + Duration::from_nanos(u64::from(nanos))
    }
}

/// The directory `rel` as the overlay of `lower` (nearest first) shows it, if it is one.
fn find_dir(lower: &[PathBuf], rel: &Path) -> Option<std::fs::Metadata> {
    let parts: Vec<_> = rel.components().collect();
    for layer in lower {
        let mut path = layer.clone();
        let mut hides_below = false;
        for (i, part) in parts.iter().enumerate() {
            path.push(part);
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                // Not in this layer: look further down, unless an opaque directory above
                // hides the layers beneath.
                break;
            };
            if meta.file_type().is_char_device() && meta.rdev() == 0 {
                return None; // a whiteout
            }
            if !meta.is_dir() {
                return None; // a file replaces what is below
            }
            if i + 1 == parts.len() {
                return Some(meta);
            }
            if is_opaque(&path) {
                hides_below = true;
            }
        }
        if hides_below {
            return None;
        }
    }
    None
}

fn is_opaque(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut value = [0u8; 2];
    // SAFETY: both names are NUL-terminated and `value` is valid for its length.
    let n = unsafe {
        libc::lgetxattr(
            c_path.as_ptr(),
            OPAQUE_XATTR.as_ptr().cast(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    n == 1 && value[0] == b'y'
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::{Entry, EntryKind, IndexBuilder};
    use std::os::unix::fs::PermissionsExt;

    fn file(name: &str) -> Entry {
        Entry {
            name: name.to_owned(),
            kind: EntryKind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: SystemTime::UNIX_EPOCH,
            xattrs: Vec::new(),
            chunks: Vec::new(),
        }
    }

    fn ino_of(index: &LayerIndex, path: &str) -> u64 {
        path.split('/').fold(ROOT, |dir, name| {
            index
                .lookup(dir, std::ffi::OsStr::new(name))
                .expect("path in index")
        })
    }

    #[test]
    fn implied_directories_take_the_nearest_lower_attributes() {
        let lower = tempfile::tempdir().expect("tempdir");
        let nearer = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(lower.path().join("app/conf")).expect("mkdir");
        std::fs::set_permissions(
            lower.path().join("app"),
            std::fs::Permissions::from_mode(0o750),
        )
        .expect("chmod");
        std::os::unix::fs::chown(lower.path().join("app"), Some(1000), Some(1001)).expect("chown");
        // the nearer layer has `app/conf` but not `app`
        std::fs::create_dir_all(nearer.path().join("app/conf")).expect("mkdir");
        std::fs::remove_dir(nearer.path().join("app/conf")).expect("rmdir");
        std::fs::remove_dir(nearer.path().join("app")).expect("rmdir");
        std::fs::create_dir(nearer.path().join("other")).expect("mkdir");
        std::fs::set_permissions(
            nearer.path().join("other"),
            std::fs::Permissions::from_mode(0o711),
        )
        .expect("chmod");

        let mut builder = IndexBuilder::new();
        builder.add(file("app/conf/x.toml")).expect("add");
        builder.add(file("other/y")).expect("add");
        builder.add(file("new/z")).expect("add");
        let mut index = builder.finish();
        for path in ["app", "app/conf", "other", "new"] {
            assert!(index.node(ino_of(&index, path)).expect("node").implied);
        }
        let adopted = adopt_lower_attrs(
            &mut index,
            &[nearer.path().to_path_buf(), lower.path().to_path_buf()],
        );
        assert_eq!(adopted, 3);
        let app = index.node(ino_of(&index, "app")).expect("app");
        assert_eq!((app.perm, app.uid, app.gid), (0o750, 1000, 1001));
        let other = index.node(ino_of(&index, "other")).expect("other");
        assert_eq!(other.perm, 0o711);
        let new = index.node(ino_of(&index, "new")).expect("new");
        assert_eq!((new.perm, new.uid, new.gid), (0o755, 0, 0));
    }

    #[test]
    fn listed_directories_and_hidden_lowers_are_left_alone() {
        let lower = tempfile::tempdir().expect("tempdir");
        let nearer = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(lower.path().join("gone")).expect("mkdir");
        std::fs::set_permissions(
            lower.path().join("gone"),
            std::fs::Permissions::from_mode(0o700),
        )
        .expect("chmod");
        std::fs::create_dir(lower.path().join("listed")).expect("mkdir");
        std::fs::set_permissions(
            lower.path().join("listed"),
            std::fs::Permissions::from_mode(0o700),
        )
        .expect("chmod");
        // a whiteout of `gone` in the nearer layer
        nix::sys::stat::mknod(
            &nearer.path().join("gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            0,
        )
        .expect("mknod whiteout");

        let mut builder = IndexBuilder::new();
        builder
            .add(Entry {
                kind: EntryKind::Dir,
                mode: 0o755,
                ..file("listed")
            })
            .expect("add");
        builder.add(file("listed/a")).expect("add");
        builder.add(file("gone/b")).expect("add");
        let mut index = builder.finish();
        assert!(!index.node(ino_of(&index, "listed")).expect("node").implied);
        let adopted = adopt_lower_attrs(
            &mut index,
            &[nearer.path().to_path_buf(), lower.path().to_path_buf()],
        );
        assert_eq!(adopted, 0);
        assert_eq!(index.node(ino_of(&index, "listed")).expect("n").perm, 0o755);
        assert_eq!(index.node(ino_of(&index, "gone")).expect("n").perm, 0o755);
    }
}
