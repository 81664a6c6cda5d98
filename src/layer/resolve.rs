//! Resolving a layer: which of the known formats it is in, and its verified index. A layer
//! whose state is still saved (another snapshot of it is there) is taken from there without a
//! request, when the image pins the same TOC; otherwise the blob's size and last
//! [`SUFFIX_BYTES`] are fetched in one request and shown to every format that could claim the
//! layer (the index is usually within them, so resolving takes one round trip; when a footer
//! places the index earlier, only the part the suffix lacks is fetched next, on the same
//! connection, before any request ahead).
//!
//! Resolving ahead: the first Prepare of an image's layer names all the image's layers; their
//! suffixes are fetched in the background ([`Resolver::resolve_ahead`]), so that each layer's
//! own Prepare finds its bytes there (or waits for the request already under way) instead of
//! paying a round trip. When a suffix's footer places the index before the suffix (a TOC of
//! a few hundred KiB), the rest of the index is fetched ahead too, and the layer is opened
//! from them on a blocking thread (its index parsed: most of a Prepare's own work). Only raw
//! bytes and what they parse to are kept, never a verdict: the layer's own Prepare verifies
//! the index in them against the TOC digest of its own labels, as ever, and takes the layer
//! opened ahead only when its verified parameters (which name the index's digest) are the
//! ones it was opened with.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::runtime::Handle;
use tokio::sync::{OnceCell, Semaphore};

use super::gzip_lookup::{IndexLookup, Lookup};
use super::{LayerError, LayerSource, LayerState, RegistryBlob, StateDir};
use crate::format::{
    gzip_index, ExternalIndex, Formats, LayerHints, Opened, Probe, TOC_DIGEST_ANNOTATION,
};
use crate::registry::{Reference, RegistryClient};

/// How much of a blob's end resolving fetches in its one request: the footer and, for small
/// and middling layers, the whole index (a bigger TOC costs one more request). Kept small
/// because a layer that turns out not to be lazy pays for it in vain, and so does each layer
/// resolved ahead.
pub const SUFFIX_BYTES: u64 = 64 << 10;
/// How long a suffix fetched ahead waits for its layer's Prepare.
const AHEAD_FOR: Duration = Duration::from_secs(120);
/// At most this many layers' suffixes are kept or under way ahead (so at most this many
/// times [`SUFFIX_BYTES`] of memory).
const MAX_AHEAD: usize = 64;
/// At most this many requests ahead at once.
const AHEAD_CONCURRENCY: usize = 4;
/// The most of a layer's index, beyond its suffix, fetched ahead with it (so at most
/// [`MAX_AHEAD`] times this more memory); a bigger index is left to the layer's Prepare.
const AHEAD_INDEX_BYTES: u64 = 1 << 20;

/// At most this many layers opened ahead are held at once (each is its parsed index).
const MAX_OPENED_AHEAD: usize = AHEAD_CONCURRENCY;

/// A blob's size and last bytes, or `None` when fetching them failed.
type Suffix = Option<(u64, Bytes)>;

struct Ahead {
    /// The fetch, shared by the background task and the layer's Prepare; `None` once the
    /// Prepare took it (the entry stays, so the layer is not fetched ahead again).
    cell: Option<Arc<OnceCell<Suffix>>>,
    /// The layer opened from the bytes fetched, once it is.
    opened: Arc<Mutex<OpenedSlot>>,
    until: Instant,
}

/// Where a layer opened ahead waits for its Prepare.
enum OpenedSlot {
    Pending,
    Ready(OpenedAhead),
    /// The Prepare came (and took it, or opened the layer itself): whatever is opened
    /// now is dropped.
    Taken,
}

/// A layer opened from bytes fetched ahead, with the index its format found in them,
/// unpinned (`LayerFormat::resolve_unpinned`): its Prepare takes it only if its own,
/// verified `resolve` comes to the same format and parameters (which name the digest of the
/// index), and opens the layer itself otherwise.
struct OpenedAhead {
    format: &'static str,
    params: serde_json::Value,
    opened: Opened,
    /// Counts it against [`MAX_OPENED_AHEAD`] while it is held.
    _held: HeldOpened,
}

struct HeldOpened(Arc<AheadMap>);

impl Drop for HeldOpened {
    fn drop(&mut self) {
        self.0.opened.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Suffixes fetched ahead, by (reference, layer digest).
struct AheadMap {
    entries: Mutex<HashMap<(String, String), Ahead>>,
    limit: Semaphore,
    /// Layers opened ahead (or being opened) and not yet taken or dropped.
    opened: AtomicUsize,
}

#[derive(Clone)]
pub struct Resolver {
    registry: RegistryClient,
    formats: Formats,
    ahead: Arc<AheadMap>,
    /// Images' gzip indexes, looked up once per image.
    gzip_indexes: Arc<IndexLookup>,
}

impl Resolver {
    pub fn new(registry: RegistryClient, formats: Formats) -> Self {
        Resolver {
            gzip_indexes: Arc::new(IndexLookup::new(registry.clone())),
            registry,
            formats,
            ahead: Arc::new(AheadMap {
                entries: Mutex::default(),
                limit: Semaphore::new(AHEAD_CONCURRENCY),
                opened: AtomicUsize::new(0),
            }),
        }
    }

    fn ahead_entries(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Ahead>> {
        self.ahead.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fetches, in the background on `runtime`, the suffixes of `layers` of the image pulled
    /// as `reference`, for their own Prepares to come (a few at a time, each layer once).
    /// Nothing is trusted from them until that Prepare verifies the index.
    pub fn resolve_ahead(
        &self,
        runtime: &Handle,
        reference: &str,
        layers: impl IntoIterator<Item = String>,
    ) {
        let Ok(parsed) = Reference::parse(reference) else {
            return;
        };
        if self.gzip_indexes.has_index(&parsed) {
            // The image's layers are resolved through its gzip index: no suffix is needed.
            return;
        }
        let now = Instant::now();
        let mut entries = self.ahead_entries();
        entries.retain(|_, a| a.until > now);
        let mut started = 0usize;
        for digest in layers {
            if entries.len() >= MAX_AHEAD {
                break;
            }
            let key = (reference.to_owned(), digest.clone());
            if entries.contains_key(&key) {
                continue;
            }
            let cell = Arc::new(OnceCell::new());
            let opened = Arc::new(Mutex::new(OpenedSlot::Pending));
            entries.insert(
                key,
                Ahead {
                    cell: Some(cell.clone()),
                    opened: opened.clone(),
                    until: now + AHEAD_FOR,
                },
            );
            started += 1;
            let this = self.clone();
            let parsed = parsed.clone();
            runtime.spawn(async move {
                let suffix = {
                    let Ok(_permit) = this.ahead.limit.acquire().await else {
                        return;
                    };
                    cell.get_or_init(|| this.fetch_suffix(&parsed, &digest))
                        .await
                        .clone()
                };
                if let Some((size, bytes)) = suffix {
                    this.open_ahead(&digest, size, bytes, opened).await;
                }
            });
        }
        if started > 0 {
            tracing::debug!(
                reference,
                layers = started,
                "resolving the image's other layers ahead"
            );
        }
    }

    /// Opens the layer from its bytes fetched ahead, on a blocking thread, and leaves it in
    /// `slot` for its Prepare (within [`MAX_OPENED_AHEAD`]): parsing an index is most of a
    /// Prepare whose bytes are here, and the CPU is mostly idle while the first layer's
    /// index is on the wire. Nothing is trusted from it until the Prepare's own `resolve`
    /// agrees (`take_opened_ahead`).
    async fn open_ahead(
        &self,
        digest: &str,
        size: u64,
        bytes: Bytes,
        slot: Arc<Mutex<OpenedSlot>>,
    ) {
        if !matches!(
            *slot.lock().unwrap_or_else(|p| p.into_inner()),
            OpenedSlot::Pending
        ) {
            // Its Prepare came while the bytes were on the wire.
            return;
        }
        if self.ahead.opened.fetch_add(1, Ordering::AcqRel) >= MAX_OPENED_AHEAD {
            self.ahead.opened.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        let held = HeldOpened(self.ahead.clone());
        let formats = self.formats.clone();
        let digest = digest.to_owned();
        let opening = tokio::task::spawn_blocking(move || {
            let (format, resolved) = formats
                .iter()
                .find_map(|f| Some((f.clone(), f.resolve_unpinned(&bytes, size)?)))?;
            match format.open(&resolved) {
                Ok(opened) => Some(OpenedAhead {
                    format: format.name(),
                    params: resolved.params,
                    opened,
                    _held: held,
                }),
                Err(e) => {
                    tracing::debug!(layer = %digest, error = %crate::error_chain(&e), "opening a layer ahead failed; its Prepare opens it");
                    None
                }
            }
        });
        if let Ok(Some(opened)) = opening.await {
            let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
            if matches!(*slot, OpenedSlot::Pending) {
                *slot = OpenedSlot::Ready(opened);
            }
        }
    }

    /// The layer `source` opened ahead, if it was and is what `format` and `params` (its
    /// verified resolution) describe. Called once per Prepare: after it, nothing opened
    /// ahead for the layer is kept.
    pub fn take_opened_ahead(
        &self,
        source: &LayerSource,
        format: &str,
        params: &serde_json::Value,
    ) -> Option<Opened> {
        let slot = self
            .ahead_entries()
            .get(&(source.reference.clone(), source.digest.clone()))
            .map(|a| a.opened.clone())?;
        let taken = std::mem::replace(
            &mut *slot.lock().unwrap_or_else(|p| p.into_inner()),
            OpenedSlot::Taken,
        );
        let OpenedSlot::Ready(ahead) = taken else {
            return None;
        };
        if ahead.format != format || ahead.params != *params {
            tracing::debug!(layer = %source.digest, "the layer opened ahead is not the one its Prepare resolved; opening it again");
            return None;
        }
        Some(ahead.opened)
    }

    /// Opens, in the background on `runtime`, a connection for each of the requests
    /// [`Self::resolve_ahead`] will make first for `layers` (those not under way or kept
    /// already; at most [`AHEAD_CONCURRENCY`]): called as the first of the image's Prepares
    /// starts, so that those handshakes overlap its own first request, and the requests ahead,
    /// which wait for it, find connections open.
    pub fn open_connections_ahead(&self, runtime: &Handle, reference: &str, layers: &[String]) {
        let Ok(parsed) = Reference::parse(reference) else {
            return;
        };
        if self.gzip_indexes.has_index(&parsed) {
            return;
        }
        let wanted = {
            let now = Instant::now();
            let entries = self.ahead_entries();
            layers
                .iter()
                .filter(|d| {
                    entries
                        .get(&(reference.to_owned(), (*d).clone()))
                        .is_none_or(|a| a.until <= now)
                })
                .count()
                .min(AHEAD_CONCURRENCY)
        };
        for _ in 0..wanted {
            let registry = self.registry.clone();
            let parsed = parsed.clone();
            runtime.spawn(async move { registry.open_connection(&parsed).await });
        }
    }

    async fn fetch_suffix(&self, reference: &Reference, digest: &str) -> Suffix {
        match self
            .registry
            .read_suffix(reference, digest, SUFFIX_BYTES)
            .await
        {
            Ok((size, tail)) => Some(
                self.with_index(
                    reference,
                    digest,
                    size,
                    tail,
                    Some(AHEAD_INDEX_BYTES),
                    || {},
                )
                .await,
            ),
            Err(e) => {
                tracing::debug!(layer = %digest, error = %crate::error_chain(&e), "fetching a layer's suffix ahead failed; its Prepare fetches it again");
                None
            }
        }
    }

    /// The suffix extended back to the start of the layer's index, when a footer in it says
    /// the index begins earlier: typical layers' TOCs are a few hundred KiB, and only the part
    /// the suffix lacks is fetched. Ahead (`ahead_limit`: at most that many bytes earlier),
    /// in the background, this spares the layer's Prepare its second round trip; in the
    /// Prepare itself (`None`), these are the bytes the format would fetch, minus those
    /// already here, within the formats' own index limits (`index_range`). The footer is not
    /// trusted: the Prepare verifies whatever index it finds in the bytes.
    ///
    /// `sent` runs once the index's request is out (or at once, when none is needed): see
    /// [`first_polled`].
    async fn with_index(
        &self,
        reference: &Reference,
        digest: &str,
        size: u64,
        tail: Bytes,
        ahead_limit: Option<u64>,
        sent: impl FnOnce(),
    ) -> (u64, Bytes) {
        let max_head = ahead_limit.unwrap_or(u64::MAX);
        let tail_offset = size.saturating_sub(tail.len() as u64);
        let start = self
            .formats
            .iter()
            .filter_map(|f| f.index_range(&tail, size))
            .map(|r| r.start)
            .min();
        let Some(start) = start.filter(|s| *s < tail_offset && tail_offset - *s <= max_head) else {
            sent();
            return (size, tail);
        };
        let fetched = first_polled(
            self.registry
                .read_range(reference, digest, start..tail_offset),
            sent,
        )
        .await;
        match fetched {
            Ok(head) if head.len() as u64 == tail_offset - start => {
                if ahead_limit.is_some() {
                    tracing::debug!(layer = %digest, bytes = head.len(), "fetched the layer's index ahead");
                } else {
                    tracing::debug!(layer = %digest, bytes = head.len(), "fetched the rest of the layer's index");
                }
                let mut whole = bytes::BytesMut::with_capacity(head.len() + tail.len());
                whole.extend_from_slice(&head);
                whole.extend_from_slice(&tail);
                (size, whole.freeze())
            }
            Ok(head) => {
                tracing::debug!(layer = %digest, got = head.len(), wanted = tail_offset - start, "the registry sent a short index range; the format fetches the index itself");
                (size, tail)
            }
            Err(e) => {
                tracing::debug!(layer = %digest, error = %crate::error_chain(&e), "fetching a layer's index failed; the format fetches it itself");
                (size, tail)
            }
        }
    }

    /// The blob's size and last [`SUFFIX_BYTES`]: fetched ahead (or being fetched, then
    /// awaited), else fetched now.
    async fn suffix(
        &self,
        reference: &Reference,
        source: &LayerSource,
    ) -> Result<(u64, Bytes), crate::registry::RegistryError> {
        let key = (source.reference.clone(), source.digest.clone());
        let cell = {
            let now = Instant::now();
            let mut entries = self.ahead_entries();
            entries
                .get_mut(&key)
                .filter(|a| a.until > now)
                .and_then(|a| {
                    // A layer not opened ahead yet is opened by this Prepare, not twice.
                    let mut opened = a.opened.lock().unwrap_or_else(|p| p.into_inner());
                    if matches!(*opened, OpenedSlot::Pending) {
                        *opened = OpenedSlot::Taken;
                    }
                    a.cell.take()
                })
        };
        if let Some(cell) = cell {
            let got = cell
                .get_or_init(|| self.fetch_suffix(reference, &source.digest))
                .await;
            if let Some(suffix) = got {
                tracing::debug!(layer = %source.digest, "using the suffix fetched ahead");
                return Ok(suffix.clone());
            }
        }
        self.registry
            .read_suffix(reference, &source.digest, SUFFIX_BYTES)
            .await
    }

    pub fn formats(&self) -> &Formats {
        &self.formats
    }

    pub fn registry(&self) -> &RegistryClient {
        &self.registry
    }

    /// The blob of a layer, for its reader.
    pub fn blob(&self, source: &LayerSource) -> Result<Arc<RegistryBlob>, LayerError> {
        let reference = parse_reference(source)?;
        Ok(Arc::new(RegistryBlob::new(
            self.registry.clone(),
            reference,
            source.digest.clone(),
        )))
    }

    /// Another blob of the layer's repository that its decoder reads (a gzip-index layer's
    /// windows, `Opened::side_blob`), for its reader.
    pub fn side_blob(
        &self,
        source: &LayerSource,
        digest: &str,
    ) -> Result<Arc<RegistryBlob>, LayerError> {
        let reference = parse_reference(source)?;
        Ok(Arc::new(RegistryBlob::new(
            self.registry.clone(),
            reference,
            digest.to_owned(),
        )))
    }

    /// The layer's saved state, if one is there for the same blob and the image pins the
    /// same TOC: no registry request. The state's format must still accept the layer's
    /// labels, and its saved TOC digest must be the one the labels pin; opening it
    /// (`layer::open`) verifies the saved index against that digest again. The reference is
    /// the one being pulled now (its repository and credentials serve the reads). Blocking
    /// (reads the state): call from a blocking thread.
    pub fn saved(
        &self,
        states: &StateDir,
        source: &LayerSource,
        annotations: &BTreeMap<String, String>,
    ) -> Option<LayerState> {
        let pinned = source.toc_digest.as_deref()?;
        let mut state = states.load(&source.digest).ok()?;
        let hints = LayerHints {
            digest: &source.digest,
            annotations,
            external: None,
        };
        let format = self.formats.by_name(&state.format)?;
        let params_toc = state
            .resolved
            .params
            .get("toc_digest")
            .and_then(|v| v.as_str());
        let same = state.source.digest == source.digest
            && state.source.toc_digest.as_deref() == Some(pinned)
            && params_toc.is_none_or(|t| t == pinned)
            && format.accepts(&hints).is_ok();
        if !same {
            tracing::debug!(layer = %source.digest, "saved state is for another TOC; resolving again");
            return None;
        }
        tracing::debug!(layer = %source.digest, format = format.name(), "reusing saved layer state");
        state.source = source.clone();
        Some(state)
    }

    /// Finds the layer's format and its verified index. `NotLazy` when no format claims it;
    /// the labels alone decide that when they can, before any request. `answered` runs once
    /// the registry has answered the layer's first request (or at once when none is needed),
    /// and the rest of the layer's index, when its suffix lacks it, has been requested, before
    /// the index is checked: the caller starts resolving the image's other layers ahead from
    /// there, with the registry's way of authenticating known, while this layer's index is
    /// still on the wire.
    pub async fn resolve(
        &self,
        source: &LayerSource,
        annotations: &BTreeMap<String, String>,
        answered: impl FnOnce(),
    ) -> Result<LayerState, LayerError> {
        let layer = &source.digest;
        let reference = parse_reference(source)?;
        let (external, listed_size) = match self.gzip_index(&reference, source, annotations).await?
        {
            Some((index, size)) => (Some(index), size),
            None => (None, None),
        };
        let hints = LayerHints {
            digest: layer,
            annotations,
            external: external.as_ref(),
        };
        let mut reasons = Vec::new();
        let candidates: Vec<_> = self
            .formats
            .iter()
            .filter(|f| match f.accepts(&hints) {
                Ok(()) => true,
                Err(why) => {
                    reasons.push(why);
                    false
                }
            })
            .cloned()
            .collect();
        if candidates.is_empty() {
            reasons.dedup();
            return Err(LayerError::NotLazy {
                layer: layer.clone(),
                reason: reasons.join("; "),
            });
        }
        let blob = self.blob(source)?;
        let registry_error = |what| {
            let layer = layer.clone();
            move |source| LayerError::Registry {
                layer,
                what,
                source,
            }
        };
        let (blob_size, tail) = match (&external, listed_size) {
            // An indexed layer needs no footer, and its size comes from the image manifest
            // (the index must agree with it): no request.
            (Some(_), Some(size)) => {
                answered();
                (size, bytes::Bytes::new())
            }
            _ => {
                let (size, tail) = self
                    .suffix(&reference, source)
                    .await
                    .map_err(registry_error("reading the blob's size and last bytes"))?;
                // The rest of this layer's index (when the suffix lacks it) is requested
                // before the other layers' requests ahead start, so that it goes out on the
                // connection the suffix came on instead of waiting for a new one of its own,
                // and ahead of theirs on the link. Bounded by the formats' own index limits
                // (`index_range`), as the format's own fetch of it would be.
                self.with_index(&reference, layer, size, tail, None, answered)
                    .await
            }
        };
        let probe = Probe {
            hints,
            blob_size,
            tail_offset: blob_size.saturating_sub(tail.len() as u64),
            tail,
            blob: &*blob,
        };
        for format in candidates {
            let found = format
                .resolve(&probe)
                .await
                .map_err(|source| LayerError::Format {
                    layer: layer.clone(),
                    source,
                })?;
            if let Some(resolved) = found {
                tracing::debug!(layer = %layer, format = format.name(), "resolved layer");
                let mut source = source.clone();
                if format.name() == gzip_index::NAME {
                    // The index the chunks are verified against scopes them in the store, as
                    // a TOC digest does.
                    source.toc_digest = external.as_ref().map(|x| x.digest.clone());
                }
                return Ok(LayerState {
                    source,
                    blob_size,
                    format: format.name().to_owned(),
                    resolved,
                });
            }
        }
        Err(LayerError::NotLazy {
            layer: layer.clone(),
            reason: format!(
                "no eStargz or zstd:chunked footer in the last {} bytes of the blob",
                probe.tail.len()
            ),
        })
    }
}

impl Resolver {
    /// The layer's gzip index from the registry, when the layer has no TOC of its own and
    /// the image has one. A layer the image's index leaves out takes the ordinary path at
    /// once.
    async fn gzip_index(
        &self,
        reference: &Reference,
        source: &LayerSource,
        annotations: &BTreeMap<String, String>,
    ) -> Result<Option<(ExternalIndex, Option<u64>)>, LayerError> {
        if annotations.contains_key(TOC_DIGEST_ANNOTATION)
            || self.formats.by_name(gzip_index::NAME).is_none()
        {
            return Ok(None);
        }
        match self.gzip_indexes.find(reference, &source.digest).await {
            Lookup::Found(index, size) => Ok(Some((index, size))),
            Lookup::NotIndexed => Err(LayerError::NotLazy {
                layer: source.digest.clone(),
                reason: "the image's gzip index leaves this layer out (too small to be worth it)"
                    .into(),
            }),
            Lookup::Missing(why) => {
                tracing::info!(layer = %source.digest, reason = %why, "no gzip index for the layer");
                Ok(None)
            }
        }
    }
}

/// Polls `request` once, runs `sent`, then finishes `request`. A registry request checks a
/// connection out of the client's pool when it is first polled (an idle one if there is
/// one), before its first await that waits: whatever `sent` starts then cannot take that
/// connection from it.
async fn first_polled<F: std::future::Future>(request: F, sent: impl FnOnce()) -> F::Output {
    let mut request = std::pin::pin!(request);
    let mut sent = Some(sent);
    std::future::poll_fn(|cx| {
        let polled = request.as_mut().poll(cx);
        if let Some(sent) = sent.take() {
            sent();
        }
        polled
    })
    .await
}

fn parse_reference(source: &LayerSource) -> Result<Reference, LayerError> {
    Reference::parse(&source.reference).map_err(|e| LayerError::Reference {
        layer: source.digest.clone(),
        reference: source.reference.clone(),
        source: e,
    })
}
