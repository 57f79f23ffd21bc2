//! Who is asking, decided from the request head before a byte of the body is read: each
//! credential is an extractor (`FromRequestParts`), and axum runs those before the body
//! extractor, so an unauthenticated client is answered without the bridge buffering what it
//! sends. Schemes are compared case-insensitively (RFC 7235 §2.1) everywhere.

use crate::error::{ApiFailure, fail};
use crate::state::{AppState, PeerCert};
use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use std::sync::Arc;
use subtle::ConstantTimeEq;
use thingsly_proto::enroll::{error_code, is_valid_device_id};

/// The credentials of `Authorization: <scheme> <credentials>`, scheme case-insensitive.
pub fn authorization<'a>(headers: &'a HeaderMap, scheme: &str) -> Option<&'a str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (s, rest) = v.split_once(' ')?;
    s.eq_ignore_ascii_case(scheme).then(|| rest.trim())
}

pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    authorization(headers, "Bearer")
}

/// Constant-time equality; an empty expected value never matches (a feature switched off).
pub fn token_eq(given: &str, expected: &str) -> bool {
    !expected.is_empty() && given.as_bytes().ct_eq(expected.as_bytes()).into()
}

pub fn is_admin(st: &AppState, headers: &HeaderMap) -> bool {
    token_eq(bearer(headers).unwrap_or_default(), &st.admin_token)
}

fn unauthorized(msg: &str) -> ApiFailure {
    fail(StatusCode::UNAUTHORIZED, error_code::BAD_TOKEN, msg)
}

async fn device_id(parts: &mut Parts, st: &Arc<AppState>) -> Result<String, ApiFailure> {
    let Path(id) = Path::<String>::from_request_parts(parts, st)
        .await
        .map_err(|_| {
            fail(
                StatusCode::BAD_REQUEST,
                error_code::BAD_DEVICE_ID,
                "no device id",
            )
        })?;
    if is_valid_device_id(&id) {
        Ok(id)
    } else {
        Err(fail(
            StatusCode::BAD_REQUEST,
            error_code::BAD_DEVICE_ID,
            "device id must be 1-64 of A-Z a-z 0-9 . _ -",
        ))
    }
}

/// The operator's admin token.
pub struct Admin;

impl FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = ApiFailure;
    async fn from_request_parts(
        parts: &mut Parts,
        st: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        if is_admin(st, &parts.headers) {
            Ok(Admin)
        } else {
            Err(unauthorized("admin token required"))
        }
    }
}

/// How an enrollment is authorized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    Fleet,
    /// A one-time token for this id (still unused when checked; claimed atomically later).
    DeviceToken(String),
}

/// `POST /devices/{id}/enroll`: a valid id and a bootstrap token that may enroll it.
pub struct Enroller {
    pub id: String,
    pub via: Via,
}

impl FromRequestParts<Arc<AppState>> for Enroller {
    type Rejection = ApiFailure;
    async fn from_request_parts(
        parts: &mut Parts,
        st: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let id = device_id(parts, st).await?;
        let token = bearer(&parts.headers).unwrap_or_default();
        let via = if token_eq(token, &st.fleet_token) {
            Via::Fleet
        } else if !token.is_empty() && st.store.device_token_valid(&id, token)? {
            Via::DeviceToken(token.to_string())
        } else {
            return Err(unauthorized("missing, unknown or used bootstrap token"));
        };
        if let Some(when) = st.store.revoked_at(&id)? {
            return Err(fail(
                StatusCode::FORBIDDEN,
                error_code::REVOKED,
                format!(
                    "{id:?} was revoked at {when}; an operator must re-admit it (thingsly-bridge admit)"
                ),
            ));
        }
        if via == Via::Fleet
            && let Some(why) = st.enrollment.fleet_refuses(&id)
        {
            return Err(fail(StatusCode::FORBIDDEN, error_code::ID_NOT_ALLOWED, why));
        }
        Ok(Enroller { id, via })
    }
}

/// `POST /devices/{id}/renew`: the device's current certificate (mTLS).
pub struct RenewingDevice {
    pub id: String,
}

impl FromRequestParts<Arc<AppState>> for RenewingDevice {
    type Rejection = ApiFailure;
    async fn from_request_parts(
        parts: &mut Parts,
        st: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        use crate::api::CertCheck;
        let id = device_id(parts, st).await?;
        let der = parts
            .extensions
            .get::<PeerCert>()
            .and_then(|p| p.0.clone())
            .ok_or_else(|| {
                unauthorized("renewal needs the device's current client certificate (mTLS)")
            })?;
        // rustls already verified the chain to our root; here we check whose it is.
        match crate::api::cert_device(st, &der, &id)? {
            CertCheck::Current => Ok(RenewingDevice { id }),
            CertCheck::Unknown => Err(fail(
                StatusCode::NOT_FOUND,
                error_code::NOT_FOUND,
                "unknown device",
            )),
            CertCheck::OtherDevice(cn) => Err(fail(
                StatusCode::FORBIDDEN,
                error_code::CN_MISMATCH,
                format!("client certificate is for {cn:?}, not {id:?}"),
            )),
            CertCheck::NotCurrent => Err(fail(
                StatusCode::FORBIDDEN,
                error_code::CERT_NOT_CURRENT,
                "client certificate is not the device's current one",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_are_case_insensitive_and_credentials_exact() {
        let mut h = HeaderMap::new();
        for v in ["Bearer abc", "bearer abc", "BEARER  abc "] {
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
            assert_eq!(bearer(&h), Some("abc"), "{v}");
        }
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearerabc".parse().unwrap());
        assert_eq!(bearer(&h), None);
        assert!(!token_eq("", ""), "a feature switched off never matches");
        assert!(token_eq("t", "t") && !token_eq("t", "u"));
    }
}
