//! How fast can a FUSE server that copies bytes serve a reader on this machine? Mounts one
//! file twice, with the mount options the daemon uses: from a [`MemorySource`] holding it in
//! memory (its reads hand out slices: the only copy is the kernel's, from the reply into the
//! page cache), and from a source whose every byte is in a file on the local disk, answered by
//! [`LayerSource::read_local`] with one `pread` (the daemon's path for stored bytes, without
//! its bookkeeping). Reads each with `dd`-sized reads and with 4 KiB reads at random offsets
//! after dropping the page cache, beside the same bytes in a file on the local disk (what
//! overlayfs reads). Prints a table; root only.
//!
//! `cargo run --release -p lazysnap-fuse --example copy_ceiling -- [MiB] [runs]`

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lazysnap_fuse::{
    mount, Ino, LayerSource, MemorySource, Meta, MountOptions, ReadBuf, SourceError,
};

#[path = "../tests/common/mod.rs"]
mod common;

/// The tree of a [`MemorySource`], whose file contents are read from `file` on disk.
struct OnDisk {
    inner: MemorySource,
    file: File,
}

impl LayerSource for OnDisk {
    crate::delegate_to_inner!(lookup, getattr, readdir, readlink, listxattr, getxattr);

    async fn read(&self, ino: Ino, offset: u64, len: u32) -> Result<Bytes, SourceError> {
        self.inner.read(ino, offset, len).await
    }
    const READS_LOCALLY: bool = true;
    fn read_local(
        &self,
        _ino: Ino,
        offset: u64,
        len: u32,
        buf: &mut ReadBuf,
    ) -> Option<Result<(), SourceError>> {
        let read = self.file.read_exact_at(buf.region(len as usize), offset);
        Some(read.map_err(|e| SourceError::Io(Box::new(e))))
    }
}

/// 4 KiB reads at random 4 KiB-aligned offsets of `path` (2,000, or as many as fit in 5 s),
/// page cache dropped first; reads per second.
fn random_reads(path: &Path) -> std::io::Result<f64> {
    drop_caches()?;
    let file = File::open(path)?;
    let blocks = (file.metadata()?.len() / 4096).max(1);
    let mut buf = vec![0u8; 4096];
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let started = Instant::now();
    let mut done = 0u32;
    while done < 2000 && started.elapsed() < Duration::from_secs(5) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        file.read_exact_at(&mut buf, (x % blocks) * 4096)?;
        done += 1;
    }
    Ok(f64::from(done) / started.elapsed().as_secs_f64())
}

fn drop_caches() -> std::io::Result<()> {
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3")
}

/// MB/s of reading `path` whole in 1 MiB reads, page cache dropped first.
fn read_speed(path: &Path) -> std::io::Result<f64> {
    drop_caches()?;
    let mut file = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let started = Instant::now();
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64() / 1e6)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args.get(1).map_or(Ok(512), |a| a.parse())?;
    let runs: usize = args.get(2).map_or(Ok(5), |a| a.parse())?;
    let mut data = vec![0u8; mib << 20];
    // Incompressible-looking bytes, cheaply.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let dir = tempfile::tempdir_in("/var/tmp")?;
    let on_disk = dir.path().join("a");
    File::create(&on_disk)?.write_all(&data)?;
    let stored = dir.path().join("stored");
    File::create(&stored)?.write_all(&data)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut in_memory = MemorySource::new();
    in_memory.file(Ino::ROOT, "a", Meta::new(0o644), data.clone());
    let mut tree = MemorySource::new();
    tree.file(Ino::ROOT, "a", Meta::new(0o644), data);
    let on_disk_source = OnDisk {
        inner: tree,
        file: File::open(&stored)?,
    };
    let (memory_mnt, disk_mnt) = (dir.path().join("memory"), dir.path().join("disk"));
    std::fs::create_dir(&memory_mnt)?;
    std::fs::create_dir(&disk_mnt)?;
    let memory_handle = mount(
        Arc::new(in_memory),
        &memory_mnt,
        MountOptions::default(),
        runtime.handle().clone(),
    )?;
    let disk_handle = mount(
        Arc::new(on_disk_source),
        &disk_mnt,
        MountOptions::default(),
        runtime.handle().clone(),
    )?;
    let paths = [on_disk, memory_mnt.join("a"), disk_mnt.join("a")];
    let mut seq = [Vec::new(), Vec::new(), Vec::new()];
    let mut random = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..runs {
        // Interleaved, so that the machine's drift reaches all three alike.
        for (i, path) in paths.iter().enumerate() {
            seq[i].push(read_speed(path)?);
            random[i].push(random_reads(path)?);
        }
    }
    memory_handle.unmount()?;
    disk_handle.unmount()?;
    let seq = seq.map(median);
    let random = random.map(median);
    println!(
        "| {mib} MiB, page cache dropped, median of {runs} | 1 MiB reads, MB/s | of the disk | 4 KiB random reads/s | of the disk |"
    );
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (i, what) in [
        "local disk (what overlayfs reads)",
        "FUSE, bytes in the server's memory (one copy)",
        "FUSE, bytes `pread` from a file on the local disk (two copies)",
    ]
    .iter()
    .enumerate()
    {
        println!(
            "| {what} | {:.0} | {:.2} | {:.0} | {:.2} |",
            seq[i],
            seq[i] / seq[0],
            random[i],
            random[i] / random[0]
        );
    }
    Ok(())
}
