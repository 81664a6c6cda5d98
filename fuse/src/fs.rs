//! The `fuser` filesystem: turns kernel requests into [`LayerSource`] calls and the answers
//! into replies.
//!
//! Metadata requests are answered on the dispatch thread, straight from the source. Reads
//! leave it (fuser replies are `Send`): bytes the source holds locally are read and answered
//! on a blocking thread; the others are spawned onto the tokio runtime, so a read waiting on
//! the network never holds up lookups or reads of other files, and each races the mount's
//! deadline and loses to it with `EIO`. A read that failed with `EIO` is remembered for
//! a moment (`failures`), and the same task's reads overlapping it fail at once, so the
//! kernel's retries do not wait out the deadline again. With passthrough on, files the source holds
//! complete on local disk are opened onto that copy, and the kernel reads it without us.
//!
//! Nothing here knows where bytes come from, and nothing here writes: the mount is read-only,
//! so the kernel refuses writes with `EROFS` before they reach us.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::ops::ControlFlow;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};
use tokio::runtime::Handle;
use tracing::debug;

use crate::backing::{Backings, Mode};
use crate::failures::{FailureKind, ReadFailures};
use crate::{Attr, FileKind, Ino, LayerSource, NameRequest, ReadBuf, SourceError};

/// How many background requests (readahead) the kernel sends at a time; it queues the rest
/// unsent. With fuser's 16, sixteen reads waiting on a registry hold up reads of every other
/// file until they time out (`tests/reads.rs` shows it). A waiting read costs us only a task,
/// and the deadline bounds how long it waits.
const MAX_BACKGROUND: u16 = 256;

/// `st_blksize`: what a 4 KiB-block filesystem reports, the size `stdio` buffers by.
const BLOCK_SIZE: u32 = 4096;

/// Longest name the kernel lets through, as on ext4.
const NAME_MAX: u32 = 255;

/// `.` and `..` sit at positions 0 and 1 of every listing; the source's entry `k` at `k + 2`.
const DOT_ENTRIES: u64 = 2;

/// How a mount behaves; fixed at mount time.
#[derive(Debug, Clone)]
pub(crate) struct FsConfig {
    /// How long a read may take before the reader gets `EIO`.
    pub(crate) read_timeout: Duration,
    /// How long the kernel may trust entries, attributes and negative lookups.
    pub(crate) cache_ttl: Duration,
    /// Whether to ask the kernel for passthrough; cleared at init if it cannot.
    pub(crate) passthrough: bool,
    /// The mount's name (fsname), for log lines.
    pub(crate) name: String,
    /// How many threads dispatch the kernel's requests (all reading the one fd).
    pub(crate) dispatch_threads: usize,
}

/// A read-only FUSE filesystem over a [`LayerSource`].
#[derive(Debug)]
pub(crate) struct LayerFs<S> {
    source: Arc<S>,
    runtime: Handle,
    config: FsConfig,
    /// Directory → its parent, learnt from lookups, for the `..` entry of a listing. The kernel
    /// reaches every directory other than the root through a lookup in its parent, and a
    /// directory has only one parent, so this is complete and never stale.
    parents: Mutex<HashMap<Ino, Ino>>,
    /// The regular files open now, and how the kernel reads them.
    backings: Mutex<Backings>,
    /// Reads that failed with EIO lately; overlapping reads fail at once.
    failures: Arc<ReadFailures>,
    /// Whether the source has any extended attribute (`LayerSource::has_xattrs`).
    xattrs: bool,
    /// Whether the kernel sends no FLUSH on this connection any more (see `flush`).
    flushes_off: Arc<AtomicBool>,
    /// Dispatch threads busy answering a small local read themselves (see `read`).
    inline_reads: AtomicUsize,
}

impl<S: LayerSource> LayerFs<S> {
    pub(crate) fn new(
        source: Arc<S>,
        runtime: Handle,
        config: FsConfig,
        backings: Backings,
        flushes_off: Arc<AtomicBool>,
    ) -> Self {
        // A failure is remembered as long as a read may wait: a retry within that time would
        // most likely fail the same way, and a reader's read(2) must not outlast it.
        let failures = Arc::new(ReadFailures::new(config.read_timeout, config.name.clone()));
        Self {
            xattrs: source.has_xattrs(),
            source,
            runtime,
            config,
            parents: Mutex::new(HashMap::new()),
            backings: Mutex::new(backings),
            failures,
            flushes_off,
            inline_reads: AtomicUsize::new(0),
        }
    }

    /// How a handle of ours opens: contents never change, so pages read once stay valid
    /// across opens (`KEEP_CACHE`, where `cache` asks for it). Nothing is ever written, so
    /// close(2) need not send a FLUSH and wait for its answer (`NOFLUSH`), except while the
    /// kernel still sends FLUSH at all: then a close must send one, so that its answer stops
    /// them for the connection (see `flush`).
    fn open_flags(&self, cache: bool) -> FopenFlags {
        let mut flags = FopenFlags::empty();
        if cache {
            flags |= FopenFlags::FOPEN_KEEP_CACHE;
        }
        if self.flushes_off.load(Ordering::Acquire) {
            flags |= FopenFlags::FOPEN_NOFLUSH;
        }
        flags
    }

    fn remember_parent(&self, dir: Ino, parent: Ino) {
        self.parents
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(dir, parent);
    }

    fn parent_of(&self, dir: Ino) -> Ino {
        if dir == Ino::ROOT {
            return Ino::ROOT;
        }
        // Only a directory the kernel never looked up could be missing; pointing `..` at
        // itself is what a listing of such an orphan would best show.
        self.parents
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&dir)
            .copied()
            .unwrap_or(dir)
    }

    fn open_file(&self, ino: Ino, reply: ReplyOpen) {
        // The kernel lets an inode be open through the page cache or through one backing
        // file, never both: `backings` keeps every handle of an inode in the mode its first
        // one got, across a takeover too.
        let mode = self
            .backings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .open(ino, || {
                let file = self.source.backing_file(ino)?;
                reply
                    .open_backing(&file)
                    .map(BackingId::into_raw)
                    .map_err(|err| debug!(ino = ino.0, error = %err, "kernel refused backing file"))
                    .ok()
            });
        match mode {
            Mode::Passthrough(id) => {
                // SAFETY: `id` is open on this connection (registered by us or by the server
                // before us, and journaled): `backings` closes it only once no handle uses
                // it, and the wrapper is turned back into the raw id before that.
                let backing = unsafe { reply.wrap_backing(id) };
                // The kernel refuses passthrough opens with any flag but a few (EIO), among
                // them KEEP_CACHE, which has no meaning there anyway.
                reply.opened_passthrough(FileHandle(0), self.open_flags(false), &backing);
                backing.into_raw();
            }
            Mode::Cached => reply.opened(FileHandle(0), self.open_flags(true)),
        }
    }

    /// Like [`fill_dir`](Self::fill_dir), each entry with its attributes (the kernel makes a
    /// dentry of each, as if it had looked it up).
    fn fill_dir_plus(
        &self,
        dir: Ino,
        offset: u64,
        reply: &mut ReplyDirectoryPlus,
    ) -> Result<(), SourceError> {
        let ttl = self.config.cache_ttl;
        let mut pos = offset;
        if pos == 0 {
            let attr = file_attr(&self.source.getattr(dir)?);
            if reply.add(inode(dir), 1, ".", &ttl, &attr, Generation(0)) {
                return Ok(());
            }
            pos = 1;
        }
        if pos == 1 {
            let parent = self.parent_of(dir);
            let attr = file_attr(&self.source.getattr(parent)?);
            if reply.add(inode(parent), 2, "..", &ttl, &attr, Generation(0)) {
                return Ok(());
            }
            pos = 2;
        }
        let skip = pos - DOT_ENTRIES;
        let mut full = false;
        let mut failed = None;
        let mut add = |entry: crate::DirEntry<'_>| {
            let attr = match self.source.getattr(entry.ino) {
                Ok(attr) => attr,
                Err(err) => {
                    failed = Some(err);
                    return ControlFlow::Break(());
                }
            };
            // As in `fill_dir`: once one entry did not fit, none after it may.
            if full
                || reply.add(
                    inode(entry.ino),
                    pos + 1,
                    entry.name,
                    &ttl,
                    &file_attr(&attr),
                    Generation(0),
                )
            {
                full = true;
                return ControlFlow::Break(());
            }
            if attr.kind == FileKind::Directory {
                self.remember_parent(attr.ino, dir);
            }
            pos += 1;
            ControlFlow::Continue(())
        };
        self.source.readdir(dir, skip, &mut add)?;
        failed.map_or(Ok(()), Err)
    }

    /// Fills a directory listing from position `offset` on; see [`DOT_ENTRIES`]. Each entry
    /// carries the position after it, which the kernel sends back to resume the listing.
    fn fill_dir(
        &self,
        dir: Ino,
        offset: u64,
        reply: &mut ReplyDirectory,
    ) -> Result<(), SourceError> {
        let mut pos = offset;
        if pos == 0 {
            if reply.add(inode(dir), 1, FileType::Directory, ".") {
                return Ok(());
            }
            pos = 1;
        }
        if pos == 1 {
            if reply.add(inode(self.parent_of(dir)), 2, FileType::Directory, "..") {
                return Ok(());
            }
            pos = 2;
        }
        let skip = pos - DOT_ENTRIES;
        let mut full = false;
        let mut add = |entry: crate::DirEntry<'_>| {
            // Once one entry did not fit, a shorter one after it must not slip in: the
            // listing would resume after it and lose the one that did not fit.
            if full || reply.add(inode(entry.ino), pos + 1, file_type(entry.kind), entry.name) {
                full = true;
                return ControlFlow::Break(());
            }
            pos += 1;
            ControlFlow::Continue(())
        };
        self.source.readdir(dir, skip, &mut add)
    }
}

/// Where a read's bytes or failure go.
struct Answer {
    reply: ReplyData,
    failures: Arc<ReadFailures>,
    ino: Ino,
    range: std::ops::Range<u64>,
    pid: u32,
}

impl Answer {
    fn send(self, result: Result<Bytes, SourceError>) {
        match result {
            Ok(data) => self.send_slice(Ok(&data)),
            Err(err) => self.send_slice(Err(err)),
        }
    }

    fn send_slice(self, result: Result<&[u8], SourceError>) {
        let len = (self.range.end - self.range.start) as usize;
        match result {
            Ok(data) if data.len() >= len => self.reply.data(&data[..len]),
            Ok(data) => {
                let reason = format!("the source gave {} bytes of {len}", data.len());
                self.fail(FailureKind::Source, reason);
            }
            Err(SourceError::Io(cause)) => self.fail(FailureKind::Source, cause.to_string()),
            // Not a failure to produce bytes (a read of something unreadable): no retry
            // would fare better or worse, so nothing to remember.
            Err(err) => self.reply.error(errno(&err, "read", self.ino)),
        }
    }

    fn fail(self, kind: FailureKind, reason: String) {
        // Remembered before the reader hears of it: the kernel retries at once, and the
        // retry must find the failure. Logged after, so the reader does not wait on it.
        let unlogged = self
            .failures
            .record(self.ino, self.range, self.pid, kind, reason);
        self.reply.error(Errno::EIO);
        if let Some(unlogged) = unlogged {
            unlogged.log();
        }
    }
}

/// Local reads up to this size are answered by the dispatch thread that received them, when
/// another dispatch thread is free to take the kernel's next request. Such reads are a random
/// reader's, one at a time and each waiting on the disk, where handing the read to another
/// thread costs a second wake-up: on the project's 2-core VM, through a test server that
/// `pread`s a local file, 4 KiB random reads went from 0.44-0.73x to 0.82-0.99x of the local
/// disk's rate (two runs each; the VM's wake-up latency makes such figures swing by half).
/// Larger reads (a sequential reader's readahead, several in flight) go to the local-read
/// threads, which read them in parallel.
const INLINE_READ_MAX: u32 = 32 << 10;

thread_local! {
    /// A dispatch thread's buffer for the local reads it answers itself: at most
    /// [`INLINE_READ_MAX`] bytes.
    static INLINE_BUF: std::cell::RefCell<ReadBuf> = std::cell::RefCell::new(ReadBuf::new());
}

/// A dispatch thread answering a local read itself; at most all but one of them at a time, so
/// that the mount always has a thread free to answer other requests (lookups, other reads)
/// while the disk is read.
struct InlineRead<'a>(&'a AtomicUsize);

impl<'a> InlineRead<'a> {
    fn begin(busy: &'a AtomicUsize, config: &FsConfig) -> Option<Self> {
        let others = config.dispatch_threads.saturating_sub(1);
        busy.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < others).then_some(n + 1)
        })
        .ok()
        .map(|_| InlineRead(busy))
    }
}

impl Drop for InlineRead<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<S: LayerSource> Filesystem for LayerFs<S> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Symlinks never change, so their targets may live in the page cache; parallel
        // lookups in one directory are safe because nothing here mutates.
        for wanted in [
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_DO_READDIRPLUS,
        ] {
            if let Err(missing) = config.add_capabilities(wanted) {
                debug!(?missing, "kernel lacks a FUSE capability");
            }
        }
        if let Err(nearest) = config.set_max_background(MAX_BACKGROUND) {
            debug!(nearest, "kernel refused max_background");
        }
        // Without passthrough max_stack_depth stays 0, and overlayfs stacks on this mount as
        // on any local filesystem. Passthrough needs 1 (backing files on an unstacked fs),
        // which still leaves room for the overlay; 2 would not.
        if self.config.passthrough {
            let enabled = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !enabled {
                debug!("kernel cannot do FUSE passthrough; serving every read itself");
                self.config.passthrough = false;
                self.backings
                    .get_mut()
                    .unwrap_or_else(PoisonError::into_inner)
                    .no_passthrough();
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let parent = Ino(parent.0);
        self.source
            .kernel_asked(NameRequest::Lookup { parent, name });
        match self.source.lookup(parent, name) {
            Ok(attr) => {
                if attr.kind == FileKind::Directory {
                    self.remember_parent(attr.ino, parent);
                }
                reply.entry(&self.config.cache_ttl, &file_attr(&attr), Generation(0));
            }
            // Inode 0 is a negative entry the kernel caches for the TTL: overlayfs looks every
            // name up in each lower layer, and most of them are missing from most layers.
            Err(SourceError::NotFound) => {
                reply.entry(&self.config.cache_ttl, &negative_attr(), Generation(0));
            }
            Err(err) => reply.error(errno(&err, "lookup", parent)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let ino = Ino(ino.0);
        match self.source.getattr(ino) {
            Ok(attr) => reply.attr(&self.config.cache_ttl, &file_attr(&attr)),
            Err(err) => reply.error(errno(&err, "getattr", ino)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let ino = Ino(ino.0);
        self.source.kernel_asked(NameRequest::Readlink(ino));
        match self.source.readlink(ino) {
            Ok(target) => reply.data(target.as_bytes()),
            Err(err) => reply.error(errno(&err, "readlink", ino)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // ENOSYS lets the kernel open files itself for the rest of the connection, as if each
        // open had answered KEEP_CACHE, and it sends no OPEN or RELEASE again: two round trips
        // less for every file a container opens. Such files lack NOFLUSH, so only once the
        // kernel sends no FLUSH (`flushes_off`): a FLUSH waits for its answer uninterruptibly,
        // also while no server runs (a crash, a restart), so a close(2), exit or exec of a
        // process holding such a file would hang until the next server answers, and a daemon
        // started by such a process would hang in its own exec.
        let opens_not_needed = self.flushes_off.load(Ordering::Acquire)
            && self
                .backings
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .opens_not_needed();
        if opens_not_needed {
            return reply.error(Errno::ENOSYS);
        }
        let ino = Ino(ino.0);
        match self.source.getattr(ino) {
            Ok(attr) if attr.kind == FileKind::RegularFile => self.open_file(ino, reply),
            Ok(attr) if attr.kind == FileKind::Directory => {
                reply.error(errno(&SourceError::IsDirectory, "open", ino));
            }
            // The kernel opens devices, FIFOs and sockets itself; such a request is a bug.
            Ok(_) => reply.error(Errno::EINVAL),
            Err(err) => reply.error(errno(&err, "open", ino)),
        }
    }

    #[allow(clippy::too_many_arguments)] // fuser's signature
    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let ino = Ino(ino.0);
        let attr = match self.source.getattr(ino) {
            Ok(attr) if attr.kind == FileKind::Directory => {
                return reply.error(errno(&SourceError::IsDirectory, "read", ino));
            }
            Ok(attr) => attr,
            Err(err) => return reply.error(errno(&err, "read", ino)),
        };
        // Clamp to the file so the source never sees a range past its end.
        let Some(left) = attr.size.checked_sub(offset).filter(|&left| left > 0) else {
            return reply.data(&[]);
        };
        let len = u32::try_from(left).map_or(size, |left| left.min(size));
        if len == 0 {
            return reply.data(&[]);
        }
        let range = offset..offset + u64::from(len);
        let pid = req.pid();
        if let Some(reason) = self.failures.check(ino, &range, pid) {
            debug!(ino = ino.0, offset, len, %reason, "read overlaps a recent failure");
            return reply.error(Errno::EIO);
        }
        let answer = Answer {
            reply,
            failures: Arc::clone(&self.failures),
            ino,
            range,
            pid,
        };
        let source = Arc::clone(&self.source);
        let deadline = self.config.read_timeout;
        let runtime = self.runtime.clone();
        let read_async = move |source: Arc<S>, answer: Answer, deadline: Duration| {
            // If the runtime is shutting down the task is dropped unrun, and so is the reply,
            // whose drop answers EIO: the reader is never left hanging.
            runtime.spawn(async move {
                match tokio::time::timeout(deadline, source.read(ino, offset, len)).await {
                    Ok(result) => answer.send(result),
                    Err(_elapsed) => answer.fail(
                        FailureKind::Timeout,
                        format!("no answer from the source within {deadline:?}"),
                    ),
                }
            });
        };
        if S::READS_LOCALLY {
            let queued = Instant::now();
            let job: crate::local_reads::Job = Box::new(move |buf: &mut ReadBuf| {
                // A read that waited its whole deadline behind others (a local disk that
                // stalls) fails as an unanswered fetch would, rather than later still.
                if queued.elapsed() >= deadline {
                    return answer.fail(
                        FailureKind::Timeout,
                        format!("waited {deadline:?} for a thread to read local bytes"),
                    );
                }
                match source.read_local(ino, offset, len, buf) {
                    Some(result) => answer.send_slice(result.map(|()| buf.answer())),
                    // What is left of the deadline: the reader has waited the rest already.
                    None => read_async(source, answer, deadline.saturating_sub(queued.elapsed())),
                }
            });
            if len <= INLINE_READ_MAX {
                if let Some(_inline) = InlineRead::begin(&self.inline_reads, &self.config) {
                    INLINE_BUF.with_borrow_mut(|buf| {
                        // A job that panics has dropped its reply, which answers EIO; the
                        // dispatch thread lives on.
                        drop(std::panic::catch_unwind(std::panic::AssertUnwindSafe(
                            || {
                                job(buf);
                            },
                        )));
                    });
                    return;
                }
            }
            // On the fixed set of local-read threads (bounded memory), or, should none have
            // started, on the runtime's blocking pool rather than not at all.
            if let Err(job) = crate::local_reads::submit(job) {
                self.runtime
                    .spawn_blocking(move || job(&mut ReadBuf::new()));
            }
        } else {
            read_async(source, answer, deadline);
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.backings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .release(Ino(ino.0));
        reply.ok();
    }

    /// There is nothing to flush. ENOSYS stops FLUSH for the rest of the connection (the
    /// kernel remembers it, across a takeover too), and close(2) still succeeds. The mount
    /// provokes one FLUSH before anyone else uses it (`mount::stop_flushes`), so that no
    /// close ever waits on a server.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
        // Only once the kernel has the answer: a file it opens itself (see `open`) before
        // then would send a FLUSH at its close.
        self.flushes_off.store(true, Ordering::Release);
    }

    /// A listing never changes: the kernel opens directories itself for the rest of the
    /// connection, caching listings and keeping them across opens (what CACHE_DIR and
    /// KEEP_CACHE would ask), and sends no OPENDIR or RELEASEDIR again.
    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.error(Errno::ENOSYS);
    }

    /// Listings with each entry's attributes: after one READDIRPLUS the kernel knows every
    /// name of the directory, so walking a tree (`find`, `ls -l`, a stat of every file) costs
    /// a round trip per directory, not one per entry.
    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let dir = Ino(ino.0);
        if offset == 0 {
            self.source.kernel_asked(NameRequest::List(dir));
        }
        match self.fill_dir_plus(dir, offset, &mut reply) {
            Ok(()) => reply.ok(),
            Err(err) => reply.error(errno(&err, "readdirplus", dir)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let dir = Ino(ino.0);
        if offset == 0 {
            self.source.kernel_asked(NameRequest::List(dir));
        }
        match self.fill_dir(dir, offset, &mut reply) {
            Ok(()) => reply.ok(),
            Err(err) => reply.error(errno(&err, "readdir", dir)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // A read-only layer has no free space to report; overlayfs only needs the call to work.
        reply.statfs(0, 0, 0, 0, 0, BLOCK_SIZE, NAME_MAX, BLOCK_SIZE);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if !self.xattrs {
            // The kernel remembers this for the connection and asks no more.
            return reply.error(Errno::ENOSYS);
        }
        let ino = Ino(ino.0);
        match self.source.getxattr(ino, name) {
            Ok(value) => reply_xattr(reply, size, &value),
            Err(err) => reply.error(errno(&err, "getxattr", ino)),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if !self.xattrs {
            return reply.error(Errno::ENOSYS);
        }
        let ino = Ino(ino.0);
        let names = match self.source.listxattr(ino) {
            Ok(names) => names,
            Err(err) => return reply.error(errno(&err, "listxattr", ino)),
        };
        // Local filesystems list `trusted.*` only to CAP_SYS_ADMIN. FUSE does not say what
        // capabilities the caller has, so root stands in for it; overlayfs asks as root.
        let privileged = req.uid() == 0;
        let mut list = Vec::new();
        for name in &names {
            if privileged || !name.as_bytes().starts_with(b"trusted.") {
                list.extend_from_slice(name.as_bytes());
                list.push(0);
            }
        }
        reply_xattr(reply, size, &list);
    }
}

/// Answers getxattr/listxattr: a `size` of 0 asks for the length alone, so the caller can
/// allocate; a buffer too small for the value is `ERANGE`, as xattr(7) says.
fn reply_xattr(reply: ReplyXattr, size: u32, value: &[u8]) {
    let Ok(len) = u32::try_from(value.len()) else {
        return reply.error(Errno::from_i32(libc::E2BIG));
    };
    if size == 0 {
        reply.size(len);
    } else if len > size {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(value);
    }
}

/// The errno for `err`. Failures that are part of normal use (a missing name, a missing xattr)
/// pass silently; the rest are logged at debug level with their cause.
fn errno(err: &SourceError, op: &'static str, ino: Ino) -> Errno {
    match err {
        SourceError::NotFound | SourceError::NoAttribute => {}
        SourceError::Io(cause) => debug!(op, ino = ino.0, error = %cause, "source failed"),
        other => debug!(op, ino = ino.0, error = %other, "source refused"),
    }
    Errno::from_i32(err.errno())
}

fn inode(ino: Ino) -> INodeNo {
    INodeNo(ino.0)
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::Directory => FileType::Directory,
        FileKind::RegularFile => FileType::RegularFile,
        FileKind::Symlink => FileType::Symlink,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
    }
}

fn file_attr(attr: &Attr) -> FileAttr {
    FileAttr {
        ino: inode(attr.ino),
        size: attr.size,
        blocks: attr.blocks,
        atime: attr.mtime,
        mtime: attr.mtime,
        ctime: attr.mtime,
        crtime: attr.mtime,
        kind: file_type(attr.kind),
        perm: attr.perm & 0o7777,
        nlink: attr.nlink,
        uid: attr.uid,
        gid: attr.gid,
        rdev: attr.rdev.to_fuse_rdev(),
        blksize: BLOCK_SIZE,
        flags: 0,
    }
}

/// The attributes of a negative entry: only the inode number (0) matters to the kernel.
fn negative_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: SystemTime::UNIX_EPOCH,
        mtime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        crtime: SystemTime::UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLOCK_SIZE,
        flags: 0,
    }
}
