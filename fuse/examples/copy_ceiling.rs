//! How fast can a FUSE server that copies bytes serve a sequential reader on this machine?
//! Mounts a [`MemorySource`] holding one file in memory (its reads hand out slices: the only
//! copy is the kernel's, from the reply into the page cache), with the readahead the daemon
//! uses, and reads it with `dd`-sized reads after dropping the page cache, beside the same
//! bytes in a file on the local disk (what overlayfs reads). Prints a table; root only.
//!
//! `cargo run --release -p lazysnap-fuse --example copy_ceiling -- [MiB] [runs]`

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use lazysnap_fuse::{mount, Ino, MemorySource, Meta, MountOptions};

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
    let mountpoint = dir.path().join("mnt");
    std::fs::create_dir(&mountpoint)?;
    let mut source = MemorySource::new();
    source.file(Ino::ROOT, "a", Meta::new(0o644), data);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let handle = mount(
        Arc::new(source),
        &mountpoint,
        MountOptions::default(),
        runtime.handle().clone(),
    )?;
    let through_fuse = mountpoint.join("a");
    let (mut disk, mut fuse) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        disk.push(read_speed(&on_disk)?);
        fuse.push(read_speed(&through_fuse)?);
    }
    handle.unmount()?;
    let (disk, fuse) = (median(disk), median(fuse));
    println!(
        "| {mib} MiB, 1 MiB reads, page cache dropped, median of {runs} | MB/s | of the disk |"
    );
    println!("| --- | ---: | ---: |");
    println!("| local disk (what overlayfs reads) | {disk:.0} | 1.00 |");
    println!(
        "| FUSE, bytes in the server's memory (one copy) | {fuse:.0} | {:.2} |",
        fuse / disk
    );
    Ok(())
}
