//! lazysnap: a containerd remote snapshotter.
//!
//! # Layout
//! - `config`: the TOML configuration tree, defaults and validation.
//! - `metadata`: TOC → layer index (inodes, attributes, chunk maps); pure.
//! - `layer`: lazy layers: file ranges → chunks → cache or one deduplicated fetch.
//! - `mount`: wires lazy layers (layer + fuse crate) into the snapshotter's `RemoteFs`.
//! - `registry`: OCI registry client: ranged blob reads, auth, retries; a leaf.
//! - `snapshot`: containerd's snapshot semantics over overlayfs and an embedded metadata store;
//!   knows nothing of gRPC.
//! - `format`: eStargz and zstd:chunked footers, TOCs and chunk decompression; pure.
//! - `grpc`: containerd's Snapshots service over `snapshot` (tonic), proto ↔ domain conversion
//!   and error → status mapping; the control API over `mount`; the CRI image proxy that hands
//!   pull secrets to `registry`.
//! - `cache`: verified chunk bytes on disk and in memory, content-addressed, within a disk
//!   budget (LRU); a leaf.
//! - `prefetch`: read traces, trace/landmark prefetch, readahead, background fetch; over
//!   `layer` and `metadata`.
//! - `metrics`: the Prometheus endpoint over the same figures as the control API.
//! - `socket`: binding the daemon's Unix sockets with their mode and group, umask-proof.
//! - `daemon`: wiring for `lazysnap serve`: state dir, sockets, signals.
//!
//! Dependencies point one way: `daemon → grpc → snapshot → (RemoteFs) ← mount → {layer,
//! prefetch, fuse}`, `layer → {registry, cache, metadata}`, `prefetch → layer`; `config`,
//! `registry` and `cache` are leaves.

pub mod cache;
pub mod config;
pub mod daemon;
pub mod format;
pub mod grpc;
pub mod layer;
pub mod metadata;
pub mod metrics;
pub mod mount;
pub mod prefetch;
pub mod registry;
pub mod snapshot;
pub mod socket;
