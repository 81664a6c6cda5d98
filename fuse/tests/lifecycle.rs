//! Mounting and unmounting: nothing may stay in the mount table, a busy mount is detached
//! rather than left or forced, and a mount whose daemon died can be cleared away.

mod common;

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{mounts_at, pattern, require_root, wait_until, Mounted};
use lazysnap_fuse::{detach_mount, mount, Ino, MemorySource, Meta, MountError, MountOptions};

fn tree() -> MemorySource {
    let mut src = MemorySource::new();
    src.file(Ino::ROOT, "file", Meta::new(0o644), pattern(300_000));
    src
}

#[test]
fn unmount_leaves_nothing_behind_and_releases_the_source() {
    let source = Arc::new(tree());
    let mut m = Mounted::new(Arc::clone(&source), MountOptions::default());
    assert_eq!(mounts_at(&m.mountpoint).len(), 1);
    assert_eq!(fs::read(m.path("file")).ok(), Some(pattern(300_000)));

    let handle = m.handle.take().expect("mounted");
    assert_eq!(handle.mountpoint(), m.mountpoint);
    handle.unmount().expect("unmount");
    assert!(mounts_at(&m.mountpoint).is_empty());
    // The session ended and dropped the filesystem, and with it the source.
    assert_eq!(Arc::strong_count(&source), 1);
    assert!(fs::read_dir(&m.mountpoint).map(|d| d.count()).ok() == Some(0));
}

#[test]
fn dropping_the_handle_unmounts() {
    let mut m = Mounted::new(Arc::new(tree()), MountOptions::default());
    assert_eq!(mounts_at(&m.mountpoint).len(), 1);
    drop(m.handle.take());
    assert!(mounts_at(&m.mountpoint).is_empty());
}

/// A layer still mounted elsewhere (here a bind mount; in a container, overlayfs's private
/// clone of its lower layer) keeps its session after the unmount. `unmount` waits a little
/// for the session to end; dropping the handle, as a daemon does at exit, must not.
#[test]
fn dropping_a_handle_in_use_elsewhere_does_not_wait_for_the_session() {
    use nix::mount::{mount as sys_mount, umount2, MntFlags, MsFlags};
    let source = Arc::new(tree());
    let mut m = Mounted::new(Arc::clone(&source), MountOptions::default());
    let bind = m.dir.path().join("bind");
    fs::create_dir(&bind).expect("bind dir");
    sys_mount(
        Some(&m.mountpoint),
        &bind,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .expect("bind mount");

    let started = std::time::Instant::now();
    drop(m.handle.take());
    let took = started.elapsed();
    assert!(took < Duration::from_millis(500), "drop took {took:?}");
    assert!(mounts_at(&m.mountpoint).is_empty());
    // The bind mount still reads, through the session that lives on.
    assert_eq!(fs::read(bind.join("file")).ok(), Some(pattern(300_000)));

    umount2(&bind, MntFlags::MNT_DETACH).expect("unmount the bind mount");
    wait_until(Duration::from_secs(5), "the session to end", || {
        Arc::strong_count(&source) == 1
    });
}

#[test]
fn a_busy_mount_is_detached_and_serves_its_users_to_the_end() {
    let source = Arc::new(tree());
    let mut m = Mounted::new(Arc::clone(&source), MountOptions::default());
    let mut open = File::open(m.path("file")).expect("open");

    m.handle
        .take()
        .expect("mounted")
        .unmount()
        .expect("detach a busy mount");
    assert!(mounts_at(&m.mountpoint).is_empty());

    // The open file still reads, through the session that lives on.
    let mut data = Vec::new();
    open.read_to_end(&mut data).expect("read after detach");
    assert!(data == pattern(300_000));

    // The last user gone, the kernel ends the session, which drops the source.
    drop(open);
    wait_until(Duration::from_secs(5), "the session to end", || {
        Arc::strong_count(&source) == 1
    });
}

#[test]
fn several_dispatch_threads_serve_the_same_tree() {
    let options = MountOptions {
        dispatch_threads: 2,
        ..MountOptions::default()
    };
    let m = Mounted::new(Arc::new(tree()), options);
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let path = m.path("file");
            std::thread::spawn(move || fs::read(path))
        })
        .collect();
    for reader in readers {
        let data = reader.join().expect("reader").expect("read");
        assert!(data == pattern(300_000));
    }
}

#[test]
fn a_failed_mount_leaves_nothing_behind() {
    require_root();
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let missing = dir.path().join("missing");
    let result = mount(
        Arc::new(tree()),
        &missing,
        MountOptions::default(),
        runtime.handle().clone(),
    );
    assert!(
        matches!(&result, Err(MountError::Mount { mountpoint, .. }) if *mountpoint == missing),
        "{result:?}"
    );

    let bad_name = MountOptions {
        fsname: "a,b".to_owned(),
        ..MountOptions::default()
    };
    let result = mount(
        Arc::new(tree()),
        dir.path(),
        bad_name,
        runtime.handle().clone(),
    );
    assert!(
        matches!(result, Err(MountError::Mount { .. })),
        "{result:?}"
    );
    assert!(mounts_at(&dir.path().canonicalize().expect("canonical")).is_empty());
}

/// Set for the child process that plays a daemon about to crash.
const CHILD_ENV: &str = "LAZYSNAP_FUSE_TEST_CRASHING_DAEMON";

/// Mounts at `$LAZYSNAP_FUSE_TEST_CRASHING_DAEMON` and waits to be killed. Only meaningful
/// as the child of `a_mount_left_by_a_crashed_daemon_can_be_detached`.
#[test]
#[ignore = "run by another test as a crashing daemon"]
fn crashing_daemon() {
    let Some(mountpoint) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let handle = mount(
        Arc::new(tree()),
        &mountpoint,
        MountOptions::default(),
        runtime.handle().clone(),
    )
    .expect("mount in the child");
    // Only now, with `mount` returned: it closes a file of the mount before it returns (to
    // switch FLUSH off), and a kill during that close would leave this process waiting on
    // its own dead server, unkillable, until the connection is aborted.
    fs::write(ready_marker(Path::new(&mountpoint)), b"").expect("ready marker");
    // Never unmount: the parent kills this process, as a crash would.
    std::mem::forget(handle);
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// Beside `mountpoint`: written by the crashing daemon once its `mount` has returned.
fn ready_marker(mountpoint: &Path) -> PathBuf {
    let mut name = mountpoint.as_os_str().to_owned();
    name.push(".ready");
    PathBuf::from(name)
}

/// The child daemon; killed, and its mount detached, however the test ends.
struct Daemon {
    child: Child,
    mountpoint: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Both may have happened already.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = detach_mount(&self.mountpoint);
    }
}

fn spawn_crashing_daemon(mountpoint: &Path) -> Daemon {
    let exe = std::env::current_exe().expect("test binary");
    let child = Command::new(exe)
        .args(["--exact", "crashing_daemon", "--ignored", "--nocapture"])
        .env(CHILD_ENV, mountpoint)
        // Its test harness chatter would interleave with ours; panics go to stderr.
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn the daemon process");
    Daemon {
        child,
        mountpoint: mountpoint.to_path_buf(),
    }
}

#[test]
fn a_mount_left_by_a_crashed_daemon_can_be_detached() {
    require_root();
    let dir = tempfile::tempdir().expect("temp dir");
    let mountpoint: PathBuf = dir.path().canonicalize().expect("canonical").join("layer");
    fs::create_dir(&mountpoint).expect("mountpoint");

    let mut daemon = spawn_crashing_daemon(&mountpoint);
    wait_until(Duration::from_secs(5), "the child's mount", || {
        mounts_at(&mountpoint).len() == 1 && ready_marker(&mountpoint).exists()
    });
    assert!(fs::metadata(mountpoint.join("file")).is_ok());

    // SIGKILL: no unmount, no cleanup; the kernel closes /dev/fuse and the mount goes dead.
    daemon.child.kill().expect("kill the daemon");
    daemon.child.wait().expect("reap the daemon");
    // What the kernel cached still answers; anything that needs the daemon fails.
    let dead = fs::metadata(mountpoint.join("never-looked-up")).expect_err("dead mount");
    assert_eq!(dead.raw_os_error(), Some(libc::ENOTCONN), "{dead}");
    assert_eq!(mounts_at(&mountpoint).len(), 1, "the dead mount stays");

    assert!(detach_mount(&mountpoint).expect("detach the dead mount"));
    assert!(mounts_at(&mountpoint).is_empty());
    assert!(fs::read_dir(&mountpoint).map(|d| d.count()).ok() == Some(0));

    // Nothing (left) to detach is not an error.
    assert!(!detach_mount(&mountpoint).expect("second detach"));
    assert!(!detach_mount(dir.path().join("absent")).expect("missing path"));
}
