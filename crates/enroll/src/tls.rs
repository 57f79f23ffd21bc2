//! rustls client configurations with ring as the one provider (no process-wide default needed).

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;

/// Parse every certificate in a PEM bundle; an empty or unreadable bundle is an error.
pub fn load_pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
    let certs = certs.map_err(|e| format!("bad PEM certificate: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in PEM bundle".into());
    }
    Ok(certs)
}

/// A client config that trusts only `ca_pem` and, when given, authenticates with
/// `chain_pem` (leaf first, then intermediates) and the PKCS#8 `key_pem`.
pub fn client_config(
    ca_pem: &[u8],
    client_auth: Option<(&[u8], &[u8])>,
) -> Result<rustls::ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    for c in load_pem_certs(ca_pem)? {
        roots
            .add(c)
            .map_err(|e| format!("CA bundle certificate rejected: {e}"))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots);
    match client_auth {
        None => Ok(builder.with_no_client_auth()),
        Some((chain_pem, key_pem)) => {
            let chain = load_pem_certs(chain_pem)?;
            let key = PrivateKeyDer::from_pem_slice(key_pem)
                .map_err(|e| format!("bad private key: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate rejected: {e}"))
        }
    }
}
