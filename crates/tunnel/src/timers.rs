//! When boringtun's `Tunn::update_timers` next has something to do for one peer, so a node
//! sleeps until then instead of ticking every 250 ms (issue 23: the ticks were most of the
//! agent's idle CPU).
//!
//! boringtun keeps its timers private, so [`PeerClock`] mirrors the times they are computed
//! from, out of what the node sees go out and come in (each datagram's message type), and
//! returns the earliest moment one of WireGuard's thresholds can be crossed (the constants and
//! conditions of boringtun 0.7 `noise/timers.rs`, after the WireGuard paper §6). Every estimate
//! errs early: waking early costs one `update_timers` call, waking late would delay a
//! keepalive, a retry or a rekey.
//!
//! Two things the clock alone cannot give, which the node does around every packet:
//! - boringtun stamps events with the time of its last `update_timers` call, not the event's
//!   own: the node calls it first when that call is older than [`FRESH`] ([`PeerClock::stale`]);
//! - some conditions become true by an event, not by time passing (data sent on a session
//!   older than 120 s): the node calls it after each event too.

use std::time::{Duration, Instant};

const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
const COOKIE_EXPIRATION_TIME: Duration = Duration::from_secs(120);
/// How old boringtun's notion of "now" may be when it stamps an event. Two events closer than
/// this share a stamp, which only ever means "answered in time" in boringtun's comparisons.
pub const FRESH: Duration = Duration::from_millis(5);
/// boringtun keeps this many sessions; each is rejected 180 s after it was made.
const SESSIONS: usize = 8;
/// A data message with no payload: 16 bytes of header and a 16-byte tag.
const KEEPALIVE_LEN: usize = 32;

/// A WireGuard message, as far as the timers care (its first byte, then its length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    Initiation,
    Response,
    CookieReply,
    /// A transport message carrying an inner packet.
    Data,
    /// A transport message with nothing inside.
    Keepalive,
}

impl Message {
    /// The kind of a datagram produced or accepted by boringtun; `None` for anything else.
    pub fn of(datagram: &[u8]) -> Option<Self> {
        match datagram.first()? {
            1 => Some(Self::Initiation),
            2 => Some(Self::Response),
            3 => Some(Self::CookieReply),
            4 if datagram.len() <= KEEPALIVE_LEN => Some(Self::Keepalive),
            4 => Some(Self::Data),
            _ => None,
        }
    }
}

/// What one `update_timers` call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Nothing,
    /// It produced this message (a retried or new initiation, or a keepalive).
    Sent(Message),
    /// `ConnectionExpired`: sessions gone, nothing runs again until traffic starts a handshake.
    Expired,
}

/// The times boringtun's timers of one peer are computed from.
#[derive(Debug, Clone)]
pub struct PeerClock {
    created: Instant,
    persistent_keepalive: Option<Duration>,
    last_run: Instant,
    sent: Option<Instant>,
    received: Option<Instant>,
    data_sent: Option<Instant>,
    data_received: Option<Instant>,
    /// The last initiation sent (first or retry).
    initiation_sent: Option<Instant>,
    cookie_received: Option<Instant>,
    /// When each kept session was made, newest at `newest`.
    sessions: [Option<Instant>; SESSIONS],
    newest: usize,
    keepalive_due: Option<Instant>,
    expired: bool,
}

impl PeerClock {
    /// A peer whose `Tunn` was created at `now`.
    pub fn new(now: Instant, persistent_keepalive: Option<u16>) -> Self {
        let persistent_keepalive = persistent_keepalive
            .filter(|k| *k > 0)
            .map(|k| Duration::from_secs(k.into()));
        Self {
            created: now,
            keepalive_due: persistent_keepalive.map(|k| now + k),
            persistent_keepalive,
            last_run: now,
            sent: None,
            received: None,
            data_sent: None,
            data_received: None,
            initiation_sent: None,
            cookie_received: None,
            sessions: [None; SESSIONS],
            newest: 0,
            expired: false,
        }
    }

    /// boringtun's clock is older than [`FRESH`]: run the timers before the next event.
    pub fn stale(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last_run) >= FRESH
    }

    pub fn sent(&mut self, now: Instant, message: Message) {
        self.sent = Some(now);
        match message {
            Message::Initiation => {
                if self.expired {
                    // format_handshake_initiation clears every timer of an expired tunnel.
                    self.expired = false;
                    self.keepalive_due = self.persistent_keepalive.map(|k| now + k);
                }
                self.initiation_sent = Some(now);
            }
            Message::Data => self.data_sent = Some(now),
            Message::Response | Message::CookieReply | Message::Keepalive => {}
        }
    }

    pub fn received(&mut self, now: Instant, message: Message) {
        self.received = Some(now);
        match message {
            Message::Data => self.data_received = Some(now),
            Message::CookieReply => self.cookie_received = Some(now),
            _ => {}
        }
    }

    /// The current session was made at `at` (from `Tunn::time_since_last_handshake`, so the
    /// same session reads a few microseconds apart: only a clearly newer time is a new one).
    pub fn established(&mut self, at: Instant) {
        let newer = match self.sessions[self.newest] {
            None => true,
            Some(t) => at > t + Duration::from_millis(500),
        };
        if newer {
            self.newest = (self.newest + 1) % SESSIONS;
            self.sessions[self.newest] = Some(at);
        }
    }

    /// `update_timers` ran at `now` and did `outcome`.
    pub fn ran(&mut self, now: Instant, outcome: Outcome) {
        self.last_run = now;
        match outcome {
            Outcome::Expired => {
                self.expired = true;
                self.sessions = [None; SESSIONS];
            }
            // The persistent keepalive is the only timer that moves only when it fires.
            Outcome::Sent(Message::Keepalive) => {
                if let (Some(k), Some(due)) = (self.persistent_keepalive, self.keepalive_due)
                    && due <= now
                {
                    self.keepalive_due = Some(now + k);
                }
            }
            Outcome::Sent(_) | Outcome::Nothing => {}
        }
    }

    fn newest_session(&self) -> Option<Instant> {
        self.sessions[self.newest]
    }

    fn handshake_pending(&self) -> bool {
        self.initiation_sent
            .is_some_and(|i| self.newest_session().is_none_or(|e| e < i))
    }

    /// The earliest moment after the last run at which `update_timers` may act; `None` when
    /// nothing can happen until traffic does (an expired tunnel, or nothing configured).
    pub fn next_due(&self) -> Option<Instant> {
        if self.expired {
            return None;
        }
        let at = |t: Option<Instant>| t.unwrap_or(self.created);
        let mut due: Vec<Instant> = Vec::with_capacity(16);
        due.extend(self.keepalive_due);
        if self.handshake_pending() {
            // Retry after REKEY_TIMEOUT; giving up after REKEY_ATTEMPT_TIME is checked then too.
            due.extend(self.initiation_sent.map(|i| i + REKEY_TIMEOUT));
        }
        due.extend(
            self.sessions
                .iter()
                .flatten()
                .map(|s| *s + REJECT_AFTER_TIME),
        );
        if let Some(e) = self.newest_session() {
            // Keys are zeroed after 3 × REJECT_AFTER_TIME without a new session.
            due.push(e + REJECT_AFTER_TIME * 3);
            if self.data_sent.is_some_and(|d| d > e) {
                due.push(e + REKEY_AFTER_TIME);
            }
            if self.data_received.is_some_and(|d| d > e) {
                due.push(e + REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT);
            }
        }
        // Data came in and nothing went back: a keepalive KEEPALIVE_TIMEOUT after our last send.
        if self.data_received.is_some_and(|d| d > at(self.sent)) {
            due.push(at(self.sent) + KEEPALIVE_TIMEOUT);
        }
        // Data went out and nothing came back: a new handshake.
        if self.data_sent.is_some_and(|d| d > at(self.received)) {
            due.push(at(self.received) + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT);
        }
        due.extend(self.cookie_received.map(|c| c + COOKIE_EXPIRATION_TIME));
        due.into_iter().filter(|t| *t > self.last_run).min()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// A clock whose peer has had a session since its creation.
    fn session_at_start(keepalive: Option<u16>) -> (Instant, PeerClock) {
        let t0 = Instant::now();
        let mut c = PeerClock::new(t0, keepalive);
        c.established(t0);
        (t0, c)
    }

    #[test]
    fn message_kinds_from_the_first_byte_and_the_length() {
        assert_eq!(Message::of(&[1; 148]), Some(Message::Initiation));
        assert_eq!(Message::of(&[2; 92]), Some(Message::Response));
        assert_eq!(Message::of(&[3; 64]), Some(Message::CookieReply));
        assert_eq!(Message::of(&[4; 32]), Some(Message::Keepalive));
        assert_eq!(Message::of(&[4; 33]), Some(Message::Data));
        assert_eq!(Message::of(&[9; 40]), None);
        assert_eq!(Message::of(&[]), None);
    }

    #[test]
    fn an_idle_peer_without_keepalive_sleeps_until_traffic() {
        let t0 = Instant::now();
        let c = PeerClock::new(t0, None);
        assert_eq!(c.next_due(), None);
        assert_eq!(PeerClock::new(t0, Some(0)).next_due(), None);
    }

    #[test]
    fn an_unanswered_initiation_is_retried_after_rekey_timeout() {
        let t0 = Instant::now();
        let mut c = PeerClock::new(t0, None);
        c.sent(t0, Message::Initiation);
        c.ran(t0, Outcome::Nothing);
        assert_eq!(c.next_due(), Some(t0 + s(5)));
        // The retry at +5 s: due again 5 s later.
        c.ran(t0 + s(5), Outcome::Sent(Message::Initiation));
        c.sent(t0 + s(5), Message::Initiation);
        assert_eq!(c.next_due(), Some(t0 + s(10)));
        // Answered: no more retries, only the session's own deadlines.
        c.received(t0 + s(6), Message::Response);
        c.established(t0 + s(6));
        c.ran(t0 + s(6), Outcome::Nothing);
        assert_eq!(c.next_due(), Some(t0 + s(6) + REJECT_AFTER_TIME));
    }

    #[test]
    fn persistent_keepalive_moves_only_when_it_fires() {
        let (t0, mut c) = session_at_start(Some(25));
        assert_eq!(c.next_due(), Some(t0 + s(25)));
        // Traffic does not move it (boringtun's TimePersistentKeepalive is set only when it fires).
        c.sent(t0 + s(3), Message::Data);
        c.received(t0 + s(3), Message::Data);
        c.ran(t0 + s(3), Outcome::Nothing);
        assert_eq!(c.next_due(), Some(t0 + s(25)));
        c.ran(t0 + s(25), Outcome::Sent(Message::Keepalive));
        assert_eq!(c.next_due(), Some(t0 + s(50)));
        // A handshake in progress holds it back: still due, so the next event's call sends it.
        c.ran(t0 + s(50), Outcome::Sent(Message::Initiation));
        c.sent(t0 + s(50), Message::Initiation);
        assert_eq!(c.next_due(), Some(t0 + s(55)));
    }

    #[test]
    fn data_in_without_an_answer_wakes_for_the_keepalive() {
        let (t0, mut c) = session_at_start(None);
        c.sent(t0 + s(1), Message::Keepalive);
        c.received(t0 + s(4), Message::Data);
        c.ran(t0 + s(4), Outcome::Nothing);
        assert_eq!(c.next_due(), Some(t0 + s(11)));
        // We answered in time: no keepalive needed.
        c.sent(t0 + s(5), Message::Data);
        c.ran(t0 + s(5), Outcome::Nothing);
        let due = c.next_due().unwrap();
        assert!(due > t0 + s(11), "{:?}", due - t0);
    }

    #[test]
    fn data_out_without_an_answer_wakes_for_a_new_handshake() {
        let (t0, mut c) = session_at_start(None);
        c.received(t0 + s(2), Message::Keepalive);
        c.sent(t0 + s(3), Message::Data);
        c.ran(t0 + s(3), Outcome::Nothing);
        assert_eq!(c.next_due(), Some(t0 + s(17)));
    }

    #[test]
    fn rekey_deadlines_of_a_session_that_carried_data() {
        let (t0, mut c) = session_at_start(None);
        c.sent(t0 + s(1), Message::Data);
        c.received(t0 + s(1), Message::Data);
        c.sent(t0 + s(1), Message::Data);
        c.ran(t0 + s(100), Outcome::Nothing);
        assert_eq!(c.next_due(), Some(t0 + REKEY_AFTER_TIME));
        c.ran(t0 + s(121), Outcome::Nothing);
        assert_eq!(c.next_due(), Some(t0 + s(165)));
        c.ran(t0 + s(166), Outcome::Nothing);
        assert_eq!(c.next_due(), Some(t0 + s(180)));
        c.ran(t0 + s(181), Outcome::Nothing);
        assert_eq!(c.next_due(), Some(t0 + s(540)));
    }

    #[test]
    fn each_kept_session_is_dropped_on_time() {
        let (t0, mut c) = session_at_start(None);
        // Re-reading the same session's time is not a new session.
        c.established(t0 + Duration::from_millis(3));
        c.established(t0 + s(120));
        c.ran(t0 + s(130), Outcome::Nothing);
        assert_eq!(c.next_due(), Some(t0 + s(180)));
        c.ran(t0 + s(181), Outcome::Nothing);
        assert_eq!(c.next_due(), Some(t0 + s(300)));
    }

    #[test]
    fn an_expired_tunnel_sleeps_until_a_new_initiation() {
        let (t0, mut c) = session_at_start(Some(25));
        c.ran(t0 + s(540), Outcome::Expired);
        assert_eq!(c.next_due(), None);
        // New traffic starts a handshake; boringtun clears its timers, keepalive included.
        c.sent(t0 + s(600), Message::Initiation);
        c.ran(t0 + s(600), Outcome::Nothing);
        assert_eq!(c.next_due(), Some(t0 + s(605)));
        assert_eq!(c.keepalive_due, Some(t0 + s(625)));
    }

    #[test]
    fn a_cookie_is_forgotten_after_two_minutes() {
        let t0 = Instant::now();
        let mut c = PeerClock::new(t0, None);
        c.received(t0 + s(1), Message::CookieReply);
        c.ran(t0 + s(1), Outcome::Nothing);
        assert_eq!(c.next_due(), Some(t0 + s(121)));
    }

    #[test]
    fn stale_after_fresh() {
        let t0 = Instant::now();
        let mut c = PeerClock::new(t0, None);
        assert!(!c.stale(t0 + Duration::from_millis(1)));
        assert!(c.stale(t0 + FRESH));
        c.ran(t0 + s(1), Outcome::Nothing);
        assert!(!c.stale(t0 + s(1)));
    }

    /// The clock against boringtun itself, in real time: a call at `next_due` is when boringtun
    /// acts, and a call shortly before finds nothing to do (so nothing was due earlier).
    mod against_boringtun {
        use super::*;
        use boringtun::noise::{Tunn, TunnResult};
        use x25519_dalek::{PublicKey, StaticSecret};

        fn pair(keepalive: Option<u16>) -> (Tunn, Tunn) {
            let a = StaticSecret::from([1u8; 32]);
            let b = StaticSecret::from([2u8; 32]);
            let ta = Tunn::new(a.clone(), PublicKey::from(&b), None, keepalive, 1, None);
            let tb = Tunn::new(b, PublicKey::from(&a), None, None, 2, None);
            (ta, tb)
        }

        fn sleep_until(t: Instant) {
            std::thread::sleep(t.saturating_duration_since(Instant::now()));
        }

        fn kind(r: &TunnResult) -> Option<Message> {
            match r {
                TunnResult::WriteToNetwork(p) => Message::of(p),
                _ => None,
            }
        }

        #[test]
        fn an_unanswered_initiation_is_retried_at_next_due() {
            let (mut a, _) = pair(None);
            let mut c = PeerClock::new(Instant::now(), None);
            let mut buf = [0u8; 256];
            let now = Instant::now();
            assert_eq!(kind(&a.update_timers(&mut buf)), None);
            c.ran(now, Outcome::Nothing);
            let r = a.format_handshake_initiation(&mut buf, false);
            assert_eq!(kind(&r), Some(Message::Initiation));
            // Stamped after the call, as the node does: never earlier than boringtun's stamp.
            let sent = Instant::now();
            c.sent(sent, Message::Initiation); // and dropped on the way
            let due = c.next_due().unwrap();
            assert_eq!(due, sent + REKEY_TIMEOUT);
            sleep_until(due - Duration::from_millis(400));
            assert_eq!(kind(&a.update_timers(&mut buf)), None, "nothing due yet");
            c.ran(Instant::now(), Outcome::Nothing);
            assert_eq!(c.next_due(), Some(due));
            sleep_until(due + Duration::from_millis(20));
            assert_eq!(kind(&a.update_timers(&mut buf)), Some(Message::Initiation));
        }

        #[test]
        fn the_persistent_keepalive_fires_at_next_due() {
            let (mut a, mut b) = pair(Some(1));
            let t0 = Instant::now();
            let mut c = PeerClock::new(t0, Some(1));
            let (mut buf, mut out) = ([0u8; 256], [0u8; 256]);
            a.update_timers(&mut buf);
            c.ran(t0, Outcome::Nothing);
            // Handshake: A → B → A.
            let TunnResult::WriteToNetwork(init) = a.format_handshake_initiation(&mut buf, false)
            else {
                panic!("no initiation")
            };
            c.sent(Instant::now(), Message::Initiation);
            let TunnResult::WriteToNetwork(resp) = b.decapsulate(None, init, &mut out) else {
                panic!("no response")
            };
            let resp = resp.to_vec();
            let r = a.decapsulate(None, &resp, &mut buf);
            let now = Instant::now(); // after the call, as the node stamps
            c.received(now, Message::Response);
            c.established(now - a.time_since_last_handshake().unwrap());
            if let Some(m) = kind(&r) {
                c.sent(now, m);
            }
            a.update_timers(&mut buf);
            c.ran(now, Outcome::Nothing);
            let due = c.next_due().unwrap();
            assert!(due <= t0 + Duration::from_secs(1), "{:?}", due - t0);
            sleep_until(due - Duration::from_millis(300));
            assert_eq!(kind(&a.update_timers(&mut buf)), None, "nothing due yet");
            c.ran(Instant::now(), Outcome::Nothing);
            sleep_until(due + Duration::from_millis(20));
            let r = a.update_timers(&mut buf);
            assert_eq!(kind(&r), Some(Message::Keepalive));
            c.ran(Instant::now(), Outcome::Sent(Message::Keepalive));
            let next = c.next_due().unwrap();
            assert!(next >= due + Duration::from_millis(900), "{:?}", next - due);
        }
    }
}
