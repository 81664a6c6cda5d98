//! Which open inodes the kernel reads through a passthrough backing file, and which through
//! the page cache, kept so that a server taking over the connection answers opens the way
//! the kernel expects.
//!
//! The kernel ties an inode to one mode while any handle of it is open: in passthrough mode to
//! one registered backing id, and it refuses an open naming another id (`EBUSY`) or none
//! (`ETXTBSY`); in page-cache mode it refuses a passthrough open (`ETXTBSY`). Handles opened
//! before a restart stay open across it, and the next server cannot ask the kernel which
//! inodes they hold. So each mode change is written to a journal next to the mount before
//! the kernel sees it (before the open reply, before an id is closed), and a server taking
//! over adopts the modes of the inodes the journal shows open: it names the same backing ids
//! and keeps those inodes in their modes for the rest of the mount (it cannot tell when the
//! previous server's handles close, so it never closes an id it inherited).
//!
//! Without a journal (none configured, or one that could not be read or written) a server
//! taking over cannot know which inodes are held in which mode, so it passes nothing through:
//! slower, and refused only where the previous server held an inode in passthrough mode.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use crate::Ino;

/// `FUSE_DEV_IOC_BACKING_CLOSE`: `_IOW(229, 2, uint32_t)`.
const BACKING_CLOSE: u32 = 0x4004_e502;
/// First line of a journal, so a file of another kind or version is never taken for one.
const HEADER: &str = "lazysnap-fuse backing journal 1";
/// A journal longer than this is not read (it is rewritten at every takeover and compacted
/// as it grows, so only damage makes one this long).
const MAX_JOURNAL_BYTES: u64 = 64 << 20;
/// Compact once the journal has this many lines more than open inodes.
const COMPACT_SLACK: usize = 4096;

/// How one inode's open handles read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Through the page cache: reads reach the source.
    Cached,
    /// Through this registered backing id.
    Passthrough(u32),
}

#[derive(Debug)]
struct Opened {
    handles: u64,
    mode: Mode,
}

/// The open modes of a mount's inodes, and their journal.
#[derive(Debug)]
pub(crate) struct Backings {
    /// The connection, to close backing ids on.
    device: OwnedFd,
    /// Inodes with handles this server opened.
    open: HashMap<Ino, Opened>,
    /// Modes of inodes the previous server had open; fixed for the life of the mount.
    inherited: HashMap<Ino, Mode>,
    /// Whether new inodes may be passed through (passthrough is on and the modes of the
    /// previous server's open inodes are known).
    passthrough: bool,
    journal: Option<Journal>,
}

impl Backings {
    /// For a mount this process just made: a fresh journal at `journal`.
    pub(crate) fn fresh(device: OwnedFd, passthrough: bool, journal: Option<&Path>) -> Self {
        if let (Some(path), false) = (journal, passthrough) {
            // A previous mount's journal would tell a successor of modes this one never set.
            let _ = fs::remove_file(path);
        }
        let journal = journal
            .filter(|_| passthrough)
            .and_then(|path| Journal::create_or_remove(path, &HashMap::new()));
        Self {
            device,
            open: HashMap::new(),
            inherited: HashMap::new(),
            passthrough,
            journal,
        }
    }

    /// For a connection taken over: the modes the previous server's journal shows open
    /// are inherited. With passthrough on and no readable journal, nothing is passed through.
    pub(crate) fn taken_over(device: OwnedFd, passthrough: bool, journal: Option<&Path>) -> Self {
        let read = journal.map(|path| (path, Journal::read(path)));
        let (inherited, known) = match read {
            Some((_, Ok(Some(inherited)))) => (inherited, true),
            // No journal: the previous server had passthrough off, or no journal. Either
            // way which inodes it held open through the page cache is unknown, and a
            // passthrough open of one of them would be refused.
            Some((_, Ok(None))) | None => (HashMap::new(), false),
            Some((path, Err(err))) => {
                warn!(journal = %path.display(), error = %err, "cannot read the passthrough journal; this mount serves every open through the page cache until it is mounted again");
                (HashMap::new(), false)
            }
        };
        let passthrough = passthrough && known;
        let journal = journal
            .filter(|_| known)
            .and_then(|path| Journal::create_or_remove(path, &inherited));
        if !inherited.is_empty() {
            debug!(
                inodes = inherited.len(),
                "open inodes keep the modes the previous server gave them"
            );
        }
        Self {
            device,
            open: HashMap::new(),
            inherited,
            passthrough: passthrough && journal.is_some(),
            journal,
        }
    }

    /// The mode for a new handle of `ino`: the one its other handles have, an inherited one,
    /// or passthrough onto the id `register` gives (registering the source's backing file),
    /// else the page cache.
    pub(crate) fn open(&mut self, ino: Ino, register: impl FnOnce() -> Option<u32>) -> Mode {
        if !self.passthrough && self.journal.is_none() && self.inherited.is_empty() {
            // Nothing to keep: every open goes through the page cache.
            return Mode::Cached;
        }
        if let Some(opened) = self.open.get_mut(&ino) {
            opened.handles += 1;
            return opened.mode;
        }
        let mode = match self.inherited.get(&ino) {
            Some(&mode) => mode,
            None => self.new_mode(ino, register),
        };
        self.open.insert(ino, Opened { handles: 1, mode });
        mode
    }

    fn new_mode(&mut self, ino: Ino, register: impl FnOnce() -> Option<u32>) -> Mode {
        let mode = if self.passthrough {
            register().map_or(Mode::Cached, Mode::Passthrough)
        } else {
            Mode::Cached
        };
        let Some(journal) = self.journal.as_mut() else {
            return mode;
        };
        if let Err(err) = journal.append(&Entry::Open(ino, mode)) {
            warn!(journal = %journal.path.display(), error = %err, "cannot write the passthrough journal; no more passthrough on this mount, and a restart serves it through the page cache");
            self.stop_journal();
            if let Mode::Passthrough(id) = mode {
                self.close(id);
            }
            return Mode::Cached;
        }
        mode
    }

    /// One handle of `ino` closed.
    pub(crate) fn release(&mut self, ino: Ino) {
        let Some(opened) = self.open.get_mut(&ino) else {
            // A handle the previous server opened.
            return;
        };
        opened.handles = opened.handles.saturating_sub(1);
        if opened.handles > 0 {
            return;
        }
        let mode = opened.mode;
        self.open.remove(&ino);
        if self.inherited.contains_key(&ino) {
            return;
        }
        // Journaled before the id is closed: a successor must never name a closed id.
        let live = self.open.len() + self.inherited.len();
        let written = self.journal.as_mut().map_or(Ok(false), |journal| {
            journal
                .append(&Entry::Closed(ino))
                .map(|()| journal.lines > live.saturating_mul(4) + COMPACT_SLACK)
        });
        let written = match written {
            Ok(true) => {
                let modes = self.modes();
                self.journal.as_mut().map_or(Ok(()), |j| j.compact(&modes))
            }
            other => other.map(drop),
        };
        if let Err(err) = written {
            warn!(error = %err, "cannot write the passthrough journal; no more passthrough on this mount");
            self.stop_journal();
        }
        if let Mode::Passthrough(id) = mode {
            self.close(id);
        }
    }

    /// Whether every file of the mount can be read through the page cache with no open of
    /// ours: nothing is passed through now, and no handle a predecessor opened is. The
    /// kernel can then open files itself (and keep their pages across opens) for the rest of
    /// the connection, which no later server can undo: a successor never sees an open.
    pub(crate) fn opens_not_needed(&self) -> bool {
        !self.passthrough && self.inherited.is_empty()
    }

    /// Every inode's mode that a successor must keep.
    fn modes(&self) -> HashMap<Ino, Mode> {
        let mut modes = self.inherited.clone();
        modes.extend(self.open.iter().map(|(&ino, o)| (ino, o.mode)));
        modes
    }

    /// The kernel cannot pass through on this connection, so there are no modes to keep.
    pub(crate) fn no_passthrough(&mut self) {
        self.stop_journal();
    }

    /// A journal that can no longer be trusted is removed, so a successor knows nothing
    /// rather than something wrong; no new inode is passed through after.
    fn stop_journal(&mut self) {
        if let Some(journal) = self.journal.take() {
            let _ = fs::remove_file(&journal.path);
        }
        self.passthrough = false;
    }

    fn close(&self, id: u32) {
        // SAFETY: the ioctl reads one u32 through the pointer, which is valid for the call.
        let rc = unsafe {
            libc::ioctl(
                self.device.as_raw_fd(),
                BACKING_CLOSE as libc::Ioctl,
                &id as *const u32,
            )
        };
        if rc != 0 {
            debug!(id, error = %io::Error::last_os_error(), "closing a backing id failed");
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    Open(Ino, Mode),
    Closed(Ino),
}

impl Entry {
    fn line(self) -> String {
        match self {
            Entry::Open(ino, Mode::Cached) => format!("c {}\n", ino.0),
            Entry::Open(ino, Mode::Passthrough(id)) => format!("p {} {id}\n", ino.0),
            Entry::Closed(ino) => format!("- {}\n", ino.0),
        }
    }

    fn parse(line: &str) -> Option<Self> {
        let mut words = line.split(' ');
        let kind = words.next()?;
        let ino = Ino(words.next()?.parse().ok()?);
        let entry = match kind {
            "c" => Entry::Open(ino, Mode::Cached),
            "p" => Entry::Open(ino, Mode::Passthrough(words.next()?.parse().ok()?)),
            "-" => Entry::Closed(ino),
            _ => return None,
        };
        words.next().is_none().then_some(entry)
    }
}

#[derive(Debug)]
struct Journal {
    path: PathBuf,
    file: File,
    lines: usize,
}

impl Journal {
    /// A new journal at `path` listing `modes`, replacing whatever was there in one rename.
    fn create(path: &Path, modes: &HashMap<Ino, Mode>) -> io::Result<Self> {
        let mut text = format!("{HEADER}\n");
        for (&ino, &mode) in modes {
            text.push_str(&Entry::Open(ino, mode).line());
        }
        let mut name = path.as_os_str().to_owned();
        name.push(".new");
        let temp = PathBuf::from(name);
        fs::write(&temp, &text)?;
        fs::rename(&temp, path)?;
        let file = OpenOptions::new().append(true).open(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            lines: modes.len(),
        })
    }

    /// [`create`](Self::create), or else no journal at all: one left from before would tell
    /// a successor of modes that no longer hold.
    fn create_or_remove(path: &Path, modes: &HashMap<Ino, Mode>) -> Option<Self> {
        match Self::create(path, modes) {
            Ok(journal) => Some(journal),
            Err(err) => {
                warn!(journal = %path.display(), error = %err, "cannot write the passthrough journal; after a restart this mount passes nothing through");
                let _ = fs::remove_file(path);
                None
            }
        }
    }

    /// The modes a journal shows open; `None` if there is none. Page-cache durability is
    /// enough: a journal matters only while the connection lives, and a crash of the
    /// machine ends that.
    fn read(path: &Path) -> io::Result<Option<HashMap<Ino, Mode>>> {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(err),
        };
        let mut text = String::new();
        file.take(MAX_JOURNAL_BYTES + 1).read_to_string(&mut text)?;
        if text.len() as u64 > MAX_JOURNAL_BYTES {
            return Err(io::Error::other(format!(
                "longer than {MAX_JOURNAL_BYTES} bytes"
            )));
        }
        let mut lines = text.split_inclusive('\n');
        if lines.next() != Some(&format!("{HEADER}\n")) {
            return Err(io::Error::other("not a backing journal of this version"));
        }
        let mut modes = HashMap::new();
        for (n, line) in lines.enumerate() {
            // A line cut short by a kill mid-write can only be the last one; the open it
            // announced was never answered, and the kernel resends it to us.
            let Some(line) = line.strip_suffix('\n') else {
                break;
            };
            match Entry::parse(line) {
                Some(Entry::Open(ino, mode)) => {
                    modes.insert(ino, mode);
                }
                Some(Entry::Closed(ino)) => {
                    modes.remove(&ino);
                }
                None => {
                    return Err(io::Error::other(format!(
                        "line {} is not an entry: {line:?}",
                        n + 2
                    )))
                }
            }
        }
        Ok(Some(modes))
    }

    fn append(&mut self, entry: &Entry) -> io::Result<()> {
        // One write of a whole line: O_APPEND keeps it in one piece.
        self.file.write_all(entry.line().as_bytes())?;
        self.lines += 1;
        Ok(())
    }

    fn compact(&mut self, modes: &HashMap<Ino, Mode>) -> io::Result<()> {
        *self = Self::create(&self.path, modes)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> OwnedFd {
        File::open("/dev/null").expect("/dev/null").into()
    }

    #[test]
    fn a_successor_keeps_the_modes_of_open_inodes_only() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("journal");
        let mut first = Backings::fresh(device(), true, Some(&path));
        assert_eq!(first.open(Ino(2), || Some(7)), Mode::Passthrough(7));
        assert_eq!(
            first.open(Ino(2), || panic!("registers once")),
            Mode::Passthrough(7)
        );
        assert_eq!(first.open(Ino(3), || None), Mode::Cached);
        assert_eq!(first.open(Ino(4), || Some(8)), Mode::Passthrough(8));
        first.release(Ino(4));
        first.release(Ino(2));
        // Ino 2 still has a handle, ino 3 is open through the page cache, ino 4 is closed.
        let mut next = Backings::taken_over(device(), true, Some(&path));
        assert_eq!(
            next.open(Ino(2), || panic!("must name the inherited id")),
            Mode::Passthrough(7)
        );
        assert_eq!(
            next.open(Ino(3), || panic!("stays in the page cache")),
            Mode::Cached
        );
        assert_eq!(next.open(Ino(4), || Some(9)), Mode::Passthrough(9));
        // Inherited modes outlive their handles here, and survive another takeover.
        next.release(Ino(2));
        next.release(Ino(3));
        let mut third = Backings::taken_over(device(), true, Some(&path));
        assert_eq!(third.open(Ino(2), || None), Mode::Passthrough(7));
        assert_eq!(third.open(Ino(3), || Some(1)), Mode::Cached);
        assert_eq!(third.open(Ino(4), || Some(10)), Mode::Passthrough(9));
    }

    #[test]
    fn without_a_journal_a_successor_passes_nothing_through() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("journal");
        let mut next = Backings::taken_over(device(), true, Some(&path));
        assert_eq!(next.open(Ino(2), || Some(1)), Mode::Cached);
        fs::write(&path, "something else\n").expect("write");
        let mut next = Backings::taken_over(device(), true, Some(&path));
        assert_eq!(next.open(Ino(2), || Some(1)), Mode::Cached);
    }

    #[test]
    fn a_torn_last_line_is_ignored_and_garbage_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("journal");
        fs::write(&path, format!("{HEADER}\np 2 7\nc 3\n- 3\np 5 1")).expect("write");
        let modes = Journal::read(&path).expect("read").expect("a journal");
        assert_eq!(modes, HashMap::from([(Ino(2), Mode::Passthrough(7))]));
        for bad in ["p 2\n", "x 2\n", "c two\n", "p 2 7 8\n", "c 2 \n"] {
            fs::write(&path, format!("{HEADER}\n{bad}")).expect("write");
            assert!(Journal::read(&path).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_journal_is_compacted_as_it_grows() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("journal");
        let mut backings = Backings::fresh(device(), true, Some(&path));
        backings.open(Ino(1), || Some(1));
        for n in 0..3 * COMPACT_SLACK as u64 {
            backings.open(Ino(n + 2), || None);
            backings.release(Ino(n + 2));
        }
        let lines = fs::read_to_string(&path).expect("read").lines().count();
        assert!(lines <= COMPACT_SLACK + 2, "{lines} lines");
        let modes = Journal::read(&path).expect("read").expect("a journal");
        assert_eq!(modes, HashMap::from([(Ino(1), Mode::Passthrough(1))]));
    }
}
