//! The one place that wires lazy layers into the snapshotter: `LazyLayers` implements the
//! snapshotter's `RemoteFs` by resolving a layer in the registry, verifying its TOC, building
//! its index and mounting it with the `lazysnap-fuse` crate over `IndexSource`, an adapter from
//! the layer index and reader to the FUSE crate's `LayerSource`.
//!
//! Each mounted layer's TOC and description are kept under `<root>/layers/<digest>/`, so a
//! restarted daemon mounts its layers again without asking the registry.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::future::Future;
use std::ops::{ControlFlow, Range};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use lazysnap_fuse::{self as fuse, Attr, Device, DirEntry, FileKind, Ino, SourceError};
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;

use crate::cache::ChunkCache;
use crate::format::{self, FormatError, TocLocation};
use crate::layer::{BlobSource, LayerReader, LayerSource};
use crate::metadata::{LayerIndex, NodeKind};
use crate::registry::{Reference, RegistryClient};
use crate::snapshot::{Labels, RemoteError, RemoteFs, RemoteState};

/// What is saved about a mounted layer, and what `remount` needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LayerState {
    source: LayerSource,
    blob_size: u64,
    location: TocLocation,
}

struct Mounted {
    handle: fuse::MountHandle,
    reader: Arc<LayerReader>,
    digest: String,
}

/// Lazily pulled layers, mounted over FUSE.
pub struct LazyLayers {
    registry: RegistryClient,
    cache: Arc<ChunkCache>,
    layers_dir: PathBuf,
    runtime: Handle,
    read_timeout: Duration,
    mounted: Mutex<HashMap<PathBuf, Mounted>>,
}

impl LazyLayers {
    pub fn new(
        registry: RegistryClient,
        cache: Arc<ChunkCache>,
        layers_dir: PathBuf,
        runtime: Handle,
        read_timeout: Duration,
    ) -> Self {
        LazyLayers {
            registry,
            cache,
            layers_dir,
            runtime,
            read_timeout,
            mounted: Mutex::default(),
        }
    }

    fn layer_dir(&self, digest: &str) -> PathBuf {
        self.layers_dir.join(digest.replace(':', "-"))
    }

    /// Fetches and verifies the TOC: blob size, footer, TOC bytes.
    async fn resolve(
        &self,
        source: &LayerSource,
        toc_digest: &str,
    ) -> Result<(LayerState, Vec<u8>), RemoteError> {
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            RemoteError::Failed(format!("{what} of layer {}: {e}", source.digest))
        };
        let reference = Reference::parse(&source.reference).map_err(|e| failed("reference", &e))?;
        let blob_size = self
            .registry
            .blob_size(&reference, &source.digest)
            .await
            .map_err(|e| failed("size", &e))?;
        let tail_start = blob_size.saturating_sub(format::MAX_FOOTER);
        let tail = self
            .registry
            .read_range(&reference, &source.digest, tail_start..blob_size)
            .await
            .map_err(|e| failed("footer", &e))?;
        let location = format::locate_toc(&tail, blob_size).map_err(|e| match e {
            FormatError::NoFooter(_) => RemoteError::NotLazy(e.to_string()),
            e => failed("footer", &e),
        })?;
        let compressed = self
            .registry
            .read_range(
                &reference,
                &source.digest,
                location.offset..location.offset + location.len,
            )
            .await
            .map_err(|e| failed("TOC", &e))?;
        let json = format::read_toc(&location, &compressed, Some(toc_digest))
            .map_err(|e| failed("TOC", &e))?;
        Ok((
            LayerState {
                source: source.clone(),
                blob_size,
                location,
            },
            json,
        ))
    }

    fn save(&self, state: &LayerState, toc: &[u8]) -> Result<(), RemoteError> {
        let dir = self.layer_dir(&state.source.digest);
        let io = |e: std::io::Error| {
            RemoteError::Failed(format!("saving layer state in {}: {e}", dir.display()))
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        for (name, bytes) in [
            ("toc.json", toc.to_vec()),
            (
                "layer.json",
                serde_json::to_vec_pretty(state).map_err(|e| RemoteError::Failed(e.to_string()))?,
            ),
        ] {
            let tmp = dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, &bytes).map_err(io)?;
            std::fs::rename(&tmp, dir.join(name)).map_err(io)?;
        }
        Ok(())
    }

    fn mount_index(
        &self,
        mountpoint: &Path,
        state: &LayerState,
        toc: &[u8],
    ) -> Result<(), RemoteError> {
        let digest = &state.source.digest;
        let failed =
            |e: &dyn std::fmt::Display| RemoteError::Failed(format!("layer {digest}: {e}"));
        let toc = format::parse_toc(toc).map_err(|e| failed(&e))?;
        let index = LayerIndex::build(&toc, state.location.offset).map_err(|e| failed(&e))?;
        let reference = Reference::parse(&state.source.reference).map_err(|e| failed(&e))?;
        let blob = Arc::new(RegistryBlob {
            registry: self.registry.clone(),
            reference,
            digest: digest.clone(),
        });
        let reader = Arc::new(LayerReader::new(
            blob,
            state.location.compression,
            self.cache.clone(),
        ));
        let source = Arc::new(IndexSource {
            index,
            reader: reader.clone(),
        });
        let options = fuse::MountOptions {
            fsname: format!("lazysnap-{}", digest.replace(':', "-")),
            read_timeout: self.read_timeout,
            ..fuse::MountOptions::default()
        };
        let handle = fuse::mount(source, mountpoint, options, self.runtime.clone())
            .map_err(|e| failed(&format!("{e}: {:?}", std::error::Error::source(&e))))?;
        self.mounted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                mountpoint.to_path_buf(),
                Mounted {
                    handle,
                    reader,
                    digest: digest.clone(),
                },
            );
        Ok(())
    }
}

impl RemoteFs for LazyLayers {
    fn mount(&self, mountpoint: &Path, labels: &Labels) -> Result<RemoteState, RemoteError> {
        let source = LayerSource::from_labels(labels).ok_or_else(|| {
            RemoteError::NotLazy("labels name no image reference and layer digest".into())
        })?;
        let toc_digest = source.toc_digest.clone().ok_or_else(|| {
            RemoteError::NotLazy(format!(
                "layer {} has no TOC digest annotation to verify against",
                source.digest
            ))
        })?;
        let (state, toc) = self.runtime.block_on(self.resolve(&source, &toc_digest))?;
        self.save(&state, &toc)?;
        self.mount_index(mountpoint, &state, &toc)?;
        serde_json::to_value(&state).map_err(|e| RemoteError::Failed(e.to_string()))
    }

    fn remount(&self, mountpoint: &Path, state: &RemoteState) -> Result<(), RemoteError> {
        let state: LayerState = serde_json::from_value(state.clone())
            .map_err(|e| RemoteError::Failed(format!("saved layer state: {e}")))?;
        let path = self.layer_dir(&state.source.digest).join("toc.json");
        let toc = std::fs::read(&path)
            .map_err(|e| RemoteError::Failed(format!("{}: {e}", path.display())))?;
        // The saved TOC is checked again: a damaged file must not become a wrong layer.
        if let Some(expected) = &state.source.toc_digest {
            let actual = format!(
                "sha256:{}",
                hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&toc))
            );
            if &actual != expected {
                return Err(RemoteError::Failed(format!(
                    "{} is damaged (digest {actual})",
                    path.display()
                )));
            }
        }
        self.mount_index(mountpoint, &state, &toc)
    }

    fn unmount(&self, mountpoint: &Path) -> Result<(), RemoteError> {
        let mounted = self
            .mounted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(mountpoint);
        let Some(mounted) = mounted else {
            return Ok(());
        };
        let c = mounted.reader.counters();
        tracing::info!(
            layer = %mounted.digest,
            fetched_bytes = c.fetched_bytes.load(Ordering::Relaxed),
            fetches = c.fetches.load(Ordering::Relaxed),
            served_bytes = c.served_bytes.load(Ordering::Relaxed),
            chunk_hits = c.chunk_hits.load(Ordering::Relaxed),
            chunk_misses = c.chunk_misses.load(Ordering::Relaxed),
            "unmounting lazy layer"
        );
        let cache = self.cache.counters();
        let registry = self.registry.stats();
        tracing::debug!(
            memory_hits = cache.memory_hits.load(Ordering::Relaxed),
            disk_hits = cache.disk_hits.load(Ordering::Relaxed),
            misses = cache.misses.load(Ordering::Relaxed),
            corrupt = cache.corrupt.load(Ordering::Relaxed),
            registry_requests = registry.requests.load(Ordering::Relaxed),
            registry_bytes = registry.bytes.load(Ordering::Relaxed),
            registry_retries = registry.retries.load(Ordering::Relaxed),
            "totals"
        );
        mounted
            .handle
            .unmount()
            .map_err(|e| RemoteError::Failed(format!("unmount {}: {e}", mountpoint.display())))
    }
}

/// Ranged reads of one layer blob from its registry.
struct RegistryBlob {
    registry: RegistryClient,
    reference: Reference,
    digest: String,
}

impl BlobSource for RegistryBlob {
    fn read_range(
        &self,
        range: Range<u64>,
    ) -> Pin<Box<dyn Future<Output = Result<Bytes, String>> + Send + '_>> {
        Box::pin(async move {
            let started = std::time::Instant::now();
            let len = range.end - range.start;
            let result = self
                .registry
                .read_range(&self.reference, &self.digest, range)
                .await
                .map_err(|e| e.to_string());
            tracing::debug!(layer = %self.digest, bytes = len, elapsed = ?started.elapsed(), ok = result.is_ok(), "fetched chunk range");
            result
        })
    }
}

/// The FUSE crate's view of a layer: metadata from the index, bytes from the reader.
struct IndexSource {
    index: LayerIndex,
    reader: Arc<LayerReader>,
}

impl IndexSource {
    fn node(&self, ino: Ino) -> Result<&crate::metadata::Node, SourceError> {
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

    fn read(
        &self,
        ino: Ino,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Bytes, SourceError>> + Send {
        let end = offset + u64::from(len);
        async move {
            let chunks = self.index.chunks_for(ino.0, offset, end);
            self.reader.read(chunks, offset..end).await.map_err(|e| {
                tracing::warn!(ino = ino.0, offset, len, error = %e, "read failed");
                SourceError::io(e)
            })
        }
    }
}
