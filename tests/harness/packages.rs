//! Installs the Debian packages the e2e tests need when they are missing (as root), once per
//! process.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

const TOOLS: &[(&str, &str)] = &[
    ("containerd", "/usr/bin/containerd"),
    ("runc", "/usr/sbin/runc"),
    ("fuse3", "/usr/bin/fusermount3"),
    ("docker-registry", "/usr/bin/docker-registry"),
    ("skopeo", "/usr/bin/skopeo"),
    ("umoci", "/usr/bin/umoci"),
    ("stargz-snapshotter", "/usr/bin/ctr-remote"),
    ("busybox-static", "/bin/busybox"),
    // The Python image of the prefetch tests and benchmarks is built from these.
    ("python3.11-minimal", "/usr/bin/python3.11"),
    ("libpython3.11-stdlib", "/usr/lib/python3.11/os.py"),
    // Keys and certificates of the token-auth test registry.
    ("openssl", "/usr/bin/openssl"),
];

/// Makes sure every tool is installed; panics with the apt output when that fails.
pub fn ensure() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let missing: Vec<&str> = TOOLS
            .iter()
            .filter(|(_, path)| !Path::new(path).exists())
            .map(|(package, _)| *package)
            .collect();
        if missing.is_empty() {
            return;
        }
        super::require_root();
        let run = |args: &[&str]| {
            let out = Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .output()
                .expect("run apt-get");
            assert!(
                out.status.success(),
                "apt-get {args:?} failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&["update", "-qq"]);
        let mut args = vec!["install", "-y", "-qq"];
        args.extend(&missing);
        run(&args);
    });
}
