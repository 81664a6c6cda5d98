//! Mounting a [`LayerSource`] and taking the mount down again, including mounts a crashed
//! daemon left behind.
//!
//! A mount runs its own FUSE session thread; a [`MountHandle`] owns it and unmounts on drop,
//! unless released to outlive the process (its `/dev/fuse` fd held elsewhere), for a later
//! process to [`take_over`].
//!
//! The mount looks to overlayfs like a directory extracted from a tar: read-only, device
//! nodes and setuid bits honoured (as stargz-snapshotter mounts its layers), and kernel-side
//! permission checks on the attributes the source gives.

use std::collections::VecDeque;
use std::io;
use std::ops::ControlFlow;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use fuser::SessionACL;
use nix::mount::{umount2, MntFlags, MsFlags};
use tokio::runtime::Handle;
use tracing::{debug, warn};

use crate::backing::Backings;
use crate::connection::{self, InitParams};
use crate::fs::{FsConfig, LayerFs};
use crate::{FileKind, Ino, LayerSource, MountError};

/// How many directories [`stop_flushes`] looks through for a regular file to open.
const FLUSH_PROBE_DIRS: usize = 1024;

/// How long an unmount waits for the session thread to notice. After an unmount the kernel
/// ends the session at once, unless the filesystem is still mounted elsewhere (a bind mount
/// of the mountpoint, or overlayfs's private clone of it as a container's lower layer); then
/// the thread is left to end with the last of those. Dropping a handle does not wait.
const SESSION_EXIT_WAIT: Duration = Duration::from_secs(2);

/// How a layer is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// The mount's source in `/proc/self/mountinfo`, to recognise our mounts by (e.g. the
    /// layer digest). No commas. Default `lazysnap`.
    pub fsname: String,
    /// The filesystem type shows as `fuse.<subtype>`. No commas. Default `lazysnap`.
    pub subtype: String,
    /// A read not answered within this time fails with `EIO`, so that no process in a
    /// container hangs on an unreachable registry. A read that failed with `EIO` is
    /// remembered this long too: reads overlapping it (the kernel's retries) fail at once, so
    /// one `read(2)` waits at most this long. Default 30 s.
    pub read_timeout: Duration,
    /// How long the kernel trusts entries, attributes and negative lookups without asking
    /// again. Layers are immutable, so this only bounds the kernel's memory. Default 1 day.
    pub cache_ttl: Duration,
    /// FUSE dispatch threads, all reading the mount's one fd. Reads that need the network never
    /// occupy them; with more than one, all but one may answer a small local read themselves
    /// (a random reader's: one wake-up less per read), and one stays free. Default 2.
    pub dispatch_threads: usize,
    /// Serve files the source has complete locally by kernel passthrough
    /// ([`LayerSource::backing_file`]); needs Linux 6.9 and root. It costs one level of the
    /// kernel's filesystem stacking depth (of two): overlayfs still stacks on the mount, but
    /// nothing can stack on that overlay. Default off.
    pub passthrough: bool,
    /// Where the mount journals which open inodes the kernel reads through which backing
    /// file, so that a server [taking over](take_over) the connection opens them the same way
    /// (the kernel refuses an open in another mode while older handles are open). Without
    /// it, a server taking over passes nothing through. Give the same path to [`mount`] and
    /// to every [`take_over`] of that mount; somewhere that lives as long as the mount.
    pub backing_journal: Option<PathBuf>,
    /// The kernel's readahead window on the mount (its `read_ahead_kb`), so that a file read
    /// in order arrives in requests of up to the kernel's 1 MiB, several in flight, instead
    /// of the 128 KiB the kernel starts a FUSE mount with: on this project's VM, 2.6 GB/s
    /// became 4.5 GB/s at 4 MiB. `None` leaves the kernel's. Default 4 MiB.
    pub readahead_bytes: Option<u64>,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            fsname: "lazysnap".to_owned(),
            subtype: "lazysnap".to_owned(),
            read_timeout: Duration::from_secs(30),
            cache_ttl: Duration::from_secs(24 * 60 * 60),
            dispatch_threads: 2,
            passthrough: false,
            backing_journal: None,
            readahead_bytes: Some(4 << 20),
        }
    }
}

/// Mounts `source` read-only at `mountpoint` and serves it until the returned handle is
/// unmounted, released or dropped.
///
/// Reads run on `runtime`, which must have its time driver enabled (for the read deadline).
/// Mounting needs root: the connection is mounted with mount(2) onto our own `/dev/fuse` fd,
/// so that the fd can be held elsewhere and the connection [taken over](take_over) later.
///
/// This blocks for the mount and the FUSE handshake, so call it from a blocking context (e.g.
/// `spawn_blocking`), not directly on a runtime thread.
///
/// # Signals
/// The session threads inherit the calling thread's signal mask. A daemon that takes
/// SIGTERM/SIGINT through a mask (`sigwait`, `signalfd`) must block them before calling this,
/// or the kernel may deliver one to a session thread, where its default action kills the
/// process without unmounting anything. Installing handlers first (as tokio's `signal` does)
/// avoids this too.
///
/// # Errors
/// [`MountError::Mount`] if the options are invalid, the kernel refuses the mount, the
/// handshake fails or the session thread cannot start; nothing is left mounted then.
pub fn mount<S: LayerSource>(
    source: Arc<S>,
    mountpoint: impl AsRef<Path>,
    options: MountOptions,
    runtime: Handle,
) -> Result<MountHandle, MountError> {
    let mountpoint = mountpoint.as_ref().to_path_buf();
    let failed = |source: io::Error| MountError::Mount {
        mountpoint: mountpoint.clone(),
        source,
    };
    let (config, data) = session_config(&options).map_err(failed)?;
    let device = connection::mount_connection(&mountpoint, &options.fsname, mount_flags(), &data)
        .map_err(failed)?;
    let served = connection::read_init(device.as_fd()).and_then(|init| {
        let params = InitParams::from_request(&init)?;
        serve(
            Arc::clone(&source),
            &mountpoint,
            device,
            &init,
            params,
            true,
            config,
            &options,
            runtime,
        )
    });
    let (handle, flushes_off) = served.map_err(|err| {
        // Nothing may stay mounted: a connection nobody serves hangs whoever looks.
        let _ = umount2(&mountpoint, MntFlags::MNT_DETACH);
        failed(err)
    })?;
    // Before anyone else can open a file here.
    stop_flushes(&*source, &mountpoint, &flushes_off);
    if let Some(bytes) = options.readahead_bytes {
        set_readahead(&mountpoint, bytes);
    }
    Ok(handle)
}

/// Serves `source` on a connection another process mounted and initialised at `mountpoint`
/// (its `/dev/fuse` fd, held while that process was gone), without mounting anything: the
/// kernel's inodes and open files stay as they were, so `source` must give every inode the
/// number the previous server gave it. `init` is what the kernel offered that server
/// ([`MountHandle::init_params`]); the filesystem initialises itself from it as it did then.
///
/// Requests the previous server read but never answered are queued again
/// (`FUSE_NOTIFY_RESEND`, Linux 6.9) and answered here. On older kernels they stay
/// unanswered and their callers wait until the connection ends; that is logged.
///
/// # Errors
/// [`MountError::Mount`] if the session cannot be set up or its thread cannot start. The
/// mount is left as it is then; the caller decides whether to unmount it.
pub fn take_over<S: LayerSource>(
    source: Arc<S>,
    mountpoint: impl AsRef<Path>,
    device: OwnedFd,
    init: InitParams,
    options: MountOptions,
    runtime: Handle,
) -> Result<MountHandle, MountError> {
    let mountpoint = mountpoint.as_ref().to_path_buf();
    let failed = |source: io::Error| MountError::Mount {
        mountpoint: mountpoint.clone(),
        source,
    };
    let (config, _) = session_config(&options).map_err(failed)?;
    let request = init.to_request(0);
    let (handle, flushes_off) = serve(
        Arc::clone(&source),
        &mountpoint,
        device,
        &request,
        init,
        false,
        config,
        &options,
        runtime,
    )
    .map_err(failed)?;
    if let Err(err) = connection::notify_resend(handle.connection.as_fd()) {
        warn!(mountpoint = %mountpoint.display(), error = %err, "kernel cannot resend requests the previous daemon left unanswered; their callers wait");
    }
    // The kernel remembers across servers that FLUSH is not implemented, but this server
    // cannot know whether the one before told it (an older version did not).
    stop_flushes(&*source, &mountpoint, &flushes_off);
    if let Some(bytes) = options.readahead_bytes {
        // The window lives with the mount; a changed configuration applies from here on.
        set_readahead(&mountpoint, bytes);
    }
    Ok(handle)
}

/// Sets up the fuser session over `device` and starts its thread. Returns the handle, and
/// whether the kernel is known to send no FLUSH on the connection any more.
#[allow(clippy::too_many_arguments)]
fn serve<S: LayerSource>(
    source: Arc<S>,
    mountpoint: &Path,
    device: OwnedFd,
    init: &[u8],
    params: InitParams,
    answer_kernel: bool,
    config: fuser::Config,
    options: &MountOptions,
    runtime: Handle,
) -> io::Result<(MountHandle, Arc<AtomicBool>)> {
    let passthrough = options.passthrough;
    let journal = options.backing_journal.as_deref();
    let connection = device.try_clone()?;
    let flushes_off = Arc::new(AtomicBool::new(false));
    let backings = if answer_kernel {
        Backings::fresh(connection, passthrough, journal)
    } else {
        Backings::taken_over(connection, passthrough, journal)
    };
    let fs = LayerFs::new(
        source,
        runtime,
        FsConfig {
            read_timeout: options.read_timeout,
            cache_ttl: options.cache_ttl,
            passthrough,
            name: options.fsname.clone(),
            dispatch_threads: options.dispatch_threads.max(1),
        },
        backings,
        Arc::clone(&flushes_off),
    );
    let session = connection::session_over(fs, device.as_fd(), init, answer_kernel, config)?;
    let (exited_tx, exited) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("lazysnap-fuse".to_owned())
        .spawn(move || {
            let result = session.run();
            // The receiver may be gone already (handle dropped without waiting).
            let _ = exited_tx.send(());
            result
        })?;
    let handle = MountHandle {
        mountpoint: mountpoint.to_path_buf(),
        connection: device,
        init: params,
        mounted: true,
        thread: Some(SessionThread { thread, exited }),
    };
    Ok((handle, flushes_off))
}

/// Makes the kernel stop sending FLUSH on the mount's connection, for the rest of its life:
/// opens a regular file of the mount and closes it. The open is answered without `NOFLUSH`
/// (or the kernel opens the file itself, which is the same), so the close sends a FLUSH,
/// answered ENOSYS, unless the kernel sends none already; either way none comes after, and
/// `flushes_off` says so. Only then may the server let the kernel open files itself (see
/// `LayerFs::open`).
///
/// A mount whose file cannot be opened here keeps answering opens, until the first close of
/// a file does the same.
fn stop_flushes<S: LayerSource>(source: &S, mountpoint: &Path, flushes_off: &AtomicBool) {
    let Some(file) = some_regular_file(source) else {
        // A FLUSH comes only from a regular file's close; if there is none to find, opens
        // stay answered, each with NOFLUSH once some close has stopped FLUSH.
        return;
    };
    match std::fs::File::open(mountpoint.join(&file)) {
        Ok(opened) => {
            drop(opened);
            flushes_off.store(true, Ordering::Release);
        }
        Err(err) => {
            debug!(mountpoint = %mountpoint.display(), file = %file.display(), error = %err, "cannot open a file of the mount to stop FLUSH; the kernel opens none itself yet")
        }
    }
}

/// The path (relative to the root) of a regular file of `source`, looked for breadth-first
/// through at most [`FLUSH_PROBE_DIRS`] directories.
fn some_regular_file<S: LayerSource>(source: &S) -> Option<PathBuf> {
    let mut dirs = VecDeque::from([(Ino::ROOT, PathBuf::new())]);
    let mut looked = 0;
    while let Some((dir, path)) = dirs.pop_front() {
        looked += 1;
        if looked > FLUSH_PROBE_DIRS {
            return None;
        }
        let mut found = None;
        // A directory that cannot be listed is only one place less to look.
        let _ = source.readdir(dir, 0, &mut |entry| match entry.kind {
            FileKind::RegularFile => {
                found = Some(path.join(entry.name));
                ControlFlow::Break(())
            }
            FileKind::Directory => {
                if dirs.len() < FLUSH_PROBE_DIRS {
                    dirs.push_back((entry.ino, path.join(entry.name)));
                }
                ControlFlow::Continue(())
            }
            _ => ControlFlow::Continue(()),
        });
        if found.is_some() {
            return found;
        }
    }
    None
}

/// Sets the readahead window of the mount at `mountpoint` (its backing device info, which
/// the kernel names by the mount's device number). A window the kernel will not take only
/// costs speed, so a failure is logged, not returned. The setting lives with the mount, not
/// the server: set again at a takeover, it only changes if the options did.
fn set_readahead(mountpoint: &Path, bytes: u64) {
    use std::os::unix::fs::MetadataExt;
    let dev = match std::fs::metadata(mountpoint) {
        Ok(meta) => meta.dev(),
        Err(err) => {
            debug!(mountpoint = %mountpoint.display(), error = %err, "cannot stat the mount to set its readahead");
            return;
        }
    };
    let path = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    if let Err(err) = std::fs::write(&path, (bytes / 1024).to_string()) {
        debug!(path, error = %err, "cannot set the mount's readahead; the kernel's stays");
    }
}

/// Flags of the mount(2) call: read-only; devices and setuid bits honoured, as in an
/// extracted layer (a single-layer view is a bind mount of this mount, which inherits them).
fn mount_flags() -> MsFlags {
    MsFlags::MS_RDONLY
}

/// fuser's session settings and the mount's option string (after `fd=`, `rootmode=` and the
/// owner, which [`connection::mount_connection`] writes).
fn session_config(options: &MountOptions) -> io::Result<(fuser::Config, String)> {
    for (what, value) in [("fsname", &options.fsname), ("subtype", &options.subtype)] {
        // Both end up in a comma-separated option string.
        if value.is_empty() || value.contains(',') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{what} {value:?} must be non-empty and free of commas"),
            ));
        }
    }
    let mut config = fuser::Config::default();
    // allow_other: containers run as any uid; default_permissions does the access checks.
    config.acl = SessionACL::All;
    config.n_threads = Some(options.dispatch_threads.max(1));
    // All threads read the one fd: a cloned fd's requests in flight are lost with the process
    // (the kernel resends only those of the fd a successor holds), so a crash would fail
    // them instead of letting the next daemon answer.
    config.clone_fd = false;
    // The kernel reports the type as `fuse.<subtype>`.
    let data = format!(
        "default_permissions,allow_other,subtype={}",
        options.subtype
    );
    Ok((config, data))
}

/// A mounted layer. Dropping it unmounts like [`MountHandle::unmount`], ignoring errors and
/// without waiting for the session to end: a daemon drops its handles as it exits, and a
/// layer still used elsewhere (the lower layer of a running container's overlay) keeps its
/// session alive after the unmount, so waiting would only hold up the exit.
#[derive(Debug)]
pub struct MountHandle {
    mountpoint: PathBuf,
    /// The connection's `/dev/fuse` file (the same open file the session reads), to hand to
    /// whoever holds it across a restart.
    connection: OwnedFd,
    /// What the kernel offered at INIT.
    init: InitParams,
    /// Whether this handle still has to unmount.
    mounted: bool,
    /// `None` once joined or left to end on its own.
    thread: Option<SessionThread>,
}

#[derive(Debug)]
struct SessionThread {
    thread: JoinHandle<io::Result<()>>,
    /// Signals (or disconnects) when the session has ended.
    exited: mpsc::Receiver<()>,
}

impl MountHandle {
    /// Where the layer is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// A new fd on the connection (the same open file, so requests read through either are
    /// the same requests), for a holder to keep it alive across a restart of this process.
    ///
    /// # Errors
    /// When the process is out of fds.
    pub fn connection(&self) -> io::Result<OwnedFd> {
        self.connection.try_clone()
    }

    /// What the kernel offered at INIT, to [take over](take_over) the connection with later.
    pub fn init_params(&self) -> InitParams {
        self.init
    }

    /// Leaves the layer mounted and served until this process exits, without unmounting:
    /// for a daemon stopping while the connection's fd is held elsewhere, so the next one
    /// takes it over. (Without a holder, the mount dies with the process.)
    pub fn release(mut self) {
        self.mounted = false;
        self.thread = None;
    }

    /// Unmounts the layer and waits briefly for the session to end.
    ///
    /// If the mount is busy (open files, or still a lowerdir of an overlay mount) it is
    /// detached instead: it vanishes from the mount table at once, its users keep working,
    /// and the session ends when the last of them lets go. This never blocks on those users.
    ///
    /// # Errors
    /// [`MountError::Unmount`] if the kernel refuses both the unmount and the detach.
    pub fn unmount(mut self) -> Result<(), MountError> {
        self.unmount_inner(true)
    }

    /// Unmounts (or detaches a busy mount); with `wait`, waits briefly for the session to end.
    fn unmount_inner(&mut self, wait: bool) -> Result<(), MountError> {
        if !std::mem::take(&mut self.mounted) {
            return Ok(());
        }
        match umount2(&self.mountpoint, MntFlags::empty()) {
            Ok(()) if wait => self.wait_for_session(),
            // The thread ends with the session, or with the process.
            Ok(()) => self.thread = None,
            // Someone detached it already (a repair of a dead mount).
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => self.thread = None,
            Err(nix::errno::Errno::EBUSY) => {
                umount2(&self.mountpoint, MntFlags::MNT_DETACH).map_err(|errno| {
                    MountError::Unmount {
                        mountpoint: self.mountpoint.clone(),
                        source: errno.into(),
                    }
                })?;
                // The session lives on until the last user of the detached mount is gone.
                self.thread = None;
            }
            Err(errno) => {
                return Err(MountError::Unmount {
                    mountpoint: self.mountpoint.clone(),
                    source: errno.into(),
                })
            }
        }
        Ok(())
    }

    fn wait_for_session(&mut self) {
        let Some(SessionThread { thread, exited }) = self.thread.take() else {
            return;
        };
        if let Err(mpsc::RecvTimeoutError::Timeout) = exited.recv_timeout(SESSION_EXIT_WAIT) {
            debug!(mountpoint = %self.mountpoint.display(), "FUSE session outlives its unmount");
            return;
        }
        match thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                debug!(mountpoint = %self.mountpoint.display(), error = %err, "FUSE session ended with an error")
            }
            Err(_panic) => {
                debug!(mountpoint = %self.mountpoint.display(), "FUSE session thread panicked")
            }
        }
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if let Err(err) = self.unmount_inner(false) {
            debug!(error = %err, "unmount on drop failed");
        }
    }
}

/// Lazily detaches whatever is mounted on top of `mountpoint` (`umount2(MNT_DETACH)`), for
/// mounts a crashed daemon left behind, which fail every access with `ENOTCONN`. Returns
/// whether something was mounted there.
///
/// It detaches one mount, without asking what it is or who serves it: call it only on paths
/// where this daemon mounts layers, before mounting anew.
///
/// # Errors
/// [`MountError::Unmount`] if the kernel refuses for another reason than there being no
/// mount at `mountpoint`.
pub fn detach_mount(mountpoint: impl AsRef<Path>) -> Result<bool, MountError> {
    let mountpoint = mountpoint.as_ref();
    match umount2(mountpoint, MntFlags::MNT_DETACH) {
        Ok(()) => Ok(true),
        // EINVAL: not a mountpoint; ENOENT: not even there.
        Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => Ok(false),
        Err(errno) => Err(MountError::Unmount {
            mountpoint: mountpoint.to_path_buf(),
            source: errno.into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_name_the_mount_and_keep_devices() {
        let (config, data) = session_config(&MountOptions::default()).expect("valid options");
        assert_eq!(data, "default_permissions,allow_other,subtype=lazysnap");
        // Read-only, and no nodev/nosuid: an extracted layer honours both.
        assert_eq!(mount_flags(), MsFlags::MS_RDONLY);
        assert_eq!(config.acl, SessionACL::All);
        assert_eq!(config.n_threads, Some(2));
        // One fd for all: a crash loses no request in flight on a clone.
        assert!(!config.clone_fd);
    }

    #[test]
    fn commas_in_names_are_refused() {
        for options in [
            MountOptions {
                fsname: "a,rw".to_owned(),
                ..MountOptions::default()
            },
            MountOptions {
                subtype: String::new(),
                ..MountOptions::default()
            },
        ] {
            let err = session_config(&options).expect_err("invalid name");
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        }
    }
}
