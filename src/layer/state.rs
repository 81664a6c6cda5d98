//! What is kept of a resolved layer under `<root>/layers/<digest>/`: `layer.json` (where the
//! layer came from, its format and the format's parameters) and `index.zst` (the verified index
//! document, zstd-compressed), so a restarted daemon opens its layers again, and a layer pulled
//! again while its state is here is mounted, without asking the registry. States saved before
//! compression (`index`, or `toc.json` before that) still load. Files are written to a
//! temporary name and renamed, so a crash leaves the old or the new. The state of a layer is
//! kept after its last snapshot goes, for a pull of the same layer to come, within
//! `[cache] unmounted_state_bytes` (`crate::mount`), and its bytes count against the cache's
//! disk budget.
//!
//! Blocking file I/O: call from blocking threads.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::verify::Verdict;
use super::{LayerError, LayerSource};
use crate::format::Resolved;

/// What the snapshotter records with a lazy snapshot, and `layer.json` holds.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerState {
    pub source: LayerSource,
    pub blob_size: u64,
    /// The name of the layer's format (`LayerFormat::name`).
    pub format: String,
    /// The format's parameters and verified index; the index bytes live in their own file,
    /// not in the JSON.
    pub resolved: Resolved,
}

/// The JSON form, without the index bytes. Layers saved before formats had names (the field
/// `location`) are eStargz or zstd:chunked layers, and read as such.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedState {
    pub source: LayerSource,
    pub blob_size: u64,
    #[serde(default)]
    pub format: Option<String>,
    #[serde(default)]
    pub params: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    location: Option<serde_json::Value>,
}

impl SavedState {
    pub fn of(state: &LayerState) -> Self {
        SavedState {
            source: state.source.clone(),
            blob_size: state.blob_size,
            format: Some(state.format.clone()),
            params: Some(state.resolved.params.clone()),
            location: None,
        }
    }

    /// The format name and its parameters, legacy states included.
    fn format_and_params(&self) -> (String, serde_json::Value) {
        match (&self.format, &self.params, &self.location) {
            (Some(f), Some(p), _) => (f.clone(), p.clone()),
            (_, _, Some(location)) => {
                let compression = location.get("compression").and_then(|c| c.as_str());
                let name = if compression == Some("zstd") {
                    "zstd:chunked"
                } else {
                    "estargz"
                };
                let params = serde_json::json!({
                    "location": location,
                    "toc_digest": self.source.toc_digest.clone().unwrap_or_default(),
                });
                (name.to_owned(), params)
            }
            _ => (String::new(), serde_json::Value::Null),
        }
    }

    /// The full state, with the index bytes read from wherever they were saved.
    pub fn with_index(self, index: Vec<u8>) -> LayerState {
        let (format, params) = self.format_and_params();
        LayerState {
            source: self.source,
            blob_size: self.blob_size,
            format,
            resolved: Resolved { params, index },
        }
    }
}

/// The directory of saved layer states.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

const STATE_FILE: &str = "layer.json";
/// The whole-blob verdict (`super::verify`), once there is one: written apart from
/// `layer.json`, which is written before the layer is mounted and never again.
const VERDICT_FILE: &str = "verdict.json";
const INDEX_FILE: &str = "index.zst";
/// The index before it was compressed.
const PLAIN_INDEX_FILE: &str = "index";
/// What layers saved before the format seam called their index.
const LEGACY_INDEX_FILE: &str = "toc.json";

impl StateDir {
    pub fn new(dir: PathBuf) -> Self {
        StateDir { dir }
    }

    pub fn layer_dir(&self, digest: &str) -> PathBuf {
        self.dir.join(digest.replace(':', "-"))
    }

    /// Saves `state`, replacing what was saved for the layer.
    pub fn save(&self, state: &LayerState) -> Result<(), LayerError> {
        self.save_encoded(&Self::encode(state)?)
    }

    /// The files `state` is saved as, so their size is known before they are written.
    /// CPU-bound (compresses the index).
    pub fn encode(state: &LayerState) -> Result<Encoded, LayerError> {
        let layer = &state.source.digest;
        let json = serde_json::to_vec_pretty(&SavedState::of(state)).map_err(|source| {
            LayerError::StateJson {
                layer: layer.clone(),
                path: PathBuf::from(STATE_FILE),
                source,
            }
        })?;
        let index =
            zstd::bulk::compress(&state.resolved.index, 3).map_err(|source| LayerError::State {
                layer: layer.clone(),
                action: "compress",
                path: PathBuf::from(INDEX_FILE),
                source,
            })?;
        Ok(Encoded {
            layer: layer.clone(),
            index,
            json,
        })
    }

    /// Writes what `encode` made.
    pub fn save_encoded(&self, encoded: &Encoded) -> Result<(), LayerError> {
        let layer = &encoded.layer;
        let dir = self.layer_dir(layer);
        let io = |action: &'static str, path: &Path| {
            let (layer, path) = (layer.clone(), path.to_path_buf());
            move |source| LayerError::State {
                layer,
                action,
                path,
                source,
            }
        };
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        // The index first: a state file never points at a missing or older index.
        for (name, bytes) in [(INDEX_FILE, &encoded.index), (STATE_FILE, &encoded.json)] {
            let tmp = dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, bytes).map_err(io("write", &tmp))?;
            let path = dir.join(name);
            std::fs::rename(&tmp, &path).map_err(io("rename into", &path))?;
        }
        for old in [PLAIN_INDEX_FILE, LEGACY_INDEX_FILE] {
            let _ = std::fs::remove_file(dir.join(old));
        }
        Ok(())
    }

    /// Records the whole-blob verdict of layer `digest`, whose state is saved; a restarted
    /// daemon neither checks the layer again nor forgets that it is bad.
    pub fn save_verdict(&self, digest: &str, verdict: &Verdict) -> Result<(), LayerError> {
        let dir = self.layer_dir(digest);
        let path = dir.join(VERDICT_FILE);
        let json = serde_json::to_vec(verdict).map_err(|source| LayerError::StateJson {
            layer: digest.to_owned(),
            path: path.clone(),
            source,
        })?;
        let tmp = dir.join(format!(".{VERDICT_FILE}.tmp"));
        let io = |action: &'static str, path: &Path| {
            let (layer, path) = (digest.to_owned(), path.to_path_buf());
            move |source| LayerError::State {
                layer,
                action,
                path,
                source,
            }
        };
        std::fs::write(&tmp, json).map_err(io("write", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("rename into", &path))
    }

    /// The verdict saved for layer `digest`; none if it was never checked (or the file
    /// does not parse: the layer is then checked again).
    pub fn load_verdict(&self, digest: &str) -> Option<Verdict> {
        let path = self.layer_dir(digest).join(VERDICT_FILE);
        let bytes = std::fs::read(&path).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(layer = %digest, path = %path.display(), error = %e, "saved layer verdict does not parse; the layer will be checked again");
                None
            }
        }
    }

    /// Removes the state of layer `digest`; the bytes it held.
    pub fn remove(&self, digest: &str) -> u64 {
        let dir = self.layer_dir(digest);
        let bytes = dir_bytes(&dir);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => {
                tracing::warn!(layer = %digest, dir = %dir.display(), error = %e, "removing saved layer state failed");
                0
            }
        }
    }

    /// Removes the state of every layer but `keep` (digests), half-written ones included;
    /// the bytes freed.
    pub fn remove_all_but(&self, keep: &[&str]) -> u64 {
        let keep: Vec<PathBuf> = keep.iter().map(|d| self.layer_dir(d)).collect();
        let mut freed = 0;
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if keep.contains(&path) {
                continue;
            }
            freed += remove_path(&path);
        }
        freed
    }

    /// Marks the state of layer `digest` as unmounted now, for
    /// [`trim_unmounted`](Self::trim_unmounted): its state file's time is set to now.
    pub fn mark_unmounted(&self, digest: &str) {
        let path = self.layer_dir(digest).join(STATE_FILE);
        let touched = std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(std::time::SystemTime::now()));
        if let Err(e) = touched {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::debug!(path = %path.display(), error = %e, "cannot mark a saved layer state as unmounted");
            }
        }
    }

    /// Removes the states of layers other than `mounted` (digests) beyond `max_bytes` in
    /// all, those unmounted longest ago first, and anything half-written; the bytes freed.
    pub fn trim_unmounted(&self, mounted: &[&str], max_bytes: u64) -> u64 {
        let mounted: Vec<PathBuf> = mounted.iter().map(|d| self.layer_dir(d)).collect();
        let mut unmounted: Vec<(std::time::SystemTime, u64, PathBuf)> = Vec::new();
        let mut freed = 0;
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if mounted.contains(&path) {
                continue;
            }
            let bytes = dir_bytes(&path);
            match std::fs::metadata(path.join(STATE_FILE)).and_then(|m| m.modified()) {
                Ok(when) => unmounted.push((when, bytes, path)),
                // No state file: a save cut short, of no use to anyone.
                Err(_) => freed += remove_path(&path),
            }
        }
        unmounted.sort_by_key(|u| std::cmp::Reverse(u.0));
        let mut kept = 0u64;
        for (_, bytes, path) in unmounted {
            if kept.saturating_add(bytes) <= max_bytes {
                kept += bytes;
            } else {
                freed += remove_path(&path);
            }
        }
        freed
    }

    /// Bytes of every file under the directory: what saved states hold on disk.
    pub fn disk_usage(&self) -> u64 {
        std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| dir_bytes(&e.path()))
            .sum()
    }

    /// The saved state of layer `digest`; `Unknown` when none was saved.
    pub fn load(&self, digest: &str) -> Result<LayerState, LayerError> {
        let dir = self.layer_dir(digest);
        if !dir.join(STATE_FILE).exists() {
            return Err(LayerError::Unknown {
                layer: digest.to_owned(),
            });
        }
        self.load_dir(&dir)
    }

    /// The state saved in `dir`.
    pub fn load_dir(&self, dir: &Path) -> Result<LayerState, LayerError> {
        let saved = self.load_json(dir)?;
        let layer = saved.source.digest.clone();
        let compressed = dir.join(INDEX_FILE);
        let mut path = dir.join(PLAIN_INDEX_FILE);
        if compressed.exists() {
            path = compressed;
        } else if !path.exists() && dir.join(LEGACY_INDEX_FILE).exists() {
            path = dir.join(LEGACY_INDEX_FILE);
        }
        let err = |action| {
            let (layer, path) = (layer.clone(), path.clone());
            move |source| LayerError::State {
                layer,
                action,
                path,
                source,
            }
        };
        let mut index = std::fs::read(&path).map_err(err("read"))?;
        if path.ends_with(INDEX_FILE) {
            index = zstd::stream::decode_all(index.as_slice()).map_err(err("decompress"))?;
        }
        Ok(saved.with_index(index))
    }

    /// Just the JSON part of the state saved in `dir`, without reading the index.
    pub fn load_json(&self, dir: &Path) -> Result<SavedState, LayerError> {
        let path = dir.join(STATE_FILE);
        let layer = dir
            .file_name()
            .map(|n| n.to_string_lossy().replacen('-', ":", 1))
            .unwrap_or_default();
        let text = std::fs::read(&path).map_err(|source| LayerError::State {
            layer: layer.clone(),
            action: "read",
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|source| LayerError::StateJson {
            layer,
            path,
            source,
        })
    }

    /// The directories of every saved layer.
    pub fn list(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join(STATE_FILE).exists())
            .collect()
    }
}

/// A layer's state as it will be written.
pub struct Encoded {
    layer: String,
    index: Vec<u8>,
    json: Vec<u8>,
}

impl Encoded {
    /// The bytes it will take on disk.
    pub fn len(&self) -> u64 {
        (self.index.len() + self.json.len()) as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Bytes of the files in `dir` (one level: a layer's directory has no subdirectories), or of
/// `dir` itself if it is a file.
fn dir_bytes(dir: &Path) -> u64 {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum(),
        Err(_) => std::fs::metadata(dir).map_or(0, |m| if m.is_file() { m.len() } else { 0 }),
    }
}

/// Removes a layer's state directory (or a stray file); the bytes freed.
fn remove_path(path: &Path) -> u64 {
    let bytes = dir_bytes(path);
    let removed = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match removed {
        Ok(()) => bytes,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "removing saved layer state failed");
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> LayerState {
        LayerState {
            source: LayerSource {
                reference: "r/a:1".into(),
                digest: "sha256:aa".into(),
                toc_digest: Some("sha256:bb".into()),
            },
            blob_size: 1000,
            format: "estargz".into(),
            resolved: Resolved {
                params: serde_json::json!({"k": 1}),
                index: b"{}".to_vec(),
            },
        }
    }

    #[test]
    fn saved_state_round_trips_and_unknown_layers_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let states = StateDir::new(dir.path().to_path_buf());
        states.save(&state()).expect("save");
        assert_eq!(states.load("sha256:aa").expect("load"), state());
        assert_eq!(states.list().len(), 1);
        let on_disk = states.disk_usage();
        assert_eq!(on_disk, StateDir::encode(&state()).expect("encode").len());
        assert!(dir.path().join("sha256-aa").join("index.zst").exists());
        assert_eq!(states.remove_all_but(&["sha256:aa"]), 0);
        assert_eq!(states.remove("sha256:aa"), on_disk);
        assert_eq!(states.disk_usage(), 0);
        assert!(states.list().is_empty());
        let err = states.load("sha256:cc").expect_err("unknown");
        assert!(matches!(err, LayerError::Unknown { .. }), "{err}");
    }

    #[test]
    fn unmounted_states_are_kept_within_their_bytes_most_recently_unmounted_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let states = StateDir::new(dir.path().to_path_buf());
        let of = |digest: &str| {
            let mut s = state();
            s.source.digest = digest.into();
            s
        };
        for d in ["sha256:aa", "sha256:bb", "sha256:cc"] {
            states.save(&of(d)).expect("save");
        }
        let one = states.disk_usage() / 3;
        // bb was unmounted long ago, cc just now; aa is still mounted.
        let at = |digest: &str, secs: u64| {
            std::fs::File::options()
                .write(true)
                .open(states.layer_dir(digest).join(STATE_FILE))
                .and_then(|f| {
                    f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
                })
                .expect("set time");
        };
        at("sha256:bb", 1_000);
        states.mark_unmounted("sha256:cc");
        // A save cut short before its state file.
        std::fs::create_dir_all(states.layer_dir("sha256:dd")).expect("mkdir");
        std::fs::write(states.layer_dir("sha256:dd").join(INDEX_FILE), b"x").expect("write");

        assert_eq!(states.trim_unmounted(&["sha256:aa"], u64::MAX), 1);
        assert_eq!(states.list().len(), 3, "all three kept without a limit");
        assert_eq!(states.trim_unmounted(&["sha256:aa"], one), one);
        assert!(
            states.load("sha256:aa").is_ok(),
            "a mounted layer's state stays"
        );
        assert!(
            states.load("sha256:cc").is_ok(),
            "the latest unmounted stays"
        );
        assert!(matches!(
            states.load("sha256:bb"),
            Err(LayerError::Unknown { .. })
        ));
        assert_eq!(states.trim_unmounted(&["sha256:aa"], 0), one);
        assert_eq!(states.list().len(), 1);
    }

    #[test]
    fn verdicts_are_saved_next_to_the_state_and_go_with_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let states = StateDir::new(dir.path().to_path_buf());
        states.save(&state()).expect("save");
        assert_eq!(states.load_verdict("sha256:aa"), None);
        let bad = Verdict::Bad {
            expected: "sha256:aa".into(),
            got: "sha256:ff".into(),
        };
        states
            .save_verdict("sha256:aa", &bad)
            .expect("save verdict");
        assert_eq!(states.load_verdict("sha256:aa"), Some(bad));
        states
            .save_verdict("sha256:aa", &Verdict::Verified)
            .expect("save verdict");
        assert_eq!(states.load_verdict("sha256:aa"), Some(Verdict::Verified));
        assert_eq!(
            states.load("sha256:aa").expect("load"),
            state(),
            "the state itself is untouched"
        );
        std::fs::write(dir.path().join("sha256-aa").join(VERDICT_FILE), b"{").expect("write");
        assert_eq!(
            states.load_verdict("sha256:aa"),
            None,
            "garbage is no verdict"
        );
        states.remove("sha256:aa");
        assert_eq!(states.load_verdict("sha256:aa"), None);
        assert!(
            states
                .save_verdict("sha256:aa", &Verdict::Verified)
                .is_err(),
            "no verdict without a saved state"
        );
    }

    #[test]
    fn states_saved_before_format_names_read_as_toc_layers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layer = dir.path().join("sha256-aa");
        std::fs::create_dir_all(&layer).expect("mkdir");
        let legacy = serde_json::json!({
            "source": {"reference": "r/a:1", "digest": "sha256:aa", "toc_digest": "sha256:bb"},
            "blob_size": 1000,
            "location": {"compression": "zstd", "offset": 10, "len": 20},
        });
        std::fs::write(layer.join("layer.json"), legacy.to_string()).expect("write");
        std::fs::write(layer.join("toc.json"), b"{}").expect("write");
        let state = StateDir::new(dir.path().to_path_buf())
            .load("sha256:aa")
            .expect("legacy state loads");
        assert_eq!(state.format, "zstd:chunked");
        assert_eq!(state.resolved.params["toc_digest"], "sha256:bb");
        assert_eq!(state.resolved.params["location"]["len"], 20);
        assert_eq!(state.resolved.index, b"{}");
    }
}
