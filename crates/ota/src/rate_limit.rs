//! The download rate cap (`ota.download_rate_limit`, or the server's shared attribute
//! `ota_download_rate_limit`): a token bucket the download loop asks, after each chunk it
//! received, how long to pause before reading the next. Pausing the reader lets the TCP window
//! fill, so the server slows down to the cap too (curl's `--limit-rate` works the same way).
//!
//! Invariants (one test each):
//! - over any long transfer the average rate is the cap: the bucket may go into debt by one
//!   chunk and the pause pays exactly that debt;
//! - at most `BURST` worth of bytes (a tenth of a second at the cap) arrive unpaused after an
//!   idle moment, so a short window cannot exceed the cap by more than that;
//! - a changed cap applies from the next chunk, without a burst;
//! - a cap of 0 is none.
//!
//! Time is passed in: nothing here reads a clock.

use std::time::{Duration, Instant};

/// How much unpaused credit an idle moment may build up: this fraction of a second at the cap.
const BURST_SECS: f64 = 0.1;

#[derive(Debug)]
pub struct TokenBucket {
    /// Bytes per second; 0: no cap.
    rate: u64,
    /// Credit in bytes; negative: debt, paid by pausing.
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u64, now: Instant) -> Self {
        Self {
            rate,
            tokens: 0.0,
            last: now,
        }
    }

    /// Use `rate` (bytes per second, 0 none) from now on.
    pub fn set_rate(&mut self, rate: u64, now: Instant) {
        if rate != self.rate {
            self.refill(now);
            self.rate = rate;
            // Debt at the old rate is not carried over, and no credit either: a new cap
            // starts clean.
            self.tokens = 0.0;
        }
    }

    /// `n` bytes arrived at `now`: how long to pause before reading more.
    pub fn take(&mut self, n: usize, now: Instant) -> Duration {
        if self.rate == 0 {
            self.last = now;
            return Duration::ZERO;
        }
        self.refill(now);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(-self.tokens / self.rate as f64)
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        let burst = self.rate as f64 * BURST_SECS;
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(burst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` chunks of `size` bytes as fast as the bucket allows (the reader takes no
    /// time itself), returns the simulated seconds it took.
    fn transfer(bucket: &mut TokenBucket, start: Instant, chunks: usize, size: usize) -> f64 {
        let mut now = start;
        for _ in 0..chunks {
            now += bucket.take(size, now);
        }
        now.duration_since(start).as_secs_f64()
    }

    #[test]
    fn the_average_rate_is_the_cap() {
        let t0 = Instant::now();
        for (rate, size) in [
            (1_000_000u64, 16_384usize),
            (65_536, 1_400),
            (10_000_000, 65_536),
        ] {
            let mut b = TokenBucket::new(rate, t0);
            let chunks = 2_000;
            let secs = transfer(&mut b, t0, chunks, size);
            let measured = (chunks * size) as f64 / secs;
            let err = (measured - rate as f64).abs() / rate as f64;
            assert!(
                err < 0.001,
                "{rate} B/s with {size} B chunks: {measured:.0} B/s"
            );
        }
    }

    #[test]
    fn an_idle_moment_buys_at_most_a_tenth_of_a_second_unpaused() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1_000_000, t0);
        // An hour of silence, then as much as can come without a pause.
        let later = t0 + Duration::from_secs(3600);
        let mut free = 0;
        while b.take(1_000, later).is_zero() {
            free += 1_000;
        }
        assert_eq!(free, 100_000, "0.1 s at 1 MB/s");
    }

    #[test]
    fn a_changed_cap_applies_from_the_next_chunk() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1_000_000, t0);
        let secs = transfer(&mut b, t0, 100, 10_000);
        let t1 = t0 + Duration::from_secs_f64(secs);
        b.set_rate(100_000, t1);
        let secs = transfer(&mut b, t1, 100, 10_000);
        assert!((secs - 10.0).abs() < 0.01, "1 MB at 100 kB/s took {secs} s");
    }

    #[test]
    fn a_cap_of_zero_is_none() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(0, t0);
        assert_eq!(b.take(usize::MAX / 2, t0), Duration::ZERO);
        b.set_rate(1_000, t0);
        assert_eq!(b.take(2_000, t0), Duration::from_secs(2));
        b.set_rate(0, t0);
        assert_eq!(b.take(2_000, t0), Duration::ZERO);
    }
}
