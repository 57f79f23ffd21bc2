//! Rate quotas as plain values with the time passed in (tested without a clock).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most `max` events in any `window`; `max == 0` means no limit.
pub struct RateWindow {
    max: usize,
    window: Duration,
    events: Mutex<VecDeque<Instant>>,
}

impl RateWindow {
    pub fn new(max: usize, window: Duration) -> Self {
        Self {
            max,
            window,
            events: Mutex::new(VecDeque::new()),
        }
    }

    /// Count one event at `now` if the quota allows it.
    pub fn try_take(&self, now: Instant) -> bool {
        if self.max == 0 {
            return true;
        }
        let mut ev = self.events.lock().unwrap_or_else(|p| p.into_inner());
        while ev
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= self.window)
        {
            ev.pop_front();
        }
        if ev.len() >= self.max {
            return false;
        }
        ev.push_back(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_max_per_window_then_the_oldest_expires() {
        let w = RateWindow::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(w.try_take(t0));
        assert!(w.try_take(t0 + Duration::from_secs(10)));
        assert!(!w.try_take(t0 + Duration::from_secs(59)));
        assert!(
            w.try_take(t0 + Duration::from_secs(60)),
            "the first one left the window"
        );
        assert!(!w.try_take(t0 + Duration::from_secs(61)));
        let off = RateWindow::new(0, Duration::from_secs(60));
        assert!((0..1000).all(|_| off.try_take(t0)));
    }
}
