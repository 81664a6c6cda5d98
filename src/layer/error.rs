//! Why a layer could not be resolved, saved, opened or found. Every variant names the layer
//! and keeps its cause as the error's source.

use std::path::PathBuf;

use crate::format::FormatError;
use crate::registry::RegistryError;

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// No known format claims the layer (plain gzip, no TOC annotation, ...): not an error,
    /// the layer takes the ordinary path.
    #[error("layer {layer} is in no lazy format: {reason}")]
    NotLazy { layer: String, reason: String },
    #[error("layer {layer}: the image reference {reference:?} is not valid")]
    Reference {
        layer: String,
        reference: String,
        #[source]
        source: crate::registry::ReferenceError,
    },
    #[error("layer {layer}: {what}")]
    Registry {
        layer: String,
        what: &'static str,
        #[source]
        source: RegistryError,
    },
    #[error("layer {layer}")]
    Format {
        layer: String,
        #[source]
        source: FormatError,
    },
    #[error("layer {layer} was saved as format {format:?}, which this build does not know")]
    UnknownFormat { layer: String, format: String },
    #[error("layer {layer}: {action} {}", path.display())]
    State {
        layer: String,
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("layer {layer}: saved state {} is not valid", path.display())]
    StateJson {
        layer: String,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("layer {layer}: mounting it")]
    Mount {
        layer: String,
        #[source]
        source: lazysnap_fuse::MountError,
    },
    #[error("layer {layer} is not known to this node")]
    Unknown { layer: String },
    #[error("layer {layer}: the worker doing it failed")]
    Task {
        layer: String,
        #[source]
        source: tokio::task::JoinError,
    },
}
