//! Indexing an image's gzip layers and publishing the indexes (`lazysnap index`): each gzip
//! layer over a size threshold is streamed once from the registry (checked against its
//! digest as it goes) and indexed (`format::gzip_index::build`); `push` stores the indexes
//! in the image's repository as one OCI artifact whose `subject` is the image manifest, and
//! adds it to the referrers tag schema's `sha256-<hex>` index, for registries without the
//! OCI 1.1 referrers API. The image itself is never written.

use std::collections::HashMap;
use std::io::{Read, Seek, Write};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::gzip_lookup::{fallback_tag, image_manifest, LookupError};
use crate::format::gzip_index::build::{self, BuildError, TracedRange};
use crate::format::gzip_index::zran::Cuts;
use crate::format::gzip_index::{
    ARTIFACT_TYPE, ARTIFACT_TYPE_V1, INDEXES_ANNOTATION, INDEX_MEDIA_TYPE, INDEX_MEDIA_TYPE_V1,
    LAYER_ANNOTATION, NOT_INDEXED_ANNOTATION, WINDOWS_MEDIA_TYPE,
};
use crate::metadata::Limits;
use crate::registry::{Manifest, Reference, RegistryClient, RegistryError};

/// Layers smaller than this are left out by default: fetching them whole is about as quick
/// as one lazy read (SOCI's threshold too).
pub const DEFAULT_MIN_LAYER_BYTES: u64 = 10 << 20;
/// Bytes of a layer fetched per range request while streaming it.
const STREAM_PIECE: u64 = 8 << 20;
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";

/// Why an image could not be indexed or its index not published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the image")]
    Image(#[from] LookupError),
    #[error("the registry")]
    Registry(#[from] RegistryError),
    #[error("the image manifest is not valid: {0}")]
    Manifest(String),
    #[error("layer {layer}")]
    Build {
        layer: String,
        #[source]
        source: BuildError,
    },
    #[error("layer {layer}: its bytes hash to {actual}, not to its digest")]
    LayerDigest { layer: String, actual: String },
    #[error("indexing task failed: {0}")]
    Task(String),
    #[error("encoding the index")]
    Encode(#[source] std::io::Error),
    #[error("keeping layer {layer} in a temporary file for its second pass")]
    Spool {
        layer: String,
        #[source]
        source: std::io::Error,
    },
}

/// How to index.
#[derive(Debug, Clone, Copy)]
pub struct IndexOptions {
    /// Uncompressed bytes between resume points.
    pub span: u64,
    /// Layers smaller than this (compressed) are listed as not indexed.
    pub min_layer_bytes: u64,
    pub limits: Limits,
}

impl Default for IndexOptions {
    fn default() -> Self {
        IndexOptions {
            span: build::DEFAULT_SPAN,
            min_layer_bytes: DEFAULT_MIN_LAYER_BYTES,
            limits: Limits::default(),
        }
    }
}

/// One layer's outcome.
#[derive(Debug, Clone)]
pub struct LayerReport {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    /// The encoded index; `None` when the layer was left out.
    pub index: Option<Bytes>,
    /// Its windows blob (the index names it by digest).
    pub windows: Option<Bytes>,
    /// Why it was left out.
    pub skipped: Option<String>,
    pub spans: usize,
    pub entries: usize,
    /// Resume points put before traced ranges (`--trace`).
    pub traced_points: usize,
    pub took: Duration,
}

/// An indexed image.
#[derive(Debug, Clone)]
pub struct ImageReport {
    pub manifest: Manifest,
    pub layers: Vec<LayerReport>,
}

#[derive(Deserialize)]
struct LayerDescriptor {
    #[serde(rename = "mediaType")]
    media_type: String,
    digest: String,
    size: u64,
}

#[derive(Deserialize)]
struct ImageManifest {
    #[serde(default)]
    layers: Vec<LayerDescriptor>,
}

/// Indexes every gzip layer of the image `reference` names.
pub async fn index_image(
    registry: &RegistryClient,
    reference: &Reference,
    options: IndexOptions,
) -> Result<ImageReport, PublishError> {
    index_image_traced(registry, reference, options, &HashMap::new()).await
}

/// [`index_image`], with resume points before the ranges `traced` lists per layer digest
/// (what containers read first, from read traces): a layer with any is read twice, the
/// second time from a temporary file, once its block boundaries are known.
pub async fn index_image_traced(
    registry: &RegistryClient,
    reference: &Reference,
    options: IndexOptions,
    traced: &HashMap<String, Vec<TracedRange>>,
) -> Result<ImageReport, PublishError> {
    let manifest = image_manifest(registry, reference).await?;
    let parsed: ImageManifest = serde_json::from_slice(&manifest.bytes)
        .map_err(|e| PublishError::Manifest(e.to_string()))?;
    let mut layers = Vec::new();
    for layer in parsed.layers {
        let started = Instant::now();
        let mut report = LayerReport {
            digest: layer.digest.clone(),
            media_type: layer.media_type.clone(),
            size: layer.size,
            index: None,
            windows: None,
            skipped: None,
            spans: 0,
            entries: 0,
            traced_points: 0,
            took: Duration::ZERO,
        };
        if !layer.media_type.contains("gzip") {
            report.skipped = Some("not gzip".into());
        } else if layer.size < options.min_layer_bytes {
            report.skipped = Some(format!("smaller than {} bytes", options.min_layer_bytes));
        } else {
            let ranges = traced.get(&layer.digest).cloned().unwrap_or_default();
            match index_layer(registry, reference, &layer, options, ranges).await {
                Ok((index, traced_points)) => {
                    report.traced_points = traced_points;
                    report.spans = index.checkpoints.len();
                    report.entries = index.entries.len();
                    // Compressing a few hundred windows one by one at a high level is
                    // CPU work: off the async workers.
                    let encoded = tokio::task::spawn_blocking(move || index.encode())
                        .await
                        .map_err(|e| PublishError::Task(e.to_string()))?
                        .map_err(PublishError::Encode)?;
                    report.index = Some(Bytes::from(encoded.index));
                    report.windows = Some(Bytes::from(encoded.windows));
                }
                // A layer that cannot be indexed (a tar entry type the index cannot hold,
                // a name that is not UTF-8, a span over the limits) is pulled whole; the
                // others stay lazy.
                Err(e @ PublishError::Build { .. }) => {
                    report.skipped = Some(format!("cannot be indexed: {}", crate::error_chain(&e)));
                }
                Err(e) => return Err(e),
            }
        }
        report.took = started.elapsed();
        layers.push(report);
    }
    Ok(ImageReport { manifest, layers })
}

/// Streams one layer (range requests in order, fed to a blocking indexer through a small
/// channel, so fetching and inflating overlap) and checks its digest at the end. With
/// `ranges`, the bytes are also kept in a temporary file, and indexed a second time from it
/// with cuts for them; returns the index and the resume points added for them.
async fn index_layer(
    registry: &RegistryClient,
    reference: &Reference,
    layer: &LayerDescriptor,
    options: IndexOptions,
    ranges: Vec<TracedRange>,
) -> Result<(crate::format::gzip_index::file::GzipIndex, usize), PublishError> {
    let (tx, rx) = mpsc::sync_channel::<Result<Bytes, std::io::Error>>(4);
    let digest = layer.digest.clone();
    let size = layer.size;
    let indexer = tokio::task::spawn_blocking(move || {
        let mut reader = ChannelReader {
            rx,
            current: Bytes::new(),
            hasher: Sha256::new(),
        };
        // Outer error: the temporary file; inner: the layer.
        let built = if ranges.is_empty() {
            Ok(
                build::build(&digest, size, &mut reader, options.span, &options.limits)
                    .map(|index| (index, 0)),
            )
        } else {
            index_twice(&digest, size, &mut reader, &ranges, options)
        };
        // Whatever the inflater did not need (nothing, for a well-formed layer) still counts
        // for the digest.
        let drained = std::io::copy(&mut reader, &mut std::io::sink());
        let actual = format!("sha256:{}", hex::encode(reader.hasher.finalize()));
        (built, drained, actual)
    });
    let mut offset = 0;
    let mut failed = None;
    while offset < size {
        let end = (offset + STREAM_PIECE).min(size);
        match registry
            .read_range(reference, &layer.digest, offset..end)
            .await
        {
            Ok(bytes) => {
                if tx.send(Ok(bytes)).is_err() {
                    break;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(std::io::Error::other(crate::error_chain(&e))));
                failed = Some(e);
                break;
            }
        }
        offset = end;
    }
    drop(tx);
    let (built, _, actual) = indexer
        .await
        .map_err(|e| PublishError::Task(e.to_string()))?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    let built = built.map_err(|source| PublishError::Spool {
        layer: layer.digest.clone(),
        source,
    })?;
    let index = built.map_err(|source| PublishError::Build {
        layer: layer.digest.clone(),
        source,
    })?;
    if actual != layer.digest {
        return Err(PublishError::LayerDigest {
            layer: layer.digest.clone(),
            actual,
        });
    }
    Ok(index)
}

/// The first pass over `blob` (kept in a temporary file as it goes by) finds the stream's
/// block boundaries and the files' offsets; the second, from that file, cuts the stream for
/// `ranges`. The outer error is the temporary file's. Blocking.
fn index_twice(
    digest: &str,
    size: u64,
    blob: &mut impl Read,
    ranges: &[TracedRange],
    options: IndexOptions,
) -> std::io::Result<Result<(crate::format::gzip_index::file::GzipIndex, usize), BuildError>> {
    let mut spool = tempfile::tempfile()?;
    let mut tee = Tee {
        inner: blob,
        copy: std::io::BufWriter::new(&mut spool),
    };
    let first = build::build_with(
        digest,
        size,
        &mut tee,
        options.span,
        &options.limits,
        Cuts::default(),
    );
    tee.copy.flush()?;
    drop(tee);
    let first = match first {
        Ok(first) => first,
        Err(e) => return Ok(Err(e)),
    };
    let cuts = build::plan_cuts(&first.index, &first.boundaries, ranges);
    let points = cuts.points.len();
    spool.rewind()?;
    Ok(build::build_with(
        digest,
        size,
        std::io::BufReader::new(spool),
        options.span,
        &options.limits,
        cuts,
    )
    .map(|second| (second.index, points)))
}

/// A reader that writes what it reads to `copy`.
struct Tee<R, W> {
    inner: R,
    copy: W,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.copy.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// The bytes sent by the fetching task, hashed as they are read.
struct ChannelReader {
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
    current: Bytes,
    hasher: Sha256,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.recv() {
                Ok(Ok(bytes)) => self.current = bytes,
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        let piece = self.current.split_to(n);
        self.hasher.update(&piece);
        buf[..n].copy_from_slice(&piece);
        Ok(n)
    }
}

/// What `push` stored.
#[derive(Debug, Clone)]
pub struct Pushed {
    /// The artifact manifest's digest.
    pub artifact: String,
    /// The referrers tag updated.
    pub tag: String,
}

/// Stores the image's indexes as one artifact referring to the image manifest, and lists it
/// under the referrers fallback tag (replacing earlier gzip indexes of the same type there).
/// A report without windows blobs (indexes of version 2, their windows inside) is pushed as
/// the previous build pushed it, under its artifact type.
pub async fn push(
    registry: &RegistryClient,
    reference: &Reference,
    report: &ImageReport,
) -> Result<Pushed, PublishError> {
    let legacy = report.layers.iter().all(|l| l.windows.is_none());
    let (artifact_type, index_type) = if legacy {
        (ARTIFACT_TYPE_V1, INDEX_MEDIA_TYPE_V1)
    } else {
        (ARTIFACT_TYPE, INDEX_MEDIA_TYPE)
    };
    let empty = registry
        .push_blob(reference, Bytes::from_static(b"{}"))
        .await?;
    let mut layers = Vec::new();
    let mut not_indexed = Vec::new();
    let mut indexes = Vec::new();
    for layer in &report.layers {
        let Some(index) = &layer.index else {
            not_indexed.push(layer.digest.clone());
            continue;
        };
        // The windows first: an index is never there before the blob it names.
        if let Some(windows) = &layer.windows {
            let digest = registry.push_blob(reference, windows.clone()).await?;
            layers.push(serde_json::json!({
                "mediaType": WINDOWS_MEDIA_TYPE,
                "digest": digest,
                "size": windows.len(),
                "annotations": { LAYER_ANNOTATION: layer.digest },
            }));
        }
        let digest = registry.push_blob(reference, index.clone()).await?;
        indexes.push(format!("{}={digest}:{}", layer.digest, index.len()));
        layers.push(serde_json::json!({
            "mediaType": index_type,
            "digest": digest,
            "size": index.len(),
            "annotations": { LAYER_ANNOTATION: layer.digest },
        }));
    }
    let subject_type = if report.manifest.media_type.is_empty() {
        OCI_MANIFEST.to_owned()
    } else {
        report.manifest.media_type.clone()
    };
    let mut annotations = serde_json::Map::new();
    annotations.insert(
        NOT_INDEXED_ANNOTATION.into(),
        serde_json::Value::String(not_indexed.join(",")),
    );
    if !legacy {
        annotations.insert(
            INDEXES_ANNOTATION.into(),
            serde_json::Value::String(indexes.join(",")),
        );
    }
    let artifact = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": { "mediaType": EMPTY_MEDIA_TYPE, "digest": empty, "size": 2 },
        "layers": layers,
        "subject": {
            "mediaType": subject_type,
            "digest": report.manifest.digest,
            "size": report.manifest.bytes.len(),
        },
        "annotations": &annotations,
    });
    let bytes = Bytes::from(
        serde_json::to_vec(&artifact).map_err(|e| PublishError::Manifest(e.to_string()))?,
    );
    let size = bytes.len();
    let digest = crate::registry::sha256_digest(&bytes);
    registry
        .put_manifest(reference, &digest, OCI_MANIFEST, bytes)
        .await?;
    let tag = fallback_tag(&report.manifest.digest);
    let mut listing: serde_json::Value = match registry.get_manifest(reference, &tag, 4 << 20).await
    {
        Ok(m) => serde_json::from_slice(&m.bytes).unwrap_or(serde_json::Value::Null),
        Err(e) if e.is_not_found() => serde_json::Value::Null,
        Err(e) => return Err(e.into()),
    };
    if !listing.is_object() {
        listing =
            serde_json::json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [] });
    }
    let mut manifests: Vec<serde_json::Value> = listing
        .get("manifests")
        .and_then(|m| m.as_array())
        .cloned()
        .unwrap_or_default();
    // Earlier gzip indexes of this type are superseded; other referrers stay, the previous
    // build's indexes too (they still serve its daemons, which do not read this type).
    manifests.retain(|d| d.get("artifactType").and_then(|t| t.as_str()) != Some(artifact_type));
    // The artifact's annotations, as the referrers API would list them.
    manifests.push(serde_json::json!({
        "mediaType": OCI_MANIFEST,
        "digest": digest,
        "size": size,
        "artifactType": artifact_type,
        "annotations": annotations,
    }));
    listing["manifests"] = serde_json::Value::Array(manifests);
    let listing = Bytes::from(
        serde_json::to_vec(&listing).map_err(|e| PublishError::Manifest(e.to_string()))?,
    );
    registry
        .put_manifest(reference, &tag, OCI_INDEX, listing)
        .await?;
    Ok(Pushed {
        artifact: digest,
        tag,
    })
}
