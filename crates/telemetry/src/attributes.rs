//! When a change of the device's attributes is published: at once, or with a later publish.
//!
//! Most attributes are what an operator or a rule acts on (slot, version, OTA status, tunnel
//! up/down, addresses): a change is published at once, with a telemetry sample. A few only
//! record that the protocol is alive ([`LAZY`]: the WireGuard handshake time, new every two or
//! three minutes); a change of those alone waits for the next publish that happens for another
//! reason, and at the latest [`LAZY_REFRESH`], so they never cost messages of their own at the
//! telemetry rate (issue 23: 68 messages instead of 60 in ten minutes).

use serde_json::Value;
use std::time::Duration;
use tokio::time::Instant;

/// Attribute keys whose changes wait (see the module docs).
pub const LAZY: &[&str] = &["tunnel_last_handshake"];
/// The longest a change of lazy attributes alone waits.
pub const LAZY_REFRESH: Duration = Duration::from_secs(600);

/// What the broker was last told, and since when a lazy change waits.
#[derive(Debug)]
pub struct AttributeTracker {
    published: Value,
    waiting_since: Option<Instant>,
}

fn urgent(view: &Value) -> Value {
    let mut v = view.clone();
    if let Some(o) = v.as_object_mut() {
        for k in LAZY {
            o.remove(*k);
        }
    }
    v
}

impl AttributeTracker {
    pub fn new(view: Value) -> Self {
        Self {
            published: view,
            waiting_since: None,
        }
    }

    /// The state changed to `view`: publish now?
    pub fn changed(&mut self, view: &Value, now: Instant) -> bool {
        if *view == self.published {
            self.waiting_since = None;
            return false;
        }
        if urgent(view) != urgent(&self.published) {
            return true;
        }
        self.waiting_since.get_or_insert(now);
        false
    }

    /// A telemetry tick: is a waiting lazy change due?
    pub fn due(&self, now: Instant) -> bool {
        self.waiting_since
            .is_some_and(|since| now.duration_since(since) >= LAZY_REFRESH)
    }

    /// Attributes with `view` were handed to the broker.
    pub fn published(&mut self, view: Value) {
        self.published = view;
        self.waiting_since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn view(slot: &str, handshake: i64) -> Value {
        json!({"rauc_slot": slot, "tunnel_state": "up", "tunnel_last_handshake": handshake})
    }

    #[test]
    fn an_urgent_change_publishes_at_once() {
        let t0 = Instant::now();
        let mut a = AttributeTracker::new(view("A", 1));
        assert!(a.changed(&view("B", 1), t0));
        // Both at once: the lazy one goes along.
        assert!(a.changed(&view("B", 2), t0));
        a.published(view("B", 2));
        assert!(!a.changed(&view("B", 2), t0));
    }

    #[test]
    fn a_lazy_change_alone_waits_for_the_refresh() {
        let t0 = Instant::now();
        let mut a = AttributeTracker::new(view("A", 1));
        assert!(!a.changed(&view("A", 2), t0));
        assert!(!a.changed(&view("A", 3), t0 + Duration::from_secs(150)));
        assert!(!a.due(t0 + LAZY_REFRESH - Duration::from_secs(1)));
        // Measured from the first waiting change, not the last.
        assert!(a.due(t0 + LAZY_REFRESH));
        a.published(view("A", 3));
        assert!(!a.due(t0 + LAZY_REFRESH * 2));
    }

    #[test]
    fn an_urgent_change_takes_the_waiting_lazy_one_along() {
        let t0 = Instant::now();
        let mut a = AttributeTracker::new(view("A", 1));
        assert!(!a.changed(&view("A", 2), t0));
        assert!(a.changed(&view("B", 2), t0 + Duration::from_secs(5)));
        a.published(view("B", 2));
        assert!(!a.due(t0 + LAZY_REFRESH));
    }

    #[test]
    fn a_change_back_is_no_change() {
        let t0 = Instant::now();
        let mut a = AttributeTracker::new(view("A", 1));
        assert!(!a.changed(&view("A", 2), t0));
        assert!(!a.changed(&view("A", 1), t0));
        assert!(!a.due(t0 + LAZY_REFRESH));
    }

    #[test]
    fn the_handshake_time_is_lazy() {
        let s = thingsly_core::DeviceState::default();
        let v = thingsly_core::device_state::attribute_view(&s);
        for k in LAZY {
            assert!(v.get(*k).is_some(), "{k} is not an attribute");
        }
    }
}
