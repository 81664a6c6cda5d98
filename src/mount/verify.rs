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

    /// Waits until reads have stored every chunk of the layer (it may be so already: a
    /// restart before the check ended), then checks it.
    pub async fn once_complete(self) {
        while !self.reader.is_cached(&self.layout) {
            self.reader.stored_more().await;
            tokio::time::sleep(SETTLE).await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::LocalStore;
    use crate::chunk::BlobId;
    use crate::layer::verify::VerdictCell;
    use crate::layer::Fetches;
    use crate::test_utils::{gzip_index_layer, FixtureBlob};

    #[tokio::test]
    async fn a_layer_read_whole_is_checked_and_its_verdict_saved() {
        let files: Vec<(String, Vec<u8>)> = (0..6)
            .map(|i| {
                (
                    format!("f{i}"),
                    format!("file {i}\n").repeat(40_000).into_bytes(),
                )
            })
            .collect();
        let (blob, digest, opened, windows) = gzip_index_layer(&files, 256 << 10);
        let dir = tempfile::tempdir().expect("tempdir");
        let states = StateDir::new(dir.path().join("layers"));
        std::fs::create_dir_all(states.layer_dir(&digest)).expect("state dir");
        let store: Arc<dyn ChunkStore> =
            Arc::new(LocalStore::open(&dir.path().join("store"), 0).expect("store"));
        let verdict = Arc::new(VerdictCell::new(true, None));
        let layout: Arc<[ChunkSpec]> = Arc::from(opened.index.chunks_in_blob_order());
        let blob_size = blob.len() as u64;
        let reader = Arc::new(
            LayerReader::new(
                Arc::new(FixtureBlob {
                    blob,
                    ..FixtureBlob::default()
                }),
                BlobId::new(&digest, None),
                opened.decoder,
                store.clone(),
                Arc::new(Fetches::new(2)),
            )
            .with_side(Some(windows))
            .with_verdict(verdict.clone()),
        );
        let check = Check {
            digest: digest.clone(),
            blob_size,
            reader: reader.clone(),
            layout: layout.clone(),
            store,
            states: states.clone(),
            activity: Arc::default(),
        };
        let task = tokio::spawn(check.once_complete());
        // Half the layer: no check yet.
        let half = &layout[..layout.len() / 2];
        for c in half {
            reader
                .read(std::slice::from_ref(c), c.file_offset..c.file_offset + 1)
                .await
                .expect("read");
        }
        tokio::time::sleep(SETTLE * 2).await;
        assert_eq!(verdict.label(), "pending", "not complete, not checked");
        for c in layout.iter() {
            reader
                .read(std::slice::from_ref(c), c.file_offset..c.file_offset + 1)
                .await
                .expect("read");
        }
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("checked soon after the last read")
            .expect("task");
        assert_eq!(verdict.get(), Some(&Verdict::Verified));
        assert_eq!(states.load_verdict(&digest), Some(Verdict::Verified));
    }
}
