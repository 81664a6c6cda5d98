//! Containment through the real stack: socket modes whatever the umask, the control API's
//! refusal of callers other than root and the control group, a read with the registry gone
//! failing within `read_timeout`, and SIGTERM ending the daemon promptly while a container
//! uses a lazy mount.

mod harness;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use harness::estargz::{self, File};
use harness::image::{self, ImageSpec};
use harness::Stack;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const LAZYSNAP: &str = env!("CARGO_BIN_EXE_lazysnap");

/// `nobody` on Debian.
const NOBODY: u32 = 65534;

/// A group every Debian system has and `nobody` is not in.
const CONTROL_GROUP: &str = "adm";

/// Writes `text` as lazysnap's config in the stack's future parent and returns the flags.
fn config_args(dir: &Path, text: &str) -> Vec<String> {
    let config = dir.join("lazysnap.toml");
    std::fs::write(&config, text).expect("write config");
    vec!["--config".into(), config.display().to_string()]
}

/// busybox (plain gzip, unpacked by containerd) under an eStargz layer with `/app`: pushed as
/// `name:1`. Only the app layer is lazy, so with the registry gone the container still starts.
fn push_app_image(stack: &Stack, name: &str) -> String {
    let files = [
        File::new("app/small.txt", "small\n"),
        File::new("app/big.bin", image::pseudo_random(2 << 20, 31)),
        File::new("app/other.bin", image::pseudo_random(1 << 20, 32)),
        File::new("app/case", name),
    ];
    let spec = ImageSpec {
        layers: vec![image::busybox_layer()],
        blobs: vec![estargz::layer(&["app/"], &files).into()],
        cmd: vec!["/bin/sh".into()],
    };
    let reference = stack.image_ref(&format!("{name}:1"));
    image::push(&spec, &stack.dir, &reference);
    reference
}

/// A container running `sleep` in the background, killed and deleted on drop (a shim and its
/// container would otherwise outlive the test's containerd).
struct Running<'a> {
    stack: &'a Stack,
    id: String,
}

impl<'a> Running<'a> {
    fn start(stack: &'a Stack, reference: &str, id: &str) -> Running<'a> {
        stack.ctr(&[
            "run",
            "-d",
            "--snapshotter",
            "lazysnap",
            reference,
            id,
            "/bin/sleep",
            "600",
        ]);
        Running {
            stack,
            id: id.into(),
        }
    }

    /// Runs `script` in the container; returns (stdout + stderr of the script, how long it
    /// took from outside, exec overhead included).
    fn exec(&self, exec_id: &str, script: &str) -> (String, Duration) {
        let started = Instant::now();
        let out = self
            .stack
            .try_ctr(&[
                "task",
                "exec",
                "--exec-id",
                exec_id,
                &self.id,
                "/bin/sh",
                "-c",
                script,
            ])
            .unwrap_or_else(|e| panic!("exec {script:?}: {e}\n{}", self.stack.diagnostics()));
        (out, started.elapsed())
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let _ = self
            .stack
            .try_ctr(&["task", "kill", "--signal", "SIGKILL", &self.id]);
        for _ in 0..50 {
            if self.stack.try_ctr(&["task", "delete", &self.id]).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.stack.try_ctr(&["container", "delete", &self.id]);
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .mode()
        & 0o7777
}

#[test]
fn sockets_have_their_modes_under_umask_0() {
    // The harness starts the binary it is given; a wrapper clears the umask for lazysnap only.
    let wrapper_dir = tempfile::tempdir().expect("tempdir");
    let wrapper = wrapper_dir.path().join("lazysnap-umask-0");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\numask 000\nexec {LAZYSNAP} \"$@\"\n"),
    )
    .expect("write wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let args = config_args(
        wrapper_dir.path(),
        &format!("control_group = \"{CONTROL_GROUP}\"\n"),
    );
    let stack = Stack::start_with(wrapper.to_str().expect("utf-8 path"), args);

    assert_eq!(mode(&stack.lazysnap_socket()), 0o600, "snapshots socket");
    assert_eq!(mode(&stack.control_socket()), 0o660, "control socket");
    let group = nix::unistd::Group::from_name(CONTROL_GROUP)
        .expect("group lookup")
        .expect("group exists");
    let control = std::fs::metadata(stack.control_socket()).expect("stat control");
    assert_eq!(control.gid(), group.gid.as_raw(), "control socket's group");
    assert_eq!(control.uid(), 0);
    // Nothing of the staging is left beside the sockets.
    let leftovers: Vec<PathBuf> = std::fs::read_dir(&stack.dir)
        .expect("list stack dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains(".lazysnap-bind-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // And the daemon works through them.
    stack.cli(&["mounts"]);
}

/// Runs the CLI as `nobody` with the given `setpriv` group flags.
fn cli_as_nobody(binary: &Path, socket: &Path, groups: &[&str]) -> Result<String, String> {
    let out = Command::new("setpriv")
        .arg(format!("--reuid={NOBODY}"))
        .arg(format!("--regid={NOBODY}"))
        .args(groups)
        .arg(binary)
        .args(["mounts", "--control"])
        .arg(socket)
        .output()
        .expect("run setpriv");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

#[test]
fn the_control_api_admits_root_and_the_control_group_only() {
    let cfg = tempfile::tempdir().expect("tempdir");
    let args = config_args(
        cfg.path(),
        &format!("control_group = \"{CONTROL_GROUP}\"\n"),
    );
    let stack = Stack::start_with(LAZYSNAP, args);
    let gid = nix::unistd::Group::from_name(CONTROL_GROUP)
        .expect("group lookup")
        .expect("group exists")
        .gid;

    // Root is admitted.
    stack.cli(&["mounts"]);

    // nobody must be able to reach the socket and run the binary for the rest: the stack dir
    // is 0700, and the binary may sit under a private directory.
    std::fs::set_permissions(&stack.dir, std::fs::Permissions::from_mode(0o711)).expect("chmod");
    let binary = stack.path("lazysnap-cli");
    std::fs::copy(LAZYSNAP, &binary).expect("copy the CLI");
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let socket = stack.control_socket();

    // Outside the group, the socket's mode keeps nobody out before the daemon is asked.
    let err = cli_as_nobody(&binary, &socket, &["--clear-groups"]).expect_err("no access");
    assert!(err.contains("Permission denied"), "{err}");

    // In the group (as a supplementary group only), nobody is admitted.
    let groups = format!("--groups={}", gid.as_raw());
    let out = cli_as_nobody(&binary, &socket, &[&groups]);
    assert!(out.is_ok(), "a member of the control group: {out:?}");

    // With the socket opened wide (as a careless chmod or bind mount would), the daemon itself
    // refuses a caller outside the group, naming it; the refusal is logged once.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let refusals_before = stack.lazysnap_log().matches("refusing a caller").count();
    let err = cli_as_nobody(&binary, &socket, &["--clear-groups"]).expect_err("refused");
    assert!(err.contains("permission denied"), "{err}");
    assert!(err.contains(&format!("uid {NOBODY}")), "{err}");
    eprintln!("refused: {}", err.trim());
    let log = stack.lazysnap_log();
    let refusals = log.matches("refusing a caller").count() - refusals_before;
    assert_eq!(refusals, 1, "one warning per refused connection:\n{log}");
    assert!(
        log.lines().any(|l| l.contains("refusing a caller")
            && l.contains("WARN")
            && l.contains("uid=65534")),
        "{log}"
    );

    // Root still is admitted.
    stack.cli(&["mounts"]);
}

#[test]
fn with_the_registry_gone_a_read_fails_within_read_timeout() {
    const READ_TIMEOUT: Duration = Duration::from_secs(2);
    let cfg = tempfile::tempdir().expect("tempdir");
    let args = config_args(
        cfg.path(),
        &format!("[fuse]\nread_timeout = \"{}s\"\n", READ_TIMEOUT.as_secs()),
    );
    let mut stack = Stack::start_with(LAZYSNAP, args);
    let reference = push_app_image(&stack, "outage");
    stack.rpull(&reference);
    // Nothing of the app layer has been read: every byte of it would come from the registry.
    stack.stop_registry();
    let container = Running::start(&stack, &reference, "outage");
    // What exec costs by itself, to tell it from the read.
    let (_, overhead) = container.exec("warm", "true");

    let script = "cat /app/big.bin 2>&1 >/dev/null; echo rc=$?";
    let (out, first) = container.exec("first", script);
    assert!(out.contains("Input/output error"), "{out}");
    assert!(out.contains("rc=1"), "{out}");
    let (out, second) = container.exec("second", script);
    assert!(out.contains("Input/output error"), "{out}");
    eprintln!(
        "with the registry down, cat failed with EIO after {first:?}, then after {second:?} \
         (exec alone {overhead:?}, read_timeout {READ_TIMEOUT:?})"
    );
    let slack = Duration::from_millis(1000) + overhead;
    assert!(first < READ_TIMEOUT + slack, "first read took {first:?}");
    // Another process (this `cat`) tries afresh: it too fails within one read timeout.
    assert!(second < READ_TIMEOUT + slack, "second read took {second:?}");
    let log = stack.lazysnap_log();
    let lines = log.matches("the reader gets EIO").count();
    assert!(
        (1..=2).contains(&lines),
        "one warning per mount and kind, not one per request: {lines}\n{log}"
    );
}

#[test]
fn sigterm_ends_the_daemon_promptly_while_a_container_uses_a_lazy_mount() {
    let mut stack = Stack::start(LAZYSNAP);
    let reference = push_app_image(&stack, "term");
    stack.rpull(&reference);
    // Out of the stack, so that it can be signalled while the container borrows the stack.
    let mut lazysnap = stack.lazysnap.take().expect("lazysnap runs");
    let container = Running::start(&stack, &reference, "term");
    let (out, _) = container.exec("read", "cat /app/small.txt");
    assert_eq!(out, "small\n");

    let pid = Pid::from_raw(lazysnap.pid().expect("pid") as i32);
    let started = Instant::now();
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    while lazysnap.is_running() && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = started.elapsed();
    let log = lazysnap.log_tail(15);
    eprintln!("lazysnap exited {took:?} after SIGTERM");
    assert!(
        !lazysnap.is_running(),
        "still running after {took:?}:\n{log}"
    );
    assert!(took < Duration::from_secs(2), "took {took:?}:\n{log}");

    // What the README says happens to the running container: its lazy mounts stay, their
    // FUSE fds held for the next daemon, so a read of what is not in the page cache waits
    // (it does not fail) and the next daemon answers it.
    let containerd = stack.containerd_socket();
    let read = std::thread::spawn(move || {
        Command::new("ctr")
            .arg("--address")
            .arg(containerd)
            .args([
                "--namespace",
                &harness::namespace(),
                "task",
                "exec",
                "--exec-id",
                "after",
            ])
            .args(["term", "/bin/sh", "-c", "wc -c < /app/other.bin"])
            .output()
    });
    std::thread::sleep(Duration::from_secs(2));
    assert!(!read.is_finished(), "the read waits for the next daemon");
    let mut next = Command::new(LAZYSNAP);
    next.arg("serve")
        .arg("--root")
        .arg(stack.lazysnap_root())
        .arg("--address")
        .arg(stack.lazysnap_socket())
        .arg("--control-address")
        .arg(stack.control_socket());
    let mut next =
        harness::process::Proc::spawn("lazysnap", next, &stack.path("lazysnap-next.log"));
    let started = Instant::now();
    let out = read.join().expect("reader").expect("ctr task exec");
    eprintln!(
        "the waiting read was answered {:?} after the next daemon was started",
        started.elapsed()
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1048576",
        "{out:?}"
    );
    assert!(next.is_running());
    drop(container);
    drop(lazysnap);
}
