//! Disk usage of a directory tree, counted the way containerd's `fs.DiskUsage` does: allocated
//! blocks rather than apparent sizes, each hard-linked inode once, without crossing mounts.

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::types::Usage;

/// Walks `root` iteratively (a deep tree must not overflow the stack).
pub fn disk_usage(root: &Path) -> io::Result<Usage> {
    let root_meta = std::fs::symlink_metadata(root)?;
    let device = root_meta.dev();
    let mut seen = HashSet::new();
    let mut usage = Usage::default();
    let mut pending = vec![(root.to_path_buf(), root_meta)];
    while let Some((path, meta)) = pending.pop() {
        if !seen.insert(meta.ino()) {
            continue;
        }
        usage.inodes += 1;
        usage.size += i64::try_from(meta.blocks() * 512).unwrap_or(i64::MAX);
        if meta.is_dir() && meta.dev() == device {
            for entry in std::fs::read_dir(&path)? {
                let entry = entry?;
                let child = entry.path();
                let child_meta = std::fs::symlink_metadata(&child)?;
                if child_meta.dev() == device {
                    pending.push((child, child_meta));
                }
            }
        }
    }
    Ok(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_hard_links_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("a");
        std::fs::write(&file, vec![7u8; 64 * 1024]).expect("write");
        std::fs::hard_link(&file, dir.path().join("b")).expect("link");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        let usage = disk_usage(dir.path()).expect("usage");
        // root dir, sub dir and one inode for the two names of the file
        assert_eq!(usage.inodes, 3);
        assert!(
            usage.size >= 64 * 1024,
            "size {} counts the file",
            usage.size
        );
        assert!(
            usage.size < 2 * 64 * 1024,
            "size {} counts the link once",
            usage.size
        );
    }
}
