//! Which blob a layer's Prepare labels point at. containerd passes the layer descriptor's
//! `containerd.io/snapshot/...` annotations as labels: stargz's `ctr-remote image rpull` sets
//! `remote/stargz.reference` and `remote/stargz.digest`; CRI (with
//! `disable_snapshot_annotations = false`) sets `cri.image-ref` and `cri.layer-digest`. The
//! eStargz converter's `stargz/toc.digest` annotation pins the TOC when present.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const STARGZ_REFERENCE: &str = "containerd.io/snapshot/remote/stargz.reference";
pub const STARGZ_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";
pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
pub const TOC_DIGEST: &str = crate::format::TOC_DIGEST_ANNOTATION;
/// The image's layer digests, comma-separated, as CRI sets them on each layer's Prepare.
pub const CRI_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
/// The same, as stargz's `ctr-remote image rpull` sets them.
pub const STARGZ_IMAGE_LAYERS: &str = "containerd.io/snapshot/remote/stargz.layers";

/// The digests of the image's layers that the labels name (none when they name none).
pub fn image_layers(labels: &BTreeMap<String, String>) -> Vec<String> {
    let mut layers: Vec<String> = [CRI_IMAGE_LAYERS, STARGZ_IMAGE_LAYERS]
        .iter()
        .filter_map(|k| labels.get(*k))
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|d| d.starts_with("sha256:") || d.starts_with("sha512:"))
        .map(str::to_owned)
        .collect();
    let mut seen = std::collections::HashSet::new();
    layers.retain(|d| seen.insert(d.clone()));
    layers
}

/// A layer blob in a registry, as named by snapshot labels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerSource {
    /// The image reference the layer was pulled as (`host/repo:tag` or `@digest`).
    pub reference: String,
    /// The layer blob's digest (`sha256:...`).
    pub digest: String,
    /// The TOC digest the image's manifest pins, when it does.
    pub toc_digest: Option<String>,
}

impl LayerSource {
    /// Reads the labels; `None` when they do not name a reference and a digest.
    pub fn from_labels(labels: &BTreeMap<String, String>) -> Option<Self> {
        let get = |k: &str| labels.get(k).filter(|v| !v.is_empty()).cloned();
        let reference = get(STARGZ_REFERENCE).or_else(|| get(CRI_IMAGE_REF))?;
        let digest = get(STARGZ_DIGEST).or_else(|| get(CRI_LAYER_DIGEST))?;
        Some(LayerSource {
            reference,
            digest,
            toc_digest: get(TOC_DIGEST),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn stargz_and_cri_labels() {
        let rpull = labels(&[
            (STARGZ_REFERENCE, "127.0.0.1:5000/a:esgz"),
            (STARGZ_DIGEST, "sha256:aa"),
            (TOC_DIGEST, "sha256:bb"),
        ]);
        let source = LayerSource::from_labels(&rpull).expect("rpull labels");
        assert_eq!(source.reference, "127.0.0.1:5000/a:esgz");
        assert_eq!(source.toc_digest.as_deref(), Some("sha256:bb"));
        let cri = labels(&[(CRI_IMAGE_REF, "r/a:1"), (CRI_LAYER_DIGEST, "sha256:cc")]);
        assert_eq!(
            LayerSource::from_labels(&cri).expect("cri").digest,
            "sha256:cc"
        );
        assert_eq!(
            LayerSource::from_labels(&labels(&[(CRI_IMAGE_REF, "r/a:1")])),
            None
        );
    }

    #[test]
    fn image_layers_from_either_label() {
        assert!(image_layers(&labels(&[])).is_empty());
        let both = labels(&[
            (CRI_IMAGE_LAYERS, "sha256:aa,sha256:bb"),
            (STARGZ_IMAGE_LAYERS, "sha256:bb, sha256:cc,,junk"),
        ]);
        assert_eq!(
            image_layers(&both),
            vec!["sha256:aa", "sha256:bb", "sha256:cc"]
        );
    }
}
