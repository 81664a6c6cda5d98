//! When a mounted layer whose format needs it gets its whole-blob check
//! (`crate::layer::verify`), and what follows the verdict. The check runs as the layer's
//! background fetch when that is on (the walk fetches what is missing from the bytes it
//! hashes); otherwise once containers' reads have fetched the whole layer, when it costs one
//! more pass over the blob. The verdict is saved with the layer's state, logged once, and a
//! bad layer's chunks leave the store (its reads fail before they reach it anyway).

use std::sync::Arc;
use std::time::Duration;

use crate::cache::ChunkStore;
use crate::chunk::ChunkSpec;
use crate::layer::verify::{self, Verdict};
use crate::layer::{LayerReader, Priority, StateDir};
use crate::prefetch::{self, Activity, ActivityCell};

/// How long reads must pause before a layer they may have completed is looked at again:
/// a container reading a layer through fetches it in many small steps.
const SETTLE: Duration = Duration::from_secs(1);

/// What the check of one layer needs.
pub(super) struct Check {
    pub digest: String,
    pub blob_size: u64,
    pub reader: Arc<LayerReader>,
    /// Every chunk of the layer, in blob order.
    pub layout: Arc<[ChunkSpec]>,
    pub store: Arc<dyn ChunkStore>,
    pub states: StateDir,
    pub activity: Arc<ActivityCell>,
}

impl Check {
    /// The layer's background fetch, checking the blob on the way; what the walk could not
    /// store is then fetched the ordinary way.
    pub async fn in_background_fetch(self) {
        self.activity.set(Activity::Background);
        self.run().await;
        if self.reader.verdict().refusal().is_none() {
            let plan = self.layout.to_vec();
            if let Err(e) = prefetch::fetch_plan(&self.reader, plan, Priority::Background, 1).await
            {
                tracing::warn!(layer = %self.digest, error = %crate::error_chain(&e), "background fetch stopped");
            }
        }
        self.activity.set(Activity::Ready);
    }

    /// Waits until reads have stored every chunk of the layer, then checks it.
    pub async fn once_complete(self) {
        loop {
            self.reader.stored_more().await;
            tokio::time::sleep(SETTLE).await;
            if self.reader.is_cached(&self.layout) {
                break;
            }
        }
        self.run().await;
    }

    async fn run(&self) {
        let started = std::time::Instant::now();
        let before = self
            .reader
            .counters()
            .fetched_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        let result = verify::walk(
            &self.reader,
            &self.layout,
            self.blob_size,
            &self.digest,
            Priority::Background,
        )
        .await;
        let fetched = self
            .reader
            .counters()
            .fetched_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
            .saturating_sub(before);
        let verdict = match result {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(layer = %self.digest, error = %crate::error_chain(&e), "the layer could not be checked against its digest; it will be at its next mount");
                return;
            }
        };
        if !self.reader.verdict().set(verdict.clone()) {
            return;
        }
        match &verdict {
            Verdict::Verified => tracing::info!(
                layer = %self.digest,
                blob_bytes = self.blob_size,
                fetched_bytes = fetched,
                elapsed = ?started.elapsed(),
                "layer verified: its blob hashes to its digest"
            ),
            Verdict::Bad { expected, got } => {
                tracing::warn!(
                    layer = %self.digest,
                    expected = %expected,
                    got = %got,
                    "layer is bad: its blob does not hash to the digest the image names; its reads fail with EIO"
                );
                let evicted = self
                    .store
                    .evict(self.reader.blob_id(), self.layout.to_vec())
                    .await;
                tracing::debug!(layer = %self.digest, ?evicted, "evicted the bad layer's chunks");
            }
        }
        let (states, digest) = (self.states.clone(), self.digest.clone());
        let saved =
            tokio::task::spawn_blocking(move || states.save_verdict(&digest, &verdict)).await;
        match saved {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %crate::error_chain(&e), "saving the layer's verdict failed")
            }
            Err(e) => tracing::warn!(error = %e, "saving the layer's verdict failed"),
        }
    }
}
