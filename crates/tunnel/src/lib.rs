//! WireGuard in userspace: boringtun's protocol state machine (`noise::Tunn`) over a TUN
//! interface, driven on the caller's tokio runtime. No kernel module on either side.
//!
//! [`Node`] is the engine (TUN + UDP + peers); [`device`] runs the device's single-peer
//! tunnel from its enrolled configuration; the bridge's hub is a node with a peer per device.

pub mod device;
pub mod keys;
mod node;
pub mod timers;
mod tun;

pub use node::{Node, NodeConfig, PeerConfig, PeerStats};

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(
        "/dev/net/tun is not available ({0}): load the tun module or, under systemd, add DeviceAllow=/dev/net/tun rw"
    )]
    NoTun(String),
    #[error(
        "creating the TUN interface needs CAP_NET_ADMIN ({0}): run as root or, under systemd, AmbientCapabilities=CAP_NET_ADMIN"
    )]
    NoCapability(String),
    #[error("tunnel configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Io(String),
}
