//! The OCI registry client: blob sizes and ranged blob reads, manifests, referrers and blob
//! uploads (`oci`), with bearer-token and basic
//! authentication, mirrors from containerd's hosts.toml, reuse of redirected blob URLs, one
//! retry policy and an overall deadline per read. Knows nothing of layers,
//! caches, FUSE or containerd.

mod auth;
mod bounded;
mod client;
mod hosts;
mod reference;

pub use auth::{Credentials, Secret};
pub use client::oci::{sha256_digest, Manifest, MANIFEST_TYPES};
pub use client::{RegistryClient, RegistryConfig, RegistryError, RegistryStats};
pub use hosts::HostsError;
pub use reference::{Reference, ReferenceError, ReferenceProblem};
