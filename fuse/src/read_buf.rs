//! The buffer a local read lands in: one per local-read thread, kept from read to read, so
//! that answering a read from local disk allocates nothing. A fresh 1 MiB buffer per read
//! cost an allocation (an `mmap` at that size), 256 page faults and the zeroing of every page:
//! as much work again as the copy the read is for.

/// A reusable buffer for [`LayerSource::read_local`](crate::LayerSource::read_local) to put a
/// read's bytes in: the source fills the [`region`](ReadBuf::region) it asks for, and that
/// region is the answer.
///
/// The buffer keeps the largest region asked for (the kernel asks at most its `max_pages`,
/// 1 MiB by default), and a region's contents before it is filled are unspecified.
#[derive(Debug, Default)]
pub struct ReadBuf {
    storage: Vec<u8>,
    len: usize,
}

impl ReadBuf {
    /// An empty buffer; it grows at the first [`region`](ReadBuf::region).
    pub fn new() -> Self {
        Self::default()
    }

    /// A region of exactly `len` bytes to read into, which becomes the
    /// [`answer`](ReadBuf::answer). Its contents are whatever an earlier read left there.
    pub fn region(&mut self, len: usize) -> &mut [u8] {
        if self.storage.len() < len {
            // Zeroed once per growth, not per read.
            self.storage.resize(len, 0);
        }
        self.len = len;
        &mut self.storage[..len]
    }

    /// Copies `bytes` in as the answer: for sources whose bytes are in memory already.
    pub fn copy_from(&mut self, bytes: &[u8]) {
        self.region(bytes.len()).copy_from_slice(bytes);
    }

    /// The answer: the last region asked for.
    pub fn answer(&self) -> &[u8] {
        &self.storage[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_reuse_the_storage() {
        let mut buf = ReadBuf::new();
        let first = buf.region(1 << 20).as_ptr();
        let again = buf.region(4096).as_ptr();
        assert_eq!(first, again, "a smaller region reuses the storage");
        assert_eq!(buf.answer().len(), 4096);
        assert_eq!(buf.region(2 << 20).len(), 2 << 20);
    }

    #[test]
    fn the_answer_is_the_last_region() {
        let mut buf = ReadBuf::new();
        buf.region(3).copy_from_slice(b"xyz");
        assert_eq!(buf.answer(), b"xyz");
        buf.copy_from(b"ab");
        assert_eq!(buf.answer(), b"ab");
    }
}
