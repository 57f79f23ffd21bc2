//! The `tunnel` module: once enrolled, bring up the WireGuard tunnel to the bridge's hub in
//! userspace (boringtun over a TUN interface) and keep its state in `DeviceState`.

use crate::supervisor::Ctx;
use std::time::Duration;
use thingsly_proto::enroll::WireguardConfig;
use thingsly_tunnel::TunnelError;
use thingsly_tunnel::device::{DeviceTunnel, DeviceTunnelConfig};

pub const MODULE: &str = "tunnel";
/// How often to look again for the enrolled configuration, or retry a failed interface.
const RETRY: Duration = Duration::from_secs(5);
const STATUS_EVERY: Duration = Duration::from_secs(5);

pub async fn run(ctx: Ctx) -> anyhow::Result<()> {
    let t = ctx.cfg.tunnel.clone();
    let step = || async {
        let wg: WireguardConfig = ctx
            .dir
            .read_json(thingsly_enroll::paths::WIREGUARD_CONFIG)
            .map_err(|e| TunnelError::Config(e.to_string()))?
            .ok_or_else(|| TunnelError::Config("not enrolled yet".into()))?;
        let mut cfg = DeviceTunnelConfig::from_enrolled(
            &wg.address,
            wg.private_key.as_deref().unwrap_or_default(),
            &wg.peer_public_key,
            &wg.endpoint,
            &wg.allowed_ips,
            wg.persistent_keepalive,
        )?;
        cfg.interface = t.interface.clone();
        cfg.mtu = t.mtu;
        cfg.socket_buffer = t.socket_buffer;
        if !t.endpoint.is_empty() {
            cfg.endpoint = t.endpoint.clone();
        }
        DeviceTunnel::open(cfg).await
    };
    let log = |e: &TunnelError, why: &str| match e {
        TunnelError::NoTun(_) | TunnelError::NoCapability(_) => {
            tracing::error!(reason = %why, "tunnel cannot start")
        }
        _ => tracing::info!(reason = %why, "tunnel waiting"),
    };
    let Some(tunnel) = ctx.wait_ready(MODULE, RETRY, step, log).await else {
        return Ok(());
    };
    let status = async {
        let mut tick = tokio::time::interval(STATUS_EVERY);
        loop {
            tick.tick().await;
            let s = tunnel.status();
            let up = s.up;
            let endpoint = s.endpoint.map(|e| e.to_string()).unwrap_or_default();
            let detail = if up {
                format!("{} {} up via {endpoint}", s.interface, s.address)
            } else {
                format!(
                    "{} {} waiting for a handshake with {endpoint}",
                    s.interface, s.address
                )
            };
            ctx.state.set_module(MODULE, "running", detail);
            // Whole seconds, so the attribute changes with each handshake, not each tick.
            let handshake_at = s.last_handshake.map(|age| {
                let at = std::time::SystemTime::now() - age;
                at.duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64)
            });
            ctx.state.update(|d| {
                d.tunnel_state = if up { "up" } else { "down" }.into();
                d.tunnel_endpoint = endpoint.clone();
                // Jitter of a second between ticks is not a new handshake.
                if handshake_at.is_none_or(|t| {
                    d.tunnel_last_handshake
                        .is_none_or(|old| (t - old).abs() > 2)
                }) {
                    d.tunnel_last_handshake = handshake_at;
                }
                d.tunnel_rx_bytes = s.rx_bytes;
                d.tunnel_tx_bytes = s.tx_bytes;
                let m = d.modules.entry(MODULE.to_string()).or_default();
                m.counters.insert("rx_bytes".into(), s.rx_bytes);
                m.counters.insert("tx_bytes".into(), s.tx_bytes);
                // No handshake age here: it grows every tick, so the state would change (and
                // wake every reader) each time; `tunnel_last_handshake` says the same.
            });
        }
    };
    tokio::select! {
        _ = tunnel.run(ctx.shutdown.clone()) => {}
        _ = status => {}
    }
    ctx.state.update(|d| d.tunnel_state = "down".into());
    Ok(())
}
