//! Resumable TCP forwards (version 6+): a forwarded connection outlives the stream that
//! carries it.
//!
//! The CLI opens a [`StreamHeader::Forward`](crate::stream::StreamHeader::Forward) (or
//! `ClientForward` through the hub); the agent connects to the port and answers
//! [`StreamReply::Forwarding`](crate::stream::StreamReply::Forwarding) with a
//! [`ForwardToken`]. From then on the stream carries raw bytes, and each side counts the
//! bytes it has taken from the stream and keeps the bytes it sent in a [`Replay`]. When the
//! stream breaks (the direct path died, a hub replica went away), the CLI opens a new one
//! on any path with [`Resume`] (the token and how many bytes it has received); the agent
//! answers with its own count, and each side sends again what the other has not seen.
//! Neither TCP connection notices.
//!
//! QUIC flow control bounds what a side can have sent but the other not yet taken from
//! its stream by the receive windows on the way (two of them through the hub), so a
//! replay buffer of [`REPLAY_CAPACITY`] always holds what a resume asks for.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// How many sent bytes each side keeps for a resume: more than the stream receive windows
/// of a relayed path (two hops, see `link::STREAM_WINDOW`) and the copies in between.
pub const REPLAY_CAPACITY: usize = 6 * 1024 * 1024;

/// How long the agent keeps a forward whose stream broke, waiting for a resume.
pub const RESUME_GRACE_SECS: u64 = 60;

/// Names one forwarded connection on an agent: 128 random bits, known only to the agent
/// and the client that opened it (redacted in `Debug`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ForwardToken(pub [u8; 16]);

impl std::fmt::Debug for ForwardToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ForwardToken(..)")
    }
}

/// Picks up a forwarded connection on a new stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    pub token: ForwardToken,
    /// How many bytes of the connection the sender has taken from its streams so far.
    pub received: u64,
}

/// A resume asked for bytes the sender no longer holds (or never sent): the connection
/// cannot go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    pub asked: u64,
    pub held_from: u64,
    pub sent: u64,
}

impl std::fmt::Display for Gap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the peer has received {} bytes, but only bytes {}..{} can be sent again",
            self.asked, self.held_from, self.sent
        )
    }
}

impl std::error::Error for Gap {}

/// The last bytes sent on a connection (at most a capacity), by offset.
#[derive(Debug)]
pub struct Replay {
    held: VecDeque<u8>,
    /// Bytes sent in all (the offset after the last held byte).
    sent: u64,
    capacity: usize,
}

impl Replay {
    pub fn new(capacity: usize) -> Replay {
        Replay {
            held: VecDeque::new(),
            sent: 0,
            capacity,
        }
    }

    /// Records bytes about to be sent; the oldest go once more than the capacity is held.
    pub fn push(&mut self, bytes: &[u8]) {
        self.sent += bytes.len() as u64;
        let keep = bytes.len().min(self.capacity);
        let overflow = (self.held.len() + keep).saturating_sub(self.capacity);
        self.held.drain(..overflow);
        self.held.extend(&bytes[bytes.len() - keep..]);
    }

    /// Bytes sent in all.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// The peer has received `received` bytes: forgets what came before, so that
    /// [`Self::unacked`] is what it lacks.
    pub fn resume(&mut self, received: u64) -> Result<(), Gap> {
        let held_from = self.sent - self.held.len() as u64;
        if received < held_from || received > self.sent {
            return Err(Gap {
                asked: received,
                held_from,
                sent: self.sent,
            });
        }
        self.held.drain(..(received - held_from) as usize);
        Ok(())
    }

    /// The bytes held, in order (two slices of the ring): after [`Self::resume`], what the
    /// peer lacks.
    pub fn unacked(&self) -> (&[u8], &[u8]) {
        self.held.as_slices()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resent(r: &mut Replay, received: u64) -> Result<Vec<u8>, Gap> {
        r.resume(received)?;
        let (a, b) = r.unacked();
        Ok([a, b].concat())
    }

    #[test]
    fn a_resume_sends_again_exactly_what_the_peer_lacks() {
        let mut r = Replay::new(8);
        r.push(b"hello");
        assert_eq!(r.sent(), 5);
        assert_eq!(resent(&mut r, 2).unwrap(), b"llo");
        // What the peer acknowledged is gone for good.
        assert!(resent(&mut r, 1).is_err());
        r.push(b" world");
        assert_eq!(r.sent(), 11);
        // Only the last 8 bytes are held.
        assert_eq!(
            resent(&mut r, 2),
            Err(Gap {
                asked: 2,
                held_from: 3,
                sent: 11
            })
        );
        assert_eq!(resent(&mut r, 3).unwrap(), b"lo world");
        assert_eq!(resent(&mut r, 11).unwrap(), b"");
        // More than was ever sent is a broken peer.
        assert!(resent(&mut r, 12).is_err());
    }

    #[test]
    fn a_push_larger_than_the_capacity_keeps_its_tail() {
        let mut r = Replay::new(4);
        r.push(b"ab");
        r.push(b"0123456789");
        assert_eq!(r.sent(), 12);
        assert_eq!(resent(&mut r, 8).unwrap(), b"6789");
        assert!(resent(&mut r, 7).is_err());
    }

    #[test]
    fn the_ring_wraps_and_still_resends_in_order() {
        let mut r = Replay::new(6);
        let mut all = Vec::new();
        for i in 0..50u8 {
            let chunk = [i, i.wrapping_mul(7), i ^ 0x55];
            r.push(&chunk);
            all.extend(chunk);
            // Resuming where the oldest held byte is sends back all of them, in order.
            let from = r.sent().saturating_sub(6);
            assert_eq!(resent(&mut r, from).unwrap(), &all[from as usize..], "{i}");
        }
        assert_eq!(resent(&mut r, 147).unwrap(), &all[147..]);
    }

    #[test]
    fn tokens_never_show_in_debug_output() {
        let token = ForwardToken([0xab; 16]);
        let shown = format!("{:?}", Resume { token, received: 3 });
        assert!(!shown.contains("171") && !shown.contains("ab"), "{shown}");
    }
}
