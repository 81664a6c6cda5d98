//! Generates containerd's Snapshots API (vendored in `proto/containerd`), lazysnap's own
//! control API (`proto/lazysnap`) and the part of the CRI it fronts (`proto/cri`), with protox
//! so that no `protoc` binary is needed on the build machine. Also records the git commit the
//! binary is built from, for `lazysnap --version`.

use std::path::Path;
use std::process::Command;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/containerd/services/snapshots/v1/snapshots.proto",
        "proto/lazysnap/v1/control.proto",
        "proto/cri/runtime/v1/api.proto",
    ];
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        // The CLI prints control API answers as JSON under their proto field names.
        .type_attribute(".lazysnap.v1", "#[derive(serde::Serialize)]")
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rustc-env=LAZYSNAP_COMMIT={}", commit());
    Ok(())
}

/// The short hash of the commit being built: `LAZYSNAP_COMMIT` from the environment if set (a
/// build from a source tarball can say where it came from), else `git rev-parse`, else
/// `unknown` (no git, or not a checkout) — never a build failure.
fn commit() -> String {
    println!("cargo:rerun-if-env-changed=LAZYSNAP_COMMIT");
    if let Ok(commit) = std::env::var("LAZYSNAP_COMMIT") {
        if !commit.trim().is_empty() {
            return commit.trim().to_owned();
        }
    }
    let Some(hash) = git(&["rev-parse", "--short", "HEAD"]) else {
        return "unknown".to_owned();
    };
    // Rebuild when HEAD moves: HEAD itself (checkout of another branch), the branch it points
    // to (a commit), packed-refs (where `git gc` moves the branch), and HEAD's reflog, which
    // every commit, checkout and reset appends to, even one that creates the branch's loose
    // ref file after it was only packed. `--git-path` gives the right files in linked
    // worktrees too, where `.git` is a file and refs live in the common git dir. Only existing
    // files are named: cargo reruns build scripts on every build for a missing one.
    let mut watched = vec![
        "HEAD".to_owned(),
        "logs/HEAD".to_owned(),
        "packed-refs".to_owned(),
    ];
    if let Some(head_ref) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(head_ref);
    }
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
            // Relative paths are relative to the crate root, where git ran; cargo resolves
            // rerun-if-changed paths against the same directory.
            if Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
    hash
}

/// `git ARGS` run in the crate root: its trimmed stdout, or None if git is missing or fails.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}
