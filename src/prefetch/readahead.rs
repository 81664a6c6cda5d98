//! Readahead for files read sequentially: when a read starts where the previous read of the
//! same file ended, fetch ahead of it, starting with 256 KiB and doubling while the pattern
//! holds, up to a configured maximum. The kernel asks for 128 KiB at a time; without this,
//! every read that crosses into a new chunk would wait for a round trip to the registry.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;

const INITIAL_WINDOW: u64 = 256 << 10;
/// Files tracked at once; past it the table starts over (a cheap bound, not an LRU: losing
/// a file's state costs one read's worth of readahead).
const MAX_FILES: usize = 4096;

pub struct Readahead {
    max_window: u64,
    files: Mutex<HashMap<u64, Sequence>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Sequence {
    /// Where the next sequential read would start.
    next: u64,
    window: u64,
    /// How far readahead has already been asked for.
    ahead_until: u64,
}

impl Readahead {
    /// `max_window` bytes at most ahead of a reader; 0 turns readahead off.
    pub fn new(max_window: u64) -> Self {
        Readahead {
            max_window,
            files: Mutex::default(),
        }
    }

    /// Notes a read of `range` of file `ino` (of `size` bytes); returns what to fetch ahead.
    pub fn on_read(&self, ino: u64, range: Range<u64>, size: u64) -> Option<Range<u64>> {
        if self.max_window == 0 {
            return None;
        }
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if files.len() >= MAX_FILES && !files.contains_key(&ino) {
            files.clear();
        }
        let seq = files.entry(ino).or_default();
        let sequential = range.start == seq.next;
        seq.next = range.end;
        if !sequential {
            seq.window = 0;
            seq.ahead_until = range.end;
            return None;
        }
        seq.window = if seq.window == 0 {
            INITIAL_WINDOW.min(self.max_window)
        } else {
            (seq.window * 2).min(self.max_window)
        };
        let target = (range.end + seq.window).min(size);
        // Ask again only once the reader has used up half of what was asked for, so a run of
        // 128 KiB reads makes a few large requests rather than many small ones.
        let from = seq.ahead_until.max(range.end);
        if target <= from || seq.ahead_until >= range.end + seq.window / 2 {
            return None;
        }
        seq.ahead_until = target;
        Some(from..target)
    }

    /// Forgets a file (closed, or its layer unmounted).
    pub fn forget(&self, ino: u64) {
        self.files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ino);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K128: u64 = 128 << 10;

    #[test]
    fn sequential_reads_grow_the_window_random_reads_get_none() {
        let r = Readahead::new(4 << 20);
        let size = 64 << 20;
        let first = r
            .on_read(1, 0..K128, size)
            .expect("a read from 0 starts a sequence");
        assert_eq!(first, K128..K128 + INITIAL_WINDOW);
        let mut asked = vec![first];
        let mut at = K128;
        for _ in 0..40 {
            if let Some(range) = r.on_read(1, at..at + K128, size) {
                assert_eq!(range.start, asked.last().expect("some").end, "contiguous");
                asked.push(range);
            }
            at += K128;
        }
        let widest = asked.iter().map(|r| r.end - r.start).max().expect("some");
        assert!(widest > INITIAL_WINDOW, "window grew: {asked:?}");
        assert!(asked.iter().all(|r| r.end - r.start <= 4 << 20));
        assert!(asked.len() < 40, "fewer, larger requests: {}", asked.len());
        assert_eq!(r.on_read(2, 10 << 20..(10 << 20) + K128, size), None);
        assert_eq!(r.on_read(1, 0..K128, size), None, "a jump back resets");
    }

    #[test]
    fn stops_at_the_end_of_the_file_and_can_be_off() {
        let r = Readahead::new(4 << 20);
        assert_eq!(r.on_read(1, 0..1000, 1000), None, "nothing past the end");
        let off = Readahead::new(0);
        assert_eq!(off.on_read(1, 0..K128, 1 << 30), None);
    }
}
