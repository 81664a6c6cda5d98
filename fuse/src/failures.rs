//! Reads that recently failed with `EIO`, so that the kernel's retries of them fail at once.
//!
//! When a FUSE read of a page-cache range fails, the kernel does not give up: it retries the
//! page the reader is waiting on with a read of its own (and a reader that gets `EIO` often
//! tries again itself). Each retry is a fresh request that would wait out the read deadline
//! again, so one `read(2)` took two or three deadlines. Remembering the failed range for the
//! reading task, briefly, and failing that task's overlapping reads immediately bounds a
//! `read(2)` by one deadline, however the kernel retries. For the reading task: the kernel
//! retries in the context of the task whose read failed, while another process reading the
//! same file (a new container once the registry is back) deserves a fresh try. Briefly: the
//! retries come within milliseconds.
//!
//! Failures are also what an operator needs to see, but a container hammering an unreachable
//! registry fails thousands of reads; the log gets one line per mount and kind per window,
//! with the count of failures since the previous line.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::warn;

use crate::Ino;

/// The longest a failure is remembered: far longer than the kernel takes to retry a read, far
/// shorter than an operator takes to bring a registry back.
const REMEMBER_AT_MOST: Duration = Duration::from_secs(1);

/// Above this many inodes with remembered failures, expired ones are swept on every record,
/// so a mount whose every file failed once does not keep them all.
const SWEEP_ABOVE: usize = 64;

/// Why a read failed, for the log's throttling: a timeout does not hide a source error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureKind {
    /// The read missed the mount's deadline.
    Timeout,
    /// The source answered with an error (or too few bytes).
    Source,
}

/// The recently failed reads of one mount.
#[derive(Debug)]
pub(crate) struct ReadFailures {
    /// The log's throttling window (the mount's read timeout).
    window: Duration,
    /// How long a failure is remembered: the window, at most `REMEMBER_AT_MOST`.
    remember: Duration,
    /// The mount's name (its fsname), for the log.
    mount: String,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    failed: HashMap<Ino, Vec<Failed>>,
    timeouts: Throttle,
    errors: Throttle,
}

#[derive(Debug)]
struct Failed {
    range: Range<u64>,
    /// The task whose read failed, as the FUSE request names it.
    pid: u32,
    until: Instant,
    reason: Arc<str>,
}

/// One log line per window; what happened in between is counted.
#[derive(Debug, Default)]
struct Throttle {
    last: Option<Instant>,
    /// Failures (including fast ones) not logged since `last`.
    unlogged: u64,
}

impl Throttle {
    /// Whether to log now; if so, returns the failures not logged since the previous line.
    fn admit(&mut self, now: Instant, window: Duration) -> Option<u64> {
        match self.last {
            Some(last) if now.duration_since(last) < window => {
                self.unlogged += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.unlogged))
            }
        }
    }
}

impl ReadFailures {
    pub(crate) fn new(window: Duration, mount: String) -> Self {
        Self {
            window,
            remember: window.min(REMEMBER_AT_MOST),
            mount,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The reason of a remembered failure overlapping `range` of `ino`, if there is one: the
    /// read should fail with `EIO` at once. Called on the dispatch thread; it only takes a
    /// short lock.
    pub(crate) fn check(&self, ino: Ino, range: &Range<u64>, pid: u32) -> Option<Arc<str>> {
        let now = Instant::now();
        let mut state = self.lock();
        let failed = state.failed.get_mut(&ino)?;
        failed.retain(|f| f.until > now);
        let reason = failed
            .iter()
            .find(|f| f.pid == pid && f.range.start < range.end && range.start < f.range.end)
            .map(|f| Arc::clone(&f.reason));
        if failed.is_empty() {
            state.failed.remove(&ino);
        }
        if reason.is_some() {
            // Counted against the errors' line: it is the same failure, answered again.
            state.errors.unlogged += 1;
        }
        reason
    }

    /// Remembers that a read of `range` of `ino` failed. Returns the failure to log, unless
    /// this mount already logged one of this kind in the current window. It must be called
    /// before the reader gets its `EIO`: the kernel's retry comes at once and must find it.
    pub(crate) fn record(
        &self,
        ino: Ino,
        range: Range<u64>,
        pid: u32,
        kind: FailureKind,
        reason: String,
    ) -> Option<Unlogged<'_>> {
        let now = Instant::now();
        let reason: Arc<str> = reason.into();
        let mut state = self.lock();
        if state.failed.len() > SWEEP_ABOVE {
            state.failed.retain(|_, failed| {
                failed.retain(|f| f.until > now);
                !failed.is_empty()
            });
        }
        state.failed.entry(ino).or_default().push(Failed {
            range: range.clone(),
            pid,
            until: now + self.remember,
            reason: Arc::clone(&reason),
        });
        let throttle = match kind {
            FailureKind::Timeout => &mut state.timeouts,
            FailureKind::Source => &mut state.errors,
        };
        let since_last = throttle.admit(now, self.window)?;
        Some(Unlogged {
            failures: self,
            ino,
            range,
            kind,
            reason,
            since_last,
        })
    }
}

/// A failure to be logged, once the reader has its answer.
#[derive(Debug)]
pub(crate) struct Unlogged<'a> {
    failures: &'a ReadFailures,
    ino: Ino,
    range: Range<u64>,
    kind: FailureKind,
    reason: Arc<str>,
    since_last: u64,
}

impl Unlogged<'_> {
    pub(crate) fn log(self) {
        let Unlogged {
            failures,
            ino,
            range,
            kind,
            reason,
            since_last,
        } = self;
        let (window, remember) = (failures.window, failures.remember);
        match kind {
            FailureKind::Timeout => warn!(
                mount = %failures.mount,
                ino = ino.0,
                offset = range.start,
                len = range.end - range.start,
                %reason,
                failed_reads_since_last_line = since_last,
                "read timed out, the reader gets EIO; overlapping reads fail at once for {remember:?} (one line per mount per {window:?})"
            ),
            FailureKind::Source => warn!(
                mount = %failures.mount,
                ino = ino.0,
                offset = range.start,
                len = range.end - range.start,
                %reason,
                failed_reads_since_last_line = since_last,
                "read failed, the reader gets EIO; overlapping reads fail at once for {remember:?} (one line per mount per {window:?})"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_reads_fail_until_the_window_ends() {
        let failures = ReadFailures::new(Duration::from_millis(200), "test".into());
        let ino = Ino(5);
        let unlogged = failures.record(ino, 4096..8192, 7, FailureKind::Timeout, "slow".into());
        assert!(unlogged.is_some(), "the first failure is logged");
        assert!(
            failures
                .record(ino, 0..10, 7, FailureKind::Timeout, "slow".into())
                .is_none(),
            "the second one in the window is not"
        );
        assert_eq!(failures.check(ino, &(0..4097), 7).as_deref(), Some("slow"));
        assert_eq!(
            failures.check(ino, &(8191..9000), 7).as_deref(),
            Some("slow")
        );
        assert_eq!(
            failures.check(ino, &(4000..4096), 7),
            None,
            "touching is not overlapping"
        );
        assert_eq!(failures.check(ino, &(8192..9000), 7), None);
        assert_eq!(
            failures.check(ino, &(4096..8192), 8),
            None,
            "another task reads afresh"
        );
        assert_eq!(
            failures.check(Ino(6), &(4096..8192), 7),
            None,
            "other inode"
        );
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(failures.check(ino, &(4096..8192), 7), None, "expired");
        assert!(
            failures.lock().failed.is_empty(),
            "expired entries are dropped"
        );
    }

    #[test]
    fn one_log_line_per_kind_per_window() {
        let window = Duration::from_millis(100);
        let mut throttle = Throttle::default();
        let start = Instant::now();
        assert_eq!(throttle.admit(start, window), Some(0));
        assert_eq!(throttle.admit(start + window / 2, window), None);
        assert_eq!(throttle.admit(start + window / 2, window), None);
        assert_eq!(throttle.admit(start + window, window), Some(2));
    }
}
