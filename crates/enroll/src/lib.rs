//! Device identity: the P-256 key and WireGuard key made on the device, the CSR, the
//! enrollment and renewal client, and the credential store in the state directory.
//! It speaks only to the bridge's enrollment API; it knows nothing of MQTT or the tunnel.

mod client;
mod identity;
mod tls;

pub use client::{BridgeEndpoint, EnrollClient, EnrollError, ensure_enrolled, renew};
pub use identity::{CertInfo, Credentials, Identity, cert_info};
pub use tls::{client_config, load_pem_certs};

/// Relative paths inside the state directory.
pub mod paths {
    pub const DEVICE_KEY: &str = "identity/device.key";
    pub const DEVICE_CERT: &str = "identity/device.crt";
    pub const CA_CHAIN: &str = "identity/ca-chain.pem";
    pub const TICKET_KEY: &str = "identity/terminal-ticket.pub";
    /// The DDI server the bridge provisioned the device in, and its token there (0600).
    pub const DDI_ASSIGNMENT: &str = "identity/ddi.json";
    pub const WIREGUARD_KEY: &str = "tunnel/wireguard.key";
    pub const WIREGUARD_CONFIG: &str = "tunnel/wireguard.json";
}
