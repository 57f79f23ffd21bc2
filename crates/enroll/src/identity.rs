//! Keys and certificates on disk. The key is created (and made durable) before anything is sent,
//! so an agent killed at any point finds the same key on restart. The certificate is written
//! last: its presence, matching the key, is what "enrolled" means.

use crate::paths;
use base64::Engine;
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use rand_core::OsRng;
use thingsly_core::state_dir::{MODE_PUBLIC, MODE_SECRET, StateDir, StateError};
use thingsly_proto::enroll::WireguardConfig;

/// The device's long-lived secrets. Debug output never shows key material.
pub struct Identity {
    pub device_id: String,
    key_pem: String,
    /// DER SubjectPublicKeyInfo of the device key, to match certificates against.
    public_key_der: Vec<u8>,
    wireguard_private: String,
    pub wireguard_public: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("device_id", &self.device_id)
            .field("wireguard_public", &self.wireguard_public)
            .finish_non_exhaustive()
    }
}

/// What telemetry and renewal need: PEMs, read from disk.
#[derive(Clone)]
pub struct Credentials {
    pub cert_pem: String,
    pub ca_chain_pem: String,
    pub key_pem: String,
    pub info: CertInfo,
    /// Where to poll for updates, when the bridge provisioned the device in a hawkBit.
    pub ddi: Option<thingsly_proto::enroll::DdiAssignment>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Leaf followed by the CA chain, as sent in a TLS handshake (ThingsBoard's X.509 chain
    /// provisioning needs the intermediates).
    pub fn full_chain_pem(&self) -> String {
        let mut s = self.cert_pem.clone();
        if !s.ends_with('\n') {
            s.push('\n');
        }
        s.push_str(&self.ca_chain_pem);
        s
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub subject_cn: String,
    pub serial_hex: String,
    pub not_before: time::OffsetDateTime,
    pub not_after: time::OffsetDateTime,
    pub public_key_der: Vec<u8>,
}

impl CertInfo {
    /// When renewal is due: `fraction` of the lifetime after not_before.
    pub fn renew_at(&self, fraction: f64) -> time::OffsetDateTime {
        let life = self.not_after - self.not_before;
        self.not_before + life * fraction
    }
}

pub fn cert_info(pem: &[u8]) -> Result<CertInfo, String> {
    let (_, p) =
        x509_parser::pem::parse_x509_pem(pem).map_err(|e| format!("not a PEM certificate: {e}"))?;
    let cert = p
        .parse_x509()
        .map_err(|e| format!("bad certificate: {e}"))?;
    let subject_cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_string();
    let validity = cert.validity();
    Ok(CertInfo {
        subject_cn,
        serial_hex: cert.raw_serial_as_string().replace(':', ""),
        not_before: validity.not_before.to_datetime(),
        not_after: validity.not_after.to_datetime(),
        public_key_der: cert.public_key().subject_public_key.data.to_vec(),
    })
}

impl Identity {
    /// Load the device and WireGuard keys, creating (durably) what is missing.
    /// A key file that does not parse is moved aside and reported; a new key is then made,
    /// which the bridge accepts only with a device token (see the bridge's key_conflict).
    pub fn load_or_create(state: &StateDir, device_id: &str) -> Result<Self, StateError> {
        state.subdir("identity")?;
        state.subdir("tunnel")?;
        let parse_key = |d: &[u8]| {
            let s = std::str::from_utf8(d).map_err(|e| e.to_string())?;
            p256::SecretKey::from_pkcs8_pem(s).map_err(|e| e.to_string())?;
            Ok(s.to_string())
        };
        let key_pem = match state.read_parsed(paths::DEVICE_KEY, parse_key) {
            Ok(Some(k)) => k,
            Ok(None) | Err(StateError::Corrupt { .. }) => {
                let key = p256::SecretKey::random(&mut OsRng);
                let pem = key
                    .to_pkcs8_pem(LineEnding::LF)
                    .map_err(|e| io_err(state, paths::DEVICE_KEY, e.to_string()))?;
                state.write_atomic(paths::DEVICE_KEY, pem.as_bytes(), MODE_SECRET)?;
                tracing::info!("generated device key (P-256)");
                pem.to_string()
            }
            Err(e) => return Err(e),
        };
        let secret = p256::SecretKey::from_pkcs8_pem(&key_pem)
            .map_err(|e| io_err(state, paths::DEVICE_KEY, e.to_string()))?;
        let public_key_der = {
            use p256::pkcs8::EncodePublicKey;
            let spki = secret
                .public_key()
                .to_public_key_der()
                .map_err(|e| io_err(state, paths::DEVICE_KEY, e.to_string()))?;
            subject_public_key_bits(spki.as_bytes())
        };

        let b64 = base64::engine::general_purpose::STANDARD;
        let parse_wg = |d: &[u8]| {
            let s = std::str::from_utf8(d)
                .map_err(|e| e.to_string())?
                .trim()
                .to_string();
            let raw = b64.decode(&s).map_err(|e| e.to_string())?;
            if raw.len() != 32 {
                return Err("WireGuard key is not 32 bytes".to_string());
            }
            Ok(s)
        };
        let wireguard_private = match state.read_parsed(paths::WIREGUARD_KEY, parse_wg) {
            Ok(Some(k)) => k,
            Ok(None) | Err(StateError::Corrupt { .. }) => {
                let secret = x25519_dalek::StaticSecret::random_from_rng(OsRng);
                let k = b64.encode(secret.to_bytes());
                state.write_atomic(
                    paths::WIREGUARD_KEY,
                    format!("{k}\n").as_bytes(),
                    MODE_SECRET,
                )?;
                tracing::info!("generated WireGuard key");
                k
            }
            Err(e) => return Err(e),
        };
        let wireguard_public = {
            let raw = b64
                .decode(&wireguard_private)
                .map_err(|e| io_err(state, paths::WIREGUARD_KEY, e.to_string()))?;
            let mut bytes = [0u8; 32];
            bytes.copy_from_slice(&raw);
            let secret = x25519_dalek::StaticSecret::from(bytes);
            b64.encode(x25519_dalek::PublicKey::from(&secret).as_bytes())
        };
        Ok(Self {
            device_id: device_id.to_string(),
            key_pem,
            public_key_der,
            wireguard_private,
            wireguard_public,
        })
    }

    /// PKCS#10 request with CN = device id and the device id as its one SAN (a DNS name),
    /// signed by the device key. The SAN is for step-ca: its JWK provisioner compares the
    /// CSR's SANs 1:1 with the token's, and the bridge's token names exactly the device id
    /// (README "step-ca as the signer"); the built-in CA ignores it.
    pub fn csr_pem(&self) -> Result<String, String> {
        let kp = rcgen::KeyPair::from_pem(&self.key_pem).map_err(|e| e.to_string())?;
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, self.device_id.clone());
        params.subject_alt_names = vec![rcgen::SanType::DnsName(
            self.device_id
                .clone()
                .try_into()
                .map_err(|e| format!("{e}"))?,
        )];
        params
            .serialize_request(&kp)
            .and_then(|r| r.pem())
            .map_err(|e| e.to_string())
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// True when `info` certifies this device's key.
    pub fn matches(&self, info: &CertInfo) -> bool {
        info.public_key_der == self.public_key_der
    }

    /// Stored credentials when they certify the current key; `None` when not enrolled.
    pub fn credentials(&self, state: &StateDir) -> Result<Option<Credentials>, StateError> {
        let parse_cert =
            |d: &[u8]| cert_info(d).map(|i| (String::from_utf8_lossy(d).into_owned(), i));
        let Some((cert_pem, info)) = state.read_parsed(paths::DEVICE_CERT, parse_cert)? else {
            return Ok(None);
        };
        if !self.matches(&info) {
            tracing::warn!("stored certificate does not match the device key; enrolling again");
            return Ok(None);
        }
        let Some(chain) = state.read(paths::CA_CHAIN)? else {
            return Ok(None);
        };
        // An unreadable assignment is not a reason to enroll again: the next renewal
        // rewrites it, and until then OTA uses the config's server.
        let ddi = state.read_json(paths::DDI_ASSIGNMENT).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "DDI assignment unreadable; ignored");
            None
        });
        Ok(Some(Credentials {
            cert_pem,
            ca_chain_pem: String::from_utf8_lossy(&chain).into_owned(),
            key_pem: self.key_pem.clone(),
            info,
            ddi,
        }))
    }

    /// Store what the bridge answered. The certificate goes last: if we die before, the next
    /// start enrolls again with the same key, which the bridge accepts idempotently.
    pub fn store(
        &self,
        state: &StateDir,
        cert_pem: &str,
        ca_chain_pem: &str,
        wireguard: Option<&WireguardConfig>,
        ticket_key_pem: Option<&str>,
        ddi: Option<&thingsly_proto::enroll::DdiAssignment>,
    ) -> Result<(), StateError> {
        state.write_atomic(paths::CA_CHAIN, ca_chain_pem.as_bytes(), MODE_PUBLIC)?;
        match ddi {
            Some(d) => state.write_json(paths::DDI_ASSIGNMENT, d, MODE_SECRET)?,
            None => state.remove(paths::DDI_ASSIGNMENT)?,
        }
        if let Some(pem) = ticket_key_pem {
            state.write_atomic(paths::TICKET_KEY, pem.as_bytes(), MODE_PUBLIC)?;
        }
        if let Some(wg) = wireguard {
            let mut wg = wg.clone();
            wg.private_key = Some(self.wireguard_private.clone());
            state.write_json(paths::WIREGUARD_CONFIG, &wg, MODE_SECRET)?;
        }
        state.write_atomic(paths::DEVICE_CERT, cert_pem.as_bytes(), MODE_PUBLIC)
    }
}

fn io_err(state: &StateDir, rel: &str, msg: String) -> StateError {
    StateError::Io {
        path: state.path(rel),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, msg),
    }
}

/// The BIT STRING contents of a DER SubjectPublicKeyInfo (what x509-parser calls `raw`).
fn subject_public_key_bits(spki_der: &[u8]) -> Vec<u8> {
    use x509_parser::prelude::FromDer;
    x509_parser::x509::SubjectPublicKeyInfo::from_der(spki_der)
        .map(|(_, spki)| spki.subject_public_key.data.to_vec())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_are_created_once_with_mode_0600() {
        let t = tempfile::tempdir().unwrap();
        let state = StateDir::open(t.path()).unwrap();
        let a = Identity::load_or_create(&state, "dev-1").unwrap();
        let b = Identity::load_or_create(&state, "dev-1").unwrap();
        assert_eq!(a.key_pem, b.key_pem);
        assert_eq!(a.wireguard_public, b.wireguard_public);
        for p in [paths::DEVICE_KEY, paths::WIREGUARD_KEY] {
            let mode = std::fs::metadata(state.path(p))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{p}");
        }
        assert!(!format!("{a:?}").contains("PRIVATE"));
    }

    #[test]
    fn csr_has_device_cn_and_our_key() {
        let t = tempfile::tempdir().unwrap();
        let state = StateDir::open(t.path()).unwrap();
        let id = Identity::load_or_create(&state, "dev-42").unwrap();
        let pem = id.csr_pem().unwrap();
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        use x509_parser::prelude::FromDer;
        let (_, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&p.contents)
                .unwrap();
        csr.verify_signature().unwrap();
        let cn = csr
            .certification_request_info
            .subject
            .iter_common_name()
            .next()
            .unwrap();
        assert_eq!(cn.as_str().unwrap(), "dev-42");
        // The one SAN is the id, as a DNS name (what step-ca's SAN validator compares).
        let sans: Vec<String> = csr
            .requested_extensions()
            .into_iter()
            .flatten()
            .filter_map(|e| match e {
                x509_parser::extensions::ParsedExtension::SubjectAlternativeName(s) => Some(
                    s.general_names
                        .iter()
                        .map(|g| format!("{g}"))
                        .collect::<Vec<_>>(),
                ),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(sans, ["DNSName(dev-42)"]);
        assert_eq!(
            csr.certification_request_info
                .subject_pki
                .subject_public_key
                .data
                .to_vec(),
            id.public_key_der
        );
    }

    #[test]
    fn corrupt_key_is_moved_aside() {
        let t = tempfile::tempdir().unwrap();
        let state = StateDir::open(t.path()).unwrap();
        state.subdir("identity").unwrap();
        state
            .write_atomic(paths::DEVICE_KEY, b"garbage", MODE_SECRET)
            .unwrap();
        Identity::load_or_create(&state, "d").unwrap();
        let aside = std::fs::read_dir(state.path("identity"))
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().contains("corrupt"));
        assert!(aside);
    }
}
