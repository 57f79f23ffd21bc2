//! Who signs device certificates: the bridge's own CA (`builtin`, the embedded default) or
//! step-ca through its JWK provisioner (`step-ca`, see `step_ca.rs`). Enrollment and renewal
//! go through [`Signer::sign`] alike; nothing is recorded unless it succeeds.

use axum::http::StatusCode;
use std::time::Duration;
use thingsly_proto::enroll::error_code;

use crate::ca::{Ca, Issued};
use crate::config::{SignerBackend, SignerSection};
use crate::error::{ApiFailure, fail, internal};
use crate::step_ca::{ProvisionerKey, SignFailure, StepCa};

pub enum Signer {
    Builtin,
    StepCa(Box<StepCa>),
}

/// A signed device certificate and the chain the device is sent with it.
pub struct DeviceCert {
    pub issued: Issued,
    /// `ca_chain_pem` of the answer: the certificate's intermediates and root, then (with
    /// step-ca) the bridge's own chain, so the device still verifies the bridge and a broker
    /// whose certificate the bridge issued.
    pub chain_pem: String,
}

/// The root certificate's file: `signer.root`, or the root `signer.root_fingerprint` names,
/// fetched once and kept in `data_dir` (`step-ca-root.crt`) so later starts do not need
/// step-ca. Whether the file matches the fingerprint is checked by the caller, for both.
async fn root_file(
    s: &SignerSection,
    url: &str,
    data_dir: &std::path::Path,
) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context;
    let fp = match (&s.root, &s.root_fingerprint) {
        (Some(r), _) => return Ok(r.clone()),
        (None, Some(fp)) => fp,
        (None, None) => anyhow::bail!("[signer] step-ca needs root or root_fingerprint"),
    };
    let cached = data_dir.join("step-ca-root.crt");
    let kept = std::fs::read_to_string(&cached)
        .ok()
        .and_then(|pem| crate::step_ca::pem_fingerprint(&pem));
    if !kept.is_some_and(|k| k.eq_ignore_ascii_case(fp)) {
        let pem = crate::step_ca::bootstrap_root(url, fp, s.timeout)
            .await
            .context("signer.root_fingerprint")?;
        crate::ca::write_file(&cached, pem.as_bytes(), 0o644)?;
        tracing::info!(fingerprint = %fp, path = %cached.display(), "step-ca root fetched and pinned");
    }
    Ok(cached)
}

impl Signer {
    /// `[signer]` of bridge.toml (checked by `BridgeConfig::load`); reads the key and the
    /// root ([`root_file`]).
    pub async fn from_config(
        s: &SignerSection,
        data_dir: &std::path::Path,
    ) -> anyhow::Result<Self> {
        use anyhow::Context;
        match s.backend {
            SignerBackend::Builtin => Ok(Self::Builtin),
            SignerBackend::StepCa => {
                let (Some(url), Some(name), Some(key)) =
                    (&s.url, &s.provisioner, &s.provisioner_key)
                else {
                    anyhow::bail!("[signer] step-ca needs url, provisioner, provisioner_key");
                };
                let root = root_file(s, url, data_dir).await?;
                let password = match &s.provisioner_password_file {
                    Some(p) => Some(
                        std::fs::read(p)
                            .with_context(|| {
                                format!("signer.provisioner_password_file {}", p.display())
                            })?
                            .trim_ascii_end()
                            .to_vec(),
                    ),
                    None => None,
                };
                let src = std::fs::read_to_string(key)
                    .with_context(|| format!("signer.provisioner_key {}", key.display()))?;
                let key = ProvisionerKey::parse(&src, password.as_deref()).map_err(|e| {
                    anyhow::anyhow!("signer.provisioner_key {}: {e}", key.display())
                })?;
                let root_pem = std::fs::read_to_string(&root)
                    .with_context(|| format!("signer.root {}", root.display()))?;
                let ca = StepCa::new(url, name, key, &root_pem, s.timeout)
                    .with_context(|| format!("signer.root {}", root.display()))?;
                if let Some(fp) = &s.root_fingerprint
                    && !fp.eq_ignore_ascii_case(ca.root_fingerprint())
                {
                    anyhow::bail!(
                        "signer.root {} has fingerprint {}, not signer.root_fingerprint {fp}",
                        root.display(),
                        ca.root_fingerprint()
                    );
                }
                Ok(Self::StepCa(Box::new(ca)))
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Builtin => "builtin",
            Self::StepCa(_) => "step-ca",
        }
    }

    /// Every CA a device's client certificate may chain to (the device listener's trust
    /// anchors): the bridge's own, and step-ca's root when it signs. Devices enrolled before
    /// a switch to step-ca keep renewing with their old certificate.
    pub fn client_roots_pem(&self, ca: &Ca) -> String {
        match self {
            Self::Builtin => ca.chain_pem.clone(),
            Self::StepCa(s) => format!("{}{}", ca.chain_pem, s.root_pem()),
        }
    }

    /// Sign the device's CSR (`csr_pem`, whose checked key is `spki_der`) for `device_id`.
    pub async fn sign(
        &self,
        ca: &Ca,
        device_id: &str,
        csr_pem: &str,
        spki_der: &[u8],
        lifetime: Duration,
    ) -> Result<DeviceCert, ApiFailure> {
        match self {
            Self::Builtin => Ok(DeviceCert {
                issued: ca
                    .sign_device(device_id, spki_der, lifetime)
                    .map_err(internal)?,
                chain_pem: ca.chain_pem.clone(),
            }),
            Self::StepCa(s) => match s.sign(device_id, csr_pem, spki_der, lifetime).await {
                Ok(c) => Ok(DeviceCert {
                    issued: c.issued,
                    chain_pem: format!("{}{}", c.chain_pem, ca.chain_pem),
                }),
                Err(f) => {
                    tracing::warn!(device = %device_id, error = %f, "step-ca did not sign");
                    Err(device_error(&f))
                }
            },
        }
    }
}

/// What the device is told when step-ca does not sign: a code per cause, step-ca's message.
pub fn device_error(f: &SignFailure) -> ApiFailure {
    let (status, code) = match f {
        SignFailure::TokenRefused(_) => (StatusCode::BAD_GATEWAY, error_code::SIGNER_REFUSED),
        SignFailure::PolicyRefused(_) => (StatusCode::FORBIDDEN, error_code::SIGNER_POLICY),
        SignFailure::Unavailable(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            error_code::SIGNER_UNAVAILABLE,
        ),
        SignFailure::BadAnswer(_) => (StatusCode::BAD_GATEWAY, error_code::SIGNER_BAD_ANSWER),
    };
    fail(status, code, f.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_step_ca_failure_has_its_own_code_and_a_retry_hint_in_its_status() {
        let codes: Vec<(u16, &str)> = [
            SignFailure::TokenRefused("t".into()),
            SignFailure::PolicyRefused("p".into()),
            SignFailure::Unavailable("u".into()),
            SignFailure::BadAnswer("b".into()),
        ]
        .iter()
        .map(|f| {
            let ApiFailure(s, c, _) = device_error(f);
            (s.as_u16(), c)
        })
        .collect();
        // 5xx: the agent retries with backoff (the CA may come back or be fixed); 403: it
        // stops, as for any refusal of its request.
        assert_eq!(
            codes,
            [
                (502, "signer_refused"),
                (403, "signer_policy"),
                (503, "signer_unavailable"),
                (502, "signer_bad_answer")
            ]
        );
    }
}
