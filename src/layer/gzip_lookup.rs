//! Finding a layer's gzip index in the registry, once per image: the image's manifest (for
//! a multi-platform index, the manifest for this machine's platform), the artifacts that
//! refer to it (the OCI 1.1 referrers API, else the referrers tag schema's
//! `sha256-<hex>` tag), the newest gzip-index artifact among them, fetched by digest and
//! checked against it, whose `subject` must be that manifest. Each layer's index blob is
//! then fetched by the digest the artifact gives and checked against it.
//!
//! What is found (or not) is kept per image reference for [`KEEP_FOR`], so the Prepares of
//! one image's layers cost one lookup; a layer's own Prepare fetches only its index blob.
//! Once an image's artifact is known, its layers' index blobs are fetched ahead, a few at a
//! time and within [`AHEAD_BYTES`] in all, so that the Prepares containerd sends one after
//! another find them there (or wait for the request under way) instead of each paying a
//! round trip and a transfer while earlier layers' prefetch holds the link, as the suffixes
//! of eStargz layers are fetched ahead (`resolve`). Each blob is checked against its digest
//! as ever.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::{OnceCell, OwnedSemaphorePermit, Semaphore};

use crate::format::gzip_index::{
    ARTIFACT_TYPE, ARTIFACT_TYPE_V1, INDEXES_ANNOTATION, INDEX_MEDIA_TYPE, INDEX_MEDIA_TYPE_V1,
    LAYER_ANNOTATION, NOT_INDEXED_ANNOTATION,
};
use crate::format::ExternalIndex;
use crate::registry::{Manifest, Reference, RegistryClient, RegistryError};

/// How long an image's lookup (found or not) is reused.
pub const KEEP_FOR: Duration = Duration::from_secs(120);
/// Images whose lookups are kept at once.
const MAX_IMAGES: usize = 256;
/// The largest manifest, image index or referrers listing read.
const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// The largest index blob fetched (its decompressed size is bounded by `[limits]
/// max_toc_bytes` when it is decoded).
pub const MAX_INDEX_BLOB_BYTES: u64 = 64 << 20;
/// Children of a multi-platform index looked at.
const MAX_PLATFORMS: usize = 64;
/// Index blobs fetched ahead and not yet taken by their layer's Prepare hold at most this
/// much memory in all (a blob bigger than its descriptor says is refused by the fetch).
pub const AHEAD_BYTES: u64 = 32 << 20;
/// Index blobs fetched ahead at once.
const AHEAD_CONCURRENCY: usize = 4;
/// Index blobs a referrers listing may have fetched before its artifact manifest is there.
const MAX_SPECULATED: usize = 256;

/// An index blob fetched ahead (with its share of [`AHEAD_BYTES`]), or by the Prepare that
/// came first; `None` when fetching it failed (the Prepare then fetches it itself).
type Ahead = Arc<OnceCell<Option<(Bytes, Option<OwnedSemaphorePermit>)>>>;

/// What the registry holds for one layer.
#[derive(Debug)]
pub enum Lookup {
    /// Its index, checked against the digest the image's artifact gives, and the layer's
    /// size as the image manifest gives it.
    Found(ExternalIndex, Option<u64>),
    /// The image's index lists the layer as left out (too small, or not gzip).
    NotIndexed,
    /// No index for it, and why.
    Missing(String),
}

#[derive(Debug, Default)]
struct ImageIndexes {
    /// layer digest → its index blob's digest.
    layers: HashMap<String, String>,
    not_indexed: HashSet<String>,
    /// layer digest → its size, from the image manifest.
    sizes: HashMap<String, u64>,
    /// layer digest → its index blob's size, from the artifact manifest, in layer order.
    index_sizes: Vec<(String, u64)>,
    /// layer digest → its index blob, fetched ahead; taken by the layer's Prepare.
    ahead: Mutex<HashMap<String, Ahead>>,
    /// Why the image has no usable index, when it has none.
    none: Option<String>,
    /// Index blobs whose fetch the referrers listing started, that the artifact names.
    speculated: usize,
}

/// Why a lookup failed.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("{0}")]
    Invalid(String),
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(default, rename = "mediaType")]
    media_type: String,
    digest: String,
    #[serde(default, rename = "artifactType")]
    artifact_type: Option<String>,
    #[serde(default)]
    annotations: HashMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
    #[serde(default)]
    size: Option<u64>,
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

#[derive(Deserialize)]
struct Document {
    #[serde(default, rename = "mediaType")]
    media_type: Option<String>,
    #[serde(default, rename = "artifactType")]
    artifact_type: Option<String>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    subject: Option<Descriptor>,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

type Cell = Arc<OnceCell<Arc<ImageIndexes>>>;

/// Lookups of images' gzip indexes, shared by every Prepare.
pub struct IndexLookup {
    registry: RegistryClient,
    images: Mutex<HashMap<String, (Instant, Cell)>>,
    /// KiB of index blobs held ahead ([`AHEAD_BYTES`]).
    ahead_budget: Arc<Semaphore>,
    ahead_requests: Arc<Semaphore>,
}

/// The referrers tag schema's tag for `digest`: `sha256-<hex>`.
pub fn fallback_tag(digest: &str) -> String {
    digest.replacen(':', "-", 1)
}

/// The OCI architecture name of this machine.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

impl IndexLookup {
    pub fn new(registry: RegistryClient) -> Self {
        IndexLookup {
            registry,
            images: Mutex::default(),
            ahead_budget: Arc::new(Semaphore::new((AHEAD_BYTES >> 10) as usize)),
            ahead_requests: Arc::new(Semaphore::new(AHEAD_CONCURRENCY)),
        }
    }

    /// The index of `layer` of the image pulled as `reference`.
    pub async fn find(&self, reference: &Reference, layer: &str) -> Lookup {
        let image = self.image(reference).await;
        if image.not_indexed.contains(layer) {
            return Lookup::NotIndexed;
        }
        let Some(digest) = image.layers.get(layer) else {
            return Lookup::Missing(
                image.none.clone().unwrap_or_else(|| {
                    "the image's gzip index does not cover this layer".to_owned()
                }),
            );
        };
        let ahead = image
            .ahead
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(layer);
        if let Some(cell) = ahead {
            let got = cell
                .get_or_init(|| async {
                    self.registry
                        .get_blob(reference, digest, MAX_INDEX_BLOB_BYTES)
                        .await
                        .ok()
                        .map(|b| (b, None))
                })
                .await;
            if let Some((bytes, _)) = got {
                tracing::debug!(layer, "using the gzip index fetched ahead");
                return Lookup::Found(
                    ExternalIndex {
                        digest: digest.clone(),
                        bytes: bytes.clone(),
                    },
                    image.sizes.get(layer).copied(),
                );
            }
        }
        match self
            .registry
            .get_blob(reference, digest, MAX_INDEX_BLOB_BYTES)
            .await
        {
            Ok(bytes) => Lookup::Found(
                ExternalIndex {
                    digest: digest.clone(),
                    bytes,
                },
                image.sizes.get(layer).copied(),
            ),
            Err(e) => Lookup::Missing(format!(
                "fetching its gzip index {digest}: {}",
                crate::error_chain(&e)
            )),
        }
    }

    /// Whether the image's lookup is done and found an index (without waiting or asking).
    pub fn has_index(&self, reference: &Reference) -> bool {
        let images = self.images.lock().unwrap_or_else(|p| p.into_inner());
        images
            .get(&reference.to_string())
            .and_then(|(_, cell)| cell.get())
            .is_some_and(|found| !found.layers.is_empty())
    }

    async fn image(&self, reference: &Reference) -> Arc<ImageIndexes> {
        let key = reference.to_string();
        let cell = {
            let now = Instant::now();
            let mut images = self.images.lock().unwrap_or_else(|p| p.into_inner());
            images.retain(|_, (until, _)| *until > now);
            if images.len() >= MAX_IMAGES {
                images.clear();
            }
            images
                .entry(key)
                .or_insert_with(|| (now + KEEP_FOR, Arc::default()))
                .1
                .clone()
        };
        cell.get_or_init(|| async {
            let found = match self.load(reference).await {
                Ok(found) => found,
                Err(e) => ImageIndexes {
                    none: Some(format!(
                        "looking up the image's gzip index: {}",
                        crate::error_chain(&e)
                    )),
                    ..ImageIndexes::default()
                },
            };
            if let Some(why) = &found.none {
                tracing::debug!(reference = %reference, reason = %why, "no gzip index for the image");
            } else {
                tracing::info!(reference = %reference, layers = found.layers.len(), fetched_with_the_listing = found.speculated, "found the image's gzip index");
            }
            let found = Arc::new(found);
            self.fetch_ahead(reference, &found);
            found
        })
        .await
        .clone()
    }

    /// Starts fetching the image's index blobs for the Prepares to come, in layer order, as
    /// far as [`AHEAD_BYTES`] allows (by the sizes the artifact manifest declares, which the
    /// fetches hold the blobs to); those already under way (from the listing) are left be.
    fn fetch_ahead(&self, reference: &Reference, image: &Arc<ImageIndexes>) {
        let mut ahead = image.ahead.lock().unwrap_or_else(|p| p.into_inner());
        for (layer, size) in &image.index_sizes {
            let Some(digest) = image.layers.get(layer) else {
                continue;
            };
            if ahead.contains_key(layer) {
                continue;
            }
            let Some(cell) = self.start_ahead(reference, digest, *size) else {
                break;
            };
            ahead.insert(layer.clone(), cell);
        }
    }

    /// Starts fetching the index blob `digest` of at most `size` bytes, if [`AHEAD_BYTES`]
    /// has room for it.
    fn start_ahead(&self, reference: &Reference, digest: &str, size: u64) -> Option<Ahead> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let kib = u32::try_from(size.div_ceil(1024)).unwrap_or(u32::MAX);
        let permit = self.ahead_budget.clone().try_acquire_many_owned(kib).ok()?;
        let cell: Ahead = Arc::default();
        let (registry, requests) = (self.registry.clone(), self.ahead_requests.clone());
        let (reference, digest, fetched) = (reference.clone(), digest.to_owned(), cell.clone());
        runtime.spawn(async move {
            let Ok(_request) = requests.acquire_owned().await else {
                return;
            };
            fetched
                .get_or_init(|| async {
                    match registry.get_blob(&reference, &digest, size).await {
                        Ok(bytes) => Some((bytes, Some(permit))),
                        Err(e) => {
                            tracing::debug!(index = %digest, error = %crate::error_chain(&e), "fetching a gzip index ahead failed; its Prepare fetches it itself");
                            None
                        }
                    }
                })
                .await;
        });
        Some(cell)
    }

    /// Starts fetching the index blobs the listing's `artifact` descriptor names
    /// ([`INDEXES_ANNOTATION`]) before its manifest is there, one round trip sooner: they are
    /// fetched by digest, and a blob is used only if the artifact manifest, once checked,
    /// names it for that layer. Returns layer → (index digest, fetch).
    fn speculate(
        &self,
        reference: &Reference,
        artifact: &Descriptor,
    ) -> HashMap<String, (String, Ahead)> {
        let mut started = HashMap::new();
        let Some(list) = artifact.annotations.get(INDEXES_ANNOTATION) else {
            return started;
        };
        for item in list.split(',').take(MAX_SPECULATED) {
            let Some((layer, rest)) = item.trim().split_once('=') else {
                continue;
            };
            let Some((digest, size)) = rest.rsplit_once(':') else {
                continue;
            };
            let Some(size) = size
                .parse::<u64>()
                .ok()
                .filter(|s| *s <= MAX_INDEX_BLOB_BYTES)
            else {
                continue;
            };
            // Only a well-formed digest goes into a URL.
            let well_formed =
                digest.starts_with("sha256:") && crate::chunk::ChunkDigest::parse(digest).is_some();
            if !well_formed || started.contains_key(layer) {
                continue;
            }
            let Some(cell) = self.start_ahead(reference, digest, size) else {
                break;
            };
            started.insert(layer.to_owned(), (digest.to_owned(), cell));
        }
        started
    }

    async fn load(&self, reference: &Reference) -> Result<ImageIndexes, LookupError> {
        let manifest = image_manifest(&self.registry, reference).await?;
        let image: Document = parse(&manifest.bytes, "the image manifest")?;
        let sizes: HashMap<String, u64> = image
            .layers
            .iter()
            .filter_map(|l| Some((l.digest.clone(), l.size?)))
            .collect();
        let listing = match self
            .registry
            // Both artifact types are wanted (the newest type first, else the previous
            // build's), so the listing is not filtered by type.
            .find_referrers(
                reference,
                &manifest.digest,
                "",
                &fallback_tag(&manifest.digest),
                MAX_MANIFEST_BYTES,
            )
            .await?
        {
            Some(listing) => listing,
            None => {
                return Ok(ImageIndexes {
                    none: Some(format!(
                        "no gzip index refers to the image manifest {}",
                        manifest.digest
                    )),
                    ..ImageIndexes::default()
                })
            }
        };
        let listing: Document = parse(&listing, "the referrers listing")?;
        // The newest of the newest type, else the newest of the previous build's (whose
        // indexes hold their windows): the pusher appends to the listing.
        let newest = |t: &str| {
            listing
                .manifests
                .iter()
                .rev()
                .find(|d| d.artifact_type.as_deref() == Some(t))
        };
        let Some((artifact, artifact_type, index_type)) = newest(ARTIFACT_TYPE)
            .map(|a| (a, ARTIFACT_TYPE, INDEX_MEDIA_TYPE))
            .or_else(|| {
                newest(ARTIFACT_TYPE_V1).map(|a| (a, ARTIFACT_TYPE_V1, INDEX_MEDIA_TYPE_V1))
            })
        else {
            return Ok(ImageIndexes {
                none: Some(format!(
                    "no gzip index among the referrers of {}",
                    manifest.digest
                )),
                ..ImageIndexes::default()
            });
        };
        let speculated = self.speculate(reference, artifact);
        // Fetched by digest: get_manifest checks the bytes against it.
        let bytes = self
            .registry
            .get_manifest(reference, &artifact.digest, MAX_MANIFEST_BYTES)
            .await?
            .bytes;
        let doc: Document = parse(&bytes, "the gzip index artifact")?;
        if doc.artifact_type.as_deref() != Some(artifact_type) {
            return Err(LookupError::Invalid(format!(
                "artifact {} is not a gzip index",
                artifact.digest
            )));
        }
        let subject = doc.subject.as_ref().map(|s| s.digest.as_str());
        if subject != Some(manifest.digest.as_str()) {
            return Err(LookupError::Invalid(format!(
                "artifact {} refers to {subject:?}, not to the image manifest {}",
                artifact.digest, manifest.digest
            )));
        }
        let mut found = ImageIndexes {
            sizes,
            ..ImageIndexes::default()
        };
        for layer in &doc.layers {
            // Windows blobs are named by their indexes, and fetched by the reader.
            if layer.media_type != index_type {
                continue;
            }
            if let Some(of) = layer.annotations.get(LAYER_ANNOTATION) {
                found.layers.insert(of.clone(), layer.digest.clone());
                if let Some(size) = layer.size.filter(|s| *s <= MAX_INDEX_BLOB_BYTES) {
                    found.index_sizes.push((of.clone(), size));
                }
            }
        }
        {
            let mut ahead = found.ahead.lock().unwrap_or_else(|p| p.into_inner());
            for (layer, (digest, cell)) in speculated {
                // A blob the checked artifact does not name for that layer is dropped (its
                // budget with it, once its fetch ends).
                if found.layers.get(&layer) == Some(&digest) {
                    ahead.insert(layer, cell);
                    found.speculated += 1;
                }
            }
        }
        if let Some(list) = doc.annotations.get(NOT_INDEXED_ANNOTATION) {
            found.not_indexed = list
                .split(',')
                .map(str::trim)
                .filter(|d| !d.is_empty())
                .map(str::to_owned)
                .collect();
        }
        Ok(found)
    }
}

/// The image manifest `reference` names; for a multi-platform index, its manifest for this
/// machine's platform (linux and this architecture).
pub async fn image_manifest(
    registry: &RegistryClient,
    reference: &Reference,
) -> Result<Manifest, LookupError> {
    let manifest = registry
        .get_manifest(reference, &reference.object, MAX_MANIFEST_BYTES)
        .await?;
    let doc: Document = parse(&manifest.bytes, "the image manifest")?;
    let is_index = manifest.media_type.contains("index")
        || manifest.media_type.contains("manifest.list")
        || doc
            .media_type
            .as_deref()
            .is_some_and(|t| t.contains("index"))
        || (!doc.manifests.is_empty() && doc.layers.is_empty());
    if !is_index {
        return Ok(manifest);
    }
    let child = doc
        .manifests
        .iter()
        .take(MAX_PLATFORMS)
        .find(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == host_arch())
        })
        .ok_or_else(|| {
            LookupError::Invalid(format!(
                "the image index has no linux/{} manifest",
                host_arch()
            ))
        })?;
    Ok(registry
        .get_manifest(reference, &child.digest, MAX_MANIFEST_BYTES)
        .await?)
}

fn parse(bytes: &[u8], what: &str) -> Result<Document, LookupError> {
    serde_json::from_slice(bytes)
        .map_err(|e| LookupError::Invalid(format!("{what} is not a valid OCI document: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_tag_replaces_the_colon() {
        assert_eq!(fallback_tag("sha256:abc"), "sha256-abc");
    }
}
