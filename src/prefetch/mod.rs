//! Learning from observed reads: what containers read first after a mount is recorded per
//! layer (`recorder`, `trace`) and fetched, in that order, the next time any container mounts
//! the layer; files read sequentially get readahead (`readahead`); optionally the rest of a
//! layer is fetched in the background. Everything here only warms the cache through the
//! layer reader at `Priority::Prefetch` or `Background`, so a container's own reads always
//! go first (see `layer::Fetches`), and a failure here costs speed, never correctness.
//!
//! Uses the layer reader and the layer index; knows nothing of FUSE or containerd.

pub mod elf;
pub mod names;
pub mod readahead;
pub mod recorder;
pub mod trace;
pub mod warm;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};

pub use readahead::Readahead;
pub use recorder::{NameOp, ReadRecorder, RecordedName};
pub use trace::{NameEntry, Trace, TraceEntry, TraceError, TraceStore};

use crate::chunk::ChunkSpec;
use crate::layer::{LayerReader, Priority, ReadError};
use crate::metadata::{Landmark, LayerIndex, ROOT};

/// One prefetch batch: a few MiB, so a demand read queued behind it waits little, and
/// neighbouring chunks still merge into one range request.
const BATCH_BYTES: u64 = 4 << 20;

/// What a mounted layer is doing besides serving reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Activity {
    Prefetching = 0,
    Ready = 1,
    Background = 2,
    /// The mount is no longer served (its FUSE connection died, or it was unmounted behind the
    /// daemon's back); it stays so until the layer is mounted again.
    Dead = 3,
}

impl Activity {
    pub fn as_str(self) -> &'static str {
        match self {
            Activity::Prefetching => "prefetching",
            Activity::Ready => "ready",
            Activity::Background => "background",
            Activity::Dead => "dead",
        }
    }
}

/// An `Activity` shared between a layer's background task and whoever reports on it.
#[derive(Debug)]
pub struct ActivityCell(AtomicU8);

impl Default for ActivityCell {
    fn default() -> Self {
        ActivityCell(AtomicU8::new(Activity::Ready as u8))
    }
}

impl ActivityCell {
    /// Sets what the layer is doing; a dead mount stays dead.
    pub fn set(&self, activity: Activity) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |current| {
                (current != Activity::Dead as u8).then_some(activity as u8)
            });
    }

    pub fn set_dead(&self) {
        self.0.store(Activity::Dead as u8, Ordering::Relaxed);
    }

    pub fn get(&self) -> Activity {
        match self.0.load(Ordering::Relaxed) {
            0 => Activity::Prefetching,
            2 => Activity::Background,
            3 => Activity::Dead,
            _ => Activity::Ready,
        }
    }
}

/// What to do when a layer is mounted.
#[derive(Debug, Clone, Copy)]
pub struct MountPlan {
    /// Fetch what the layer's trace names.
    pub trace: bool,
    /// Fetch the files before the layer's `.prefetch.landmark`.
    pub landmarks: bool,
    /// Then fetch everything else at low priority.
    pub background: bool,
    /// Prefetch batches in flight for this layer.
    pub concurrency: usize,
    /// The most bytes of the planned chunks already stored to read into the page cache.
    pub preload_bytes: u64,
}

/// The chunks a trace names, in trace order; entries the layer does not have (a trace from a
/// hand-edited document) are skipped.
pub fn plan_trace(index: &LayerIndex, trace: &Trace) -> Vec<ChunkSpec> {
    let mut inodes: HashMap<&str, Option<u64>> = HashMap::new();
    let mut out = Vec::with_capacity(trace.entries.len());
    for entry in &trace.entries {
        let ino = *inodes
            .entry(entry.path.as_str())
            .or_insert_with(|| index.resolve(&entry.path));
        let Some(ino) = ino else { continue };
        if let Some(chunk) = index
            .chunks_for(ino, entry.offset, entry.offset + 1)
            .first()
            .filter(|c| c.file_offset == entry.offset)
        {
            out.push(chunk.clone());
        }
    }
    out
}

/// Every chunk whose compressed bytes start before `before` in the blob, in blob order.
pub fn plan_before(index: &LayerIndex, before: u64) -> Vec<ChunkSpec> {
    let mut out: Vec<ChunkSpec> = index
        .inodes()
        .filter_map(|ino| index.node(ino))
        .flat_map(|n| n.chunks.iter())
        .filter(|c| c.blob_range.start < before)
        .cloned()
        .collect();
    out.sort_by_key(|c| c.blob_range.start);
    out
}

/// Every chunk of the layer, each once, in blob order.
pub fn plan_all(index: &LayerIndex) -> Vec<ChunkSpec> {
    index.chunks_in_blob_order()
}

/// Cuts `plan` into batches of about [`BATCH_BYTES`], in order, each chunk once.
fn batch_plan(plan: Vec<ChunkSpec>) -> Vec<Vec<ChunkSpec>> {
    let mut seen = HashSet::new();
    let mut batches: Vec<Vec<ChunkSpec>> = Vec::new();
    // Where the chunks of each compressed start went (the parts of a gzip-index span all
    // start at its resume point).
    let mut batch_of: HashMap<u64, usize> = HashMap::new();
    let mut batch_bytes = 0;
    for chunk in plan {
        // Chunks of identical content are one entry in the store: fetch them once. The
        // pieces of one gzip-index part share the part's digest but are other bytes each
        // (other `within`): not one entry.
        if !seen.insert((chunk.digest, chunk.within, chunk.len)) {
            continue;
        }
        // A later chunk of a span already planned joins that batch: fetched apart, it would
        // cost the span's compressed bytes from the resume point again; together, one request
        // reaches the further of the two ends. A batch grows by at most the rest of its spans.
        if let Some(batch) = batch_of
            .get(&chunk.blob_range.start)
            .and_then(|&b| batches.get_mut(b))
        {
            batch.push(chunk);
            continue;
        }
        if batches.is_empty() || batch_bytes + chunk.len > BATCH_BYTES {
            batches.push(Vec::new());
            batch_bytes = 0;
        }
        batch_bytes += chunk.len;
        batch_of.insert(chunk.blob_range.start, batches.len() - 1);
        if let Some(batch) = batches.last_mut() {
            batch.push(chunk);
        }
    }
    batches
}

/// Fetches `plan` at `priority`, in order, `concurrency` batches at a time; stops at the
/// first error. Returns the bytes it fetched (what was cached already costs nothing).
pub async fn fetch_plan(
    reader: &LayerReader,
    plan: Vec<ChunkSpec>,
    priority: Priority,
    concurrency: usize,
) -> Result<u64, ReadError> {
    let batches = batch_plan(plan);
    let mut results = stream::iter(batches)
        .map(|batch| async move { reader.warm(&batch, priority).await })
        .buffered(concurrency.max(1));
    let mut fetched = 0;
    while let Some(result) = results.next().await {
        fetched += result?;
    }
    Ok(fetched)
}

/// The work done for a layer after it is mounted: trace and landmark prefetch, then the
/// optional background fetch. Logs what it did; never fails the mount.
pub async fn after_mount(
    digest: String,
    reader: Arc<LayerReader>,
    index: Arc<LayerIndex>,
    trace: Option<Trace>,
    plan: MountPlan,
    activity: Arc<ActivityCell>,
) {
    let started = std::time::Instant::now();
    let mut chunks = Vec::new();
    if let (true, Some(trace)) = (plan.trace, &trace) {
        chunks.extend(plan_trace(&index, trace));
    }
    if plan.landmarks {
        if let Some(Landmark::PrefetchBefore(offset)) = index.landmark {
            chunks.extend(plan_before(&index, offset));
        }
    }
    if !chunks.is_empty() {
        activity.set(Activity::Prefetching);
        let planned = chunks.len();
        // What is on disk already is asked of the disk first: it lands in memory while the
        // rest is on the network, and before the container gets to it.
        let preloaded = reader.preload(chunks.clone(), plan.preload_bytes).await;
        match fetch_plan(&reader, chunks, Priority::Prefetch, plan.concurrency).await {
            Ok(bytes) => tracing::info!(
                layer = %digest,
                chunks = planned,
                preloaded_bytes = preloaded,
                fetched_bytes = bytes,
                elapsed = ?started.elapsed(),
                "prefetched the layer's traced and prioritized files"
            ),
            Err(e) => {
                tracing::warn!(layer = %digest, error = %crate::error_chain(&e), "prefetch stopped")
            }
        }
    }
    if plan.background {
        activity.set(Activity::Background);
        match fetch_plan(&reader, plan_all(&index), Priority::Background, 1).await {
            Ok(bytes) => tracing::info!(
                layer = %digest,
                fetched_bytes = bytes,
                elapsed = ?started.elapsed(),
                "background fetch finished: the layer is fully cached"
            ),
            Err(e) => {
                tracing::warn!(layer = %digest, error = %crate::error_chain(&e), "background fetch stopped")
            }
        }
    }
    activity.set(Activity::Ready);
}

/// Moves what `recorder` saw into the layer's trace every `interval` until its window
/// closes. The first flush counts the mount.
pub async fn record_trace(
    digest: String,
    recorder: Arc<ReadRecorder>,
    index: Arc<LayerIndex>,
    store: Arc<TraceStore>,
    interval: Duration,
) {
    let mut paths = None;
    let mut first = true;
    loop {
        tokio::time::sleep(interval).await;
        let closed = recorder.is_closed();
        flush_trace(&digest, &recorder, &index, &store, &mut paths, &mut first).await;
        if closed {
            return;
        }
    }
}

/// Saves what `recorder` holds now (also called once more at unmount). `paths` keeps the
/// paths of the inodes traced so far; only newly traced inodes are looked up, so the cost is
/// the trace's, not the layer's depth or size.
pub async fn flush_trace(
    digest: &str,
    recorder: &ReadRecorder,
    index: &Arc<LayerIndex>,
    store: &Arc<TraceStore>,
    paths: &mut Option<Arc<HashMap<u64, String>>>,
    first: &mut bool,
) {
    let fresh = recorder.take();
    let fresh_names = recorder.take_names();
    if fresh.is_empty() && fresh_names.is_empty() {
        return;
    }
    let known = paths.take().unwrap_or_default();
    let missing: HashSet<u64> = fresh
        .iter()
        .map(|r| r.ino)
        .chain(fresh_names.iter().map(|n| n.ino))
        .filter(|ino| *ino != ROOT && !known.contains_key(ino))
        .collect();
    let known = if missing.is_empty() {
        known
    } else {
        let index = index.clone();
        let found = tokio::task::spawn_blocking(move || index.paths_of(&missing))
            .await
            .unwrap_or_default();
        let mut all = Arc::try_unwrap(known).unwrap_or_else(|shared| (*shared).clone());
        all.extend(found);
        Arc::new(all)
    };
    let paths = paths.insert(known).clone();
    let entries: Vec<TraceEntry> = fresh
        .into_iter()
        .filter_map(|r| {
            Some(TraceEntry {
                path: paths.get(&r.ino)?.clone(),
                offset: r.offset,
                bytes: r.len,
                since_mount_ms: r.since_mount_ms,
            })
        })
        .collect();
    let names: Vec<NameEntry> = fresh_names
        .into_iter()
        .filter_map(|n| name_entry(n, &paths))
        .collect();
    let new_mount = std::mem::take(first);
    let store = store.clone();
    let digest = digest.to_owned();
    let result =
        tokio::task::spawn_blocking(move || store.record(&digest, entries, names, new_mount)).await;
    match result {
        Ok(Ok(trace)) => tracing::debug!(
            layer = %trace.layer,
            entries = trace.entries.len(),
            names = trace.names.len(),
            "read trace saved"
        ),
        Ok(Err(e)) => tracing::warn!(error = %crate::error_chain(&e), "saving read trace failed"),
        Err(e) => tracing::warn!(error = %e, "saving read trace failed"),
    }
}

/// The path a recorded name request is about: the name looked up (in its directory), the
/// directory listed, the symlink read. The root's own listing and names that are not UTF-8
/// are left out: a replay of them would ask for something else.
fn name_entry(n: RecordedName, paths: &HashMap<u64, String>) -> Option<NameEntry> {
    let at = if n.ino == ROOT {
        ""
    } else {
        paths.get(&n.ino)?.as_str()
    };
    let path = match n.op {
        NameOp::Lookup => {
            let name = std::str::from_utf8(&n.name).ok()?;
            if at.is_empty() {
                name.to_owned()
            } else {
                format!("{at}/{name}")
            }
        }
        NameOp::List | NameOp::Readlink => at.to_owned(),
    };
    (!path.is_empty()).then_some(NameEntry {
        path,
        op: n.op,
        since_mount_ms: n.since_mount_ms,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::cache::LocalStore;
    use crate::chunk::BlobId;
    use crate::layer::Fetches;
    use crate::test_utils::{gzip_index_layer, FixtureBlob};

    fn chunk(start: u64, end: u64, len: u64, tag: u8) -> ChunkSpec {
        ChunkSpec {
            id: crate::chunk::ChunkId(u32::from(tag)),
            file: Default::default(),
            file_offset: 0,
            len,
            blob_range: start..end,
            inner_offset: 0,
            within: 0,
            digest: crate::chunk::ChunkDigest::of(&[tag]),
        }
    }

    fn recorded(op: NameOp, ino: u64, name: &[u8]) -> RecordedName {
        RecordedName {
            op,
            ino,
            name: name.into(),
            since_mount_ms: 3,
        }
    }

    #[test]
    fn a_recorded_name_becomes_the_path_it_is_about() {
        let paths: HashMap<u64, String> = [(2, "usr".to_owned()), (3, "usr/lib".to_owned())].into();
        let path = |n: RecordedName| name_entry(n, &paths).map(|e| (e.path, e.op));
        assert_eq!(
            path(recorded(NameOp::Lookup, ROOT, b"etc")),
            Some(("etc".to_owned(), NameOp::Lookup))
        );
        assert_eq!(
            path(recorded(NameOp::Lookup, 3, b"libc.so.6")),
            Some(("usr/lib/libc.so.6".to_owned(), NameOp::Lookup))
        );
        assert_eq!(
            path(recorded(NameOp::List, 2, b"")),
            Some(("usr".to_owned(), NameOp::List))
        );
        assert_eq!(
            path(recorded(NameOp::List, ROOT, b"")),
            None,
            "the root has no path"
        );
        assert_eq!(
            path(recorded(NameOp::Lookup, 3, b"\xff")),
            None,
            "not UTF-8"
        );
        assert_eq!(
            path(recorded(NameOp::Readlink, 9, b"")),
            None,
            "an inode without a path"
        );
    }

    #[test]
    fn later_parts_of_a_span_join_the_batch_that_has_its_first() {
        // Span A's first part, 4 MiB of other spans (a batch full), then span A's later part
        // and a chunk of a new span.
        let plan = vec![
            chunk(0, 100, 1 << 20, 1),
            chunk(1000, 2000, 3 << 20, 2),
            chunk(5000, 6000, 1 << 20, 3),
            chunk(0, 300, 1 << 20, 4),
            chunk(7000, 8000, 1 << 20, 5),
        ];
        let batches = batch_plan(plan);
        let tags: Vec<Vec<u32>> = batches
            .iter()
            .map(|b| b.iter().map(|c| c.id.0).collect())
            .collect();
        assert_eq!(tags, vec![vec![1, 2, 4], vec![3, 5]]);
    }

    #[tokio::test]
    async fn a_plan_fetches_every_file_of_a_shared_span() {
        let files: Vec<(String, Vec<u8>)> = (0..12)
            .map(|i| {
                (
                    format!("m{i}.py"),
                    format!("def f{i}(): pass\n").repeat(50).into_bytes(),
                )
            })
            .collect();
        let (blob, digest, opened, windows) = gzip_index_layer(&files, 1 << 20);
        let layout = plan_all(&opened.index);
        assert!(
            layout.len() == files.len() && layout.iter().all(|c| c.digest == layout[0].digest),
            "the files are pieces of one span"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let reader = LayerReader::new(
            Arc::new(FixtureBlob {
                blob,
                ..FixtureBlob::default()
            }),
            BlobId::new(&digest, None),
            opened.decoder,
            Arc::new(LocalStore::open(dir.path(), 0).expect("store")),
            Arc::new(Fetches::new(2)),
        )
        .with_side(Some(windows));
        let fetched = fetch_plan(&reader, layout.clone(), Priority::Prefetch, 2)
            .await
            .expect("plan");
        let bytes: u64 = files.iter().map(|(_, d)| d.len() as u64).sum();
        assert_eq!(fetched, bytes, "every file's piece");
        assert!(reader.is_cached(&layout));
    }
}
