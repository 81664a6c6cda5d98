//! Whole-layer verification, for formats whose chunk digests do not come from the image
//! (gzip-index: the span digests are whoever pushed the index's word). Only the layer digest
//! in the image manifest ties the bytes to the image, and it covers the compressed blob as a
//! whole, so it can be checked only once every byte has been seen, in order.
//!
//! [`walk`] goes through the blob from its start in windows of bounded size, hashes each
//! window and stores from the same bytes the chunks of it that are not cached yet: run as the
//! layer's background fetch, every byte is fetched once and hashed once, and only what was
//! fetched before the walk reached it (what the container's start read on demand or by
//! prefetch) crosses the network a second time. A mismatch makes the layer bad for good
//! ([`VerdictCell`]): its reads fail.

use std::ops::Range;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{LayerReader, Priority, ReadError};
use crate::chunk::ChunkSpec;

/// Compressed bytes one step of the walk fetches and holds: a few MiB, so the memory it
/// takes is bounded (and counted against `[cache] memory_bytes` by the reader), and a
/// container's read queued behind it waits little.
pub const WINDOW: u64 = 4 << 20;

/// What the whole-blob check found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "lowercase")]
pub enum Verdict {
    /// The compressed bytes hash to the layer digest.
    Verified,
    /// They do not: the registry serves other bytes than the image names, even if every span
    /// matched the index.
    Bad { expected: String, got: String },
}

impl Verdict {
    pub fn as_str(&self) -> &'static str {
        match self {
            Verdict::Verified => "verified",
            Verdict::Bad { .. } => "bad",
        }
    }
}

/// A layer's verdict, set once, read on every read of the layer (an atomic load).
#[derive(Debug, Default)]
pub struct VerdictCell {
    /// Whether the layer's format needs the check at all.
    needed: bool,
    verdict: OnceLock<Verdict>,
}

impl VerdictCell {
    /// For a layer whose format needs (`needed`) or does not need the check; `known` is a
    /// verdict saved by an earlier daemon.
    pub fn new(needed: bool, known: Option<Verdict>) -> Self {
        let verdict = OnceLock::new();
        if let Some(v) = known {
            let _ = verdict.set(v);
        }
        VerdictCell { needed, verdict }
    }

    pub fn needed(&self) -> bool {
        self.needed
    }

    pub fn get(&self) -> Option<&Verdict> {
        self.verdict.get()
    }

    /// Records `verdict`; false when one was recorded already (it stands).
    pub fn set(&self, verdict: Verdict) -> bool {
        self.verdict.set(verdict).is_ok()
    }

    /// "" (not needed), "pending", "verified" or "bad", for reports.
    pub fn label(&self) -> &'static str {
        match (self.needed, self.get()) {
            (false, _) => "",
            (true, None) => "pending",
            (true, Some(v)) => v.as_str(),
        }
    }

    /// The read error of a bad layer, if it is one.
    pub fn refusal(&self) -> Option<ReadError> {
        match self.get() {
            Some(Verdict::Bad { expected, got }) => Some(ReadError::LayerBad {
                expected: expected.clone(),
                got: got.clone(),
            }),
            _ => None,
        }
    }
}

/// Why a walk could not reach a verdict.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("the layer digest {0:?} is not a sha256 digest; it cannot be checked")]
    Algorithm(String),
    #[error("fetching blob bytes {}..{} to check the layer digest", range.start, range.end)]
    Fetch {
        range: Range<u64>,
        #[source]
        source: ReadError,
    },
}

/// The bytes the step at `pos` fetches: from `pos` (or a little before, to take in whole a
/// chunk begun in the previous step's bytes but not ended in them: a gzip-index span shares
/// its first byte or two with the one before) to `pos + WINDOW`, widened to the end of the
/// chunks that start before that (a chunk is stored only from a step that holds all of it),
/// but never past `pos + 2 * WINDOW`: a chunk longer than that is left to the ordinary fetch.
fn window(layout: &[ChunkSpec], pos: u64, size: u64) -> Range<u64> {
    let nominal = pos.saturating_add(WINDOW).min(size);
    let cap = pos.saturating_add(2 * WINDOW).min(size);
    let back = pos.saturating_sub(WINDOW);
    let first = layout.partition_point(|c| c.blob_range.end <= pos);
    let mut end = nominal;
    let mut from = pos;
    for c in &layout[first..] {
        if c.blob_range.start >= nominal {
            break;
        }
        if c.blob_range.end > end && c.blob_range.end <= cap {
            end = c.blob_range.end;
        }
        if c.blob_range.start < from && c.blob_range.start >= back {
            from = c.blob_range.start;
        }
    }
    from..end
}

/// The chunks of `layout` (blob order) lying wholly within `range`.
fn within<'a>(layout: &'a [ChunkSpec], range: &Range<u64>) -> Vec<&'a ChunkSpec> {
    let first = layout.partition_point(|c| c.blob_range.start < range.start);
    layout[first..]
        .iter()
        .take_while(|c| c.blob_range.start < range.end)
        .filter(|c| c.blob_range.end <= range.end)
        .collect()
}

/// The `sha256:` digest of bytes fed window by window.
struct Running(Sha256);

/// Walks the whole blob of `size` bytes in order at `priority`, storing the chunks of
/// `layout` (every chunk, in blob order) that are not cached, and returns whether the bytes
/// hash to `expected`. Chunks the walk could not store (one longer than two windows, one
/// that fails its own digest) are left to the caller's ordinary fetch.
pub async fn walk(
    reader: &LayerReader,
    layout: &[ChunkSpec],
    size: u64,
    expected: &str,
    priority: Priority,
) -> Result<Verdict, VerifyError> {
    if !expected.starts_with("sha256:") {
        return Err(VerifyError::Algorithm(expected.to_owned()));
    }
    let mut running = Running(Sha256::new());
    let mut pos = 0;
    while pos < size {
        let range = window(layout, pos, size);
        let end = range.end;
        let chunks: Vec<ChunkSpec> = within(layout, &range).into_iter().cloned().collect();
        // Bytes before `pos` were hashed by the previous step.
        let skip = (pos - range.start) as usize;
        running = reader
            .fetch_through(range.clone(), &chunks, priority, move |bytes| {
                running.0.update(bytes.get(skip..).unwrap_or_default());
                running
            })
            .await
            .map_err(|source| VerifyError::Fetch {
                range: range.clone(),
                source,
            })?;
        pos = end;
    }
    let got = format!("sha256:{}", hex::encode(running.0.finalize()));
    Ok(verdict(expected, got))
}

fn verdict(expected: &str, got: String) -> Verdict {
    if got == expected {
        Verdict::Verified
    } else {
        Verdict::Bad {
            expected: expected.to_owned(),
            got,
        }
    }
}

#[cfg(test)]
#[path = "verify_tests.rs"]
mod tests;
