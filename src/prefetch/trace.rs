//! Read traces: which chunks of a layer containers read first after a mount, in order, with
//! the time since the mount. One trace per layer digest is kept under `<root>/traces/`; every
//! mount refines it, and `lazysnap trace export` / `import` move it between nodes, because a
//! trace is a fact about a layer, not about the node that recorded it.
//!
//! Entries name a file by its path in the layer and a chunk by its offset in that file, so a
//! trace stays meaningful wherever the layer is (paths and chunking come from the layer's TOC,
//! which its digest pins). A trace also keeps the names the kernel asked the layer about
//! (`names`), which the next mount asks itself (`names::replay`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::layer::unix_ms;
use crate::prefetch::recorder::NameOp;

/// The `format` of a trace document; `import` refuses any other.
pub const FORMAT: &str = "lazysnap-trace/v1";

/// The trace of one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    pub format: String,
    /// The layer's digest (`sha256:<hex>`).
    pub layer: String,
    /// How many mounts have contributed.
    pub mounts: u64,
    pub updated_unix_ms: u64,
    /// First-read order.
    pub entries: Vec<TraceEntry>,
    /// The names the kernel asked about, in first-asked order (absent from traces written
    /// before they were kept).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<NameEntry>,
}

/// The first request about one name of the layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameEntry {
    /// Relative, `/`-separated path in the layer (of the name looked up, the directory
    /// listed or the symlink read).
    pub path: String,
    pub op: NameOp,
    /// Milliseconds from the mount to the first request.
    pub since_mount_ms: u64,
}

/// The first read of one chunk of one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceEntry {
    /// Relative, `/`-separated path in the layer.
    pub path: String,
    /// Where the chunk starts in the file.
    pub offset: u64,
    /// The chunk's length (uncompressed).
    pub bytes: u64,
    /// Milliseconds from the mount to the first read.
    pub since_mount_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("no trace for layer {digest}")]
    NotFound { digest: String },
    #[error("{action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid trace document: {reason}")]
    Invalid { reason: String },
}

impl Trace {
    pub fn new(layer: &str) -> Self {
        Trace {
            format: FORMAT.into(),
            layer: layer.into(),
            mounts: 0,
            updated_unix_ms: 0,
            entries: Vec::new(),
            names: Vec::new(),
        }
    }

    /// Takes in `entries` (of one mount, or of another node's trace): the union, each chunk
    /// at the earliest time any mount first read it, in that order, at most `max` entries
    /// (the latest-read go first when there are too many: they matter least to a start).
    pub fn merge(&mut self, entries: impl IntoIterator<Item = TraceEntry>, max: usize) {
        merge_first_seen(&mut self.entries, entries, max);
        self.updated_unix_ms = unix_ms();
    }

    /// Like [`merge`](Self::merge), for the names asked about: the union, each at its
    /// earliest, at most `max`.
    pub fn merge_names(&mut self, names: impl IntoIterator<Item = NameEntry>, max: usize) {
        merge_first_seen(&mut self.names, names, max);
        self.updated_unix_ms = unix_ms();
    }

    pub fn bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.bytes).sum()
    }

    /// A document from `export` (of any node), checked.
    pub fn from_document(document: &[u8]) -> Result<Trace, TraceError> {
        let trace: Trace = serde_json::from_slice(document).map_err(|e| TraceError::Invalid {
            reason: e.to_string(),
        })?;
        trace.validate()?;
        Ok(trace)
    }

    /// Checks a document from outside before it is stored.
    fn validate(&self) -> Result<(), TraceError> {
        let invalid = |reason: String| Err(TraceError::Invalid { reason });
        if self.format != FORMAT {
            return invalid(format!("format {:?}, expected {FORMAT:?}", self.format));
        }
        if crate::chunk::ChunkDigest::parse(&self.layer).is_none()
            || !self.layer.starts_with("sha256:")
        {
            return invalid(format!("layer {:?} is not a sha256 digest", self.layer));
        }
        let paths = self.entries.iter().map(|e| &e.path);
        if let Some(bad) = paths
            .chain(self.names.iter().map(|n| &n.path))
            .find(|p| !plain_relative(p))
        {
            return invalid(format!("entry path {bad:?} is not a plain relative path"));
        }
        Ok(())
    }
}

/// A path that names something inside the layer and only that: relative, no `.` or `..`,
/// no empty part.
fn plain_relative(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && !path
            .split('/')
            .any(|p| p == ".." || p == "." || p.is_empty())
}

/// An item of a trace that counts from its first sighting after a mount.
trait FirstSeen {
    type Key: std::hash::Hash + Eq;
    fn key(&self) -> Self::Key;
    fn since_mount_ms(&mut self) -> &mut u64;
}

impl FirstSeen for TraceEntry {
    type Key = (String, u64);
    fn key(&self) -> Self::Key {
        (self.path.clone(), self.offset)
    }
    fn since_mount_ms(&mut self) -> &mut u64 {
        &mut self.since_mount_ms
    }
}

impl FirstSeen for NameEntry {
    type Key = (String, NameOp);
    fn key(&self) -> Self::Key {
        (self.path.clone(), self.op)
    }
    fn since_mount_ms(&mut self) -> &mut u64 {
        &mut self.since_mount_ms
    }
}

/// Merges `incoming` into `list`: the union, each item at its earliest time, sorted by time
/// (stable: items of the same millisecond keep the order they were seen in), at most `max`
/// (the latest go).
fn merge_first_seen<T: FirstSeen>(
    list: &mut Vec<T>,
    incoming: impl IntoIterator<Item = T>,
    max: usize,
) {
    let mut at: HashMap<T::Key, usize> =
        list.iter().enumerate().map(|(i, e)| (e.key(), i)).collect();
    for mut item in incoming {
        let key = item.key();
        match at.get(&key) {
            Some(&i) => {
                let seen = *item.since_mount_ms();
                let known = list[i].since_mount_ms();
                *known = (*known).min(seen);
            }
            None => {
                at.insert(key, list.len());
                list.push(item);
            }
        }
    }
    let mut timed: Vec<(u64, T)> = std::mem::take(list)
        .into_iter()
        .map(|mut e| (*e.since_mount_ms(), e))
        .collect();
    timed.sort_by_key(|(ms, _)| *ms);
    list.extend(timed.into_iter().map(|(_, e)| e).take(max));
}

/// The traces of this node, one JSON file per layer.
pub struct TraceStore {
    dir: PathBuf,
    /// Serialises read-merge-write of one file by concurrent mounts of the same layer.
    writing: Mutex<()>,
    max_entries: usize,
    max_names: usize,
}

impl TraceStore {
    pub fn open(dir: PathBuf, max_entries: usize, max_names: usize) -> Result<Self, TraceError> {
        std::fs::create_dir_all(&dir).map_err(|source| TraceError::Io {
            action: "create",
            path: dir.clone(),
            source,
        })?;
        Ok(TraceStore {
            dir,
            writing: Mutex::new(()),
            max_entries,
            max_names,
        })
    }

    fn path(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("{}.json", digest.replace(':', "-")))
    }

    /// The trace of `digest`, if this node has one. A damaged file is reported and treated as
    /// absent: a trace only makes things faster, never correct.
    pub fn load(&self, digest: &str) -> Option<Trace> {
        let path = self.path(digest);
        let text = std::fs::read(&path).ok()?;
        match serde_json::from_slice::<Trace>(&text) {
            Ok(trace) if trace.layer == digest => Some(trace),
            Ok(trace) => {
                tracing::warn!(path = %path.display(), layer = %trace.layer, "trace file names another layer; ignoring it");
                None
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "trace file is damaged; ignoring it");
                None
            }
        }
    }

    fn save(&self, trace: &Trace) -> Result<(), TraceError> {
        let path = self.path(&trace.layer);
        let io = |action, source| TraceError::Io {
            action,
            path: path.clone(),
            source,
        };
        let bytes = serde_json::to_vec(trace).map_err(|e| io("encode", e.into()))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, bytes).map_err(|e| io("write", e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io("rename into", e))
    }

    /// Merges what one mount recorded into the layer's trace; `new_mount` counts the mount
    /// (its first flush) once.
    pub fn record(
        &self,
        digest: &str,
        entries: Vec<TraceEntry>,
        names: Vec<NameEntry>,
        new_mount: bool,
    ) -> Result<Trace, TraceError> {
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let mut trace = self.load(digest).unwrap_or_else(|| Trace::new(digest));
        trace.merge(entries, self.max_entries);
        trace.merge_names(names, self.max_names);
        if new_mount {
            trace.mounts += 1;
        }
        self.save(&trace)?;
        Ok(trace)
    }

    /// Merges a document from `export` (of any node) into this node's trace of its layer.
    pub fn import(&self, document: &[u8]) -> Result<Trace, TraceError> {
        let incoming = Trace::from_document(document)?;
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let mut trace = self
            .load(&incoming.layer)
            .unwrap_or_else(|| Trace::new(&incoming.layer));
        trace.merge(incoming.entries, self.max_entries);
        trace.merge_names(incoming.names, self.max_names);
        trace.mounts += incoming.mounts;
        self.save(&trace)?;
        Ok(trace)
    }

    pub fn export(&self, digest: &str) -> Result<Vec<u8>, TraceError> {
        let trace = self.load(digest).ok_or_else(|| TraceError::NotFound {
            digest: digest.into(),
        })?;
        serde_json::to_vec_pretty(&trace).map_err(|e| TraceError::Invalid {
            reason: e.to_string(),
        })
    }

    pub fn get(&self, digest: &str) -> Result<Trace, TraceError> {
        self.load(digest).ok_or_else(|| TraceError::NotFound {
            digest: digest.into(),
        })
    }

    pub fn contains(&self, digest: &str) -> bool {
        self.path(digest).exists()
    }

    /// Every trace this node keeps, by layer digest.
    pub fn list(&self) -> Vec<Trace> {
        let mut out: Vec<Trace> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let digest = name.strip_suffix(".json")?.replacen('-', ":", 1);
                self.load(&digest)
            })
            .collect();
        out.sort_by(|a, b| a.layer.cmp(&b.layer));
        out
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAYER: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    fn entry(path: &str, offset: u64, ms: u64) -> TraceEntry {
        TraceEntry {
            path: path.into(),
            offset,
            bytes: 100,
            since_mount_ms: ms,
        }
    }

    fn name(path: &str, op: NameOp, ms: u64) -> NameEntry {
        NameEntry {
            path: path.into(),
            op,
            since_mount_ms: ms,
        }
    }

    #[test]
    fn names_merge_by_path_and_request_in_first_asked_order() {
        let mut t = Trace::new(LAYER);
        t.merge_names(
            [
                name("usr", NameOp::Lookup, 4),
                name("usr", NameOp::List, 6),
                name("etc/x", NameOp::Lookup, 9),
            ],
            10,
        );
        t.merge_names(
            [
                name("usr", NameOp::List, 1),
                name("bin", NameOp::Readlink, 5),
            ],
            10,
        );
        let order: Vec<(&str, NameOp, u64)> = t
            .names
            .iter()
            .map(|n| (n.path.as_str(), n.op, n.since_mount_ms))
            .collect();
        assert_eq!(
            order,
            [
                ("usr", NameOp::List, 1),
                ("usr", NameOp::Lookup, 4),
                ("bin", NameOp::Readlink, 5),
                ("etc/x", NameOp::Lookup, 9)
            ]
        );
        t.merge_names([], 2);
        assert_eq!(t.names.len(), 2, "bounded");
        // A trace written before names were kept reads as one without any.
        let old = format!(
            r#"{{"format":"{FORMAT}","layer":"{LAYER}","mounts":1,"updated_unix_ms":0,"entries":[]}}"#
        );
        let old: Trace = serde_json::from_str(&old).expect("old document");
        assert!(old.names.is_empty());
    }

    #[test]
    fn merge_keeps_the_union_in_first_read_order() {
        let mut t = Trace::new(LAYER);
        t.merge([entry("a", 0, 5), entry("b", 0, 10), entry("c", 0, 20)], 10);
        t.merge([entry("c", 0, 1), entry("d", 0, 15), entry("a", 0, 50)], 10);
        let order: Vec<(&str, u64)> = t
            .entries
            .iter()
            .map(|e| (e.path.as_str(), e.since_mount_ms))
            .collect();
        assert_eq!(order, [("c", 1), ("a", 5), ("b", 10), ("d", 15)]);
        t.merge([entry("e", 0, 0)], 3);
        assert_eq!(t.entries.len(), 3, "bounded");
        assert_eq!(t.entries[0].path, "e");
        assert_eq!(t.bytes(), 300);
    }

    #[test]
    fn record_export_import_round_trip() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        let node_a = TraceStore::open(a.path().into(), 100, 100).expect("open");
        let node_b = TraceStore::open(b.path().into(), 100, 100).expect("open");
        node_a
            .record(
                LAYER,
                vec![entry("usr/bin/x", 0, 3)],
                vec![name("usr/bin", NameOp::List, 1)],
                true,
            )
            .expect("record");
        node_a
            .record(
                LAYER,
                vec![entry("usr/lib/y", 4096, 7)],
                vec![name("usr/libx", NameOp::Lookup, 2)],
                false,
            )
            .expect("record");
        let doc = node_a.export(LAYER).expect("export");
        let imported = node_b.import(&doc).expect("import");
        assert_eq!(imported.entries.len(), 2);
        assert_eq!(imported.names.len(), 2, "names travel with the trace");
        assert_eq!(imported.mounts, 1);
        assert_eq!(node_b.list().len(), 1);
        assert_eq!(node_b.get(LAYER).expect("get"), imported);
        assert!(matches!(
            node_b.export("sha256:2222"),
            Err(TraceError::NotFound { .. })
        ));
    }

    #[test]
    fn hostile_documents_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = TraceStore::open(dir.path().into(), 100, 100).expect("open");
        let mut t = Trace::new(LAYER);
        t.entries.push(entry("../../etc/passwd", 0, 0));
        let err = store
            .import(&serde_json::to_vec(&t).expect("json"))
            .expect_err("escaping path");
        assert!(err.to_string().contains("../../etc/passwd"), "{err}");
        let mut t = Trace::new(LAYER);
        t.names.push(name("/etc", NameOp::List, 0));
        let err = store
            .import(&serde_json::to_vec(&t).expect("json"))
            .expect_err("absolute name");
        assert!(err.to_string().contains("\"/etc\""), "{err}");
        let mut t = Trace::new("sha256:../x");
        t.entries.clear();
        let err = store
            .import(&serde_json::to_vec(&t).expect("json"))
            .expect_err("bad digest");
        assert!(err.to_string().contains("not a sha256 digest"), "{err}");
        let err = store.import(b"{not json").expect_err("garbage");
        assert!(err.to_string().contains("invalid trace document"), "{err}");
        assert!(store.list().is_empty(), "nothing stored");
    }
}
