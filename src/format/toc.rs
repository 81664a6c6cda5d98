//! The table of contents shared by eStargz and zstd:chunked: one JSON document listing every
//! tar entry with its attributes and, for file contents, where each chunk sits in the blob.
//! Field names follow stargz-snapshotter's `estargz.TOCEntry`.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The TOC document.
#[derive(Debug, Clone, Deserialize)]
pub struct Toc {
    pub version: u32,
    pub entries: Vec<TocEntry>,
}

/// One TOC entry: a tar entry, or (type `chunk`) a further chunk of the preceding file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct TocEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub size: u64,
    pub modtime: Option<String>,
    pub link_name: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub dev_major: u32,
    pub dev_minor: u32,
    /// Values are base64 in the JSON (Go's `[]byte`).
    pub xattrs: BTreeMap<String, String>,
    /// Digest of the whole file (regular files only).
    pub digest: String,
    /// Blob offset of the compressed stream holding this chunk.
    pub offset: u64,
    /// Where this chunk starts in the file.
    pub chunk_offset: u64,
    /// Uncompressed length of this chunk; 0 means "to the end of the file".
    pub chunk_size: u64,
    pub chunk_digest: String,
    /// Where this chunk starts inside its decompressed stream (newer zstd:chunked).
    pub inner_offset: u64,
}
