//! overlayfs stacked on a FUSE layer, the way containerd stacks a container's rootfs: the FUSE
//! mount's whiteouts and opaque directories must act on the layers below it, and its files
//! must copy up into the writable layer.

mod common;

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{lgetxattr, Mounted};
use lazysnap_fuse::{Ino, MemorySource, Meta, MountOptions};
use nix::mount::{umount2, MntFlags, MsFlags};

/// The FUSE layer: the top lower layer of the overlay.
fn top_layer() -> MemorySource {
    let mut src = MemorySource::new();
    src.whiteout(Ino::ROOT, "gone");
    let opq = src.dir(Ino::ROOT, "opq", Meta::new(0o755));
    src.opaque(opq);
    src.file(opq, "mine", Meta::new(0o644), &b"top"[..]);
    let shared = src.dir(Ino::ROOT, "shared", Meta::new(0o755));
    src.file(shared, "from-top", Meta::new(0o644), &b"top"[..]);
    let copyme = src.file(
        Ino::ROOT,
        "copyme",
        Meta::new(0o640).owner(1000, 1001),
        &b"from the layer"[..],
    );
    src.set_xattr(copyme, "user.origin", &b"lazy"[..]);
    src
}

/// A plain directory as the lower layer below the FUSE one.
fn bottom_layer(root: &Path) {
    fs::create_dir_all(root.join("opq")).expect("mkdir opq");
    fs::create_dir_all(root.join("shared")).expect("mkdir shared");
    for (path, data) in [
        ("gone", "hidden by a whiteout"),
        ("kept", "still here"),
        ("opq/theirs", "hidden by opacity"),
        ("shared/from-bottom", "bottom"),
    ] {
        fs::write(root.join(path), data).expect("write bottom layer");
    }
}

/// An overlay mount, unmounted on drop (before the FUSE mount below it goes).
struct Overlay {
    merged: PathBuf,
}

impl Overlay {
    fn mount(scratch: &Path, lowers: &[&Path], writable: bool) -> Self {
        let merged = scratch.join("merged");
        fs::create_dir_all(&merged).expect("mkdir merged");
        let lowerdir: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
        let mut options = format!("lowerdir={}", lowerdir.join(":"));
        if writable {
            let (upper, work) = (scratch.join("upper"), scratch.join("work"));
            fs::create_dir_all(&upper).expect("mkdir upper");
            fs::create_dir_all(&work).expect("mkdir work");
            options += &format!(",upperdir={},workdir={}", upper.display(), work.display());
        }
        nix::mount::mount(
            Some("overlay"),
            &merged,
            Some("overlay"),
            MsFlags::empty(),
            Some(options.as_str()),
        )
        .unwrap_or_else(|err| panic!("mount overlay with {options}: {err}"));
        Self { merged }
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.merged.join(relative)
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if let Err(err) = umount2(&self.merged, MntFlags::empty()) {
            eprintln!("unmount overlay: {err}");
        }
    }
}

fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap_or_else(|err| panic!("read_dir {}: {err}", dir.display()))
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .into_string()
                .expect("utf-8")
        })
        .collect()
}

fn stack() -> (Mounted, PathBuf) {
    let layer = Mounted::new(Arc::new(top_layer()), MountOptions::default());
    let bottom = layer.dir.path().join("bottom");
    bottom_layer(&bottom);
    (layer, bottom)
}

#[test]
fn whiteouts_and_opaque_dirs_hide_lower_layers() {
    let (layer, bottom) = stack();
    let overlay = Overlay::mount(layer.dir.path(), &[&layer.mountpoint, &bottom], true);

    assert_eq!(
        names(&overlay.merged),
        ["copyme", "kept", "opq", "shared"].map(String::from).into()
    );
    let gone = fs::metadata(overlay.path("gone")).expect_err("whiteout hides the file");
    assert_eq!(gone.raw_os_error(), Some(libc::ENOENT));
    assert_eq!(names(&overlay.path("opq")), ["mine".to_owned()].into());
    assert_eq!(
        names(&overlay.path("shared")),
        ["from-bottom", "from-top"].map(String::from).into()
    );
    assert_eq!(
        fs::read_to_string(overlay.path("kept")).ok().as_deref(),
        Some("still here")
    );
    assert_eq!(
        fs::read_to_string(overlay.path("opq/mine")).ok().as_deref(),
        Some("top")
    );
}

#[test]
fn files_copy_up_with_their_metadata() {
    let (layer, bottom) = stack();
    let overlay = Overlay::mount(layer.dir.path(), &[&layer.mountpoint, &bottom], true);

    let mut file = OpenOptions::new()
        .append(true)
        .open(overlay.path("copyme"))
        .expect("open a layer file for writing through the overlay");
    file.write_all(b", then changed").expect("append");
    drop(file);

    let expected = "from the layer, then changed";
    assert_eq!(
        fs::read_to_string(overlay.path("copyme")).ok().as_deref(),
        Some(expected)
    );
    let upper = layer.dir.path().join("upper/copyme");
    assert_eq!(fs::read_to_string(&upper).ok().as_deref(), Some(expected));
    let meta = fs::metadata(&upper).expect("stat copied-up file");
    assert_eq!(
        (meta.mode() & 0o7777, meta.uid(), meta.gid()),
        (0o640, 1000, 1001)
    );
    assert_eq!(
        lgetxattr(&upper, "user.origin").ok(),
        Some(b"lazy".to_vec())
    );
    // The layer itself is untouched.
    assert_eq!(
        fs::read_to_string(layer.path("copyme")).ok().as_deref(),
        Some("from the layer")
    );
}

#[test]
fn a_read_only_overlay_of_layers_works() {
    let (layer, bottom) = stack();
    // What a container's view of committed layers looks like: lowers only.
    let overlay = Overlay::mount(layer.dir.path(), &[&layer.mountpoint, &bottom], false);
    assert_eq!(names(&overlay.path("opq")), ["mine".to_owned()].into());
    assert!(fs::metadata(overlay.path("gone")).is_err());
    let err = fs::write(overlay.path("copyme"), "x").expect_err("read-only overlay");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
}
