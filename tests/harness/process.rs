//! Child processes owned by a test: started with their output in a log file, killed by their
//! own PID (never by name, so nothing else on the machine is touched), waited for.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> Proc {
        let out = File::create(log).expect("create log file");
        let err = out.try_clone().expect("clone log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Proc {
            name: name.into(),
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` and waits up to `grace` for the process to exit, then SIGKILLs it.
    pub fn stop(&mut self, signal: Signal, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = Pid::from_raw(child.id() as i32);
        let _ = kill(pid, signal);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Signal::SIGTERM, Duration::from_secs(5));
    }
}

/// Polls `cond` every `interval` until it holds (true) or `timeout` passes (false): the one
/// polling loop of the harness.
pub fn poll_until(timeout: Duration, interval: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(interval);
    }
    false
}

/// Waits until `ready` holds, panicking with `what` and the log after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, proc: &mut Proc, mut ready: impl FnMut() -> bool) {
    let ok = poll_until(timeout, Duration::from_millis(25), || {
        if !proc.is_running() {
            panic!(
                "{} exited while waiting for {what}:\n{}",
                proc.name,
                proc.log_tail(30)
            );
        }
        ready()
    });
    if !ok {
        panic!("timed out waiting for {what}:\n{}", proc.log_tail(30));
    }
}

/// A free TCP port on loopback (bound, read, released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("find a free port")
}
