//! Builds OCI images by hand — every layer a gzip tar written entry by entry — so tests control
//! exactly what a layer holds: whiteouts, opaque directories, hard links, devices, xattrs,
//! owners. Pushed to the test registry with skopeo.

use std::io::Write;
use std::path::Path;

use sha2::{Digest, Sha256};

/// One tar entry of a layer.
#[derive(Debug, Clone)]
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
        uid: u64,
        gid: u64,
    },
    File {
        path: String,
        mode: u32,
        uid: u64,
        gid: u64,
        data: Vec<u8>,
        xattrs: Vec<(String, Vec<u8>)>,
    },
    Symlink {
        path: String,
        target: String,
    },
    Hardlink {
        path: String,
        target: String,
    },
    CharDevice {
        path: String,
        major: u32,
        minor: u32,
    },
    Fifo {
        path: String,
    },
}

impl Entry {
    pub fn dir(path: &str) -> Entry {
        Entry::Dir {
            path: path.into(),
            mode: 0o755,
            uid: 0,
            gid: 0,
        }
    }
    pub fn file(path: &str, data: impl Into<Vec<u8>>) -> Entry {
        Entry::File {
            path: path.into(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            data: data.into(),
            xattrs: vec![],
        }
    }
    pub fn symlink(path: &str, target: &str) -> Entry {
        Entry::Symlink {
            path: path.into(),
            target: target.into(),
        }
    }
    /// A whiteout: hides `path` of lower layers.
    pub fn whiteout(path: &str) -> Entry {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        Entry::file(&format!("{dir}/.wh.{name}"), Vec::new())
    }
    /// Makes directory `dir` opaque: lower layers' contents of it are hidden.
    pub fn opaque(dir: &str) -> Entry {
        Entry::file(&format!("{dir}/.wh..wh..opq"), Vec::new())
    }
}

/// An image: layers (lowest first) and the command to run.
#[derive(Debug, Clone, Default)]
pub struct ImageSpec {
    pub layers: Vec<Vec<Entry>>,
    /// Layers given as finished blobs (e.g. hand-made eStargz), stacked above `layers`.
    pub blobs: Vec<BlobLayer>,
    pub cmd: Vec<String>,
}

/// A finished gzip layer blob with its diff ID and descriptor annotations.
#[derive(Debug, Clone)]
pub struct BlobLayer {
    pub blob: Vec<u8>,
    pub diff_id: String,
    pub annotations: Vec<(String, String)>,
}

impl From<super::estargz::Layer> for BlobLayer {
    fn from(l: super::estargz::Layer) -> Self {
        BlobLayer {
            blob: l.blob,
            diff_id: l.diff_id,
            annotations: vec![(
                "containerd.io/snapshot/stargz/toc.digest".into(),
                l.toc_digest,
            )],
        }
    }
}

/// Deterministic, incompressible-looking bytes, so layer sizes are realistic.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// A layer with busybox and links for `super::APPLETS` under /bin: the base of test images.
pub fn busybox_layer() -> Vec<Entry> {
    let busybox =
        std::fs::read("/bin/busybox").expect("read /bin/busybox (package busybox-static)");
    let mut entries = vec![
        Entry::dir("bin"),
        Entry::File {
            path: "bin/busybox".into(),
            mode: 0o755,
            uid: 0,
            gid: 0,
            data: busybox,
            xattrs: vec![],
        },
        Entry::dir("tmp"),
        Entry::dir("etc"),
    ];
    for applet in super::APPLETS {
        entries.push(Entry::symlink(&format!("bin/{applet}"), "busybox"));
    }
    entries
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn header(kind: tar::EntryType, mode: u32, uid: u64, gid: u64, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    h
}

/// The uncompressed tar of one layer.
fn layer_tar(entries: &[Entry]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        match entry {
            Entry::Dir {
                path,
                mode,
                uid,
                gid,
            } => {
                let mut h = header(tar::EntryType::Directory, *mode, *uid, *gid, 0);
                builder
                    .append_data(&mut h, format!("{path}/"), std::io::empty())
                    .expect("tar dir");
            }
            Entry::File {
                path,
                mode,
                uid,
                gid,
                data,
                xattrs,
            } => {
                if !xattrs.is_empty() {
                    let pax: Vec<(String, &[u8])> = xattrs
                        .iter()
                        .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice()))
                        .collect();
                    builder
                        .append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), *v)))
                        .expect("tar pax");
                }
                let mut h = header(
                    tar::EntryType::Regular,
                    *mode,
                    *uid,
                    *gid,
                    data.len() as u64,
                );
                builder
                    .append_data(&mut h, path, data.as_slice())
                    .expect("tar file");
            }
            Entry::Symlink { path, target } => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0, 0, 0);
                builder
                    .append_link(&mut h, path, target)
                    .expect("tar symlink");
            }
            Entry::Hardlink { path, target } => {
                let mut h = header(tar::EntryType::Link, 0o644, 0, 0, 0);
                builder
                    .append_link(&mut h, path, target)
                    .expect("tar hardlink");
            }
            Entry::CharDevice { path, major, minor } => {
                let mut h = header(tar::EntryType::Char, 0o666, 0, 0, 0);
                h.set_device_major(*major).expect("major");
                h.set_device_minor(*minor).expect("minor");
                builder
                    .append_data(&mut h, path, std::io::empty())
                    .expect("tar char");
            }
            Entry::Fifo { path } => {
                let mut h = header(tar::EntryType::Fifo, 0o644, 0, 0, 0);
                builder
                    .append_data(&mut h, path, std::io::empty())
                    .expect("tar fifo");
            }
        }
    }
    builder.into_inner().expect("finish tar")
}

fn write_blob(layout: &Path, data: &[u8]) -> String {
    let hex = sha256_hex(data);
    std::fs::write(layout.join("blobs/sha256").join(&hex), data).expect("write blob");
    format!("sha256:{hex}")
}

/// Writes `spec` as an OCI image layout in `layout` under tag `tag`.
pub fn write_layout(spec: &ImageSpec, layout: &Path, tag: &str) {
    std::fs::create_dir_all(layout.join("blobs/sha256")).expect("create layout");
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("oci-layout");
    let mut diff_ids = Vec::new();
    let mut layers = Vec::new();
    for entries in &spec.layers {
        let tar = layer_tar(entries);
        diff_ids.push(format!("sha256:{}", sha256_hex(&tar)));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&tar).expect("gzip");
        let compressed = gz.finish().expect("gzip finish");
        let digest = write_blob(layout, &compressed);
        layers.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest,
            "size": compressed.len(),
        }));
    }
    for layer in &spec.blobs {
        diff_ids.push(layer.diff_id.clone());
        let digest = write_blob(layout, &layer.blob);
        let annotations: serde_json::Map<String, serde_json::Value> = layer
            .annotations
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        layers.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest,
            "size": layer.blob.len(),
            "annotations": annotations,
        }));
    }
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Cmd": spec.cmd, "Env": ["PATH=/bin"] },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    let config = serde_json::to_vec(&config).expect("config json");
    let config_digest = write_blob(layout, &config);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": layers,
    });
    let manifest = serde_json::to_vec(&manifest).expect("manifest json");
    let manifest_digest = write_blob(layout, &manifest);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": { "org.opencontainers.image.ref.name": tag },
        }],
    });
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).expect("index"),
    )
    .expect("index.json");
}

/// Pushes busybox (plain gzip) under the ready-made layer `top` to `stack`'s registry as
/// `name:1`; its reference.
pub fn push_over_busybox(stack: &super::Stack, name: &str, top: BlobLayer) -> String {
    let spec = ImageSpec {
        layers: vec![busybox_layer()],
        blobs: vec![top],
        cmd: vec!["/bin/sh".into()],
    };
    let reference = stack.image_ref(&format!("{name}:1"));
    push(&spec, &stack.dir, &reference);
    reference
}

/// Pushes `spec` to `reference` (`127.0.0.1:PORT/name:tag`) over plain HTTP.
pub fn push(spec: &ImageSpec, scratch: &Path, reference: &str) {
    let layout = scratch.join(format!("layout-{}", sha256_hex(reference.as_bytes())));
    let _ = std::fs::remove_dir_all(&layout);
    write_layout(spec, &layout, "latest");
    super::layout::push(&layout, "latest", reference);
}

/// The standard three-layer test image: busybox; a tree with every kind of entry; an upper
/// layer with a whiteout, an opaque directory and a modified file.
pub fn standard_image() -> ImageSpec {
    let layer2 = vec![
        Entry::dir("data"),
        Entry::file("data/small.txt", "hello from layer 2\n"),
        Entry::file("data/big.bin", pseudo_random(3 << 20, 2)),
        Entry::file("data/empty", Vec::new()),
        Entry::file("data/gone", "deleted by a whiteout above\n"),
        Entry::file("data/modified", "original\n"),
        Entry::symlink("data/link-to-small", "small.txt"),
        Entry::symlink("data/dangling", "/nowhere"),
        Entry::Hardlink {
            path: "data/hardlink".into(),
            target: "data/small.txt".into(),
        },
        Entry::File {
            path: "data/setuid".into(),
            mode: 0o4755,
            uid: 0,
            gid: 0,
            data: b"#!/bin/sh\n".to_vec(),
            xattrs: vec![],
        },
        Entry::File {
            path: "data/owned".into(),
            mode: 0o640,
            uid: 1000,
            gid: 1001,
            data: b"owned by 1000:1001\n".to_vec(),
            xattrs: vec![],
        },
        Entry::File {
            path: "data/xattr".into(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            data: b"has an xattr\n".to_vec(),
            xattrs: vec![("user.lazysnap".into(), b"yes".to_vec())],
        },
        Entry::Dir {
            path: "data/private".into(),
            mode: 0o700,
            uid: 1000,
            gid: 1000,
        },
        Entry::Fifo {
            path: "data/fifo".into(),
        },
        Entry::CharDevice {
            path: "data/null".into(),
            major: 1,
            minor: 3,
        },
        Entry::dir("data/opaque"),
        Entry::file("data/opaque/old1", "hidden by opaque\n"),
        Entry::file("data/opaque/old2", "hidden by opaque\n"),
        Entry::dir("data/deep"),
        Entry::dir("data/deep/a"),
        Entry::dir("data/deep/a/b"),
        Entry::file("data/deep/a/b/c.txt", "deep file\n"),
    ];
    let layer3 = vec![
        Entry::dir("data"),
        Entry::whiteout("data/gone"),
        Entry::dir("data/opaque"),
        Entry::opaque("data/opaque"),
        Entry::file("data/opaque/new", "the only file left in opaque\n"),
        Entry::file("data/modified", "modified in layer 3\n"),
        Entry::file("top.txt", "layer 3\n"),
    ];
    ImageSpec {
        layers: vec![busybox_layer(), layer2, layer3],
        blobs: Vec::new(),
        cmd: vec!["/bin/sh".into()],
    }
}
