//! Taking over a connection a killed process served: the kernel's inodes stay valid, and a
//! read the dead process had taken but not answered is resent to the new server and
//! completes. The serving process is this test binary run again as a child; the parent takes
//! its `/dev/fuse` fd with `pidfd_getfd`, as a holder would have kept it.

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{mounts_at, pattern, require_root};
use lazysnap_fuse::{
    detach_mount, mount, take_over, InitParams, Ino, LayerSource, MemorySource, Meta, MountOptions,
    SourceError,
};

const CHILD_ENV: &str = "LAZYSNAP_FUSE_TEST_TAKEOVER_CHILD";
/// Set for a first server that offers passthrough from this directory.
const BACKING_ENV: &str = "LAZYSNAP_FUSE_TEST_TAKEOVER_BACKING";

fn tree() -> (MemorySource, Ino) {
    let mut tree = MemorySource::new();
    let dir = tree.dir(Ino::ROOT, "dir", Meta::new(0o755));
    tree.file(dir, "file", Meta::new(0o644), pattern(50_000));
    let slow = tree.file(Ino::ROOT, "slow", Meta::new(0o644), pattern(300_000));
    tree.file(Ino::ROOT, "later", Meta::new(0o644), pattern(7_000));
    (tree, slow)
}

/// The tree, but a read of `stalled` never finishes (it says so on stdout when one begins);
/// with `backing`, files are offered for passthrough from `<backing>/<ino>`. Counts the
/// reads it serves itself.
struct Stalling {
    inner: MemorySource,
    stalled: Option<Ino>,
    backing: Option<PathBuf>,
    reads: AtomicUsize,
}

impl Stalling {
    fn new(inner: MemorySource, stalled: Option<Ino>, backing: Option<PathBuf>) -> Self {
        Self {
            inner,
            stalled,
            backing,
            reads: AtomicUsize::new(0),
        }
    }
}

impl LayerSource for Stalling {
    crate::delegate_to_inner!(lookup, getattr, readdir, readlink, listxattr, getxattr);

    async fn read(&self, ino: Ino, offset: u64, len: u32) -> Result<Bytes, SourceError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        if Some(ino) == self.stalled {
            println!("stalled");
            std::future::pending::<()>().await;
        }
        self.inner.read(ino, offset, len).await
    }

    fn backing_file(&self, ino: Ino) -> Option<fs::File> {
        fs::File::open(self.backing.as_ref()?.join(ino.0.to_string())).ok()
    }
}

/// Mounts at `$LAZYSNAP_FUSE_TEST_TAKEOVER_CHILD`, prints its connection's fd number and INIT
/// parameters, and serves until killed. Only meaningful as the child of the test below.
#[test]
#[ignore = "run by another test as the first server"]
fn first_server() {
    let Some(mountpoint) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (inner, stalled) = tree();
    let backing = std::env::var_os(BACKING_ENV).map(PathBuf::from);
    let passthrough = backing.is_some();
    let handle = mount(
        Arc::new(Stalling::new(inner, Some(stalled), backing)),
        &mountpoint,
        MountOptions {
            read_timeout: Duration::from_secs(600),
            passthrough,
            backing_journal: passthrough.then(|| journal_of(Path::new(&mountpoint))),
            ..MountOptions::default()
        },
        runtime.handle().clone(),
    )
    .expect("mount in the child");
    let fd = handle.connection().expect("connection fd");
    println!(
        "fd {} {}",
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        handle.init_params()
    );
    std::mem::forget(fd);
    std::mem::forget(handle);
    loop {
        thread::sleep(Duration::from_secs(60));
    }
}

/// Where a mount at `mountpoint` journals its backing ids.
fn journal_of(mountpoint: &Path) -> PathBuf {
    mountpoint.with_extension("backing-journal")
}

/// The first server; killed, and its mount detached, however the test ends.
struct FirstServer {
    child: Child,
    mountpoint: PathBuf,
}

impl Drop for FirstServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = detach_mount(&self.mountpoint);
    }
}

/// `pidfd_getfd(2)`: a copy of another process's fd (the same open file), as root may take.
fn steal_fd(pid: u32, fd: i32) -> OwnedFd {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    assert!(
        pidfd >= 0,
        "pidfd_open: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: pidfd is an fd we own from here on.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&pidfd);
    // SAFETY: pidfd_getfd takes a pidfd, an fd number in that process and flags, and returns
    // a new fd or -1.
    let got = unsafe { libc::syscall(libc::SYS_pidfd_getfd, raw, fd, 0) };
    assert!(got >= 0, "pidfd_getfd: {}", std::io::Error::last_os_error());
    // SAFETY: a new fd we own.
    unsafe { OwnedFd::from_raw_fd(got as i32) }
}

/// Starts the first server at a new mountpoint (offering passthrough from `backing`);
/// returns it, the mountpoint, its output lines, a copy of its connection's fd and the INIT
/// parameters.
fn start_first_server(
    dir: &Path,
    backing: Option<&Path>,
) -> (
    FirstServer,
    PathBuf,
    std::io::Lines<BufReader<std::process::ChildStdout>>,
    OwnedFd,
    InitParams,
) {
    let mountpoint = dir.canonicalize().expect("canonical").join("layer");
    fs::create_dir(&mountpoint).expect("mountpoint");
    let exe = std::env::current_exe().expect("test binary");
    let mut command = Command::new(exe);
    command
        .args(["--exact", "first_server", "--ignored", "--nocapture", "-q"])
        .env(CHILD_ENV, &mountpoint)
        .stdout(Stdio::piped());
    if let Some(backing) = backing {
        command.env(BACKING_ENV, backing);
    }
    let mut child = FirstServer {
        child: command.spawn().expect("spawn the first server"),
        mountpoint: mountpoint.clone(),
    };
    let mut lines = BufReader::new(child.child.stdout.take().expect("stdout")).lines();
    let (fd, init) = loop {
        let line = lines.next().expect("child output").expect("line");
        if let Some(rest) = line.strip_prefix("fd ") {
            let (fd, init) = rest.split_once(' ').expect("fd and init");
            break (
                fd.parse::<i32>().expect("fd number"),
                init.parse::<InitParams>().expect("init params"),
            );
        }
    };
    let device = steal_fd(child.child.id(), fd);
    (child, mountpoint, lines, device, init)
}

#[test]
fn a_killed_servers_connection_is_taken_over_and_its_unanswered_read_completes() {
    require_root();
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut child, mountpoint, mut lines, device, init) = start_first_server(dir.path(), None);

    let file = mountpoint.join("dir/file");
    let ino = fs::metadata(&file).expect("stat").ino();
    assert!(fs::read(&file).expect("read") == pattern(50_000));
    let slow = mountpoint.join("slow");
    let reader = thread::spawn(move || fs::read(slow));
    loop {
        let line = lines.next().expect("child output").expect("line");
        if line == "stalled" {
            break;
        }
    }

    // A crash: the child never answers the read it took.
    child.child.kill().expect("kill");
    child.child.wait().expect("reap");
    assert_eq!(mounts_at(&mountpoint).len(), 1, "the mount stays");

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let started = Instant::now();
    let handle = take_over(
        Arc::new(tree().0),
        &mountpoint,
        device,
        init,
        MountOptions::default(),
        runtime.handle().clone(),
    )
    .expect("take over");
    let data = reader
        .join()
        .expect("reader")
        .expect("the in-flight read completes");
    eprintln!(
        "in-flight read answered {:?} after the takeover began",
        started.elapsed()
    );
    assert!(data == pattern(300_000), "contents of the resent read");

    // The kernel's inode for the file is still good, and new lookups are served.
    assert_eq!(fs::metadata(&file).expect("stat again").ino(), ino);
    assert!(fs::read(&file).expect("read again") == pattern(50_000));
    assert!(fs::read(mountpoint.join("later")).expect("new lookup") == pattern(7_000));
    assert_eq!(mounts_at(&mountpoint).len(), 1, "no second mount");

    handle.unmount().expect("unmount");
    assert!(mounts_at(&mountpoint).is_empty());
}

/// A file open when its server dies closes at once, in the process holding it and in one it
/// starts (whose exec closes the copy it inherited), with no server there: a close that sends
/// FLUSH waits for an answer, uninterruptibly. Files the kernel opens itself (the server
/// answers OPEN with ENOSYS) carry no `FOPEN_NOFLUSH`, so the server must have told the
/// kernel before that it implements no FLUSH. Otherwise a daemon started by a process holding
/// such a file hangs in its exec, on the FLUSH only it could answer.
#[test]
fn a_file_open_when_the_server_dies_closes_without_a_server() {
    require_root();
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut child, mountpoint, _lines, device, init) = start_first_server(dir.path(), None);
    // Nothing on the mount is closed before the crash: whatever the kernel knows of FLUSH,
    // the server told it unasked.
    let held = fs::File::open(mountpoint.join("dir/file")).expect("open");
    let mut head = [0u8; 100];
    held.read_exact_at(&mut head, 0).expect("read");
    assert!(head[..] == pattern(50_000)[..100]);

    child.child.kill().expect("kill");
    child.child.wait().expect("reap");
    let closing = thread::spawn(move || {
        let started = Command::new("true").status();
        drop(held);
        started
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while !closing.is_finished() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    let closed_alone = closing.is_finished();

    // A server again, so that a close stuck on the dead one is answered and the test ends.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let handle = take_over(
        Arc::new(tree().0),
        &mountpoint,
        device,
        init,
        MountOptions::default(),
        runtime.handle().clone(),
    )
    .expect("take over");
    let started = closing.join().expect("closing thread").expect("spawn");
    assert!(started.success(), "the process started: {started}");
    assert!(
        closed_alone,
        "closing a file (in an exec and in its holder) waited for a server"
    );
    handle.unmount().expect("unmount");
}

/// With passthrough, a file opened before the crash reads on from its backing file while no
/// server runs (the kernel holds it). While handles from before the crash stay open, the new
/// server opens those inodes as the old one did: onto the same backing id (a new one would be
/// refused with EBUSY), or through the page cache for a file that had no backing file then
/// (passthrough would be refused with ETXTBSY), even though it has one now. Other files are
/// passed through afresh.
#[test]
fn passthrough_survives_a_takeover_with_handles_held_open() {
    require_root();
    let dir = tempfile::tempdir().expect("temp dir");
    let backing = tempfile::tempdir().expect("backing dir");
    let (source, slow) = tree();
    for (path, len) in [("dir/file", 50_000), ("later", 7_000)] {
        let ino = source.resolve(path).expect("in the tree");
        fs::write(backing.path().join(ino.0.to_string()), pattern(len)).expect("backing file");
    }
    let (mut child, mountpoint, _lines, device, init) =
        start_first_server(dir.path(), Some(backing.path()));
    let held = fs::File::open(mountpoint.join("dir/file")).expect("open before the crash");
    // No backing file for `slow` yet: opened through the page cache (its reads stall, so
    // none is made).
    let held_cached = fs::File::open(mountpoint.join("slow")).expect("open before the crash");
    fs::write(backing.path().join(slow.0.to_string()), pattern(300_000)).expect("backing file");

    child.child.kill().expect("kill");
    child.child.wait().expect("reap");
    // No server now: only the kernel's passthrough can answer this.
    let open = held.try_clone().expect("clone");
    let reader = thread::spawn(move || {
        let mut buf = vec![0u8; 50_000];
        std::os::unix::fs::FileExt::read_exact_at(&open, &mut buf, 0).map(|()| buf)
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while !reader.is_finished() {
        assert!(
            Instant::now() < deadline,
            "a passthrough read needs no server"
        );
        thread::sleep(Duration::from_millis(10));
    }
    assert!(reader.join().expect("reader").expect("read") == pattern(50_000));

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let served = Arc::new(Stalling::new(
        tree().0,
        None,
        Some(backing.path().to_path_buf()),
    ));
    let handle = take_over(
        served.clone(),
        &mountpoint,
        device,
        init,
        MountOptions {
            passthrough: true,
            backing_journal: Some(journal_of(&mountpoint)),
            ..MountOptions::default()
        },
        runtime.handle().clone(),
    )
    .expect("take over");
    assert!(fs::read(mountpoint.join("later")).expect("new open") == pattern(7_000));
    assert!(fs::read(mountpoint.join("dir/file")).expect("reopen while held") == pattern(50_000));
    assert_eq!(
        served.reads.load(Ordering::SeqCst),
        0,
        "the new server passes both files through"
    );
    assert!(
        fs::read(mountpoint.join("slow")).expect("reopen while held through the page cache")
            == pattern(300_000)
    );
    assert!(
        served.reads.load(Ordering::SeqCst) > 0,
        "a file held through the page cache is served through it"
    );
    let mut buf = vec![0u8; 50_000];
    std::os::unix::fs::FileExt::read_exact_at(&held, &mut buf, 0).expect("old handle reads");
    assert!(buf == pattern(50_000));
    drop((held, held_cached));
    handle.unmount().expect("unmount");
}
