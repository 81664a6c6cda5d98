//! What the kernel no longer asks: files and directories are opened by the kernel itself
//! when nothing is passed through, and their pages and listings stay cached across opens as
//! KEEP_CACHE and CACHE_DIR would keep them. Each open saved is a round trip to the daemon
//! for every file a container's start touches. And what it asks in fewer, larger requests:
//! a file read in order, through a wider readahead window.

mod common;

use std::fs;
use std::io::Read;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{pattern, Mounted};
use lazysnap_fuse::{Ino, LayerSource, MemorySource, Meta, MountOptions, NameRequest, SourceError};
use std::sync::Mutex;

/// A [`MemorySource`] that counts the listings and reads it serves.
struct Counting {
    inner: MemorySource,
    listings: AtomicUsize,
    reads: AtomicUsize,
    largest_read: AtomicUsize,
    /// What the kernel asked of names, in order.
    asked: Mutex<Vec<String>>,
}

impl LayerSource for Counting {
    crate::delegate_to_inner!(lookup, getattr, readlink, listxattr, getxattr);

    fn readdir(
        &self,
        dir: Ino,
        offset: u64,
        add: &mut dyn FnMut(lazysnap_fuse::DirEntry<'_>) -> std::ops::ControlFlow<()>,
    ) -> Result<(), SourceError> {
        if offset == 0 {
            self.listings.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.readdir(dir, offset, add)
    }

    async fn read(&self, ino: Ino, offset: u64, len: u32) -> Result<bytes::Bytes, SourceError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.largest_read.fetch_max(len as usize, Ordering::SeqCst);
        self.inner.read(ino, offset, len).await
    }

    fn kernel_asked(&self, request: NameRequest<'_>) {
        let said = match request {
            NameRequest::Lookup { parent, name } => {
                format!("lookup {} {}", parent.0, name.to_string_lossy())
            }
            NameRequest::List(dir) => format!("list {}", dir.0),
            NameRequest::Readlink(ino) => format!("readlink {}", ino.0),
        };
        self.asked.lock().expect("asked").push(said);
    }
}

fn mounted() -> (Arc<Counting>, Mounted) {
    let mut src = MemorySource::new();
    let dir = src.dir(Ino::ROOT, "dir", Meta::new(0o755));
    for i in 0..20 {
        src.file(
            dir,
            &format!("f{i}"),
            Meta::new(0o644),
            format!("file {i}\n"),
        );
    }
    src.file(Ino::ROOT, "big", Meta::new(0o644), pattern(1 << 20));
    src.symlink(Ino::ROOT, "link", Meta::new(0o777), "big");
    let src = Arc::new(Counting {
        inner: src,
        listings: AtomicUsize::new(0),
        reads: AtomicUsize::new(0),
        largest_read: AtomicUsize::new(0),
        asked: Mutex::default(),
    });
    let m = Mounted::new(Arc::clone(&src), MountOptions::default());
    (src, m)
}

#[test]
fn pages_read_once_stay_cached_across_opens_the_kernel_makes_itself() {
    let (src, m) = mounted();
    let mut first = Vec::new();
    fs::File::open(m.path("big"))
        .and_then(|mut f| f.read_to_end(&mut first))
        .expect("first read");
    assert_eq!(first, pattern(1 << 20));
    let reads = src.reads.load(Ordering::SeqCst);
    assert!(reads > 0);
    for _ in 0..3 {
        let again = fs::read(m.path("big")).expect("read again");
        assert_eq!(again, first);
    }
    assert_eq!(
        src.reads.load(Ordering::SeqCst),
        reads,
        "a file read again through new opens came from the page cache"
    );
}

#[test]
fn listings_stay_cached_across_opens_the_kernel_makes_itself() {
    let (src, m) = mounted();
    let names = |m: &Mounted| {
        let mut names: Vec<String> = fs::read_dir(m.path("dir"))
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let first = names(&m);
    assert_eq!(first.len(), 20);
    let listings = src.listings.load(Ordering::SeqCst);
    assert!(listings > 0);
    for _ in 0..3 {
        assert_eq!(names(&m), first);
    }
    assert_eq!(
        src.listings.load(Ordering::SeqCst),
        listings,
        "a directory listed again through new opens came from the kernel's cache"
    );
    // Closing files and directories the kernel opened itself succeeds like any close.
    let file = fs::File::open(m.path("dir/f3")).expect("open");
    drop(file);
    assert_eq!(
        fs::read_to_string(m.path("dir/f3")).expect("read"),
        "file 3\n"
    );
}

#[test]
fn the_source_is_told_of_each_name_request_the_kernel_brings_and_of_no_other() {
    let (src, m) = mounted();
    let asked = |src: &Counting| std::mem::take(&mut *src.asked.lock().expect("asked"));
    // The mount listed the tree itself to find a file to open, which the source is not told
    // of; the open went through the kernel, whose lookup it is told of.
    assert!(
        src.listings.load(Ordering::SeqCst) > 0,
        "the mount's own look"
    );
    let at_mount = asked(&src);
    assert!(
        at_mount.iter().all(|s| s.starts_with("lookup 1 ")),
        "{at_mount:?}"
    );
    assert!(fs::symlink_metadata(m.path("dir/missing")).is_err());
    assert_eq!(asked(&src), ["lookup 1 dir", "lookup 2 missing"]);
    assert_eq!(fs::read_dir(m.path("dir")).expect("read_dir").count(), 20);
    assert_eq!(
        fs::read_link(m.path("link")).expect("readlink"),
        std::path::Path::new("big")
    );
    let said = asked(&src);
    assert_eq!(said.first().map(String::as_str), Some("list 2"), "{said:?}");
    assert!(said.iter().any(|s| s == "lookup 1 link"), "{said:?}");
    assert!(
        said.last().is_some_and(|s| s.starts_with("readlink ")),
        "{said:?}"
    );
    // Answered from the kernel's caches now: the source hears nothing.
    assert!(fs::symlink_metadata(m.path("dir/missing")).is_err());
    let _ = fs::read_dir(m.path("dir")).expect("read_dir").count();
    let _ = fs::read_link(m.path("link")).expect("readlink");
    assert_eq!(asked(&src), Vec::<String>::new());
}

#[test]
fn a_file_read_in_order_arrives_in_requests_larger_than_the_kernels_default_window() {
    let (src, m) = mounted();
    let mut buf = vec![0u8; 64 << 10];
    let mut file = fs::File::open(m.path("big")).expect("open");
    let mut total = 0;
    loop {
        let n = file.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        total += n;
    }
    assert_eq!(total, 1 << 20);
    let largest = src.largest_read.load(Ordering::SeqCst);
    // 128 KiB is what the kernel gives a FUSE mount unless told otherwise.
    assert!(
        largest > 128 << 10,
        "largest read asked of the source: {largest} bytes"
    );
}
