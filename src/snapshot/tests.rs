//! Snapshot semantics checked against containerd's contract, on a real directory tree (no
//! mounts are made here; the e2e tests mount through containerd).

use super::*;

fn open() -> (tempfile::TempDir, Snapshotter) {
    let dir = tempfile::tempdir().expect("tempdir");
    let snapshotter = Snapshotter::open(dir.path()).expect("open snapshotter");
    (dir, snapshotter)
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Prepares `key` on `parent`, writes a marker file into it and commits it as `name`.
fn layer(s: &Snapshotter, name: &str, parent: Option<&str>) {
    let key = format!("{name}-active");
    s.prepare(&key, parent, Labels::new()).expect("prepare");
    let record = s.get(&key).expect("record");
    std::fs::write(s.fs_dir(record.id).join(name), name).expect("write marker");
    s.commit(name, &key, Labels::new()).expect("commit");
}

fn option<'a>(mount: &'a Mount, prefix: &str) -> Option<&'a str> {
    mount.options.iter().find_map(|o| o.strip_prefix(prefix))
}

#[test]
fn single_layer_mounts_are_binds() {
    let (_dir, s) = open();
    let mounts = s.prepare("a", None, Labels::new()).expect("prepare");
    assert_eq!(mounts.len(), 1);
    assert_eq!(mounts[0].kind, "bind");
    assert_eq!(mounts[0].options, vec!["rw", "rbind"]);
    let meta = std::fs::metadata(&mounts[0].source).expect("stat root");
    assert_eq!(meta.permissions().mode() & 0o7777, 0o755);

    layer(&s, "base", None);
    let view = s.view("v", Some("base"), Labels::new()).expect("view");
    assert_eq!(view[0].kind, "bind");
    assert_eq!(view[0].options, vec!["ro", "rbind"]);
    assert!(Path::new(&view[0].source).join("base").exists());
}

#[test]
fn overlay_lowerdirs_are_nearest_parent_first() {
    let (_dir, s) = open();
    layer(&s, "l1", None);
    layer(&s, "l2", Some("l1"));
    layer(&s, "l3", Some("l2"));
    let mounts = s.prepare("rw", Some("l3"), Labels::new()).expect("prepare");
    assert_eq!(mounts[0].kind, "overlay");
    let lower: Vec<&str> = option(&mounts[0], "lowerdir=")
        .expect("lowerdir")
        .split(':')
        .collect();
    let markers: Vec<bool> = ["l3", "l2", "l1"]
        .iter()
        .zip(&lower)
        .map(|(name, dir)| Path::new(dir).join(name).exists())
        .collect();
    assert_eq!(markers, vec![true, true, true], "lowerdirs {lower:?}");
    assert!(option(&mounts[0], "upperdir=").is_some());
    assert!(option(&mounts[0], "workdir=").is_some());
    assert_eq!(s.mounts("rw").expect("mounts"), mounts);

    let view = s.view("ro", Some("l3"), Labels::new()).expect("view");
    assert_eq!(view[0].kind, "overlay");
    assert!(
        option(&view[0], "upperdir=").is_none(),
        "a view has no upper dir"
    );
}

#[test]
fn kinds_and_namespace() {
    let (_dir, s) = open();
    s.prepare("a", None, Labels::new()).expect("prepare");
    assert_eq!(s.stat("a").expect("stat").kind, Kind::Active);
    assert!(matches!(
        s.prepare("a", None, Labels::new()),
        Err(SnapshotError::AlreadyExists { .. })
    ));
    assert!(matches!(
        s.prepare("b", Some("a"), Labels::new()),
        Err(SnapshotError::ParentNotCommitted { .. })
    ));
    assert!(matches!(
        s.prepare("b", Some("missing"), Labels::new()),
        Err(SnapshotError::ParentNotFound { .. })
    ));
    s.commit("c", "a", labels(&[("k", "v")])).expect("commit");
    assert!(matches!(s.stat("a"), Err(SnapshotError::NotFound { .. })));
    let info = s.stat("c").expect("stat committed");
    assert_eq!(info.kind, Kind::Committed);
    assert_eq!(info.labels, labels(&[("k", "v")]));
    // committed names and active keys share one namespace
    assert!(matches!(
        s.prepare("c", None, Labels::new()),
        Err(SnapshotError::AlreadyExists { .. })
    ));
    s.view("v", Some("c"), Labels::new()).expect("view");
    assert!(matches!(
        s.commit("v2", "v", Labels::new()),
        Err(SnapshotError::NotActive { .. })
    ));
    s.prepare("x", None, Labels::new()).expect("prepare");
    assert!(matches!(
        s.commit("c", "x", Labels::new()),
        Err(SnapshotError::AlreadyExists { .. })
    ));
}

#[test]
fn remove_refuses_parents_and_frees_the_key() {
    let (dir, s) = open();
    layer(&s, "base", None);
    s.prepare("child", Some("base"), Labels::new())
        .expect("prepare");
    let err = s.remove("base").expect_err("parent with a child");
    assert!(matches!(err, SnapshotError::HasChildren { .. }));
    assert!(err.to_string().contains("remove"), "{err}");
    s.remove("child").expect("remove child");
    s.remove("base").expect("remove base");
    assert!(matches!(
        s.remove("base"),
        Err(SnapshotError::NotFound { .. })
    ));
    let left: Vec<_> = std::fs::read_dir(dir.path().join("snapshots"))
        .expect("list")
        .collect();
    assert!(left.is_empty(), "directories left: {left:?}");
    s.prepare("child", None, Labels::new())
        .expect("key reusable at once");
}

#[test]
fn update_follows_field_paths() {
    let (_dir, s) = open();
    s.prepare("a", None, labels(&[("keep", "1"), ("drop", "2")]))
        .expect("prepare");
    let before = s.stat("a").expect("stat");
    let mut info = before.clone();
    info.labels = labels(&[("new", "3")]);
    info.parent = "ignored".into();

    let updated = s
        .update(&info, &["labels.new".into(), "labels.drop".into()])
        .expect("update");
    assert_eq!(updated.labels, labels(&[("keep", "1"), ("new", "3")]));
    assert_eq!(updated.created_at, before.created_at);
    assert!(updated.updated_at >= before.updated_at);
    assert_eq!(updated.parent, "", "parent is never updated");

    let replaced = s.update(&info, &[]).expect("replace all");
    assert_eq!(replaced.labels, labels(&[("new", "3")]));
    assert_eq!(
        s.stat("a").expect("stat"),
        replaced,
        "Stat returns what Update returned"
    );

    assert!(matches!(
        s.update(&info, &["parent".into()]),
        Err(SnapshotError::ImmutableField { .. })
    ));
}

#[test]
fn list_applies_filters() {
    let (_dir, s) = open();
    layer(&s, "base", None);
    s.prepare(
        "rw",
        Some("base"),
        labels(&[("containerd.io/snapshot.ref", "t")]),
    )
    .expect("prepare");
    let names = |filters: &[&str]| -> Vec<String> {
        let filters: Vec<String> = filters.iter().map(|f| f.to_string()).collect();
        s.list(&filters)
            .expect("list")
            .into_iter()
            .map(|i| i.name)
            .collect()
    };
    assert_eq!(names(&[]), vec!["base", "rw"]);
    assert_eq!(names(&["kind==committed"]), vec!["base"]);
    assert_eq!(names(&["parent==base"]), vec!["rw"]);
    assert_eq!(
        names(&[r#"labels."containerd.io/snapshot.ref"==t"#]),
        vec!["rw"]
    );
    assert_eq!(names(&["kind==view", "name==base"]), vec!["base"]);
    assert!(matches!(
        s.list(&["kind=".into()]),
        Err(SnapshotError::InvalidFilter { .. })
    ));
}

#[test]
fn usage_counts_written_data() {
    let (_dir, s) = open();
    let mounts = s.prepare("a", None, Labels::new()).expect("prepare");
    let empty = s.usage("a").expect("usage");
    std::fs::write(
        Path::new(&mounts[0].source).join("f"),
        vec![1u8; 256 * 1024],
    )
    .expect("write");
    let written = s.usage("a").expect("usage");
    assert!(
        written.size >= empty.size + 256 * 1024,
        "{empty:?} -> {written:?}"
    );
    assert_eq!(written.inodes, empty.inodes + 1);
    s.commit("c", "a", Labels::new()).expect("commit");
    assert_eq!(
        s.usage("c").expect("usage"),
        written,
        "committed usage is recorded"
    );
}

#[test]
fn state_survives_reopen_and_cleanup_removes_orphans() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let s = Snapshotter::open(dir.path()).expect("open");
        layer(&s, "base", None);
        s.prepare("rw", Some("base"), Labels::new())
            .expect("prepare");
    }
    // What a crash between staging and commit leaves behind.
    let orphan = dir.path().join("snapshots").join("new-crashed");
    std::fs::create_dir_all(orphan.join("fs")).expect("orphan");
    let stale_id = dir.path().join("snapshots").join("999");
    std::fs::create_dir_all(stale_id.join("fs")).expect("stale id");

    let s = Snapshotter::open(dir.path()).expect("reopen");
    assert_eq!(s.stat("base").expect("stat").kind, Kind::Committed);
    assert_eq!(s.stat("rw").expect("stat").parent, "base");
    s.cleanup().expect("cleanup");
    assert!(!orphan.exists() && !stale_id.exists());
    let mounts = s.mounts("rw").expect("mounts");
    let lower = option(&mounts[0], "lowerdir=").expect("lowerdir");
    assert!(Path::new(lower).join("base").exists(), "base layer kept");
}

#[test]
fn cleanup_running_beside_prepares_never_takes_a_live_snapshot() {
    let (_dir, s) = open();
    let s = Arc::new(s);
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cleaner = {
        let (s, done) = (s.clone(), done.clone());
        std::thread::spawn(move || {
            let mut rounds = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                s.cleanup().expect("cleanup");
                rounds += 1;
            }
            rounds
        })
    };
    for n in 0..200 {
        s.prepare(&format!("active-{n}"), None, Labels::new())
            .expect("prepare");
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = cleaner.join().expect("cleaner");
    assert!(rounds > 0, "cleanup ran alongside");
    for n in 0..200 {
        let record = s.get(&format!("active-{n}")).expect("record");
        assert!(
            s.fs_dir(record.id).is_dir(),
            "snapshot active-{n} lost its directory to a concurrent cleanup"
        );
    }
}

/// A remote file system that "mounts" by writing a marker file, and records its calls.
#[derive(Default)]
struct FakeRemote {
    calls: Mutex<Vec<String>>,
    fail_remount: bool,
    /// Mountpoints whose mount "died".
    dead: Mutex<HashSet<PathBuf>>,
    /// The lower dirs each mount and remount was given, in call order.
    lowers: Mutex<Vec<Vec<PathBuf>>>,
}

impl RemoteFs for FakeRemote {
    fn mount(
        &self,
        mountpoint: &Path,
        labels: &Labels,
        lower: &[PathBuf],
    ) -> Result<RemoteState, RemoteError> {
        let Some(layer) = labels.get("test/layer") else {
            return Err(RemoteError::NotLazy("no test/layer label".into()));
        };
        if layer == "broken" {
            return Err(RemoteError::Failed("broken layer".into()));
        }
        std::fs::write(mountpoint.join("remote-marker"), layer).expect("write marker");
        self.lowers.lock().expect("lock").push(lower.to_vec());
        self.calls
            .lock()
            .expect("lock")
            .push(format!("mount {layer}"));
        Ok(serde_json::json!({ "layer": layer }))
    }

    fn remount(
        &self,
        mountpoint: &Path,
        state: &RemoteState,
        lower: &[PathBuf],
    ) -> Result<(), RemoteError> {
        self.calls
            .lock()
            .expect("lock")
            .push(format!("remount {}", state["layer"]));
        self.lowers.lock().expect("lock").push(lower.to_vec());
        if self.fail_remount {
            return Err(RemoteError::Failed("registry gone".into()));
        }
        self.dead.lock().expect("lock").remove(mountpoint);
        Ok(())
    }

    fn check(&self, mountpoint: &Path) -> Result<(), RemoteError> {
        if self.dead.lock().expect("lock").contains(mountpoint) {
            return Err(RemoteError::Dead {
                layer: "sha256:fake".into(),
                mountpoint: mountpoint.to_path_buf(),
                reason: "FUSE connection aborted".into(),
            });
        }
        Ok(())
    }

    fn unmount(&self, _mountpoint: &Path) -> Result<(), RemoteError> {
        self.calls.lock().expect("lock").push("unmount".into());
        Ok(())
    }
}

fn remote_labels(target: &str, layer: &str) -> Labels {
    labels(&[(remote::TARGET_REF_LABEL, target), ("test/layer", layer)])
}

#[test]
fn lazy_layer_is_committed_as_the_target() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = Arc::new(FakeRemote::default());
    let s = Snapshotter::open_with(dir.path(), Some(fake.clone())).expect("open");

    let err = s
        .prepare("extract-1", None, remote_labels("chain-1", "L1"))
        .expect_err("containerd is told the layer exists");
    assert!(
        matches!(err, SnapshotError::AlreadyExists { ref key } if key == "chain-1"),
        "{err}"
    );
    assert!(matches!(
        s.stat("extract-1"),
        Err(SnapshotError::NotFound { .. })
    ));
    let info = s.stat("chain-1").expect("target committed");
    assert_eq!(info.kind, Kind::Committed);
    assert_eq!(
        info.labels.get(remote::REMOTE_LABEL).map(String::as_str),
        Some("remote snapshot")
    );
    // containerd finds it with exactly this filter
    let found = s
        .list(&[r#"labels."containerd.io/snapshot.ref"==chain-1"#.into()])
        .expect("list");
    assert_eq!(found.len(), 1);

    // a second layer on top, and a container's rw snapshot stacking both
    s.prepare("extract-2", Some("chain-1"), remote_labels("chain-2", "L2"))
        .expect_err("second lazy layer");
    let mounts = s.prepare("rw", Some("chain-2"), Labels::new()).expect("rw");
    let lower = option(&mounts[0], "lowerdir=").expect("lowerdir");
    let markers: Vec<String> = lower
        .split(':')
        .map(|d| std::fs::read_to_string(Path::new(d).join("remote-marker")).expect("marker"))
        .collect();
    assert_eq!(markers, vec!["L2", "L1"]);

    // the same layer again (another image sharing it) is already there
    let again = s.prepare("extract-3", None, remote_labels("chain-1", "L1"));
    assert!(matches!(again, Err(SnapshotError::AlreadyExists { .. })));

    s.remove("rw").expect("remove rw");
    s.remove("chain-2").expect("remove chain-2");
    assert_eq!(
        *fake.calls.lock().expect("lock"),
        vec!["mount L1", "mount L2", "unmount"]
    );
}

#[test]
fn layers_that_are_not_lazy_take_the_ordinary_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s =
        Snapshotter::open_with(dir.path(), Some(Arc::new(FakeRemote::default()))).expect("open");
    let plain = s
        .prepare(
            "extract-1",
            None,
            labels(&[(remote::TARGET_REF_LABEL, "chain-1")]),
        )
        .expect("plain layer gets mounts");
    assert_eq!(plain[0].kind, "bind");
    let broken = s
        .prepare("extract-2", None, remote_labels("chain-2", "broken"))
        .expect("failing lazy layer falls back");
    assert_eq!(broken[0].kind, "bind");
    assert_eq!(s.stat("extract-2").expect("active").kind, Kind::Active);
    assert!(matches!(
        s.stat("chain-2"),
        Err(SnapshotError::NotFound { .. })
    ));
}

#[test]
fn remote_layers_are_remounted_after_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let s = Snapshotter::open_with(dir.path(), Some(Arc::new(FakeRemote::default())))
            .expect("open");
        s.prepare("extract-1", None, remote_labels("chain-1", "L1"))
            .expect_err("lazy");
    }
    let fake = Arc::new(FakeRemote::default());
    let s = Snapshotter::open_with(dir.path(), Some(fake.clone())).expect("reopen");
    s.restore_remote_mounts().expect("restore");
    assert_eq!(*fake.calls.lock().expect("lock"), vec![r#"remount "L1""#]);
    s.prepare("rw", Some("chain-1"), Labels::new())
        .expect("usable");

    let failing = Arc::new(FakeRemote {
        fail_remount: true,
        ..FakeRemote::default()
    });
    drop(s);
    let s = Snapshotter::open_with(dir.path(), Some(failing)).expect("reopen");
    s.restore_remote_mounts().expect("restore");
    let err = s.mounts("rw").expect_err("layer unavailable");
    assert!(
        matches!(err, SnapshotError::LayerUnavailable { .. }),
        "{err}"
    );
}

fn lazy_chain(fake: Arc<FakeRemote>) -> (tempfile::TempDir, Snapshotter) {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Snapshotter::open_with(dir.path(), Some(fake)).expect("open");
    s.prepare("extract-1", None, remote_labels("chain-1", "L1"))
        .expect_err("lazy");
    s.prepare("extract-2", Some("chain-1"), remote_labels("chain-2", "L2"))
        .expect_err("lazy");
    (dir, s)
}

#[test]
fn lazy_layers_are_given_their_parent_chain_as_lower_dirs() {
    let fake = Arc::new(FakeRemote::default());
    let (_dir, s) = lazy_chain(fake.clone());
    let l1 = s.fs_dir(s.get("chain-1").expect("chain-1").id);
    assert_eq!(
        *fake.lowers.lock().expect("lock"),
        vec![vec![], vec![l1.clone()]]
    );
}

#[test]
fn a_dead_lazy_layer_is_mounted_again_before_it_is_handed_out() {
    let fake = Arc::new(FakeRemote::default());
    let (_dir, s) = lazy_chain(fake.clone());
    let l1 = s.fs_dir(s.get("chain-1").expect("chain-1").id);
    let l2 = s.fs_dir(s.get("chain-2").expect("chain-2").id);
    fake.dead
        .lock()
        .expect("lock")
        .extend([l1.clone(), l2.clone()]);
    fake.lowers.lock().expect("lock").clear();
    s.prepare("rw", Some("chain-2"), Labels::new())
        .expect("repaired");
    // farthest first, each over its own parents; never `unmount`, which would tell the layer
    // its snapshot is gone (and its saved state with it)
    assert_eq!(
        fake.calls.lock().expect("lock")[2..],
        [r#"remount "L1""#.to_owned(), r#"remount "L2""#.to_owned()]
    );
    assert_eq!(
        *fake.lowers.lock().expect("lock"),
        vec![vec![], vec![l1.clone()]]
    );
    assert!(fake.dead.lock().expect("lock").is_empty());

    // Mounts and View check too
    fake.dead.lock().expect("lock").insert(l2.clone());
    s.mounts("rw").expect("mounts repairs");
    assert!(fake.dead.lock().expect("lock").is_empty());
    fake.dead.lock().expect("lock").insert(l1);
    s.view("v", Some("chain-2"), Labels::new())
        .expect("view repairs");
    assert!(fake.dead.lock().expect("lock").is_empty());
}

#[test]
fn a_dead_lazy_layer_that_cannot_be_mounted_again_fails_the_call() {
    let fake = Arc::new(FakeRemote {
        fail_remount: true,
        ..FakeRemote::default()
    });
    let (_dir, s) = lazy_chain(fake.clone());
    let l1 = s.fs_dir(s.get("chain-1").expect("chain-1").id);
    fake.dead.lock().expect("lock").insert(l1);
    let err = s
        .prepare("rw", Some("chain-2"), Labels::new())
        .expect_err("not handed out");
    assert!(
        matches!(err, SnapshotError::LayerDead { ref key, .. } if key == "chain-1"),
        "{err}"
    );
    let message = crate::error_chain(&err);
    assert!(message.contains("sha256:fake"), "{message}");
    assert!(message.contains("FUSE connection aborted"), "{message}");
    assert_eq!(
        tonic::Status::from(err).code(),
        tonic::Code::Unavailable,
        "{message}"
    );
}
