//! The device's tunnel: one peer (the bridge's hub) from the configuration stored at
//! enrollment. Besides the protocol's own timers it
//! - re-resolves the hub's host name every `resolve_interval` (DNS changes, failover), and
//! - detects a dead hub: the hub sends keepalives too, so nothing authenticated for
//!   `2 × keepalive + 10 s` means it lost our session (restart) or moved; the device then
//!   re-resolves and starts a new handshake at once instead of waiting up to two minutes for
//!   the protocol's rekey.

use crate::{Node, NodeConfig, PeerConfig, PeerStats, TunnelError, keys};
use ipnet::Ipv4Net;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct DeviceTunnelConfig {
    pub interface: String,
    pub mtu: u16,
    pub socket_buffer: usize,
    pub private_key: [u8; 32],
    /// The device's address with the prefix of the tunnel network it reaches (10.8.0.2/24).
    pub address: Ipv4Net,
    pub hub_public_key: [u8; 32],
    /// `host:port`.
    pub endpoint: String,
    pub allowed_ips: Vec<Ipv4Net>,
    pub persistent_keepalive: Option<u16>,
    pub resolve_interval: Duration,
}

impl DeviceTunnelConfig {
    /// From the enrolled configuration (`tunnel/wireguard.json`): its `address` is a /32, the
    /// interface gets the prefix of the allowed network that contains it, so the kernel
    /// routes that network into the tunnel.
    pub fn from_enrolled(
        address: &str,
        private_key: &str,
        peer_public_key: &str,
        endpoint: &str,
        allowed_ips: &[String],
        persistent_keepalive: Option<u16>,
    ) -> Result<Self, TunnelError> {
        let host: Ipv4Net = address
            .parse()
            .map_err(|e| TunnelError::Config(format!("address {address:?}: {e}")))?;
        let allowed = allowed_ips
            .iter()
            .map(|a| {
                a.parse::<Ipv4Net>()
                    .map(|n| n.trunc())
                    .map_err(|e| TunnelError::Config(format!("allowed_ips {a:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let prefix = allowed
            .iter()
            .filter(|n| n.contains(&host.addr()))
            .map(|n| n.prefix_len())
            .min()
            .unwrap_or(32);
        let address = Ipv4Net::new(host.addr(), prefix)
            .map_err(|e| TunnelError::Config(format!("address {address:?}: {e}")))?;
        for n in &allowed {
            if !n.contains(&host.addr()) {
                tracing::warn!(network = %n, "allowed network does not contain the tunnel address; not routed");
            }
        }
        Ok(Self {
            interface: "thingsly0".into(),
            mtu: 1420,
            socket_buffer: 4 << 20,
            private_key: keys::parse("private_key", private_key)?,
            address,
            hub_public_key: keys::parse("peer_public_key", peer_public_key)?,
            endpoint: endpoint.to_string(),
            allowed_ips: allowed,
            persistent_keepalive: persistent_keepalive.filter(|k| *k > 0),
            resolve_interval: Duration::from_secs(60),
        })
    }

    fn dead_after(&self) -> Option<Duration> {
        self.persistent_keepalive
            .map(|k| Duration::from_secs(2 * u64::from(k) + 10))
    }
}

/// Tunnel state for `status` and telemetry.
#[derive(Debug, Clone, PartialEq)]
pub struct TunnelStatus {
    pub interface: String,
    pub address: Ipv4Net,
    pub endpoint: Option<SocketAddr>,
    pub last_handshake: Option<Duration>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// The hub answers (see [`DeviceTunnel::hub_alive`]).
    pub up: bool,
}

/// WireGuard's Reject-After-Time: a session older than this carries no data.
const REJECT_AFTER: Duration = Duration::from_secs(180);

pub struct DeviceTunnel {
    node: Arc<Node>,
    cfg: DeviceTunnelConfig,
}

impl DeviceTunnel {
    /// Create the interface and the hub peer. An endpoint that does not resolve yet is not an
    /// error (no network at boot): it is retried every few seconds by [`run`](Self::run).
    pub async fn open(cfg: DeviceTunnelConfig) -> Result<Self, TunnelError> {
        let node = Node::open(&NodeConfig {
            private_key: cfg.private_key,
            interface: cfg.interface.clone(),
            address: cfg.address,
            mtu: cfg.mtu,
            listen_port: 0,
            socket_buffer: cfg.socket_buffer,
        })?;
        let endpoint = resolve(&cfg.endpoint).await;
        node.add_peer(PeerConfig {
            public_key: cfg.hub_public_key,
            allowed_ips: cfg.allowed_ips.clone(),
            endpoint,
            persistent_keepalive: cfg.persistent_keepalive,
        });
        tracing::info!(interface = %cfg.interface, address = %cfg.address, endpoint = %cfg.endpoint,
            resolved = ?endpoint, "tunnel interface up");
        Ok(Self {
            node: Arc::new(node),
            cfg,
        })
    }

    /// The one definition of "up": heard from the hub within `2 × keepalive + 10 s` (the hub
    /// sends keepalives too), or, without keepalives, a session younger than Reject-After-Time.
    fn hub_alive(&self, s: Option<&PeerStats>) -> bool {
        let Some(s) = s else { return false };
        match self.cfg.dead_after() {
            Some(limit) => s.last_received.is_some_and(|quiet| quiet <= limit),
            None => s.last_handshake.is_some_and(|h| h < REJECT_AFTER),
        }
    }

    pub fn status(&self) -> TunnelStatus {
        let s = self.node.stats().into_iter().next();
        TunnelStatus {
            up: self.hub_alive(s.as_ref()),
            interface: self.cfg.interface.clone(),
            address: self.cfg.address,
            endpoint: s.as_ref().and_then(|s| s.endpoint),
            last_handshake: s.as_ref().and_then(|s| s.last_handshake),
            rx_bytes: s.as_ref().map_or(0, |s| s.rx_bytes),
            tx_bytes: s.as_ref().map_or(0, |s| s.tx_bytes),
        }
    }

    /// How much longer the hub counts as alive without news ([`hub_alive`](Self::hub_alive));
    /// `None` when it is not alive now.
    fn alive_for(&self, s: Option<&PeerStats>) -> Option<Duration> {
        let s = s?;
        match self.cfg.dead_after() {
            Some(limit) => s.last_received.and_then(|quiet| limit.checked_sub(quiet)),
            None => s
                .last_handshake
                .and_then(|h| REJECT_AFTER.checked_sub(h))
                .filter(|d| !d.is_zero()),
        }
    }

    /// Until `shutdown`; the interface disappears when this returns and `self` is dropped.
    /// Wakes only when something can have changed: the next re-resolve, the moment the hub
    /// would count as gone, or every [`RETRY_DOWN`] while it does not answer.
    pub async fn run(&self, shutdown: CancellationToken) {
        let engine = tokio::spawn(self.node.clone().run(shutdown.clone()));
        let hub = self.cfg.hub_public_key;
        self.node.force_handshake(&hub).await;
        let mut last_resolve = Instant::now();
        let mut last_forced = Instant::now();
        let mut was_up = false;
        loop {
            let stats = self.node.stats().into_iter().next();
            let endpoint = stats.as_ref().and_then(|s| s.endpoint);
            let silent = stats.as_ref().and_then(|s| s.last_received);
            let up = self.hub_alive(stats.as_ref());
            // Only with keepalives does silence mean the hub lost us.
            let dead = !up && self.cfg.dead_after().is_some();
            if up != was_up {
                if up {
                    tracing::info!(endpoint = ?endpoint, "tunnel up (handshake with the hub)");
                } else {
                    tracing::warn!(endpoint = ?endpoint, quiet = ?silent, "tunnel down: nothing from the hub; re-handshaking");
                }
                was_up = up;
            }
            let retry_due = dead && last_forced.elapsed() >= RETRY_DOWN;
            if endpoint.is_none()
                || last_resolve.elapsed() >= self.cfg.resolve_interval
                || retry_due
            {
                last_resolve = Instant::now();
                if let Some(addr) = resolve(&self.cfg.endpoint).await
                    && Some(addr) != endpoint
                {
                    tracing::info!(from = ?endpoint, to = %addr, "hub endpoint changed");
                    self.node.set_endpoint(&hub, addr);
                    self.node.force_handshake(&hub).await;
                    last_forced = Instant::now();
                }
            }
            if dead && last_forced.elapsed() >= RETRY_DOWN {
                self.node.force_handshake(&hub).await;
                last_forced = Instant::now();
            }
            let until_resolve = self
                .cfg
                .resolve_interval
                .saturating_sub(last_resolve.elapsed());
            let wait = next_check(until_resolve, self.alive_for(stats.as_ref()));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        let _ = engine.await;
    }
}

/// While the hub does not answer: how often to look again and, with keepalives, re-resolve and
/// re-handshake.
const RETRY_DOWN: Duration = Duration::from_secs(5);
/// Looked at this long after the hub would count as gone, so it has.
const PAST_DEADLINE: Duration = Duration::from_millis(500);

/// How long the device loop sleeps: until the next re-resolve, and while the hub is alive until
/// it would count as gone (each keepalive from it pushes that back: the loop wakes, finds it
/// alive, sleeps again), else [`RETRY_DOWN`].
fn next_check(until_resolve: Duration, alive_for: Option<Duration>) -> Duration {
    let state_change = alive_for.map_or(RETRY_DOWN, |d| d + PAST_DEADLINE);
    until_resolve
        .min(state_change)
        .max(Duration::from_millis(100))
}

async fn resolve(endpoint: &str) -> Option<SocketAddr> {
    match tokio::net::lookup_host(endpoint).await {
        Ok(mut addrs) => addrs.find(SocketAddr::is_ipv4),
        Err(e) => {
            tracing::debug!(%endpoint, error = %e, "hub endpoint does not resolve (yet)");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_loop_sleeps_until_something_can_change() {
        let s = Duration::from_secs;
        // Hub alive for 40 s more, re-resolve in 60 s: look again just after 40 s.
        assert_eq!(next_check(s(60), Some(s(40))), s(40) + PAST_DEADLINE);
        // Re-resolve sooner than that.
        assert_eq!(next_check(s(3), Some(s(40))), s(3));
        // Hub gone: every RETRY_DOWN.
        assert_eq!(next_check(s(60), None), RETRY_DOWN);
        // Never a busy loop.
        assert_eq!(next_check(Duration::ZERO, None), Duration::from_millis(100));
    }

    #[test]
    fn enrolled_config_gets_the_prefix_of_its_network() {
        let k = keys::encode(&[7u8; 32]);
        let c = DeviceTunnelConfig::from_enrolled(
            "10.8.0.7/32",
            &k,
            &k,
            "hub.example:51820",
            &["10.8.0.0/24".into()],
            Some(25),
        )
        .unwrap();
        assert_eq!(c.address.to_string(), "10.8.0.7/24");
        assert_eq!(c.dead_after(), Some(Duration::from_secs(60)));
        let err = DeviceTunnelConfig::from_enrolled("x", &k, &k, "h:1", &[], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("address"), "{err}");
        let err = DeviceTunnelConfig::from_enrolled("10.8.0.7/32", "short", &k, "h:1", &[], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("private_key"), "{err}");
    }
}
