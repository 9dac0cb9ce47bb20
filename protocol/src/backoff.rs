//! Reconnect backoff: exponential, capped, with jitter.
//!
//! Delay for attempt `n` is drawn uniformly from `[d/2, d]` where `d = min(cap, base * 2^n)`
//! ("equal jitter"): it never collapses to zero, so a fleet that lost its hub at the same
//! instant spreads out instead of arriving as one wave. Randomness is passed in.

use std::time::Duration;

/// Backoff state for one reconnecting peer.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap: cap.max(base),
            attempt: 0,
        }
    }

    /// The delay before the next attempt; `unit` is a random number in `[0, 1)`.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.5
        };
        exp / 2 + exp.mul_f64(unit / 2.0)
    }

    /// Forget past failures (after a connection was established).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_within_jitter_and_caps() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(2000));
        assert_eq!(b.next_delay(0.0), ms(50));
        assert_eq!(b.next_delay(0.999_999).as_millis(), 199);
        assert_eq!(b.next_delay(0.0), ms(200));
        for _ in 0..40 {
            let d = b.next_delay(1.0);
            assert!(d <= ms(2000));
        }
        assert_eq!(b.next_delay(0.0), ms(1000));
        b.reset();
        assert_eq!(b.next_delay(0.0), ms(50));
        assert_eq!(b.next_delay(f64::NAN), ms(150));
    }
}
