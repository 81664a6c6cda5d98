//! Errors of this crate: what a [`LayerSource`](crate::LayerSource) may answer, each with the
//! errno the kernel passes on to the caller, and what mounting and unmounting may fail with.
//!
//! The errno mapping lives here, per variant, so that no layer below has to know errno values
//! and no failure is flattened into one catch-all code.

use std::error::Error as StdError;
use std::io;
use std::path::PathBuf;

/// Why a [`LayerSource`](crate::LayerSource) could not answer; each variant is one errno.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The name or inode does not exist (`ENOENT`).
    #[error("no such file or directory")]
    NotFound,
    /// A directory operation on something that is not a directory (`ENOTDIR`).
    #[error("not a directory")]
    NotDirectory,
    /// A file operation, such as read, on a directory (`EISDIR`).
    #[error("is a directory")]
    IsDirectory,
    /// `readlink` of something that is not a symlink (`EINVAL`, as readlink(2) says).
    #[error("not a symbolic link")]
    NotSymlink,
    /// The inode has no extended attribute of that name (`ENODATA`).
    #[error("no such extended attribute")]
    NoAttribute,
    /// The bytes could not be produced: a failed fetch, a digest mismatch, a broken cache
    /// (`EIO`). The cause is kept for the debug log only; the kernel just sees `EIO`.
    #[error("i/o error")]
    Io(#[source] Box<dyn StdError + Send + Sync>),
}

impl SourceError {
    /// Wraps any failure to produce data as [`SourceError::Io`].
    pub fn io(cause: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        Self::Io(cause.into())
    }

    /// The errno the kernel returns to the process that made the call.
    pub fn errno(&self) -> i32 {
        match self {
            Self::NotFound => libc::ENOENT,
            Self::NotDirectory => libc::ENOTDIR,
            Self::IsDirectory => libc::EISDIR,
            Self::NotSymlink => libc::EINVAL,
            Self::NoAttribute => libc::ENODATA,
            Self::Io(_) => libc::EIO,
        }
    }
}

/// Why a layer could not be mounted or unmounted.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// Mounting, the FUSE handshake or starting the session thread failed.
    #[error("failed to mount {}", mountpoint.display())]
    Mount {
        /// Where the layer was to be mounted.
        mountpoint: PathBuf,
        /// What the kernel or fuser said.
        #[source]
        source: io::Error,
    },
    /// The kernel refused to unmount (or detach) the mountpoint.
    #[error("failed to unmount {}", mountpoint.display())]
    Unmount {
        /// The mountpoint that is still mounted.
        mountpoint: PathBuf,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_has_its_own_errno() {
        let cases = [
            (SourceError::NotFound, libc::ENOENT),
            (SourceError::NotDirectory, libc::ENOTDIR),
            (SourceError::IsDirectory, libc::EISDIR),
            (SourceError::NotSymlink, libc::EINVAL),
            (SourceError::NoAttribute, libc::ENODATA),
            (SourceError::io("registry said 503"), libc::EIO),
        ];
        for (err, errno) in cases {
            assert_eq!(err.errno(), errno, "{err:?}");
        }
    }

    #[test]
    fn io_keeps_its_cause() {
        let err = SourceError::io(io::Error::other("digest mismatch"));
        let cause = err.source().map(ToString::to_string);
        assert_eq!(cause.as_deref(), Some("digest mismatch"));
    }
}
