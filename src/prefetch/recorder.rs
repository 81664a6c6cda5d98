//! Records, for one mount of a lazy layer, the order in which containers first read its
//! chunks during a window after the mount, and the names the kernel first asked it about
//! (lookups, listings, symlink reads). Cheap on the request path: one lock and one set
//! lookup per chunk or name while the window is open, one atomic load after it closes.

use std::collections::{HashMap, HashSet};
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

/// What the kernel asked of a name, the first time it asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NameOp {
    /// A name looked up in a directory, found or not.
    Lookup,
    /// A directory listed.
    List,
    /// A symlink's target read.
    Readlink,
}

/// One first request about a name: `ino` is the directory looked in (`Lookup`), the
/// directory listed (`List`) or the symlink (`Readlink`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedName {
    pub op: NameOp,
    pub ino: u64,
    /// The name looked up; empty for the other requests.
    pub name: Box<[u8]>,
    pub since_mount_ms: u64,
}

pub struct ReadRecorder {
    started: Instant,
    window: Duration,
    max: usize,
    max_names: usize,
    closed: AtomicBool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    seen: HashSet<(u64, u64)>,
    /// Recorded since the last `take`.
    fresh: Vec<Recorded>,
    /// Names seen, by request and inode (so a name seen before costs no allocation).
    seen_names: HashMap<(NameOp, u64), HashSet<Box<[u8]>>>,
    names_seen: usize,
    /// Recorded since the last `take_names`.
    fresh_names: Vec<RecordedName>,
}

impl ReadRecorder {
    /// Records for `window` after now, at most `max` chunks and `max_names` names.
    pub fn new(window: Duration, max: usize, max_names: usize) -> Self {
        ReadRecorder {
            started: Instant::now(),
            window,
            max,
            max_names,
            closed: AtomicBool::new(window.is_zero()),
            state: Mutex::default(),
        }
    }

    /// The time since the mount while the window is open; closes it once it has passed.
    fn open_for(&self) -> Option<Duration> {
        if self.closed.load(Ordering::Relaxed) {
            return None;
        }
        let elapsed = self.started.elapsed();
        if elapsed > self.window {
            self.closed.store(true, Ordering::Relaxed);
            return None;
        }
        Some(elapsed)
    }

    /// Notes that a container read `chunks` of file `ino`.
    pub fn record(&self, ino: u64, chunks: &[ChunkSpec]) {
        let Some(elapsed) = self.open_for() else {
            return;
        };
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

    /// Notes that the kernel asked `op` of `ino` (and `name`, for a lookup).
    pub fn record_name(&self, op: NameOp, ino: u64, name: &[u8]) {
        if self.max_names == 0 {
            return;
        }
        let Some(elapsed) = self.open_for() else {
            return;
        };
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.names_seen >= self.max_names {
            return;
        }
        let seen = state.seen_names.entry((op, ino)).or_default();
        if seen.contains(name) {
            return;
        }
        seen.insert(name.into());
        state.names_seen += 1;
        state.fresh_names.push(RecordedName {
            op,
            ino,
            name: name.into(),
            since_mount_ms: elapsed.as_millis() as u64,
        });
    }

    /// The names recorded since the last call.
    pub fn take_names(&self) -> Vec<RecordedName> {
        std::mem::take(
            &mut self
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .fresh_names,
        )
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
        let r = ReadRecorder::new(Duration::from_secs(60), 100, 10);
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
        let r = ReadRecorder::new(Duration::ZERO, 100, 10);
        r.record(1, &[chunk(0)]);
        assert!(r.take().is_empty());
        assert!(r.is_closed());
        let r = ReadRecorder::new(Duration::from_secs(60), 2, 10);
        r.record(1, &[chunk(0), chunk(10), chunk(20)]);
        assert_eq!(r.take().len(), 2);
    }

    #[test]
    fn records_each_name_request_once_in_order_within_its_bound() {
        let r = ReadRecorder::new(Duration::from_secs(60), 100, 3);
        r.record_name(NameOp::Lookup, 1, b"usr");
        r.record_name(NameOp::Lookup, 1, b"usr");
        r.record_name(NameOp::List, 2, b"");
        r.record_name(NameOp::Lookup, 2, b"lib");
        r.record_name(NameOp::Readlink, 9, b"");
        let taken = r.take_names();
        let got: Vec<(NameOp, u64, &[u8])> =
            taken.iter().map(|n| (n.op, n.ino, &n.name[..])).collect();
        assert_eq!(
            got,
            [
                (NameOp::Lookup, 1, &b"usr"[..]),
                (NameOp::List, 2, &b""[..]),
                (NameOp::Lookup, 2, &b"lib"[..])
            ],
            "each once, and no more than the bound"
        );
        assert!(r.take().is_empty(), "names are not chunk reads");
        let off = ReadRecorder::new(Duration::from_secs(60), 100, 0);
        off.record_name(NameOp::Lookup, 1, b"usr");
        assert!(off.take_names().is_empty(), "a bound of 0 records none");
    }
}
