//! The table of contents shared by eStargz and zstd:chunked: one JSON document listing every
//! tar entry with its attributes and, for file contents, where each chunk sits in the blob.
//! Field names follow stargz-snapshotter's `estargz.TOCEntry`. [`build_index`] turns it into
//! the layer index.

use std::collections::BTreeMap;
use std::time::SystemTime;

use base64::Engine as _;
use serde::Deserialize;

use crate::chunk::{ChunkDigest, ChunkId, ChunkSpec, FileKey};
use crate::metadata::{
    components, err, Entry, EntryKind, IndexBuilder, Landmark, LayerIndex, Limits, MetadataError,
};

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

/// Parses TOC JSON, refusing (with the reason as `Err(Some(..))`) a document of more than
/// `max_entries` entries before it holds them all: parsed entries cost several times their
/// JSON. `Err(None)` with the JSON error otherwise.
pub fn parse_within(
    json: &[u8],
    max_entries: u64,
) -> Result<Toc, (Option<String>, serde_json::Error)> {
    let over = std::cell::Cell::new(false);
    let mut de = serde_json::Deserializer::from_slice(json);
    let parsed = serde::de::DeserializeSeed::deserialize(
        TocSeed {
            max_entries,
            over: &over,
        },
        &mut de,
    )
    .and_then(|toc| de.end().map(|()| toc));
    parsed.map_err(|e| {
        let reason = over
            .get()
            .then(|| {
                format!(
                    "TOC of more than {max_entries} entries exceeds the limit of {max_entries} ([limits] max_entries)"
                )
            });
        (reason, e)
    })
}

struct TocSeed<'a> {
    max_entries: u64,
    over: &'a std::cell::Cell<bool>,
}

impl<'de> serde::de::DeserializeSeed<'de> for TocSeed<'_> {
    type Value = Toc;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Toc, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for TocSeed<'_> {
    type Value = Toc;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a TOC object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Toc, A::Error> {
        let mut version = None;
        let mut entries = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match key.as_ref() {
                "version" if version.is_none() => version = Some(map.next_value()?),
                "entries" if entries.is_none() => {
                    entries = Some(map.next_value_seed(EntriesSeed {
                        max_entries: self.max_entries,
                        over: self.over,
                    })?)
                }
                "version" | "entries" => {
                    return Err(serde::de::Error::custom(format!("duplicate field `{key}`")))
                }
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(Toc {
            version: version.ok_or_else(|| serde::de::Error::missing_field("version"))?,
            entries: entries.ok_or_else(|| serde::de::Error::missing_field("entries"))?,
        })
    }
}

struct EntriesSeed<'a> {
    max_entries: u64,
    over: &'a std::cell::Cell<bool>,
}

impl<'de> serde::de::DeserializeSeed<'de> for EntriesSeed<'_> {
    type Value = Vec<TocEntry>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for EntriesSeed<'_> {
    type Value = Vec<TocEntry>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of TOC entries")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(entry) = seq.next_element::<TocEntry>()? {
            if out.len() as u64 >= self.max_entries {
                self.over.set(true);
                return Err(serde::de::Error::custom("too many entries"));
            }
            out.push(entry);
        }
        Ok(out)
    }
}

/// Files the formats add to a layer that are not part of the image's contents.
const HIDDEN: &[&str] = &[
    super::TOC_TAR_NAME,
    ".prefetch.landmark",
    ".no.prefetch.landmark",
];

/// Builds the layer index from a TOC whose own bytes start at `toc_offset` in the blob (the
/// end of the last chunk's compressed stream). Checks what only the TOC can get wrong — chunk
/// offsets outside the blob, missing chunk digests, chunk entries that follow no file, bad
/// times and xattrs — and leaves the tree rules and `limits` to `metadata`. A chunk's
/// compressed extent runs to the next chunk's stream, but never further than a stream of the
/// chunk's size can need (`Limits::extent_bound`): the bytes between are tar headers of
/// entries without data, or something the layer should not make us fetch.
pub fn build_index(
    toc: &Toc,
    toc_offset: u64,
    limits: &Limits,
) -> Result<LayerIndex, MetadataError> {
    // Each chunk's compressed stream ends where the next one (or the TOC) starts.
    let mut offsets: Vec<u64> = toc
        .entries
        .iter()
        .filter(|e| e.kind == "chunk" || (e.kind == "reg" && e.size > 0))
        .map(|e| e.offset)
        .collect();
    offsets.push(toc_offset);
    offsets.sort_unstable();
    offsets.dedup();
    let stream_end = |e: &TocEntry| -> Result<u64, MetadataError> {
        let at = offsets.partition_point(|o| *o <= e.offset);
        offsets
            .get(at)
            .copied()
            .filter(|end| *end <= toc_offset)
            .ok_or_else(|| {
                err(
                    &e.name,
                    format!("chunk offset {} outside the blob", e.offset),
                )
            })
    };
    let chunk = |e: &TocEntry, file_size: u64| -> Result<ChunkSpec, MetadataError> {
        let len = if e.chunk_size > 0 {
            e.chunk_size
        } else {
            file_size
                .checked_sub(e.chunk_offset)
                .ok_or_else(|| err(&e.name, "chunk offset past the end of the file"))?
        };
        let reach = Limits::extent_bound(e.inner_offset.saturating_add(len));
        let digest = ChunkDigest::parse(&e.chunk_digest).ok_or_else(|| {
            err(
                &e.name,
                format!("chunk without a sha256 chunkDigest ({:?})", e.chunk_digest),
            )
        })?;
        Ok(ChunkSpec {
            id: ChunkId(0),
            file: FileKey::default(),
            file_offset: e.chunk_offset,
            len,
            blob_range: e.offset..stream_end(e)?.min(e.offset.saturating_add(reach)),
            inner_offset: e.inner_offset,
            within: 0,
            digest,
        })
    };
    let mut builder = IndexBuilder::with_limits(*limits);
    // A regular file waits here for the `chunk` entries that follow it.
    let mut pending: Option<Entry> = None;
    for e in &toc.entries {
        if e.kind == "chunk" {
            let file = pending
                .as_mut()
                .ok_or_else(|| err(&e.name, "chunk without a preceding file"))?;
            if file.name != e.name {
                return Err(err(
                    &e.name,
                    format!("chunk follows a different file, {:?}", file.name),
                ));
            }
            let size = file.size;
            file.chunks.push(chunk(e, size)?);
            continue;
        }
        if let Some(file) = pending.take() {
            builder.add(file)?;
        }
        let parts = components(&e.name).map_err(|r| err(&e.name, r))?;
        if let [base] = parts.as_slice() {
            if HIDDEN.contains(base) {
                match *base {
                    ".prefetch.landmark" => {
                        builder.set_landmark(Landmark::PrefetchBefore(e.offset))
                    }
                    ".no.prefetch.landmark" => builder.set_landmark(Landmark::NoPrefetch),
                    _ => {}
                }
                continue;
            }
        }
        let kind = match e.kind.as_str() {
            "dir" => EntryKind::Dir,
            "reg" => EntryKind::File,
            "symlink" => EntryKind::Symlink {
                target: e.link_name.clone(),
            },
            "hardlink" => EntryKind::HardLink {
                target: e.link_name.clone(),
            },
            "char" => EntryKind::CharDevice {
                major: e.dev_major,
                minor: e.dev_minor,
            },
            "block" => EntryKind::BlockDevice {
                major: e.dev_major,
                minor: e.dev_minor,
            },
            "fifo" => EntryKind::Fifo,
            other => return Err(err(&e.name, format!("unknown entry type {other:?}"))),
        };
        let mut entry = Entry::new(e.name.clone(), kind);
        entry.mode = e.mode;
        entry.uid = e.uid;
        entry.gid = e.gid;
        entry.mtime = parse_time(e)?;
        for (name, value) in &e.xattrs {
            let value = base64::engine::general_purpose::STANDARD
                .decode(value)
                .map_err(|_| err(&e.name, format!("xattr {name:?} is not base64")))?;
            entry.xattrs.push((name.clone(), value));
        }
        if entry.kind == EntryKind::File {
            entry.size = e.size;
            if e.size > 0 {
                entry.chunks.push(chunk(e, e.size)?);
            }
            pending = Some(entry);
        } else {
            builder.add(entry)?;
        }
    }
    if let Some(file) = pending.take() {
        builder.add(file)?;
    }
    Ok(builder.finish())
}

fn parse_time(e: &TocEntry) -> Result<SystemTime, MetadataError> {
    match &e.modtime {
        None => Ok(SystemTime::UNIX_EPOCH),
        Some(t) => humantime::parse_rfc3339_weak(t.trim_end_matches('Z'))
            .map_err(|_| err(&e.name, format!("bad modtime {t:?}"))),
    }
}

#[cfg(test)]
#[path = "toc_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "toc_fuzz_tests.rs"]
mod fuzz_tests;
