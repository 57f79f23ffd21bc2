//! HTTP API: enrollment (bootstrap token), renewal (mTLS), device registry (admin token).

use crate::ca::Ca;
use crate::store::Store;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use rustls_pki_types::CertificateDer;
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use thingsly_proto::enroll::{
    ApiError, EnrollRequest, EnrollResponse, WireguardConfig, error_code, is_valid_device_id,
};

pub struct AppState {
    pub ca: Ca,
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
}

impl AppState {
    /// Bring the hub's peers in line with the registry now (after enroll, renew, revoke).
    fn sync_hub(&self) {
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

pub struct ApiFailure(pub StatusCode, pub &'static str, pub String);

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        let ApiFailure(status, code, message) = self;
        if status.is_server_error() {
            tracing::error!(%status, code, %message, "request failed");
        } else {
            tracing::info!(%status, code, %message, "request refused");
        }
        (
            status,
            Json(ApiError {
                error: code.to_string(),
                message,
            }),
        )
            .into_response()
    }
}

pub(crate) fn fail(status: StatusCode, code: &'static str, msg: impl Into<String>) -> ApiFailure {
    ApiFailure(status, code, msg.into())
}

fn internal(e: impl std::fmt::Display) -> ApiFailure {
    fail(
        StatusCode::INTERNAL_SERVER_ERROR,
        error_code::INTERNAL,
        e.to_string(),
    )
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/devices/{id}/enroll", post(enroll))
        .route("/devices/{id}/renew", post(renew))
        .route("/devices/{id}", get(get_device).delete(revoke_device))
        .route("/devices", get(list_devices))
        .route("/terminal", get(crate::terminal_proxy::handle))
        .merge(crate::ddi_server::router())
        .fallback(|| async {
            fail(
                StatusCode::NOT_FOUND,
                error_code::NOT_FOUND,
                "no such endpoint",
            )
        })
        .with_state(state)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

fn token_eq(a: &str, b: &str) -> bool {
    !b.is_empty() && a.as_bytes().ct_eq(b.as_bytes()).into()
}

/// A checked CSR: its CN and the DER SubjectPublicKeyInfo to certify.
struct CheckedCsr {
    spki_der: Vec<u8>,
}

fn check_csr(pem: &str, device_id: &str) -> Result<CheckedCsr, ApiFailure> {
    use x509_parser::prelude::FromDer;
    let bad = |m: String| fail(StatusCode::BAD_REQUEST, error_code::BAD_CSR, m);
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| bad(format!("csr_pem is not PEM: {e}")))?;
    if p.label != "CERTIFICATE REQUEST" {
        return Err(bad(format!(
            "csr_pem holds a {:?}, not a CERTIFICATE REQUEST",
            p.label
        )));
    }
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&p.contents)
            .map_err(|e| bad(format!("CSR does not parse: {e}")))?;
    csr.verify_signature()
        .map_err(|e| bad(format!("CSR signature does not verify: {e}")))?;
    let info = &csr.certification_request_info;
    let spki = &info.subject_pki;
    let is_p256 = spki.algorithm.algorithm == x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        && spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|oid| oid == x509_parser::oid_registry::OID_EC_P256);
    if !is_p256 {
        return Err(fail(
            StatusCode::UNPROCESSABLE_ENTITY,
            error_code::UNSUPPORTED_KEY,
            "the CSR key must be EC P-256",
        ));
    }
    let cns: Vec<&str> = info
        .subject
        .iter_common_name()
        .filter_map(|c| c.as_str().ok())
        .collect();
    if cns != [device_id] {
        return Err(fail(
            StatusCode::FORBIDDEN,
            error_code::CN_MISMATCH,
            format!("CSR subject CN {cns:?} must be exactly the device id {device_id:?}"),
        ));
    }
    Ok(CheckedCsr {
        spki_der: spki.raw.to_vec(),
    })
}

fn parse_body(
    body: Result<Json<EnrollRequest>, JsonRejection>,
) -> Result<EnrollRequest, ApiFailure> {
    body.map(|Json(b)| b).map_err(|e| {
        fail(
            StatusCode::BAD_REQUEST,
            error_code::BAD_REQUEST,
            e.body_text(),
        )
    })
}

fn check_id(id: &str) -> Result<(), ApiFailure> {
    if is_valid_device_id(id) {
        Ok(())
    } else {
        Err(fail(
            StatusCode::BAD_REQUEST,
            error_code::BAD_DEVICE_ID,
            "device id must be 1-64 of A-Z a-z 0-9 . _ -",
        ))
    }
}

/// Sign, allocate the address (kept across re-enrollment), record, and build the answer.
fn issue(
    st: &AppState,
    id: &str,
    csr: &CheckedCsr,
    wg_public_key: Option<&str>,
    metadata: &serde_json::Map<String, serde_json::Value>,
) -> Result<EnrollResponse, ApiFailure> {
    let exhausted = || {
        fail(
            StatusCode::SERVICE_UNAVAILABLE,
            error_code::POOL_EXHAUSTED,
            format!("no free tunnel address left in {}", st.pool),
        )
    };
    // Early refusal before signing; the real allocation happens atomically in `record`.
    st.store
        .address_for(id, st.pool)
        .map_err(internal)?
        .ok_or_else(exhausted)?;
    let issued = st
        .ca
        .sign_device(id, &csr.spki_der, st.device_cert_lifetime)
        .map_err(internal)?;
    let not_after = issued
        .not_after
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(internal)?;
    let address = st
        .store
        .record(
            id,
            &hex::encode(&csr.spki_der),
            &issued.serial_hex,
            &not_after,
            wg_public_key,
            st.pool,
            metadata,
        )
        .map_err(internal)?
        .ok_or_else(exhausted)?;
    st.sync_hub();
    Ok(EnrollResponse {
        certificate_pem: issued.pem,
        ca_chain_pem: st.ca.chain_pem.clone(),
        wireguard: WireguardConfig {
            address,
            private_key: None,
            peer_public_key: st.wg_public_key.clone(),
            endpoint: st.wg_endpoint.clone(),
            allowed_ips: vec![st.pool.to_string()],
            persistent_keepalive: Some(st.wg_keepalive),
        },
        terminal_ticket_key_pem: Some(st.ticket_public_pem.clone()),
    })
}

/// The body of enroll and renew, parsed and checked: the WireGuard key and the CSR.
fn checked_request(
    body: Result<Json<EnrollRequest>, JsonRejection>,
    id: &str,
) -> Result<(EnrollRequest, CheckedCsr), ApiFailure> {
    let req = parse_body(body)?;
    check_wg_key(req.wireguard_public_key.as_deref())?;
    let csr = check_csr(&req.csr_pem, id)?;
    Ok((req, csr))
}

fn check_wg_key(key: Option<&str>) -> Result<(), ApiFailure> {
    use base64::Engine;
    if let Some(k) = key {
        let ok = base64::engine::general_purpose::STANDARD
            .decode(k)
            .is_ok_and(|b| b.len() == 32);
        if !ok {
            return Err(fail(
                StatusCode::BAD_REQUEST,
                error_code::BAD_REQUEST,
                "wireguard_public_key must be 32 bytes, base64",
            ));
        }
    }
    Ok(())
}

async fn enroll(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Json<EnrollRequest>, JsonRejection>,
) -> Result<Json<EnrollResponse>, ApiFailure> {
    check_id(&id)?;
    let token = bearer(&headers).unwrap_or_default();
    let fleet = token_eq(token, &st.fleet_token);
    let device_token =
        !fleet && !token.is_empty() && st.store.device_token_valid(&id, token).map_err(internal)?;
    if !fleet && !device_token {
        return Err(fail(
            StatusCode::UNAUTHORIZED,
            error_code::BAD_TOKEN,
            "missing, unknown or used bootstrap token",
        ));
    }
    let (req, csr) = checked_request(body, &id)?;
    if let Some(existing) = st.store.get(&id).map_err(internal)? {
        // The fleet token may repeat an enrollment (an answer lost in a crash) but not hand an
        // enrolled identity to a new key: that takes a one-time token for this device.
        if fleet && existing.public_key_hex != hex::encode(&csr.spki_der) {
            return Err(fail(
                StatusCode::CONFLICT,
                error_code::KEY_CONFLICT,
                "device is enrolled with another key; re-enroll it with a one-time device token",
            ));
        }
    }
    let resp = issue(
        &st,
        &id,
        &csr,
        req.wireguard_public_key.as_deref(),
        &req.metadata,
    )?;
    if device_token {
        st.store.consume_device_token(token).map_err(internal)?;
    }
    tracing::info!(device = %id, via = if fleet { "fleet token" } else { "device token" }, address = %resp.wireguard.address, "device enrolled");
    Ok(Json(resp))
}

/// Whose a verified client certificate is, compared with device `id`.
pub enum CertCheck {
    /// `id`'s current certificate.
    Current,
    /// The CN names another device.
    OtherDevice(String),
    /// `id` is not (or no longer) enrolled.
    Unknown,
    /// `id`'s, but not its current one (renewed or re-enrolled since).
    NotCurrent,
}

/// rustls verified the chain; this checks that the certificate is `id`'s current one.
pub fn cert_device(
    st: &AppState,
    der: &CertificateDer<'static>,
    id: &str,
) -> Result<CertCheck, ApiFailure> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|_| {
        fail(
            StatusCode::UNAUTHORIZED,
            error_code::BAD_TOKEN,
            "client certificate unreadable",
        )
    })?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .unwrap_or_default();
    if cn != id {
        return Ok(CertCheck::OtherDevice(cn.to_string()));
    }
    let serial = cert.raw_serial_as_string().replace(':', "");
    Ok(match st.store.get(id).map_err(internal)? {
        None => CertCheck::Unknown,
        Some(d) if d.record.certificate_serial.eq_ignore_ascii_case(&serial) => CertCheck::Current,
        Some(_) => CertCheck::NotCurrent,
    })
}

/// For the DDI server: `Ok` when `der` is device `id`'s current certificate, else why not.
pub fn current_device_of_cert(
    st: &AppState,
    der: &CertificateDer<'static>,
    id: &str,
) -> Result<(), String> {
    match cert_device(st, der, id) {
        Ok(CertCheck::Current) => Ok(()),
        Ok(CertCheck::OtherDevice(cn)) => {
            Err(format!("client certificate is for {cn:?}, not {id:?}"))
        }
        Ok(CertCheck::Unknown) => Err(format!("{id:?} is not enrolled")),
        Ok(CertCheck::NotCurrent) => {
            Err("client certificate is not the device's current one".into())
        }
        Err(ApiFailure(_, _, m)) => Err(m),
    }
}

/// 32 random bytes, URL-safe base64: enrollment, admin and target tokens.
pub fn random_token() -> String {
    use base64::Engine;
    use rand_core::RngCore;
    let mut b = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

async fn renew(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    Extension(peer): Extension<PeerCert>,
    body: Result<Json<EnrollRequest>, JsonRejection>,
) -> Result<Json<EnrollResponse>, ApiFailure> {
    check_id(&id)?;
    let unauth = |m: &str| {
        fail(
            StatusCode::UNAUTHORIZED,
            error_code::BAD_TOKEN,
            m.to_string(),
        )
    };
    // rustls already verified the chain to our root; here we check whose it is.
    let der = peer
        .0
        .ok_or_else(|| unauth("renewal needs the device's current client certificate (mTLS)"))?;
    match cert_device(&st, &der, &id)? {
        CertCheck::Current => {}
        CertCheck::Unknown => {
            return Err(fail(
                StatusCode::NOT_FOUND,
                error_code::NOT_FOUND,
                "unknown device",
            ));
        }
        CertCheck::OtherDevice(cn) => {
            return Err(fail(
                StatusCode::FORBIDDEN,
                error_code::CN_MISMATCH,
                format!("client certificate is for {cn:?}, not {id:?}"),
            ));
        }
        CertCheck::NotCurrent => {
            return Err(fail(
                StatusCode::FORBIDDEN,
                error_code::CERT_NOT_CURRENT,
                "client certificate is not the device's current one",
            ));
        }
    }
    let (req, csr) = checked_request(body, &id)?;
    let resp = issue(
        &st,
        &id,
        &csr,
        req.wireguard_public_key.as_deref(),
        &req.metadata,
    )?;
    tracing::info!(device = %id, "certificate renewed");
    Ok(Json(resp))
}

fn check_admin(st: &AppState, headers: &HeaderMap) -> Result<(), ApiFailure> {
    if token_eq(bearer(headers).unwrap_or_default(), &st.admin_token) {
        Ok(())
    } else {
        Err(fail(
            StatusCode::UNAUTHORIZED,
            error_code::BAD_TOKEN,
            "admin token required",
        ))
    }
}

async fn get_device(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<thingsly_proto::enroll::DeviceRecord>, ApiFailure> {
    check_admin(&st, &headers)?;
    st.store
        .get(&id)
        .map_err(internal)?
        .map(|d| Json(d.record))
        .ok_or_else(|| {
            fail(
                StatusCode::NOT_FOUND,
                error_code::NOT_FOUND,
                "unknown device",
            )
        })
}

/// `DELETE /devices/{id}` (admin): revoke. The tunnel peer is removed at once; the address
/// returns to the pool; renewal is refused from now on. The certificate itself stays valid
/// until it expires (no CRL): keep `device_cert_lifetime` short.
async fn revoke_device(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiFailure> {
    check_admin(&st, &headers)?;
    if !st.store.delete(&id).map_err(internal)? {
        return Err(fail(
            StatusCode::NOT_FOUND,
            error_code::NOT_FOUND,
            "unknown device",
        ));
    }
    st.sync_hub();
    tracing::info!(target: "audit", device = %id, "device revoked");
    Ok(StatusCode::NO_CONTENT)
}

async fn list_devices(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Vec<thingsly_proto::enroll::DeviceRecord>>, ApiFailure> {
    check_admin(&st, &headers)?;
    Ok(Json(st.store.list().map_err(internal)?))
}
