//! The key that signs terminal session tickets (ES256). Devices get its public half at
//! enrollment and renewal; it is not the CA key, so a leaked ticket key cannot mint
//! certificates and rotating it does not touch the PKI.

use anyhow::Context;
use rcgen::KeyPair;
use std::path::{Path, PathBuf};

pub struct TicketKey {
    /// SPKI PEM, sent to devices.
    pub public_pem: String,
    /// PKCS#8 PEM; signs tickets (terminal proxy).
    pub private_pem: String,
}

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("terminal-ticket.key")
}

/// Load the key, creating it (P-256, mode 0600) on first use so existing data dirs get one.
pub fn load_or_create(data_dir: &Path) -> anyhow::Result<TicketKey> {
    let p = path(data_dir);
    let private_pem = match std::fs::read_to_string(&p) {
        Ok(pem) => pem,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let kp = KeyPair::generate().context("ticket key")?;
            let pem = kp.serialize_pem();
            crate::ca::write_file(&p, pem.as_bytes(), 0o600)?;
            tracing::info!(path = %p.display(), "created terminal ticket key");
            pem
        }
        Err(e) => return Err(e).with_context(|| p.display().to_string()),
    };
    let kp = KeyPair::from_pem(&private_pem).with_context(|| p.display().to_string())?;
    Ok(TicketKey {
        public_pem: kp.public_key_pem(),
        private_pem,
    })
}
