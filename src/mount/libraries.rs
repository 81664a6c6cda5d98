//! Fetching the shared libraries of a program as soon as its first bytes are read, instead of
//! one round trip per library as the dynamic loader opens them in turn.
//!
//! A container's read of the start of an ELF file names the file; a task then reads (fetches,
//! at readahead priority) the file's dynamic section and string table, takes the libraries
//! it needs (`DT_NEEDED`) and looks each up in the usual library directories of the mounted
//! layers of the same image, topmost layer first, following symlinks; each found library of
//! at most [`MAX_LIBRARY_BYTES`] compressed is fetched whole. A library's own libraries follow
//! when the loader reads its start. Bounded by configuration (`[prefetch] shared_libraries`,
//! the most libraries per file) and by constants here; no container read waits for any of it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;

use crate::chunk::ChunkSpec;
use crate::layer::{LayerReader, Priority};
use crate::metadata::{LayerIndex, NodeKind};
use crate::prefetch::elf;

/// The most of a dynamic section read (real ones are a few hundred bytes).
const MAX_DYNAMIC_BYTES: u64 = 64 << 10;
/// The most of a string table read (a big program's exports make it a few hundred KiB).
const MAX_STRING_BYTES: u64 = 1 << 20;
/// A library bigger than this (compressed) is left to the reads of the loader.
const MAX_LIBRARY_BYTES: u64 = 16 << 20;
/// Files per layer whose libraries were looked for; past it the set starts over (a cheap
/// bound: a file looked at twice costs a few cached reads).
const MAX_SEEN: usize = 4096;
/// Symlinks followed from a library's name to its file.
const MAX_HOPS: usize = 8;
/// Where libraries are looked for, and in each, its multiarch subdirectories
/// (`x86_64-linux-gnu`, `aarch64-linux-gnu`...).
const LIBRARY_DIRS: [&str; 5] = ["lib", "usr/lib", "lib64", "usr/lib64", "usr/local/lib"];

/// One mounted layer, as the lookup sees it.
struct Layer {
    reference: String,
    index: Weak<LayerIndex>,
    reader: Weak<LayerReader>,
}

/// The mounted layers of every image, bottom to top as containerd prepares them.
#[derive(Default)]
pub struct ImageLayers {
    layers: Mutex<Vec<Layer>>,
}

impl ImageLayers {
    /// Adds a layer mounted for image `reference`; layers unmounted since drop out.
    pub fn add(&self, reference: &str, index: &Arc<LayerIndex>, reader: &Arc<LayerReader>) {
        let mut layers = self.layers.lock().unwrap_or_else(|p| p.into_inner());
        layers.retain(|l| l.index.strong_count() > 0 && l.reader.strong_count() > 0);
        layers.push(Layer {
            reference: reference.to_owned(),
            index: Arc::downgrade(index),
            reader: Arc::downgrade(reader),
        });
    }

    /// The layers of `reference`, topmost first.
    fn of(&self, reference: &str) -> Vec<(Arc<LayerIndex>, Arc<LayerReader>)> {
        let layers = self.layers.lock().unwrap_or_else(|p| p.into_inner());
        layers
            .iter()
            .rev()
            .filter(|l| l.reference == reference)
            .filter_map(|l| Some((l.index.upgrade()?, l.reader.upgrade()?)))
            .collect()
    }
}

/// The shared-library prefetch of one mounted layer.
pub struct SharedLibraries {
    image: Arc<ImageLayers>,
    reference: String,
    /// The most libraries fetched for one file.
    max: usize,
    seen: Mutex<HashSet<u64>>,
}

impl SharedLibraries {
    pub fn new(image: Arc<ImageLayers>, reference: String, max: usize) -> Self {
        SharedLibraries {
            image,
            reference,
            max,
            seen: Mutex::default(),
        }
    }

    /// Whether the libraries of file `ino`, whose first bytes a container just read as
    /// `head`, are still to be looked for; true at most once per file.
    pub fn wants(&self, ino: u64, offset: u64, head: &[u8]) -> bool {
        if self.max == 0 || offset != 0 || !elf::is_elf(head) {
            return false;
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= MAX_SEEN {
            seen.clear();
        }
        seen.insert(ino)
    }

    /// Fetches the libraries file `ino` of this layer needs; `head` is its first bytes.
    pub async fn fetch_needed(
        &self,
        index: Arc<LayerIndex>,
        reader: Arc<LayerReader>,
        ino: u64,
        head: Bytes,
    ) {
        let Some(dynamic) = elf::dynamic_section(&head, MAX_DYNAMIC_BYTES) else {
            return;
        };
        let layers = self.image.of(&self.reference);
        let Some(section) = file_bytes(&index, &reader, ino, dynamic.range.clone()).await else {
            return;
        };
        let Some(strings) = elf::string_table(&dynamic, &section, MAX_STRING_BYTES) else {
            return;
        };
        let Some(strings) = file_bytes(&index, &reader, ino, strings).await else {
            return;
        };
        let names = elf::needed(&section, &strings, self.max);
        let mut warms = Vec::new();
        for name in &names {
            let Some((reader, chunks)) = find_library(&layers, name) else {
                tracing::debug!(library = %name, "needed library not found in the image's layers");
                continue;
            };
            if reader.is_cached(&chunks) {
                continue;
            }
            warms.push(async move {
                if let Err(e) = reader.warm(&chunks, Priority::Readahead).await {
                    tracing::debug!(error = %crate::error_chain(&e), "fetching a needed library failed");
                }
            });
        }
        tracing::debug!(
            ino,
            needed = names.len(),
            fetching = warms.len(),
            "fetching a program's libraries"
        );
        futures_util::future::join_all(warms).await;
    }
}

/// Bytes `range` of file `ino`, fetched first if need be (at readahead priority: a
/// container's loader is about to read them).
async fn file_bytes(
    index: &LayerIndex,
    reader: &LayerReader,
    ino: u64,
    range: std::ops::Range<u64>,
) -> Option<Bytes> {
    let size = index.node(ino)?.size;
    let range = range.start.min(size)..range.end.min(size);
    if range.is_empty() {
        return None;
    }
    let chunks = index.chunks_for(ino, range.start, range.end);
    reader.warm(chunks, Priority::Readahead).await.ok()?;
    reader.peek_local(chunks, range)
}

/// The reader and chunks of library `name` in the topmost layer that has it.
fn find_library(
    layers: &[(Arc<LayerIndex>, Arc<LayerReader>)],
    name: &str,
) -> Option<(Arc<LayerReader>, Vec<ChunkSpec>)> {
    library_dirs(layers)
        .into_iter()
        .find_map(|dir| find_file(layers, &format!("{dir}/{name}")))
}

/// The reader and chunks of the regular file at `path` (relative to the root), taking each
/// component from the topmost layer that has it and following symlinks on the way (a
/// merged-/usr image's `lib64` is one); `None` for a file over [`MAX_LIBRARY_BYTES`].
fn find_file(
    layers: &[(Arc<LayerIndex>, Arc<LayerReader>)],
    path: &str,
) -> Option<(Arc<LayerReader>, Vec<ChunkSpec>)> {
    let mut path = normalise(path)?;
    'hops: for _ in 0..MAX_HOPS {
        let parts: Vec<&str> = path.split('/').collect();
        for k in 1..=parts.len() {
            let prefix = parts[..k].join("/");
            let (index, reader, ino) = layers
                .iter()
                .find_map(|(i, r)| i.resolve(&prefix).map(|ino| (i, r, ino)))?;
            let node = index.node(ino)?;
            match node.kind {
                NodeKind::File if k == parts.len() => {
                    let compressed: u64 = node
                        .chunks
                        .iter()
                        .map(|c| c.blob_range.end.saturating_sub(c.blob_range.start))
                        .sum();
                    if node.chunks.is_empty() || compressed > MAX_LIBRARY_BYTES {
                        return None;
                    }
                    return Some((reader.clone(), node.chunks.clone()));
                }
                NodeKind::Symlink => {
                    let target = std::str::from_utf8(&node.link_target).ok()?;
                    let parent = parts[..k - 1].join("/");
                    let rest = parts[k..].join("/");
                    let joined = match target.strip_prefix('/') {
                        Some(absolute) => format!("{absolute}/{rest}"),
                        None => format!("{parent}/{target}/{rest}"),
                    };
                    path = normalise(&joined)?;
                    continue 'hops;
                }
                NodeKind::Dir if k < parts.len() => {}
                _ => return None,
            }
        }
        return None;
    }
    None
}

/// `path` without `.` and with `..` applied; `None` if it climbs above the root.
fn normalise(path: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

/// The library directories present in any of `layers`, multiarch subdirectories first.
fn library_dirs(layers: &[(Arc<LayerIndex>, Arc<LayerReader>)]) -> Vec<String> {
    let mut dirs = Vec::new();
    for base in LIBRARY_DIRS {
        for (index, _) in layers {
            let Some(node) = index.resolve(base).and_then(|d| index.node(d)) else {
                continue;
            };
            for (name, _) in &node.children {
                let Ok(name) = std::str::from_utf8(name) else {
                    continue;
                };
                let dir = format!("{base}/{name}");
                if name.contains("-linux-") && !dirs.contains(&dir) {
                    dirs.push(dir);
                }
            }
        }
    }
    dirs.extend(LIBRARY_DIRS.iter().map(|d| (*d).to_owned()));
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::LocalStore;
    use crate::chunk::BlobId;
    use crate::layer::Fetches;
    use crate::test_utils::{gzip_index_layer, FixtureBlob};
    use std::sync::atomic::Ordering;

    /// A gzip-index layer of `files` with its reader (each file in a span of its own).
    fn layer(
        files: &[(String, Vec<u8>)],
        dir: &std::path::Path,
    ) -> (Arc<LayerIndex>, Arc<LayerReader>, Arc<FixtureBlob>) {
        let (blob, digest, opened, windows) = gzip_index_layer(files, 64);
        let blob = Arc::new(FixtureBlob {
            blob,
            ..FixtureBlob::default()
        });
        let index = Arc::new(opened.index);
        let reader = Arc::new(
            LayerReader::new(
                blob.clone(),
                BlobId::new(&digest, None),
                opened.decoder,
                Arc::new(LocalStore::open(dir, 0).expect("store")),
                Arc::new(Fetches::new(2)),
            )
            .with_side(Some(windows)),
        );
        (index, reader, blob)
    }

    #[tokio::test]
    async fn a_program_brings_the_libraries_it_needs_from_the_layers_below() {
        let dirs = [
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        ];
        let lib = "usr/lib/x86_64-linux-gnu/libfoo.so.1";
        let (lower_index, lower_reader, lower_blob) = layer(
            &[
                (lib.to_owned(), b"library bytes ".repeat(500)),
                (
                    "lib64/ld-test.so.2".to_owned(),
                    b"loader bytes ".repeat(500),
                ),
                (
                    "usr/lib/x86_64-linux-gnu/libunused.so.1".to_owned(),
                    b"other ".repeat(500),
                ),
            ],
            dirs[0].path(),
        );
        let program = elf::test_object(&["libfoo.so.1", "libmissing.so.2"]);
        let (index, reader, _) = layer(
            &[("usr/bin/prog".to_owned(), program.clone())],
            dirs[1].path(),
        );
        let image = Arc::new(ImageLayers::default());
        image.add("registry/app:1", &lower_index, &lower_reader);
        image.add("registry/app:1", &index, &reader);
        let other = tempfile::tempdir().expect("tempdir");
        let (other_index, other_reader, other_blob) =
            layer(&[(lib.to_owned(), b"x".repeat(100))], other.path());
        image.add("registry/other:1", &other_index, &other_reader);

        let libraries = SharedLibraries::new(image, "registry/app:1".into(), 8);
        let ino = index.resolve("usr/bin/prog").expect("program");
        let head = Bytes::from(program[..256.min(program.len())].to_vec());
        assert!(libraries.wants(ino, 0, &head));
        libraries
            .fetch_needed(index.clone(), reader.clone(), ino, head)
            .await;

        let found = lower_index.resolve(lib).expect("library");
        let chunks = &lower_index.node(found).expect("node").chunks;
        assert!(
            lower_reader.is_cached(chunks),
            "the needed library was fetched"
        );
        let unused = lower_index
            .resolve("usr/lib/x86_64-linux-gnu/libunused.so.1")
            .expect("unused");
        assert!(
            !lower_reader.is_cached(&lower_index.node(unused).expect("node").chunks),
            "a library nobody needs was not"
        );
        assert_eq!(
            other_blob.requests.load(Ordering::SeqCst),
            0,
            "another image's layers are not looked at"
        );
        assert!(lower_blob.requests.load(Ordering::SeqCst) > 0);
        assert_eq!(
            reader.counters().read_chunk_bytes.load(Ordering::Relaxed),
            0,
            "reading the program's headers counts as no container's read"
        );
    }

    #[test]
    fn paths_are_normalised_within_the_root() {
        assert_eq!(
            normalise("usr/lib/x86_64-linux-gnu/../libz.so.1").as_deref(),
            Some("usr/lib/libz.so.1")
        );
        assert_eq!(normalise("./lib//a.so").as_deref(), Some("lib/a.so"));
        assert_eq!(normalise("lib/../../etc"), None);
    }

    #[test]
    fn at_most_once_per_file_and_only_elf_starts() {
        let libs = SharedLibraries::new(Arc::default(), "r".into(), 8);
        assert!(libs.wants(7, 0, b"\x7fELF\x02\x01"));
        assert!(!libs.wants(7, 0, b"\x7fELF\x02\x01"), "once");
        assert!(!libs.wants(8, 4096, b"\x7fELF\x02\x01"), "not the start");
        assert!(!libs.wants(9, 0, b"#!/bin/sh"), "not ELF");
        let off = SharedLibraries::new(Arc::default(), "r".into(), 0);
        assert!(!off.wants(7, 0, b"\x7fELF\x02\x01"), "0 turns it off");
    }
}
