//! A read-only FUSE filesystem over a layer index; it knows nothing of containerd, registries,
//! HTTP or layer formats.
//!
//! Whoever knows a layer implements [`LayerSource`]: fast synchronous metadata (lookup,
//! attributes, listings, symlinks, xattrs) and an asynchronous read. [`mount`] serves it at a
//! path, where overlayfs can stack on it as a `lowerdir` exactly as on an extracted tar.
//!
//! # Layout
//! - [`source`]: the [`LayerSource`] trait and the types it speaks in ([`Ino`], [`Attr`], ...).
//! - `fs`: the `fuser` filesystem translating kernel requests into source calls; reads run on
//!   a tokio runtime under a deadline, so a slow fetch never stalls the mount; optional kernel
//!   passthrough to local copies the source offers.
//! - `failures`: reads that recently failed with `EIO`, so the kernel's retries fail at once
//!   instead of waiting out the deadline again; throttled warnings naming the reason.
//! - [`mount()`](mount()): mount options, [`MountHandle`], cleanup of stale mounts, and
//!   [`take_over`] of a connection a previous process served.
//! - `backing`: which open inodes the kernel reads through which passthrough backing file,
//!   journaled so that a server taking over opens them the same way.
//! - [`ReadBuf`]: the reusable, aligned buffer a local read lands in.
//! - `connection`: mount(2) onto our own `/dev/fuse` fd, the INIT handshake kept as
//!   [`InitParams`], and the kernel's resend notification.
//! - [`error`]: [`SourceError`] with its errno per variant, [`MountError`].
//! - `memory` (feature `test-util`): `MemorySource`, an in-memory tree for tests.

#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]

mod backing;
mod connection;
pub mod error;
mod failures;
mod fs;
mod local_reads;
#[cfg(any(test, feature = "test-util"))]
pub mod memory;
mod mount;
mod read_buf;
pub mod source;

pub use connection::InitParams;
pub use error::{MountError, SourceError};
#[cfg(any(test, feature = "test-util"))]
pub use memory::{MemorySource, Meta};
pub use mount::{detach_mount, mount, take_over, MountHandle, MountOptions};
pub use read_buf::ReadBuf;
pub use source::{Attr, Device, DirEntry, FileKind, Ino, LayerSource, NameRequest};
