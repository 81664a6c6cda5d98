//! Records, for one mount of a lazy layer, the order in which containers first read its
//! chunks during a window after the mount. Cheap on the read path: one lock and one set
//! lookup per chunk while the window is open, one atomic load after it closes.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::chunk::ChunkSpec;

/// One first read: a chunk of file `ino` at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    pub ino: u64,
    pub offset: u64,
    pub len: u64,
    pub since_mount_ms: u64,
}

pub struct ReadRecorder {
    started: Instant,
    window: Duration,
    max: usize,
    closed: AtomicBool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    seen: HashSet<(u64, u64)>,
    /// Recorded since the last `take`.
    fresh: Vec<Recorded>,
}

impl ReadRecorder {
    /// Records for `window` after now, at most `max` chunks.
    pub fn new(window: Duration, max: usize) -> Self {
        ReadRecorder {
            started: Instant::now(),
            window,
            max,
            closed: AtomicBool::new(window.is_zero()),
            state: Mutex::default(),
        }
    }

    /// Notes that a container read `chunks` of file `ino`.
    pub fn record(&self, ino: u64, chunks: &[ChunkSpec]) {
        if self.closed.load(Ordering::Relaxed) {
            return;
        }
        let elapsed = self.started.elapsed();
        if elapsed > self.window {
            self.closed.store(true, Ordering::Relaxed);
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for chunk in chunks {
            if state.seen.len() >= self.max {
                self.closed.store(true, Ordering::Relaxed);
                return;
            }
            if state.seen.insert((ino, chunk.file_offset)) {
                state.fresh.push(Recorded {
                    ino,
                    offset: chunk.file_offset,
                    len: chunk.len,
                    since_mount_ms: elapsed.as_millis() as u64,
                });
            }
        }
    }

    /// What was recorded since the last call.
    pub fn take(&self) -> Vec<Recorded> {
        std::mem::take(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()).fresh)
    }

    /// Whether the window is over (nothing more will be recorded).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed) || self.started.elapsed() > self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{ChunkDigest, ChunkId};

    fn chunk(offset: u64) -> ChunkSpec {
        ChunkSpec {
            id: ChunkId(offset as u32),
            file: Default::default(),
            file_offset: offset,
            len: 10,
            blob_range: 0..1,
            inner_offset: 0,
            within: 0,
            digest: ChunkDigest::of(&offset.to_le_bytes()),
        }
    }

    #[test]
    fn records_first_reads_once_in_order_within_the_window() {
        let r = ReadRecorder::new(Duration::from_secs(60), 100);
        r.record(5, &[chunk(0), chunk(10)]);
        r.record(7, &[chunk(0)]);
        r.record(5, &[chunk(10)]);
        let got: Vec<(u64, u64)> = r.take().iter().map(|e| (e.ino, e.offset)).collect();
        assert_eq!(got, [(5, 0), (5, 10), (7, 0)]);
        assert!(r.take().is_empty(), "taken once");
        r.record(5, &[chunk(0)]);
        assert!(r.take().is_empty(), "a repeat read is not a first read");
    }

    #[test]
    fn closed_window_and_bound_stop_recording() {
        let r = ReadRecorder::new(Duration::ZERO, 100);
        r.record(1, &[chunk(0)]);
        assert!(r.take().is_empty());
        assert!(r.is_closed());
        let r = ReadRecorder::new(Duration::from_secs(60), 2);
        r.record(1, &[chunk(0), chunk(10), chunk(20)]);
        assert_eq!(r.take().len(), 2);
    }
}
