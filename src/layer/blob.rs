//! Ranged reads of one layer blob from its registry: the registry client behind the formats'
//! `BlobSource` seam.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

use crate::format::{BlobError, BlobSource, BoxFuture};
use crate::registry::{Reference, RegistryClient};

pub struct RegistryBlob {
    registry: RegistryClient,
    reference: Reference,
    digest: String,
}

impl RegistryBlob {
    pub fn new(registry: RegistryClient, reference: Reference, digest: String) -> Self {
        RegistryBlob {
            registry,
            reference,
            digest,
        }
    }
}

impl BlobSource for RegistryBlob {
    fn read_range(&self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes, BlobError>> {
        Box::pin(async move {
            let started = std::time::Instant::now();
            let result = self
                .registry
                .read_range(&self.reference, &self.digest, range.clone())
                .await;
            tracing::debug!(layer = %self.digest, bytes = range.end - range.start, elapsed = ?started.elapsed(), ok = result.is_ok(), "fetched blob range");
            result.map_err(|e| BlobError {
                range,
                source: Arc::new(e),
            })
        })
    }
}
