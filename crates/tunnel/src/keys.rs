//! WireGuard keys as `wg(8)` writes them: 32 bytes, standard base64.

use base64::Engine;

pub fn parse(what: &str, b64: &str) -> Result<[u8; 32], crate::TunnelError> {
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .ok_or_else(|| crate::TunnelError::Config(format!("{what} is not a base64 WireGuard key")))
}

pub fn encode(key: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

pub fn public_of(private: &[u8; 32]) -> [u8; 32] {
    *x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(*private)).as_bytes()
}
