//! The contract between the filesystem and whatever knows the layer: [`LayerSource`] and the
//! plain types it speaks in (inode numbers, attributes, directory entries).
//!
//! A source knows one immutable tree. It answers metadata questions synchronously from memory,
//! and file contents asynchronously, because those may have to come over the network. It knows
//! nothing of FUSE: no request objects, no replies, no kernel flags; the filesystem (`fs.rs`)
//! translates.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::future::Future;
use std::ops::ControlFlow;
use std::time::SystemTime;

use bytes::Bytes;

use crate::{ReadBuf, SourceError};

/// An inode number. The root directory is always [`Ino::ROOT`]; 0 is never valid.
///
/// Hard links are one inode reachable under several names, so they share an `Ino`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ino(pub u64);

impl Ino {
    /// The root directory of the layer; FUSE fixes it at 1.
    pub const ROOT: Ino = Ino(1);
}

/// The type of an inode, as the mode's `S_IFMT` bits would say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// A directory.
    Directory,
    /// A regular file; the only kind that can be opened and read.
    RegularFile,
    /// A symbolic link.
    Symlink,
    /// A character device. An overlayfs whiteout is one with device 0/0.
    CharDevice,
    /// A block device.
    BlockDevice,
    /// A named pipe.
    Fifo,
    /// A Unix domain socket.
    Socket,
}

/// A device number, as in a tar header's `devmajor`/`devminor`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Device {
    /// The major number.
    pub major: u32,
    /// The minor number.
    pub minor: u32,
}

impl Device {
    /// No device: what every inode that is not a device node carries, and also the device
    /// number of an overlayfs whiteout.
    pub const NONE: Device = Device { major: 0, minor: 0 };

    /// The kernel's 32-bit "new" encoding, which FUSE carries in `fuse_attr.rdev`.
    ///
    /// Minor numbers above 20 bits and major numbers above 12 bits do not fit; Linux never
    /// allocates such numbers for the devices an image can contain.
    pub(crate) fn to_fuse_rdev(self) -> u32 {
        (self.minor & 0xff) | ((self.major & 0xfff) << 8) | ((self.minor & !0xff) << 12)
    }
}

/// Everything `stat(2)` shows about an inode.
///
/// To look like an unpacked tar to overlayfs, a source fills these exactly as the tar entry
/// would have been extracted: hard links share `ino` and count in `nlink`, devices carry
/// `rdev`, and whiteouts are character devices with [`Device::NONE`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    /// The inode number; the same for every name of a hard-linked inode.
    pub ino: Ino,
    /// The type of the inode.
    pub kind: FileKind,
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    pub perm: u16,
    /// The number of names of the inode; for a directory, 2 plus its subdirectories.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// The device number of a character or block device; [`Device::NONE`] otherwise.
    pub rdev: Device,
    /// Size in bytes: the content length of a file, the target length of a symlink.
    pub size: u64,
    /// Allocated size in 512-byte units, as `st_blocks`; see [`Attr::blocks_for`].
    pub blocks: u64,
    /// Modification time. A layer records no other times, so atime and ctime show it too.
    pub mtime: SystemTime,
}

impl Attr {
    /// The `st_blocks` a filesystem with 4 KiB blocks would show for `size` bytes: what a file
    /// extracted onto ext4 or xfs reports (ignoring sparse files and inline data).
    pub const fn blocks_for(size: u64) -> u64 {
        size.div_ceil(4096) * 8
    }
}

/// One name in a directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirEntry<'a> {
    /// The inode the name refers to.
    pub ino: Ino,
    /// Its type, for `d_type`; overlayfs relies on it to spot whiteouts in a listing.
    pub kind: FileKind,
    /// The name, without any `/`.
    pub name: &'a OsStr,
}

/// A request about a name that the kernel brought to the filesystem because its caches could
/// not answer it (see [`LayerSource::kernel_asked`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameRequest<'a> {
    /// `name` looked up in directory `parent`, found or not.
    Lookup {
        /// The directory looked in.
        parent: Ino,
        /// The name looked for.
        name: &'a OsStr,
    },
    /// The directory listed, from its start.
    List(Ino),
    /// The symlink whose target was read.
    Readlink(Ino),
}

/// An immutable directory tree that a FUSE mount presents read-only.
///
/// Metadata calls are synchronous and must be fast (an in-memory index): they run on the FUSE
/// dispatch thread, and a slow one stalls every other request of the mount. Only
/// [`read`](LayerSource::read) may wait, on anything it likes; the filesystem runs it on a
/// tokio runtime and answers `EIO` if it misses the mount's read deadline.
///
/// The filesystem never asks about an inode the source has not named (through
/// [`lookup`](LayerSource::lookup) or [`readdir`](LayerSource::readdir)) except
/// [`Ino::ROOT`].
pub trait LayerSource: Send + Sync + 'static {
    /// The attributes of the entry `name` in directory `parent`.
    ///
    /// # Errors
    /// [`SourceError::NotFound`] for a missing name (the kernel caches that answer as a
    /// negative entry), [`SourceError::NotDirectory`] if `parent` is not a directory.
    fn lookup(&self, parent: Ino, name: &OsStr) -> Result<Attr, SourceError>;

    /// The attributes of an inode.
    ///
    /// # Errors
    /// [`SourceError::NotFound`] for an unknown inode.
    fn getattr(&self, ino: Ino) -> Result<Attr, SourceError>;

    /// Lists directory `dir`, skipping its first `offset` entries, handing each following entry
    /// to `add` until `add` answers [`ControlFlow::Break`] (the kernel's buffer is full) or
    /// the directory ends.
    ///
    /// The order must be stable, because the kernel lists a large directory in several calls
    /// and resumes each one at the count of entries it has already received. `.` and `..`
    /// are not entries of the source; the filesystem adds them.
    ///
    /// # Errors
    /// [`SourceError::NotDirectory`] if `dir` is not a directory, [`SourceError::NotFound`]
    /// for an unknown inode.
    fn readdir(
        &self,
        dir: Ino,
        offset: u64,
        add: &mut dyn FnMut(DirEntry<'_>) -> ControlFlow<()>,
    ) -> Result<(), SourceError>;

    /// The target of a symlink.
    ///
    /// # Errors
    /// [`SourceError::NotSymlink`] if `ino` is not a symlink.
    fn readlink(&self, ino: Ino) -> Result<OsString, SourceError>;

    /// Told of each lookup, listing (from its start) and symlink read the kernel brings to
    /// the mount, before it is answered, so a source can count or record what the kernel
    /// could not answer from its caches. The filesystem's own calls of the source (looking
    /// for a file to open at mount) are not told. Called on the dispatch thread: it must be
    /// quick. By default it does nothing.
    fn kernel_asked(&self, _request: NameRequest<'_>) {}

    /// The names of the extended attributes of an inode, e.g. `trusted.overlay.opaque` on an
    /// opaque directory.
    ///
    /// # Errors
    /// [`SourceError::NotFound`] for an unknown inode.
    fn listxattr(&self, ino: Ino) -> Result<Vec<OsString>, SourceError>;

    /// The value of one extended attribute.
    ///
    /// # Errors
    /// [`SourceError::NoAttribute`] if the inode has no attribute of that name.
    fn getxattr(&self, ino: Ino, name: &OsStr) -> Result<Bytes, SourceError>;

    /// Whether any inode has an extended attribute. When none has, the filesystem tells the
    /// kernel it keeps none (`ENOSYS`), and the kernel stops asking for the rest of the mount
    /// and answers `EOPNOTSUPP` itself: overlayfs asks each lower layer for its own attributes
    /// on most lookups and every exec, each a round trip. Asked once, at mount.
    fn has_xattrs(&self) -> bool {
        true
    }

    /// Reads `len` bytes of regular file `ino` starting at `offset`.
    ///
    /// The filesystem only asks for ranges inside the file (`offset + len <= size`, `len > 0`)
    /// and the answer must be exactly `len` bytes: the kernel takes a short answer for the end
    /// of the file and would shrink its idea of the file's size, so a short answer is turned
    /// into `EIO`.
    ///
    /// If the mount's read deadline passes first, the future is dropped and the reader gets
    /// `EIO`. A source that wants a fetch to finish anyway, to fill a cache, must spawn it.
    ///
    /// # Errors
    /// [`SourceError::Io`] when the bytes cannot be produced.
    fn read(
        &self,
        ino: Ino,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Bytes, SourceError>> + Send;

    /// Whether [`read_local`](LayerSource::read_local) can ever answer; when false, reads
    /// skip it.
    const READS_LOCALLY: bool = false;

    /// Bytes of regular file `ino` that the source holds locally, read now into `buf`,
    /// blocking on the local disk and nothing else; `None` when any of them would have to be
    /// fetched, and then [`read`](LayerSource::read) is called. It runs on a local-read thread
    /// that answers the kernel itself, from `buf`: one thread hand-off per read, where an
    /// async read that then waits on the disk takes three, and no allocation (the thread
    /// keeps its buffer). Same range rules as `read`: on `Ok`, [`ReadBuf::answer`] must be
    /// exactly `len` bytes.
    ///
    /// # Errors
    /// [`SourceError::Io`] when the local bytes cannot be read.
    fn read_local(
        &self,
        _ino: Ino,
        _offset: u64,
        _len: u32,
        _buf: &mut ReadBuf,
    ) -> Option<Result<(), SourceError>> {
        None
    }

    /// A local file holding exactly the contents of regular file `ino`, if the source has
    /// one complete (fetched whole into a cache, say). On a mount with
    /// [`passthrough`](crate::MountOptions::passthrough), an open of `ino` then lets the kernel
    /// read that file directly, at native speed and without calling
    /// [`read`](LayerSource::read), until every open of `ino` is closed.
    ///
    /// Called on the dispatch thread at open, so it must be quick. The file must be on a
    /// filesystem that is not itself stacked (ext4 or xfs, not overlayfs), or the kernel
    /// refuses it and the open falls back to [`read`](LayerSource::read). The default has none.
    fn backing_file(&self, _ino: Ino) -> Option<File> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values glibc's `makedev` gives, which is what `stat` shows for these devices.
    #[test]
    fn rdev_uses_the_kernel_encoding() {
        let cases = [
            (Device::NONE, 0),
            (Device { major: 1, minor: 3 }, 0x0103),
            (
                Device {
                    major: 8,
                    minor: 17,
                },
                0x0811,
            ),
            (
                Device {
                    major: 4095,
                    minor: 0xfffff,
                },
                0xffff_ffff,
            ),
            (
                Device {
                    major: 10,
                    minor: 0x1234,
                },
                0x0120_0a34,
            ),
        ];
        for (dev, rdev) in cases {
            assert_eq!(dev.to_fuse_rdev(), rdev, "{dev:?}");
            let libc_dev = libc::makedev(dev.major, dev.minor);
            assert_eq!(u64::from(rdev), libc_dev, "{dev:?} against makedev");
        }
    }

    #[test]
    fn blocks_round_up_to_4k() {
        assert_eq!(Attr::blocks_for(0), 0);
        assert_eq!(Attr::blocks_for(1), 8);
        assert_eq!(Attr::blocks_for(4096), 8);
        assert_eq!(Attr::blocks_for(4097), 16);
    }
}
