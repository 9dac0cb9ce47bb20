//! Heartbeat liveness, both ways.
//!
//! Each side pings when it has sent nothing for `interval`, answers every ping with a pong,
//! and declares the peer gone when it has heard nothing at all for `timeout`. Any frame
//! counts as a sign of life, so a busy connection sends no extra heartbeats.
//!
//! A ping that goes unanswered makes the side probe: it pings every `interval / 8` (at
//! least 100 ms) until it hears from the peer again or gives up at the timeout. A
//! restarted hub answers the first probe that reaches it with a stateless reset, so an
//! agent notices a hub that came back within a fraction of the heartbeat interval, while
//! an idle, healthy link still costs one ping per interval.

use crate::control::{Ping, Pong};
use std::time::{Duration, Instant};

const PROBE_FLOOR: Duration = Duration::from_millis(100);

/// The liveness state of one connection.
#[derive(Debug, Clone)]
pub struct Liveness {
    interval: Duration,
    probe: Duration,
    timeout: Duration,
    last_sent: Instant,
    last_heard: Instant,
    /// When the oldest ping not yet followed by anything from the peer was sent.
    unanswered_since: Option<Instant>,
    next_seq: u64,
}

impl Liveness {
    pub fn new(now: Instant, interval: Duration, timeout: Duration) -> Self {
        Self {
            interval,
            probe: (interval / 8).max(PROBE_FLOOR).min(interval),
            timeout: timeout.max(interval),
            last_sent: now,
            last_heard: now,
            unanswered_since: None,
            next_seq: 0,
        }
    }

    /// Anything arrived from the peer.
    pub fn on_heard(&mut self, now: Instant) {
        self.last_heard = self.last_heard.max(now);
        if self.unanswered_since.is_some_and(|sent| sent <= now) {
            self.unanswered_since = None;
        }
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

    fn gap(&self) -> Duration {
        if self.unanswered_since.is_some() {
            self.probe
        } else {
            self.interval
        }
    }

    /// A ping to send now: after a quiet interval, or a probe while a ping is unanswered.
    pub fn poll_ping(&mut self, now: Instant) -> Option<Ping> {
        if now.saturating_duration_since(self.last_sent) < self.gap() {
            return None;
        }
        self.last_sent = now;
        self.unanswered_since.get_or_insert(now);
        let seq = self.next_seq;
        self.next_seq += 1;
        Some(Ping { seq })
    }

    /// The next instant at which [`poll_ping`](Self::poll_ping) or
    /// [`is_expired`](Self::is_expired) can change its answer.
    pub fn next_deadline(&self) -> Instant {
        (self.last_sent + self.gap()).min(self.last_heard + self.timeout)
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
        l.on_heard(t0 + 2 * s); // the pong
        l.on_sent(t0 + 3 * s);
        assert_eq!(l.poll_ping(t0 + 4 * s), None);
        assert_eq!(l.poll_ping(t0 + 5 * s), Some(Ping { seq: 1 }));
        l.on_heard(t0 + 5 * s);
        assert!(!l.is_expired(t0 + 10 * s));
        assert!(l.is_expired(t0 + 11 * s));
        assert_eq!(l.on_ping(t0 + 7 * s, Ping { seq: 9 }), Pong { seq: 9 });
        assert!(!l.is_expired(t0 + 12 * s));
        assert!(l.is_expired(t0 + 13 * s));
    }

    #[test]
    fn an_unanswered_ping_turns_into_quick_probes_until_the_peer_answers() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut l = Liveness::new(t0, ms(2000), ms(6000));
        assert_eq!(l.poll_ping(t0 + ms(2000)), Some(Ping { seq: 0 }));
        // No answer: probe every 250 ms.
        assert_eq!(l.next_deadline(), t0 + ms(2250));
        assert_eq!(l.poll_ping(t0 + ms(2200)), None);
        assert_eq!(l.poll_ping(t0 + ms(2250)), Some(Ping { seq: 1 }));
        assert_eq!(l.poll_ping(t0 + ms(2500)), Some(Ping { seq: 2 }));
        // The peer answers: back to one ping per interval.
        l.on_heard(t0 + ms(2510));
        assert_eq!(l.poll_ping(t0 + ms(2800)), None);
        assert_eq!(l.next_deadline(), t0 + ms(4500));
        assert_eq!(l.poll_ping(t0 + ms(4500)), Some(Ping { seq: 3 }));
        // Silence until the timeout.
        assert!(l.is_expired(t0 + ms(8510)));
    }

    #[test]
    fn probes_never_come_faster_than_the_floor_or_slower_than_the_interval() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut fast = Liveness::new(t0, ms(400), ms(1200));
        fast.poll_ping(t0 + ms(400)).unwrap();
        assert_eq!(fast.next_deadline(), t0 + ms(500));
        let mut slow = Liveness::new(t0, ms(50), ms(1000));
        slow.poll_ping(t0 + ms(50)).unwrap();
        assert_eq!(slow.next_deadline(), t0 + ms(100));
    }

    #[test]
    fn timeout_is_never_shorter_than_interval() {
        let t0 = Instant::now();
        let l = Liveness::new(t0, Duration::from_secs(5), Duration::from_secs(1));
        assert!(!l.is_expired(t0 + Duration::from_secs(4)));
    }
}
