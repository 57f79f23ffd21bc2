//! HTTP API: enrollment (bootstrap token), renewal (mTLS), device registry (admin token).

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use rustls_pki_types::CertificateDer;
use std::sync::Arc;
use thingsly_proto::enroll::{EnrollRequest, EnrollResponse, WireguardConfig, error_code};

use crate::auth::{Admin, Enroller, RenewingDevice, Via};
use crate::error::internal;
pub use crate::error::{ApiFailure, fail};
pub use crate::state::{AppState, PeerCert};

/// Enroll and renew carry a CSR, a key and a little metadata: a few KiB.
pub const ENROLL_BODY_LIMIT: usize = 16 * 1024;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/devices/{id}/enroll", post(enroll))
        .route("/devices/{id}/renew", post(renew))
        .route_layer(DefaultBodyLimit::max(ENROLL_BODY_LIMIT))
        .route(
            "/webhooks/thingsboard/connect/{id}",
            post(crate::connect_webhook::connect).route_layer(DefaultBodyLimit::max(
                crate::connect_webhook::WEBHOOK_BODY_LIMIT,
            )),
        )
        .route("/devices/{id}", get(get_device).delete(revoke_device))
        .route("/devices/{id}/admit", post(admit_device))
        .route("/devices/{id}/group", axum::routing::put(set_group))
        .route("/devices", get(list_devices))
        .route("/crl.pem", get(crl))
        .route("/terminal", get(crate::terminal_proxy::handle))
        .route("/terminal/", get(crate::terminal_page::page))
        .route("/terminal/terminal.js", get(crate::terminal_page::page_js))
        .route("/terminal/xterm.mjs", get(crate::terminal_page::xterm_js))
        .route("/terminal/xterm.css", get(crate::terminal_page::xterm_css))
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

/// A checked CSR: the DER SubjectPublicKeyInfo to certify.
struct CheckedCsr {
    spki_der: Vec<u8>,
    /// As the device sent it: what step-ca is given.
    pem: String,
}

fn check_csr(pem: &str, device_id: &str) -> Result<CheckedCsr, ApiFailure> {
    use x509_parser::prelude::FromDer;
    let bad = |m: &str| fail(StatusCode::BAD_REQUEST, error_code::BAD_CSR, m);
    let (rest, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|_| bad("csr_pem is not one PEM block"))?;
    if !String::from_utf8_lossy(rest).trim().is_empty() {
        return Err(bad("csr_pem holds more than one PEM block"));
    }
    if p.label != "CERTIFICATE REQUEST" {
        return Err(bad("csr_pem must be a CERTIFICATE REQUEST block"));
    }
    let (trailing, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&p.contents)
            .map_err(|_| bad("the CSR is not valid DER (PKCS#10)"))?;
    if !trailing.is_empty() {
        return Err(bad("the CSR has bytes after its DER encoding"));
    }
    csr.verify_signature()
        .map_err(|_| bad("the CSR's signature does not verify"))?;
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
        pem: pem.to_string(),
    })
}

fn parse_body(
    body: Result<Json<EnrollRequest>, JsonRejection>,
) -> Result<EnrollRequest, ApiFailure> {
    body.map(|Json(b)| b).map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            fail(
                StatusCode::PAYLOAD_TOO_LARGE,
                error_code::TOO_LARGE,
                format!("the body must be at most {ENROLL_BODY_LIMIT} bytes"),
            )
        } else {
            fail(
                StatusCode::BAD_REQUEST,
                error_code::BAD_REQUEST,
                e.body_text(),
            )
        }
    })
}

/// Sign, allocate the address (kept across re-enrollment), record, publish the CRL (the
/// certificate this one replaces is on it), and build the answer. A signer's refusal
/// records nothing.
async fn issue(
    st: &AppState,
    id: &str,
    csr: &CheckedCsr,
    wg_public_key: Option<&str>,
    metadata: &serde_json::Map<String, serde_json::Value>,
    via: &str,
) -> Result<EnrollResponse, ApiFailure> {
    let exhausted = || {
        fail(
            StatusCode::SERVICE_UNAVAILABLE,
            error_code::POOL_EXHAUSTED,
            format!("no free tunnel address left in {}", st.pool),
        )
    };
    // Early refusal before signing; the real allocation happens atomically in `record`.
    st.store.address_for(id, st.pool)?.ok_or_else(exhausted)?;
    let signed = st
        .signer
        .sign(&st.ca, id, &csr.pem, &csr.spki_der, st.device_cert_lifetime)
        .await?;
    let issued = signed.issued;
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
            via,
        )?
        .ok_or_else(exhausted)?;
    st.sync_hub();
    publish_crl(st);
    let ddi = match &st.hawkbit {
        Some(h) => Some(h.assignment(&st.store, id)?),
        None => None,
    };
    Ok(EnrollResponse {
        certificate_pem: issued.pem,
        ca_chain_pem: signed.chain_pem,
        wireguard: WireguardConfig {
            address,
            private_key: None,
            peer_public_key: st.wg_public_key.clone(),
            endpoint: st.wg_endpoint.clone(),
            allowed_ips: vec![st.pool.to_string()],
            persistent_keepalive: Some(st.wg_keepalive),
        },
        terminal_ticket_key_pem: Some(st.ticket_public_pem.clone()),
        ddi,
    })
}

/// How long a published CRL is good for; the bridge writes a new one well before (at start,
/// on every revocation and renewal, and daily).
pub const CRL_VALIDITY: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// Write the CRL of `store`'s revoked and superseded certificates to `path` (atomically).
/// Returns how many certificates it lists.
pub fn write_crl(
    store: &crate::store::Store,
    ca: &crate::ca::Ca,
    path: &std::path::Path,
) -> anyhow::Result<usize> {
    let (entries, number) = store.crl_entries()?;
    let pem = ca.crl_pem(&entries, number, CRL_VALIDITY)?;
    crate::ca::write_file(path, pem.as_bytes(), 0o644)?;
    Ok(entries.len())
}

/// [`write_crl`] for the running bridge; a failure is logged and retried by the next change
/// or the daily refresh.
pub fn publish_crl(st: &AppState) {
    match write_crl(&st.store, &st.ca, &st.crl_path) {
        Ok(n) => tracing::debug!(path = %st.crl_path.display(), revoked = n, "CRL published"),
        Err(e) => {
            tracing::error!(path = %st.crl_path.display(), error = %format!("{e:#}"), "CRL not published")
        }
    }
}

/// The body of enroll and renew, parsed and checked: the WireGuard key and the CSR.
fn checked_request(
    st: &AppState,
    body: Result<Json<EnrollRequest>, JsonRejection>,
    id: &str,
) -> Result<(EnrollRequest, CheckedCsr), ApiFailure> {
    let req = parse_body(body)?;
    if let Some(k) = req.wireguard_public_key.as_deref() {
        check_wg_key(k, &st.wg_public_key)
            .map_err(|why| fail(StatusCode::BAD_REQUEST, error_code::BAD_WIREGUARD_KEY, why))?;
        if let Some(other) = st.store.wg_key_holder(k, id)? {
            tracing::warn!(target: "audit", device = %id, holder = %other, "WireGuard key of another device refused");
            return Err(fail(
                StatusCode::CONFLICT,
                error_code::BAD_WIREGUARD_KEY,
                "this WireGuard public key belongs to another device",
            ));
        }
    }
    let csr = check_csr(&req.csr_pem, id)?;
    Ok((req, csr))
}

/// A WireGuard public key a device may use: 32 bytes of base64, not the hub's own, and not
/// a low-order point (with one of those, the shared secret is predictable: all zero).
pub fn check_wg_key(key: &str, hub_key: &str) -> Result<(), &'static str> {
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(key)
        .map_err(|_| "wireguard_public_key must be 32 bytes, base64")?;
    let bytes: [u8; 32] = raw
        .try_into()
        .map_err(|_| "wireguard_public_key must be 32 bytes, base64")?;
    if key == hub_key {
        return Err("wireguard_public_key is the hub's own key");
    }
    // A contributory exchange with a random secret is impossible exactly for the low-order
    // points (RFC 7748 §6.1: the all-zero output check).
    let probe = x25519_dalek::StaticSecret::random_from_rng(rand_core::OsRng);
    if !probe
        .diffie_hellman(&x25519_dalek::PublicKey::from(bytes))
        .was_contributory()
    {
        return Err("wireguard_public_key is a low-order point");
    }
    Ok(())
}

/// The fleet token's quotas: new identities per minute, devices held at once.
fn fleet_quota(st: &AppState, id: &str) -> Result<(), ApiFailure> {
    let e = &st.enrollment;
    if st.store.get(id)?.is_some() {
        return Ok(()); // a repeat of an enrollment creates nothing
    }
    if e.fleet_max_devices > 0 && st.store.fleet_devices()? >= e.fleet_max_devices {
        return Err(fail(
            StatusCode::TOO_MANY_REQUESTS,
            error_code::QUOTA_EXCEEDED,
            format!(
                "the fleet token holds its {} devices (enrollment.fleet_max_devices)",
                e.fleet_max_devices
            ),
        ));
    }
    if !st.fleet_rate.try_take(std::time::Instant::now()) {
        return Err(fail(
            StatusCode::TOO_MANY_REQUESTS,
            error_code::QUOTA_EXCEEDED,
            format!(
                "the fleet token enrolled {} new devices in the last minute (enrollment.fleet_enrollments_per_minute)",
                e.fleet_enrollments_per_minute
            ),
        ));
    }
    Ok(())
}

async fn enroll(
    State(st): State<Arc<AppState>>,
    who: Enroller,
    body: Result<Json<EnrollRequest>, JsonRejection>,
) -> Result<Json<EnrollResponse>, ApiFailure> {
    let id = who.id.as_str();
    let (req, csr) = checked_request(&st, body, id)?;
    if who.via == Via::Fleet {
        if let Some(existing) = st.store.get(id)? {
            // The fleet token may repeat an enrollment (an answer lost in a crash) but not hand
            // an enrolled identity to a new key: that takes a one-time token for this device.
            if existing.public_key_hex != hex::encode(&csr.spki_der) {
                return Err(fail(
                    StatusCode::CONFLICT,
                    error_code::KEY_CONFLICT,
                    "device is enrolled with another key; re-enroll it with a one-time device token",
                ));
            }
        }
        fleet_quota(&st, id)?;
    }
    // A one-time token is claimed before anything is issued: of concurrent requests with the
    // same token exactly one gets past here.
    if let Via::DeviceToken(t) = &who.via
        && !st.store.claim_device_token(id, t)?
    {
        return Err(fail(
            StatusCode::UNAUTHORIZED,
            error_code::BAD_TOKEN,
            "missing, unknown or used bootstrap token",
        ));
    }
    let via = match who.via {
        Via::Fleet => "fleet",
        Via::DeviceToken(_) => "device-token",
    };
    let resp = issue(
        &st,
        id,
        &csr,
        req.wireguard_public_key.as_deref(),
        &req.metadata,
        via,
    )
    .await;
    let resp = match (resp, &who.via) {
        (Ok(r), _) => r,
        (Err(e), Via::DeviceToken(t)) => {
            // Nothing was issued: the operator's token stays good for another try.
            st.store.release_device_token(t)?;
            return Err(e);
        }
        (Err(e), Via::Fleet) => return Err(e),
    };
    tracing::info!(target: "audit", device = %id, via, address = %resp.wireguard.address, "device enrolled");
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
    who: RenewingDevice,
    body: Result<Json<EnrollRequest>, JsonRejection>,
) -> Result<Json<EnrollResponse>, ApiFailure> {
    let id = who.id.as_str();
    let (req, csr) = checked_request(&st, body, id)?;
    // `via` is recorded only when a row is created, which a renewal never does.
    let via = "fleet";
    let resp = issue(
        &st,
        id,
        &csr,
        req.wireguard_public_key.as_deref(),
        &req.metadata,
        via,
    )
    .await?;
    tracing::info!(target: "audit", device = %id, "certificate renewed");
    Ok(Json(resp))
}

/// `GET /devices/{id}` (admin): the registry row, plus the device's connects as ThingsBoard
/// reported them and its hawkBit provisioning (`connection`, `hawkbit`) where there are any.
async fn get_device(
    State(st): State<Arc<AppState>>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiFailure> {
    let d = st.store.get(&id)?.ok_or_else(|| {
        fail(
            StatusCode::NOT_FOUND,
            error_code::NOT_FOUND,
            "unknown device",
        )
    })?;
    let mut v = serde_json::to_value(d.record).map_err(internal)?;
    if let Some(c) = st.store.connect_info(&id)? {
        v["connection"] = serde_json::to_value(c).map_err(internal)?;
    }
    if let Some(h) = st.store.hawkbit_state(&id)? {
        v["hawkbit"] = serde_json::to_value(h).map_err(internal)?;
    }
    Ok(Json(v))
}

/// `DELETE /devices/{id}` (admin): revoke. The tunnel peer is removed at once; the address
/// returns to the pool; renewal is refused; the certificate goes on the CRL (the broker's
/// `crlfile`); enrollment of this id is refused until `POST /devices/{id}/admit`.
async fn revoke_device(
    State(st): State<Arc<AppState>>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiFailure> {
    if !st.store.delete(&id)? {
        return Err(fail(
            StatusCode::NOT_FOUND,
            error_code::NOT_FOUND,
            "unknown device",
        ));
    }
    st.sync_hub();
    publish_crl(&st);
    tracing::info!(target: "audit", device = %id, "device revoked");
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /devices/{id}/admit` (admin): a revoked id may enroll again (with a bootstrap
/// token, as any new device).
async fn admit_device(
    State(st): State<Arc<AppState>>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiFailure> {
    if !st.store.admit(&id)? {
        return Err(fail(
            StatusCode::NOT_FOUND,
            error_code::NOT_FOUND,
            "this id is not revoked",
        ));
    }
    tracing::info!(target: "audit", device = %id, "revoked device re-admitted");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupBody {
    group: Option<String>,
}

/// `PUT /devices/{id}/group` (admin) `{"group": "line-3"}` or `{"group": null}`: the OTA group
/// `ota assign --group` reaches. Only operators set it.
async fn set_group(
    State(st): State<Arc<AppState>>,
    _: Admin,
    Path(id): Path<String>,
    body: Result<Json<GroupBody>, JsonRejection>,
) -> Result<StatusCode, ApiFailure> {
    let Json(b) = body.map_err(|e| {
        fail(
            StatusCode::BAD_REQUEST,
            error_code::BAD_REQUEST,
            e.body_text(),
        )
    })?;
    if let Some(g) = &b.group {
        crate::store::Store::check_group_name(g)
            .map_err(|m| fail(StatusCode::BAD_REQUEST, error_code::BAD_REQUEST, m))?;
    }
    if !st.store.set_group(&id, b.group.as_deref())? {
        return Err(fail(
            StatusCode::NOT_FOUND,
            error_code::NOT_FOUND,
            "unknown device",
        ));
    }
    tracing::info!(target: "audit", device = %id, group = ?b.group, "device group set");
    Ok(StatusCode::NO_CONTENT)
}

async fn list_devices(
    State(st): State<Arc<AppState>>,
    _: Admin,
) -> Result<Json<Vec<thingsly_proto::enroll::DeviceRecord>>, ApiFailure> {
    Ok(Json(st.store.list()?))
}

/// `GET /crl.pem`: the CRL the broker should load (public, as CRLs are).
async fn crl(State(st): State<Arc<AppState>>) -> Result<impl IntoResponse, ApiFailure> {
    let pem = std::fs::read(&st.crl_path).map_err(internal)?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/pkix-crl")],
        pem,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wireguard_keys_low_order_and_the_hubs_are_refused() {
        use base64::Engine;
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let good = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::random_from_rng(
            rand_core::OsRng,
        ));
        let hub = b64(&[9u8; 32]);
        assert_eq!(check_wg_key(&b64(good.as_bytes()), &hub), Ok(()));
        assert!(check_wg_key(&hub, &hub).unwrap_err().contains("hub"));
        // RFC 7748 / libsodium's blocklist: 0, 1, and the order-8 points.
        let mut one = [0u8; 32];
        one[0] = 1;
        let order8 =
            hex::decode("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")
                .unwrap();
        for k in [&[0u8; 32][..], &one, &order8] {
            assert!(
                check_wg_key(&b64(k), &hub)
                    .unwrap_err()
                    .contains("low-order")
            );
        }
        assert!(check_wg_key("short", &hub).is_err());
        assert!(check_wg_key(&b64(&[1u8; 31]), &hub).is_err());
    }
}
