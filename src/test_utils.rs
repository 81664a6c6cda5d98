//! Test helpers shared by unit tests: layer fixtures served from memory, and the one chain
//! fixture → probe → format → opened layer that tests of the reader, the index and the
//! formats all start from.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::format::{
    BlobError, BlobSource, BoxFuture, Formats, LayerHints, Opened, Probe, Resolved, MAX_FOOTER,
};

/// A layer blob served from memory, counting requests; can be told to lie or fail.
#[derive(Debug, Default)]
pub struct FixtureBlob {
    pub blob: Vec<u8>,
    pub requests: AtomicUsize,
    /// Flip a byte in the middle of every answer.
    pub corrupt: bool,
    /// Answer every request with an error.
    pub fail: bool,
    /// How long each answer takes (on tokio's clock).
    pub delay: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("registry unavailable")]
struct Unavailable;

impl BlobSource for FixtureBlob {
    fn read_range(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, BlobError>> {
        Box::pin(async move {
            self.requests.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            if self.fail {
                return Err(BlobError {
                    range,
                    source: Arc::new(Unavailable),
                });
            }
            let mut bytes = self.blob[range.start as usize..range.end as usize].to_vec();
            if self.corrupt {
                let mid = bytes.len() / 2;
                bytes[mid] ^= 0x55;
            }
            Ok(Bytes::from(bytes))
        })
    }
}

/// The blob of fixture `name` (`tests/fixtures/<name>.blob`) and its descriptor's annotations.
pub fn fixture(name: &str) -> (Vec<u8>, BTreeMap<String, String>) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/");
    let blob = std::fs::read(format!("{dir}{name}.blob")).expect("fixture blob");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{dir}{name}.json")).expect("fixture json"))
            .expect("fixture json parses");
    let annotations = meta["annotations"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    (blob, annotations)
}

/// Resolves `blob` through `formats` as the daemon would; returns the format's name too.
pub async fn resolve(
    formats: &Formats,
    blob: &FixtureBlob,
    annotations: &BTreeMap<String, String>,
) -> (String, Resolved) {
    let size = blob.blob.len() as u64;
    let tail = Bytes::copy_from_slice(&blob.blob[size.saturating_sub(MAX_FOOTER) as usize..]);
    let probe = Probe {
        hints: LayerHints {
            digest: "sha256:fixture",
            annotations,
            external: None,
        },
        blob_size: size,
        tail_offset: size - tail.len() as u64,
        tail,
        blob,
    };
    for format in formats.iter() {
        if format.accepts(&probe.hints).is_err() {
            continue;
        }
        if let Some(resolved) = format.resolve(&probe).await.expect("resolves") {
            return (format.name().to_owned(), resolved);
        }
    }
    panic!("no format claims the fixture");
}

/// Fixture `name` served from memory, and the layer opened over it with the built-in formats.
pub async fn open_fixture(name: &str) -> (Arc<FixtureBlob>, Opened) {
    let (bytes, annotations) = fixture(name);
    let blob = Arc::new(FixtureBlob {
        blob: bytes,
        ..FixtureBlob::default()
    });
    let formats = Formats::builtin();
    let (format, resolved) = resolve(&formats, &blob, &annotations).await;
    let opened = formats
        .by_name(&format)
        .expect("format")
        .open(&resolved)
        .expect("opens");
    blob.requests.store(0, Ordering::SeqCst);
    (blob, opened)
}

/// A gzip tar of `files` (regular files owned by root, mode 0644, mtime 0) at `level`, and
/// its digest.
pub fn gzip_tar(files: &[(String, Vec<u8>)], level: flate2::Compression) -> (Vec<u8>, String) {
    use sha2::{Digest as _, Sha256};
    use std::io::Write as _;
    let mut tar = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        tar.append_data(&mut h, name, &data[..]).expect("file");
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), level);
    gz.write_all(&tar.into_inner().expect("tar")).expect("gzip");
    let blob = gz.finish().expect("gzip");
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&blob)));
    (blob, digest)
}

/// A gzip tar of `files` indexed with resume points every `span` bytes, opened as a
/// gzip-index layer: (blob, layer digest, opened layer).
pub fn gzip_index_layer(
    files: &[(String, Vec<u8>)],
    span: u64,
) -> (
    Vec<u8>,
    String,
    crate::format::Opened,
    std::sync::Arc<FixtureBlob>,
) {
    use crate::format::gzip_index::{build::build, GzipIndexFormat};
    use crate::format::{LayerFormat, Resolved};
    use sha2::{Digest as _, Sha256};
    let (blob, digest) = gzip_tar(files, flate2::Compression::default());
    let index = build(
        &digest,
        blob.len() as u64,
        &blob[..],
        span,
        &Default::default(),
    )
    .expect("index");
    let encoded = index.encode().expect("encode");
    let opened = GzipIndexFormat::default()
        .open(&Resolved {
            params: serde_json::json!({
                "index_digest": format!("sha256:{}", hex::encode(Sha256::digest(&encoded.index))),
            }),
            index: encoded.index,
        })
        .expect("open");
    let windows = std::sync::Arc::new(FixtureBlob {
        blob: encoded.windows,
        ..FixtureBlob::default()
    });
    (blob, digest, opened, windows)
}
