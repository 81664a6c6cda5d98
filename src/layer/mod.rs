//! Lazy layers: resolving a layer blob in the registry, reading its footer and TOC, verifying
//! the TOC, and reading file contents chunk by chunk through the cache.
//!
//! Knows the registry, the cache, the formats and the metadata index; knows nothing of FUSE or
//! containerd (`crate::mount` wires a layer to a FUSE mount for the snapshotter).

mod fetches;
mod reader;
mod source;

pub use fetches::{Fetches, Histogram, Priority};
pub use reader::{unix_ms, BlobSource, ChunkSpec, LayerCounters, LayerReader, ReadError};
pub use source::LayerSource;
