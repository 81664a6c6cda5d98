//! A deterministic fuzz of the gzip index decoder and the layer it builds: mutated real
//! documents (bytes flipped, counts and lengths set huge, cut short, grown) and random
//! documents, under random limits. Nothing may panic or allocate by a claimed count; a
//! document is refused, or it gives an index whose spans and files keep within the layer
//! and the limits. A fixed seed keeps it reproducible; `GZIP_INDEX_FUZZ_CASES` runs more.

use std::io::Write;

use super::build::build;
use super::file::GzipIndex;
use super::*;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A header with every numeric field set, as real tar writers leave them.
fn header() -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_mode(0o644);
    h
}

const DIGEST: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// A real index document, uncompressed: version 3 (`v3`) or 2.
fn sample_raw(v3: bool) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for i in 0..20u64 {
        let data: Vec<u8> = (0..(i * 9000)).map(|k| (k * 7 + i) as u8).collect();
        let mut h = header();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        tar.append_data(&mut h, format!("d{}/f{i}", i % 3), &data[..])
            .expect("file");
    }
    let tar = tar.into_inner().expect("tar");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).expect("gzip");
    let blob = gz.finish().expect("gzip");
    let index = build(
        DIGEST,
        blob.len() as u64,
        &blob[..],
        16 << 10,
        &Limits::default(),
    )
    .expect("index");
    let encoded = if v3 {
        index.encode().expect("encode").index
    } else {
        index.encode_v2().expect("encode")
    };
    zstd::decode_all(&encoded[..]).expect("raw")
}

fn limits(rng: &mut Rng) -> Limits {
    let mut l = Limits::default();
    if rng.below(2) == 0 {
        l.max_entries = rng.below(40);
        l.max_chunk_bytes = 1 + rng.below(64 << 10);
        l.max_toc_bytes = rng.below(1 << 20);
        l.max_path_bytes = rng.below(64);
    }
    l
}

fn mutate(rng: &mut Rng, raw: &[u8]) -> Vec<u8> {
    let mut out = raw.to_vec();
    match rng.below(5) {
        0 => {
            for _ in 0..1 + rng.below(8) {
                let at = rng.below(out.len() as u64) as usize;
                out[at] ^= 1 << rng.below(8);
            }
        }
        1 => {
            // A u32 or u64 somewhere set huge: counts and lengths.
            let at = rng.below(out.len().saturating_sub(8) as u64) as usize;
            let value = [u64::MAX, u64::from(u32::MAX), 1 << 31, 1 << 40][rng.below(4) as usize];
            out[at..at + 8].copy_from_slice(&value.to_le_bytes());
        }
        2 => out.truncate(rng.below(out.len() as u64) as usize),
        3 => out.extend((0..rng.below(100)).map(|_| rng.next() as u8)),
        _ => {
            out = (0..rng.below(400)).map(|_| rng.next() as u8).collect();
            if rng.below(2) == 0 && out.len() >= 8 {
                out[..8].copy_from_slice(b"LZGZIX01");
            }
        }
    }
    out
}

#[test]
fn hostile_index_bytes_are_refused_or_kept_within_bounds() {
    let cases: u64 = std::env::var("GZIP_INDEX_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    let samples = [sample_raw(true), sample_raw(false)];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut accepted, mut refused) = (0, 0);
    for case in 0..cases {
        let limits = limits(&mut rng);
        let bytes = mutate(&mut rng, &samples[(case % 2) as usize]);
        let doc = zstd::encode_all(&bytes[..], 1).expect("zstd");
        match GzipIndex::decode(&doc, &limits) {
            Err(_) => refused += 1,
            Ok(index) => {
                accepted += 1;
                assert!(index.checkpoints.len() as u64 <= limits.max_entries);
                assert!(index.entries.len() as u64 <= limits.max_entries);
                if let Some(blob) = &index.windows {
                    // Every window a version 3 index claims lies within its blob and bound.
                    assert_eq!(index.window_refs.len(), index.checkpoints.len());
                    for r in &index.window_refs {
                        assert!(r.range().end <= blob.size);
                        assert!(r.len <= super::file::MAX_STORED_WINDOW);
                        assert!(r.raw_len <= super::zran::WINDOW as u64);
                    }
                }
                for k in 0..index.checkpoints.len() {
                    let span = index.span_out(k).expect("span");
                    assert!(span.end - span.start <= limits.max_chunk_bytes);
                    let blob = index.span_blob(k).expect("blob range");
                    assert!(blob.end <= index.compressed_size);
                }
                if let Ok(layer) = layer_index(&index, &limits) {
                    assert!(layer.len() as u64 <= limits.max_entries.max(1));
                    for ino in layer.inodes() {
                        let node = layer.node(ino).expect("node");
                        let covered: u64 = node.chunks.iter().map(|c| c.len).sum();
                        if !node.chunks.is_empty() {
                            assert_eq!(covered, node.size);
                        }
                        for c in &node.chunks {
                            assert!(c.within + c.len <= limits.max_chunk_bytes);
                        }
                    }
                }
            }
        }
    }
    assert!(refused > cases / 4, "most hostile documents are refused");
    eprintln!("{cases} cases: {accepted} accepted, {refused} refused");
}

#[test]
fn a_claimed_count_alone_never_allocates() {
    // Magic, a digest, sizes, then a point count of u32::MAX with nothing after it.
    let mut raw = b"LZGZIX01".to_vec();
    raw.extend_from_slice(&(DIGEST.len() as u32).to_le_bytes());
    raw.extend_from_slice(DIGEST.as_bytes());
    raw.extend_from_slice(&100u64.to_le_bytes());
    raw.extend_from_slice(&100u64.to_le_bytes());
    raw.extend_from_slice(&u32::MAX.to_le_bytes());
    let doc = zstd::encode_all(&raw[..], 1).expect("zstd");
    let mut limits = Limits {
        max_entries: u64::MAX,
        ..Limits::default()
    };
    assert!(GzipIndex::decode(&doc, &limits).is_err());
    // A decompression bomb stops at max_toc_bytes.
    let bomb = zstd::encode_all(&vec![0u8; 8 << 20][..], 19).expect("zstd");
    limits.max_toc_bytes = 1 << 20;
    let err = GzipIndex::decode(&bomb, &limits).expect_err("bomb");
    assert!(err.to_string().contains("max_toc_bytes"), "{err}");
}
