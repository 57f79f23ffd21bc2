//! The HTTPS client for `POST /devices/{id}/enroll` and `/renew`, and the two flows around it.

use crate::identity::{Credentials, Identity, cert_info};
use crate::tls::client_config;
use std::time::Duration;
use thingsly_core::proxy::Proxies;
use thingsly_core::state_dir::{StateDir, StateError};
use thingsly_proto::enroll::{ApiError, EnrollRequest, EnrollResponse};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("bridge unreachable at {url}: {detail}")]
    Network { url: String, detail: String },
    #[error("bridge refused ({status} {code}): {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
        /// The bridge's `Retry-After` (429, 503): no retry before it.
        retry_after: Option<Duration>,
    },
    #[error("malformed answer from the bridge: {0}")]
    Malformed(String),
    #[error("state directory: {0}")]
    State(#[from] StateError),
}

impl EnrollError {
    /// Whether trying again later can help. A refusal for a bad token or CSR cannot:
    /// retrying it forever would only hide the problem.
    /// The wait the server asked for, if it did: a retry waits at least this long.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Refused { retry_after, .. } => {
                retry_after.map(|d| d.min(thingsly_core::poll_schedule::MAX_RETRY_AFTER))
            }
            _ => None,
        }
    }

    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Network { .. } | Self::Malformed(_) => true,
            Self::Refused { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            Self::State(e) => e.is_disk_full(),
            Self::Config(_) => false,
        }
    }
}

/// The bridge's enrollment API as the device reaches it.
#[derive(Clone, Copy)]
pub struct BridgeEndpoint<'a> {
    /// `https://host[:port]`.
    pub url: &'a str,
    /// The bundle the bridge's server certificate must chain to.
    pub ca_pem: &'a [u8],
    /// For each whole request.
    pub timeout: Duration,
    pub proxies: &'a Proxies,
}

impl<'a> BridgeEndpoint<'a> {
    /// Reached without a proxy (tests, tools on the bridge's own network).
    pub fn direct(url: &'a str, ca_pem: &'a [u8], timeout: Duration) -> Self {
        Self {
            url,
            ca_pem,
            timeout,
            proxies: &thingsly_core::proxy::DIRECT,
        }
    }
}

pub struct EnrollClient {
    http: reqwest::Client,
    base: String,
    proxies: Proxies,
}

impl EnrollClient {
    /// `client_auth` (chain PEM, key PEM) is used for renewal.
    pub fn new(
        bridge: &BridgeEndpoint<'_>,
        client_auth: Option<(&[u8], &[u8])>,
    ) -> Result<Self, EnrollError> {
        let tls = client_config(bridge.ca_pem, client_auth).map_err(EnrollError::Config)?;
        let timeout = bridge.timeout;
        let server_url = bridge.url;
        let http = bridge
            .proxies
            .configure(reqwest::Client::builder())
            .use_preconfigured_tls(tls)
            .https_only(true)
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("thingsly-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| EnrollError::Config(e.to_string()))?;
        Ok(Self {
            http,
            base: server_url.trim_end_matches('/').to_string(),
            proxies: bridge.proxies.clone(),
        })
    }

    async fn post(
        &self,
        path: &str,
        bearer: Option<&str>,
        body: &EnrollRequest,
    ) -> Result<EnrollResponse, EnrollError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.post(&url).json(body);
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(|e| EnrollError::Network {
            url: url.clone(),
            detail: self.proxies.error_text(&e),
        })?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                thingsly_core::poll_schedule::parse_retry_after(v, std::time::SystemTime::now())
            });
        let bytes = resp.bytes().await.map_err(|e| EnrollError::Network {
            url: url.clone(),
            detail: self.proxies.error_text(&e),
        })?;
        if !status.is_success() {
            let (code, message) = match serde_json::from_slice::<ApiError>(&bytes) {
                Ok(e) => (e.error, e.message),
                Err(_) => (
                    "http_error".to_string(),
                    String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned(),
                ),
            };
            return Err(EnrollError::Refused {
                status: status.as_u16(),
                code,
                message,
                retry_after,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            EnrollError::Malformed(format!(
                "{e}; body starts {:?}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(80)])
            ))
        })
    }

    pub async fn enroll(
        &self,
        device_id: &str,
        token: &str,
        body: &EnrollRequest,
    ) -> Result<EnrollResponse, EnrollError> {
        self.post(&format!("/devices/{device_id}/enroll"), Some(token), body)
            .await
    }

    pub async fn renew(
        &self,
        device_id: &str,
        body: &EnrollRequest,
    ) -> Result<EnrollResponse, EnrollError> {
        self.post(&format!("/devices/{device_id}/renew"), None, body)
            .await
    }
}

/// Check an answer before anything of it is stored: it must certify our key for our id.
fn validate(identity: &Identity, resp: &EnrollResponse) -> Result<(), EnrollError> {
    if let Some(pem) = &resp.terminal_ticket_key_pem {
        use p256::pkcs8::DecodePublicKey;
        p256::PublicKey::from_public_key_pem(pem).map_err(|e| {
            EnrollError::Malformed(format!(
                "terminal_ticket_key_pem is not a P-256 public key: {e}"
            ))
        })?;
    }
    let info = cert_info(resp.certificate_pem.as_bytes()).map_err(EnrollError::Malformed)?;
    if !identity.matches(&info) {
        return Err(EnrollError::Malformed(
            "certificate is not for our key".into(),
        ));
    }
    if info.subject_cn != identity.device_id {
        return Err(EnrollError::Malformed(format!(
            "certificate CN {:?} is not our id",
            info.subject_cn
        )));
    }
    crate::tls::load_pem_certs(resp.ca_chain_pem.as_bytes())
        .map_err(|e| EnrollError::Malformed(format!("ca_chain_pem: {e}")))?;
    if let Some(d) = &resp.ddi {
        check_ddi(d).map_err(|e| EnrollError::Malformed(format!("ddi: {e}")))?;
    }
    Ok(())
}

/// A DDI assignment the OTA module can use as it is: an https URL, a path-safe tenant, and a
/// token (exactly when the auth needs one) that is safe in an HTTP header.
fn check_ddi(d: &thingsly_proto::enroll::DdiAssignment) -> Result<(), String> {
    use thingsly_proto::enroll::DdiAssignedAuth;
    if !d.server_url.starts_with("https://") || d.server_url.len() <= 8 {
        return Err(format!("server_url {:?} is not https://", d.server_url));
    }
    if d.tenant.is_empty()
        || !d
            .tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(format!("tenant {:?} is not a hawkBit tenant", d.tenant));
    }
    match (d.auth, &d.target_token) {
        (DdiAssignedAuth::TargetToken, Some(t))
            if !t.is_empty() && t.len() <= 256 && t.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Ok(())
        }
        (DdiAssignedAuth::TargetToken, _) => {
            Err("target-token auth without a usable target_token".into())
        }
        (DdiAssignedAuth::Certificate, None) => Ok(()),
        (DdiAssignedAuth::Certificate, Some(_)) => {
            Err("certificate auth with a target_token".into())
        }
    }
}

fn request(
    identity: &Identity,
    metadata: serde_json::Map<String, serde_json::Value>,
) -> Result<EnrollRequest, EnrollError> {
    Ok(EnrollRequest {
        csr_pem: identity.csr_pem().map_err(EnrollError::Config)?,
        wireguard_public_key: Some(identity.wireguard_public.clone()),
        metadata,
    })
}

/// Validate an answer, store it (certificate last) and read it back as credentials.
fn keep(
    state: &StateDir,
    identity: &Identity,
    resp: &EnrollResponse,
) -> Result<Credentials, EnrollError> {
    validate(identity, resp)?;
    identity.store(
        state,
        &resp.certificate_pem,
        &resp.ca_chain_pem,
        Some(&resp.wireguard),
        resp.terminal_ticket_key_pem.as_deref(),
        resp.ddi.as_ref(),
    )?;
    identity
        .credentials(state)?
        .ok_or_else(|| EnrollError::Malformed("stored certificate did not read back".into()))
}

/// Enroll unless already enrolled. Idempotent and crash-safe: keys exist before the request,
/// the certificate is stored last.
pub async fn ensure_enrolled(
    state: &StateDir,
    identity: &Identity,
    bridge: &BridgeEndpoint<'_>,
    token: &str,
    metadata: serde_json::Map<String, serde_json::Value>,
) -> Result<Credentials, EnrollError> {
    if let Some(credentials) = identity.credentials(state)? {
        return Ok(credentials);
    }
    if bridge.url.is_empty() {
        return Err(EnrollError::Config(
            "enroll.server_url is not set and the device has no certificate".into(),
        ));
    }
    if token.is_empty() {
        return Err(EnrollError::Config(
            "no bootstrap token (enroll.bootstrap_token or enroll.bootstrap_token_file)".into(),
        ));
    }
    let client = EnrollClient::new(bridge, None)?;
    let resp = client
        .enroll(&identity.device_id, token, &request(identity, metadata)?)
        .await?;
    let credentials = keep(state, identity, &resp)?;
    tracing::info!(serial = %credentials.info.serial_hex, not_after = %credentials.info.not_after, "enrolled");
    Ok(credentials)
}

/// Renew the certificate over mTLS with the current one; the key stays the same.
pub async fn renew(
    state: &StateDir,
    identity: &Identity,
    current: &Credentials,
    bridge: &BridgeEndpoint<'_>,
) -> Result<Credentials, EnrollError> {
    let chain = current.full_chain_pem();
    let client = EnrollClient::new(bridge, Some((chain.as_bytes(), current.key_pem.as_bytes())))?;
    let resp = client
        .renew(&identity.device_id, &request(identity, Default::default())?)
        .await?;
    let creds = keep(state, identity, &resp)?;
    tracing::info!(serial = %creds.info.serial_hex, not_after = %creds.info.not_after, "certificate renewed");
    Ok(creds)
}
