//! The `data` image of the benchmark corpus, for throughput and metadata: busybox, and one
//! layer holding a large incompressible file (`/data/big.bin`, of the size asked for) and 10,000
//! small files (`/data/small/DD/FFFF`, 512 B to 8 KiB, incompressible), all generated
//! deterministically and streamed into the layer.

use std::path::Path;

use super::corpus::CorpusImage;
use super::layout::{self, LayerWriter, RandomReader};

pub const SMALL_FILES: usize = 10_000;
/// Files per directory under /data/small.
pub const PER_DIR: usize = 100;

/// The small file `i` (0-based), relative to the image root.
pub fn small_path(i: usize) -> String {
    format!("data/small/{:02}/{:04}", i / PER_DIR, i)
}

/// The size of small file `i`: spread over 512 B … 8 KiB.
pub fn small_size(i: usize) -> u64 {
    512 + (i as u64).wrapping_mul(2_654_435_761) % (8192 - 512 + 1)
}

pub fn data(layout: &Path, big_mib: u64) -> CorpusImage {
    let busybox = super::debian::cached_layer(layout, "busybox", || {
        let mut w = LayerWriter::create(layout, 6);
        let bin = std::fs::read("/bin/busybox").expect("read /bin/busybox (busybox-static)");
        for dir in ["bin", "tmp", "etc"] {
            w.dir(dir, 0o755);
        }
        w.file("bin/busybox", 0o755, bin.len() as u64, bin.as_slice());
        for applet in super::APPLETS {
            w.symlink(&format!("bin/{applet}"), "busybox");
        }
        w.finish()
    });
    let data = super::debian::cached_layer(layout, &format!("data-{big_mib}m"), || {
        eprintln!("  generating a {big_mib} MiB file and {SMALL_FILES} small files ...");
        // Level 1: the data does not compress anyway, and level 6 only takes longer.
        let mut w = LayerWriter::create(layout, 1);
        w.dir("data", 0o755);
        w.file(
            "data/big.bin",
            0o644,
            big_mib << 20,
            RandomReader::new(big_mib << 20, 1),
        );
        w.dir("data/small", 0o755);
        for i in 0..SMALL_FILES {
            if i % PER_DIR == 0 {
                w.dir(&format!("data/small/{:02}", i / PER_DIR), 0o755);
            }
            let size = small_size(i);
            w.file(
                &small_path(i),
                0o644,
                size,
                RandomReader::new(size, 1000 + i as u64),
            );
        }
        w.finish()
    });
    let layers = vec![busybox, data];
    layout::add_image(layout, "data", &layers, &["/bin/sh"], &["PATH=/bin"]);
    CorpusImage {
        name: "data",
        workload: format!("cat /{} > /dev/null && echo 1", small_path(0)),
        expect: "1",
        layers,
    }
}
