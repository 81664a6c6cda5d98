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

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::SystemTime;

use crate::chunk::{ChunkId, ChunkSpec, FileKey};

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

/// What one layer's index may claim, checked as it is built, so that the memory and time a
/// layer costs are bounded by configuration, never by its input. This is the config's
/// `[limits]` section itself (defaults in [`Limits::DEFAULT`]). A layer over any limit is
/// refused with a message naming the entry, the value, the limit and its key, and takes the
/// ordinary path (containerd downloads and unpacks it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Bytes of a layer's index document (the TOC JSON), compressed or not. Default 64 MiB.
    pub max_toc_bytes: u64,
    /// Entries of the index document; also inodes (implied directories included) and chunks.
    /// Default 500000 (~250 bytes of memory per entry while mounted, ~1.45 KiB while built).
    pub max_entries: u64,
    /// Uncompressed bytes one chunk decodes to (with any bytes before it in its stream); its
    /// compressed extent may be at most 1/8 + 64 KiB larger. Default 64 MiB.
    pub max_chunk_bytes: u64,
    /// Components of one path. Default 512.
    pub max_path_depth: u64,
    /// Bytes of one path (PATH_MAX). Default 4096.
    pub max_path_bytes: u64,
    /// Bytes of one path component (NAME_MAX). Default 255.
    pub max_name_bytes: u64,
    /// Bytes of a symbolic link's target (PATH_MAX). Default 4096.
    pub max_link_bytes: u64,
    /// Bytes of one extended attribute's name (XATTR_NAME_MAX). Default 255.
    pub max_xattr_name_bytes: u64,
    /// Bytes of one extended attribute's value (XATTR_SIZE_MAX). Default 65536.
    pub max_xattr_value_bytes: u64,
    /// Bytes of all extended attributes of one entry, names and values. Default 262144.
    pub max_xattr_bytes: u64,
}

impl Limits {
    pub const DEFAULT: Limits = Limits {
        max_toc_bytes: 64 << 20,
        max_entries: 500_000,
        max_chunk_bytes: 64 << 20,
        max_path_depth: 512,
        max_path_bytes: 4096,
        max_name_bytes: 255,
        max_link_bytes: 4096,
        max_xattr_name_bytes: 255,
        max_xattr_value_bytes: 64 << 10,
        max_xattr_bytes: 256 << 10,
    };

    /// The most compressed bytes that can hold `decoded` bytes of a gzip member or zstd frame
    /// (stored/raw blocks cost a few bytes per 64 KiB; headers are small): fetching more for
    /// one chunk would be fetching something else.
    pub fn extent_bound(decoded: u64) -> u64 {
        decoded.saturating_add(decoded / 8).saturating_add(64 << 10)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

impl Limits {
    /// Every config key with its value, for validation and messages.
    pub fn keys(&self) -> [(&'static str, u64); 10] {
        [
            ("limits.max_toc_bytes", self.max_toc_bytes),
            ("limits.max_entries", self.max_entries),
            ("limits.max_chunk_bytes", self.max_chunk_bytes),
            ("limits.max_path_depth", self.max_path_depth),
            ("limits.max_path_bytes", self.max_path_bytes),
            ("limits.max_name_bytes", self.max_name_bytes),
            ("limits.max_link_bytes", self.max_link_bytes),
            ("limits.max_xattr_name_bytes", self.max_xattr_name_bytes),
            ("limits.max_xattr_value_bytes", self.max_xattr_value_bytes),
            ("limits.max_xattr_bytes", self.max_xattr_bytes),
        ]
    }
}

/// The reason for a refusal over a limit: `{what} of {value}{unit} exceeds the limit of
/// {limit} ([limits] {key})`, e.g. `name component of 300 bytes exceeds the limit of 255
/// ([limits] max_name_bytes)`.
pub fn over_limit(what: &str, value: u64, unit: &str, limit: u64, key: &str) -> String {
    format!("{what} of {value}{unit} exceeds the limit of {limit} ([limits] {key})")
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
    /// Every chunk of the layer (each file's piece of a shared unit apart), each once, in blob order.
    pub fn chunks_in_blob_order(&self) -> Vec<ChunkSpec> {
        let mut seen = HashSet::new();
        let mut out: Vec<ChunkSpec> = self
            .nodes
            .iter()
            .flat_map(|n| n.chunks.iter())
            .filter(|c| seen.insert(c.piece()))
            .cloned()
            .collect();
        out.sort_by_key(|c| (c.blob_range.start, c.inner_offset));
        out
    }

    /// The directory (its inode) holding the file of each chunk of `layout`; 0 for a chunk
    /// no directory lists. A hard-linked file counts in the first directory listing it.
    pub fn directories_of(&self, layout: &[ChunkSpec]) -> Vec<u64> {
        let mut dir_of: HashMap<crate::chunk::PieceId, u64> = HashMap::new();
        for (i, node) in self.nodes.iter().enumerate() {
            if node.kind != NodeKind::Dir {
                continue;
            }
            for (_, child) in &node.children {
                let Some(file) = self.node(*child).filter(|n| n.kind == NodeKind::File) else {
                    continue;
                };
                for chunk in &file.chunks {
                    dir_of.entry(chunk.piece()).or_insert(i as u64 + 1);
                }
            }
        }
        layout
            .iter()
            .map(|c| dir_of.get(&c.piece()).copied().unwrap_or(0))
            .collect()
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

    /// The size of the layer's largest regular file; 0 if it has none.
    pub fn largest_file(&self) -> u64 {
        self.nodes
            .iter()
            .filter(|n| n.kind == NodeKind::File)
            .map(|n| n.size)
            .max()
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Every inode number, in order.
    pub fn inodes(&self) -> impl Iterator<Item = u64> {
        1..=self.nodes.len() as u64
    }

    /// One path (relative, `/`-separated) of each of `inodes` that is in the layer; a
    /// hard-linked file gets one of its names. One pass over the directories, noting each
    /// inode's parent (a few bytes per inode, dropped on return), then a walk up from each
    /// asked inode only: cost proportional to the layer's entries plus the paths asked for,
    /// whatever the depth. For occasional use (saving a trace), not for the read path.
    pub fn paths_of(&self, inodes: &HashSet<u64>) -> HashMap<u64, String> {
        // (parent inode, index of the name in its children); 0 = not seen.
        let mut up: Vec<(u64, u32)> = vec![(0, 0); self.nodes.len()];
        for (i, node) in self.nodes.iter().enumerate() {
            for (k, (_, child)) in node.children.iter().enumerate() {
                let slot = child.checked_sub(1).and_then(|c| up.get_mut(c as usize));
                if let (Some(slot), Ok(k)) = (slot, u32::try_from(k)) {
                    if slot.0 == 0 && *child != ROOT {
                        *slot = (i as u64 + 1, k);
                    }
                }
            }
        }
        let mut out = HashMap::with_capacity(inodes.len());
        for &ino in inodes {
            let mut names: Vec<&[u8]> = Vec::new();
            let mut at = ino;
            // A tree has no cycles; the bound only guards against a broken one.
            while at != ROOT && names.len() <= self.nodes.len() {
                let Some(&(parent, k)) = at.checked_sub(1).and_then(|i| up.get(i as usize)) else {
                    break;
                };
                let Some((name, _)) = self.node(parent).and_then(|p| p.children.get(k as usize))
                else {
                    break;
                };
                names.push(name);
                at = parent;
            }
            if at != ROOT || names.is_empty() {
                continue;
            }
            let mut path = String::new();
            for name in names.iter().rev() {
                if !path.is_empty() {
                    path.push('/');
                }
                path.push_str(&String::from_utf8_lossy(name));
            }
            out.insert(ino, path);
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
        let first = chunks.partition_point(|c| c.file_offset.saturating_add(c.len) <= start);
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

/// Builds a [`LayerIndex`] from entries in tar order, within its [`Limits`].
pub struct IndexBuilder {
    nodes: Vec<Node>,
    children: HashMap<(u64, Box<[u8]>), u64>,
    next_chunk: u32,
    /// Entries added so far.
    added: u64,
    landmark: Option<Landmark>,
    limits: Limits,
    /// The format numbers chunks itself (pieces of one verified unit share its id).
    format_ids: bool,
    /// The directory the last entry went into, by its components, and its inode: entries
    /// come in tar order, mostly several to a directory, and a directory keeps its inode
    /// (nothing is removed or replaced while building), so most entries find their parent
    /// here instead of looking up every component of their path.
    last_dir: (Vec<String>, u64),
}

impl Default for IndexBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// Entry names in messages are cut here: a hostile name may be megabytes long.
const MAX_NAME_IN_MESSAGE: usize = 200;

pub(crate) fn err(entry: &str, reason: impl Into<String>) -> MetadataError {
    let entry = if entry.len() > MAX_NAME_IN_MESSAGE {
        let mut cut = MAX_NAME_IN_MESSAGE;
        while !entry.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}… ({} bytes)", &entry[..cut], entry.len())
    } else {
        entry.to_owned()
    };
    MetadataError {
        entry,
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

/// `len` against `limit`, as `Err(reason)` naming `what` and the limit's `key`.
fn within(what: &str, len: u64, unit: &str, limit: u64, key: &str) -> Result<(), String> {
    if len > limit {
        Err(over_limit(what, len, unit, limit, key))
    } else {
        Ok(())
    }
}

impl Limits {
    /// A path's components against the depth, path and name limits.
    pub fn check_path(&self, parts: &[&str]) -> Result<(), String> {
        within(
            "path depth",
            parts.len() as u64,
            "",
            self.max_path_depth,
            "max_path_depth",
        )?;
        let mut bytes: u64 = 0;
        for part in parts {
            within(
                "name component",
                part.len() as u64,
                " bytes",
                self.max_name_bytes,
                "max_name_bytes",
            )?;
            bytes = bytes.saturating_add(part.len() as u64 + 1);
        }
        within(
            "path",
            bytes.saturating_sub(1),
            " bytes",
            self.max_path_bytes,
            "max_path_bytes",
        )
    }

    /// An entry's extended attributes against the xattr limits.
    pub fn check_xattrs(&self, xattrs: &[(String, Vec<u8>)]) -> Result<(), String> {
        let mut total: u64 = 0;
        for (name, value) in xattrs {
            within(
                &format!("xattr name {:?}", truncate(name)),
                name.len() as u64,
                " bytes",
                self.max_xattr_name_bytes,
                "max_xattr_name_bytes",
            )?;
            within(
                &format!("value of xattr {:?}", truncate(name)),
                value.len() as u64,
                " bytes",
                self.max_xattr_value_bytes,
                "max_xattr_value_bytes",
            )?;
            total = total
                .saturating_add(name.len() as u64)
                .saturating_add(value.len() as u64);
        }
        within(
            "extended attributes",
            total,
            " bytes",
            self.max_xattr_bytes,
            "max_xattr_bytes",
        )
    }
}

fn truncate(s: &str) -> &str {
    let mut cut = s.len().min(64);
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    &s[..cut]
}

impl IndexBuilder {
    /// A builder with the default [`Limits`].
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    pub fn with_limits(limits: Limits) -> Self {
        let mut root = new_node(NodeKind::Dir, 0o755);
        root.nlink = 2;
        IndexBuilder {
            nodes: vec![root],
            children: HashMap::new(),
            next_chunk: 0,
            added: 0,
            landmark: None,
            limits,
            format_ids: false,
            last_dir: (Vec::new(), ROOT),
        }
    }

    /// Keeps the chunk ids the format gave (several files' pieces of one unit it verifies
    /// and stores whole share that unit's id) instead of numbering chunks in entry order.
    /// The pieces still count against `max_entries`.
    pub fn with_format_chunk_ids(mut self) -> Self {
        self.format_ids = true;
        self
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Records what the format says to prefetch on mount.
    pub fn set_landmark(&mut self, landmark: Landmark) {
        self.landmark = Some(landmark);
    }

    /// Adds the next entry. A later entry for an existing directory updates its attributes,
    /// as unpacking the tar would.
    pub fn add(&mut self, mut e: Entry) -> Result<(), MetadataError> {
        self.added = self.added.saturating_add(1);
        within(
            "layer",
            self.added,
            " entries",
            self.limits.max_entries,
            "max_entries",
        )
        .map_err(|r| err(&e.name, r))?;
        let parts = components(&e.name).map_err(|r| err(&e.name, r))?;
        self.limits
            .check_path(&parts)
            .map_err(|r| err(&e.name, r))?;
        self.limits
            .check_xattrs(&e.xattrs)
            .map_err(|r| err(&e.name, r))?;
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
                        format!("hard link to missing {:?}", truncate(&target.join("/"))),
                    )
                })?;
                let node = &mut self.nodes[(ino - 1) as usize];
                if node.kind == NodeKind::Dir {
                    return Err(err(&e.name, "hard link to a directory"));
                }
                if self.children.contains_key(&key) {
                    return Err(err(&e.name, "duplicate name"));
                }
                node.nlink = node.nlink.saturating_add(1);
                self.children.insert(key, ino);
                return Ok(());
            }
            EntryKind::Dir => (NodeKind::Dir, None, (0, 0)),
            EntryKind::File => (NodeKind::File, None, (0, 0)),
            EntryKind::Symlink { target } => {
                within(
                    "symlink target",
                    target.len() as u64,
                    " bytes",
                    self.limits.max_link_bytes,
                    "max_link_bytes",
                )
                .map_err(|r| err(&e.name, r))?;
                (NodeKind::Symlink, Some(target.clone()), (0, 0))
            }
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
            check_chunks(&e, &self.limits)?;
            for chunk in &mut e.chunks {
                if !self.format_ids {
                    chunk.id = ChunkId(self.next_chunk);
                }
                self.next_chunk = self
                    .next_chunk
                    .checked_add(1)
                    .ok_or_else(|| err(&e.name, "more than 2^32 chunks in the layer"))?;
            }
            within(
                "layer",
                u64::from(self.next_chunk),
                " chunks",
                self.limits.max_entries,
                "max_entries",
            )
            .map_err(|r| err(&e.name, r))?;
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
            // Vecs grown by push keep room for 4 or more: at a million inodes that slack is
            // most of the index.
            node.children.shrink_to_fit();
            node.chunks.shrink_to_fit();
            node.xattrs.shrink_to_fit();
            match node.kind {
                NodeKind::Dir => node.nlink = subdirs.saturating_add(2),
                NodeKind::File => {
                    file_bytes = file_bytes.saturating_add(node.size);
                    // Formats cannot know it: a file's key covers all its chunks.
                    let key = FileKey::of(node.size, &node.chunks);
                    for chunk in &mut node.chunks {
                        chunk.file = key;
                    }
                }
                _ => {}
            }
        }
        self.nodes.shrink_to_fit();
        LayerIndex {
            nodes: self.nodes,
            file_bytes,
            landmark: self.landmark,
        }
    }

    /// A new inode, within `max_entries`.
    fn push_node(&mut self, entry: &str, node: Node) -> Result<u64, MetadataError> {
        within(
            "layer",
            self.nodes.len() as u64 + 1,
            " inodes",
            self.limits.max_entries,
            "max_entries",
        )
        .map_err(|r| err(entry, r))?;
        self.nodes.push(node);
        Ok(self.nodes.len() as u64)
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
        let ino = self.push_node(entry, node)?;
        self.children.insert(key, ino);
        Ok(ino)
    }

    /// The inode of the directory `dirs`, creating missing ones as stargz does (0755, root).
    fn ensure_dirs(&mut self, entry: &str, dirs: &[&str]) -> Result<u64, MetadataError> {
        if self
            .last_dir
            .0
            .iter()
            .map(String::as_str)
            .eq(dirs.iter().copied())
        {
            return Ok(self.last_dir.1);
        }
        let ino = self.walk_dirs(entry, dirs)?;
        self.last_dir = (dirs.iter().map(|d| (*d).to_owned()).collect(), ino);
        Ok(ino)
    }

    /// [`Self::ensure_dirs`] without the shortcut.
    fn walk_dirs(&mut self, entry: &str, dirs: &[&str]) -> Result<u64, MetadataError> {
        let mut current = ROOT;
        for dir in dirs {
            let key = (current, Box::<[u8]>::from(dir.as_bytes()));
            current = match self.children.get(&key) {
                Some(&ino) => {
                    if self.nodes[(ino - 1) as usize].kind != NodeKind::Dir {
                        return Err(err(
                            entry,
                            format!("parent {:?} is not a directory", truncate(dir)),
                        ));
                    }
                    ino
                }
                None => {
                    let mut node = new_node(NodeKind::Dir, 0o755);
                    node.implied = true;
                    let ino = self.push_node(entry, node)?;
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

/// The chunks of a file must tile it exactly, in order, each within `max_chunk_bytes` (with
/// whatever its stream decodes before it) and fetched from a compressed extent no wider than
/// such a chunk can need. All arithmetic on claimed values is checked.
fn check_chunks(e: &Entry, limits: &Limits) -> Result<(), MetadataError> {
    let mut next: u64 = 0;
    for c in &e.chunks {
        if c.file_offset != next {
            return Err(err(
                &e.name,
                format!("chunks leave a gap or overlap at byte {next}"),
            ));
        }
        if c.len == 0 {
            return Err(err(&e.name, format!("empty chunk at byte {next}")));
        }
        let decoded = c.inner_offset.checked_add(c.len).ok_or_else(|| {
            err(
                &e.name,
                format!(
                    "chunk at byte {next}: inner offset {} plus length {} overflows",
                    c.inner_offset, c.len
                ),
            )
        })?;
        within(
            "chunk",
            c.len,
            " bytes",
            limits.max_chunk_bytes,
            "max_chunk_bytes",
        )
        .and_then(|()| {
            within(
                "chunk with the bytes its stream decodes before it",
                decoded,
                " bytes",
                limits.max_chunk_bytes,
                "max_chunk_bytes",
            )
        })
        .map_err(|r| err(&e.name, format!("{r}, at file offset {next}")))?;
        if c.blob_range.end < c.blob_range.start {
            return Err(err(
                &e.name,
                format!(
                    "chunk at byte {next} has a compressed extent that ends before it starts ({}..{})",
                    c.blob_range.start, c.blob_range.end
                ),
            ));
        }
        within(
            "compressed extent",
            c.blob_range.end - c.blob_range.start,
            " bytes",
            Limits::extent_bound(limits.max_chunk_bytes),
            "max_chunk_bytes",
        )
        .map_err(|r| err(&e.name, format!("{r}, at file offset {next}")))?;
        next = next.checked_add(c.len).ok_or_else(|| {
            err(
                &e.name,
                format!("chunk lengths overflow at file offset {next}"),
            )
        })?;
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
