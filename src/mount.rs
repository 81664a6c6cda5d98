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

use crate::cache::{ChunkCache, Evicted};
use crate::config::PrefetchConfig;
use crate::format::{self, FormatError, TocLocation};
use crate::layer::{
    unix_ms, BlobSource, Fetches, LayerCounters, LayerReader, LayerSource, Priority,
};
use crate::metadata::{LayerIndex, NodeKind};
use crate::prefetch::{Activity, ActivityCell, MountPlan, ReadRecorder, Readahead, TraceStore};
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
    index: Arc<LayerIndex>,
    digest: String,
    reference: String,
    mounted_unix_ms: u64,
    activity: Arc<ActivityCell>,
    recorder: Option<Arc<ReadRecorder>>,
    /// Prefetch and trace recording; aborted at unmount.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Where lazy layers keep their state, and how they behave.
#[derive(Debug, Clone)]
pub struct LazyOptions {
    /// `<root>/layers`: each layer's saved TOC and description.
    pub layers_dir: PathBuf,
    /// A container's read that cannot be served in this time fails with EIO.
    pub read_timeout: Duration,
    pub prefetch: PrefetchConfig,
}

/// Figures of one layer since the daemon started, kept when it is unmounted.
#[derive(Debug, Default, Clone, Copy)]
struct Retired {
    fetched_bytes: u64,
    fetched_chunks: u64,
    last_access_ms: u64,
}

/// Totals over every lazy layer since the daemon started.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub fetched_bytes: u64,
    pub fetches: u64,
    pub served_bytes: u64,
    pub prefetch_bytes: u64,
    pub prefetch_used_bytes: u64,
    pub demand_network_reads: u64,
}

impl Totals {
    fn add(&mut self, c: &LayerCounters) {
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        self.fetched_bytes += get(&c.fetched_bytes);
        self.fetches += get(&c.fetches);
        self.served_bytes += get(&c.served_bytes);
        self.prefetch_bytes += get(&c.prefetch_bytes);
        self.prefetch_used_bytes += get(&c.prefetch_used_bytes);
        self.demand_network_reads += get(&c.demand_network_reads);
    }
}

/// The cache and fetch figures of the whole node, for `lazysnap cache stats` and metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub totals: Totals,
    pub memory_hits: u64,
    pub disk_hits: u64,
    pub misses: u64,
    pub corrupt: u64,
    pub disk_used_bytes: u64,
    pub disk_entries: u64,
    /// 0 = no budget.
    pub disk_budget_bytes: u64,
    pub memory_used_bytes: u64,
    pub memory_entries: u64,
    pub evicted: Evicted,
}

impl Stats {
    /// Cache lookups answered from memory or disk, of all lookups; 0 when there were none.
    pub fn hit_ratio(&self) -> f64 {
        let hits = self.memory_hits + self.disk_hits;
        let lookups = hits + self.misses;
        if lookups == 0 {
            0.0
        } else {
            hits as f64 / lookups as f64
        }
    }
}

/// One layer this node knows (mounted now or saved from before), for `lazysnap cache ls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerReport {
    pub digest: String,
    pub references: Vec<String>,
    pub cached_bytes: u64,
    pub layer_bytes: u64,
    pub cached_chunks: u64,
    pub total_chunks: u64,
    pub fetched_bytes: u64,
    pub fetched_chunks: u64,
    pub last_access_unix_ms: u64,
    pub trace_present: bool,
    pub mounted: bool,
}

/// One mount of a lazy layer, for `lazysnap mounts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountReport {
    pub digest: String,
    pub reference: String,
    pub mountpoint: PathBuf,
    pub activity: Activity,
    pub mounted_unix_ms: u64,
    pub fetched_bytes: u64,
    pub served_bytes: u64,
}

/// Lazily pulled layers, mounted over FUSE.
pub struct LazyLayers {
    registry: RegistryClient,
    cache: Arc<ChunkCache>,
    traces: Arc<TraceStore>,
    fetches: Arc<Fetches>,
    options: LazyOptions,
    runtime: Handle,
    mounted: Mutex<HashMap<PathBuf, Mounted>>,
    /// Per layer digest: figures of its mounts that are gone, so totals never go backwards.
    retired: Mutex<HashMap<String, Retired>>,
    retired_totals: Mutex<Totals>,
}

impl LazyLayers {
    pub fn new(
        registry: RegistryClient,
        cache: Arc<ChunkCache>,
        traces: Arc<TraceStore>,
        options: LazyOptions,
        runtime: Handle,
    ) -> Self {
        LazyLayers {
            registry,
            cache,
            traces,
            fetches: Arc::new(Fetches::new(options.prefetch.concurrency)),
            options,
            runtime,
            mounted: Mutex::default(),
            retired: Mutex::default(),
            retired_totals: Mutex::default(),
        }
    }

    fn layer_dir(&self, digest: &str) -> PathBuf {
        self.options.layers_dir.join(digest.replace(':', "-"))
    }

    fn mounted(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Mounted>> {
        self.mounted.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn registry(&self) -> &RegistryClient {
        &self.registry
    }

    pub fn cache(&self) -> &Arc<ChunkCache> {
        &self.cache
    }

    pub fn traces(&self) -> &Arc<TraceStore> {
        &self.traces
    }

    pub fn fetches(&self) -> &Arc<Fetches> {
        &self.fetches
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

    /// The saved TOC of a layer, checked again: a damaged file must not become a wrong layer.
    fn saved_toc(&self, state: &LayerState) -> Result<Vec<u8>, RemoteError> {
        let path = self.layer_dir(&state.source.digest).join("toc.json");
        let toc = std::fs::read(&path)
            .map_err(|e| RemoteError::Failed(format!("{}: {e}", path.display())))?;
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
        Ok(toc)
    }

    fn saved_state(&self, dir: &Path) -> Result<LayerState, RemoteError> {
        let path = dir.join("layer.json");
        let text = std::fs::read(&path)
            .map_err(|e| RemoteError::Failed(format!("{}: {e}", path.display())))?;
        serde_json::from_slice(&text)
            .map_err(|e| RemoteError::Failed(format!("{}: {e}", path.display())))
    }

    fn build_index(state: &LayerState, toc: &[u8]) -> Result<LayerIndex, RemoteError> {
        let failed = |e: &dyn std::fmt::Display| {
            RemoteError::Failed(format!("layer {}: {e}", state.source.digest))
        };
        let toc = format::parse_toc(toc).map_err(|e| failed(&e))?;
        LayerIndex::build(&toc, state.location.offset).map_err(|e| failed(&e))
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
        let index = Arc::new(Self::build_index(state, toc)?);
        let reference = Reference::parse(&state.source.reference).map_err(|e| failed(&e))?;
        let blob = Arc::new(RegistryBlob {
            registry: self.registry.clone(),
            reference,
            digest: digest.clone(),
        });
        let prefetch = &self.options.prefetch;
        let reader = Arc::new(
            LayerReader::new(
                blob,
                state.location.compression,
                self.cache.clone(),
                self.fetches.clone(),
            )
            .with_neighbours(
                Arc::from(crate::prefetch::plan_all(&index)),
                prefetch.amplify_bytes,
            ),
        );
        let recorder = (!prefetch.trace_window.is_zero()).then(|| {
            Arc::new(ReadRecorder::new(
                prefetch.trace_window,
                prefetch.max_trace_entries,
            ))
        });
        let source = Arc::new(IndexSource {
            index: index.clone(),
            reader: reader.clone(),
            recorder: recorder.clone(),
            readahead: Readahead::new(prefetch.readahead_max_bytes),
            runtime: self.runtime.clone(),
        });
        let options = fuse::MountOptions {
            fsname: format!("lazysnap-{}", digest.replace(':', "-")),
            read_timeout: self.options.read_timeout,
            ..fuse::MountOptions::default()
        };
        let handle = fuse::mount(source, mountpoint, options, self.runtime.clone())
            .map_err(|e| failed(&format!("{e}: {:?}", std::error::Error::source(&e))))?;
        let activity = Arc::new(ActivityCell::default());
        let mut tasks = Vec::new();
        if prefetch.enabled {
            let plan = MountPlan {
                trace: true,
                landmarks: prefetch.landmarks,
                background: prefetch.background_fetch,
                concurrency: prefetch.concurrency,
            };
            let trace = self.traces.load(digest);
            activity.set(Activity::Prefetching);
            tasks.push(self.runtime.spawn(crate::prefetch::after_mount(
                digest.clone(),
                reader.clone(),
                index.clone(),
                trace,
                plan,
                activity.clone(),
            )));
        }
        if let Some(recorder) = &recorder {
            // Saved every few seconds, so a trace is there soon after a container's start even
            // if the daemon is killed before the window ends.
            let interval = prefetch.trace_window.min(Duration::from_secs(2));
            tasks.push(self.runtime.spawn(crate::prefetch::record_trace(
                digest.clone(),
                recorder.clone(),
                index.clone(),
                self.traces.clone(),
                interval,
            )));
        }
        self.mounted().insert(
            mountpoint.to_path_buf(),
            Mounted {
                handle,
                reader,
                index,
                digest: digest.clone(),
                reference: state.source.reference.clone(),
                mounted_unix_ms: unix_ms(),
                activity,
                recorder,
                tasks,
            },
        );
        Ok(())
    }

    /// Totals over every lazy layer since the daemon started.
    pub fn totals(&self) -> Totals {
        let mut totals = *self
            .retired_totals
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for m in self.mounted().values() {
            totals.add(m.reader.counters());
        }
        totals
    }

    /// The cache and fetch figures of the whole node.
    pub fn stats(&self) -> Stats {
        let c = self.cache.counters();
        let disk = self.cache.disk();
        let (disk_used_bytes, disk_entries) = disk.usage();
        let (memory_used_bytes, memory_entries) = self.cache.memory_usage();
        Stats {
            totals: self.totals(),
            memory_hits: c.memory_hits.load(Ordering::Relaxed),
            disk_hits: c.disk_hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            corrupt: c.corrupt.load(Ordering::Relaxed),
            disk_used_bytes,
            disk_entries,
            disk_budget_bytes: disk.budget(),
            memory_used_bytes,
            memory_entries,
            evicted: disk.evicted(),
        }
    }

    /// The lazy layers mounted now.
    pub fn mounts(&self) -> Vec<MountReport> {
        let mut out: Vec<MountReport> = self
            .mounted()
            .iter()
            .map(|(point, m)| {
                let c = m.reader.counters();
                MountReport {
                    digest: m.digest.clone(),
                    reference: m.reference.clone(),
                    mountpoint: point.clone(),
                    activity: m.activity.get(),
                    mounted_unix_ms: m.mounted_unix_ms,
                    fetched_bytes: c.fetched_bytes.load(Ordering::Relaxed),
                    served_bytes: c.served_bytes.load(Ordering::Relaxed),
                }
            })
            .collect();
        out.sort_by(|a, b| a.mountpoint.cmp(&b.mountpoint));
        out
    }

    /// Every layer this node has saved, with what of it is cached. Reads each unmounted
    /// layer's saved TOC: for the operator's occasional look, not for a hot path.
    pub fn layers(&self) -> Vec<LayerReport> {
        struct Live {
            index: Arc<LayerIndex>,
            references: Vec<String>,
            fetched_bytes: u64,
            fetched_chunks: u64,
            last_access_ms: u64,
        }
        let mut live: HashMap<String, Live> = HashMap::new();
        for m in self.mounted().values() {
            let c = m.reader.counters();
            let entry = live.entry(m.digest.clone()).or_insert_with(|| Live {
                index: m.index.clone(),
                references: Vec::new(),
                fetched_bytes: 0,
                fetched_chunks: 0,
                last_access_ms: 0,
            });
            if !entry.references.contains(&m.reference) {
                entry.references.push(m.reference.clone());
            }
            entry.fetched_bytes += c.fetched_bytes.load(Ordering::Relaxed);
            entry.fetched_chunks += c.chunk_misses.load(Ordering::Relaxed);
            entry.last_access_ms = entry
                .last_access_ms
                .max(c.last_access_ms.load(Ordering::Relaxed))
                .max(m.mounted_unix_ms);
        }
        let retired = self
            .retired
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.options.layers_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            let state = match self.saved_state(&entry.path()) {
                Ok(state) => state,
                Err(e) => {
                    tracing::debug!(error = %e, "skipping layer dir");
                    continue;
                }
            };
            let digest = state.source.digest.clone();
            let live = live.remove(&digest);
            let index = match &live {
                Some(l) => l.index.clone(),
                None => match self
                    .saved_toc(&state)
                    .and_then(|toc| Self::build_index(&state, &toc))
                {
                    Ok(index) => Arc::new(index),
                    Err(e) => {
                        tracing::warn!(layer = %digest, error = %e, "saved layer unreadable");
                        continue;
                    }
                },
            };
            let keys = crate::prefetch::chunk_keys(&index);
            let disk = self.cache.disk();
            let cached: Vec<u64> = keys
                .iter()
                .filter_map(|(key, _)| disk.size_of(key))
                .collect();
            let old = retired.get(&digest).copied().unwrap_or_default();
            let mut references = live
                .as_ref()
                .map(|l| l.references.clone())
                .unwrap_or_default();
            if !references.contains(&state.source.reference) {
                references.push(state.source.reference.clone());
            }
            out.push(LayerReport {
                trace_present: self.traces.contains(&digest),
                digest,
                references,
                cached_bytes: cached.iter().sum(),
                layer_bytes: keys.iter().map(|(_, len)| len).sum(),
                cached_chunks: cached.len() as u64,
                total_chunks: keys.len() as u64,
                fetched_bytes: old.fetched_bytes + live.as_ref().map_or(0, |l| l.fetched_bytes),
                fetched_chunks: old.fetched_chunks + live.as_ref().map_or(0, |l| l.fetched_chunks),
                last_access_unix_ms: old
                    .last_access_ms
                    .max(live.as_ref().map_or(0, |l| l.last_access_ms)),
                mounted: live.is_some(),
            });
        }
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        out
    }

    /// Drops every cached chunk of layer `digest` (mounted or not; a mounted layer fetches
    /// again what it reads next). Chunks it shares with other layers go too: the cache holds
    /// each once, and keeping them would make `evict` lie about what it freed.
    pub async fn evict_layer(&self, digest: &str) -> Result<Evicted, RemoteError> {
        let mounted = self
            .mounted()
            .values()
            .find(|m| m.digest == digest)
            .map(|m| m.index.clone());
        let index = match mounted {
            Some(index) => index,
            None => {
                let dir = self.layer_dir(digest);
                if !dir.join("layer.json").exists() {
                    return Err(RemoteError::NotLazy(format!(
                        "layer {digest} is not known to this node"
                    )));
                }
                let state = self.saved_state(&dir)?;
                let toc = self.saved_toc(&state)?;
                Arc::new(Self::build_index(&state, &toc)?)
            }
        };
        let keys = crate::prefetch::chunk_keys(&index)
            .into_iter()
            .map(|(k, _)| k);
        Ok(self.cache.evict(keys).await)
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
        let toc = self.saved_toc(&state)?;
        self.mount_index(mountpoint, &state, &toc)
    }

    fn unmount(&self, mountpoint: &Path) -> Result<(), RemoteError> {
        let mounted = self.mounted().remove(mountpoint);
        let Some(mounted) = mounted else {
            return Ok(());
        };
        for task in &mounted.tasks {
            task.abort();
        }
        let c = mounted.reader.counters();
        tracing::info!(
            layer = %mounted.digest,
            fetched_bytes = c.fetched_bytes.load(Ordering::Relaxed),
            fetches = c.fetches.load(Ordering::Relaxed),
            served_bytes = c.served_bytes.load(Ordering::Relaxed),
            chunk_hits = c.chunk_hits.load(Ordering::Relaxed),
            chunk_misses = c.chunk_misses.load(Ordering::Relaxed),
            demand_network_reads = c.demand_network_reads.load(Ordering::Relaxed),
            prefetch_bytes = c.prefetch_bytes.load(Ordering::Relaxed),
            prefetch_used_bytes = c.prefetch_used_bytes.load(Ordering::Relaxed),
            "unmounting lazy layer"
        );
        self.retired_totals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(c);
        {
            let mut retired = self.retired.lock().unwrap_or_else(|p| p.into_inner());
            let r = retired.entry(mounted.digest.clone()).or_default();
            r.fetched_bytes += c.fetched_bytes.load(Ordering::Relaxed);
            r.fetched_chunks += c.chunk_misses.load(Ordering::Relaxed);
            r.last_access_ms = r
                .last_access_ms
                .max(c.last_access_ms.load(Ordering::Relaxed));
        }
        if let Some(recorder) = mounted.recorder.clone() {
            // What was read since the last periodic save still belongs in the trace.
            let (digest, index, store) = (
                mounted.digest.clone(),
                mounted.index.clone(),
                self.traces.clone(),
            );
            self.runtime.spawn(async move {
                let mut first = false;
                crate::prefetch::flush_trace(
                    &digest, &recorder, &index, &store, &mut None, &mut first,
                )
                .await;
            });
        }
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

/// The FUSE crate's view of a layer: metadata from the index, bytes from the reader; reads
/// are also shown to the trace recorder and the readahead detector.
struct IndexSource {
    index: Arc<LayerIndex>,
    reader: Arc<LayerReader>,
    recorder: Option<Arc<ReadRecorder>>,
    readahead: Readahead,
    runtime: Handle,
}

impl IndexSource {
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
        self.runtime.spawn(async move {
            if let Err(e) = reader.warm(&chunks, Priority::Readahead).await {
                tracing::debug!(ino, error = %e, "readahead failed");
            }
        });
    }

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
        let chunks = self.index.chunks_for(ino.0, offset, end);
        if let Some(recorder) = &self.recorder {
            recorder.record(ino.0, chunks);
        }
        self.read_ahead(ino.0, offset, end);
        async move {
            self.reader.read(chunks, offset..end).await.map_err(|e| {
                tracing::warn!(ino = ino.0, offset, len, error = %e, "read failed");
                SourceError::io(e)
            })
        }
    }
}
