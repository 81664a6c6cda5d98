//! Lazy layers: resolving a layer blob in the registry through its format (`resolve`), keeping
//! what was resolved so a restarted daemon opens the layer without the registry (`state`), and
//! reading file contents chunk by chunk through the store (`reader`).
//!
//! Knows the registry, the formats, the store and the metadata index; knows nothing of FUSE
//! or containerd (`crate::mount` wires a layer to a FUSE mount for the snapshotter).

mod blob;
mod error;
mod fetches;
mod gzip_lookup;
pub mod gzip_publish;
mod reader;
mod resolve;
mod source;
mod state;
pub mod verify;

pub use blob::RegistryBlob;
pub use error::LayerError;
pub use fetches::{Fetches, Histogram, Priority};
pub use gzip_lookup::{fallback_tag, image_manifest, IndexLookup, Lookup, LookupError};
pub use reader::{unix_ms, LayerCounters, LayerReader, ReadError};
pub use resolve::{Resolver, SUFFIX_BYTES};
pub use source::{image_layers, LayerSource};
pub use state::{Encoded, LayerState, SavedState, StateDir};

use crate::format::{Formats, Opened};

/// Opens a resolved layer: its index and chunk decoder, from the state saved for it. CPU-bound
/// (the whole index is parsed and built): call it off the async workers.
pub fn open(formats: &Formats, state: &LayerState) -> Result<Opened, LayerError> {
    let format = formats
        .by_name(&state.format)
        .ok_or_else(|| LayerError::UnknownFormat {
            layer: state.source.digest.clone(),
            format: state.format.clone(),
        })?;
    format
        .open(&state.resolved)
        .map_err(|source| LayerError::Format {
            layer: state.source.digest.clone(),
            source,
        })
}
