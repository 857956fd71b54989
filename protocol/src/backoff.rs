//! The reconnect schedule both agents follow after losing the gateway.
//!
//! One shape for the fleet, whatever the device: exponential from a first
//! delay, capped, and jittered by drawing each wait uniformly from
//! `[d/2, d]`. The jitter keeps a fleet that lost its gateway together from
//! coming back in step; keeping half of `d` keeps the growth, so a device
//! never waits less than half the delay it has earned. The caller supplies
//! the random number, so the schedule stays a pure function here (no RNG,
//! no clock, no allocator) and a test can pin it.

/// Jittered exponential backoff in milliseconds: the n-th delay (from 0)
/// is drawn from `[d/2, d]` with `d = min(max, min * 2^n)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    min_ms: u64,
    max_ms: u64,
    attempt: u32,
}

impl Backoff {
    /// A schedule from `min_ms` (at least 1) doubling up to `max_ms` (at
    /// least `min_ms`).
    pub const fn new(min_ms: u64, max_ms: u64) -> Self {
        let min_ms = if min_ms == 0 { 1 } else { min_ms };
        let max_ms = if max_ms < min_ms { min_ms } else { max_ms };
        Backoff {
            min_ms,
            max_ms,
            attempt: 0,
        }
    }

    /// The next delay, in milliseconds, with `random` any uniformly
    /// distributed number (the caller's RNG).
    pub fn next_ms(&mut self, random: u64) -> u64 {
        let d = self
            .min_ms
            .saturating_mul(1u64 << self.attempt.min(63))
            .min(self.max_ms);
        self.attempt = self.attempt.saturating_add(1);
        let half = d / 2;
        half + random % (d - half + 1)
    }

    /// Starts again from the first delay: after a session that worked.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_within_half_of_each() {
        let mut low = Backoff::new(1000, 8000);
        let lows: [u64; 6] = core::array::from_fn(|_| low.next_ms(0));
        assert_eq!(lows, [500, 1000, 2000, 4000, 4000, 4000]);
        let mut high = Backoff::new(1000, 8000);
        let highs: [u64; 6] = core::array::from_fn(|_| high.next_ms(u64::MAX));
        // u64::MAX % (d/2 + 1) for these d: each lies in [d/2, d].
        for (h, l) in highs.iter().zip(lows) {
            assert!(*h >= l && *h <= 2 * l, "{highs:?}");
        }
        // Both ends of the window are reachable.
        assert_eq!(Backoff::new(1000, 8000).next_ms(500), 1000);
        assert_eq!(Backoff::new(1000, 8000).next_ms(501), 500);
    }

    #[test]
    fn every_draw_lies_in_its_window() {
        let mut b = Backoff::new(300, 300_000);
        for n in 0..200u64 {
            let d = (300u64 << n.min(20)).min(300_000);
            let ms = b.next_ms(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            assert!(
                ms >= d / 2 && ms <= d,
                "attempt {n}: {ms} not in [{}, {d}]",
                d / 2
            );
        }
    }

    #[test]
    fn reset_starts_again_and_odd_settings_are_sane() {
        let mut b = Backoff::new(1000, 8000);
        for _ in 0..10 {
            b.next_ms(3);
        }
        b.reset();
        assert!(b.next_ms(u64::MAX) <= 1000);
        // No zero delay (a busy loop), no cap below the first delay.
        assert_eq!(Backoff::new(0, 0).next_ms(u64::MAX), 1);
        assert_eq!(Backoff::new(5000, 10).next_ms(0), 2500);
        // Many attempts never overflow.
        let mut long = Backoff::new(u64::MAX / 2, u64::MAX);
        for _ in 0..100 {
            assert!(long.next_ms(u64::MAX) >= u64::MAX / 4);
        }
    }
}
