//! Reads through the kernel against a source that can hang: a read that waits past the
//! deadline must fail with EIO and must not hold up anything else on the mount; bytes the
//! source holds locally are read without its async path.

mod common;

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{pattern, wait_until, Mounted};
use lazysnap_fuse::{
    Attr, Ino, LayerSource, MemorySource, Meta, MountOptions, ReadBuf, SourceError,
};

const DEADLINE: Duration = Duration::from_secs(1);

/// A [`MemorySource`] whose reads of some inodes never finish, and which records every read
/// it is asked for.
struct Scripted {
    inner: MemorySource,
    stalled: HashSet<Ino>,
    /// Reads of stalled inodes that have begun waiting.
    waiting: AtomicUsize,
    /// Reads of stalled inodes whose futures were dropped (by the deadline).
    abandoned: AtomicUsize,
    reads: Mutex<Vec<(Ino, u64, u32)>>,
    /// Names looked up, in order.
    lookups: Mutex<Vec<OsString>>,
}

/// Counts a stalled read as abandoned when its future is dropped.
struct OnDrop<'a>(&'a AtomicUsize);

impl Drop for OnDrop<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Scripted {
    fn new(inner: MemorySource, stalled: impl IntoIterator<Item = Ino>) -> Self {
        Self {
            inner,
            stalled: stalled.into_iter().collect(),
            waiting: AtomicUsize::new(0),
            abandoned: AtomicUsize::new(0),
            reads: Mutex::new(Vec::new()),
            lookups: Mutex::new(Vec::new()),
        }
    }

    fn reads_of(&self, ino: Ino) -> Vec<(u64, u32)> {
        let reads = self.reads.lock().expect("read log");
        reads
            .iter()
            .filter(|(i, _, _)| *i == ino)
            .map(|&(_, offset, len)| (offset, len))
            .collect()
    }
}

impl LayerSource for Scripted {
    crate::delegate_to_inner!(getattr, readdir, readlink, listxattr, getxattr);

    fn lookup(&self, parent: Ino, name: &OsStr) -> Result<Attr, SourceError> {
        self.lookups
            .lock()
            .expect("lookup log")
            .push(name.to_owned());
        self.inner.lookup(parent, name)
    }

    async fn read(&self, ino: Ino, offset: u64, len: u32) -> Result<Bytes, SourceError> {
        self.reads
            .lock()
            .expect("read log")
            .push((ino, offset, len));
        if self.stalled.contains(&ino) {
            let _abandoned = OnDrop(&self.abandoned);
            self.waiting.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
        }
        self.inner.read(ino, offset, len).await
    }
}

fn options() -> MountOptions {
    MountOptions {
        read_timeout: DEADLINE,
        ..MountOptions::default()
    }
}

#[test]
fn a_stalled_read_fails_with_eio_while_the_rest_of_the_mount_works() {
    let mut tree = MemorySource::new();
    let stuck = tree.file(Ino::ROOT, "stuck", Meta::new(0o644), pattern(10_000));
    tree.file(Ino::ROOT, "fine", Meta::new(0o644), pattern(200_000));
    let source = Arc::new(Scripted::new(tree, [stuck]));
    let m = Mounted::new(Arc::clone(&source), options());

    let stuck_path = m.path("stuck");
    let started = Instant::now();
    let reader = thread::spawn(move || (fs::read(stuck_path), started.elapsed()));
    wait_until(Duration::from_secs(5), "the stalled read", || {
        source.waiting.load(Ordering::SeqCst) > 0
    });

    // While that read hangs, everything else answers at once.
    let others = Instant::now();
    let meta = fs::metadata(m.path("fine")).expect("stat beside a stalled read");
    assert_eq!(meta.len(), 200_000);
    let data = fs::read(m.path("fine")).expect("read beside a stalled read");
    assert!(data == pattern(200_000), "contents of the other file");
    assert_eq!(
        fs::read_dir(&m.mountpoint).map(Iterator::count).ok(),
        Some(2)
    );
    let others = others.elapsed();
    assert!(
        others < Duration::from_millis(500),
        "others took {others:?}"
    );

    let (result, elapsed) = reader.join().expect("reader thread");
    let err = result.expect_err("a stalled read must fail");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // The kernel retries a failed readahead page with a read of its own; that retry overlaps
    // the failed range and fails at once, so read(2) waits out the deadline once, not twice.
    assert!(elapsed >= DEADLINE, "failed early, after {elapsed:?}");
    assert!(
        elapsed < DEADLINE * 3 / 2,
        "took {elapsed:?}: {:?}",
        source.reads_of(stuck)
    );
    let attempts = source.reads_of(stuck).len();
    eprintln!("stalled read(2) failed after {elapsed:?}, {attempts} FUSE read(s) of it");

    // Every abandoned read future was dropped, so its late result can never be sent.
    wait_until(
        Duration::from_secs(2),
        "the abandoned futures to drop",
        || source.abandoned.load(Ordering::SeqCst) == source.waiting.load(Ordering::SeqCst),
    );
}

/// However the kernel retries, a read(2) of a file whose source never answers fails with EIO
/// within one deadline of the call, and a read of it right after fails at once: the failed
/// range is remembered for the deadline. Other files, and the same file once the window has
/// passed, are read from the source again.
#[test]
fn a_failed_range_fails_retries_at_once_for_one_deadline() {
    let mut tree = MemorySource::new();
    // Big enough for readahead to split it into several requests.
    let whole = tree.file(Ino::ROOT, "whole", Meta::new(0o644), pattern(1 << 20));
    let middle = tree.file(Ino::ROOT, "middle", Meta::new(0o644), pattern(1 << 20));
    tree.file(Ino::ROOT, "fine", Meta::new(0o644), pattern(10_000));
    let source = Arc::new(Scripted::new(tree, [whole, middle]));
    let m = Mounted::new(Arc::clone(&source), options());

    fn read_whole(path: &Path) -> io::Result<()> {
        fs::read(path).map(drop)
    }
    fn read_middle(path: &Path) -> io::Result<()> {
        let mut buf = [0u8; 4096];
        fs::File::open(path)?.read_at(&mut buf, 512 << 10).map(drop)
    }
    type ReadFn = fn(&Path) -> io::Result<()>;
    let cases: [(&str, Ino, ReadFn); 2] = [
        ("whole", whole, read_whole),
        ("middle", middle, read_middle),
    ];
    for (name, ino, read) in cases {
        let path = m.path(name);
        let started = Instant::now();
        let err = read(&path).expect_err("a stalled read must fail");
        let first = started.elapsed();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{name}: {err}");
        assert!(first >= DEADLINE, "{name}: failed early, after {first:?}");
        // One deadline, not two: the margin is for a loaded CI machine, not for a second wait.
        assert!(first < DEADLINE * 7 / 4, "{name}: took {first:?}");

        let asked = source.reads_of(ino).len();
        let started = Instant::now();
        let err = read(&path).expect_err("the retry fails too");
        let again = started.elapsed();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{name}: {err}");
        // At once: well inside a deadline (the source is not asked, checked below); the
        // margin is for scheduling on a loaded machine, where 100 ms was missed.
        assert!(
            again < DEADLINE / 2,
            "{name}: the second read took {again:?}"
        );
        assert_eq!(
            source.reads_of(ino).len(),
            asked,
            "{name}: the second read never reached the source"
        );
        eprintln!("{name}: EIO after {first:?} ({asked} FUSE reads), then after {again:?}");
    }
    assert_eq!(fs::read(m.path("fine")).ok(), Some(pattern(10_000)));

    // Once the window has passed, the source is asked again.
    thread::sleep(DEADLINE);
    let asked = source.reads_of(whole).len();
    let started = Instant::now();
    let err = fs::read(m.path("whole")).expect_err("still stalled");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    assert!(started.elapsed() >= DEADLINE, "{:?}", started.elapsed());
    assert!(
        source.reads_of(whole).len() > asked,
        "asked the source again"
    );
}

/// The kernel sends at most `max_background` readahead requests at a time and queues the rest
/// unsent; reads of a whole file (readahead with no async part) queue there even when the
/// connection is congested. The mount raises the limit so that a crowd of reads waiting on the
/// network does not freeze reads of files that are at hand.
#[test]
fn many_stalled_reads_do_not_block_other_files() {
    const STALLED: usize = 40;
    // Larger than one readahead window (128 KiB), so every read is a background request.
    const LEN: usize = 256 << 10;
    let mut tree = MemorySource::new();
    let stuck: Vec<Ino> = (0..STALLED)
        .map(|i| {
            tree.file(
                Ino::ROOT,
                &format!("stuck-{i}"),
                Meta::new(0o644),
                pattern(LEN),
            )
        })
        .collect();
    tree.file(Ino::ROOT, "fine", Meta::new(0o644), pattern(LEN));
    let source = Arc::new(Scripted::new(tree, stuck));
    let m = Mounted::new(
        Arc::clone(&source),
        MountOptions {
            read_timeout: Duration::from_secs(2),
            ..MountOptions::default()
        },
    );

    let readers: Vec<_> = (0..STALLED)
        .map(|i| {
            let path = m.path(&format!("stuck-{i}"));
            thread::spawn(move || fs::read(path))
        })
        .collect();
    // With too low a limit, the reads beyond it never even reach the source.
    wait_until(
        Duration::from_secs(3),
        "all stalled reads to reach the source",
        || source.waiting.load(Ordering::SeqCst) >= STALLED,
    );

    let start = Instant::now();
    let data = fs::read(m.path("fine")).expect("read beside many stalled reads");
    let took = start.elapsed();
    assert!(data == pattern(LEN));
    assert!(took < Duration::from_millis(500), "took {took:?}");

    for reader in readers {
        let err = reader.join().expect("reader").expect_err("stalled");
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
    }
}

/// Not a contract, a measurement: how the kernel slices reads, printed for the record.
#[test]
fn kernel_read_sizes() {
    const LEN: usize = 8 << 20;
    let mut tree = MemorySource::new();
    let big = tree.file(Ino::ROOT, "big", Meta::new(0o644), pattern(LEN));
    let source = Arc::new(Scripted::new(tree, []));
    let m = Mounted::new(Arc::clone(&source), options());

    let mut file = fs::File::open(m.path("big")).expect("open");
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        let n = file.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        total += n;
    }
    assert_eq!(total, LEN);
    let reads = source.reads_of(big);
    let largest = reads.iter().map(|&(_, len)| len).max().unwrap_or(0);
    eprintln!(
        "sequential 1 MiB read(2)s of 8 MiB: {} FUSE reads, largest {} KiB",
        reads.len(),
        largest / 1024
    );
    // Every byte was asked for exactly once: the page cache served the rest.
    let asked: u64 = reads.iter().map(|&(_, len)| u64::from(len)).sum();
    assert_eq!(asked, LEN as u64);

    // The connection's limits, if fusectl is mounted.
    let dev = fs::metadata(&m.mountpoint).map(|meta| std::os::unix::fs::MetadataExt::dev(&meta));
    if let Ok(dev) = dev {
        let conn = format!("/sys/fs/fuse/connections/{dev}");
        let limits: Vec<String> = ["max_background", "congestion_threshold"]
            .iter()
            .map(|knob| {
                let value = fs::read_to_string(format!("{conn}/{knob}")).unwrap_or_default();
                format!("{knob}={}", value.trim())
            })
            .collect();
        eprintln!("connection {dev}: {}", limits.join(" "));
    }

    // Reopening is served from the page cache, thanks to keep-cache.
    let again = fs::read(m.path("big")).expect("read again");
    assert!(again == pattern(LEN));
    assert_eq!(
        source.reads_of(big).len(),
        reads.len(),
        "reopen went to the source"
    );
}

/// Layers never change, so the kernel may keep what it learnt: names found and not found.
#[test]
fn the_kernel_caches_entries_and_misses() {
    let mut tree = MemorySource::new();
    tree.file(Ino::ROOT, "present", Meta::new(0o644), pattern(10));
    let source = Arc::new(Scripted::new(tree, []));
    let m = Mounted::new(Arc::clone(&source), options());
    for _ in 0..3 {
        assert!(fs::metadata(m.path("present")).is_ok());
        assert!(fs::metadata(m.path("absent")).is_err());
    }
    let lookups = source.lookups.lock().expect("lookup log").clone();
    assert_eq!(
        lookups,
        [OsString::from("present"), OsString::from("absent")]
    );
}

/// A source holding the first half of each file locally: reads there are answered by
/// `read_local` on a blocking thread, reads past it by the async `read`; a local read that
/// fails is an EIO like any other.
struct HalfLocal {
    inner: MemorySource,
    broken: Ino,
    local: AtomicUsize,
    remote: AtomicUsize,
}

impl LayerSource for HalfLocal {
    const READS_LOCALLY: bool = true;
    crate::delegate_to_inner!(lookup, getattr, readdir, readlink, listxattr, getxattr);

    async fn read(&self, ino: Ino, offset: u64, len: u32) -> Result<Bytes, SourceError> {
        self.remote.fetch_add(1, Ordering::SeqCst);
        self.inner.read(ino, offset, len).await
    }
    fn read_local(
        &self,
        ino: Ino,
        offset: u64,
        len: u32,
        buf: &mut ReadBuf,
    ) -> Option<Result<(), SourceError>> {
        let size = self.inner.getattr(ino).ok()?.size;
        if offset + u64::from(len) > size / 2 {
            return None;
        }
        self.local.fetch_add(1, Ordering::SeqCst);
        if ino == self.broken {
            return Some(Err(SourceError::io("the local copy is damaged")));
        }
        // MemorySource's read is ready at once: no runtime needed to drive it.
        let read = self.inner.read(ino, offset, len);
        Some(ready_now(read).map(|bytes| buf.copy_from(&bytes)))
    }
}

/// Drives a future that never waits.
fn ready_now<F: std::future::Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => out,
        std::task::Poll::Pending => panic!("MemorySource reads are ready at once"),
    }
}

#[test]
fn local_bytes_are_read_by_read_local_and_the_rest_by_read() {
    let mut tree = MemorySource::new();
    tree.file(Ino::ROOT, "file", Meta::new(0o644), pattern(8 << 20));
    let broken = tree.file(Ino::ROOT, "broken", Meta::new(0o644), pattern(1 << 20));
    let source = Arc::new(HalfLocal {
        inner: tree,
        broken,
        local: AtomicUsize::new(0),
        remote: AtomicUsize::new(0),
    });
    let m = Mounted::new(Arc::clone(&source), options());

    let file = fs::File::open(m.path("file")).expect("open");
    let mut head = vec![0u8; 64 << 10];
    file.read_exact_at(&mut head, 0)
        .expect("read the local half");
    assert!(head == pattern(8 << 20)[..64 << 10]);
    assert!(source.local.load(Ordering::SeqCst) > 0, "served locally");
    assert_eq!(
        source.remote.load(Ordering::SeqCst),
        0,
        "nothing remote yet"
    );
    assert!(fs::read(m.path("file")).expect("read all") == pattern(8 << 20));
    assert!(
        source.remote.load(Ordering::SeqCst) > 0,
        "the second half from read"
    );

    let mut buf = vec![0u8; 4096];
    let err = fs::File::open(m.path("broken"))
        .expect("open")
        .read_exact_at(&mut buf, 0)
        .expect_err("a failed local read");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
}

/// Every byte is local; records the size of each local read and the thread that answered it.
/// Local reads of `slow` take [`STALL`] (a disk that stalls).
struct Threads {
    inner: MemorySource,
    reads: Mutex<Vec<(u32, String)>>,
    slow: Option<Ino>,
}

const STALL: Duration = Duration::from_secs(3);

impl LayerSource for Threads {
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
        let name = thread::current().name().unwrap_or("").to_owned();
        self.reads.lock().expect("read log").push((len, name));
        if Some(ino) == self.slow {
            thread::sleep(STALL);
        }
        let read = self.inner.read(ino, offset, len);
        Some(ready_now(read).map(|bytes| buf.copy_from(&bytes)))
    }
}

/// Reads `file` as a random reader would (one 4 KiB read in its middle) and then whole; the
/// (size, thread) of each local read the source answered.
fn small_then_whole(dispatch_threads: usize) -> Vec<(u32, String)> {
    let mut tree = MemorySource::new();
    tree.file(Ino::ROOT, "file", Meta::new(0o644), pattern(8 << 20));
    let source = Arc::new(Threads {
        inner: tree,
        reads: Mutex::new(Vec::new()),
        slow: None,
    });
    let m = Mounted::new(
        Arc::clone(&source),
        MountOptions {
            dispatch_threads,
            ..options()
        },
    );
    let file = fs::File::open(m.path("file")).expect("open");
    let mut page = vec![0u8; 4096];
    file.read_exact_at(&mut page, 4 << 20).expect("small read");
    assert!(page == pattern(8 << 20)[4 << 20..(4 << 20) + 4096]);
    assert!(fs::read(m.path("file")).expect("read all") == pattern(8 << 20));
    let reads = source.reads.lock().expect("read log").clone();
    reads
}

#[test]
fn small_local_reads_are_answered_by_a_dispatch_thread_and_large_ones_by_the_read_threads() {
    let reads = small_then_whole(2);
    // The first is the 4 KiB read, alone on the mount. (Small reads the whole read makes
    // around the page it left cached may come two at a time, and then one goes to the
    // local-read threads.)
    let (len, thread) = &reads[0];
    assert!(
        *len <= 32 << 10 && thread.starts_with("fuser-"),
        "the small read on a dispatch thread: {reads:?}"
    );
    let large: Vec<_> = reads.iter().filter(|(len, _)| *len > 32 << 10).collect();
    assert!(!large.is_empty(), "{reads:?}");
    assert!(
        large.iter().all(|(_, t)| t.starts_with("fuse-local-read-")),
        "large reads on the local-read threads: {reads:?}"
    );
}

#[test]
fn a_lone_dispatch_thread_never_reads_the_disk_itself() {
    let reads = small_then_whole(1);
    assert!(reads.iter().any(|(len, _)| *len <= 32 << 10), "{reads:?}");
    assert!(
        reads.iter().all(|(_, t)| t.starts_with("fuse-local-read-")),
        "every read on the local-read threads: {reads:?}"
    );
}

#[test]
fn a_dispatch_thread_stuck_on_a_small_local_read_leaves_the_mount_answering() {
    let mut tree = MemorySource::new();
    let slow = tree.file(Ino::ROOT, "slow", Meta::new(0o644), pattern(4096));
    tree.file(Ino::ROOT, "fast", Meta::new(0o644), pattern(4096));
    let source = Arc::new(Threads {
        inner: tree,
        reads: Mutex::new(Vec::new()),
        slow: Some(slow),
    });
    // No deadline in the way: the stalled read is meant to finish.
    let m = Mounted::new(
        Arc::clone(&source),
        MountOptions {
            read_timeout: Duration::from_secs(30),
            ..MountOptions::default()
        },
    );
    let slow_path = m.path("slow");
    let stuck = thread::spawn(move || fs::read(slow_path));
    wait_until(STALL, "the slow read to reach the source", || {
        !source.reads.lock().expect("read log").is_empty()
    });
    let started = Instant::now();
    assert!(fs::metadata(m.path("fast")).is_ok());
    assert!(fs::read(m.path("fast")).expect("read fast") == pattern(4096));
    assert!(
        started.elapsed() < STALL / 2,
        "the mount answered only after {:?}",
        started.elapsed()
    );
    let slow_bytes = stuck.join().expect("slow reader").expect("slow read");
    assert!(slow_bytes == pattern(4096));
    let reads = source.reads.lock().expect("read log").clone();
    assert!(
        reads.iter().any(|(_, t)| t.starts_with("fuser-")),
        "the slow read was answered inline: {reads:?}"
    );
}
