//! The Debian package as an operator uses it: `scripts/package`'s .deb installed with `dpkg -i`
//! on this machine, its files, conffile and unit checked, the installed `/usr/bin/lazysnap
//! serve` pulling an eStargz image lazily for a real containerd and running a container from
//! it, the conffile kept over a reinstall, then `dpkg -r` and `dpkg --purge`, each leaving
//! exactly what it should.
//!
//! The .deb is `target/debian/lazysnap_*.deb`, which `scripts/test` builds with
//! `scripts/package` before `cargo test` (or `LAZYSNAP_DEB=path`). This test changes the
//! machine (root, real dpkg database), so it refuses to run where lazysnap is already
//! installed, and purges the package again even when it fails.

mod harness;

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use harness::{image, Stack};

const PACKAGE: &str = "lazysnap";
const BIN: &str = "/usr/bin/lazysnap";
const UNIT: &str = "/lib/systemd/system/lazysnap.service";
const CONFFILE: &str = "/etc/lazysnap/config.toml";
const CONFIG_DIR: &str = "/etc/lazysnap";
const STATE: &str = "/var/lib/lazysnap";
const DOC: &str = "/usr/share/doc/lazysnap";
const MAN: &str = "/usr/share/man/man8/lazysnap.8.gz";
const CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
/// The links `systemctl enable lazysnap` makes, from the unit's `WantedBy=`.
const ENABLE_LINKS: &[&str] = &[
    "/etc/systemd/system/multi-user.target.wants/lazysnap.service",
    "/etc/systemd/system/containerd.service.wants/lazysnap.service",
];

/// Runs `program args`; returns stdout and stderr together, panicking with them on failure.
fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{text}",
        out.status
    );
    text
}

/// dpkg's view of the package: `installed`, `config-files`, or `not-installed`.
fn package_status() -> String {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", PACKAGE])
        .output()
        .expect("run dpkg-query");
    let status = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if status.is_empty() {
        "not-installed".to_owned()
    } else {
        status
    }
}

/// The .deb `scripts/package` built: `LAZYSNAP_DEB`, else the one in `<target>/debian`.
fn built_deb() -> PathBuf {
    if let Some(path) = std::env::var_os("LAZYSNAP_DEB") {
        return PathBuf::from(path);
    }
    // This test runs as <target>/<profile>/deps/e2e_package-HASH.
    let exe = std::env::current_exe().expect("current exe");
    let target = exe
        .ancestors()
        .nth(3)
        .expect("test binary inside a cargo target directory");
    let dir = target.join("debian");
    let debs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with("lazysnap_") && n.ends_with(".deb")
            })
        })
        .collect();
    match debs.as_slice() {
        [deb] => deb.clone(),
        [] => panic!(
            "no lazysnap_*.deb in {}: build it with scripts/package (scripts/test does so before cargo test)",
            dir.display()
        ),
        _ => panic!(
            "more than one .deb in {}: {debs:?}; rerun scripts/package",
            dir.display()
        ),
    }
}

/// Purges the package when the test ends, passed or not: CI runs on a real machine, and
/// later test binaries must not find `/etc/lazysnap/config.toml` (`lazysnap serve` reads it
/// when it exists).
struct PurgeOnDrop;

impl Drop for PurgeOnDrop {
    fn drop(&mut self) {
        if package_status() != "not-installed" {
            let out = Command::new("dpkg")
                .args(["--purge", PACKAGE])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stderr).into_owned());
            eprintln!("cleanup: dpkg --purge {PACKAGE}: {out:?}");
        }
    }
}

fn gunzip(path: &str) -> String {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .unwrap_or_else(|e| panic!("gunzip {path}: {e}"));
    text
}

/// Every path naming the unit under /etc/systemd/system (enablement links) and
/// deb-systemd-helper's state about it.
fn unit_links() -> Vec<PathBuf> {
    let mut found = Vec::new();
    for root in [
        "/etc/systemd/system",
        "/var/lib/systemd/deb-systemd-helper-enabled",
        "/var/lib/systemd/deb-systemd-helper-masked",
    ] {
        let mut dirs = vec![PathBuf::from(root)];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
                if is_dir {
                    dirs.push(path);
                } else if path.to_string_lossy().contains("lazysnap") {
                    found.push(path);
                }
            }
        }
    }
    found
}

fn assert_absent(path: &str, when: &str) {
    assert!(
        std::fs::symlink_metadata(path).is_err(),
        "{path} still exists after {when}"
    );
}

#[test]
fn debian_package_installs_serves_a_lazy_pull_removes_and_purges() {
    harness::require_root();
    // containerd, fuse3 and the rest: also the package's dependencies, which dpkg -i checks.
    harness::packages::ensure();
    let deb = built_deb();
    let deb_str = deb.to_str().expect("utf-8 path");

    // Never take over an installation this test did not make: purge would delete its state.
    for path in [BIN, CONFIG_DIR, STATE] {
        assert!(
            std::fs::symlink_metadata(path).is_err(),
            "{path} exists: this test installs and purges the lazysnap package, so it only runs on a machine without lazysnap (dpkg --purge lazysnap first)"
        );
    }
    assert_eq!(package_status(), "not-installed", "lazysnap is installed");

    // The control fields: version of this crate, the dependencies the issue asks for.
    let fields = run(
        "dpkg-deb",
        &["--field", deb_str, "Version", "Depends", "Architecture"],
    );
    assert!(
        fields.contains(&format!("Version: {}-", env!("CARGO_PKG_VERSION"))),
        "{} is not of this version ({}); rerun scripts/package:\n{fields}",
        deb.display(),
        env!("CARGO_PKG_VERSION")
    );
    for dep in ["fuse3", "containerd (>= 1.4) | containerd.io", "libc6 (>= "] {
        assert!(fields.contains(dep), "Depends lacks {dep}:\n{fields}");
    }

    // The machine's containerd is not set up for lazysnap (a stock Debian config), which is
    // what the first install below expects; its config must come out of the test unchanged.
    let containerd_config_before = std::fs::read(CONTAINERD_CONFIG)
        .unwrap_or_else(|e| panic!("{CONTAINERD_CONFIG} (shipped by Debian's containerd): {e}"));
    assert!(
        !String::from_utf8_lossy(&containerd_config_before).contains("lazysnap"),
        "{CONTAINERD_CONFIG} already names lazysnap; this test expects containerd's stock config"
    );

    let _purge = PurgeOnDrop;
    let links_before = unit_links();
    let installed = run("dpkg", &["-i", deb_str]);
    assert_eq!(package_status(), "installed", "{installed}");

    // --- files ---
    let version = run(BIN, &["--version"]);
    assert_eq!(
        version.trim(),
        format!(
            "lazysnap {} ({})",
            env!("CARGO_PKG_VERSION"),
            env!("LAZYSNAP_COMMIT")
        ),
        "the packaged binary is not this checkout's; rerun scripts/package"
    );
    let bin_meta = std::fs::metadata(BIN).expect("stat binary");
    assert_eq!(bin_meta.permissions().mode() & 0o7777, 0o755);
    assert_eq!((bin_meta.uid(), bin_meta.gid()), (0, 0));
    let sections = run("readelf", &["-S", "-W", BIN]);
    assert!(
        !sections.contains(".symtab") && !sections.contains(".debug_"),
        "{BIN} is not stripped:\n{sections}"
    );

    let listed = run("dpkg", &["-L", PACKAGE]);
    let listed: Vec<&str> = listed.lines().collect();
    for path in [
        BIN,
        UNIT,
        CONFFILE,
        MAN,
        "/usr/share/doc/lazysnap/copyright",
        "/usr/share/doc/lazysnap/changelog.Debian.gz",
        "/usr/share/doc/lazysnap/examples/containerd-config.toml",
        "/usr/share/doc/lazysnap/examples/kubelet-image-service.conf",
    ] {
        assert!(listed.contains(&path), "dpkg -L lacks {path}:\n{listed:#?}");
        assert!(Path::new(path).is_file(), "{path} not installed");
    }
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(read(UNIT), include_str!("../packaging/lazysnap.service"));
    assert_eq!(read(CONFFILE), include_str!("../packaging/config.toml"));
    assert_eq!(
        read("/usr/share/doc/lazysnap/examples/containerd-config.toml"),
        include_str!("../packaging/containerd-config.toml")
    );
    assert_eq!(
        read("/usr/share/doc/lazysnap/examples/kubelet-image-service.conf"),
        include_str!("../packaging/kubelet-image-service.conf")
    );
    assert!(read("/usr/share/doc/lazysnap/copyright").contains("License: Apache-2.0"));
    let changelog = gunzip("/usr/share/doc/lazysnap/changelog.Debian.gz");
    assert!(
        changelog.starts_with(&format!("lazysnap ({}-", env!("CARGO_PKG_VERSION"))),
        "{changelog}"
    );
    let man = gunzip(MAN);
    assert!(
        man.contains(".TH LAZYSNAP 8 ")
            && man.contains(&format!("\"lazysnap {}\"", env!("CARGO_PKG_VERSION"))),
        "man page header:\n{man}"
    );

    // The conffile is registered as one, with the checksum of what was installed.
    let conffiles = run("dpkg-query", &["-W", "-f=${Conffiles}", PACKAGE]);
    let conffile_md5 = run("md5sum", &[CONFFILE]);
    let md5 = conffile_md5
        .split_whitespace()
        .next()
        .expect("md5sum output");
    assert!(
        conffiles.contains(&format!("{CONFFILE} {md5}")),
        "conffiles: {conffiles}"
    );

    // State directory made by postinst, private to root.
    let state = std::fs::metadata(STATE).expect("postinst creates /var/lib/lazysnap");
    assert!(state.is_dir());
    assert_eq!(state.permissions().mode() & 0o7777, 0o700);

    // This machine's containerd (/etc/containerd/config.toml) does not name lazysnap, so the
    // package neither enabled nor started it, and said how to.
    assert!(
        installed.contains("lazysnap is installed but not enabled"),
        "postinst's note missing:\n{installed}"
    );
    let new_links: Vec<PathBuf> = unit_links()
        .into_iter()
        .filter(|p| !links_before.contains(p) && !p.to_string_lossy().contains("dsh-also"))
        .collect();
    assert!(
        new_links.is_empty(),
        "the unit was enabled on install: {new_links:?}"
    );

    // The unit, checked by systemd itself where its analyzer exists.
    if Path::new("/usr/bin/systemd-analyze").exists() {
        let verify = Command::new("systemd-analyze")
            .args(["verify", UNIT])
            .output()
            .expect("run systemd-analyze");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&verify.stdout),
            String::from_utf8_lossy(&verify.stderr)
        );
        assert!(
            verify.status.success() && !text.contains("lazysnap.service:"),
            "systemd-analyze verify {UNIT}:\n{text}"
        );
    } else {
        eprintln!("systemd-analyze is not installed: the unit is not verified by systemd");
    }

    // --- the installed daemon with the installed config, against a real containerd ---
    {
        let stack = Stack::start_with(BIN, vec!["--config".into(), CONFFILE.into()]);
        let pid = stack
            .lazysnap
            .as_ref()
            .and_then(|p| p.pid())
            .expect("lazysnap running");
        assert_eq!(
            std::fs::read_link(format!("/proc/{pid}/exe")).expect("daemon's exe"),
            Path::new(BIN)
        );
        let plain = stack.image_ref("pkg:gzip");
        image::push(&image::standard_image(), &stack.dir, &plain);
        let lazy = stack.image_ref("pkg:esgz");
        stack.convert_and_push(&plain, &lazy, &["--estargz"]);

        let before = stack.registry_blob_bytes();
        stack.rpull(&lazy);
        let fetched = stack.registry_blob_bytes() - before;
        let log = stack.lazysnap_log();
        assert_eq!(
            log.matches("layer mounted lazily").count(),
            3,
            "every layer mounted lazily by {BIN}:\n{log}"
        );
        // The image holds more than 3 MiB of data the pull must not fetch.
        assert!(fetched < 1 << 20, "the lazy pull fetched {fetched} bytes");
        let out = stack.run(
            "lazysnap",
            &lazy,
            "pkg-read",
            "cat /data/small.txt; cat /data/link-to-small",
        );
        assert_eq!(out, "hello from layer 2\nhello from layer 2\n");
        // The installed CLI talks to the installed daemon.
        let mounts = stack.cli_json(&["mounts"]);
        let rows = mounts["mounts"].as_array().cloned().unwrap_or_default();
        assert_eq!(rows.len(), 3, "{mounts}");
        assert!(
            rows.iter().all(|r| r["reference"] == lazy.as_str()),
            "{mounts}"
        );
    }

    // --- upgrade: the operator's edit to the conffile survives reinstalling ---
    let edited = format!("{}\n# edited by the operator\n", read(CONFFILE));
    std::fs::write(CONFFILE, &edited).expect("edit conffile");
    // stdin is closed, so a conffile prompt would take dpkg's default (keep); none is expected
    // since the packaged conffile did not change.
    let reinstall = run("dpkg", &["-i", deb_str]);
    assert_eq!(read(CONFFILE), edited, "{reinstall}");
    assert!(
        !reinstall.contains("installed but not enabled"),
        "postinst treated an upgrade as a first install:\n{reinstall}"
    );
    for suffix in [".dpkg-new", ".dpkg-dist", ".dpkg-old"] {
        assert_absent(&format!("{CONFFILE}{suffix}"), "reinstall");
    }

    // --- remove: program and unit gone, state and conffile kept ---
    std::fs::write(format!("{STATE}/marker"), "state").expect("write state marker");
    run("dpkg", &["-r", PACKAGE]);
    assert_eq!(package_status(), "config-files");
    for path in [BIN, UNIT, MAN, DOC] {
        assert_absent(path, "dpkg -r");
    }
    assert_eq!(read(&format!("{STATE}/marker")), "state");
    assert_eq!(read(CONFFILE), edited, "dpkg -r keeps the conffile");

    // --- purge: nothing of the package left ---
    run("dpkg", &["--purge", PACKAGE]);
    assert_eq!(package_status(), "not-installed");
    for path in [STATE, CONFIG_DIR] {
        assert_absent(path, "dpkg --purge");
    }
    for path in &listed {
        if path.contains("lazysnap") {
            assert_absent(path, "dpkg --purge");
        }
    }
    let leftover: Vec<PathBuf> = unit_links()
        .into_iter()
        .filter(|p| !links_before.contains(p))
        .collect();
    assert!(
        leftover.is_empty(),
        "systemd links or state left after purge: {leftover:?}"
    );

    // --- a node whose containerd is configured for lazysnap: installing enables the unit ---
    let scratch = tempfile::tempdir().expect("tempdir");
    let configured = scratch.path().join("config.toml");
    std::fs::write(
        &configured,
        include_str!("../packaging/containerd-config.toml"),
    )
    .expect("write containerd config");
    let installed = install_seeing_containerd_config(deb_str, &configured);
    assert!(
        !installed.contains("not enabled"),
        "postinst did not see containerd's lazysnap plugin:\n{installed}"
    );
    for link in ENABLE_LINKS {
        assert_eq!(
            std::fs::read_link(link).unwrap_or_else(|e| panic!("{link} after install: {e}")),
            Path::new(UNIT),
            "{installed}"
        );
    }
    // Without systemd running, nothing may have been started (there is nothing to start it).
    run("dpkg", &["-r", PACKAGE]);
    assert_absent(BIN, "dpkg -r");
    run("dpkg", &["--purge", PACKAGE]);
    for link in ENABLE_LINKS {
        assert_absent(link, "dpkg --purge");
    }
    let leftover: Vec<PathBuf> = unit_links()
        .into_iter()
        .filter(|p| !links_before.contains(p))
        .collect();
    assert!(
        leftover.is_empty(),
        "systemd links or state left after purge: {leftover:?}"
    );
    for path in [STATE, CONFIG_DIR] {
        assert_absent(path, "dpkg --purge");
    }

    assert_eq!(
        std::fs::read(CONTAINERD_CONFIG).expect("read containerd config"),
        containerd_config_before,
        "{CONTAINERD_CONFIG} changed"
    );
}

/// `dpkg -i deb` while `/etc/containerd/config.toml` reads as `config`: bind-mounted over it
/// in a private mount namespace of dpkg's own, so the machine's file is never changed and no
/// other process sees the difference.
fn install_seeing_containerd_config(deb: &str, config: &Path) -> String {
    let config = config.to_str().expect("utf-8 path");
    run(
        "unshare",
        &[
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "mount --bind \"$1\" \"$2\" && exec dpkg -i \"$3\"",
            "sh",
            config,
            CONTAINERD_CONFIG,
            deb,
        ],
    )
}
