//! The output ring: a session's most recent output, indexed by absolute byte offset.
//!
//! Offsets count every byte the session ever produced, so a client that saw up to offset
//! `n` asks for `n..` and gets exactly the bytes after it, or learns that some of them
//! already fell out of the ring.

use std::collections::VecDeque;

/// A bounded window onto a session's output stream.
#[derive(Debug)]
pub struct OutputRing {
    bytes: VecDeque<u8>,
    capacity: usize,
    /// The absolute offset of `bytes[0]`.
    start: u64,
}

/// What a read from a given offset yields.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// The bytes from the requested offset (possibly empty: nothing new yet).
    Bytes(Vec<u8>),
    /// The requested offset fell out of the ring; the oldest available offset is `start`.
    Truncated { start: u64 },
}

impl OutputRing {
    pub fn new(capacity: usize) -> Self {
        Self {
            bytes: VecDeque::with_capacity(capacity.min(64 * 1024)),
            capacity: capacity.max(1),
            start: 0,
        }
    }

    /// A ring holding `bytes` from offset `start` (the newest `capacity` of them).
    pub fn restored(capacity: usize, start: u64, bytes: &[u8]) -> Self {
        let mut ring = Self::new(capacity);
        ring.start = start;
        ring.push(bytes);
        ring
    }

    /// Everything held, and the offset of its first byte.
    pub fn contents(&self) -> (u64, Vec<u8>) {
        (self.start, self.bytes.iter().copied().collect())
    }

    /// The oldest offset still held.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// One past the newest byte: the total number of bytes ever pushed.
    pub fn end(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }

    /// Appends output, dropping the oldest bytes beyond the capacity.
    pub fn push(&mut self, data: &[u8]) {
        let data = if data.len() > self.capacity {
            let skipped = data.len() - self.capacity;
            self.start += (self.bytes.len() + skipped) as u64;
            self.bytes.clear();
            &data[skipped..]
        } else {
            data
        };
        let overflow = (self.bytes.len() + data.len()).saturating_sub(self.capacity);
        if overflow > 0 {
            self.bytes.drain(..overflow);
            self.start += overflow as u64;
        }
        self.bytes.extend(data);
    }

    /// Up to `max` bytes starting at `offset`. An offset past the end reads as empty.
    pub fn read(&self, offset: u64, max: usize) -> Read {
        if offset < self.start {
            return Read::Truncated { start: self.start };
        }
        let from = ((offset - self.start) as usize).min(self.bytes.len());
        let to = (from + max).min(self.bytes.len());
        let (a, b) = self.bytes.as_slices();
        let mut out = Vec::with_capacity(to - from);
        if from < a.len() {
            out.extend_from_slice(&a[from..to.min(a.len())]);
        }
        if to > a.len() {
            out.extend_from_slice(&b[from.saturating_sub(a.len())..to - a.len()]);
        }
        Read::Bytes(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keeps_the_newest_bytes_by_absolute_offset() {
        let mut r = OutputRing::new(8);
        r.push(b"hello");
        assert_eq!((r.start(), r.end()), (0, 5));
        assert_eq!(r.read(0, 100), Read::Bytes(b"hello".to_vec()));
        assert_eq!(r.read(2, 2), Read::Bytes(b"ll".to_vec()));
        r.push(b" world");
        assert_eq!((r.start(), r.end()), (3, 11));
        assert_eq!(r.read(0, 100), Read::Truncated { start: 3 });
        assert_eq!(r.read(3, 100), Read::Bytes(b"lo world".to_vec()));
        assert_eq!(r.read(11, 100), Read::Bytes(vec![]));
        assert_eq!(r.read(99, 100), Read::Bytes(vec![]));
        r.push(b"0123456789abc");
        assert_eq!((r.start(), r.end()), (16, 24));
        assert_eq!(r.read(16, 100), Read::Bytes(b"56789abc".to_vec()));
    }

    proptest! {
        /// Whatever the chunking, a reader that follows the ring sees exactly the stream.
        #[test]
        fn reading_back_matches_the_stream(
            chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..40),
            capacity in 1usize..512,
        ) {
            let mut ring = OutputRing::new(capacity);
            let mut all = Vec::new();
            for c in &chunks {
                ring.push(c);
                all.extend_from_slice(c);
                prop_assert_eq!(ring.end(), all.len() as u64);
                prop_assert!(ring.end() - ring.start() <= capacity as u64);
                match ring.read(ring.start(), usize::MAX) {
                    Read::Bytes(b) => prop_assert_eq!(&b[..], &all[ring.start() as usize..]),
                    Read::Truncated { .. } => prop_assert!(false, "start is always readable"),
                }
            }
            if ring.start() > 0 {
                prop_assert_eq!(ring.read(ring.start() - 1, 1), Read::Truncated { start: ring.start() });
            }
        }
    }
}
