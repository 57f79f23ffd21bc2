//! One WireGuard node: a TUN interface, a UDP socket and any number of peers, each a boringtun
//! `noise::Tunn`, driven by three tasks on the caller's tokio runtime (TUN → UDP, UDP → TUN,
//! timers). The device runs a node with one peer (the hub); the bridge's hub runs one with a
//! peer per enrolled device.
//!
//! The timer task sleeps until the earliest moment any peer's timers can act
//! ([`crate::timers::PeerClock`]), kept in a heap of (due, peer); an idle tunnel wakes only for
//! its keepalives and session deadlines, not every 250 ms. The packet tasks run a peer's timers
//! around each packet (see `timers`), so a threshold an event crosses acts at once.
//!
//! Locks are std mutexes held only around `Tunn` calls, never across an await: the packet is
//! produced into the task's own buffer, the lock dropped, then the I/O awaited.

use crate::TunnelError;
use crate::timers::{Message, Outcome, PeerClock};
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use ipnet::Ipv4Net;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use x25519_dalek::{PublicKey, StaticSecret};

/// Largest datagram/packet handled (UDP payload limit).
const BUF: usize = 65_535;
/// Handshakes per second before the node answers with cookies (WireGuard's DoS mitigation).
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// The handshake rate limiter counts per this window (boringtun's own device resets it every
/// second); reset when a datagram arrives, so an idle node does not wake for it.
const RATE_WINDOW: Duration = Duration::from_secs(1);
/// Large enough for anything `update_timers` or a forced handshake produce (an initiation is
/// 148 bytes, a keepalive 32).
const TIMER_PACKET: usize = 256;

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub private_key: [u8; 32],
    /// TUN interface name (≤ 15 bytes).
    pub interface: String,
    /// The interface's address; its prefix is the on-link tunnel network (device: the pool
    /// it may reach, e.g. 10.8.0.2/24; hub: 10.8.0.1/24).
    pub address: Ipv4Net,
    pub mtu: u16,
    /// UDP port; 0 picks a free one (devices).
    pub listen_port: u16,
    /// SO_RCVBUF/SO_SNDBUF of the UDP socket: the kernel default (~208 KiB) overflows at a
    /// few hundred Mbit/s.
    pub socket_buffer: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PeerConfig {
    pub public_key: [u8; 32],
    /// Inner source addresses accepted from this peer and destinations routed to it.
    pub allowed_ips: Vec<Ipv4Net>,
    /// Where to send; learned from the peer's authenticated packets when `None` (hub).
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<u16>,
}

/// What `status` and telemetry show per peer.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStats {
    pub public_key: [u8; 32],
    pub endpoint: Option<SocketAddr>,
    /// Time since the last completed handshake.
    pub last_handshake: Option<Duration>,
    /// Time since the last authenticated packet from the peer.
    pub last_received: Option<Duration>,
    /// Inner bytes received from / sent to the peer.
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// A peer's protocol state and the mirror of its timers, under one lock.
struct Crypto {
    tunn: Tunn,
    clock: PeerClock,
    /// The due time of this peer's live entry in the node's timer heap.
    scheduled: Option<Instant>,
}

/// A datagram the timers produced (a retried or new initiation, or a keepalive).
struct TimerPacket {
    buf: [u8; TIMER_PACKET],
    len: usize,
}

impl Crypto {
    /// Run boringtun's timers; what they produced, to be sent. The clock reads the time
    /// after the call: the mirror's stamps must never be earlier than boringtun's, or a
    /// wake-up at the mirror's deadline finds boringtun not due yet and the deadline is lost.
    fn run_timers(&mut self) -> Option<TimerPacket> {
        let mut buf = [0u8; TIMER_PACKET];
        let (outcome, len) = match self.tunn.update_timers(&mut buf) {
            TunnResult::WriteToNetwork(p) => (
                Outcome::Sent(Message::of(p).unwrap_or(Message::Keepalive)),
                p.len(),
            ),
            TunnResult::Err(WireGuardError::ConnectionExpired) => (Outcome::Expired, 0),
            _ => (Outcome::Nothing, 0),
        };
        let now = Instant::now();
        self.clock.ran(now, outcome);
        if let Outcome::Sent(m) = outcome {
            self.clock.sent(now, m);
            return Some(TimerPacket { buf, len });
        }
        None
    }

    /// Before an event: boringtun stamps events with its last timer run, so refresh it.
    fn refresh(&mut self, now: Instant) -> Option<TimerPacket> {
        if self.clock.stale(now) {
            self.run_timers()
        } else {
            None
        }
    }

    fn sent(&mut self, now: Instant, datagram: &[u8]) {
        if let Some(m) = Message::of(datagram) {
            self.clock.sent(now, m);
        }
    }

    fn received(&mut self, now: Instant, datagram: &[u8]) {
        let Some(m) = Message::of(datagram) else {
            return;
        };
        self.clock.received(now, m);
        // Also after data: a responder's new session becomes boringtun's current one only
        // with the first data packet on it.
        if let Some(age) = self.tunn.time_since_last_handshake() {
            self.clock.established(now.checked_sub(age).unwrap_or(now));
        }
    }
}

struct Peer {
    config: PeerConfig,
    index: u32,
    crypto: Mutex<Crypto>,
    endpoint: Mutex<Option<SocketAddr>>,
    last_rx: Mutex<Option<Instant>>,
    rx_bytes: AtomicU64,
    tx_bytes: AtomicU64,
}

impl Peer {
    fn crypto(&self) -> std::sync::MutexGuard<'_, Crypto> {
        self.crypto.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn endpoint(&self) -> Option<SocketAddr> {
        *self.endpoint.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn allows(&self, src: Ipv4Addr) -> bool {
        self.config.allowed_ips.iter().any(|n| n.contains(&src))
    }
}

#[derive(Default)]
struct PeerTable {
    by_key: HashMap<[u8; 32], Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
    /// Host routes (/32, one per device on the hub): the common case, one lookup.
    hosts: HashMap<Ipv4Addr, Arc<Peer>>,
    /// Everything wider, longest prefix first.
    nets: Vec<(Ipv4Net, Arc<Peer>)>,
}

impl PeerTable {
    fn route(&self, dst: Ipv4Addr) -> Option<&Arc<Peer>> {
        self.hosts.get(&dst).or_else(|| {
            self.nets
                .iter()
                .find(|(n, _)| n.contains(&dst))
                .map(|(_, p)| p)
        })
    }

    fn insert(&mut self, peer: Arc<Peer>) {
        for net in &peer.config.allowed_ips {
            if net.prefix_len() == 32 {
                self.hosts.insert(net.addr(), peer.clone());
            } else {
                self.nets.push((*net, peer.clone()));
            }
        }
        self.nets
            .sort_by_key(|(n, _)| std::cmp::Reverse(n.prefix_len()));
        self.by_index.insert(peer.index, peer.clone());
        self.by_key.insert(peer.config.public_key, peer);
    }

    fn remove(&mut self, key: &[u8; 32]) -> Option<Arc<Peer>> {
        let peer = self.by_key.remove(key)?;
        self.by_index.remove(&peer.index);
        self.hosts.retain(|_, p| !Arc::ptr_eq(p, &peer));
        self.nets.retain(|(_, p)| !Arc::ptr_eq(p, &peer));
        Some(peer)
    }
}

pub struct Node {
    secret: StaticSecret,
    public: PublicKey,
    peers: RwLock<PeerTable>,
    next_index: AtomicU32,
    rate_limiter: Arc<RateLimiter>,
    rate_window_start: Mutex<Instant>,
    /// (due, peer index): when each peer's timers next need a run. Entries go stale when a
    /// peer is rescheduled or removed; a popped entry counts only if it is the peer's
    /// `scheduled`.
    schedule: Mutex<BinaryHeap<Reverse<(Instant, u32)>>>,
    /// A peer's due time moved before the heap's earliest: the timer task sleeps too long.
    schedule_changed: Notify,
    udp: UdpSocket,
    tun: tun_rs::AsyncDevice,
    interface: String,
}

impl Node {
    /// Create the TUN interface (address, MTU, up) and bind the UDP socket. Needs
    /// CAP_NET_ADMIN and /dev/net/tun; both are named in the error when missing.
    pub fn open(cfg: &NodeConfig) -> Result<Self, TunnelError> {
        let tun = crate::tun::open(&cfg.interface, cfg.address, cfg.mtu)?;
        let udp = bind_udp(cfg.listen_port, cfg.socket_buffer)?;
        let secret = StaticSecret::from(cfg.private_key);
        let public = PublicKey::from(&secret);
        Ok(Self {
            rate_limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            rate_window_start: Mutex::new(Instant::now()),
            schedule: Mutex::new(BinaryHeap::new()),
            schedule_changed: Notify::new(),
            secret,
            public,
            peers: RwLock::new(PeerTable::default()),
            next_index: AtomicU32::new(1),
            udp,
            tun,
            interface: cfg.interface.clone(),
        })
    }

    pub fn public_key(&self) -> [u8; 32] {
        *self.public.as_bytes()
    }

    pub fn interface(&self) -> &str {
        &self.interface
    }

    pub fn local_port(&self) -> u16 {
        self.udp.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Add a peer, or replace the one with the same key (its session starts over).
    pub fn add_peer(&self, config: PeerConfig) {
        let index = self.next_index.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
        let tunn = Tunn::new(
            self.secret.clone(),
            PublicKey::from(config.public_key),
            None,
            config.persistent_keepalive.filter(|k| *k > 0),
            index,
            Some(self.rate_limiter.clone()),
        );
        let clock = PeerClock::new(Instant::now(), config.persistent_keepalive);
        let peer = Arc::new(Peer {
            endpoint: Mutex::new(config.endpoint),
            config,
            index,
            crypto: Mutex::new(Crypto {
                tunn,
                clock,
                scheduled: None,
            }),
            last_rx: Mutex::new(None),
            rx_bytes: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
        });
        self.reschedule(peer.index, &mut peer.crypto());
        let mut t = self.peers.write().unwrap_or_else(|e| e.into_inner());
        t.remove(&peer.config.public_key);
        t.insert(peer);
    }

    /// Put the peer's next due time in the heap if it is earlier than its live entry, and wake
    /// the timer task if it is the earliest of all. Later times need no entry: the live one
    /// fires early and reschedules.
    fn reschedule(&self, index: u32, c: &mut Crypto) {
        let Some(due) = c.clock.next_due() else {
            return;
        };
        if c.scheduled.is_some_and(|s| s <= due) {
            return;
        }
        c.scheduled = Some(due);
        let mut heap = self.schedule.lock().unwrap_or_else(|e| e.into_inner());
        let earliest = heap.peek().is_none_or(|Reverse((t, _))| due < *t);
        heap.push(Reverse((due, index)));
        drop(heap);
        if earliest {
            self.schedule_changed.notify_one();
        }
    }

    /// After an event: run the timers (a threshold the event crossed acts now) and reschedule.
    fn after_event(&self, index: u32, c: &mut Crypto) -> Option<TimerPacket> {
        let out = c.run_timers();
        self.reschedule(index, c);
        out
    }

    pub fn remove_peer(&self, key: &[u8; 32]) -> bool {
        self.peers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key)
            .is_some()
    }

    /// The configured peers (as added; endpoints as configured, not as learned).
    pub fn peers(&self) -> Vec<PeerConfig> {
        self.peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_key
            .values()
            .map(|p| p.config.clone())
            .collect()
    }

    pub fn peer_count(&self) -> usize {
        self.peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_key
            .len()
    }

    /// Point a peer at a new endpoint (the device after re-resolving the hub's name).
    pub fn set_endpoint(&self, key: &[u8; 32], endpoint: SocketAddr) {
        if let Some(p) = self.peer(key) {
            *p.endpoint.lock().unwrap_or_else(|e| e.into_inner()) = Some(endpoint);
        }
    }

    pub fn stats(&self) -> Vec<PeerStats> {
        let t = self.peers.read().unwrap_or_else(|e| e.into_inner());
        t.by_key
            .values()
            .map(|p| {
                let (last_handshake, ..) = p.crypto().tunn.stats();
                PeerStats {
                    public_key: p.config.public_key,
                    endpoint: p.endpoint(),
                    last_handshake,
                    last_received: p
                        .last_rx
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .map(|t| t.elapsed()),
                    rx_bytes: p.rx_bytes.load(Ordering::Relaxed),
                    tx_bytes: p.tx_bytes.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// Start a new handshake now instead of waiting for the protocol's timers (the hub was
    /// restarted and lost our session; the endpoint changed).
    pub async fn force_handshake(&self, key: &[u8; 32]) {
        let Some(peer) = self.peer(key) else { return };
        let mut out = [0u8; TIMER_PACKET];
        let (before, len) = {
            let mut c = peer.crypto();
            let now = Instant::now();
            let before = c.refresh(now);
            let len = match c.tunn.format_handshake_initiation(&mut out, true) {
                TunnResult::WriteToNetwork(p) => p.len(),
                _ => 0,
            };
            c.sent(Instant::now(), &out[..len]);
            self.reschedule(peer.index, &mut c);
            (before, len)
        };
        if let Some(ep) = peer.endpoint() {
            self.send_timer_packet(before, ep).await;
            if len > 0 {
                self.send(&out[..len], ep).await;
            }
        }
    }

    async fn send_timer_packet(&self, packet: Option<TimerPacket>, to: SocketAddr) {
        if let Some(p) = packet {
            self.send(&p.buf[..p.len], to).await;
        }
    }

    fn peer(&self, key: &[u8; 32]) -> Option<Arc<Peer>> {
        self.peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_key
            .get(key)
            .cloned()
    }

    /// Run until `shutdown`. The TUN interface goes away when the node is dropped.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = self.tun_to_udp() => {}
            _ = self.udp_to_tun() => {}
            _ = self.timers() => {}
        }
    }

    async fn send(&self, datagram: &[u8], to: SocketAddr) {
        if let Err(e) = self.udp.send_to(datagram, to).await {
            // ECONNREFUSED/EHOSTUNREACH after an ICMP error, ENETUNREACH while the uplink
            // is down: transient, the timers retry.
            tracing::debug!(%to, error = %e, "tunnel send failed");
        }
    }

    async fn tun_to_udp(&self) {
        let mut packet = vec![0u8; BUF];
        let mut out = vec![0u8; BUF + 32];
        loop {
            let n = match self.tun.recv(&mut packet).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(interface = %self.interface, error = %e, "TUN read failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(IpAddr::V4(dst)) = Tunn::dst_address(&packet[..n]) else {
                continue; // IPv6 is not routed through the tunnel
            };
            let Some(peer) = self
                .peers
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .route(dst)
                .cloned()
            else {
                continue;
            };
            let (before, len, after) = {
                let mut c = peer.crypto();
                let now = Instant::now();
                let before = c.refresh(now);
                let len = match c.tunn.encapsulate(&packet[..n], &mut out) {
                    TunnResult::WriteToNetwork(p) => p.len(),
                    TunnResult::Err(e) => {
                        tracing::debug!(error = ?e, "encapsulate failed");
                        0
                    }
                    _ => 0, // queued until the handshake completes
                };
                c.sent(Instant::now(), &out[..len]);
                let after = self.after_event(peer.index, &mut c);
                (before, len, after)
            };
            let Some(ep) = peer.endpoint() else { continue };
            self.send_timer_packet(before, ep).await;
            if len > 0 {
                // An initiation started for this packet carries none of its bytes yet.
                if Message::of(&out[..len]) == Some(Message::Data) {
                    peer.tx_bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
                self.send(&out[..len], ep).await;
            }
            self.send_timer_packet(after, ep).await;
        }
    }

    async fn udp_to_tun(&self) {
        let mut datagram = vec![0u8; BUF];
        let mut out = vec![0u8; BUF];
        loop {
            let (n, from) = match self.udp.recv_from(&mut datagram).await {
                Ok(x) => x,
                Err(e) => {
                    // ICMP errors surface here on some kernels; nothing to do but go on.
                    tracing::debug!(error = %e, "tunnel receive failed");
                    continue;
                }
            };
            self.rate_window();
            let peer =
                match self
                    .rate_limiter
                    .verify_packet(Some(from.ip()), &datagram[..n], &mut out)
                {
                    Ok(packet) => self.peer_for(&packet),
                    Err(TunnResult::WriteToNetwork(cookie)) => {
                        let len = cookie.len();
                        self.send(&out[..len], from).await;
                        continue;
                    }
                    Err(_) => continue,
                };
            let Some(peer) = peer else { continue };
            let before = peer.crypto().refresh(Instant::now());
            if let Some(to) = peer.endpoint() {
                self.send_timer_packet(before, to).await;
            }
            let mut first = true;
            loop {
                enum Next {
                    Network(usize),
                    Tunnel(usize, Ipv4Addr),
                    Done,
                    Failed,
                }
                let now = Instant::now();
                let (next, after) = {
                    let mut c = peer.crypto();
                    let r = if first {
                        c.tunn
                            .decapsulate(Some(from.ip()), &datagram[..n], &mut out)
                    } else {
                        // Flush what was queued while the handshake was under way.
                        c.tunn.decapsulate(None, &[], &mut out)
                    };
                    let next = match r {
                        TunnResult::WriteToNetwork(p) => Next::Network(p.len()),
                        TunnResult::WriteToTunnelV4(p, src) => Next::Tunnel(p.len(), src),
                        TunnResult::Done => Next::Done,
                        TunnResult::Err(e) => {
                            tracing::debug!(%from, error = ?e, "decapsulate failed");
                            Next::Failed
                        }
                        TunnResult::WriteToTunnelV6(..) => Next::Done,
                    };
                    // Stamped after boringtun's call (see run_timers).
                    let stamp = Instant::now();
                    if first && !matches!(next, Next::Failed) {
                        c.received(stamp, &datagram[..n]);
                    }
                    if let Next::Network(len) = next {
                        c.sent(stamp, &out[..len]);
                    }
                    // Not for what failed to authenticate: a forged datagram costs no timer run.
                    let authentic = first && !matches!(next, Next::Failed);
                    let after = if authentic || matches!(next, Next::Network(_)) {
                        self.after_event(peer.index, &mut c)
                    } else {
                        None
                    };
                    (next, after)
                };
                if first && !matches!(next, Next::Failed) {
                    // Authenticated: this is where the peer is now (roaming).
                    *peer.endpoint.lock().unwrap_or_else(|e| e.into_inner()) = Some(from);
                    *peer.last_rx.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
                }
                first = false;
                self.send_timer_packet(after, peer.endpoint().unwrap_or(from))
                    .await;
                match next {
                    Next::Network(len) => {
                        let to = peer.endpoint().unwrap_or(from);
                        self.send(&out[..len], to).await;
                    }
                    Next::Tunnel(len, src) => {
                        // Cryptokey routing: a peer may only speak for its allowed IPs.
                        if peer.allows(src) {
                            peer.rx_bytes.fetch_add(len as u64, Ordering::Relaxed);
                            if let Err(e) = self.tun.send(&out[..len]).await {
                                tracing::debug!(error = %e, "TUN write failed");
                            }
                        } else {
                            tracing::debug!(%src, "dropped: source not in the peer's allowed IPs");
                        }
                        break;
                    }
                    Next::Done | Next::Failed => break,
                }
            }
        }
    }

    fn peer_for(&self, packet: &Packet) -> Option<Arc<Peer>> {
        let t = self.peers.read().unwrap_or_else(|e| e.into_inner());
        match packet {
            Packet::HandshakeInit(h) => {
                let half = parse_handshake_anon(&self.secret, &self.public, h).ok()?;
                t.by_key.get(&half.peer_static_public).cloned()
            }
            Packet::HandshakeResponse(h) => t.by_index.get(&(h.receiver_idx >> 8)).cloned(),
            Packet::PacketCookieReply(c) => t.by_index.get(&(c.receiver_idx >> 8)).cloned(),
            Packet::PacketData(d) => t.by_index.get(&(d.receiver_idx >> 8)).cloned(),
        }
    }

    /// Restart the handshake limiter's window once it is over (on arrival, not on a tick).
    fn rate_window(&self) {
        let mut start = self
            .rate_window_start
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if start.elapsed() >= RATE_WINDOW {
            self.rate_limiter.reset_count();
            *start = Instant::now();
        }
    }

    /// Sleep until the earliest due peer, run its timers, send what they produce.
    async fn timers(&self) {
        loop {
            let next = self
                .schedule
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .peek()
                .map(|Reverse((t, _))| *t);
            match next {
                None => self.schedule_changed.notified().await,
                Some(t) if t > Instant::now() => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(tokio::time::Instant::from_std(t)) => {}
                        _ = self.schedule_changed.notified() => continue,
                    }
                }
                Some(_) => {}
            }
            let now = Instant::now();
            loop {
                let entry = {
                    let mut heap = self.schedule.lock().unwrap_or_else(|e| e.into_inner());
                    match heap.peek() {
                        Some(Reverse((t, _))) if *t <= now => heap.pop(),
                        _ => None,
                    }
                };
                let Some(Reverse((due, index))) = entry else {
                    break;
                };
                let Some(peer) = self
                    .peers
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .by_index
                    .get(&index)
                    .cloned()
                else {
                    continue; // removed
                };
                let packet = {
                    let mut c = peer.crypto();
                    if c.scheduled != Some(due) {
                        continue; // superseded by an earlier entry, which already ran
                    }
                    c.scheduled = None;
                    let packet = c.run_timers();
                    self.reschedule(index, &mut c);
                    packet
                };
                if let Some(ep) = peer.endpoint() {
                    self.send_timer_packet(packet, ep).await;
                }
            }
        }
    }
}

fn bind_udp(port: u16, buffer: usize) -> Result<UdpSocket, TunnelError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let io = |what: &str, e: std::io::Error| TunnelError::Io(format!("{what}: {e}"));
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
        .map_err(|e| io("UDP socket", e))?;
    // Best effort: the kernel caps these at net.core.{r,w}mem_max without CAP_NET_ADMIN.
    let _ = s.set_recv_buffer_size(buffer);
    let _ = s.set_send_buffer_size(buffer);
    s.set_nonblocking(true).map_err(|e| io("UDP socket", e))?;
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    s.bind(&addr.into())
        .map_err(|e| io(&format!("binding UDP {addr}"), e))?;
    UdpSocket::from_std(s.into()).map_err(|e| io("UDP socket", e))
}
