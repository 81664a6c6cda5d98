//! Restarting lazysnap under a running container, through a real containerd and registry: a
//! container that keeps reading and checksumming files and exec'ing busybox from lazy layers
//! (page cache dropped all along, so its reads reach FUSE) sees no error and no changed
//! checksum across a SIGTERM + start, a SIGKILL + start (with the registry down meanwhile,
//! and a read in flight in the killed daemon), and the start of a different binary (an
//! upgrade). The new daemon takes over the FUSE connections the old one left: same mounts,
//! same inode numbers, nothing mounted anew. With FUSE passthrough on, files the container
//! holds open across the restarts (its shell's binary, a data file on an open fd) open again
//! afterwards, as the kernel only allows in the mode of the handles still open.

mod harness;

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use harness::image::{self, Entry, ImageSpec};
use harness::{metrics, Stack};
use sha2::{Digest, Sha256};

const LAZYSNAP: &str = env!("CARGO_BIN_EXE_lazysnap");
const FILES: [&str; 4] = ["d1", "d2", "d3", "d4"];
const FILE_LEN: usize = 1 << 20;
const INFLIGHT_LEN: usize = 4 << 20;
/// Where the in-flight read reads: far from anything else read, so nothing fetched it.
const INFLIGHT_AT: u64 = 3 << 20;
const CONTAINER: &str = "reader";

/// Reads and checksums every file, execs busybox from its lazy layer, runs `each` (more
/// checks, lines ending in newlines), and says how it went, in `/out/log` (a host directory),
/// until `/out/stop` appears; after `setup`.
fn reader_script(setup: &str, each: &str) -> String {
    let head = r#"i=0
while [ ! -e /out/stop ]; do
  i=$((i+1))
  if out=$(sha256sum /data/d1 /data/d2 /data/d3 /data/d4 2>&1); then
    echo "$out" >> /out/log
  else
    echo "ERR $i sha256sum: $out" >> /out/log
  fi
  /bin/busybox true || echo "ERR $i exec /bin/busybox" >> /out/log
"#;
    let tail = r#"  echo "iteration $i" >> /out/log
  sleep 0.1
done
echo done >> /out/log
"#;
    [setup, head, each, tail].concat()
}

fn data(n: usize) -> Vec<u8> {
    image::pseudo_random(FILE_LEN, 100 + n as u64)
}

fn inflight_data() -> Vec<u8> {
    image::pseudo_random(INFLIGHT_LEN, 7)
}

fn expected_sums() -> Vec<String> {
    FILES
        .iter()
        .enumerate()
        .map(|(n, name)| format!("{}  /data/{name}", hex::encode(Sha256::digest(data(n)))))
        .collect()
}

/// Reads `len` bytes at `offset` after dropping the file's pages from the page cache, so the
/// read goes to the FUSE server.
fn read_uncached(path: &Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let file = File::open(path)?;
    nix::fcntl::posix_fadvise(
        file.as_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )?;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// Drops the page cache every 200 ms until dropped itself.
struct CacheDropper {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl CacheDropper {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
                thread::sleep(Duration::from_millis(200));
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for CacheDropper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// [`reader_script`] after reading every file whole (so the store has them complete and
/// later opens pass through) and opening `/data/d1` on fd 3, held and read from until the end.
fn holding_script() -> String {
    reader_script(
        "sha256sum /data/d1 /data/d2 /data/d3 /data/d4 /bin/busybox > /dev/null\nexec 3< /data/d1\necho holding >> /out/log\n",
        "  head -c 1 <&3 > /dev/null || echo \"ERR $i read fd 3\" >> /out/log\n",
    )
}

/// The reader container; killed and deleted on drop (its shim would outlive containerd).
struct Reader {
    containerd: PathBuf,
    out: PathBuf,
}

impl Reader {
    fn start(stack: &Stack, reference: &str) -> Self {
        Self::start_with(stack, reference, &reader_script("", ""))
    }

    fn start_with(stack: &Stack, reference: &str, script: &str) -> Self {
        let out = stack.path("out");
        std::fs::create_dir_all(&out).expect("out dir");
        let mount = format!("type=bind,src={},dst=/out,options=rbind:rw", out.display());
        stack.ctr(&[
            "run",
            "-d",
            "--snapshotter",
            "lazysnap",
            "--mount",
            &mount,
            reference,
            CONTAINER,
            "/bin/sh",
            "-c",
            script,
        ]);
        Self {
            containerd: stack.containerd_socket(),
            out,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.out.join("log")).unwrap_or_default()
    }

    fn iterations(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.starts_with("iteration "))
            .count()
    }

    /// Waits until the container has done `n` more iterations, each without an error.
    fn keeps_going(&self, stack: &Stack, n: usize, what: &str) {
        let from = self.iterations();
        stack.eventually(
            &format!("{n} more error-free iterations of the reader {what}"),
            Duration::from_secs(30),
            || self.iterations() >= from + n,
        );
        self.assert_clean(what);
    }

    /// No error, and every checksum as expected, so far.
    fn assert_clean(&self, what: &str) {
        let log = self.log();
        let expected = expected_sums();
        for line in log.lines() {
            assert!(!line.starts_with("ERR"), "{what}: {line}\n{log}");
            if line.contains("/data/") {
                assert!(expected.iter().any(|e| e == line), "{what}: bad sum {line}");
            }
        }
    }

    /// Runs `script` in the container with `ctr task exec`.
    fn exec(&self, stack: &Stack, id: &str, script: &str) -> String {
        stack.ctr(&[
            "task",
            "exec",
            "--exec-id",
            id,
            CONTAINER,
            "/bin/sh",
            "-c",
            script,
        ])
    }
}

impl Reader {
    fn ctr(&self, args: &[&str]) -> bool {
        std::process::Command::new("ctr")
            .arg("--address")
            .arg(&self.containerd)
            .args(["--namespace", crate::harness::namespace().as_str()])
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let _ = std::fs::write(self.out.join("stop"), "");
        self.ctr(&["task", "kill", "--signal", "SIGKILL", CONTAINER]);
        for _ in 0..50 {
            if self.ctr(&["task", "delete", CONTAINER]) {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        self.ctr(&["container", "delete", CONTAINER]);
    }
}

/// The mountpoint of the lazy layer holding `relative`.
fn mount_holding(stack: &Stack, relative: &str) -> PathBuf {
    let json = stack.cli_json(&["mounts"]);
    json["mounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .map(|m| PathBuf::from(m["mountpoint"].as_str().expect("mountpoint")))
        .find(|p| p.join(relative).exists())
        .unwrap_or_else(|| panic!("no lazy mount holds {relative}: {json}"))
}

/// A copy of the lazysnap binary whose embedded version differs (`lazysnap --version` names
/// another commit), so that the file started is not the one that ran before: an upgrade as
/// far as the running system can tell. The code is the same; building a second lazysnap here
/// would cost minutes of CI.
fn other_build(stack: &Stack) -> PathBuf {
    let version = |bin: &Path| {
        let out = std::process::Command::new(bin)
            .arg("--version")
            .output()
            .expect("lazysnap --version");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let ours = version(Path::new(LAZYSNAP));
    let tail = ours
        .strip_prefix("lazysnap ")
        .expect("version line")
        .as_bytes()
        .to_vec();
    let replacement: Vec<u8> = tail
        .iter()
        .map(|&b| if b.is_ascii_alphanumeric() { b'9' } else { b })
        .collect();
    let mut bytes = std::fs::read(LAZYSNAP).expect("read binary");
    let mut patched = 0;
    let mut at = 0;
    while let Some(pos) = bytes[at..]
        .windows(tail.len())
        .position(|w| w == tail.as_slice())
    {
        let start = at + pos;
        bytes[start..start + tail.len()].copy_from_slice(&replacement);
        patched += 1;
        at = start + tail.len();
    }
    assert!(patched > 0, "the version string {ours:?} is in the binary");
    let path = stack.path("lazysnap-next");
    std::fs::write(&path, &bytes).expect("write the other build");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let theirs = version(&path);
    assert_ne!(ours, theirs, "the other build says another version");
    eprintln!("upgrade: {ours} -> {theirs}");
    path
}

/// busybox; the files the reader checksums; a file only the in-flight read touches. Pushed
/// as eStargz; returns its reference.
fn push_image(stack: &Stack) -> String {
    let mut data_layer = vec![Entry::dir("data")];
    for (n, name) in FILES.iter().enumerate() {
        data_layer.push(Entry::file(&format!("data/{name}"), data(n)));
    }
    let spec = ImageSpec {
        layers: vec![
            image::busybox_layer(),
            data_layer,
            vec![
                Entry::dir("slow"),
                Entry::file("slow/inflight.bin", inflight_data()),
            ],
        ],
        blobs: vec![],
        cmd: vec!["/bin/sh".into()],
    };
    let plain = stack.image_ref("takeover:gzip");
    image::push(&spec, &stack.dir, &plain);
    let lazy = stack.image_ref("takeover:lazy");
    stack.convert_and_push(&plain, &lazy, &["--estargz"]);
    lazy
}

#[test]
fn a_running_container_reads_on_across_restarts_crashes_and_upgrades() {
    harness::require_root();
    let mut stack = Stack::start(LAZYSNAP);
    let lazy = push_image(&stack);
    stack.rpull(&lazy);

    let data_mount = mount_holding(&stack, "data/d1");
    let slow_mount = mount_holding(&stack, "slow/inflight.bin");
    let ino = |stack: &Stack| {
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
        let meta = std::fs::metadata(data_mount.join("data/d3"));
        meta.unwrap_or_else(|e| panic!("stat: {e}\n{}", stack.diagnostics()))
            .ino()
    };
    let d3_ino = ino(&stack);
    let mounts_before = Stack::mounts_under(&stack.lazysnap_root());

    let reader = Reader::start(&stack, &lazy);
    let _dropper = CacheDropper::start();
    reader.keeps_going(&stack, 3, "before any restart");
    let expected = expected_sums();

    // (a) SIGTERM, then start: the mounts stay, held, and are taken over.
    stack.stop_lazysnap();
    stack.start_lazysnap();
    reader.keeps_going(&stack, 3, "after SIGTERM + start");
    assert_eq!(
        reader.exec(&stack, "exec-a", "sha256sum /data/d3"),
        format!("{}\n", expected[2])
    );
    assert_eq!(ino(&stack), d3_ino, "inode numbers stay");

    // (b) SIGKILL with the registry down and a read in flight in the dying daemon.
    stack.stop_registry();
    let slow_file = slow_mount.join("slow/inflight.bin");
    let inflight = thread::spawn(move || read_uncached(&slow_file, INFLIGHT_AT, 64 << 10));
    // The daemon retries the unreachable registry for `read_deadline` (20 s).
    thread::sleep(Duration::from_secs(1));
    assert!(!inflight.is_finished(), "the read waits on the registry");
    let probe_file = data_mount.join("data/d2");
    let killed = Instant::now();
    stack.kill_lazysnap();
    let probe = thread::spawn(move || {
        let read = read_uncached(&probe_file, 0, 4096);
        (read, Instant::now())
    });
    stack.start_lazysnap();
    let (read, served) = probe.join().expect("probe");
    assert_eq!(
        read.expect("a read across the crash"),
        data(1)[..4096],
        "first read served after the kill"
    );
    let kill_to_read = served - killed;
    eprintln!("kill -> first read served again: {kill_to_read:?}");
    // Cached data reads on while the registry is down.
    reader.keeps_going(&stack, 3, "after SIGKILL + start, registry down");
    assert!(
        !inflight.is_finished(),
        "the in-flight read still waits on the registry"
    );
    let port = stack.registry_port();
    stack.start_registry(port);
    let got = inflight
        .join()
        .expect("in-flight reader")
        .unwrap_or_else(|e| {
            panic!(
                "the read in flight at the kill: {e}\n{}",
                stack.diagnostics()
            )
        });
    assert!(
        got == inflight_data()[INFLIGHT_AT as usize..][..64 << 10],
        "the in-flight read got the right bytes"
    );
    assert_eq!(ino(&stack), d3_ino, "inode numbers stay");

    // (c) An upgrade: another binary takes over.
    let next = other_build(&stack);
    stack.stop_lazysnap();
    stack.set_lazysnap_bin(&next);
    stack.start_lazysnap();
    reader.keeps_going(&stack, 3, "after the upgrade");
    assert_eq!(
        reader.exec(&stack, "exec-c", "/bin/busybox sha256sum /data/d4"),
        format!("{}\n", expected[3])
    );
    assert_eq!(ino(&stack), d3_ino, "inode numbers stay");

    // Nothing was mounted anew: the same mounts, each served on the connection it began on.
    assert_eq!(Stack::mounts_under(&stack.lazysnap_root()), mounts_before);
    let json = stack.cli_json(&["mounts"]);
    let mounts = json["mounts"].as_array().expect("mounts");
    assert_eq!(mounts.len(), 3, "{json}");
    assert!(
        mounts.iter().all(|m| m["taken_over"] == true),
        "every mount taken over: {json}"
    );
    assert_eq!(json["takeover"]["connections"], 3, "{json}");
    assert_eq!(json["takeover"]["fd_store"], "holder", "{json}");
    let table = stack.cli(&["mounts"]);
    assert!(
        table.contains("taken over at start: 3 connection(s)"),
        "{table}"
    );
    let log = stack.lazysnap_log();
    assert_eq!(
        log.matches("took over 3 lazy layer FUSE connections")
            .count(),
        3,
        "one info line per start after the first:\n{log}"
    );

    reader.assert_clean("at the end");
    let iterations = reader.iterations();
    eprintln!(
        "reader: {iterations} iterations of 4 checksums and an exec, no error; kill -> first read: {kill_to_read:?}"
    );
}

/// With passthrough on, a restart must not break opens of files that processes hold open
/// through passthrough (or through the page cache): the kernel refuses an open in another
/// mode (`EBUSY`, `ETXTBSY`) while such handles are open, so the new daemon must answer the
/// way the old one did. The reader holds `/data/d1` on an fd and its shell's binary mapped,
/// and keeps opening both, across a SIGTERM + start and a SIGKILL + start.
#[test]
fn with_passthrough_files_held_open_open_again_after_restarts() {
    harness::require_root();
    let cfg = tempfile::tempdir().expect("temp dir");
    let config = cfg.path().join("lazysnap.toml");
    std::fs::write(
        &config,
        "[fuse]\npassthrough = \"on\"\npassthrough_min_file_bytes = 0\n",
    )
    .expect("config");
    let mut stack = Stack::start_with(
        LAZYSNAP,
        vec!["--config".into(), config.display().to_string()],
    );
    let lazy = push_image(&stack);
    stack.rpull(&lazy);
    let data_mount = mount_holding(&stack, "data/d1");

    let reader = Reader::start_with(&stack, &lazy, &holding_script());
    stack.eventually(
        "the reader holds /data/d1 open",
        Duration::from_secs(60),
        || reader.log().contains("holding"),
    );
    let _dropper = CacheDropper::start();
    reader.keeps_going(&stack, 3, "before any restart");
    // The held file is open through passthrough: the mount's journal says so.
    let journal = {
        let mut name = data_mount.clone().into_os_string();
        name.push(".backing-journal");
        PathBuf::from(name)
    };
    let d1 = std::fs::metadata(data_mount.join("data/d1"))
        .expect("stat d1")
        .ino();
    let passed_through = |journal: &Path| {
        let text = std::fs::read_to_string(journal).unwrap_or_default();
        text.lines().any(|l| l.starts_with(&format!("p {d1} ")))
    };
    assert!(
        passed_through(&journal),
        "d1 open through passthrough:\n{}",
        std::fs::read_to_string(&journal).unwrap_or_default()
    );

    stack.stop_lazysnap();
    stack.start_lazysnap();
    reader.keeps_going(&stack, 3, "after SIGTERM + start, passthrough on");
    let expected = expected_sums();
    assert_eq!(
        reader.exec(&stack, "exec-a", "/bin/busybox sha256sum /data/d1"),
        format!("{}\n", expected[0])
    );

    stack.kill_lazysnap();
    stack.start_lazysnap();
    reader.keeps_going(&stack, 3, "after SIGKILL + start, passthrough on");
    assert_eq!(
        reader.exec(&stack, "exec-b", "/bin/busybox sha256sum /data/d1"),
        format!("{}\n", expected[0])
    );
    // Still passed through after two takeovers, on the id the first daemon registered.
    assert!(passed_through(&journal), "d1 still passed through");
    reader.assert_clean("at the end");
    let log = stack.lazysnap_log();
    assert!(
        !log.contains("cannot read the passthrough journal"),
        "{log}"
    );
}

/// A held connection whose layer's saved state is gone when the daemon starts again is
/// unmounted, said so in the log and counted (in `lazysnap mounts` and the metrics); the
/// others are taken over.
#[test]
fn a_held_connection_without_its_layer_is_unmounted_and_logged() {
    harness::require_root();
    let port = harness::process::free_port();
    let config = tempfile::NamedTempFile::new().expect("config file");
    std::fs::write(
        config.path(),
        format!("[metrics]\naddress = \"127.0.0.1:{port}\"\n"),
    )
    .expect("config");
    let mut stack = Stack::start_with(
        LAZYSNAP,
        vec!["--config".into(), config.path().display().to_string()],
    );
    let before = metrics::scrape(port);
    assert_eq!(
        metrics::value(&before, "lazysnap_takeover_connections"),
        0.0
    );
    let lazy = push_image(&stack);
    stack.rpull(&lazy);
    let slow_mount = mount_holding(&stack, "slow/inflight.bin");
    let json = stack.cli_json(&["mounts"]);
    let digest = json["mounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .find(|m| m["mountpoint"] == slow_mount.display().to_string())
        .and_then(|m| m["digest"].as_str())
        .expect("the slow layer's digest")
        .to_owned();

    stack.stop_lazysnap();
    assert!(Stack::mounts_under(&stack.lazysnap_root()).contains(&slow_mount));
    std::fs::remove_dir_all(
        stack
            .lazysnap_root()
            .join("layers")
            .join(digest.replace(':', "-")),
    )
    .expect("remove the layer's saved state");
    stack.start_lazysnap();

    assert!(
        !Stack::mounts_under(&stack.lazysnap_root()).contains(&slow_mount),
        "the unmatched connection is unmounted"
    );
    let log = stack.lazysnap_log();
    let line = log
        .lines()
        .find(|l| l.contains("a held FUSE connection matches no saved lazy layer"))
        .unwrap_or_else(|| panic!("logged:\n{log}"));
    assert!(
        line.contains("WARN") && line.contains(&slow_mount.display().to_string()),
        "{line}"
    );
    let json = stack.cli_json(&["mounts"]);
    assert_eq!(json["takeover"]["connections"], 2, "{json}");
    assert_eq!(json["takeover"]["dropped"], 1, "{json}");
    assert_eq!(json["mounts"].as_array().map(Vec::len), Some(2), "{json}");
    let after = metrics::scrape(port);
    assert_eq!(metrics::value(&after, "lazysnap_takeover_connections"), 2.0);
    assert_eq!(
        metrics::value(&after, "lazysnap_takeover_dropped_connections"),
        1.0
    );
    let took = metrics::value(&after, "lazysnap_takeover_duration_seconds");
    assert!(took > 0.0 && took < 10.0, "{took}");
}

/// systemd's fd store as lazysnap sees it: a datagram socket at `$NOTIFY_SOCKET` keeping the
/// fds of `FDSTORE=1` by `FDNAME=`, dropping them on `FDSTOREREMOVE=1`, counting `READY=1`.
struct FakeSystemd {
    path: PathBuf,
    store: Arc<std::sync::Mutex<FdStoreState>>,
    stop: Arc<AtomicBool>,
}

/// The stored fds by name, and how many `READY=1` came.
#[derive(Default)]
struct FdStoreState {
    fds: Vec<(String, std::os::fd::OwnedFd)>,
    ready: usize,
}

impl FakeSystemd {
    fn start(path: &Path) -> Self {
        use nix::sys::socket::{
            bind, recvmsg, setsockopt, socket, sockopt, AddressFamily, ControlMessageOwned,
            MsgFlags, SockFlag, SockType, UnixAddr,
        };
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let sock = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket");
        bind(sock.as_raw_fd(), &UnixAddr::new(path).expect("addr")).expect("bind");
        setsockopt(
            &sock,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(0, 100_000),
        )
        .expect("timeout");
        let store = Arc::new(std::sync::Mutex::new(FdStoreState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (kept, flag) = (store.clone(), stop.clone());
        thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let mut buf = [0u8; 4096];
                let mut space = nix::cmsg_space!([std::os::fd::RawFd; 4]);
                let mut iov = [std::io::IoSliceMut::new(&mut buf)];
                let Ok(msg) = recvmsg::<()>(
                    sock.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                ) else {
                    continue;
                };
                let mut fds = Vec::new();
                for cmsg in msg.cmsgs().expect("cmsgs") {
                    if let ControlMessageOwned::ScmRights(raw) = cmsg {
                        // SAFETY: received with this message; nothing else owns them.
                        fds.extend(
                            raw.into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
                let len = msg.bytes;
                let text = String::from_utf8_lossy(&buf[..len]).into_owned();
                let fields: Vec<&str> = text.lines().collect();
                let name = fields
                    .iter()
                    .find_map(|f| f.strip_prefix("FDNAME="))
                    .unwrap_or("stored")
                    .to_owned();
                let mut kept = kept.lock().expect("store");
                if fields.contains(&"FDSTORE=1") {
                    kept.fds.retain(|(n, _)| *n != name);
                    kept.fds
                        .extend(fds.into_iter().map(|fd| (name.clone(), fd)));
                } else if fields.contains(&"FDSTOREREMOVE=1") {
                    kept.fds.retain(|(n, _)| *n != name);
                } else if fields.contains(&"READY=1") {
                    kept.ready += 1;
                }
            }
        });
        Self {
            path: path.to_path_buf(),
            store,
            stop,
        }
    }

    fn ready_count(&self) -> usize {
        self.store.lock().expect("store").ready
    }

    /// Copies of the stored fds, with their names, as systemd passes them to a new instance.
    fn stored(&self) -> (Vec<String>, Vec<std::os::fd::OwnedFd>) {
        let kept = self.store.lock().expect("store");
        kept.fds
            .iter()
            .map(|(name, fd)| (name.clone(), fd.try_clone().expect("dup")))
            .unzip()
    }
}

impl Drop for FakeSystemd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Under systemd the fds go to its fd store (`FDSTORE=1`), and a new instance gets them as
/// `LISTEN_FDS`/`LISTEN_FDNAMES` and takes the mounts over, with `READY=1` each time.
#[test]
fn under_systemd_the_fd_store_carries_the_mounts_across_a_crash() {
    harness::require_root();
    let mut stack = Stack::start(LAZYSNAP);
    let lazy = push_image(&stack);
    let systemd = FakeSystemd::start(&stack.path("notify"));
    let notify = systemd.path.clone().into_os_string();
    // From here on lazysnap runs as a systemd service would.
    stack.stop_lazysnap();
    stack.start_lazysnap_with(&[("NOTIFY_SOCKET", &notify)], Vec::new());
    stack.eventually("READY=1", Duration::from_secs(10), || {
        systemd.ready_count() == 1
    });
    // containerd redials the snapshotter with a backoff after the first one went away.
    stack.eventually("a lazy pull", Duration::from_secs(30), || {
        stack.try_rpull(&lazy).is_ok()
    });
    let reader = Reader::start(&stack, &lazy);
    let _dropper = CacheDropper::start();
    reader.keeps_going(&stack, 3, "under systemd");
    let (names, fds) = systemd.stored();
    assert_eq!(fds.len(), 3, "one stored fd per lazy mount: {names:?}");
    assert!(
        names.iter().all(|n| n.starts_with("lazysnap~")),
        "{names:?}"
    );

    stack.kill_lazysnap();
    let count = fds.len().to_string();
    let joined = names.join(":");
    stack.start_lazysnap_with(
        &[
            ("NOTIFY_SOCKET", &notify),
            ("LISTEN_FDS", std::ffi::OsStr::new(&count)),
            ("LISTEN_FDNAMES", std::ffi::OsStr::new(&joined)),
        ],
        fds,
    );
    reader.keeps_going(&stack, 3, "after SIGKILL + start under systemd");
    stack.eventually("READY=1 again", Duration::from_secs(10), || {
        systemd.ready_count() == 2
    });
    let json = stack.cli_json(&["mounts"]);
    assert_eq!(json["takeover"]["fd_store"], "systemd", "{json}");
    assert_eq!(json["takeover"]["connections"], 3, "{json}");
    assert!(
        json["mounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .all(|m| m["taken_over"] == true),
        "{json}"
    );
    reader.assert_clean("at the end");
}

/// `--unmount-on-exit` is lazysnap leaving the node: SIGTERM unmounts every lazy layer and
/// stops holding its fd, and the holder, left with nothing, exits.
#[test]
fn unmount_on_exit_takes_the_mounts_and_the_holder_down() {
    harness::require_root();
    let mut stack = Stack::start_with(LAZYSNAP, vec!["--unmount-on-exit".into()]);
    let lazy = push_image(&stack);
    stack.rpull(&lazy);
    assert_eq!(Stack::mounts_under(&stack.lazysnap_root()).len(), 3);
    let holder = stack.lazysnap_root().join("fd-holder.sock");
    assert!(holder.exists(), "a holder runs");
    stack.stop_lazysnap();
    assert!(
        Stack::mounts_under(&stack.lazysnap_root()).is_empty(),
        "every lazy layer unmounted"
    );
    let log = stack.lazysnap_log();
    assert!(
        log.contains("0 left mounted for the next daemon, 3 unmounted"),
        "{log}"
    );
    stack.eventually("the holder to exit", Duration::from_secs(10), || {
        let probe = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket");
        let addr = nix::sys::socket::UnixAddr::new(&holder).expect("addr");
        nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&probe), &addr).is_err()
    });
}
