//! What the fetches of every mounted layer share: the priority gate that puts a container's
//! reads before prefetch and prefetch before background fetch, and the figures (latency
//! histogram, requests in flight) that metrics show.
//!
//! Priorities are enforced where work is admitted, not by cancelling requests: a prefetch or
//! background batch starts only while no container read is waiting on the network, and a
//! background batch only while no prefetch runs either. A batch already on the wire finishes;
//! batches are small (one merged range request of a few MiB at most), so a container's read
//! waits behind at most the batches in flight, which `concurrency` bounds.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, SemaphorePermit};

/// Who asked for a fetch, in order of precedence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// A container's read: never waits for anything but the network.
    Demand,
    /// Fetching ahead of a file read sequentially: admitted like a container's read (it is
    /// one, a little early), but counted as prefetch.
    Readahead,
    /// Trace or landmark prefetch.
    Prefetch,
    /// Fetching the rest of a layer so it stops depending on the registry.
    Background,
}

/// Fetched bytes in memory at once when nothing is configured.
const DEFAULT_MEMORY: u64 = 64 << 20;
/// The least the bound may be: two of the largest merged requests.
const MIN_MEMORY: u64 = 16 << 20;

/// Upper bounds (seconds) of the fetch latency histogram's buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// A fixed-bucket histogram of durations, lock-free, in Prometheus' cumulative shape.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Count of observations at or below each bound of `LATENCY_BUCKETS` (not cumulative).
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// (bucket bound, cumulative count) pairs, then the total count and sum in seconds.
    pub fn snapshot(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let mut cumulative = 0;
        let buckets = LATENCY_BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(bound, n)| {
                cumulative += n.load(Ordering::Relaxed);
                (*bound, cumulative)
            })
            .collect();
        (
            buckets,
            self.count.load(Ordering::Relaxed),
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
        )
    }
}

/// Shared by every layer reader of the daemon.
#[derive(Debug)]
pub struct Fetches {
    /// Container reads waiting on the network now.
    demand_waiting: AtomicUsize,
    /// Prefetch batches admitted and not finished.
    prefetching: AtomicUsize,
    changed: Notify,
    /// Bounds prefetch and background batches in flight together.
    permits: Semaphore,
    /// Fetched bytes held in memory at once (KiB), between the network and the store: what
    /// `[cache] memory_bytes` bounds.
    buffers: Semaphore,
    buffer_kib: u32,
    /// Range requests to registries: latency, and how many are on the wire now.
    pub latency: Histogram,
    pub in_flight: AtomicI64,
}

/// Held while a container's read waits on the network; prefetch holds back meanwhile.
pub struct DemandGuard<'a>(&'a Fetches);

impl Drop for DemandGuard<'_> {
    fn drop(&mut self) {
        self.0.demand_waiting.fetch_sub(1, Ordering::AcqRel);
        self.0.changed.notify_waiters();
    }
}

/// Admission of one prefetch or background batch.
pub struct Admission<'a> {
    fetches: &'a Fetches,
    _permit: SemaphorePermit<'a>,
    prefetch: bool,
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if self.prefetch {
            self.fetches.prefetching.fetch_sub(1, Ordering::AcqRel);
        }
        self.fetches.changed.notify_waiters();
    }
}

impl Fetches {
    /// `concurrency`: prefetch and background batches in flight at once.
    pub fn new(concurrency: usize) -> Self {
        Self::with_memory(concurrency, DEFAULT_MEMORY)
    }

    /// Also bounds the fetched bytes held in memory at once to `memory_bytes` (at least one
    /// largest request's worth, so every request can proceed).
    pub fn with_memory(concurrency: usize, memory_bytes: u64) -> Self {
        let kib = (memory_bytes / 1024).clamp(MIN_MEMORY / 1024, u64::from(u32::MAX >> 4)) as u32;
        Fetches {
            buffers: Semaphore::new(kib as usize),
            buffer_kib: kib,
            demand_waiting: AtomicUsize::new(0),
            prefetching: AtomicUsize::new(0),
            changed: Notify::new(),
            permits: Semaphore::new(concurrency.max(1)),
            latency: Histogram::default(),
            in_flight: AtomicI64::new(0),
        }
    }

    /// Waits until `bytes` of fetched data may be held in memory; the permit gives them back.
    pub async fn buffer(&self, bytes: u64) -> Option<SemaphorePermit<'_>> {
        let kib = bytes.div_ceil(1024).min(u64::from(self.buffer_kib)) as u32;
        self.buffers.acquire_many(kib).await.ok()
    }

    pub fn demand(&self) -> DemandGuard<'_> {
        self.demand_waiting.fetch_add(1, Ordering::AcqRel);
        DemandGuard(self)
    }

    /// Waits until a batch of `priority` may start. `Demand` is admitted at once (containers'
    /// reads are never queued behind anything of ours).
    pub async fn admit(&self, priority: Priority) -> Option<Admission<'_>> {
        if matches!(priority, Priority::Demand | Priority::Readahead) {
            return None;
        }
        loop {
            self.wait_until(|f| f.yields_to_others(priority)).await;
            let permit = self.permits.acquire().await.ok()?;
            // Re-check after the (possibly long) wait for a permit.
            if !self.yields_to_others(priority) {
                if priority == Priority::Prefetch {
                    self.prefetching.fetch_add(1, Ordering::AcqRel);
                }
                return Some(Admission {
                    fetches: self,
                    _permit: permit,
                    prefetch: priority == Priority::Prefetch,
                });
            }
        }
    }

    /// Whether work of `priority` must wait for something more important.
    fn yields_to_others(&self, priority: Priority) -> bool {
        let demand = self.demand_waiting.load(Ordering::Acquire) > 0;
        match priority {
            Priority::Demand | Priority::Readahead => false,
            Priority::Prefetch => demand,
            Priority::Background => demand || self.prefetching.load(Ordering::Acquire) > 0,
        }
    }

    async fn wait_until(&self, blocked: impl Fn(&Self) -> bool) {
        loop {
            let notified = self.changed.notified();
            if !blocked(self) {
                return;
            }
            // The timeout only guards against a lost wake-up; notify_waiters covers the rest.
            let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
        }
    }

    /// Container reads waiting on the network now (for metrics).
    pub fn demand_waiting(&self) -> usize {
        self.demand_waiting.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    // Paused time: the sleeps below order the steps without costing real time, and a slow
    // machine cannot reorder them.
    #[tokio::test(start_paused = true)]
    async fn prefetch_waits_for_demand_and_background_for_prefetch() {
        let fetches = Arc::new(Fetches::new(2));
        let demand = fetches.demand();
        let f = fetches.clone();
        let prefetch = tokio::spawn(async move {
            let _admitted = f.admit(Priority::Prefetch).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !prefetch.is_finished(),
            "prefetch held back by a demand read"
        );
        assert_eq!(fetches.prefetching.load(Ordering::Relaxed), 0);
        drop(demand);
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(fetches.prefetching.load(Ordering::Relaxed), 1, "admitted");
        let f = fetches.clone();
        let background = tokio::spawn(async move {
            let _admitted = f.admit(Priority::Background).await;
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!background.is_finished(), "background waits for prefetch");
        prefetch.await.expect("prefetch");
        tokio::time::timeout(Duration::from_secs(1), background)
            .await
            .expect("background admitted once prefetch is done")
            .expect("join");
    }

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(30));
        h.observe(Duration::from_secs(60));
        let (buckets, count, sum) = h.snapshot();
        assert_eq!(buckets[0], (0.001, 1));
        assert_eq!(buckets.last().copied(), Some((10.0, 2)));
        assert_eq!(count, 3);
        assert!((sum - 60.0305).abs() < 1e-6, "{sum}");
    }
}
