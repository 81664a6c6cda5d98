//! Finds and detaches mounts left under the snapshot directories, e.g. FUSE mounts of a daemon
//! that was killed: their directories answer ENOTCONN and cannot be removed until unmounted.

use std::path::{Path, PathBuf};

use nix::mount::{umount2, MntFlags};

/// Mount points at or below `dir`, deepest first (the order to unmount them in).
pub fn mount_points_under(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut points: Vec<PathBuf> = text
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape(field)))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    Ok(points)
}

/// Lazily detaches every mount at or below `dir` but those at `keep`; returns how many were
/// detached.
pub fn detach_under(dir: &Path, keep: &[PathBuf]) -> std::io::Result<usize> {
    let mut points = mount_points_under(dir)?;
    points.retain(|p| !keep.contains(p));
    for point in &points {
        if let Err(e) = umount2(point, MntFlags::MNT_DETACH) {
            tracing::warn!(mountpoint = %point.display(), error = %e, "detaching stale mount failed");
        }
    }
    Ok(points.len())
}

/// Lazily detaches every mount stacked exactly at `point` (a dead FUSE mount, possibly
/// several); returns how many were detached.
pub fn detach_all_at(point: &Path) -> nix::Result<usize> {
    // A bound, in case something keeps mounting there.
    for detached in 0..16 {
        match umount2(point, MntFlags::MNT_DETACH) {
            Ok(()) => {}
            // EINVAL: not a mountpoint (any more); ENOENT: not even there.
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => return Ok(detached),
            Err(e) => return Err(e),
        }
    }
    Err(nix::errno::Errno::EBUSY)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(value) = u8::from_str_radix(digits, 8) {
                out.push(value);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn octal_escapes_are_decoded() {
        assert_eq!(unescape(r"/a\040b/c"), "/a b/c");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/trailing\04"), r"/trailing\04");
    }
}
