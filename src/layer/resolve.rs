//! Resolving a layer: which of the known formats it is in, and its verified index. A layer
//! whose state is still saved (another snapshot of it is there) is taken from there without a
//! request, when the image pins the same TOC; otherwise the blob's size and tail are fetched
//! once and shown to every format that could claim the layer.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{LayerError, LayerSource, LayerState, RegistryBlob, StateDir};
use crate::format::{Formats, LayerHints, Probe, MAX_FOOTER};
use crate::registry::{Reference, RegistryClient};

#[derive(Clone)]
pub struct Resolver {
    registry: RegistryClient,
    formats: Formats,
}

impl Resolver {
    pub fn new(registry: RegistryClient, formats: Formats) -> Self {
        Resolver { registry, formats }
    }

    pub fn formats(&self) -> &Formats {
        &self.formats
    }

    pub fn registry(&self) -> &RegistryClient {
        &self.registry
    }

    /// The blob of a layer, for its reader.
    pub fn blob(&self, source: &LayerSource) -> Result<Arc<RegistryBlob>, LayerError> {
        let reference = parse_reference(source)?;
        Ok(Arc::new(RegistryBlob::new(
            self.registry.clone(),
            reference,
            source.digest.clone(),
        )))
    }

    /// The layer's saved state, if one is there for the same blob and the image pins the
    /// same TOC: no registry request. The state's format must still accept the layer's
    /// labels, and its saved TOC digest must be the one the labels pin; opening it
    /// (`layer::open`) verifies the saved index against that digest again. The reference is
    /// the one being pulled now (its repository and credentials serve the reads). Blocking
    /// (reads the state): call from a blocking thread.
    pub fn saved(
        &self,
        states: &StateDir,
        source: &LayerSource,
        annotations: &BTreeMap<String, String>,
    ) -> Option<LayerState> {
        let pinned = source.toc_digest.as_deref()?;
        let mut state = states.load(&source.digest).ok()?;
        let hints = LayerHints {
            digest: &source.digest,
            annotations,
        };
        let format = self.formats.by_name(&state.format)?;
        let params_toc = state
            .resolved
            .params
            .get("toc_digest")
            .and_then(|v| v.as_str());
        let same = state.source.digest == source.digest
            && state.source.toc_digest.as_deref() == Some(pinned)
            && params_toc.is_none_or(|t| t == pinned)
            && format.accepts(&hints).is_ok();
        if !same {
            tracing::debug!(layer = %source.digest, "saved state is for another TOC; resolving again");
            return None;
        }
        tracing::debug!(layer = %source.digest, format = format.name(), "reusing saved layer state");
        state.source = source.clone();
        Some(state)
    }

    /// Finds the layer's format and its verified index. `NotLazy` when no format claims it;
    /// the labels alone decide that when they can, before any request.
    pub async fn resolve(
        &self,
        source: &LayerSource,
        annotations: &BTreeMap<String, String>,
    ) -> Result<LayerState, LayerError> {
        let layer = &source.digest;
        let hints = LayerHints {
            digest: layer,
            annotations,
        };
        let mut reasons = Vec::new();
        let candidates: Vec<_> = self
            .formats
            .iter()
            .filter(|f| match f.accepts(&hints) {
                Ok(()) => true,
                Err(why) => {
                    reasons.push(why);
                    false
                }
            })
            .cloned()
            .collect();
        if candidates.is_empty() {
            reasons.dedup();
            return Err(LayerError::NotLazy {
                layer: layer.clone(),
                reason: reasons.join("; "),
            });
        }
        let blob = self.blob(source)?;
        let registry_error = |what| {
            let layer = layer.clone();
            move |source| LayerError::Registry {
                layer,
                what,
                source,
            }
        };
        let reference = parse_reference(source)?;
        let blob_size = self
            .registry
            .blob_size(&reference, layer)
            .await
            .map_err(registry_error("reading the blob's size"))?;
        let tail_start = blob_size.saturating_sub(MAX_FOOTER);
        let tail = self
            .registry
            .read_range(&reference, layer, tail_start..blob_size)
            .await
            .map_err(registry_error("reading the blob's footer"))?;
        let probe = Probe {
            hints,
            blob_size,
            tail,
            blob: &*blob,
        };
        for format in candidates {
            let found = format
                .resolve(&probe)
                .await
                .map_err(|source| LayerError::Format {
                    layer: layer.clone(),
                    source,
                })?;
            if let Some(resolved) = found {
                tracing::debug!(layer = %layer, format = format.name(), "resolved layer");
                return Ok(LayerState {
                    source: source.clone(),
                    blob_size,
                    format: format.name().to_owned(),
                    resolved,
                });
            }
        }
        Err(LayerError::NotLazy {
            layer: layer.clone(),
            reason: format!(
                "no eStargz or zstd:chunked footer in the last {} bytes of the blob",
                probe.tail.len()
            ),
        })
    }
}

fn parse_reference(source: &LayerSource) -> Result<Reference, LayerError> {
    Reference::parse(&source.reference).map_err(|e| LayerError::Reference {
        layer: source.digest.clone(),
        reference: source.reference.clone(),
        source: e,
    })
}
