//! Heartbeat liveness, both ways.
//!
//! Each side pings when it has sent nothing for `interval`, answers every ping with a pong,
//! and declares the peer gone when it has heard nothing at all for `timeout`. Any frame
//! counts as a sign of life, so a busy connection sends no extra heartbeats.

use crate::control::{Ping, Pong};
use std::time::{Duration, Instant};

/// The liveness state of one connection.
#[derive(Debug, Clone)]
pub struct Liveness {
    interval: Duration,
    timeout: Duration,
    last_sent: Instant,
    last_heard: Instant,
    next_seq: u64,
}

impl Liveness {
    pub fn new(now: Instant, interval: Duration, timeout: Duration) -> Self {
        Self {
            interval,
            timeout: timeout.max(interval),
            last_sent: now,
            last_heard: now,
            next_seq: 0,
        }
    }

    /// Anything arrived from the peer.
    pub fn on_heard(&mut self, now: Instant) {
        self.last_heard = self.last_heard.max(now);
    }

    /// Anything was sent to the peer.
    pub fn on_sent(&mut self, now: Instant) {
        self.last_sent = self.last_sent.max(now);
    }

    /// A ping from the peer: counts as heard; returns the pong to send.
    pub fn on_ping(&mut self, now: Instant, ping: Ping) -> Pong {
        self.on_heard(now);
        Pong { seq: ping.seq }
    }

    /// Whether the peer has been silent for longer than the timeout.
    pub fn is_expired(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_heard) >= self.timeout
    }

    /// A ping to send now, if the line has been quiet for a full interval.
    pub fn poll_ping(&mut self, now: Instant) -> Option<Ping> {
        if now.saturating_duration_since(self.last_sent) < self.interval {
            return None;
        }
        self.last_sent = now;
        let seq = self.next_seq;
        self.next_seq += 1;
        Some(Ping { seq })
    }

    /// The next instant at which [`poll_ping`](Self::poll_ping) or
    /// [`is_expired`](Self::is_expired) can change its answer.
    pub fn next_deadline(&self) -> Instant {
        (self.last_sent + self.interval).min(self.last_heard + self.timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_only_when_quiet_and_expires_after_silence() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut l = Liveness::new(t0, 2 * s, 6 * s);
        assert_eq!(l.poll_ping(t0 + s), None);
        assert_eq!(l.next_deadline(), t0 + 2 * s);
        assert_eq!(l.poll_ping(t0 + 2 * s), Some(Ping { seq: 0 }));
        l.on_sent(t0 + 3 * s);
        assert_eq!(l.poll_ping(t0 + 4 * s), None);
        assert_eq!(l.poll_ping(t0 + 5 * s), Some(Ping { seq: 1 }));
        assert!(!l.is_expired(t0 + 5 * s));
        assert!(l.is_expired(t0 + 6 * s));
        l.on_heard(t0 + 6 * s);
        assert!(!l.is_expired(t0 + 11 * s));
        assert_eq!(l.on_ping(t0 + 7 * s, Ping { seq: 9 }), Pong { seq: 9 });
        assert!(!l.is_expired(t0 + 12 * s));
        assert!(l.is_expired(t0 + 13 * s));
    }

    #[test]
    fn timeout_is_never_shorter_than_interval() {
        let t0 = Instant::now();
        let l = Liveness::new(t0, Duration::from_secs(5), Duration::from_secs(1));
        assert!(!l.is_expired(t0 + Duration::from_secs(4)));
    }
}
