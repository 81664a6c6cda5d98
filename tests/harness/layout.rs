//! OCI image layouts written to disk layer by layer, for images too large to hold in memory
//! (the benchmark corpus: a Debian root, a compiler toolchain, a 1 GiB file). Each layer is a
//! tar stream gzip-compressed into a temporary file while both the tar (diff ID) and the gzip
//! (blob digest) are hashed, then renamed into `blobs/sha256/`. One layout holds every image
//! of the corpus under its own tag, so layers shared by images are stored once. Pushed to a
//! registry with skopeo.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use flate2::write::GzEncoder;
use sha2::{Digest, Sha256};

/// A finished layer blob in a layout.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Layer {
    /// `sha256:…` of the gzip blob.
    pub digest: String,
    /// `sha256:…` of the uncompressed tar.
    pub diff_id: String,
    /// Bytes of the gzip blob.
    pub size: u64,
    /// Bytes of the uncompressed tar.
    pub tar_size: u64,
}

/// Counts and hashes what passes through to `inner`.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

type Stream = Hashing<GzEncoder<Hashing<BufWriter<File>>>>;

/// Writes one layer into a layout's blob directory.
pub struct LayerWriter {
    tar: tar::Builder<Stream>,
    tmp: PathBuf,
    blobs: PathBuf,
}

/// The fixed modification time of generated entries, so generated layers are reproducible.
const MTIME: u64 = 1_700_000_000;

impl LayerWriter {
    /// A new layer in `layout`, gzip-compressed at `level` (1 fast … 9 best; 6 is gzip's
    /// default).
    pub fn create(layout: &Path, level: u32) -> LayerWriter {
        let blobs = layout.join("blobs/sha256");
        std::fs::create_dir_all(&blobs)
            .unwrap_or_else(|e| panic!("create {}: {e}", blobs.display()));
        let tmp = blobs.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        let file = File::create(&tmp).unwrap_or_else(|e| panic!("create {}: {e}", tmp.display()));
        let gz = GzEncoder::new(
            Hashing {
                inner: BufWriter::with_capacity(1 << 20, file),
                hasher: Sha256::new(),
                len: 0,
            },
            flate2::Compression::new(level),
        );
        let mut tar = tar::Builder::new(Hashing {
            inner: gz,
            hasher: Sha256::new(),
            len: 0,
        });
        tar.follow_symlinks(false);
        tar.mode(tar::HeaderMode::Complete);
        LayerWriter { tar, tmp, blobs }
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(size);
        h.set_mtime(MTIME);
        h
    }

    /// A directory owned by root.
    pub fn dir(&mut self, path: &str, mode: u32) {
        let mut h = Self::header(tar::EntryType::Directory, mode, 0);
        self.tar
            .append_data(&mut h, format!("{path}/"), std::io::empty())
            .unwrap_or_else(|e| panic!("tar {path}: {e}"));
    }

    /// A regular file owned by root whose `size` bytes come from `data`.
    pub fn file(&mut self, path: &str, mode: u32, size: u64, data: impl Read) {
        let mut h = Self::header(tar::EntryType::Regular, mode, size);
        self.tar
            .append_data(&mut h, path, data)
            .unwrap_or_else(|e| panic!("tar {path}: {e}"));
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.tar
            .append_link(&mut h, path, target)
            .unwrap_or_else(|e| panic!("tar {path}: {e}"));
    }

    /// A whiteout hiding `path` of the layers below.
    pub fn whiteout(&mut self, path: &str) {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let wh = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        self.file(&wh, 0o644, 0, std::io::empty());
    }

    /// The file, directory, symlink or special file at `host` (not followed), named `name`
    /// in the layer, with its mode, owner and times; directories without their contents.
    pub fn host_path(&mut self, host: &Path, name: &str) {
        self.tar
            .append_path_with_name(host, name)
            .unwrap_or_else(|e| panic!("tar {}: {e}", host.display()));
    }

    /// Finishes the tar and the gzip stream and moves the blob into place.
    pub fn finish(self) -> Layer {
        let tar = self.tar.into_inner().expect("finish tar");
        let diff_id = format!("sha256:{}", hex::encode(tar.hasher.finalize()));
        let tar_size = tar.len;
        let gz = tar.inner.finish().expect("finish gzip");
        let digest = hex::encode(gz.hasher.finalize());
        let size = gz.len;
        let file = gz.inner.into_inner().expect("flush layer blob");
        file.sync_all().ok();
        let dest = self.blobs.join(&digest);
        std::fs::rename(&self.tmp, &dest)
            .unwrap_or_else(|e| panic!("move blob to {}: {e}", dest.display()));
        Layer {
            digest: format!("sha256:{digest}"),
            diff_id,
            size,
            tar_size,
        }
    }
}

fn write_blob(layout: &Path, data: &[u8]) -> (String, usize) {
    let hex = hex::encode(Sha256::digest(data));
    let dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&dir).expect("create blobs dir");
    std::fs::write(dir.join(&hex), data).expect("write blob");
    (format!("sha256:{hex}"), data.len())
}

/// Adds (or replaces) image `tag` in `layout`: `layers` lowest first, run as `cmd` with `env`.
pub fn add_image(layout: &Path, tag: &str, layers: &[Layer], cmd: &[&str], env: &[&str]) {
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("oci-layout");
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Cmd": cmd, "Env": env },
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
        },
    });
    let (config_digest, config_size) =
        write_blob(layout, &serde_json::to_vec(&config).expect("config"));
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": layers.iter().map(|l| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": l.digest,
            "size": l.size,
        })).collect::<Vec<_>>(),
    });
    let (manifest_digest, manifest_size) =
        write_blob(layout, &serde_json::to_vec(&manifest).expect("manifest"));
    let index_path = layout.join("index.json");
    let mut manifests: Vec<serde_json::Value> = std::fs::read(&index_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["manifests"].as_array().cloned())
        .unwrap_or_default();
    manifests.retain(|m| m["annotations"]["org.opencontainers.image.ref.name"] != tag);
    manifests.push(serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_digest,
        "size": manifest_size,
        "annotations": { "org.opencontainers.image.ref.name": tag },
    }));
    let index = serde_json::json!({ "schemaVersion": 2, "manifests": manifests });
    std::fs::write(&index_path, serde_json::to_vec(&index).expect("index")).expect("index.json");
}

/// Pushes image `tag` of `layout` to `reference` (`127.0.0.1:PORT/name:tag`) over plain HTTP.
pub fn push(layout: &Path, tag: &str, reference: &str) {
    let out = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{reference}"))
        .output()
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo copy of {tag} to {reference} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A reader of `len` deterministic, incompressible bytes (xorshift64*), fast enough to stream
/// a gigabyte into a layer in a few seconds.
pub struct RandomReader {
    state: u64,
    left: u64,
    /// Bytes of the current word not handed out yet.
    word: [u8; 8],
    used: usize,
}

impl RandomReader {
    pub fn new(len: u64, seed: u64) -> RandomReader {
        RandomReader {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            left: len,
            word: [0; 8],
            used: 8,
        }
    }

    fn next_word(&mut self) -> [u8; 8] {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes()
    }
}

impl Read for RandomReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let mut i = 0;
        while i < n {
            if self.used == 8 {
                if n - i >= 8 {
                    buf[i..i + 8].copy_from_slice(&self.next_word());
                    i += 8;
                    continue;
                }
                self.word = self.next_word();
                self.used = 0;
            }
            buf[i] = self.word[self.used];
            self.used += 1;
            i += 1;
        }
        self.left -= n as u64;
        Ok(n)
    }
}
