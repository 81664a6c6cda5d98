//! lazysnap: a containerd remote snapshotter.
//!
//! # Layout
//! - `config`: the TOML configuration tree, defaults and validation.
//! - `snapshot`: containerd's snapshot semantics over overlayfs and an embedded metadata store;
//!   knows nothing of gRPC.
//! - `format`: eStargz and zstd:chunked footers, TOCs and chunk decompression; pure.
//! - `grpc`: containerd's Snapshots service over `snapshot` (tonic), proto ↔ domain conversion
//!   and error → status mapping.
//! - `cache`: verified chunk bytes on disk and in memory, content-addressed; a leaf.
//! - `daemon`: wiring for `lazysnap serve`: state dir, socket, signals.
//!
//! Dependencies point one way: `daemon → grpc → snapshot`, `config` is a leaf.

pub mod cache;
pub mod config;
pub mod daemon;
pub mod format;
pub mod grpc;
pub mod snapshot;
