//! Length-delimited framing: `u32 big-endian length ++ payload`.
//!
//! The length is checked against a hard limit before a single byte of the payload is
//! buffered for it, so a peer announcing a 4 GiB frame costs us four bytes, not 4 GiB.

use crate::{Message, ProtocolError};

/// The hard upper bound on a frame's payload, for every stream type.
pub const MAX_FRAME_LEN: usize = 1 << 20;

const HEADER_LEN: usize = 4;

/// Encodes one message as a complete frame.
pub fn encode_frame<M: Message>(msg: &M) -> Result<Vec<u8>, ProtocolError> {
    let mut out = vec![0u8; HEADER_LEN];
    out = postcard::to_extend(&msg.tag(), out)?;
    out = msg.encode_body(out)?;
    let len = out.len() - HEADER_LEN;
    if len > MAX_FRAME_LEN {
        return Err(ProtocolError::FrameTooLarge {
            len: len as u64,
            max: MAX_FRAME_LEN,
        });
    }
    out[..HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Reassembles frames from arbitrary chunks of bytes.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    pos: usize,
    max: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(MAX_FRAME_LEN)
    }
}

impl FrameDecoder {
    /// A decoder that refuses frames longer than `max` (capped at [`MAX_FRAME_LEN`]).
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            pos: 0,
            max: max.min(MAX_FRAME_LEN),
        }
    }

    /// Changes the largest frame accepted from here on (capped at [`MAX_FRAME_LEN`]).
    pub fn set_max(&mut self, max: usize) {
        self.max = max.min(MAX_FRAME_LEN);
    }

    /// Adds bytes read from the peer.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 64 * 1024 && self.pos * 2 > self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Returns the next complete payload, `None` if more bytes are needed.
    pub fn next_payload(&mut self) -> Result<Option<&[u8]>, ProtocolError> {
        let rest = &self.buf[self.pos..];
        if rest.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len > self.max {
            return Err(ProtocolError::FrameTooLarge {
                len: len as u64,
                max: self.max,
            });
        }
        if len == 0 {
            return Err(ProtocolError::EmptyFrame);
        }
        if rest.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let start = self.pos + HEADER_LEN;
        self.pos = start + len;
        Ok(Some(&self.buf[start..start + len]))
    }

    /// Decodes the next complete message, `None` if more bytes are needed.
    pub fn decode<M: Message>(&mut self) -> Result<Option<M>, ProtocolError> {
        match self.next_payload()? {
            Some(payload) => M::from_payload(payload).map(Some),
            None => Ok(None),
        }
    }

    /// Takes the bytes received but not yet decoded (to hand a stream over to a splice).
    pub fn take_buffered(&mut self) -> Vec<u8> {
        let rest = self.buf.split_off(self.pos);
        self.buf.clear();
        self.pos = 0;
        rest
    }

    /// Called at end of stream: leftover bytes mean the peer stopped mid-frame.
    pub fn finish(&self) -> Result<(), ProtocolError> {
        match self.buffered() {
            0 => Ok(()),
            buffered => Err(ProtocolError::Truncated { buffered }),
        }
    }
}
