//! `POST /webhooks/thingsboard/connect/{device}`: ThingsBoard's rule engine (a REST API Call
//! node on the device's Connect Event, `thingsboard/rule-chain-connect-webhook.json`) tells
//! the bridge a device connected. The bridge records the connect and, with `[hawkbit]`,
//! queues the device's target in hawkBit, then answers at once (202): the hawkBit call
//! happens in the background and is retried until it succeeds.
//!
//! The caller proves itself with the shared secret in `X-Thingsly-Webhook-Secret` (compared
//! in constant time) before a byte of the body is read; the body (ThingsBoard's message data,
//! a JSON object) is at most [`WEBHOOK_BODY_LIMIT`] bytes. Only enrolled devices are taken.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use std::sync::Arc;
use thingsly_proto::enroll::{error_code, is_valid_device_id};

use crate::auth::token_eq;
use crate::error::{ApiFailure, fail};
use crate::state::AppState;

pub const WEBHOOK_BODY_LIMIT: usize = 8 * 1024;
pub const SECRET_HEADER: &str = "x-thingsly-webhook-secret";
/// Optional headers the rule chain fills from the message's metadata.
const DEVICE_TYPE_HEADER: &str = "x-thingsboard-device-type";
const DEVICE_LABEL_HEADER: &str = "x-thingsboard-device-label";

/// ThingsBoard, by the shared secret.
pub struct ThingsboardCaller;

impl FromRequestParts<Arc<AppState>> for ThingsboardCaller {
    type Rejection = ApiFailure;
    async fn from_request_parts(
        parts: &mut Parts,
        st: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        if st.webhook_secret.is_empty() {
            return Err(fail(
                StatusCode::NOT_FOUND,
                error_code::NOT_FOUND,
                "no webhook here ([thingsboard] is not configured)",
            ));
        }
        let given = parts
            .headers
            .get(SECRET_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if token_eq(given, &st.webhook_secret) {
            Ok(Self)
        } else {
            Err(fail(
                StatusCode::UNAUTHORIZED,
                error_code::BAD_TOKEN,
                "missing or wrong X-Thingsly-Webhook-Secret",
            ))
        }
    }
}

/// A header's value when it is short printable text (it is stored and shown to operators).
fn header_text(h: &HeaderMap, name: &str) -> Option<String> {
    let v = h.get(name)?.to_str().ok()?.trim();
    (!v.is_empty() && v.len() <= 128 && v.chars().all(|c| !c.is_control())).then(|| v.to_string())
}

pub async fn connect(
    State(st): State<Arc<AppState>>,
    _: ThingsboardCaller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiFailure> {
    if !is_valid_device_id(&id) {
        return Err(fail(
            StatusCode::BAD_REQUEST,
            error_code::BAD_DEVICE_ID,
            "device id must be 1-64 of A-Z a-z 0-9 . _ -",
        ));
    }
    let data = match body {
        Ok(Json(v)) if v.is_object() => v,
        Ok(_) => {
            return Err(fail(
                StatusCode::BAD_REQUEST,
                error_code::BAD_REQUEST,
                "the body must be a JSON object (the Connect Event's message data)",
            ));
        }
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return Err(fail(
                StatusCode::PAYLOAD_TOO_LARGE,
                error_code::TOO_LARGE,
                format!("the body must be at most {WEBHOOK_BODY_LIMIT} bytes"),
            ));
        }
        Err(e) => {
            return Err(fail(
                StatusCode::BAD_REQUEST,
                error_code::BAD_REQUEST,
                e.body_text(),
            ));
        }
    };
    if st.store.get(&id)?.is_none() {
        return Err(fail(
            StatusCode::NOT_FOUND,
            error_code::NOT_FOUND,
            "not a device this bridge enrolled",
        ));
    }
    let mut metadata = serde_json::json!({ "data": data });
    for (key, header) in [
        ("deviceType", DEVICE_TYPE_HEADER),
        ("deviceLabel", DEVICE_LABEL_HEADER),
    ] {
        if let Some(v) = header_text(&headers, header) {
            metadata[key] = v.into();
        }
    }
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let queued = st.store.record_connect(
        &id,
        &metadata,
        now,
        st.hawkbit.is_some(),
        st.hawkbit
            .as_ref()
            .map(|h| h.settings.resync_after.as_secs() as i64)
            .unwrap_or(0),
    )?;
    let provisioning = match &st.hawkbit {
        None => "off",
        Some(h) if queued => {
            h.wake.notify_one();
            "queued"
        }
        Some(_) => "current",
    };
    tracing::info!(target: "audit", device = %id, provisioning, "device connected (ThingsBoard)");
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "device_id": id, "provisioning": provisioning })),
    ))
}
