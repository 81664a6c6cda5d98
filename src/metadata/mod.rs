//! The layer index: a TOC turned into what a file system needs — an inode table with
//! attributes, sorted directory children, hard links sharing one inode, and for each regular
//! file the chunks that hold its bytes. Pure: no I/O.
//!
//! The tree is built to look to overlayfs exactly as containerd's tar applier would have left
//! the layer on disk: `.wh.NAME` entries become 0/0 character devices named NAME,
//! `.wh..wh..opq` sets `trusted.overlay.opaque=y` on its directory, and the format's own files
//! (the TOC and prefetch landmarks) are not shown. Names that would escape the layer, chunks
//! that do not fit the blob, and duplicate names that disagree are refused, naming the entry.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::SystemTime;

use base64::Engine as _;

use crate::cache::ChunkKey;
use crate::format::{Toc, TocEntry, TOC_TAR_NAME};
use crate::layer::ChunkSpec;

/// Inode number of the root directory.
pub const ROOT: u64 = 1;
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// Files the formats add to a layer that are not part of the image's contents.
const HIDDEN: &[&str] = &[TOC_TAR_NAME, ".prefetch.landmark", ".no.prefetch.landmark"];

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
}

/// Why a TOC cannot be served. Every message names the entry.
#[derive(Debug, thiserror::Error)]
#[error("TOC entry {entry:?}: {reason}")]
pub struct MetadataError {
    pub entry: String,
    pub reason: String,
}

/// What the layer's eStargz landmark files say about prefetching on mount.
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
    /// Builds the index of a layer whose TOC starts at `toc_offset` in its blob (the end of the
    /// last chunk's compressed stream).
    pub fn build(toc: &Toc, toc_offset: u64) -> Result<Self, MetadataError> {
        Builder::new(toc, toc_offset).run(toc)
    }

    pub fn node(&self, ino: u64) -> Option<&Node> {
        ino.checked_sub(1).and_then(|i| self.nodes.get(i as usize))
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

struct Builder {
    nodes: Vec<Node>,
    /// Sorted stream offsets; the extent of a chunk ends at the next one.
    offsets: Vec<u64>,
    toc_offset: u64,
    /// The file a following `chunk` entry continues.
    last_file: Option<(String, u64)>,
    landmark: Option<Landmark>,
}

fn err(entry: &str, reason: impl Into<String>) -> MetadataError {
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
    }
}

/// Splits a TOC name into components, refusing anything that leaves the layer. Leading `/` and
/// `./` are dropped as tar extractors do.
fn components(name: &str) -> Result<Vec<&str>, String> {
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

impl Builder {
    fn new(toc: &Toc, toc_offset: u64) -> Self {
        let mut offsets: Vec<u64> = toc
            .entries
            .iter()
            .filter(|e| e.kind == "chunk" || (e.kind == "reg" && e.size > 0))
            .map(|e| e.offset)
            .collect();
        offsets.push(toc_offset);
        offsets.sort_unstable();
        offsets.dedup();
        let mut root = new_node(NodeKind::Dir, 0o755);
        root.nlink = 2;
        Builder {
            nodes: vec![root],
            offsets,
            toc_offset,
            last_file: None,
            landmark: None,
        }
    }

    fn run(mut self, toc: &Toc) -> Result<LayerIndex, MetadataError> {
        let mut children: HashMap<(u64, Box<[u8]>), u64> = HashMap::new();
        for entry in &toc.entries {
            if entry.kind != "chunk" {
                self.finish_file()?;
            }
            self.add(entry, &mut children)?;
        }
        self.finish_file()?;
        for ((parent, name), ino) in children {
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
        let mut file_bytes = 0;
        for (node, subdirs) in self.nodes.iter_mut().zip(subdirs) {
            node.children.sort_by(|a, b| a.0.cmp(&b.0));
            match node.kind {
                NodeKind::Dir => node.nlink = 2 + subdirs,
                NodeKind::File => file_bytes += node.size,
                _ => {}
            }
        }
        Ok(LayerIndex {
            nodes: self.nodes,
            file_bytes,
            landmark: self.landmark,
        })
    }

    /// The chunks of the file just completed must tile it exactly, in order.
    fn finish_file(&mut self) -> Result<(), MetadataError> {
        let Some((name, ino)) = self.last_file.take() else {
            return Ok(());
        };
        let node = &self.nodes[(ino - 1) as usize];
        let mut next = 0;
        for c in &node.chunks {
            if c.file_offset != next {
                return Err(err(
                    &name,
                    format!("chunks leave a gap or overlap at byte {next}"),
                ));
            }
            next += c.len;
        }
        if next != node.size {
            return Err(err(
                &name,
                format!("chunks cover {next} of {} bytes", node.size),
            ));
        }
        Ok(())
    }

    fn add(
        &mut self,
        e: &TocEntry,
        children: &mut HashMap<(u64, Box<[u8]>), u64>,
    ) -> Result<(), MetadataError> {
        let parts = components(&e.name).map_err(|r| err(&e.name, r))?;
        if e.kind == "chunk" {
            return self.add_chunk(e);
        }
        let Some((&base, dirs)) = parts.split_last() else {
            // the root directory itself
            if e.kind == "dir" {
                apply_attrs(&mut self.nodes[0], e)?;
            }
            return Ok(());
        };
        if dirs.is_empty() && HIDDEN.contains(&base) {
            match base {
                ".prefetch.landmark" => self.landmark = Some(Landmark::PrefetchBefore(e.offset)),
                ".no.prefetch.landmark" => self.landmark = Some(Landmark::NoPrefetch),
                _ => {}
            }
            return Ok(());
        }
        let parent = self.ensure_dirs(&e.name, dirs, children)?;
        if base == OPAQUE_MARKER {
            let dir = &mut self.nodes[(parent - 1) as usize];
            dir.xattrs.retain(|(k, _)| k.as_ref() != OPAQUE_XATTR);
            dir.xattrs
                .push((OPAQUE_XATTR.into(), b"y".as_slice().into()));
            return Ok(());
        }
        if let Some(hidden) = base.strip_prefix(WHITEOUT_PREFIX) {
            let mut node = new_node(NodeKind::CharDevice, 0);
            node.mtime = parse_time(e)?;
            return self.insert(e, parent, hidden, node, children).map(drop);
        }
        let key = (parent, Box::<[u8]>::from(base.as_bytes()));
        if e.kind == "hardlink" {
            let target =
                components(&e.link_name).map_err(|r| err(&e.name, format!("link target: {r}")))?;
            let ino = self
                .resolve(&target, children)
                .ok_or_else(|| err(&e.name, format!("hard link to missing {:?}", e.link_name)))?;
            let node = &mut self.nodes[(ino - 1) as usize];
            if node.kind == NodeKind::Dir {
                return Err(err(&e.name, "hard link to a directory"));
            }
            if children.contains_key(&key) {
                return Err(err(&e.name, "duplicate name"));
            }
            node.nlink += 1;
            children.insert(key, ino);
            return Ok(());
        }
        let kind = match e.kind.as_str() {
            "dir" => NodeKind::Dir,
            "reg" => NodeKind::File,
            "symlink" => NodeKind::Symlink,
            "char" => NodeKind::CharDevice,
            "block" => NodeKind::BlockDevice,
            "fifo" => NodeKind::Fifo,
            other => return Err(err(&e.name, format!("unknown entry type {other:?}"))),
        };
        if kind == NodeKind::Dir {
            if let Some(&ino) = children.get(&key) {
                let node = &mut self.nodes[(ino - 1) as usize];
                if node.kind != NodeKind::Dir {
                    return Err(err(&e.name, "directory and non-directory share a name"));
                }
                return apply_attrs(node, e);
            }
        }
        let mut node = new_node(kind, 0);
        apply_attrs(&mut node, e)?;
        match kind {
            NodeKind::Symlink => {
                node.link_target = e.link_name.as_bytes().into();
                node.size = e.link_name.len() as u64;
            }
            NodeKind::CharDevice | NodeKind::BlockDevice => node.rdev = (e.dev_major, e.dev_minor),
            NodeKind::File => {
                node.size = e.size;
                if e.size > 0 {
                    node.chunks.push(self.chunk(e, e.size)?);
                }
            }
            _ => {}
        }
        let ino = self.insert(e, parent, base, node, children)?;
        if kind == NodeKind::File {
            self.last_file = Some((e.name.clone(), ino));
        }
        Ok(())
    }

    fn insert(
        &mut self,
        e: &TocEntry,
        parent: u64,
        name: &str,
        node: Node,
        children: &mut HashMap<(u64, Box<[u8]>), u64>,
    ) -> Result<u64, MetadataError> {
        let key = (parent, Box::<[u8]>::from(name.as_bytes()));
        if children.contains_key(&key) {
            return Err(err(&e.name, "duplicate name"));
        }
        self.nodes.push(node);
        let ino = self.nodes.len() as u64;
        children.insert(key, ino);
        Ok(ino)
    }

    /// The inode of the directory `dirs`, creating missing ones as stargz does (0755, root).
    fn ensure_dirs(
        &mut self,
        entry: &str,
        dirs: &[&str],
        children: &mut HashMap<(u64, Box<[u8]>), u64>,
    ) -> Result<u64, MetadataError> {
        let mut current = ROOT;
        for dir in dirs {
            let key = (current, Box::<[u8]>::from(dir.as_bytes()));
            current = match children.get(&key) {
                Some(&ino) => {
                    if self.nodes[(ino - 1) as usize].kind != NodeKind::Dir {
                        return Err(err(entry, format!("parent {dir:?} is not a directory")));
                    }
                    ino
                }
                None => {
                    self.nodes.push(new_node(NodeKind::Dir, 0o755));
                    let ino = self.nodes.len() as u64;
                    children.insert(key, ino);
                    ino
                }
            };
        }
        Ok(current)
    }

    fn resolve(&self, parts: &[&str], children: &HashMap<(u64, Box<[u8]>), u64>) -> Option<u64> {
        let mut current = ROOT;
        for part in parts {
            current = *children.get(&(current, Box::<[u8]>::from(part.as_bytes())))?;
        }
        Some(current)
    }

    fn add_chunk(&mut self, e: &TocEntry) -> Result<(), MetadataError> {
        let Some((name, ino)) = self.last_file.clone() else {
            return Err(err(&e.name, "chunk without a preceding file"));
        };
        if name != e.name {
            return Err(err(
                &e.name,
                format!("chunk follows a different file, {name:?}"),
            ));
        }
        let size = self.nodes[(ino - 1) as usize].size;
        let chunk = self.chunk(e, size)?;
        self.nodes[(ino - 1) as usize].chunks.push(chunk);
        Ok(())
    }

    fn chunk(&self, e: &TocEntry, file_size: u64) -> Result<ChunkSpec, MetadataError> {
        let len = if e.chunk_size > 0 {
            e.chunk_size
        } else {
            file_size
                .checked_sub(e.chunk_offset)
                .ok_or_else(|| err(&e.name, "chunk offset past the end of the file"))?
        };
        let key = ChunkKey::from_digest(&e.chunk_digest).ok_or_else(|| {
            err(
                &e.name,
                format!("chunk without a sha256 chunkDigest ({:?})", e.chunk_digest),
            )
        })?;
        let end = self
            .offsets
            .iter()
            .copied()
            .find(|o| *o > e.offset)
            .filter(|end| *end <= self.toc_offset)
            .ok_or_else(|| {
                err(
                    &e.name,
                    format!("chunk offset {} outside the blob", e.offset),
                )
            })?;
        Ok(ChunkSpec {
            file_offset: e.chunk_offset,
            len,
            blob_range: e.offset..end,
            inner_offset: e.inner_offset,
            key,
        })
    }
}

fn apply_attrs(node: &mut Node, e: &TocEntry) -> Result<(), MetadataError> {
    node.perm = e.mode & 0o7777;
    node.uid = e.uid;
    node.gid = e.gid;
    node.mtime = parse_time(e)?;
    node.xattrs.retain(|(k, _)| k.as_ref() == OPAQUE_XATTR);
    for (name, value) in &e.xattrs {
        let value = base64::engine::general_purpose::STANDARD
            .decode(value)
            .map_err(|_| err(&e.name, format!("xattr {name:?} is not base64")))?;
        node.xattrs.push((name.as_str().into(), value.into()));
    }
    Ok(())
}

fn parse_time(e: &TocEntry) -> Result<SystemTime, MetadataError> {
    match &e.modtime {
        None => Ok(SystemTime::UNIX_EPOCH),
        Some(t) => humantime::parse_rfc3339_weak(t.trim_end_matches('Z'))
            .map_err(|_| err(&e.name, format!("bad modtime {t:?}"))),
    }
}

#[cfg(test)]
mod tests;
