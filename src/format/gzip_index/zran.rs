//! Random access into a gzip stream, zlib's `zran.c` method: inflating the stream once, a
//! [`CheckpointingInflater`] records a checkpoint at deflate block boundaries every `span`
//! bytes of output (the compressed offset, the bits of the previous byte still unread, and the
//! 32 KiB of output before it); [`inflate_span`] later resumes raw inflation at a checkpoint
//! from just the compressed bytes after it, primed with those bits and that window. Between
//! checkpoints it also marks finer block boundaries ([`Mark`]): where a read that needs only
//! the start of a span may stop fetching. Asked to ([`Cuts`]), it also takes checkpoints at
//! given block boundaries and marks given output positions, inside a block if need be: a read
//! can stop anywhere its output is complete, but resumes only at a boundary.
//!
//! zlib's `inflatePrime`, `inflateSetDictionary` and `inflate(Z_BLOCK)` with `data_type` are
//! not in flate2's safe API; they come from `libz-rs-sys` (zlib's C API implemented in Rust,
//! so no C zlib is needed to build). The unsafe calls are confined to [`Stream`].

use std::io::Read;

use libz_rs_sys as z;

/// Bytes of history a deflate stream may refer back to.
pub const WINDOW: usize = 32 << 10;
/// The gzip trailer after each member's deflate data: CRC-32 and size.
const GZIP_TRAILER: usize = 8;
/// zlib's window bits: raw deflate, gzip only, gzip or zlib detected.
const RAW: i32 = -15;
const GZIP: i32 = 31;
const GZIP_OR_ZLIB: i32 = 47;

/// Why inflating failed.
#[derive(Debug, thiserror::Error)]
pub enum ZranError {
    #[error("zlib refused to start inflating (code {0})")]
    Init(i32),
    #[error("zlib refused the resume point's bits or window (code {0})")]
    Prime(i32),
    #[error("the compressed data is not valid deflate (code {code}) after {out} bytes of output")]
    Data { code: i32, out: u64 },
    #[error("the compressed data ended after {got} of {want} bytes of output")]
    Short { got: u64, want: u64 },
    #[error("reading the compressed stream")]
    Read(#[source] std::io::Error),
    #[error("more than {0} checkpoints")]
    TooManyCheckpoints(usize),
}

/// Stretches of a window, each its start and length.
pub type Stretches = Vec<(u16, u16)>;

/// Where decompression can resume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Uncompressed offset.
    pub out: u64,
    /// Compressed offset of the first byte not entirely consumed.
    pub input: u64,
    /// Bits (0-7) of the byte before `input` that are still to be read.
    pub bits: u8,
    /// Up to [`WINDOW`] bytes of output just before `out`.
    pub window: Vec<u8>,
    /// The stretches of `window` (start, length) that inflating from here reads: most
    /// spans refer back to about a tenth of their window, so an index need keep only those
    /// bytes. `None`: not known, the whole window counts.
    pub used: Option<Stretches>,
}

/// A deflate block boundary: inflating from the previous checkpoint up to uncompressed offset
/// `out` needs the compressed bytes before `input` and the partial byte at it. Every
/// checkpoint is a mark too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    pub out: u64,
    pub input: u64,
}

impl Checkpoint {
    /// Where the compressed bytes needed to resume here start.
    pub fn fetch_from(&self) -> u64 {
        self.input.saturating_sub(u64::from(self.bits > 0))
    }
}

/// One zlib inflate stream. Boxed because zlib's state points back at it: it must not move
/// between calls.
struct Stream(Box<z::z_stream>);

impl Stream {
    fn new(window_bits: i32) -> Result<Self, ZranError> {
        let mut stream = Box::new(z::z_stream::default());
        // SAFETY: `stream` is a valid, default-initialised z_stream (allocator fields set by
        // its Default), it stays at this heap address for its whole life, and the version
        // string is the library's own NUL-terminated one.
        let code = unsafe {
            z::inflateInit2_(
                &mut *stream,
                window_bits,
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as i32,
            )
        };
        if code != z::Z_OK {
            return Err(ZranError::Init(code));
        }
        Ok(Stream(stream))
    }

    fn reset(&mut self, window_bits: i32) -> Result<(), ZranError> {
        // SAFETY: the stream was initialised by `inflateInit2_` in `new` and not ended.
        let code = unsafe { z::inflateReset2(&mut *self.0, window_bits) };
        if code != z::Z_OK {
            return Err(ZranError::Init(code));
        }
        Ok(())
    }

    fn prime(&mut self, bits: u8, value: u8) -> Result<(), ZranError> {
        // SAFETY: initialised stream; zlib checks `bits` (at most 16) itself.
        let code = unsafe { z::inflatePrime(&mut *self.0, i32::from(bits), i32::from(value)) };
        if code != z::Z_OK {
            return Err(ZranError::Prime(code));
        }
        Ok(())
    }

    fn set_dictionary(&mut self, window: &[u8]) -> Result<(), ZranError> {
        if window.is_empty() {
            return Ok(());
        }
        // SAFETY: initialised raw stream; `window` is valid for reads of its length (at most
        // WINDOW bytes, checked by callers, so the length fits a u32).
        let code =
            unsafe { z::inflateSetDictionary(&mut *self.0, window.as_ptr(), window.len() as u32) };
        if code != z::Z_OK {
            return Err(ZranError::Prime(code));
        }
        Ok(())
    }

    /// One `inflate` call from `input` into `output`; returns (zlib's code, bytes consumed,
    /// bytes produced). Lengths are capped at u32::MAX per call, as zlib's counters are.
    fn inflate(&mut self, input: &[u8], output: &mut [u8], flush: i32) -> (i32, usize, usize) {
        let avail_in = input.len().min(u32::MAX as usize);
        let avail_out = output.len().min(u32::MAX as usize);
        self.0.next_in = input.as_ptr();
        self.0.avail_in = avail_in as u32;
        self.0.next_out = output.as_mut_ptr();
        self.0.avail_out = avail_out as u32;
        // SAFETY: initialised stream; next_in/next_out point into `input` and `output`, which
        // outlive the call and are valid for the lengths given; zlib writes only within
        // `avail_out` bytes of `next_out`.
        let code = unsafe { z::inflate(&mut *self.0, flush) };
        let consumed = avail_in - self.0.avail_in as usize;
        let produced = avail_out - self.0.avail_out as usize;
        // Never leave pointers to the caller's buffers behind.
        self.0.next_in = std::ptr::null();
        self.0.avail_in = 0;
        self.0.next_out = std::ptr::null_mut();
        self.0.avail_out = 0;
        (code, consumed, produced)
    }

    fn data_type(&self) -> i32 {
        self.0.data_type
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: initialised by `inflateInit2_` in `new`, ended only here.
        unsafe {
            z::inflateEnd(&mut *self.0);
        }
    }
}

/// Inflates a gzip stream (one or more members) as a `Read` of its uncompressed bytes,
/// recording a [`Checkpoint`] at the first deflate block boundary at least `span` bytes of
/// output after the previous one (and one at the start).
pub struct CheckpointingInflater<R> {
    inner: R,
    stream: Stream,
    input: Vec<u8>,
    in_pos: usize,
    in_len: usize,
    inner_done: bool,
    /// Compressed bytes consumed by zlib so far.
    total_in: u64,
    total_out: u64,
    /// The last output, at most 2 * WINDOW bytes (trimmed to WINDOW when it grows past).
    history: Vec<u8>,
    span: u64,
    /// The least output between marks.
    part: u64,
    max_checkpoints: usize,
    checkpoints: Vec<Checkpoint>,
    marks: Vec<Mark>,
    done: bool,
    /// The compressed bytes from the newest checkpoints on, until a window's worth of
    /// output follows them: what finding the bytes of its window the stream reads needs.
    captures: Vec<Capture>,
    /// The last input byte consumed (the partial byte a checkpoint may start inside).
    last_in: u8,
    /// Every block boundary a checkpoint could be taken at, in output bytes (at most
    /// `max_checkpoints` of them): where a later build may be asked to put one.
    boundaries: Vec<u64>,
    /// Output positions that must start a span (block boundaries from an earlier pass) and
    /// end a part (anywhere), beyond the regular ones; each sorted, with the next one due.
    cuts: Cuts,
    next_point: usize,
    next_end: usize,
}

/// Where a build cuts the stream beyond its regular spans and parts, in uncompressed bytes:
/// `points` (block boundaries, as [`CheckpointingInflater::finish_with_boundaries`] lists them) start a
/// span, `ends` end a part, exactly there. Both sorted. A point that is not a boundary of
/// the stream is passed over.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cuts {
    pub points: Vec<u64>,
    pub ends: Vec<u64>,
}

/// Compressed bytes after checkpoint `point`, from [`Checkpoint::fetch_from`].
struct Capture {
    point: usize,
    bytes: Vec<u8>,
}

impl<R: Read> CheckpointingInflater<R> {
    /// A checkpoint every `span` bytes of output and a mark every `part` (marks count against
    /// `max_checkpoints` too, so memory stays bounded by it).
    pub fn new(inner: R, span: u64, part: u64, max_checkpoints: usize) -> Result<Self, ZranError> {
        Ok(CheckpointingInflater {
            inner,
            stream: Stream::new(GZIP_OR_ZLIB)?,
            input: vec![0; 256 << 10],
            in_pos: 0,
            in_len: 0,
            inner_done: false,
            total_in: 0,
            total_out: 0,
            history: Vec::with_capacity(2 * WINDOW),
            span: span.max(1),
            part: part.clamp(1, span.max(1)),
            max_checkpoints,
            checkpoints: Vec::new(),
            marks: Vec::new(),
            done: false,
            captures: Vec::new(),
            last_in: 0,
            boundaries: Vec::new(),
            cuts: Cuts::default(),
            next_point: 0,
            next_end: 0,
        })
    }

    /// Cuts the stream at `cuts` too (see [`Cuts`]).
    pub fn with_cuts(mut self, cuts: Cuts) -> Self {
        self.cuts = cuts;
        self
    }

    /// The checkpoints recorded so far, in order.
    pub fn checkpoints(&self) -> &[Checkpoint] {
        &self.checkpoints
    }

    /// Uncompressed bytes produced so far.
    pub fn total_out(&self) -> u64 {
        self.total_out
    }

    /// The marks recorded so far, in order.
    pub fn marks(&self) -> &[Mark] {
        &self.marks
    }

    /// The checkpoints, the marks and the inner reader.
    pub fn finish(self) -> (Vec<Checkpoint>, Vec<Mark>, R) {
        (self.checkpoints, self.marks, self.inner)
    }

    /// Like [`finish`](Self::finish), with the block boundaries met.
    pub fn finish_with_boundaries(self) -> (Vec<Checkpoint>, Vec<Mark>, Vec<u64>) {
        (self.checkpoints, self.marks, self.boundaries)
    }

    fn fill(&mut self) -> Result<(), ZranError> {
        if self.in_pos < self.in_len || self.inner_done {
            return Ok(());
        }
        self.in_pos = 0;
        self.in_len = loop {
            match self.inner.read(&mut self.input) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ZranError::Read(e)),
            }
        };
        if self.in_len == 0 {
            self.inner_done = true;
        }
        Ok(())
    }

    fn remember(&mut self, out: &[u8]) {
        self.history.extend_from_slice(out);
        if self.history.len() > 2 * WINDOW {
            let cut = self.history.len() - WINDOW;
            self.history.drain(..cut);
        }
    }

    fn checkpoint(&mut self) -> Result<(), ZranError> {
        let data_type = self.stream.data_type();
        // Bit 7: just after a block (or the header); bit 6: that block was the last one.
        if data_type & 128 == 0 || data_type & 64 != 0 {
            return Ok(());
        }
        if self.boundaries.len() < self.max_checkpoints
            && self.boundaries.last() != Some(&self.total_out)
        {
            self.boundaries.push(self.total_out);
        }
        while self
            .cuts
            .points
            .get(self.next_point)
            .is_some_and(|&p| p < self.total_out)
        {
            self.next_point += 1;
        }
        let asked = self.cuts.points.get(self.next_point) == Some(&self.total_out);
        let due = match self.checkpoints.last() {
            None => true,
            Some(last) if last.out == self.total_out => false,
            Some(last) => asked || self.total_out - last.out >= self.span,
        };
        let last_mark = self.marks.last().map(|m| m.out);
        let mark_due = last_mark.is_none_or(|out| self.total_out - out >= self.part);
        if !due && !mark_due {
            return Ok(());
        }
        // A part may already end here (a cut end): the span starts at that mark.
        if last_mark != Some(self.total_out) {
            self.push_mark()?;
        }
        if !due {
            return Ok(());
        }
        let keep = self.history.len().min(WINDOW);
        let bits = (data_type & 7) as u8;
        self.checkpoints.push(Checkpoint {
            out: self.total_out,
            input: self.total_in,
            bits,
            window: self.history[self.history.len() - keep..].to_vec(),
            used: None,
        });
        if keep > 0 {
            let mut bytes = Vec::with_capacity(WINDOW);
            if bits > 0 {
                bytes.push(self.last_in);
            }
            self.captures.push(Capture {
                point: self.checkpoints.len() - 1,
                bytes,
            });
        }
        Ok(())
    }

    fn push_mark(&mut self) -> Result<(), ZranError> {
        if self.marks.len() >= self.max_checkpoints {
            return Err(ZranError::TooManyCheckpoints(self.max_checkpoints));
        }
        self.marks.push(Mark {
            out: self.total_out,
            input: self.total_in,
        });
        Ok(())
    }

    /// How much output the next call may make: up to the next cut end, so that a part can
    /// end exactly there, inside a block.
    fn room(&mut self, wanted: usize) -> usize {
        while self
            .cuts
            .ends
            .get(self.next_end)
            .is_some_and(|&e| e <= self.total_out)
        {
            self.next_end += 1;
        }
        match self.cuts.ends.get(self.next_end) {
            Some(&end) => wanted.min(usize::try_from(end - self.total_out).unwrap_or(usize::MAX)),
            None => wanted,
        }
    }

    /// Feeds consumed input to the captures, and closes those a window's worth of output
    /// past their checkpoint (or all, at the end of the stream).
    fn capture(&mut self, consumed: &[u8], end: bool) {
        if let Some(&last) = consumed.last() {
            self.last_in = last;
        }
        if self.captures.is_empty() {
            return;
        }
        for c in &mut self.captures {
            c.bytes.extend_from_slice(consumed);
        }
        let total_out = self.total_out;
        let points = &self.checkpoints;
        let (ready, open): (Vec<Capture>, Vec<Capture>) = std::mem::take(&mut self.captures)
            .into_iter()
            .partition(|c| {
                end || points
                    .get(c.point)
                    .is_none_or(|p| total_out - p.out >= WINDOW as u64)
            });
        self.captures = open;
        for c in ready {
            let Some(p) = self.checkpoints.get(c.point) else {
                continue;
            };
            let n = (total_out - p.out).min(WINDOW as u64) as usize;
            // Not knowing keeps the whole window: never a reason to fail the index.
            let used = used_window(&c.bytes, p.bits, p.window.len(), n).ok();
            if let Some(p) = self.checkpoints.get_mut(c.point) {
                p.used = used;
            }
        }
    }

    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize, ZranError> {
        // zlib makes progress on every call it is given input and room for; a stream that
        // stops doing so must not spin here.
        let mut stalls = 0;
        while !self.done {
            self.fill()?;
            let room = self.room(buf.len());
            let input = &self.input[self.in_pos..self.in_len];
            let (code, consumed, produced) =
                self.stream.inflate(input, &mut buf[..room], z::Z_BLOCK);
            let from = self.in_pos;
            self.in_pos += consumed;
            self.total_in += consumed as u64;
            self.total_out += produced as u64;
            self.remember(&buf[..produced]);
            // The input buffer is refilled only once it is used up, so these are its bytes.
            let input = std::mem::take(&mut self.input);
            self.capture(&input[from..self.in_pos], false);
            self.input = input;
            // A cut end reached: the part ends here, whatever the block. Its compressed
            // end is what zlib consumed to make this output (it reads no further ahead than
            // it returns), plus the partial byte, as for a mark at a boundary.
            if produced > 0
                && self.cuts.ends.get(self.next_end) == Some(&self.total_out)
                && self.marks.last().map(|m| m.out) != Some(self.total_out)
            {
                self.push_mark()?;
            }
            match code {
                z::Z_OK => self.checkpoint()?,
                z::Z_STREAM_END => {
                    // The member ended: another may follow (concatenated gzip members).
                    self.fill()?;
                    if self.in_pos >= self.in_len {
                        self.done = true;
                        self.capture(&[], true);
                    } else {
                        self.stream.reset(GZIP_OR_ZLIB)?;
                    }
                }
                z::Z_BUF_ERROR if consumed == 0 && produced == 0 => {
                    if self.inner_done {
                        return Err(ZranError::Short {
                            got: self.total_out,
                            want: self.total_out + 1,
                        });
                    }
                }
                code => {
                    return Err(ZranError::Data {
                        code,
                        out: self.total_out,
                    })
                }
            }
            if produced > 0 {
                return Ok(produced);
            }
            stalls = if consumed == 0 { stalls + 1 } else { 0 };
            if stalls > 8 {
                return Err(ZranError::Data {
                    code,
                    out: self.total_out,
                });
            }
        }
        Ok(0)
    }
}

impl<R: Read> Read for CheckpointingInflater<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.read_some(buf).map_err(std::io::Error::other)
    }
}

/// The stretches (start, length) of a `window_len`-byte window that inflating `n` bytes
/// from a checkpoint reads, `compressed` holding the blob from the checkpoint on. Deflate
/// refers back at most [`WINDOW`] bytes, so only the first `WINDOW` bytes of output can read
/// the window itself (later ones copy output, whose bytes came from there at most): the
/// first `n` (at most `WINDOW`) bytes are inflated three times, with windows holding each
/// position's low byte, that byte inverted, and its high byte. An output byte that differs
/// between the first two came from the window, from the position the first and third spell.
pub fn used_window(
    compressed: &[u8],
    bits: u8,
    window_len: usize,
    n: usize,
) -> Result<Stretches, ZranError> {
    let n = n.min(WINDOW);
    let window_len = window_len.min(WINDOW);
    if window_len == 0 || n == 0 {
        return Ok(Vec::new());
    }
    let low: Vec<u8> = (0..window_len).map(|i| i as u8).collect();
    let inverted: Vec<u8> = low.iter().map(|b| !b).collect();
    let high: Vec<u8> = (0..window_len).map(|i| (i >> 8) as u8).collect();
    let a = inflate_span(compressed, bits, &low, n)?;
    let b = inflate_span(compressed, bits, &inverted, n)?;
    let h = inflate_span(compressed, bits, &high, n)?;
    let mut used = vec![false; window_len];
    for i in 0..n {
        if a[i] != b[i] {
            let at = usize::from(a[i]) | usize::from(h[i]) << 8;
            if let Some(u) = used.get_mut(at) {
                *u = true;
            }
        }
    }
    // Stretches, joining those a few bytes apart: a stretch costs 4 bytes to describe.
    let mut runs: Stretches = Vec::new();
    for (i, _) in used.iter().enumerate().filter(|(_, u)| **u) {
        match runs.last_mut() {
            Some((start, len)) if i - (usize::from(*start) + usize::from(*len)) <= 4 => {
                *len = (i + 1 - usize::from(*start)) as u16;
            }
            _ => runs.push((i as u16, 1)),
        }
    }
    Ok(runs)
}

/// Inflates `len` bytes from a checkpoint. `compressed` holds the blob from
/// [`Checkpoint::fetch_from`] on, as far as the span needs (more is ignored). Members that
/// end inside the span are followed into the next (their trailer skipped, the next header
/// parsed), as in the stream the checkpoint was taken from.
pub fn inflate_span(
    compressed: &[u8],
    bits: u8,
    window: &[u8],
    len: usize,
) -> Result<Vec<u8>, ZranError> {
    if bits > 7 || window.len() > WINDOW {
        return Err(ZranError::Prime(z::Z_STREAM_ERROR));
    }
    let mut stream = Stream::new(RAW)?;
    let mut input = compressed;
    if bits > 0 {
        let (&first, rest) = input.split_first().ok_or(ZranError::Short {
            got: 0,
            want: len as u64,
        })?;
        stream.prime(bits, first >> (8 - bits))?;
        input = rest;
    }
    stream.set_dictionary(window)?;
    let mut out = vec![0u8; len];
    let mut filled = 0usize;
    let mut raw = true;
    let mut stalls = 0;
    while filled < len {
        let (code, consumed, produced) = stream.inflate(input, &mut out[filled..], z::Z_NO_FLUSH);
        input = &input[consumed..];
        filled += produced;
        match code {
            z::Z_OK => {}
            z::Z_STREAM_END if filled < len => {
                // A raw stream leaves the member's trailer to us; a gzip one reads its own.
                if raw {
                    input = input.get(GZIP_TRAILER..).unwrap_or_default();
                    raw = false;
                }
                stream.reset(GZIP)?;
            }
            z::Z_STREAM_END => {}
            z::Z_BUF_ERROR if consumed == 0 && produced == 0 => {
                return Err(ZranError::Short {
                    got: filled as u64,
                    want: len as u64,
                })
            }
            z::Z_BUF_ERROR => {}
            code => {
                return Err(ZranError::Data {
                    code,
                    out: filled as u64,
                })
            }
        }
        stalls = if consumed == 0 && produced == 0 {
            stalls + 1
        } else {
            0
        };
        if (stalls > 0 && input.is_empty()) || stalls > 8 {
            return Err(ZranError::Short {
                got: filled as u64,
                want: len as u64,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn pseudo_random_text(n: usize) -> Vec<u8> {
        // Compressible but not trivially: words from a small vocabulary, an LCG picking them.
        let words = [
            &b"layer "[..],
            b"chunk ",
            b"gzip ",
            b"index ",
            b"span\n",
            b"zran ",
        ];
        let mut out = Vec::with_capacity(n);
        let mut x: u64 = 12345;
        while out.len() < n {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            out.extend_from_slice(words[(x >> 33) as usize % words.len()]);
            if x.is_multiple_of(7) {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        out.truncate(n);
        out
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).expect("gzip");
        e.finish().expect("gzip")
    }

    fn check_all_spans(data: &[u8], blob: &[u8], span: u64) -> usize {
        let mut inflater = CheckpointingInflater::new(blob, span, span / 4, 10_000).expect("init");
        let mut out = Vec::new();
        inflater.read_to_end(&mut out).expect("inflate");
        assert_eq!(out, data);
        let (points, marks, _) = inflater.finish();
        // A read stopping at a mark inflates from the checkpoint before it with the compressed
        // bytes up to the mark alone.
        assert!(marks.len() > points.len(), "marks between checkpoints");
        for m in &marks {
            let k = points.partition_point(|p| p.out <= m.out) - 1;
            let p = &points[k];
            let to = (m.input + 1).min(blob.len() as u64) as usize;
            let got = inflate_span(
                &blob[p.fetch_from() as usize..to],
                p.bits,
                &p.window,
                (m.out - p.out) as usize,
            )
            .expect("resume up to a mark");
            assert_eq!(
                got,
                &data[p.out as usize..m.out as usize],
                "mark at {}",
                m.out
            );
        }
        assert_eq!(points[0].out, 0);
        for (k, p) in points.iter().enumerate() {
            let end = points.get(k + 1).map_or(data.len() as u64, |n| n.out);
            let to = points
                .get(k + 1)
                .map_or(blob.len() as u64, |n| (n.input + 1).min(blob.len() as u64));
            let got = inflate_span(
                &blob[p.fetch_from() as usize..to as usize],
                p.bits,
                &p.window,
                (end - p.out) as usize,
            )
            .expect("resume");
            assert_eq!(got, &data[p.out as usize..end as usize], "span {k}");
        }
        points.len()
    }

    #[test]
    fn every_span_resumes_from_its_checkpoint_alone() {
        let data = pseudo_random_text(3 << 20);
        let points = check_all_spans(&data, &gzip(&data), 256 << 10);
        assert!(points >= 8, "{points} checkpoints");
    }

    #[test]
    fn concatenated_members_are_followed() {
        let a = pseudo_random_text(700 << 10);
        let b: Vec<u8> = a.iter().rev().copied().collect();
        let mut blob = gzip(&a);
        blob.extend_from_slice(&gzip(&b));
        let mut data = a.clone();
        data.extend_from_slice(&b);
        check_all_spans(&data, &blob, 300 << 10);
    }

    #[test]
    fn damaged_input_is_an_error_not_bytes() {
        let data = pseudo_random_text(1 << 20);
        let blob = gzip(&data);
        let mut inflater =
            CheckpointingInflater::new(&blob[..], 64 << 10, 64 << 10, 1000).expect("init");
        std::io::copy(&mut inflater, &mut std::io::sink()).expect("inflate");
        let (points, _, _) = inflater.finish();
        let p = &points[1];
        let end = points[2].input as usize + 1;
        let mut bad = blob[p.fetch_from() as usize..end].to_vec();
        let len = (points[2].out - p.out) as usize;
        // A wrong window makes other bytes, which a span digest catches; a cut input is short.
        let cut = inflate_span(&bad[..bad.len() / 2], p.bits, &p.window, len);
        assert!(matches!(cut, Err(ZranError::Short { .. })), "{cut:?}");
        for b in bad.iter_mut().skip(10).step_by(7) {
            *b ^= 0x5a;
        }
        match inflate_span(&bad, p.bits, &p.window, len) {
            Err(_) => {}
            Ok(out) => assert_ne!(out, &data[p.out as usize..p.out as usize + len]),
        }
        assert!(inflate_span(&bad, 9, &p.window, len).is_err());
    }
}
