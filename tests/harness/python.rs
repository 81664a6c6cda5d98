//! A realistic image for startup benchmarks, built from this machine's own Debian Python 3.11
//! (packages python3.11-minimal and libpython3.11-stdlib), so nothing is downloaded: busybox;
//! the interpreter with the shared libraries and dynamic loader it links; the standard library
//! with its `__pycache__` (what an import actually reads) and the libraries its extension
//! modules link. Starting Python reads a few hundred small files scattered over tens of
//! megabytes, the access pattern lazy pulling is for.
//!
//! Files keep their host paths and modes; symlinks on the way (Debian's merged `/usr`, where
//! `/lib` is `usr/lib`, and `libz.so.1 -> libz.so.1.2.13`) are recreated as symlinks, so the
//! dynamic loader finds everything where the binaries expect it.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use super::image::{busybox_layer, Entry, ImageSpec};

/// The interpreter, as Debian installs it.
const PYTHON: &str = "/usr/bin/python3.11";
/// The standard library.
const STDLIB: &str = "/usr/lib/python3.11";
/// Standard library directories no startup reads, left out to keep the image smaller.
const STDLIB_SKIP: &[&str] = &["test", "idlelib", "tkinter", "ensurepip"];

/// A shell command line for `/bin/sh -c` that starts Python, imports a typical application's
/// modules (pure Python, C extensions, and `_sqlite3` with its libsqlite3) and prints `1`.
/// The image's PATH is busybox's `/bin`, hence the full path.
pub const PYTHON_WORKLOAD: &str =
    "/usr/bin/python3 -c 'import json, sqlite3, email.parser, http.client, decimal; print(1)'";

/// The Python image: [busybox, interpreter and its libraries, standard library and the
/// libraries of its extension modules]. Panics with a message naming the package when this
/// machine's Python is missing.
pub fn python_image() -> ImageSpec {
    assert!(
        Path::new(PYTHON).exists() && Path::new(STDLIB).join("os.py").exists(),
        "{PYTHON} and {STDLIB} are needed for the Python image (Debian packages python3.11-minimal and libpython3.11-stdlib)"
    );

    let mut interpreter = Tree::default();
    interpreter.add(Path::new(PYTHON));
    // Debian's python3 package provides this symlink; python3.11-minimal alone does not.
    interpreter.entries.insert(
        "usr/bin/python3".into(),
        Entry::symlink("usr/bin/python3", "python3.11"),
    );
    // ldd lists the loader too, but the interpreter cannot start without it: say so.
    interpreter.add(Path::new("/lib64/ld-linux-x86-64.so.2"));
    for lib in ldd(Path::new(PYTHON)) {
        interpreter.add(&lib);
    }

    let mut stdlib = Tree::default();
    stdlib.add_dir(Path::new(STDLIB), STDLIB_SKIP);
    let dynload = Path::new(STDLIB).join("lib-dynload");
    let mut modules: Vec<PathBuf> = std::fs::read_dir(&dynload)
        .unwrap_or_else(|e| panic!("list {}: {e}", dynload.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "so"))
        .collect();
    modules.sort();
    for module in modules {
        for lib in ldd(&module) {
            if !interpreter.added.contains(&lib) {
                stdlib.add(&lib);
            }
        }
    }

    ImageSpec {
        layers: vec![
            busybox_layer(),
            interpreter.into_entries(),
            stdlib.into_entries(),
        ],
        blobs: Vec::new(),
        cmd: vec!["/usr/bin/python3".into()],
    }
}

/// The absolute paths of the libraries `binary` links, the dynamic loader included, as `ldd`
/// resolves them on this machine. Libraries ldd cannot find are left out with a warning: only
/// the extension module needing them would fail to import.
fn ldd(binary: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .unwrap_or_else(|e| panic!("run ldd {}: {e}", binary.display()));
    // ldd fails on statically linked files, which need nothing.
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libz.so.1 => /lib/.../libz.so.1 (0x...)", "/lib64/ld-linux-x86-64.so.2 (0x...)",
        // "linux-vdso.so.1 (0x...)" (in the kernel, no file), "libfoo.so => not found".
        let resolved = line.split_once("=>").map_or(line, |(_, r)| r).trim();
        if resolved.starts_with("not found") {
            eprintln!(
                "python image: {} needs {} which is not installed",
                binary.display(),
                line.trim()
            );
            continue;
        }
        if let Some(path) = resolved.split_whitespace().next() {
            if path.starts_with('/') {
                libs.push(PathBuf::from(path));
            }
        }
    }
    libs
}

/// One layer's entries, keyed by their path in the image (sorted, so parents come first).
#[derive(Default)]
struct Tree {
    entries: BTreeMap<String, Entry>,
    /// Host paths asked for, to tell which libraries another layer already has.
    added: BTreeSet<PathBuf>,
}

impl Tree {
    /// Adds `path` the way the host resolves it: each directory on the way, each symlink on
    /// the way as a symlink (then what it points to), and the file at the end. A dangling
    /// symlink is kept as it is on the host.
    fn add(&mut self, path: &Path) {
        self.added.insert(path.to_path_buf());
        self.resolve(path, 0);
    }

    fn resolve(&mut self, path: &Path, depth: usize) {
        assert!(depth < 40, "too many symlinks resolving {}", path.display());
        let components: Vec<Component<'_>> = path.components().collect();
        let mut real = PathBuf::from("/");
        for (i, component) in components.iter().enumerate() {
            let name = match component {
                Component::Normal(name) => name,
                Component::ParentDir => {
                    real.pop();
                    continue;
                }
                Component::RootDir | Component::CurDir | Component::Prefix(_) => continue,
            };
            let next = real.join(name);
            let Ok(meta) = std::fs::symlink_metadata(&next) else {
                return;
            };
            let key = image_path(&next);
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&next)
                    .unwrap_or_else(|e| panic!("read link {}: {e}", next.display()));
                let target_str = target.to_str().expect("symlink targets are UTF-8");
                self.entries
                    .insert(key.clone(), Entry::symlink(&key, target_str));
                let mut rest = if target.is_absolute() {
                    target.clone()
                } else {
                    real.join(&target)
                };
                for later in &components[i + 1..] {
                    rest.push(later.as_os_str());
                }
                return self.resolve(&rest, depth + 1);
            }
            let mode = meta.permissions().mode() & 0o7777;
            if meta.is_dir() {
                self.entries.entry(key.clone()).or_insert(Entry::Dir {
                    path: key,
                    mode,
                    uid: meta.uid().into(),
                    gid: meta.gid().into(),
                });
                real = next;
            } else if meta.is_file() {
                if !self.entries.contains_key(&key) {
                    let data = std::fs::read(&next)
                        .unwrap_or_else(|e| panic!("read {}: {e}", next.display()));
                    self.entries.insert(
                        key.clone(),
                        Entry::File {
                            path: key,
                            mode,
                            uid: meta.uid().into(),
                            gid: meta.gid().into(),
                            data,
                            xattrs: vec![],
                        },
                    );
                }
                return;
            } else {
                // Sockets, devices: nothing an image of this kind needs.
                return;
            }
        }
    }

    /// Adds directory `dir` and everything below it, except its children named in `skip`.
    fn add_dir(&mut self, dir: &Path, skip: &[&str]) {
        self.add(dir);
        let mut children: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
            .map(|e| {
                e.unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
                    .path()
            })
            .filter(|p| {
                !p.file_name()
                    .is_some_and(|n| skip.iter().any(|s| n == std::ffi::OsStr::new(s)))
            })
            .collect();
        children.sort();
        for child in children {
            let meta = std::fs::symlink_metadata(&child)
                .unwrap_or_else(|e| panic!("stat {}: {e}", child.display()));
            if meta.is_dir() {
                self.add_dir(&child, &[]);
            } else {
                // Files, and symlinks with what they point to (sitecustomize.py lives in /etc).
                self.add(&child);
            }
        }
    }

    fn into_entries(self) -> Vec<Entry> {
        self.entries.into_values().collect()
    }
}

/// `/usr/lib/x` as the layer's tar names it: `usr/lib/x`.
fn image_path(host: &Path) -> String {
    host.strip_prefix("/")
        .unwrap_or(host)
        .to_str()
        .expect("host paths are UTF-8")
        .to_owned()
}
