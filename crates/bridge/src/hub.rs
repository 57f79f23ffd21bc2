//! The WireGuard hub: one peer per enrolled device (its public key, its /32), kept equal to
//! the registry. Userspace (boringtun over a TUN interface, no kernel module) by default; or an
//! existing WireGuard interface (kernel, or wireguard-go) configured through its standard
//! interface, `wg(8)`, when `wireguard.mode = "wg"`.
//!
//! The registry is the truth: the hub is reconciled from it at start, after every enrollment
//! and revocation through the API, and every `RECONCILE_EVERY` (so `revoke` from the CLI of
//! another process takes effect within seconds).

use crate::config::{HubMode, WireguardSection};
use crate::state::AppState;
use crate::store::Store;
use anyhow::Context;
use ipnet::Ipv4Net;
use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use thingsly_tunnel::{Node, NodeConfig, PeerConfig, keys};
use tokio_util::sync::CancellationToken;

pub const RECONCILE_EVERY: Duration = Duration::from_secs(5);

/// Device key → its tunnel address.
type Wanted = BTreeMap<[u8; 32], Ipv4Net>;

pub enum Hub {
    Userspace {
        node: Arc<Node>,
        keepalive: Option<u16>,
    },
    Wg {
        interface: String,
        keepalive: u16,
    },
}

impl Hub {
    /// Bring the hub up: the interface gets the pool's first host (10.8.0.1/24).
    pub fn start(
        wg: &WireguardSection,
        private_key: [u8; 32],
        key_file: &std::path::Path,
    ) -> anyhow::Result<Option<Self>> {
        let pool: Ipv4Net = wg.pool.parse()?;
        let own = pool
            .hosts()
            .next()
            .context("wireguard.pool has no host address")?;
        let keepalive = wg.persistent_keepalive;
        match wg.mode {
            HubMode::Off => Ok(None),
            HubMode::Userspace => {
                let node = Node::open(&NodeConfig {
                    private_key,
                    interface: wg.interface.clone(),
                    address: Ipv4Net::new(own, pool.prefix_len())?,
                    mtu: wg.mtu,
                    listen_port: wg.listen_port,
                    socket_buffer: 4 << 20,
                })
                .map_err(|e| anyhow::anyhow!("wireguard hub: {e}"))?;
                tracing::info!(interface = %wg.interface, address = %own, port = wg.listen_port,
                    "WireGuard hub up (userspace)");
                Ok(Some(Hub::Userspace {
                    node: Arc::new(node),
                    keepalive: (keepalive > 0).then_some(keepalive),
                }))
            }
            HubMode::Wg => {
                wg_cmd(&[
                    "set",
                    &wg.interface,
                    "private-key",
                    &key_file.to_string_lossy(),
                    "listen-port",
                    &wg.listen_port.to_string(),
                ])?;
                tracing::info!(interface = %wg.interface, port = wg.listen_port,
                    "WireGuard hub: configuring the existing interface with wg(8)");
                Ok(Some(Hub::Wg {
                    interface: wg.interface.clone(),
                    keepalive,
                }))
            }
        }
    }

    /// Run the userspace engine and the periodic reconciliation until `shutdown`.
    pub async fn run(self: Arc<Self>, app: Arc<AppState>, shutdown: CancellationToken) {
        let engine = match &*self {
            Hub::Userspace { node, .. } => Some(tokio::spawn(node.clone().run(shutdown.clone()))),
            Hub::Wg { .. } => None,
        };
        loop {
            if let Err(e) = self.reconcile(&app.store) {
                tracing::error!(error = %format!("{e:#}"), "WireGuard hub reconcile failed");
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(RECONCILE_EVERY) => {}
            }
        }
        if let Some(e) = engine {
            let _ = e.await;
        }
    }

    /// Make the hub's peers equal to the registry's devices.
    pub fn reconcile(&self, store: &Store) -> anyhow::Result<()> {
        let mut wanted = Wanted::new();
        for d in store.list()? {
            let Some(k) = d.wireguard_public_key.as_deref() else {
                continue;
            };
            let Ok(key) = keys::parse("wireguard_public_key", k) else {
                tracing::warn!(device = %d.device_id, "stored WireGuard key unusable; no peer");
                continue;
            };
            let Ok(addr) = d.wireguard_address.parse::<Ipv4Net>() else {
                continue;
            };
            wanted.insert(key, addr);
        }
        match self {
            Hub::Userspace { node, keepalive } => {
                let have: BTreeMap<[u8; 32], Vec<Ipv4Net>> = node
                    .peers()
                    .into_iter()
                    .map(|p| (p.public_key, p.allowed_ips))
                    .collect();
                for (key, addr) in &wanted {
                    if have.get(key).is_none_or(|ips| ips != &vec![*addr]) {
                        node.add_peer(PeerConfig {
                            public_key: *key,
                            allowed_ips: vec![*addr],
                            endpoint: None,
                            persistent_keepalive: *keepalive,
                        });
                        tracing::info!(key = %keys::encode(key), address = %addr, "hub peer added");
                    }
                }
                for key in have.keys().filter(|k| !wanted.contains_key(*k)) {
                    node.remove_peer(key);
                    tracing::info!(key = %keys::encode(key), "hub peer removed");
                }
            }
            Hub::Wg {
                interface,
                keepalive,
            } => {
                let have = wg_peers(interface)?;
                for (key, addr) in &wanted {
                    if have.get(key) != Some(addr) {
                        wg_cmd(&[
                            "set",
                            interface,
                            "peer",
                            &keys::encode(key),
                            "allowed-ips",
                            &addr.to_string(),
                            "persistent-keepalive",
                            &keepalive.to_string(),
                        ])?;
                        tracing::info!(key = %keys::encode(key), address = %addr, "hub peer added (wg)");
                    }
                }
                for key in have.keys().filter(|k| !wanted.contains_key(*k)) {
                    wg_cmd(&["set", interface, "peer", &keys::encode(key), "remove"])?;
                    tracing::info!(key = %keys::encode(key), "hub peer removed (wg)");
                }
            }
        }
        Ok(())
    }

    pub fn peer_count(&self) -> usize {
        match self {
            Hub::Userspace { node, .. } => node.peer_count(),
            Hub::Wg { interface, .. } => wg_peers(interface).map(|p| p.len()).unwrap_or(0),
        }
    }
}

fn wg_cmd(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("wg")
        .args(args)
        .output()
        .context("running wg(8) (install wireguard-tools)")?;
    anyhow::ensure!(
        out.status.success(),
        "wg {}: {}",
        args.first().copied().unwrap_or_default(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `wg show IFACE allowed-ips`: `<key>\t<ip/len> …` per peer.
fn wg_peers(interface: &str) -> anyhow::Result<BTreeMap<[u8; 32], Ipv4Net>> {
    let text = wg_cmd(&["show", interface, "allowed-ips"])?;
    Ok(parse_allowed_ips(&text))
}

fn parse_allowed_ips(text: &str) -> BTreeMap<[u8; 32], Ipv4Net> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let key = keys::parse("peer", f.next()?).ok()?;
            let addr = f.next().and_then(|a| a.parse().ok())?;
            Some((key, addr))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn wg_show_allowed_ips_parses() {
        let k = keys::encode(&[1u8; 32]);
        let text = format!("{k}\t10.8.0.2/32\n{}\t(none)\n", keys::encode(&[2u8; 32]));
        let m = parse_allowed_ips(&text);
        assert_eq!(m.len(), 1);
        assert_eq!(m[&[1u8; 32]].to_string(), "10.8.0.2/32");
    }
}
