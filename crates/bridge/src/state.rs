//! What every part of the bridge shares: the CA, the registry, the tokens, the hub. The HTTP
//! routes (`api.rs`, `ddi_server.rs`, `terminal_proxy.rs`) and the hub read it; none of them
//! owns it.

use crate::ca::Ca;
use crate::store::Store;
use rustls_pki_types::CertificateDer;
use std::sync::Arc;
use std::time::Duration;

pub struct AppState {
    pub ca: Ca,
    /// Signs enrollments and renewals: `ca` itself, or step-ca.
    pub signer: crate::signer::Signer,
    pub store: Store,
    /// Empty disables fleet enrollment (per-device tokens only).
    pub fleet_token: String,
    pub admin_token: String,
    pub device_cert_lifetime: Duration,
    pub pool: ipnet::Ipv4Net,
    pub wg_endpoint: String,
    pub wg_keepalive: u16,
    pub wg_public_key: String,
    /// Public half of the terminal ticket key (SPKI PEM), sent with every certificate.
    pub ticket_public_pem: String,
    /// `None` without `[terminal]` in bridge.toml.
    pub terminal: Option<crate::terminal_proxy::TerminalProxy>,
    /// `None` with `wireguard.mode = "off"`.
    pub hub: Option<Arc<crate::hub::Hub>>,
    /// `None` without `[ddi]` in bridge.toml.
    pub ddi: Option<crate::ddi_server::DdiSettings>,
    /// Who may enroll under what id, and how often (`[enrollment]`).
    pub enrollment: crate::config::EnrollmentSection,
    /// `external_url` in bridge.toml: the base of links sent to devices.
    pub external_url: Option<String>,
    /// Where the CRL (PEM) is written for the broker's `crlfile`.
    pub crl_path: std::path::PathBuf,
    /// `[hawkbit]`: devices are provisioned in hawkBit and told to poll it.
    pub hawkbit: Option<Arc<crate::hawkbit::Hawkbit>>,
    /// `[thingsboard] webhook_secret_file`; empty: the connect webhook answers 404.
    pub webhook_secret: String,
    /// New identities the fleet token created recently.
    pub fleet_rate: crate::quota::RateWindow,
}

impl AppState {
    /// Bring the hub's peers in line with the registry now (after enroll, renew, revoke).
    pub fn sync_hub(&self) {
        if let Some(h) = &self.hub
            && let Err(e) = h.reconcile(&self.store)
        {
            tracing::error!(error = %format!("{e:#}"), "WireGuard hub update failed; retried by the periodic reconcile");
        }
    }
}

/// The verified client certificate of the TLS connection, if the client sent one.
#[derive(Clone, Default)]
pub struct PeerCert(pub Option<CertificateDer<'static>>);
