//! The one place that wires lazy layers into the snapshotter: [`LazyLayers`] implements the
//! snapshotter's `RemoteFs` by resolving a layer (`crate::layer`), saving its state, opening
//! its index and mounting it with the `lazysnap-fuse` crate over [`IndexSource`], with the
//! prefetch and trace tasks the mount owns. Reports for operators are in `report`.
//!
//! A layer's saved state lives as long as a snapshot mounts it: it is written (within the
//! cache's disk budget) at the first mount, reused by later mounts of the same layer, and
//! removed when the last mount of the layer goes (or by `cache prune` if none is left).
//!
//! Mounts outlive the daemon: their FUSE fds are held in `crate::takeover`'s fd store, and a
//! restarted daemon's `remount` serves the connection it finds held for a mountpoint instead
//! of mounting anew (`handover`).

mod fuse_source;
mod handover;
mod health;
mod libraries;
mod lower;
mod report;
#[cfg(test)]
mod seams_tests;
mod verify;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lazysnap_fuse as fuse;
use tokio::runtime::Handle;
use tokio::task::JoinSet;

pub use fuse_source::IndexSource;

use crate::cache::ChunkStore;
use crate::chunk::BlobId;
use crate::config::PrefetchConfig;
use crate::layer::{
    self, unix_ms, Fetches, LayerError, LayerReader, LayerSource, LayerState, Resolver, StateDir,
};
use crate::metadata::LayerIndex;
use crate::prefetch::{Activity, ActivityCell, MountPlan, ReadRecorder, Readahead, TraceStore};
use crate::report::{TakeoverReport, Totals};
use crate::snapshot::{Labels, RemoteError, RemoteFs, RemoteState};
use crate::takeover::FdStore;
use handover::HeldConnection;

/// Tasks a mount owns (prefetch, trace recording, readahead): aborted when it is unmounted,
/// so none outlives the layer it serves.
pub type MountTasks = Arc<Mutex<JoinSet<()>>>;

struct Mounted {
    handle: fuse::MountHandle,
    /// The device of the FUSE mount, as `stat` of the mountpoint showed it once mounted.
    dev: u64,
    health: Arc<health::Health>,
    reader: Arc<LayerReader>,
    index: Arc<LayerIndex>,
    digest: String,
    reference: String,
    mounted_unix_ms: u64,
    activity: Arc<ActivityCell>,
    recorder: Option<Arc<ReadRecorder>>,
    tasks: MountTasks,
    /// The name its connection's fd is held under, if it is held.
    held_as: Option<String>,
    /// Whether this daemon took the connection over from an earlier one.
    taken_over: bool,
}

/// Where lazy layers keep their state, and how they behave.
#[derive(Debug, Clone)]
pub struct LazyOptions {
    /// `<root>/layers`: each layer's saved index and description.
    pub layers_dir: PathBuf,
    /// A container's read that cannot be served in this time fails with EIO.
    pub read_timeout: Duration,
    /// Ask the kernel to read files complete in the store directly (FUSE passthrough).
    pub passthrough: bool,
    /// Passthrough only on layers holding a regular file at least this large.
    pub passthrough_min_file_bytes: u64,
    /// The kernel's readahead window on each mount; 0 leaves the kernel's.
    pub readahead_bytes: u64,
    /// Threads reading each mount's FUSE requests.
    pub dispatch_threads: usize,
    /// Fetched bytes held in memory at once.
    pub memory_bytes: u64,
    /// Saved states of layers no snapshot mounts are kept up to this many bytes.
    pub unmounted_state_bytes: u64,
    pub prefetch: PrefetchConfig,
}

/// Lazily pulled layers, mounted over FUSE.
pub struct LazyLayers {
    resolver: Resolver,
    store: Arc<dyn ChunkStore>,
    traces: Arc<TraceStore>,
    fetches: Arc<Fetches>,
    states: StateDir,
    options: LazyOptions,
    runtime: Handle,
    mounted: Mutex<HashMap<PathBuf, Mounted>>,
    /// Per layer digest: figures of its mounts that are gone, so totals never go backwards.
    retired: Mutex<HashMap<String, report::Retired>>,
    retired_totals: Mutex<Totals>,
    /// Held while saved states are written, taken for a mount or removed, so that a state is
    /// never removed between being found (or saved) and its mount being recorded.
    lifecycle: Mutex<()>,
    /// Where mounts' FUSE fds are held across restarts.
    fd_store: FdStore,
    /// Connections of the previous daemon not yet taken over, by mountpoint.
    held: Mutex<HashMap<PathBuf, HeldConnection>>,
    /// When the held fds were taken back.
    takeover_started: Instant,
    takeover: Mutex<TakeoverReport>,
    /// Every mounted layer by image, for finding a program's libraries in the layers below.
    image_layers: Arc<libraries::ImageLayers>,
}

impl LazyLayers {
    /// `held` are the fds `fd_store` held for an earlier daemon, by name: restoring a layer
    /// at a mountpoint one of them serves takes that connection over instead of mounting.
    pub fn new(
        resolver: Resolver,
        store: Arc<dyn ChunkStore>,
        traces: Arc<TraceStore>,
        options: LazyOptions,
        runtime: Handle,
        fd_store: FdStore,
        held: Vec<(String, OwnedFd)>,
    ) -> Self {
        let takeover_started = Instant::now();
        let states = StateDir::new(options.layers_dir.clone());
        store.reserve(states.disk_usage());
        let held = handover::by_mountpoint(held, &fd_store);
        LazyLayers {
            resolver,
            store,
            traces,
            fetches: Arc::new(Fetches::with_memory(
                options.prefetch.concurrency,
                options.memory_bytes,
            )),
            states,
            options,
            runtime,
            mounted: Mutex::default(),
            retired: Mutex::default(),
            retired_totals: Mutex::default(),
            lifecycle: Mutex::default(),
            fd_store,
            held: Mutex::new(held),
            takeover_started,
            takeover: Mutex::default(),
            image_layers: Arc::default(),
        }
    }

    fn lifecycle(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lifecycle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Saves a layer's state, encoded (`StateDir::encode`), within the disk budget: room is
    /// made for it before it is written. Call with `lifecycle` held.
    fn save_encoded_state(&self, encoded: &layer::Encoded) -> Result<(), LayerError> {
        self.store.reserve(self.states.disk_usage() + encoded.len());
        let saved = self.states.save_encoded(encoded);
        self.store.reserve(self.states.disk_usage());
        saved
    }

    /// Removes the saved state of `digest` unless a mount still uses it. Call with
    /// `lifecycle` held.
    fn drop_state_if_unused(&self, digest: &str) {
        if self.mounted().values().any(|m| m.digest == digest) {
            return;
        }
        let freed = self.states.remove(digest);
        if freed > 0 {
            tracing::debug!(layer = %digest, bytes = freed, "removed saved layer state");
        }
        self.store.reserve(self.states.disk_usage());
    }

    /// Keeps the saved state of `digest`, whose last mount may just have gone, for a pull
    /// of the same layer to come: it is marked as the most recently unmounted, and the
    /// states of unmounted layers beyond `unmounted_state_bytes` are removed, least
    /// recently unmounted first. Call with `lifecycle` held.
    fn retire_state(&self, digest: &str) {
        let mounted: Vec<String> = self.mounted().values().map(|m| m.digest.clone()).collect();
        if !mounted.iter().any(|d| d == digest) {
            if let Some(layer::verify::Verdict::Bad { .. }) = self.states.load_verdict(digest) {
                // Kept, a bad verdict would fail every later pull of the layer until `cache
                // prune`, even once the registry serves the right bytes again. Its chunks
                // left the store with the verdict; the next pull resolves and checks anew.
                let freed = self.states.remove(digest);
                tracing::info!(layer = %digest, bytes = freed, "the last mount of a layer found bad is gone: its state is forgotten, and a new pull checks it again");
            } else {
                self.states.mark_unmounted(digest);
            }
        }
        let keep: Vec<&str> = mounted.iter().map(String::as_str).collect();
        let freed = self
            .states
            .trim_unmounted(&keep, self.options.unmounted_state_bytes);
        if freed > 0 {
            tracing::debug!(
                bytes = freed,
                "removed the saved state of layers unmounted longest ago"
            );
        }
        self.store.reserve(self.states.disk_usage());
    }

    fn mounted(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Mounted>> {
        self.mounted.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a resolved layer and mounts it at `mountpoint` over the layers `lower` (nearest
    /// first), with the tasks that serve it.
    /// With `held`, serves that connection (already mounted there) instead of mounting.
    fn mount_state(
        &self,
        mountpoint: &Path,
        state: &LayerState,
        lower: &[PathBuf],
        held: Option<HeldConnection>,
    ) -> Result<(), LayerError> {
        let opening = std::time::Instant::now();
        let opened = layer::open(self.resolver.formats(), state)?;
        tracing::debug!(
            layer = %state.source.digest,
            open_ms = opening.elapsed().as_millis() as u64,
            "opened"
        );
        self.mount_opened(mountpoint, state, opened, lower, held)
    }

    /// `mount_state` of a layer already opened.
    fn mount_opened(
        &self,
        mountpoint: &Path,
        state: &LayerState,
        opened: crate::format::Opened,
        lower: &[PathBuf],
        held: Option<HeldConnection>,
    ) -> Result<(), LayerError> {
        let mounting = Instant::now();
        let digest = &state.source.digest;
        let mut index = opened.index;
        let adopted = lower::adopt_lower_attrs(&mut index, lower);
        if adopted > 0 {
            tracing::debug!(layer = %digest, directories = adopted, "implied directories take their attributes from the layers below");
        }
        let index = Arc::new(index);
        let prefetch = &self.options.prefetch;
        let check_needed = self
            .resolver
            .formats()
            .by_name(&state.format)
            .is_some_and(|f| f.needs_whole_blob_check());
        // Every mount of one layer answers to one verdict: a layer found bad through one
        // snapshot is bad through all.
        let shared = self
            .mounted()
            .values()
            .find(|m| m.digest == *digest)
            .map(|m| m.reader.verdict().clone());
        let verdict = shared.unwrap_or_else(|| {
            let known = check_needed
                .then(|| self.states.load_verdict(digest))
                .flatten();
            Arc::new(layer::verify::VerdictCell::new(check_needed, known))
        });
        if let Some(layer::verify::Verdict::Bad { expected, got }) = verdict.get() {
            tracing::warn!(layer = %digest, expected = %expected, got = %got, "layer was found bad before: its reads fail with EIO");
        }
        let layout: Arc<[crate::chunk::ChunkSpec]> = Arc::from(index.chunks_in_blob_order());
        let directories = index.directories_of(&layout);
        let side: Option<Arc<dyn crate::format::BlobSource>> = match &opened.side_blob {
            Some(d) => Some(self.resolver.side_blob(&state.source, d)?),
            None => None,
        };
        let reader = Arc::new(
            LayerReader::new(
                self.resolver.blob(&state.source)?,
                BlobId::new(&state.source.digest, state.source.toc_digest.as_deref()),
                opened.decoder,
                self.store.clone(),
                self.fetches.clone(),
            )
            .with_side(side)
            .with_neighbours(layout.clone(), prefetch.amplify_bytes)
            .with_directories(directories)
            .with_verdict(verdict.clone()),
        );
        let recorder = (!prefetch.trace_window.is_zero()).then(|| {
            Arc::new(ReadRecorder::new(
                prefetch.trace_window,
                prefetch.max_trace_entries,
                prefetch.max_trace_names,
            ))
        });
        let tasks: MountTasks = Arc::default();
        self.image_layers
            .add(&state.source.reference, &index, &reader);
        let libraries = Arc::new(libraries::SharedLibraries::new(
            self.image_layers.clone(),
            state.source.reference.clone(),
            prefetch.shared_libraries,
        ));
        let source = Arc::new(
            IndexSource::new(
                index.clone(),
                reader.clone(),
                recorder.clone(),
                Readahead::new(prefetch.readahead_max_bytes),
                self.runtime.clone(),
                tasks.clone(),
            )
            .with_libraries(libraries),
        );
        // Decided by the layer's index and the configuration only, so that a daemon taking the
        // mount over with the same configuration decides alike (a changed one is handled like
        // passthrough turned on or off across a restart: by the backing journal).
        let passthrough = self.options.passthrough
            && index.largest_file() >= self.options.passthrough_min_file_bytes;
        let options = fuse::MountOptions {
            fsname: format!("lazysnap-{}", digest.replace(':', "-")),
            read_timeout: self.options.read_timeout,
            passthrough,
            backing_journal: Some(backing_journal(mountpoint)),
            readahead_bytes: Some(self.options.readahead_bytes).filter(|&b| b > 0),
            dispatch_threads: self.options.dispatch_threads,
            ..fuse::MountOptions::default()
        };
        let taken_over = held.is_some();
        let (handle, held_as) = match held {
            Some(held) => {
                let handle = fuse::take_over(
                    source,
                    mountpoint,
                    held.fd,
                    held.init,
                    options,
                    self.runtime.clone(),
                )
                .map_err(|source| LayerError::Mount {
                    layer: digest.clone(),
                    source,
                })?;
                (handle, Some(held.name))
            }
            None => {
                let handle = fuse::mount(source, mountpoint, options, self.runtime.clone())
                    .map_err(|source| LayerError::Mount {
                        layer: digest.clone(),
                        source,
                    })?;
                let held_as = self.hold(mountpoint, &handle);
                (handle, held_as)
            }
        };
        // Dropping the handle on error unmounts.
        let dev = std::fs::symlink_metadata(mountpoint)
            .map_err(|source| LayerError::Mount {
                layer: digest.clone(),
                source: fuse::MountError::Mount {
                    mountpoint: mountpoint.to_path_buf(),
                    source,
                },
            })?
            .dev();
        // A Prepare waits for all of this: which part holds up a pull.
        tracing::debug!(
            layer = %digest,
            setup_and_mount_ms = mounting.elapsed().as_millis() as u64,
            passthrough,
            "mounted"
        );
        let activity = Arc::new(ActivityCell::default());
        {
            let mut set = tasks.lock().unwrap_or_else(|p| p.into_inner());
            let check = (check_needed && verdict.get().is_none()).then(|| verify::Check {
                digest: digest.clone(),
                blob_size: state.blob_size,
                reader: reader.clone(),
                layout: layout.clone(),
                store: self.store.clone(),
                states: self.states.clone(),
                activity: activity.clone(),
            });
            // With background fetch on, the check is the background fetch (one pass over the
            // blob); otherwise it waits for reads to have fetched the layer.
            let (walk_after_prefetch, check) = match check {
                Some(c) if prefetch.enabled && prefetch.background_fetch => (Some(c), None),
                other => (None, other),
            };
            if prefetch.enabled {
                let plan = MountPlan {
                    trace: true,
                    landmarks: prefetch.landmarks,
                    background: prefetch.background_fetch && walk_after_prefetch.is_none(),
                    concurrency: prefetch.concurrency,
                    preload_bytes: prefetch.preload_bytes,
                };
                let trace = self.traces.load(digest);
                // A connection taken over keeps the kernel's caches it had; a new mount
                // starts with none.
                if let Some(trace) = trace.as_ref().filter(|_| !taken_over) {
                    let names = if prefetch.max_trace_names > 0 {
                        trace.names.clone()
                    } else {
                        Vec::new()
                    };
                    // With passthrough, reads of stored files never reach this mount's page
                    // cache: `after_mount` warms the store's files instead.
                    let warm = (!passthrough && prefetch.preload_bytes > 0).then(|| Warm {
                        entries: trace.entries.clone(),
                        index: index.clone(),
                        reader: reader.clone(),
                        max_bytes: prefetch.preload_bytes,
                    });
                    if !names.is_empty() || warm.is_some() {
                        set.spawn_on(
                            replay_trace(digest.clone(), mountpoint.to_path_buf(), names, warm),
                            &self.runtime,
                        );
                    }
                }
                activity.set(Activity::Prefetching);
                let after = crate::prefetch::after_mount(
                    digest.clone(),
                    reader.clone(),
                    index.clone(),
                    trace,
                    plan,
                    activity.clone(),
                );
                set.spawn_on(
                    async move {
                        after.await;
                        if let Some(check) = walk_after_prefetch {
                            check.in_background_fetch().await;
                        }
                    },
                    &self.runtime,
                );
            }
            if let Some(check) = check {
                set.spawn_on(check.once_complete(), &self.runtime);
            }
            if let Some(recorder) = &recorder {
                // Saved every few seconds, so a trace is there soon after a container's start
                // even if the daemon is killed before the window ends.
                let interval = prefetch.trace_window.min(Duration::from_secs(2));
                set.spawn_on(
                    crate::prefetch::record_trace(
                        digest.clone(),
                        recorder.clone(),
                        index.clone(),
                        self.traces.clone(),
                        interval,
                    ),
                    &self.runtime,
                );
            }
        }
        self.mounted().insert(
            mountpoint.to_path_buf(),
            Mounted {
                handle,
                dev,
                health: Arc::default(),
                reader,
                index,
                digest: digest.clone(),
                reference: state.source.reference.clone(),
                mounted_unix_ms: unix_ms(),
                activity,
                recorder,
                tasks,
                held_as,
                taken_over,
            },
        );
        Ok(())
    }
}

/// The longest a replay of a trace's names may take. A name costs one round trip to our
/// own FUSE thread (tens of microseconds), so a full trace of 16384 takes well under a
/// second; the bound holds whatever the configuration and the machine. Warming the page
/// cache afterwards has a budget of its own, as long.
const NAME_REPLAY_BUDGET: Duration = Duration::from_secs(5);

/// What warming a mount's page cache needs: its trace's chunks, and where to look them up.
struct Warm {
    entries: Vec<crate::prefetch::TraceEntry>,
    index: Arc<LayerIndex>,
    reader: Arc<LayerReader>,
    max_bytes: u64,
}

impl Warm {
    /// The traced ranges the store holds already, in trace order, up to `max_bytes`: what
    /// may be read through the mount without a request to the registry. Blocking (the
    /// store's index, for each of up to `[prefetch] max_trace_entries`).
    fn stored_ranges(&self) -> Vec<crate::prefetch::warm::Range> {
        let mut out = Vec::new();
        let mut bytes = 0u64;
        for entry in &self.entries {
            let Some(ino) = self.index.resolve(&entry.path) else {
                continue;
            };
            let end = entry.offset.saturating_add(entry.bytes);
            let chunks = self.index.chunks_for(ino, entry.offset, end);
            if chunks.is_empty() || !self.reader.is_cached(chunks) {
                continue;
            }
            if bytes.saturating_add(entry.bytes) > self.max_bytes {
                break;
            }
            bytes += entry.bytes;
            out.push(crate::prefetch::warm::Range {
                path: entry.path.clone(),
                offset: entry.offset,
                len: entry.bytes,
            });
        }
        out
    }
}

/// Replays the layer's traced names through its new mount (`prefetch::names`), so the
/// kernel holds the answers before a container asks, then asks the kernel to read ahead the
/// traced bytes already stored (`prefetch::warm`; `None` with passthrough). Logs what it did;
/// a failure costs speed only.
async fn replay_trace(
    digest: String,
    mountpoint: PathBuf,
    names: Vec<crate::prefetch::NameEntry>,
    warm: Option<Warm>,
) {
    let started = Instant::now();
    let done = tokio::task::spawn_blocking(move || {
        let replayed = (!names.is_empty())
            .then(|| crate::prefetch::names::replay(&mountpoint, &names, NAME_REPLAY_BUDGET));
        let warmed = warm
            .map(|w| w.stored_ranges())
            .filter(|ranges| !ranges.is_empty())
            .map(|ranges| crate::prefetch::warm::warm(&mountpoint, &ranges, NAME_REPLAY_BUDGET));
        (replayed, warmed)
    })
    .await;
    match done {
        Ok((replayed, warmed)) => {
            if let Some(done) = replayed {
                tracing::info!(
                    layer = %digest,
                    asked = done.asked,
                    found = done.found,
                    stopped = done.stopped.as_deref().unwrap_or(""),
                    elapsed = ?started.elapsed(),
                    "replayed the layer's traced names"
                );
            }
            if let Some(done) = warmed {
                tracing::info!(
                    layer = %digest,
                    ranges = done.ranges,
                    bytes = done.bytes,
                    stopped = done.stopped.as_deref().unwrap_or(""),
                    elapsed = ?started.elapsed(),
                    "asked the kernel to read the layer's stored traced bytes ahead"
                );
            }
        }
        Err(e) => {
            tracing::warn!(layer = %digest, error = %e, "replaying the layer's trace failed")
        }
    }
}

impl LazyLayers {
    /// When the labels name the image's layers, starts fetching what resolving the others
    /// needs, so that their own Prepares (which containerd sends one after another) find it
    /// there. Layers with a saved state need nothing. Blocking (looks at the saved states).
    fn resolve_others_ahead(&self, source: &LayerSource, labels: &Labels) {
        let others = self.others_to_resolve(source, labels);
        if !others.is_empty() {
            self.resolver
                .resolve_ahead(&self.runtime, &source.reference, others);
        }
    }

    /// The image's layers other than `source` that have no saved state. Blocking.
    fn others_to_resolve(&self, source: &LayerSource, labels: &Labels) -> Vec<String> {
        layer::image_layers(labels)
            .into_iter()
            .filter(|d| *d != source.digest && !self.states.layer_dir(d).exists())
            .collect()
    }

    /// Checks the mount at `mountpoint`; a dead one shows as such in `lazysnap mounts` until
    /// it is mounted again. With `fresh`, a recent good answer is not trusted.
    fn check_mount(&self, mountpoint: &Path, fresh: bool) -> Result<(), RemoteError> {
        let found = self.mounted().get(mountpoint).map(|m| {
            (
                m.dev,
                m.health.clone(),
                m.activity.clone(),
                m.digest.clone(),
            )
        });
        let Some((dev, health, activity, digest)) = found else {
            return Err(RemoteError::Dead {
                layer: String::new(),
                mountpoint: mountpoint.to_path_buf(),
                reason: "no lazy layer is mounted there by this daemon".to_owned(),
            });
        };
        health.check(mountpoint, dev, fresh).map_err(|reason| {
            activity.set_dead();
            RemoteError::Dead {
                layer: digest,
                mountpoint: mountpoint.to_path_buf(),
                reason,
            }
        })
    }

    /// Checks every mount now, so that the report shows the dead ones (`lazysnap mounts`).
    /// Blocking: call it off the async workers.
    pub(crate) fn check_all_mounts(&self) {
        let points: Vec<PathBuf> = self.mounted().keys().cloned().collect();
        for point in points {
            if let Err(e) = self.check_mount(&point, true) {
                tracing::debug!(error = %crate::error_chain(&e), "lazy layer mount is dead");
            }
        }
    }
}

/// How the snapshotter sees a layer's failure: not lazy (ordinary path, quietly) or failed
/// (ordinary path, with a warning); the cause stays attached.
fn remote_error(e: LayerError) -> RemoteError {
    match e {
        LayerError::NotLazy { .. } => RemoteError::NotLazy(Box::new(e)),
        e => RemoteError::Failed(Box::new(e)),
    }
}

/// `RemoteFs` methods block: they are called by the snapshotter, which runs on tokio's
/// blocking pool (`grpc::snapshots` and the daemon's startup both use `spawn_blocking`), and
/// they wait on the registry with `Handle::block_on`, which must never run on an async worker.
impl RemoteFs for LazyLayers {
    fn mount(
        &self,
        mountpoint: &Path,
        labels: &Labels,
        lower: &[PathBuf],
    ) -> Result<RemoteState, RemoteError> {
        let source = LayerSource::from_labels(labels).ok_or_else(|| {
            RemoteError::NotLazy("labels name no image reference and layer digest".into())
        })?;
        {
            // Another snapshot of the same layer is here: its saved state, no request.
            let _lifecycle = self.lifecycle();
            if let Some(state) = self.resolver.saved(&self.states, &source, labels) {
                match self.mount_state(mountpoint, &state, lower, None) {
                    Ok(()) => {
                        self.resolve_others_ahead(&source, labels);
                        return serde_json::to_value(layer::SavedState::of(&state))
                            .map_err(|e| RemoteError::Failed(Box::new(e)));
                    }
                    Err(e @ LayerError::Format { .. }) => {
                        tracing::warn!(layer = %source.digest, error = %crate::error_chain(&e), "saved layer state does not open; resolving the layer again");
                    }
                    Err(e) => return Err(remote_error(e)),
                }
            }
        }
        // The connections the requests ahead will need, opened while this layer's first
        // request is under way (they wait for its answer, below).
        self.resolver.open_connections_ahead(
            &self.runtime,
            &source.reference,
            &self.others_to_resolve(&source, labels),
        );
        let started = std::time::Instant::now();
        // The others ahead once this layer's first request is answered, not before: by then
        // the client knows how the registry authenticates, so the requests ahead go out with
        // credentials instead of each being challenged in parallel; once the rest of this
        // layer's index is requested (on the connection already open), but not after it has
        // come too, so that they are ready when containerd prepares them.
        let resolved = self
            .runtime
            .block_on(self.resolver.resolve(&source, labels, || {
                self.resolve_others_ahead(&source, labels)
            }));
        let resolve_ms = started.elapsed().as_millis() as u64;
        // Also when resolving failed before any request (each layer is started once).
        self.resolve_others_ahead(&source, labels);
        let state = resolved.map_err(remote_error)?;
        let _lifecycle = self.lifecycle();
        let saving = std::time::Instant::now();
        // Encoding the state (compressing its index) and opening the layer (parsing its
        // index, unless that was done ahead) are both CPU work on the Prepare's path, and
        // independent: side by side.
        let (encoded, opened, open_ms) = std::thread::scope(|s| {
            let encoding = s.spawn(|| StateDir::encode(&state));
            let opening = Instant::now();
            let opened = match self.resolver.take_opened_ahead(
                &state.source,
                &state.format,
                &state.resolved.params,
            ) {
                Some(opened) => {
                    tracing::debug!(layer = %state.source.digest, "using the layer opened ahead");
                    Ok(opened)
                }
                None => layer::open(self.resolver.formats(), &state),
            };
            let open_ms = opening.elapsed().as_millis() as u64;
            // A panic there is one here, as it was before the two ran side by side.
            let encoded = encoding
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            (encoded, opened, open_ms)
        });
        let opened = opened.map_err(remote_error)?;
        self.save_encoded_state(&encoded.map_err(remote_error)?)
            .map_err(remote_error)?;
        let save_ms = saving.elapsed().as_millis() as u64;
        let mounting = std::time::Instant::now();
        if let Err(e) = self.mount_opened(mountpoint, &state, opened, lower, None) {
            self.drop_state_if_unused(&state.source.digest);
            return Err(remote_error(e));
        }
        // Where a Prepare's time goes, for finding what holds up a pull.
        tracing::debug!(
            layer = %state.source.digest,
            resolve_ms,
            open_ms,
            open_and_save_ms = save_ms,
            mount_ms = mounting.elapsed().as_millis() as u64,
            "lazy layer ready"
        );
        serde_json::to_value(layer::SavedState::of(&state))
            .map_err(|e| RemoteError::Failed(Box::new(e)))
    }

    fn remount(
        &self,
        mountpoint: &Path,
        state: &RemoteState,
        lower: &[PathBuf],
    ) -> Result<(), RemoteError> {
        let saved: layer::SavedState =
            serde_json::from_value(state.clone()).map_err(|e| RemoteError::Failed(Box::new(e)))?;
        let _lifecycle = self.lifecycle();
        let mut state = self
            .states
            .load(&saved.source.digest)
            .map_err(remote_error)?;
        if state.source.toc_digest != saved.source.toc_digest {
            return Err(RemoteError::Failed(
                format!(
                    "the saved state of layer {} is for TOC {:?}, the snapshot's for {:?}",
                    saved.source.digest, state.source.toc_digest, saved.source.toc_digest
                )
                .into(),
            ));
        }
        // The reference this snapshot was pulled as (another image's may have saved the state).
        state.source = saved.source;
        // A repair remounts over a dead mount whose entry is still here: it goes now, its
        // kernel side already detached, and its saved state stays (this remount uses it).
        let dead = self.mounted().remove(mountpoint);
        if let Some(dead) = dead {
            self.end_tasks(&dead);
            drop(dead.handle);
            self.unhold(dead.held_as.as_deref());
        }
        if let Some(held) = self.take_held(mountpoint) {
            let name = held.name.clone();
            match self.mount_state(mountpoint, &state, lower, Some(held)) {
                Ok(()) => {
                    self.takeover
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .taken_over += 1;
                    tracing::debug!(mountpoint = %mountpoint.display(), layer = %state.source.digest, "took over the lazy layer's FUSE connection");
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(mountpoint = %mountpoint.display(), error = %crate::error_chain(&e), "cannot take over the held FUSE connection; mounting the layer anew");
                    self.drop_held(mountpoint, &name);
                }
            }
        }
        self.mount_state(mountpoint, &state, lower, None)
            .map_err(remote_error)
    }

    /// The layer's saved state outlives its last mount, within `unmounted_state_bytes`.
    fn unmount(&self, mountpoint: &Path) -> Result<(), RemoteError> {
        let lifecycle = self.lifecycle();
        let mounted = self.mounted().remove(mountpoint);
        let Some(mounted) = mounted else {
            return Ok(());
        };
        self.retire_state(&mounted.digest);
        drop(lifecycle);
        self.end_tasks(&mounted);
        mounted.handle.unmount().map_err(|e| RemoteError::Unmount {
            mountpoint: mountpoint.to_path_buf(),
            source: Box::new(e),
        })?;
        self.unhold(mounted.held_as.as_deref());
        Ok(())
    }

    fn check(&self, mountpoint: &Path) -> Result<(), RemoteError> {
        self.check_mount(mountpoint, false)
    }

    fn held_mountpoints(&self) -> Vec<PathBuf> {
        self.held_mountpoints_now()
    }

    fn restore_done(&self) {
        self.drop_unclaimed();
    }
}

impl LazyLayers {
    /// Ends what a mount runs besides serving (prefetch, trace saving, readahead: dropping
    /// the set aborts them) and keeps its figures.
    fn end_tasks(&self, mounted: &Mounted) {
        drop(std::mem::take(
            &mut *mounted.tasks.lock().unwrap_or_else(|p| p.into_inner()),
        ));
        self.retire(mounted);
    }
}

/// Where the mount at `mountpoint` journals its passthrough backing ids, for the daemon
/// that takes it over after a restart: beside the mountpoint, in the snapshot's directory, so
/// it lives as long as the mount and goes with the snapshot.
fn backing_journal(mountpoint: &Path) -> PathBuf {
    let mut name = mountpoint.as_os_str().to_owned();
    name.push(".backing-journal");
    PathBuf::from(name)
}
