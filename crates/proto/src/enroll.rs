//! `POST /devices/{id}/enroll`, `POST /devices/{id}/renew` and the operator views.

use serde::{Deserialize, Serialize};

/// Body of an enroll or renew request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// PKCS#10 request, PEM; subject CN must equal the device id in the path.
    pub csr_pem: String,
    /// The device's WireGuard public key (base64). The private key never leaves the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_public_key: Option<String>,
    /// Free-form registration metadata (hardware, sw_version, …), stored by the bridge.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

/// Successful answer to enroll and renew.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EnrollResponse {
    /// The device's client certificate, PEM.
    pub certificate_pem: String,
    /// Issuing CA followed by the root, PEM; used to verify the bridge and the broker, and
    /// sent after the leaf when the device authenticates.
    pub ca_chain_pem: String,
    pub wireguard: WireguardConfig,
    /// The bridge's terminal ticket key (SPKI PEM, P-256): the device accepts terminal sessions
    /// only with tickets it signed. Absent from bridges that predate the terminal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminal_ticket_key_pem: Option<String>,
    /// Where the device polls for updates and how it authenticates, when the bridge
    /// provisions it in a hawkBit of the platform's (`[hawkbit]` in bridge.toml). Absent: the
    /// device's own `[ota]` config, or the bridge's embedded DDI server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ddi: Option<DdiAssignment>,
}

/// The DDI server a device is provisioned in (hawkBit), and its credential there. Unknown
/// fields are ignored, as in the rest of the answer: a newer bridge may add some.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DdiAssignment {
    /// `https://host[:port]` of hawkBit's DDI API (or of the TLS proxy in front of it).
    pub server_url: String,
    pub tenant: String,
    /// `target-token`: `Authorization: TargetToken <target_token>`; `certificate`: the
    /// device's client certificate, checked by hawkBit's TLS-terminating proxy.
    pub auth: DdiAssignedAuth,
    /// The target's security token in hawkBit (with `target-token`). A secret: the agent
    /// keeps it 0600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_token: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum DdiAssignedAuth {
    TargetToken,
    Certificate,
}

/// The token never appears in a log line through `{:?}`.
impl std::fmt::Debug for DdiAssignment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DdiAssignment")
            .field("server_url", &self.server_url)
            .field("tenant", &self.tenant)
            .field("auth", &self.auth)
            .field(
                "target_token",
                &self.target_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// What the device needs to bring its tunnel up. Stored as `tunnel/wireguard.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WireguardConfig {
    /// Device tunnel address with prefix, e.g. `10.8.0.2/32`.
    pub address: String,
    /// Always `null` from the bridge; the device fills in its own key locally.
    pub private_key: Option<String>,
    /// The hub's public key.
    pub peer_public_key: String,
    /// `host:port` of the hub.
    pub endpoint: String,
    /// Networks routed through the tunnel, e.g. `["10.8.0.0/24"]`.
    pub allowed_ips: Vec<String>,
    pub persistent_keepalive: Option<u16>,
}

/// Every non-2xx answer of the bridge carries this body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiError {
    /// Stable machine-readable code, see [`error_code`].
    pub error: String,
    /// Human-readable detail.
    pub message: String,
}

/// Error codes of the enrollment API and the HTTP status each comes with.
pub mod error_code {
    /// 401: missing, unknown or already used bootstrap token.
    pub const BAD_TOKEN: &str = "bad_token";
    /// 400: CSR not PEM/DER, or its signature does not verify.
    pub const BAD_CSR: &str = "bad_csr";
    /// 403: CSR subject CN differs from the device id in the path.
    pub const CN_MISMATCH: &str = "cn_mismatch";
    /// 422: CSR key is not EC P-256.
    pub const UNSUPPORTED_KEY: &str = "unsupported_key";
    /// 409: the device is enrolled with another key; a device token is needed to replace it.
    pub const KEY_CONFLICT: &str = "key_conflict";
    /// 503: no free tunnel address is left in the pool.
    pub const POOL_EXHAUSTED: &str = "pool_exhausted";
    /// 400: the device id is not `[A-Za-z0-9._-]{1,64}`.
    pub const BAD_DEVICE_ID: &str = "bad_device_id";
    /// 400: the body is not the expected JSON.
    pub const BAD_REQUEST: &str = "bad_request";
    /// 403: renew with a certificate that is not the device's current one.
    pub const CERT_NOT_CURRENT: &str = "cert_not_current";
    /// 404
    pub const NOT_FOUND: &str = "not_found";
    /// 500
    pub const INTERNAL: &str = "internal";
    /// 403: the operator's policy does not allow this action on this device.
    pub const FORBIDDEN: &str = "forbidden";
    /// 502/504: the device did not answer on its tunnel address.
    pub const DEVICE_UNREACHABLE: &str = "device_unreachable";
    /// 503: the proxy's session limit is reached.
    pub const BUSY: &str = "busy";
    /// 403: the device id was revoked; an operator must re-admit it before it enrolls again.
    pub const REVOKED: &str = "revoked";
    /// 403: the fleet token may not claim this id (reserved, or outside the allowed patterns).
    pub const ID_NOT_ALLOWED: &str = "id_not_allowed";
    /// 429: the fleet token's enrollment rate or device quota is used up.
    pub const QUOTA_EXCEEDED: &str = "quota_exceeded";
    /// 400/409: the WireGuard public key is malformed, low-order, the hub's, or another device's.
    pub const BAD_WIREGUARD_KEY: &str = "bad_wireguard_key";
    /// 413: the body is larger than this endpoint accepts.
    pub const TOO_LARGE: &str = "too_large";
    /// 426: a plain HTTP request where a WebSocket upgrade is needed.
    pub const UPGRADE_REQUIRED: &str = "upgrade_required";
    /// 502: step-ca (the configured signer) refused the bridge's token: a bridge or CA
    /// misconfiguration (provisioner name or key, clocks); the device retries later.
    pub const SIGNER_REFUSED: &str = "signer_refused";
    /// 403: step-ca refused the certificate itself (SANs, lifetime, name policy).
    pub const SIGNER_POLICY: &str = "signer_policy";
    /// 503: step-ca is unreachable, timing out or failing; the device retries later.
    pub const SIGNER_UNAVAILABLE: &str = "signer_unavailable";
    /// 502: step-ca answered with something that is not this device's certificate.
    pub const SIGNER_BAD_ANSWER: &str = "signer_bad_answer";
}

/// A device as the bridge's registry knows it (`GET /devices/{id}`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceRecord {
    pub device_id: String,
    /// Hex serial of the current certificate.
    pub certificate_serial: String,
    /// RFC 3339.
    pub certificate_not_after: String,
    pub wireguard_public_key: Option<String>,
    pub wireguard_address: String,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// RFC 3339.
    pub enrolled_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// The OTA group an operator put the device in (`metadata.group` is only what the
    /// device claims, and assigns nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// True for ids the bridge accepts: 1–64 of `[A-Za-z0-9._-]`, not starting with a dot.
pub fn is_valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids() {
        assert!(is_valid_device_id("device-0001"));
        assert!(is_valid_device_id("a.b_c-D9"));
        assert!(!is_valid_device_id(""));
        assert!(!is_valid_device_id(".."));
        assert!(!is_valid_device_id("a/b"));
        assert!(!is_valid_device_id("a b"));
        assert!(!is_valid_device_id(&"x".repeat(65)));
    }

    #[test]
    fn enroll_request_rejects_unknown_fields() {
        let r: Result<EnrollRequest, _> = serde_json::from_str(r#"{"csr_pem":"x","extra":1}"#);
        assert!(r.is_err());
    }
}
