//! rsync-style block deltas: the receiver of a change describes the file it has as block
//! signatures (a rolling weak sum and a strong hash per block); the sender slides a window
//! over its new file and sends "copy block N" where a block matches and literal bytes
//! where none does. Sans-IO: bytes come in with `feed`, operations go out through a
//! callback.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Files smaller than this are sent whole: a delta would save little.
pub const DELTA_MIN_SIZE: u64 = 64 * 1024;

/// Longest literal run in one [`Op::Literal`].
const MAX_LITERAL: usize = super::CHUNK_LEN / 2;

/// One block of the receiver's file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockSig {
    pub weak: u32,
    /// The first 16 bytes of the block's BLAKE3.
    pub strong: [u8; 16],
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Copy `count` blocks of the receiver's file starting at block `first`.
    Copy { first: u32, count: u32 },
    /// New bytes.
    Literal(#[serde(with = "super::serde_bytes_compat")] Vec<u8>),
}

/// rsync's choice: about the square root of the size, here rounded to KiB, 2-128 KiB.
pub fn block_len(size: u64) -> u32 {
    let root = (size as f64).sqrt() as u64;
    (root.div_ceil(1024) * 1024).clamp(2048, 128 * 1024) as u32
}

pub fn strong(block: &[u8]) -> [u8; 16] {
    let mut out = [0; 16];
    out.copy_from_slice(&blake3::hash(block).as_bytes()[..16]);
    out
}

/// rsync's rolling checksum: `a` is the byte sum, `b` the position-weighted sum, both
/// modulo 2^16.
#[derive(Debug, Clone, Copy, Default)]
struct Rolling {
    a: u32,
    b: u32,
    len: u32,
}

impl Rolling {
    fn new(block: &[u8]) -> Self {
        let mut r = Rolling {
            len: block.len() as u32,
            ..Default::default()
        };
        for (i, &x) in block.iter().enumerate() {
            r.a = r.a.wrapping_add(x as u32);
            r.b = r.b.wrapping_add((block.len() - i) as u32 * x as u32);
        }
        r
    }

    fn roll(&mut self, out: u8, inn: u8) {
        self.a = self.a.wrapping_sub(out as u32).wrapping_add(inn as u32);
        self.b = self
            .b
            .wrapping_sub(self.len.wrapping_mul(out as u32))
            .wrapping_add(self.a);
    }

    fn digest(&self) -> u32 {
        (self.a & 0xffff) | (self.b << 16)
    }
}

pub fn weak(block: &[u8]) -> u32 {
    Rolling::new(block).digest()
}

/// Builds a signature from a file's bytes, block by block.
#[derive(Debug)]
pub struct SignatureBuilder {
    block_len: usize,
    pending: Vec<u8>,
    pub blocks: Vec<BlockSig>,
}

impl SignatureBuilder {
    pub fn new(block_len: u32) -> Self {
        SignatureBuilder {
            block_len: block_len as usize,
            pending: Vec::new(),
            blocks: Vec::new(),
        }
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let take = (self.block_len - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == self.block_len {
                self.push();
            }
        }
    }

    fn push(&mut self) {
        self.blocks.push(BlockSig {
            weak: weak(&self.pending),
            strong: strong(&self.pending),
        });
        self.pending.clear();
    }

    pub fn finish(mut self) -> Vec<BlockSig> {
        if !self.pending.is_empty() {
            self.push();
        }
        self.blocks
    }
}

/// Turns a new file into [`Op`]s against a signature.
#[derive(Debug)]
pub struct Encoder {
    block_len: usize,
    index: HashMap<u32, Vec<u32>>,
    blocks: Vec<BlockSig>,
    /// Bytes not yet emitted: `buf[..start]` is pending literal, `buf[start..]` unread.
    buf: Vec<u8>,
    start: usize,
    rolling: Option<Rolling>,
    /// The block copy being extended, if any.
    run: Option<(u32, u32)>,
}

impl Encoder {
    pub fn new(block_len: u32, blocks: Vec<BlockSig>) -> Self {
        let mut index: HashMap<u32, Vec<u32>> = HashMap::new();
        for (i, b) in blocks.iter().enumerate() {
            index.entry(b.weak).or_default().push(i as u32);
        }
        Encoder {
            block_len: block_len.max(1) as usize,
            index,
            blocks,
            buf: Vec::new(),
            start: 0,
            rolling: None,
            run: None,
        }
    }

    fn flush_run(&mut self, emit: &mut impl FnMut(Op)) {
        if let Some((first, count)) = self.run.take() {
            emit(Op::Copy { first, count });
        }
    }

    fn flush_literal(&mut self, emit: &mut impl FnMut(Op)) {
        if self.start > 0 {
            self.flush_run(emit);
            emit(Op::Literal(self.buf[..self.start].to_vec()));
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }

    fn copy(&mut self, block: u32, emit: &mut impl FnMut(Op)) {
        self.flush_literal(emit);
        match &mut self.run {
            Some((first, count)) if *first + *count == block => *count += 1,
            _ => {
                self.flush_run(emit);
                self.run = Some((block, 1));
            }
        }
    }

    pub fn feed(&mut self, data: &[u8], mut emit: impl FnMut(Op)) {
        self.buf.extend_from_slice(data);
        let n = self.block_len;
        while self.buf.len() - self.start >= n {
            let rolling = match self.rolling {
                Some(r) => r,
                None => Rolling::new(&self.buf[self.start..self.start + n]),
            };
            let window_end = self.start + n;
            let hit = self.index.get(&rolling.digest()).and_then(|candidates| {
                let want = strong(&self.buf[self.start..window_end]);
                candidates
                    .iter()
                    .copied()
                    .find(|&i| self.blocks[i as usize].strong == want)
            });
            if let Some(block) = hit {
                // `copy` emits the literal before the window, which then starts at 0.
                self.copy(block, &mut emit);
                self.buf.drain(..n);
                self.rolling = None;
                continue;
            }
            let mut r = rolling;
            if window_end < self.buf.len() {
                r.roll(self.buf[self.start], self.buf[window_end]);
                self.rolling = Some(r);
            } else {
                self.rolling = None;
            }
            self.start += 1;
            if self.start >= MAX_LITERAL {
                let keep = self.rolling;
                self.flush_literal(&mut emit);
                self.rolling = keep;
            }
        }
    }

    pub fn finish(mut self, mut emit: impl FnMut(Op)) {
        // The tail may equal the receiver's shorter last block.
        let tail = &self.buf[self.start..];
        if !tail.is_empty()
            && let Some(last) = self.blocks.len().checked_sub(1)
        {
            let tail = tail.to_vec();
            let sig = self.blocks[last];
            if sig.weak == weak(&tail) && sig.strong == strong(&tail) {
                self.copy(last as u32, &mut emit);
                self.buf.clear();
                self.flush_run(&mut emit);
                return;
            }
        }
        self.start = self.buf.len();
        self.flush_literal(&mut emit);
        self.flush_run(&mut emit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Applies ops to `base` (what the receiver does with a file).
    fn apply(base: &[u8], block: usize, ops: &[Op]) -> Vec<u8> {
        let mut out = Vec::new();
        for op in ops {
            match op {
                Op::Copy { first, count } => {
                    let from = *first as usize * block;
                    let to = (from + *count as usize * block).min(base.len());
                    out.extend_from_slice(&base[from..to]);
                }
                Op::Literal(bytes) => out.extend_from_slice(bytes),
            }
        }
        out
    }

    fn delta(base: &[u8], new: &[u8], block: u32, feed: usize) -> Vec<Op> {
        let mut sig = SignatureBuilder::new(block);
        sig.feed(base);
        let mut enc = Encoder::new(block, sig.finish());
        let mut ops = Vec::new();
        for chunk in new.chunks(feed.max(1)) {
            enc.feed(chunk, |op| ops.push(op));
        }
        enc.finish(|op| ops.push(op));
        ops
    }

    fn literal_bytes(ops: &[Op]) -> usize {
        ops.iter()
            .map(|op| match op {
                Op::Literal(b) => b.len(),
                Op::Copy { .. } => 0,
            })
            .sum()
    }

    #[test]
    fn rolling_matches_fresh_sums() {
        let data = pseudo(5000, 1);
        let mut r = Rolling::new(&data[..700]);
        for i in 1..4000 {
            r.roll(data[i - 1], data[i + 699]);
            assert_eq!(r.digest(), weak(&data[i..i + 700]), "{i}");
        }
    }

    #[test]
    fn one_byte_edit_sends_one_block() {
        let base = pseudo(1 << 20, 2);
        let mut new = base.clone();
        new[500_000] ^= 0xff;
        let block = block_len(base.len() as u64);
        for feed in [1 << 16, 1000, 7777] {
            let ops = delta(&base, &new, block, feed);
            assert_eq!(apply(&base, block as usize, &ops), new);
            assert!(
                literal_bytes(&ops) <= block as usize,
                "{}",
                literal_bytes(&ops)
            );
            assert!(ops.len() <= 3, "{ops:?}");
        }
    }

    #[test]
    fn inserts_deletes_and_odd_sizes_round_trip() {
        let base = pseudo(300_000, 3);
        let cases: Vec<Vec<u8>> = vec![
            Vec::new(),
            base.clone(),
            [b"head".as_slice(), &base].concat(),
            [&base[..1000], &base[5000..]].concat(),
            [&base[..150_000], b"middle".as_slice(), &base[150_000..]].concat(),
            base[..299_999].to_vec(),
            pseudo(123_457, 4),
            [&base[200_000..], &base[..200_000]].concat(),
        ];
        for (i, new) in cases.iter().enumerate() {
            for block in [2048u32, 4096, 7000] {
                let ops = delta(&base, new, block, 65536);
                assert_eq!(
                    &apply(&base, block as usize, &ops),
                    new,
                    "case {i} block {block}"
                );
            }
        }
        // Moved halves are found again: little is sent literally.
        let ops = delta(&base, &cases[7], 2048, 65536);
        assert!(literal_bytes(&ops) < 3 * 2048, "{}", literal_bytes(&ops));
        // An empty base: everything is literal, in bounded pieces.
        let ops = delta(&[], &base, 2048, 65536);
        assert_eq!(apply(&[], 2048, &ops), base);
        assert!(
            ops.iter()
                .all(|op| matches!(op, Op::Literal(b) if b.len() <= MAX_LITERAL))
        );
    }

    #[test]
    fn block_sizes_follow_the_file() {
        assert_eq!(block_len(0), 2048);
        assert_eq!(block_len(64 << 20), 8192);
        assert_eq!(block_len(1 << 40), 128 * 1024);
    }
}
