//! The name a held connection goes by: the mountpoint it serves and the INIT parameters the
//! kernel offered it, so a new daemon can match the fd to a saved layer and initialise its
//! filesystem as the first one did, from the name alone.
//!
//! Names must pass systemd's `FDNAME=` rules: at most 255 printable ASCII characters, no `:`.
//! So the path is percent-escaped outside `[A-Za-z0-9/._-]`.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use lazysnap_fuse::InitParams;

/// What every name starts with; other names in a store are not ours.
const PREFIX: &str = "lazysnap~";
/// systemd's limit for `FDNAME=`.
const MAX_LEN: usize = 255;

/// A held connection's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionName {
    pub mountpoint: PathBuf,
    pub init: InitParams,
}

impl ConnectionName {
    /// The name, or `None` if the mountpoint is too long to fit in one.
    pub fn encode(&self) -> Option<String> {
        let mut out = format!("{PREFIX}{}~", self.init);
        for &b in self.mountpoint.as_os_str().as_bytes() {
            if b.is_ascii_alphanumeric() || b"/._-".contains(&b) {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        (out.len() <= MAX_LEN).then_some(out)
    }

    /// Reads a name back; `None` for names this daemon did not write.
    pub fn decode(name: &str) -> Option<Self> {
        let rest = name.strip_prefix(PREFIX)?;
        let (init, path) = rest.split_once('~')?;
        let init = init.parse().ok()?;
        let mut bytes = Vec::with_capacity(path.len());
        let mut iter = path.bytes();
        while let Some(b) = iter.next() {
            if b == b'%' {
                let hex = [iter.next()?, iter.next()?];
                let hex = std::str::from_utf8(&hex).ok()?;
                bytes.push(u8::from_str_radix(hex, 16).ok()?);
            } else {
                bytes.push(b);
            }
        }
        let mountpoint = PathBuf::from(OsString::from_vec(bytes));
        mountpoint
            .is_absolute()
            .then_some(Self { mountpoint, init })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init() -> InitParams {
        InitParams {
            major: 7,
            minor: 45,
            max_readahead: 131_072,
            flags: 0x73ff_fffb,
            flags2: 0x1f,
        }
    }

    #[test]
    fn names_round_trip_and_satisfy_systemd() {
        for path in ["/var/lib/lazysnap/snapshots/12/fs", "/tmp/a b:c~d%e/ü/fs"] {
            let name = ConnectionName {
                mountpoint: PathBuf::from(path),
                init: init(),
            };
            let encoded = name.encode().expect("fits");
            assert!(
                encoded.bytes().all(|b| b.is_ascii_graphic() && b != b':'),
                "{encoded}"
            );
            assert_eq!(ConnectionName::decode(&encoded), Some(name));
        }
        assert_eq!(
            ConnectionName {
                mountpoint: PathBuf::from("/var/lib/lazysnap/snapshots/12/fs"),
                init: init(),
            }
            .encode()
            .as_deref(),
            Some("lazysnap~7.45.131072.73fffffb.1f~/var/lib/lazysnap/snapshots/12/fs")
        );
    }

    #[test]
    fn long_paths_and_foreign_names_are_refused() {
        let long = ConnectionName {
            mountpoint: PathBuf::from(format!("/{}", "x".repeat(300))),
            init: init(),
        };
        assert_eq!(long.encode(), None);
        for foreign in [
            "stdin",
            "lazysnap~7.45~/x",
            "lazysnap~7.45.1.2.3~relative",
            "lazysnap~7.45.1.2.3~/bad%zz",
        ] {
            assert_eq!(ConnectionName::decode(foreign), None, "{foreign}");
        }
    }
}
