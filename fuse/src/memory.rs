//! An in-memory [`LayerSource`] for tests, here and in crates that mount layers: build a tree
//! with every kind of entry a layer may hold, then mount it.
//!
//! Building panics on misuse (a name twice, a parent that is not a directory): it is test
//! scaffolding, and a panic points at the line that built the tree wrongly.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::ops::ControlFlow;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::{Attr, Device, DirEntry, FileKind, Ino, LayerSource, SourceError};

/// The xattr overlayfs reads to tell an opaque directory.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// What a tar header says about an entry besides its type: permissions, owner, time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits, including setuid, setgid and sticky.
    pub perm: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time.
    pub mtime: SystemTime,
}

impl Meta {
    /// `perm`, owned by root, with a fixed mtime (2020-09-13) so tests are reproducible.
    pub fn new(perm: u16) -> Self {
        Self {
            perm,
            uid: 0,
            gid: 0,
            mtime: SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000),
        }
    }

    /// The same with another owner.
    pub fn owner(self, uid: u32, gid: u32) -> Self {
        Self { uid, gid, ..self }
    }

    /// The same with another modification time.
    pub fn mtime(self, mtime: SystemTime) -> Self {
        Self { mtime, ..self }
    }
}

/// An immutable tree held in memory; inode `n` is `nodes[n - 1]`.
#[derive(Clone, Debug)]
pub struct MemorySource {
    nodes: Vec<Node>,
}

#[derive(Clone, Debug)]
struct Node {
    attr: Attr,
    content: Content,
    xattrs: BTreeMap<OsString, Bytes>,
}

#[derive(Clone, Debug)]
enum Content {
    Dir {
        /// In insertion order, which is the listing order.
        entries: Vec<(OsString, Ino)>,
        by_name: HashMap<OsString, Ino>,
    },
    File(Bytes),
    Symlink(OsString),
    Special,
}

impl Default for MemorySource {
    fn default() -> Self {
        Self::new()
    }
}

impl MemorySource {
    /// A tree holding only its root: a directory with mode 0755 owned by root.
    pub fn new() -> Self {
        let mut source = Self { nodes: Vec::new() };
        source.push(
            FileKind::Directory,
            Meta::new(0o755),
            Device::NONE,
            empty_dir(),
        );
        source
    }

    /// Adds directory `name` to `parent`.
    ///
    /// # Panics
    /// If `parent` is not a directory, `name` is taken or not a plain name.
    pub fn dir(&mut self, parent: Ino, name: &str, meta: Meta) -> Ino {
        let ino = self.push(FileKind::Directory, meta, Device::NONE, empty_dir());
        self.link(parent, name, ino);
        // A subdirectory's `..` is one more link to its parent.
        self.node_mut(parent).attr.nlink += 1;
        ino
    }

    /// Adds regular file `name` holding `data` to `parent`.
    ///
    /// # Panics
    /// As [`MemorySource::dir`].
    pub fn file(&mut self, parent: Ino, name: &str, meta: Meta, data: impl Into<Bytes>) -> Ino {
        let ino = self.push(
            FileKind::RegularFile,
            meta,
            Device::NONE,
            Content::File(data.into()),
        );
        self.link(parent, name, ino);
        ino
    }

    /// Adds symlink `name` pointing at `target` to `parent`.
    ///
    /// # Panics
    /// As [`MemorySource::dir`].
    pub fn symlink(&mut self, parent: Ino, name: &str, meta: Meta, target: &str) -> Ino {
        let content = Content::Symlink(target.into());
        let ino = self.push(FileKind::Symlink, meta, Device::NONE, content);
        self.link(parent, name, ino);
        ino
    }

    /// Adds `name` to `parent` as another name of `target`, a hard link.
    ///
    /// # Panics
    /// As [`MemorySource::dir`], and if `target` is a directory.
    pub fn hardlink(&mut self, parent: Ino, name: &str, target: Ino) {
        assert_ne!(
            self.node_mut(target).attr.kind,
            FileKind::Directory,
            "directories cannot be hard-linked"
        );
        self.link(parent, name, target);
        self.node_mut(target).attr.nlink += 1;
    }

    /// Adds a device node, FIFO or socket `name` to `parent`; `rdev` matters for devices only.
    ///
    /// # Panics
    /// As [`MemorySource::dir`], and if `kind` is a directory, file or symlink.
    pub fn special(
        &mut self,
        parent: Ino,
        name: &str,
        kind: FileKind,
        rdev: Device,
        meta: Meta,
    ) -> Ino {
        assert!(
            matches!(
                kind,
                FileKind::CharDevice | FileKind::BlockDevice | FileKind::Fifo | FileKind::Socket
            ),
            "{kind:?} is not a special file"
        );
        let ino = self.push(kind, meta, rdev, Content::Special);
        self.link(parent, name, ino);
        ino
    }

    /// Adds an overlayfs whiteout for `name` to `parent`: a 0/0 character device, as the
    /// overlayfs snapshotter unpacks a `.wh.<name>` tar entry.
    ///
    /// # Panics
    /// As [`MemorySource::dir`].
    pub fn whiteout(&mut self, parent: Ino, name: &str) -> Ino {
        self.special(
            parent,
            name,
            FileKind::CharDevice,
            Device::NONE,
            Meta::new(0),
        )
    }

    /// Sets extended attribute `name` of `ino` to `value`.
    ///
    /// # Panics
    /// If `ino` does not exist.
    pub fn set_xattr(&mut self, ino: Ino, name: &str, value: impl Into<Bytes>) {
        self.node_mut(ino).xattrs.insert(name.into(), value.into());
    }

    /// Marks directory `dir` opaque (`trusted.overlay.opaque=y`), as a `.wh..wh..opq` tar entry
    /// is unpacked: overlayfs then hides what lower layers hold under the same path.
    ///
    /// # Panics
    /// If `dir` does not exist.
    pub fn opaque(&mut self, dir: Ino) {
        self.set_xattr(dir, OPAQUE_XATTR, &b"y"[..]);
    }

    fn push(&mut self, kind: FileKind, meta: Meta, rdev: Device, content: Content) -> Ino {
        let ino = Ino(self.nodes.len() as u64 + 1);
        let (size, nlink) = match &content {
            // What ext4 shows for a small directory: one block.
            Content::Dir { .. } => (4096, 2),
            Content::File(data) => (data.len() as u64, 1),
            Content::Symlink(target) => (target.len() as u64, 1),
            Content::Special => (0, 1),
        };
        let blocks = match kind {
            FileKind::Directory | FileKind::RegularFile => Attr::blocks_for(size),
            _ => 0,
        };
        self.nodes.push(Node {
            attr: Attr {
                ino,
                kind,
                perm: meta.perm,
                nlink,
                uid: meta.uid,
                gid: meta.gid,
                rdev,
                size,
                blocks,
                mtime: meta.mtime,
            },
            content,
            xattrs: BTreeMap::new(),
        });
        ino
    }

    fn link(&mut self, parent: Ino, name: &str, ino: Ino) {
        assert!(
            !name.is_empty() && name != "." && name != ".." && !name.contains('/'),
            "{name:?} is not a plain file name"
        );
        let Content::Dir { entries, by_name } = &mut self.node_mut(parent).content else {
            panic!("parent {parent:?} of {name:?} is not a directory");
        };
        let previous = by_name.insert(name.into(), ino);
        assert!(previous.is_none(), "{name:?} already exists in {parent:?}");
        entries.push((name.into(), ino));
    }

    fn node_mut(&mut self, ino: Ino) -> &mut Node {
        let index = usize::try_from(ino.0.wrapping_sub(1)).unwrap_or(usize::MAX);
        self.nodes
            .get_mut(index)
            .unwrap_or_else(|| panic!("no inode {ino:?}"))
    }

    fn node(&self, ino: Ino) -> Result<&Node, SourceError> {
        let index = usize::try_from(ino.0.wrapping_sub(1)).map_err(|_| SourceError::NotFound)?;
        self.nodes.get(index).ok_or(SourceError::NotFound)
    }
}

fn empty_dir() -> Content {
    Content::Dir {
        entries: Vec::new(),
        by_name: HashMap::new(),
    }
}

impl LayerSource for MemorySource {
    fn lookup(&self, parent: Ino, name: &OsStr) -> Result<Attr, SourceError> {
        let Content::Dir { by_name, .. } = &self.node(parent)?.content else {
            return Err(SourceError::NotDirectory);
        };
        let ino = by_name.get(name).ok_or(SourceError::NotFound)?;
        self.getattr(*ino)
    }

    fn getattr(&self, ino: Ino) -> Result<Attr, SourceError> {
        Ok(self.node(ino)?.attr)
    }

    fn readdir(
        &self,
        dir: Ino,
        offset: u64,
        add: &mut dyn FnMut(DirEntry<'_>) -> ControlFlow<()>,
    ) -> Result<(), SourceError> {
        let Content::Dir { entries, .. } = &self.node(dir)?.content else {
            return Err(SourceError::NotDirectory);
        };
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (name, ino) in entries.iter().skip(skip) {
            let kind = self.node(*ino)?.attr.kind;
            let entry = DirEntry {
                ino: *ino,
                kind,
                name,
            };
            if add(entry).is_break() {
                break;
            }
        }
        Ok(())
    }

    fn readlink(&self, ino: Ino) -> Result<OsString, SourceError> {
        match &self.node(ino)?.content {
            Content::Symlink(target) => Ok(target.clone()),
            _ => Err(SourceError::NotSymlink),
        }
    }

    fn listxattr(&self, ino: Ino) -> Result<Vec<OsString>, SourceError> {
        Ok(self.node(ino)?.xattrs.keys().cloned().collect())
    }

    fn getxattr(&self, ino: Ino, name: &OsStr) -> Result<Bytes, SourceError> {
        let node = self.node(ino)?;
        node.xattrs
            .get(name)
            .cloned()
            .ok_or(SourceError::NoAttribute)
    }

    fn has_xattrs(&self) -> bool {
        self.nodes.iter().any(|node| !node.xattrs.is_empty())
    }

    async fn read(&self, ino: Ino, offset: u64, len: u32) -> Result<Bytes, SourceError> {
        let data = match &self.node(ino)?.content {
            Content::File(data) => data,
            Content::Dir { .. } => return Err(SourceError::IsDirectory),
            _ => return Err(SourceError::io(format!("{ino:?} is not a regular file"))),
        };
        let start = usize::try_from(offset).map_or(data.len(), |start| start.min(data.len()));
        let end = start.saturating_add(len as usize).min(data.len());
        Ok(data.slice(start..end))
    }
}

impl MemorySource {
    /// The inode at `path` (relative to the root, `/`-separated), for tests that built the
    /// tree elsewhere.
    ///
    /// # Errors
    /// [`SourceError::NotFound`] or [`SourceError::NotDirectory`] as a path walk would.
    pub fn resolve(&self, path: &str) -> Result<Ino, SourceError> {
        path.split('/')
            .filter(|part| !part.is_empty())
            .try_fold(Ino::ROOT, |dir, part| {
                Ok(self.lookup(dir, OsStr::from_bytes(part.as_bytes()))?.ino)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (MemorySource, Ino, Ino) {
        let mut src = MemorySource::new();
        let etc = src.dir(Ino::ROOT, "etc", Meta::new(0o755));
        let passwd = src.file(etc, "passwd", Meta::new(0o644), &b"root:x:0:0"[..]);
        src.hardlink(Ino::ROOT, "passwd-link", passwd);
        src.symlink(Ino::ROOT, "link", Meta::new(0o777), "etc/passwd");
        src.whiteout(Ino::ROOT, "gone");
        src.opaque(etc);
        (src, etc, passwd)
    }

    fn names(src: &MemorySource, dir: Ino, offset: u64) -> Vec<OsString> {
        let mut names = Vec::new();
        src.readdir(dir, offset, &mut |entry| {
            names.push(entry.name.to_owned());
            ControlFlow::Continue(())
        })
        .expect("readdir");
        names
    }

    #[test]
    fn links_are_counted() {
        let (src, etc, passwd) = sample();
        assert_eq!(src.getattr(Ino::ROOT).map(|a| a.nlink).ok(), Some(3));
        assert_eq!(src.getattr(etc).map(|a| a.nlink).ok(), Some(2));
        assert_eq!(src.getattr(passwd).map(|a| a.nlink).ok(), Some(2));
        assert_eq!(src.resolve("passwd-link").ok(), Some(passwd));
    }

    #[test]
    fn readdir_resumes_at_offset() {
        let (src, _, _) = sample();
        assert_eq!(
            names(&src, Ino::ROOT, 0),
            ["etc", "passwd-link", "link", "gone"]
        );
        assert_eq!(names(&src, Ino::ROOT, 2), ["link", "gone"]);
        assert!(names(&src, Ino::ROOT, 9).is_empty());
    }

    #[test]
    fn errors_match_what_the_kernel_expects() {
        let (src, etc, passwd) = sample();
        let missing = src.lookup(Ino::ROOT, OsStr::new("nope"));
        assert!(matches!(missing, Err(SourceError::NotFound)));
        let through_file = src.lookup(passwd, OsStr::new("x"));
        assert!(matches!(through_file, Err(SourceError::NotDirectory)));
        assert!(matches!(src.readlink(etc), Err(SourceError::NotSymlink)));
        let no_xattr = src.getxattr(passwd, OsStr::new("user.x"));
        assert!(matches!(no_xattr, Err(SourceError::NoAttribute)));
        assert!(matches!(src.getattr(Ino(999)), Err(SourceError::NotFound)));
        assert!(matches!(src.getattr(Ino(0)), Err(SourceError::NotFound)));
    }

    #[test]
    fn whiteouts_are_0_0_char_devices() {
        let (src, _, _) = sample();
        let gone = src
            .lookup(Ino::ROOT, OsStr::new("gone"))
            .expect("whiteout exists");
        assert_eq!((gone.kind, gone.rdev), (FileKind::CharDevice, Device::NONE));
    }

    #[test]
    #[should_panic(expected = "already exists")]
    fn names_are_unique() {
        let mut src = MemorySource::new();
        src.file(Ino::ROOT, "a", Meta::new(0o644), Bytes::new());
        src.file(Ino::ROOT, "a", Meta::new(0o644), Bytes::new());
    }
}
