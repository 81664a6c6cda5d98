//! Reads of local bytes run on a fixed set of threads shared by every mount of the process;
//! a read that waits a whole read timeout for one (a local disk that stalls) fails with EIO
//! instead of waiting on. A test binary of its own: it occupies every one of those threads.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{pattern, Mounted};
use lazysnap_fuse::{Ino, LayerSource, MemorySource, Meta, MountOptions, ReadBuf, SourceError};

const TIMEOUT: Duration = Duration::from_millis(800);
/// How long a local read of a "slow" file takes: a disk that stalls.
const STALL: Duration = Duration::from_millis(2500);
/// More slow files than there can be local-read threads.
const SLOW_FILES: usize = 12;

/// Every byte is local; reads of files named `slow-*` take [`STALL`].
struct Stalling {
    inner: MemorySource,
    first_slow: u64,
    local: AtomicUsize,
}

impl LayerSource for Stalling {
    const READS_LOCALLY: bool = true;
    crate::delegate_to_inner!(lookup, getattr, readdir, readlink, listxattr, getxattr);

    async fn read(&self, ino: Ino, offset: u64, len: u32) -> Result<Bytes, SourceError> {
        self.inner.read(ino, offset, len).await
    }
    fn read_local(
        &self,
        ino: Ino,
        offset: u64,
        len: u32,
        buf: &mut ReadBuf,
    ) -> Option<Result<(), SourceError>> {
        self.local.fetch_add(1, Ordering::SeqCst);
        if ino.0 >= self.first_slow {
            std::thread::sleep(STALL);
        }
        let data = self
            .inner
            .getattr(ino)
            .ok()
            .map(|a| pattern(a.size as usize))?;
        let start = (offset as usize).min(data.len());
        let end = (start + len as usize).min(data.len());
        buf.copy_from(&data[start..end]);
        Some(Ok(()))
    }
}

#[test]
fn a_read_that_waits_its_timeout_for_a_local_read_thread_fails_with_eio() {
    let mut tree = MemorySource::new();
    tree.file(Ino::ROOT, "fast", Meta::new(0o644), pattern(4096));
    let mut first_slow = u64::MAX;
    for i in 0..SLOW_FILES {
        let ino = tree.file(
            Ino::ROOT,
            &format!("slow-{i}"),
            Meta::new(0o644),
            pattern(4096),
        );
        first_slow = first_slow.min(ino.0);
    }
    let source = Arc::new(Stalling {
        inner: tree,
        first_slow,
        local: AtomicUsize::new(0),
    });
    let options = MountOptions {
        read_timeout: TIMEOUT,
        ..MountOptions::default()
    };
    let m = Mounted::new(Arc::clone(&source), options);
    // Open before the threads are taken: an open is no read.
    let fast = fs::File::open(m.path("fast")).expect("open fast");
    let slow: Vec<_> = (0..SLOW_FILES)
        .map(|i| {
            let path = m.path(&format!("slow-{i}"));
            std::thread::spawn(move || {
                let file = fs::File::open(&path).expect("open slow");
                let mut buf = [0u8; 4096];
                file.read_exact_at(&mut buf, 0).map(|()| buf.to_vec())
            })
        })
        .collect();
    common::wait_until(
        Duration::from_secs(5),
        "the slow reads to take every local-read thread",
        || source.local.load(Ordering::SeqCst) >= 2,
    );
    std::thread::sleep(Duration::from_millis(200));

    let started = Instant::now();
    let mut buf = [0u8; 4096];
    let err = fast
        .read_exact_at(&mut buf, 0)
        .expect_err("a read queued behind stalled local reads for its whole timeout fails");
    let waited = started.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        waited < STALL + TIMEOUT,
        "failed once a thread was free, not after another timeout: {waited:?}"
    );
    let results: Vec<_> = slow
        .into_iter()
        .map(|t| t.join().expect("reader"))
        .collect();
    let served = results.iter().filter(|r| r.is_ok()).count();
    assert!(
        served >= 1,
        "the reads the threads took were answered, late: {results:?}"
    );
    assert!(
        results.iter().flatten().all(|b| *b == pattern(4096)),
        "and with the right bytes"
    );
    assert!(
        served < SLOW_FILES,
        "the reads queued behind them for a whole timeout failed: {served} of {SLOW_FILES} served"
    );

    // Once the disk is quick again, so is everything (after the failure is forgotten: it is
    // remembered for a timeout, so that the kernel's retries fail at once).
    std::thread::sleep(2 * TIMEOUT);
    let mut buf = [0u8; 4096];
    fast.read_exact_at(&mut buf, 0)
        .expect("a read after the stall");
    assert!(buf[..] == pattern(4096)[..]);
}
