//! The layer index: a layer's tar entries turned into what a file system needs — an inode
//! table with attributes, sorted directory children, hard links sharing one inode, and for
//! each regular file the chunks that hold its bytes. Pure: no I/O, and no knowledge of any
//! format: a format (`crate::format`) reads its own table of contents and feeds the entries,
//! in tar order, to an [`IndexBuilder`].
//!
//! The tree is built to look to overlayfs exactly as containerd's tar applier would have left
//! the layer on disk: `.wh.NAME` entries become 0/0 character devices named NAME, and
//! `.wh..wh..opq` sets `trusted.overlay.opaque=y` on its directory. Names that would escape
//! the layer, chunks that do not tile their file, and duplicate names that disagree are
//! refused, naming the entry.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::SystemTime;

use crate::chunk::{ChunkId, ChunkSpec};

/// Inode number of the root directory.
pub const ROOT: u64 = 1;
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// The kind of an inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    Dir,
    File,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
}

/// One inode.
#[derive(Debug, Clone)]
pub struct Node {
    pub kind: NodeKind,
    /// Permission bits (setuid, setgid, sticky included).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: SystemTime,
    pub nlink: u32,
    pub rdev: (u32, u32),
    pub link_target: Box<[u8]>,
    pub xattrs: Vec<(Box<str>, Box<[u8]>)>,
    /// Sorted by name, so readdir offsets are stable.
    pub children: Vec<(Box<[u8]>, u64)>,
    pub chunks: Vec<ChunkSpec>,
    /// A directory the layer implies (a parent of its entries) but does not list: its
    /// attributes are placeholders, for the mount to take from the layers below.
    pub implied: bool,
}

/// Why a TOC cannot be served. Every message names the entry.
#[derive(Debug, thiserror::Error)]
#[error("TOC entry {entry:?}: {reason}")]
pub struct MetadataError {
    pub entry: String,
    pub reason: String,
}

/// What the layer's format says about prefetching on mount (eStargz landmark files).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landmark {
    /// `.prefetch.landmark`: the files before this blob offset are the ones the image's
    /// builder (`ctr-remote image optimize`) saw its workload read.
    PrefetchBefore(u64),
    /// `.no.prefetch.landmark`: the builder saw nothing worth prefetching.
    NoPrefetch,
}

/// The whole layer.
#[derive(Debug)]
pub struct LayerIndex {
    nodes: Vec<Node>,
    /// Sum of regular file sizes (each hard-linked inode once).
    pub file_bytes: u64,
    /// The landmark file the layer carries, if any.
    pub landmark: Option<Landmark>,
}

impl LayerIndex {
    /// Every chunk of the layer, each once, in blob order.
    pub fn chunks_in_blob_order(&self) -> Vec<ChunkSpec> {
        let mut seen = std::collections::HashSet::new();
        let mut out: Vec<ChunkSpec> = self
            .nodes
            .iter()
            .flat_map(|n| n.chunks.iter())
            .filter(|c| seen.insert(c.id))
            .cloned()
            .collect();
        out.sort_by_key(|c| (c.blob_range.start, c.inner_offset));
        out
    }

    pub fn node(&self, ino: u64) -> Option<&Node> {
        ino.checked_sub(1).and_then(|i| self.nodes.get(i as usize))
    }

    pub fn node_mut(&mut self, ino: u64) -> Option<&mut Node> {
        ino.checked_sub(1)
            .and_then(|i| self.nodes.get_mut(i as usize))
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Option<u64> {
        let dir = self.node(parent)?;
        dir.children
            .binary_search_by(|(n, _)| n.as_ref().cmp(name.as_bytes()))
            .ok()
            .map(|i| dir.children[i].1)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Every inode number, in order.
    pub fn inodes(&self) -> impl Iterator<Item = u64> {
        1..=self.nodes.len() as u64
    }

    /// One path (relative, `/`-separated) of each inode reachable from the root; a hard-linked
    /// file gets the first of its names. Walks the whole tree, so it is for occasional use
    /// (saving a trace), not for the read path.
    pub fn paths(&self) -> HashMap<u64, String> {
        let mut out = HashMap::with_capacity(self.nodes.len());
        let mut stack = vec![(ROOT, String::new())];
        while let Some((ino, path)) = stack.pop() {
            let Some(node) = self.node(ino) else { continue };
            for (name, child) in &node.children {
                if out.contains_key(child) {
                    continue;
                }
                let name = String::from_utf8_lossy(name);
                let child_path = if path.is_empty() {
                    name.into_owned()
                } else {
                    format!("{path}/{name}")
                };
                out.insert(*child, child_path.clone());
                stack.push((*child, child_path));
            }
        }
        out
    }

    /// The inode at a relative `/`-separated path.
    pub fn resolve(&self, path: &str) -> Option<u64> {
        path.split('/')
            .filter(|p| !p.is_empty())
            .try_fold(ROOT, |dir, name| self.lookup(dir, OsStr::new(name)))
    }

    /// The chunks of file `ino` overlapping `[start, end)`.
    pub fn chunks_for(&self, ino: u64, start: u64, end: u64) -> &[ChunkSpec] {
        let Some(node) = self.node(ino) else {
            return &[];
        };
        let chunks = &node.chunks;
        let first = chunks.partition_point(|c| c.file_offset + c.len <= start);
        let last = chunks.partition_point(|c| c.file_offset < end);
        &chunks[first..last.max(first)]
    }
}

/// The kind of a tar entry as a format reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File,
    Symlink { target: String },
    HardLink { target: String },
    CharDevice { major: u32, minor: u32 },
    BlockDevice { major: u32, minor: u32 },
    Fifo,
}

/// One tar entry of a layer, as its format describes it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The path in the layer, as written in the tar (`./` and leading `/` allowed).
    pub name: String,
    pub kind: EntryKind,
    /// Permission bits (setuid, setgid, sticky included); higher bits are ignored.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
    /// Regular files: the file's size.
    pub size: u64,
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// Regular files: the chunks holding the bytes, in file order; they must tile the file.
    /// Their `id`s are assigned by the builder.
    pub chunks: Vec<ChunkSpec>,
}

impl Entry {
    /// An entry of `kind` at `name` with no attributes set (mode 0, root, the epoch).
    pub fn new(name: impl Into<String>, kind: EntryKind) -> Self {
        Entry {
            name: name.into(),
            kind,
            mode: 0,
            uid: 0,
            gid: 0,
            mtime: SystemTime::UNIX_EPOCH,
            size: 0,
            xattrs: Vec::new(),
            chunks: Vec::new(),
        }
    }
}

/// Builds a [`LayerIndex`] from entries in tar order.
pub struct IndexBuilder {
    nodes: Vec<Node>,
    children: HashMap<(u64, Box<[u8]>), u64>,
    next_chunk: u32,
    landmark: Option<Landmark>,
}

impl Default for IndexBuilder {
    fn default() -> Self {
        Self::new()
    }
}

pub(crate) fn err(entry: &str, reason: impl Into<String>) -> MetadataError {
    MetadataError {
        entry: entry.to_owned(),
        reason: reason.into(),
    }
}

fn new_node(kind: NodeKind, perm: u32) -> Node {
    Node {
        kind,
        perm,
        uid: 0,
        gid: 0,
        size: 0,
        mtime: SystemTime::UNIX_EPOCH,
        nlink: 1,
        rdev: (0, 0),
        link_target: Box::default(),
        xattrs: Vec::new(),
        children: Vec::new(),
        chunks: Vec::new(),
        implied: false,
    }
}

/// Splits a tar name into components, refusing anything that leaves the layer. Leading `/`
/// and `./` are dropped as tar extractors do.
pub fn components(name: &str) -> Result<Vec<&str>, String> {
    if name.contains('\0') {
        return Err("name contains a NUL byte".into());
    }
    let mut parts = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err("name contains `..`".into()),
            p => parts.push(p),
        }
    }
    Ok(parts)
}

impl IndexBuilder {
    pub fn new() -> Self {
        let mut root = new_node(NodeKind::Dir, 0o755);
        root.nlink = 2;
        IndexBuilder {
            nodes: vec![root],
            children: HashMap::new(),
            next_chunk: 0,
            landmark: None,
        }
    }

    /// Records what the format says to prefetch on mount.
    pub fn set_landmark(&mut self, landmark: Landmark) {
        self.landmark = Some(landmark);
    }

    /// Adds the next entry. A later entry for an existing directory updates its attributes,
    /// as unpacking the tar would.
    pub fn add(&mut self, mut e: Entry) -> Result<(), MetadataError> {
        let parts = components(&e.name).map_err(|r| err(&e.name, r))?;
        let Some((&base, dirs)) = parts.split_last() else {
            // the root directory itself
            if e.kind == EntryKind::Dir {
                apply_attrs(&mut self.nodes[0], &e);
            }
            return Ok(());
        };
        let parent = self.ensure_dirs(&e.name, dirs)?;
        if base == OPAQUE_MARKER {
            let dir = &mut self.nodes[(parent - 1) as usize];
            dir.xattrs.retain(|(k, _)| k.as_ref() != OPAQUE_XATTR);
            dir.xattrs
                .push((OPAQUE_XATTR.into(), b"y".as_slice().into()));
            return Ok(());
        }
        if let Some(hidden) = base.strip_prefix(WHITEOUT_PREFIX) {
            let mut node = new_node(NodeKind::CharDevice, 0);
            node.mtime = e.mtime;
            return self.insert(&e.name, parent, hidden, node).map(drop);
        }
        let key = (parent, Box::<[u8]>::from(base.as_bytes()));
        let (kind, link_target, rdev) = match &e.kind {
            EntryKind::HardLink { target } => {
                let target =
                    components(target).map_err(|r| err(&e.name, format!("link target: {r}")))?;
                let ino = self.resolve(&target).ok_or_else(|| {
                    err(
                        &e.name,
                        format!("hard link to missing {:?}", target.join("/")),
                    )
                })?;
                let node = &mut self.nodes[(ino - 1) as usize];
                if node.kind == NodeKind::Dir {
                    return Err(err(&e.name, "hard link to a directory"));
                }
                if self.children.contains_key(&key) {
                    return Err(err(&e.name, "duplicate name"));
                }
                node.nlink += 1;
                self.children.insert(key, ino);
                return Ok(());
            }
            EntryKind::Dir => (NodeKind::Dir, None, (0, 0)),
            EntryKind::File => (NodeKind::File, None, (0, 0)),
            EntryKind::Symlink { target } => (NodeKind::Symlink, Some(target.clone()), (0, 0)),
            EntryKind::CharDevice { major, minor } => {
                (NodeKind::CharDevice, None, (*major, *minor))
            }
            EntryKind::BlockDevice { major, minor } => {
                (NodeKind::BlockDevice, None, (*major, *minor))
            }
            EntryKind::Fifo => (NodeKind::Fifo, None, (0, 0)),
        };
        if kind == NodeKind::Dir {
            if let Some(&ino) = self.children.get(&key) {
                let node = &mut self.nodes[(ino - 1) as usize];
                if node.kind != NodeKind::Dir {
                    return Err(err(&e.name, "directory and non-directory share a name"));
                }
                apply_attrs(node, &e);
                return Ok(());
            }
        }
        let mut node = new_node(kind, 0);
        apply_attrs(&mut node, &e);
        node.rdev = rdev;
        if let Some(target) = link_target {
            node.size = target.len() as u64;
            node.link_target = target.into_bytes().into();
        }
        if kind == NodeKind::File {
            node.size = e.size;
            check_tiling(&e)?;
            for chunk in &mut e.chunks {
                chunk.id = ChunkId(self.next_chunk);
                self.next_chunk = self
                    .next_chunk
                    .checked_add(1)
                    .ok_or_else(|| err(&e.name, "more than 2^32 chunks in the layer"))?;
            }
            node.chunks = std::mem::take(&mut e.chunks);
        }
        self.insert(&e.name, parent, base, node).map(drop)
    }

    /// The finished index.
    pub fn finish(mut self) -> LayerIndex {
        for ((parent, name), ino) in std::mem::take(&mut self.children) {
            self.nodes[(parent - 1) as usize].children.push((name, ino));
        }
        let subdirs: Vec<u32> = self
            .nodes
            .iter()
            .map(|n| {
                n.children
                    .iter()
                    .filter(|(_, c)| self.nodes[(*c - 1) as usize].kind == NodeKind::Dir)
                    .count() as u32
            })
            .collect();
        let mut file_bytes: u64 = 0;
        for (node, subdirs) in self.nodes.iter_mut().zip(subdirs) {
            node.children.sort_by(|a, b| a.0.cmp(&b.0));
            match node.kind {
                NodeKind::Dir => node.nlink = 2 + subdirs,
                NodeKind::File => file_bytes = file_bytes.saturating_add(node.size),
                _ => {}
            }
        }
        LayerIndex {
            nodes: self.nodes,
            file_bytes,
            landmark: self.landmark,
        }
    }

    fn insert(
        &mut self,
        entry: &str,
        parent: u64,
        name: &str,
        node: Node,
    ) -> Result<u64, MetadataError> {
        let key = (parent, Box::<[u8]>::from(name.as_bytes()));
        if self.children.contains_key(&key) {
            return Err(err(entry, "duplicate name"));
        }
        self.nodes.push(node);
        let ino = self.nodes.len() as u64;
        self.children.insert(key, ino);
        Ok(ino)
    }

    /// The inode of the directory `dirs`, creating missing ones as stargz does (0755, root).
    fn ensure_dirs(&mut self, entry: &str, dirs: &[&str]) -> Result<u64, MetadataError> {
        let mut current = ROOT;
        for dir in dirs {
            let key = (current, Box::<[u8]>::from(dir.as_bytes()));
            current = match self.children.get(&key) {
                Some(&ino) => {
                    if self.nodes[(ino - 1) as usize].kind != NodeKind::Dir {
                        return Err(err(entry, format!("parent {dir:?} is not a directory")));
                    }
                    ino
                }
                None => {
                    let mut node = new_node(NodeKind::Dir, 0o755);
                    node.implied = true;
                    self.nodes.push(node);
                    let ino = self.nodes.len() as u64;
                    self.children.insert(key, ino);
                    ino
                }
            };
        }
        Ok(current)
    }

    fn resolve(&self, parts: &[&str]) -> Option<u64> {
        let mut current = ROOT;
        for part in parts {
            current = *self
                .children
                .get(&(current, Box::<[u8]>::from(part.as_bytes())))?;
        }
        Some(current)
    }
}

/// The chunks of a file must tile it exactly, in order.
fn check_tiling(e: &Entry) -> Result<(), MetadataError> {
    let mut next: u64 = 0;
    for c in &e.chunks {
        if c.file_offset != next {
            return Err(err(
                &e.name,
                format!("chunks leave a gap or overlap at byte {next}"),
            ));
        }
        next = next
            .checked_add(c.len)
            .ok_or_else(|| err(&e.name, "chunk lengths overflow"))?;
    }
    if next != e.size {
        return Err(err(
            &e.name,
            format!("chunks cover {next} of {} bytes", e.size),
        ));
    }
    Ok(())
}

fn apply_attrs(node: &mut Node, e: &Entry) {
    node.implied = false;
    node.perm = e.mode & 0o7777;
    node.uid = e.uid;
    node.gid = e.gid;
    node.mtime = e.mtime;
    node.xattrs.retain(|(k, _)| k.as_ref() == OPAQUE_XATTR);
    for (name, value) in &e.xattrs {
        node.xattrs
            .push((name.as_str().into(), value.as_slice().into()));
    }
}
