//! When a device asks its server next (DDI polls; the same rules shape enrollment retries): a
//! fleet must not arrive in lockstep, neither after a common power cut nor after a server
//! outage, and must not hammer a server that says it is busy.
//!
//! - after an answer: the server's interval, ±10 % (the average stays the interval);
//! - after a failure (transport, 5xx, 408): the interval doubling per failure, up to the cap,
//!   with half jitter (uniform in [d/2, d]), back to the interval after the next answer;
//! - when the server throttles (429, 503) with `Retry-After`: never earlier than it asks,
//!   spread over 20 % more (at most [`MAX_RETRY_AFTER`]); without the header, as a failure;
//! - after a refusal (another 4xx: the server knows the device's request is wrong, e.g. a
//!   target not provisioned yet): the interval, so the device notices a fix in time.
//!
//! Pure: the caller passes the random number (`u` in [0, 1)) and the clock.

use std::time::{Duration, SystemTime};

/// The longest `Retry-After` honoured: a server cannot park a device for longer.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// The shortest wait between two requests, whatever the server says.
pub const MIN_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollOutcome {
    Answered,
    /// Transport error, timeout, 5xx, 408.
    Failed,
    /// 429 or 503, with the server's `Retry-After` if it sent one.
    Throttled(Option<Duration>),
    /// Any other 4xx.
    Refused,
}

#[derive(Debug, Clone)]
pub struct PollSchedule {
    failures: u32,
    /// The longest wait after failures.
    cap: Duration,
}

impl PollSchedule {
    pub fn new(cap: Duration) -> Self {
        Self { failures: 0, cap }
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The wait before the first request after a start: spread over the interval (at most a
    /// minute), so that a fleet powered up together does not poll together.
    pub fn first(interval: Duration, u: f64) -> Duration {
        interval
            .min(Duration::from_secs(60))
            .mul_f64(u.clamp(0.0, 1.0))
    }

    /// The wait after `outcome`, for a server interval of `interval`.
    pub fn next(&mut self, outcome: PollOutcome, interval: Duration, u: f64) -> Duration {
        let u = u.clamp(0.0, 1.0);
        let interval = interval.max(MIN_WAIT);
        let backoff = |failures: u32| {
            let exp = failures.saturating_sub(1).min(20);
            let d = interval
                .saturating_mul(1u32 << exp)
                .min(self.cap.max(interval));
            d.mul_f64(0.5 + 0.5 * u)
        };
        let wait = match outcome {
            PollOutcome::Answered | PollOutcome::Refused => {
                self.failures = 0;
                interval.mul_f64(0.9 + 0.2 * u)
            }
            PollOutcome::Failed | PollOutcome::Throttled(None) => {
                self.failures = self.failures.saturating_add(1);
                backoff(self.failures)
            }
            PollOutcome::Throttled(Some(asked)) => {
                self.failures = self.failures.saturating_add(1);
                asked
                    .clamp(MIN_WAIT, MAX_RETRY_AFTER)
                    .mul_f64(1.0 + 0.2 * u)
            }
        };
        wait.max(MIN_WAIT)
    }
}

/// `Retry-After` (RFC 9110 §10.2.3): delay-seconds or an HTTP-date, as a wait from `now`.
/// Unreadable values count as absent.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return v.parse::<u64>().ok().map(Duration::from_secs);
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn answers_keep_the_interval_with_ten_percent_jitter() {
        let mut s = PollSchedule::new(10 * MIN);
        assert_eq!(
            s.next(PollOutcome::Answered, 5 * MIN, 0.0),
            Duration::from_secs(270)
        );
        assert_eq!(
            s.next(PollOutcome::Answered, 5 * MIN, 1.0),
            Duration::from_secs(330)
        );
        assert_eq!(s.next(PollOutcome::Answered, 5 * MIN, 0.5), 5 * MIN);
    }

    #[test]
    fn failures_double_up_to_the_cap_and_an_answer_resets() {
        let mut s = PollSchedule::new(10 * MIN);
        let top: Vec<u64> = (0..6)
            .map(|_| s.next(PollOutcome::Failed, MIN, 1.0).as_secs())
            .collect();
        assert_eq!(top, [60, 120, 240, 480, 600, 600]);
        assert_eq!(s.failures(), 6);
        // The floor of the jitter is half.
        assert_eq!(s.next(PollOutcome::Failed, MIN, 0.0), 5 * MIN);
        s.next(PollOutcome::Answered, MIN, 0.5);
        assert_eq!(s.next(PollOutcome::Failed, MIN, 1.0), MIN);
        // An interval above the cap is not shortened by failures.
        let mut long = PollSchedule::new(10 * MIN);
        assert_eq!(long.next(PollOutcome::Failed, 60 * MIN, 1.0), 60 * MIN);
    }

    #[test]
    fn retry_after_is_never_undercut_and_is_bounded() {
        let mut s = PollSchedule::new(10 * MIN);
        let asked = Duration::from_secs(120);
        for u in [0.0, 0.3, 0.99] {
            let w = s.next(PollOutcome::Throttled(Some(asked)), 5 * MIN, u);
            assert!(w >= asked && w <= asked.mul_f64(1.2), "{w:?}");
        }
        assert_eq!(
            s.next(
                PollOutcome::Throttled(Some(Duration::from_secs(86_400))),
                MIN,
                0.0
            ),
            MAX_RETRY_AFTER
        );
        assert_eq!(
            s.next(PollOutcome::Throttled(Some(Duration::ZERO)), MIN, 0.0),
            MIN_WAIT
        );
        // Without the header a throttle is a failure (backoff).
        let mut t = PollSchedule::new(10 * MIN);
        t.next(PollOutcome::Throttled(None), MIN, 1.0);
        assert_eq!(t.next(PollOutcome::Throttled(None), MIN, 1.0), 2 * MIN);
    }

    #[test]
    fn refusals_poll_at_the_interval_without_growing() {
        let mut s = PollSchedule::new(10 * MIN);
        for _ in 0..5 {
            assert_eq!(s.next(PollOutcome::Refused, MIN, 0.5), MIN);
        }
        assert_eq!(s.failures(), 0);
    }

    #[test]
    fn a_fleet_after_an_outage_spreads_out() {
        // 1000 devices that all failed at the same instant: their retries cover half the
        // backoff window instead of landing in one second.
        let mut rng = fastrand::Rng::with_seed(7);
        let mut seconds = std::collections::HashSet::new();
        for _ in 0..1000 {
            let mut s = PollSchedule::new(10 * MIN);
            seconds.insert(s.next(PollOutcome::Failed, 5 * MIN, rng.f64()).as_secs());
        }
        assert!(seconds.len() > 100, "{}", seconds.len());
        assert!(PollSchedule::first(5 * MIN, 0.999) <= MIN);
    }

    #[test]
    fn retry_after_parses_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // 06 Nov 1994 08:49:37
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:51:37 GMT", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("", now), None);
    }
}
