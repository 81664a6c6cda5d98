//! One complete test stack in a temporary directory: docker-registry on a free loopback port,
//! lazysnap on its own socket, containerd with lazysnap as a proxy plugin. Only one stack runs
//! at a time per test binary (2-core CI machines), and dropping it tears everything down.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::signal::Signal;

use super::process::{free_port, wait_for, Proc};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

pub struct Stack {
    pub dir: PathBuf,
    pub registry_host: String,
    pub registry: Option<Proc>,
    pub lazysnap: Option<Proc>,
    pub containerd: Option<Proc>,
    lazysnap_bin: PathBuf,
    /// Extra flags for `lazysnap serve` (e.g. `--config`).
    pub lazysnap_args: Vec<String>,
    /// CRI mode: containerd's CRI plugin on, using lazysnap; lazysnap fronts the CRI image
    /// service. Holds extra lazysnap config text.
    cri: Option<String>,
    /// Which node this is: `new_node` gives lazysnap and containerd fresh state dirs, as a
    /// second machine pulling from the same registry would have.
    node: usize,
    _turn: MutexGuard<'static, ()>,
    keep: bool,
}

impl Stack {
    /// Starts registry, lazysnap and containerd; `lazysnap_bin` is the binary under test.
    pub fn start(lazysnap_bin: &str) -> Stack {
        Self::start_with(lazysnap_bin, Vec::new())
    }

    pub fn start_with(lazysnap_bin: &str, lazysnap_args: Vec<String>) -> Stack {
        Self::start_inner(lazysnap_bin, lazysnap_args, None)
    }

    /// A stack as a Kubernetes node has it: containerd's CRI plugin on, with lazysnap as its
    /// snapshotter and snapshot annotations passed as labels, and lazysnap serving the CRI
    /// image service (`cri_socket`) in front of containerd. `lazysnap_config` is extra TOML
    /// for lazysnap (without a `[cri]` section). Pods use `pause_image_ref` as sandbox image,
    /// which the test must push.
    pub fn start_cri(lazysnap_bin: &str, lazysnap_config: &str) -> Stack {
        Self::start_inner(lazysnap_bin, Vec::new(), Some(lazysnap_config.to_owned()))
    }

    fn start_inner(lazysnap_bin: &str, lazysnap_args: Vec<String>, cri: Option<String>) -> Stack {
        super::require_root();
        super::packages::ensure();
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::Builder::new()
            .prefix("lazysnap-e2e-")
            .tempdir()
            .expect("create temp dir")
            .keep();
        let mut stack = Stack {
            registry_host: String::new(),
            registry: None,
            lazysnap: None,
            containerd: None,
            lazysnap_bin: lazysnap_bin.into(),
            lazysnap_args,
            node: 0,
            cri,
            _turn: turn,
            keep: std::env::var_os("LAZYSNAP_KEEP_TMP").is_some(),
            dir,
        };
        stack.start_registry(free_port());
        stack.start_lazysnap();
        stack.start_containerd();
        stack
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A per-node name: `name` on the first node, `name-N` on later ones.
    fn node_path(&self, name: &str) -> PathBuf {
        match self.node {
            0 => self.path(name),
            n => self.path(&format!("{name}-{n}")),
        }
    }

    pub fn lazysnap_root(&self) -> PathBuf {
        self.node_path("lazysnap-root")
    }

    pub fn lazysnap_socket(&self) -> PathBuf {
        self.node_path("lazysnap.sock")
    }

    /// lazysnap's control socket, which the `lazysnap` CLI talks to.
    pub fn control_socket(&self) -> PathBuf {
        self.node_path("control.sock")
    }

    pub fn containerd_socket(&self) -> PathBuf {
        self.node_path("containerd.sock")
    }

    /// lazysnap's CRI image service (CRI mode).
    pub fn cri_socket(&self) -> PathBuf {
        self.node_path("cri.sock")
    }

    /// The sandbox image containerd's CRI uses in CRI mode.
    pub fn pause_image_ref(&self) -> String {
        self.image_ref("pause:1")
    }

    /// Stops this node's containerd and lazysnap and starts both again with empty state
    /// dirs, sockets of their own, and the same registry: a second node.
    pub fn new_node(&mut self) {
        for proc in [&mut self.containerd, &mut self.lazysnap] {
            if let Some(mut p) = proc.take() {
                p.stop(Signal::SIGTERM, Duration::from_secs(10));
            }
        }
        self.node += 1;
        self.start_lazysnap();
        self.start_containerd();
    }

    /// Runs the `lazysnap` CLI against this node's control socket; returns stdout, or the
    /// exit status and stderr.
    pub fn try_cli(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.lazysnap_bin)
            .args(args)
            .arg("--control")
            .arg(self.control_socket())
            .output()
            .map_err(|e| format!("run lazysnap: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "lazysnap {args:?} failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Like `try_cli`, panicking with the logs on failure.
    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.diagnostics()))
    }

    /// `lazysnap ARGS --json`, parsed.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut with_json = args.to_vec();
        with_json.push("--json");
        let out = self.cli(&with_json);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("lazysnap {args:?} --json: {e}: {out}"))
    }

    /// (Re)starts the registry on `port`, serving the same storage.
    pub fn start_registry(&mut self, port: u16) {
        let config = self.path("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                self.path("registry-data").display()
            ),
        )
        .expect("write registry config");
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve").arg(&config);
        let log = self.path(&format!("registry-{port}.log"));
        let mut proc = Proc::spawn("docker-registry", cmd, &log);
        let url = format!("127.0.0.1:{port}");
        wait_for(
            "the registry to listen",
            Duration::from_secs(20),
            &mut proc,
            || std::net::TcpStream::connect(&url).is_ok(),
        );
        self.registry_host = url;
        self.registry = Some(proc);
    }

    pub fn stop_registry(&mut self) {
        if let Some(mut registry) = self.registry.take() {
            registry.stop(Signal::SIGTERM, Duration::from_secs(5));
        }
    }

    pub fn registry_port(&self) -> u16 {
        self.registry_host
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("registry port")
    }

    pub fn start_lazysnap(&mut self) {
        self.start_lazysnap_with(&[], Vec::new());
    }

    /// Starts lazysnap with `env` added and `fds` passed as fds 3, 4, ... (as systemd passes
    /// `LISTEN_FDS`).
    pub fn start_lazysnap_with(&mut self, env: &[(&str, &std::ffi::OsStr)], fds: Vec<OwnedFd>) {
        let socket = self.lazysnap_socket();
        let mut cmd = Command::new(&self.lazysnap_bin);
        cmd.envs(env.iter().copied());
        // Above any number the child's 3..3+n could collide with, then moved into place
        // between fork and exec (dup2 clears close-on-exec).
        let high: Vec<OwnedFd> = fds
            .iter()
            .map(|fd| {
                let raw = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(1000))
                    .expect("dup fd");
                // SAFETY: F_DUPFD_CLOEXEC returned a new fd nothing else owns.
                unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) }
            })
            .collect();
        if !high.is_empty() {
            let raw: Vec<i32> = high.iter().map(|fd| fd.as_raw_fd()).collect();
            // SAFETY: the closure only calls dup2, which is async-signal-safe, on fds that stay
            // open in the parent until the child has been spawned.
            unsafe {
                cmd.pre_exec(move || {
                    for (i, &fd) in raw.iter().enumerate() {
                        if libc::dup2(fd, 3 + i as i32) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        self.start_lazysnap_cmd(cmd, socket);
        drop(high);
    }

    fn start_lazysnap_cmd(&mut self, mut cmd: Command, socket: PathBuf) {
        cmd.arg("serve")
            .arg("--root")
            .arg(self.lazysnap_root())
            .arg("--address")
            .arg(&socket)
            .arg("--control-address")
            .arg(self.control_socket())
            .arg("--log-level")
            .arg("debug")
            .args(&self.lazysnap_args);
        if let Some(extra) = &self.cri {
            let config = self.node_path("lazysnap-cri.toml");
            std::fs::write(
                &config,
                format!(
                    "{extra}\n[cri]\nimage_service_address = \"{}\"\ncontainerd_address = \"{}\"\n",
                    self.cri_socket().display(),
                    self.containerd_socket().display()
                ),
            )
            .expect("write lazysnap config");
            cmd.arg("--config").arg(config);
        }
        let mut n = std::fs::read_dir(&self.dir).map(|d| d.count()).unwrap_or(0);
        // A restart with nothing new in the directory must not truncate the last run's log.
        while self.path(&format!("lazysnap-{n}.log")).exists() {
            n += 1;
        }
        let mut proc = Proc::spawn("lazysnap", cmd, &self.path(&format!("lazysnap-{n}.log")));
        wait_for(
            "lazysnap's socket",
            Duration::from_secs(30),
            &mut proc,
            || std::os::unix::net::UnixStream::connect(&socket).is_ok(),
        );
        self.lazysnap = Some(proc);
    }

    /// Stops lazysnap with SIGTERM, as `systemctl stop` would, and waits for it to exit.
    pub fn stop_lazysnap(&mut self) {
        if let Some(mut proc) = self.lazysnap.take() {
            proc.stop(Signal::SIGTERM, Duration::from_secs(10));
        }
    }

    /// The binary the next `start_lazysnap` runs (an upgrade).
    pub fn set_lazysnap_bin(&mut self, bin: &Path) {
        self.lazysnap_bin = bin.to_path_buf();
    }

    /// Kills lazysnap with SIGKILL: no cleanup, no unmount, as a crash would.
    pub fn kill_lazysnap(&mut self) {
        if let Some(mut proc) = self.lazysnap.take() {
            proc.stop(Signal::SIGKILL, Duration::from_secs(5));
        }
    }

    pub fn lazysnap_log(&self) -> String {
        let mut logs: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        logs.retain(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("lazysnap-"))
        });
        logs.sort();
        logs.iter()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn start_containerd(&mut self) {
        let config = self.path("containerd.toml");
        let plugins = match &self.cri {
            None => r#"disabled_plugins = ["io.containerd.grpc.v1.cri"]"#.to_owned(),
            Some(_) => {
                // The test registry is plain HTTP on loopback: say so in a hosts.toml, as a
                // node would for an insecure registry.
                let certs = self.path("certs.d");
                write_hosts_toml(&certs, &self.registry_host, &self.registry_host);
                format!(
                    r#"[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # A node inside a container may not lower OOM scores below its own, as CRI does for pods.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "lazysnap"
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{certs}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni}"
    conf_dir = "{cni}"
"#,
                    pause = self.pause_image_ref(),
                    certs = certs.display(),
                    cni = self.path("cni").display(),
                )
            }
        };
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
{plugins}
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  level = "debug"
[proxy_plugins.lazysnap]
  type = "snapshot"
  address = "{lazysnap}"
"#,
                root = self.node_path("containerd-root").display(),
                state = self.node_path("containerd-state").display(),
                sock = self.containerd_socket().display(),
                lazysnap = self.lazysnap_socket().display(),
            ),
        )
        .expect("write containerd config");
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(&config);
        let mut proc = Proc::spawn("containerd", cmd, &self.node_path("containerd.log"));
        let socket = self.containerd_socket();
        wait_for(
            "containerd's socket",
            Duration::from_secs(30),
            &mut proc,
            || std::os::unix::net::UnixStream::connect(&socket).is_ok(),
        );
        self.containerd = Some(proc);
    }

    /// Runs `ctr` against this containerd; returns stdout or panics with stderr and logs.
    pub fn ctr(&self, args: &[&str]) -> String {
        self.try_ctr(args)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.diagnostics()))
    }

    pub fn try_ctr(&self, args: &[&str]) -> Result<String, String> {
        self.try_tool("ctr", args)
    }

    /// `ctr images push ARGS`, tried up to three times.
    ///
    /// containerd 1.6 fails a push right after a conversion now and then with "unexpected EOF"
    /// from its own content service while its content GC runs (CI saw it on the config blob,
    /// twice, in different tests). lazysnap is not on that path, and a push is idempotent, so a
    /// failed one is tried again after a pause before the test gives up.
    pub fn try_push(&self, args: &[&str]) -> Result<String, String> {
        let mut full = vec!["images", "push"];
        full.extend_from_slice(args);
        let mut attempt = 1;
        loop {
            match self.try_ctr(&full) {
                Ok(out) => return Ok(out),
                Err(e) if attempt < 3 => {
                    eprintln!("push failed (attempt {attempt} of 3), trying again: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// [`Stack::try_push`], panicking with the stack's diagnostics if every attempt failed.
    pub fn push(&self, args: &[&str]) -> String {
        self.try_push(args)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.diagnostics()))
    }

    /// Pulls `reference` the ordinary way (`ctr images pull`) into `snapshotter`.
    pub fn pull(&self, snapshotter: &str, reference: &str) -> String {
        self.ctr(&[
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            snapshotter,
            reference,
        ])
    }

    /// Pulls `reference` lazily with `ctr-remote image rpull`, as stargz's docs do.
    pub fn rpull(&self, reference: &str) -> String {
        self.ctr_remote(&[
            "image",
            "rpull",
            "--plain-http",
            "--snapshotter",
            "lazysnap",
            reference,
        ])
    }

    /// Like `rpull`, returning the error instead of panicking.
    pub fn try_rpull(&self, reference: &str) -> Result<String, String> {
        self.try_tool(
            "ctr-remote",
            &[
                "image",
                "rpull",
                "--plain-http",
                "--snapshotter",
                "lazysnap",
                reference,
            ],
        )
    }

    /// Runs `ctr-remote` (stargz's converter and rpull) against this containerd.
    pub fn ctr_remote(&self, args: &[&str]) -> String {
        self.try_tool("ctr-remote", args)
            .unwrap_or_else(|e| panic!("{e}\n{}", self.diagnostics()))
    }

    /// Like `ctr_remote`, returning the error instead of panicking.
    pub fn try_ctr_remote(&self, args: &[&str]) -> Result<String, String> {
        self.try_tool("ctr-remote", args)
    }

    fn try_tool(&self, tool: &str, args: &[&str]) -> Result<String, String> {
        let out = Command::new(tool)
            .arg("--address")
            .arg(self.containerd_socket())
            .args(["--namespace", super::namespace().as_str()])
            .args(args)
            .output()
            .map_err(|e| format!("run {tool}: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{tool} {args:?} failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Image reference `name:tag` on the test registry.
    pub fn image_ref(&self, name: &str) -> String {
        format!("{}/{name}", self.registry_host)
    }

    /// Runs a container of `image` with `snapshotter` and returns its output.
    pub fn run(&self, snapshotter: &str, image: &str, id: &str, script: &str) -> String {
        self.ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            snapshotter,
            image,
            id,
            "/bin/sh",
            "-c",
            &linger(script),
        ])
    }

    /// Mount points at or below `dir`.
    pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<PathBuf> = text
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(|p| PathBuf::from(p.replace("\\040", " ")))
            .filter(|p| p.starts_with(dir))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        points
    }

    /// The tails of every log, for a failing assertion's message.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        for (proc, lines) in [
            (&self.containerd, 30),
            (&self.lazysnap, 40),
            (&self.registry, 5),
        ] {
            if let Some(proc) = proc {
                out.push_str(&format!(
                    "--- {} log ({}) ---\n{}\n",
                    proc.name,
                    proc.log.display(),
                    proc.log_tail(lines)
                ));
            }
        }
        out
    }

    /// Waits (bounded) for `cond`, for effects containerd applies asynchronously (GC).
    /// `ctr run --rm --snapshotter lazysnap IMAGE ID ARGV...`, tried again (the container
    /// left by a failed try removed first) until it succeeds within 30 s: containerd takes a
    /// moment to reconnect to a restarted lazysnap. Its output.
    pub fn run_after_restart(&self, image: &str, id: &str, argv: &[&str]) -> String {
        let mut args = vec!["run", "--rm", "--snapshotter", "lazysnap", image, id];
        args.extend_from_slice(argv);
        let mut out = String::new();
        self.eventually(
            "a container after the restart",
            Duration::from_secs(30),
            || match self.try_ctr(&args) {
                Ok(o) => {
                    out = o;
                    true
                }
                Err(_) => {
                    let _ = self.try_ctr(&["containers", "rm", id]);
                    false
                }
            },
        );
        out
    }

    pub fn eventually(&self, what: &str, timeout: Duration, cond: impl FnMut() -> bool) {
        if !super::process::poll_until(timeout, Duration::from_millis(100), cond) {
            panic!("timed out waiting for {what}\n{}", self.diagnostics());
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // containerd first: it holds the container mounts and talks to lazysnap.
        for proc in [&mut self.containerd, &mut self.lazysnap, &mut self.registry] {
            if let Some(mut p) = proc.take() {
                p.stop(Signal::SIGTERM, Duration::from_secs(10));
            }
        }
        // Shims outlive containerd; they are children of init now, found by their socket dir.
        for point in Self::mounts_under(&self.dir) {
            let _ = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH);
        }
        if self.keep {
            eprintln!("kept test directory {}", self.dir.display());
        } else if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("removing {} failed: {e}", self.dir.display());
        }
    }
}

impl Stack {
    /// Converts `source` (already in the registry) with `ctr-remote image convert FLAGS` into
    /// `target` and pushes it, then forgets both locally, so a later pull starts from nothing.
    pub fn convert_and_push(&self, source: &str, target: &str, flags: &[&str]) {
        self.ctr(&["images", "pull", "--plain-http", source]);
        let mut args = vec!["image", "convert", "--oci"];
        args.extend_from_slice(flags);
        args.extend_from_slice(&[source, target]);
        self.ctr_remote(&args);
        self.push(&["--plain-http", target]);
        self.ctr(&["images", "rm", "--sync", source, target]);
        self.ctr(&["content", "prune", "references"]);
    }

    /// Requests in the registry's access log so far.
    pub fn registry_requests(&self) -> usize {
        self.registry
            .as_ref()
            .and_then(|r| std::fs::read_to_string(&r.log).ok())
            .map(|log| {
                log.lines()
                    .filter(|l| l.contains("\" 20") || l.contains("\" 40"))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Lines of the registry's access log so far that contain `text`.
    pub fn registry_log_lines(&self, text: &str) -> usize {
        self.registry
            .as_ref()
            .and_then(|r| std::fs::read_to_string(&r.log).ok())
            .map(|log| log.lines().filter(|l| l.contains(text)).count())
            .unwrap_or(0)
    }

    /// The lazy layers lazysnap has saved: (digest, blob size) from `root/layers/*/layer.json`.
    pub fn lazy_layers(&self) -> Vec<(String, u64)> {
        let dir = self.lazysnap_root().join("layers");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let Ok(text) = std::fs::read_to_string(entry.path().join("layer.json")) else {
                continue;
            };
            let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            let digest = json["source"]["digest"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            out.push((digest, json["blob_size"].as_u64().unwrap_or(0)));
        }
        out.sort_by_key(|(_, size)| std::cmp::Reverse(*size));
        out
    }

    /// Bytes the registry has sent in answers to blob GETs, from its access log.
    pub fn registry_blob_bytes(&self) -> u64 {
        self.registry_blob_bytes_of("")
    }

    /// Like `registry_blob_bytes`, for blobs whose digest contains `digest`.
    pub fn registry_blob_bytes_of(&self, digest: &str) -> u64 {
        let Some(registry) = &self.registry else {
            return 0;
        };
        let log = std::fs::read_to_string(&registry.log).unwrap_or_default();
        log.lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/") && l.contains(digest))
            .filter_map(|l| {
                // common log format: "... HTTP/1.1" STATUS BYTES "referer" "agent"
                let after = l.split("HTTP/1.1\" ").nth(1)?;
                after.split(' ').nth(1)?.parse::<u64>().ok()
            })
            .sum()
    }
}

/// Writes `hosts_dir/<origin>/hosts.toml` in containerd's layout: `origin` as the server, with
/// `mirror` (a `host:port`, plain HTTP) listed before it with the capabilities containerd
/// gives a mirror by default. A mirror equal to the origin only says the origin is plain HTTP.
pub fn write_hosts_toml(hosts_dir: &Path, origin: &str, mirror: &str) {
    let host_dir = hosts_dir.join(origin);
    std::fs::create_dir_all(&host_dir).expect("create host dir");
    std::fs::write(
        host_dir.join("hosts.toml"),
        format!(
            "server = \"http://{origin}\"\n\n[host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )
    .expect("write hosts.toml");
}

/// `script`, then a moment's pause before the shell exits with the script's status.
/// containerd can lose the last output of a process that exits right after writing it (the
/// copy out of the shim's FIFO races the exit; seen here as a container that printed all but
/// its last line, exit status 0): while the shell lingers, that copy finishes.
pub fn linger(script: &str) -> String {
    format!("{script}\ns=$?; sleep 0.1; exit $s")
}
