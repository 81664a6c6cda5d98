//! Resolving a layer: which of the known formats it is in, and its verified index. The blob's
//! size and tail are fetched once and shown to every format that could claim the layer.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{LayerError, LayerSource, LayerState, RegistryBlob};
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
