//! The FUSE crate's view of a lazy layer: metadata from the layer index, bytes from the layer
//! reader; reads and name requests are also shown to the trace recorder, and reads to the
//! readahead detector.

use std::ffi::{OsStr, OsString};
use std::future::Future;
use std::ops::ControlFlow;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use bytes::Bytes;
use lazysnap_fuse::{self as fuse, Attr, Device, DirEntry, FileKind, Ino, ReadBuf, SourceError};
use tokio::runtime::Handle;

use super::libraries::SharedLibraries;
use super::MountTasks;
use crate::layer::{LayerReader, Priority};
use crate::metadata::{LayerIndex, Node, NodeKind};
use crate::prefetch::{NameOp, ReadRecorder, Readahead};

/// One mounted layer, as the FUSE crate's `LayerSource`.
pub struct IndexSource {
    index: Arc<LayerIndex>,
    reader: Arc<LayerReader>,
    recorder: Option<Arc<ReadRecorder>>,
    readahead: Readahead,
    runtime: Handle,
    /// Readahead runs here, owned by the mount and ended with it.
    tasks: MountTasks,
    libraries: Option<Arc<SharedLibraries>>,
}

impl IndexSource {
    pub fn new(
        index: Arc<LayerIndex>,
        reader: Arc<LayerReader>,
        recorder: Option<Arc<ReadRecorder>>,
        readahead: Readahead,
        runtime: Handle,
        tasks: MountTasks,
    ) -> Self {
        IndexSource {
            index,
            reader,
            recorder,
            readahead,
            runtime,
            tasks,
            libraries: None,
        }
    }

    /// Makes a read of the start of a program or library fetch the libraries it needs.
    pub fn with_libraries(mut self, libraries: Arc<SharedLibraries>) -> Self {
        self.libraries = Some(libraries);
        self
    }

    /// After a container read `data` at `offset` of file `ino`: when that is the start of
    /// an ELF file not looked at before, fetches its libraries in the background.
    fn after_read(&self, ino: u64, offset: u64, data: &[u8]) {
        let Some(libraries) = &self.libraries else {
            return;
        };
        if !libraries.wants(ino, offset, data) {
            return;
        }
        let (libraries, index, reader, head) = (
            libraries.clone(),
            self.index.clone(),
            self.reader.clone(),
            Bytes::copy_from_slice(data),
        );
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        while tasks.try_join_next().is_some() {}
        tasks.spawn_on(
            async move { libraries.fetch_needed(index, reader, ino, head).await },
            &self.runtime,
        );
    }

    /// Starts fetching ahead of a sequential reader, without waiting for it: the read itself
    /// goes on at once, and the next ones find their chunks cached or in flight.
    fn read_ahead(&self, ino: u64, offset: u64, end: u64) {
        let Some(size) = self.index.node(ino).map(|n| n.size) else {
            return;
        };
        let Some(ahead) = self.readahead.on_read(ino, offset..end.min(size), size) else {
            return;
        };
        let chunks = self.index.chunks_for(ino, ahead.start, ahead.end);
        if chunks.is_empty() || self.reader.is_cached(chunks) {
            return;
        }
        let chunks = chunks.to_vec();
        let reader = self.reader.clone();
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        // Finished readaheads are reaped here, so the set holds only what still runs.
        while tasks.try_join_next().is_some() {}
        tasks.spawn_on(
            async move {
                if let Err(e) = reader.warm(&chunks, Priority::Readahead).await {
                    tracing::debug!(ino, error = %crate::error_chain(&e), "readahead failed");
                }
            },
            &self.runtime,
        );
    }

    fn node(&self, ino: Ino) -> Result<&Node, SourceError> {
        self.index.node(ino.0).ok_or(SourceError::NotFound)
    }

    fn attr(&self, ino: Ino) -> Result<Attr, SourceError> {
        let n = self.node(ino)?;
        let kind = file_kind(n.kind);
        // Directories report the size ext4 gives an empty one, like an unpacked layer.
        let size = if n.kind == NodeKind::Dir {
            4096
        } else {
            n.size
        };
        Ok(Attr {
            ino,
            kind,
            perm: (n.perm & 0o7777) as u16,
            nlink: n.nlink,
            uid: n.uid,
            gid: n.gid,
            rdev: Device {
                major: n.rdev.0,
                minor: n.rdev.1,
            },
            size,
            blocks: Attr::blocks_for(size),
            mtime: n.mtime,
        })
    }
}

fn file_kind(kind: NodeKind) -> FileKind {
    match kind {
        NodeKind::Dir => FileKind::Directory,
        NodeKind::File => FileKind::RegularFile,
        NodeKind::Symlink => FileKind::Symlink,
        NodeKind::CharDevice => FileKind::CharDevice,
        NodeKind::BlockDevice => FileKind::BlockDevice,
        NodeKind::Fifo => FileKind::Fifo,
    }
}

impl fuse::LayerSource for IndexSource {
    fn lookup(&self, parent: Ino, name: &OsStr) -> Result<Attr, SourceError> {
        if self.node(parent)?.kind != NodeKind::Dir {
            return Err(SourceError::NotDirectory);
        }
        let ino = self
            .index
            .lookup(parent.0, name)
            .ok_or(SourceError::NotFound)?;
        self.attr(Ino(ino))
    }

    fn getattr(&self, ino: Ino) -> Result<Attr, SourceError> {
        self.attr(ino)
    }

    /// Counts the request and shows it to the recorder. A lookup counts found or not: a name
    /// missing here is one overlayfs asks of every layer above the one that has it, and the
    /// kernel keeps that answer too.
    fn kernel_asked(&self, request: fuse::NameRequest<'_>) {
        self.reader
            .counters()
            .name_requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some(recorder) = &self.recorder else {
            return;
        };
        match request {
            fuse::NameRequest::Lookup { parent, name } => {
                recorder.record_name(NameOp::Lookup, parent.0, name.as_bytes())
            }
            fuse::NameRequest::List(dir) => recorder.record_name(NameOp::List, dir.0, b""),
            fuse::NameRequest::Readlink(ino) => recorder.record_name(NameOp::Readlink, ino.0, b""),
        }
    }

    fn readdir(
        &self,
        dir: Ino,
        offset: u64,
        add: &mut dyn FnMut(DirEntry<'_>) -> ControlFlow<()>,
    ) -> Result<(), SourceError> {
        let node = self.node(dir)?;
        if node.kind != NodeKind::Dir {
            return Err(SourceError::NotDirectory);
        }
        for (name, child) in node.children.iter().skip(offset as usize) {
            let kind = self
                .index
                .node(*child)
                .map_or(FileKind::RegularFile, |n| file_kind(n.kind));
            let entry = DirEntry {
                ino: Ino(*child),
                kind,
                name: OsStr::from_bytes(name),
            };
            if add(entry).is_break() {
                break;
            }
        }
        Ok(())
    }

    fn readlink(&self, ino: Ino) -> Result<OsString, SourceError> {
        let node = self.node(ino)?;
        if node.kind != NodeKind::Symlink {
            return Err(SourceError::NotSymlink);
        }
        Ok(OsStr::from_bytes(&node.link_target).to_owned())
    }

    fn listxattr(&self, ino: Ino) -> Result<Vec<OsString>, SourceError> {
        Ok(self
            .node(ino)?
            .xattrs
            .iter()
            .map(|(k, _)| OsString::from(k.as_ref()))
            .collect())
    }

    fn getxattr(&self, ino: Ino, name: &OsStr) -> Result<Bytes, SourceError> {
        self.node(ino)?
            .xattrs
            .iter()
            .find(|(k, _)| k.as_bytes() == name.as_bytes())
            .map(|(_, v)| Bytes::copy_from_slice(v))
            .ok_or(SourceError::NoAttribute)
    }

    fn has_xattrs(&self) -> bool {
        self.index
            .inodes()
            .filter_map(|ino| self.index.node(ino))
            .any(|node| !node.xattrs.is_empty())
    }

    const READS_LOCALLY: bool = true;

    fn read_local(
        &self,
        ino: Ino,
        offset: u64,
        len: u32,
        buf: &mut ReadBuf,
    ) -> Option<Result<(), SourceError>> {
        let end = offset + u64::from(len);
        let chunks = self.index.chunks_for(ino.0, offset, end);
        self.reader.read_local(chunks, offset..end, buf)?;
        if let Some(recorder) = &self.recorder {
            recorder.record(ino.0, chunks);
        }
        // A sequential reader's next chunks may still be missing.
        self.read_ahead(ino.0, offset, end);
        self.after_read(ino.0, offset, buf.answer());
        Some(Ok(()))
    }

    fn backing_file(&self, ino: Ino) -> Option<std::fs::File> {
        let node = self.index.node(ino.0)?;
        if node.kind != NodeKind::File || node.chunks.is_empty() {
            return None;
        }
        let file = self.reader.backing_file(&node.chunks)?;
        // Reads of a passthrough file never reach us: count the open as a read of its start,
        // so a trace recorded on a warm node still lists the file.
        if let Some(recorder) = &self.recorder {
            recorder.record(ino.0, &node.chunks[..1]);
        }
        Some(file)
    }

    fn read(
        &self,
        ino: Ino,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Bytes, SourceError>> + Send {
        let end = offset + u64::from(len);
        let chunks = self.index.chunks_for(ino.0, offset, end);
        if let Some(recorder) = &self.recorder {
            recorder.record(ino.0, chunks);
        }
        self.read_ahead(ino.0, offset, end);
        async move {
            let data = self.reader.read(chunks, offset..end).await.map_err(|e| {
                tracing::warn!(ino = ino.0, offset, len, error = %crate::error_chain(&e), "read failed");
                SourceError::io(e)
            })?;
            self.after_read(ino.0, offset, &data);
            Ok(data)
        }
    }
}
