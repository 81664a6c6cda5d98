//! A small eStargz writer, so tests can serve layers the converter would never write: hostile
//! names, chunks whose bytes do not match their digest, lying TOC digests, cut footers. Layout
//! as in stargz-snapshotter's spec: every file's data in its own gzip member at `offset`, tar
//! headers in members between them, the TOC (a tar holding `stargz.index.json`) in one member,
//! and the 51-byte footer.

use std::io::Write;

use sha2::{Digest, Sha256};

/// A file of a hand-made eStargz layer.
#[derive(Debug, Clone)]
pub struct File {
    pub name: String,
    pub data: Vec<u8>,
    /// Write this chunk digest into the TOC instead of the real one.
    pub lie_about_digest: bool,
    /// Claim this digest (`sha256:...`) for the file and its chunk in the TOC, whatever its
    /// bytes: a layer that names another image's file without holding it.
    pub claim_digest: Option<String>,
}

impl File {
    pub fn new(name: &str, data: impl Into<Vec<u8>>) -> File {
        File {
            name: name.into(),
            data: data.into(),
            lie_about_digest: false,
            claim_digest: None,
        }
    }

    /// A file whose TOC entry claims `digest` while its bytes are `data`.
    pub fn claiming(name: &str, data: impl Into<Vec<u8>>, digest: &str) -> File {
        File {
            claim_digest: Some(digest.into()),
            ..File::new(name, data)
        }
    }
}

/// A finished layer: its blob, its TOC digest (for the annotation) and its diff ID.
pub struct Layer {
    pub blob: Vec<u8>,
    pub toc_digest: String,
    pub diff_id: String,
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(data).expect("gzip");
    gz.finish().expect("gzip")
}

fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A directory entry of a hand-made eStargz layer, with its attributes.
#[derive(Debug, Clone)]
pub struct Dir {
    /// Ends in `/`.
    pub name: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Dir {
    pub fn new(name: &str, mode: u32, uid: u32, gid: u32) -> Dir {
        Dir {
            name: name.into(),
            mode,
            uid,
            gid,
        }
    }
}

fn tar_header(name: &str, size: u64, kind: tar::EntryType, mode: u32) -> Vec<u8> {
    owned_tar_header(name, size, kind, mode, 0, 0)
}

fn owned_tar_header(
    name: &str,
    size: u64,
    kind: tar::EntryType,
    mode: u32,
    uid: u32,
    gid: u32,
) -> Vec<u8> {
    let mut h = tar::Header::new_gnu();
    // set_path refuses `..`; a hostile layer needs it verbatim.
    let bytes = name.as_bytes();
    h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
    h.set_size(size);
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(u64::from(uid));
    h.set_gid(u64::from(gid));
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    h.as_bytes().to_vec()
}

fn padding(len: u64) -> Vec<u8> {
    vec![0u8; ((512 - len % 512) % 512) as usize]
}

/// Writes `files` (and the directories they need, which must be listed by the caller as
/// names ending in `/`) as an eStargz layer.
pub fn layer(dirs: &[&str], files: &[File]) -> Layer {
    let dirs: Vec<Dir> = dirs.iter().map(|d| Dir::new(d, 0o755, 0, 0)).collect();
    layer_with_toc(&dirs, files, |_| {}, "")
}

/// Like `layer`, with each directory's mode and owner. A directory the files need but
/// `dirs` does not list is left out of the layer, as umoci and several builders do.
pub fn layer_with_dirs(dirs: &[Dir], files: &[File]) -> Layer {
    layer_with_toc(dirs, files, |_| {}, "")
}

/// Like [`layer_with_dirs`], with the TOC rewritten: `edit` changes the entries written for
/// the tar's contents (e.g. a size or offset no converter would write), and `extra` (raw JSON,
/// entries separated by commas) is appended to the entry list — entries in the TOC only, not
/// in the tar, so the ordinary path still unpacks the layer. Raw text, so a test can write a
/// TOC of a million entries without building a million JSON values.
pub fn layer_with_toc(
    dirs: &[Dir],
    files: &[File],
    edit: impl FnOnce(&mut Vec<serde_json::Value>),
    extra: &str,
) -> Layer {
    let mut blob = Vec::new();
    let mut tar_stream = Vec::new();
    let mut entries = Vec::new();
    for dir in dirs {
        let header = owned_tar_header(
            &dir.name,
            0,
            tar::EntryType::Directory,
            dir.mode,
            dir.uid,
            dir.gid,
        );
        tar_stream.extend_from_slice(&header);
        blob.extend(gzip(&header));
        entries.push(serde_json::json!({"name": dir.name, "type": "dir", "mode": dir.mode, "uid": dir.uid, "gid": dir.gid, "modtime": "2023-11-14T22:13:20Z"}));
    }
    for file in files {
        let header = tar_header(
            &file.name,
            file.data.len() as u64,
            tar::EntryType::Regular,
            0o644,
        );
        tar_stream.extend_from_slice(&header);
        blob.extend(gzip(&header));
        let offset = blob.len();
        let mut body = file.data.clone();
        body.extend(padding(file.data.len() as u64));
        tar_stream.extend_from_slice(&body);
        blob.extend(gzip(&body));
        let real = file
            .claim_digest
            .clone()
            .unwrap_or_else(|| digest(&file.data));
        let chunk_digest = if file.lie_about_digest {
            digest(b"something else")
        } else {
            real.clone()
        };
        entries.push(serde_json::json!({
            "name": file.name, "type": "reg", "size": file.data.len(), "mode": 0o644,
            "modtime": "2023-11-14T22:13:20Z", "offset": offset,
            "digest": real, "chunkDigest": chunk_digest,
        }));
    }
    edit(&mut entries);
    let mut toc =
        serde_json::to_vec(&serde_json::json!({"version": 1, "entries": entries})).expect("toc");
    if !extra.is_empty() {
        // `{"entries":[...],"version":1}`: splice before the list's closing bracket.
        let close = toc
            .windows(2)
            .rposition(|w| w == b"],")
            .expect("entry list");
        let mut spliced = toc[..close].to_vec();
        if toc[close - 1] != b'[' {
            spliced.push(b',');
        }
        spliced.extend_from_slice(extra.as_bytes());
        spliced.extend_from_slice(&toc[close..]);
        toc = spliced;
    }
    let toc_offset = blob.len();
    let mut toc_tar = tar_header(
        "stargz.index.json",
        toc.len() as u64,
        tar::EntryType::Regular,
        0o644,
    );
    toc_tar.extend_from_slice(&toc);
    toc_tar.extend(padding(toc.len() as u64));
    toc_tar.extend(vec![0u8; 1024]);
    tar_stream.extend_from_slice(&toc_tar);
    blob.extend(gzip(&toc_tar));
    blob.extend(footer(toc_offset as u64));
    Layer {
        blob,
        toc_digest: digest(&toc),
        diff_id: digest(&tar_stream),
    }
}

/// The 51-byte eStargz footer: an empty gzip member whose extra field carries the TOC offset.
fn footer(toc_offset: u64) -> Vec<u8> {
    let mut out = vec![
        0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff, 26, 0, b'S', b'G', 22, 0,
    ];
    out.extend(format!("{toc_offset:016x}STARGZ").into_bytes());
    // an empty final stored block, then CRC32 and ISIZE of nothing
    out.extend([0x01, 0x00, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(out.len(), 51);
    out
}
