//! The one error type of the bridge's own API (enrollment, registry, terminal proxy): a status,
//! a stable code from [`error_code`] and a message for the client. Internal failures keep
//! their detail in the log and send the client only an incident number, never a library's
//! message (paths, SQL, parser internals).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use std::sync::atomic::{AtomicU64, Ordering};
use thingsly_proto::enroll::{ApiError, error_code};

#[derive(Debug)]
pub struct ApiFailure(pub StatusCode, pub &'static str, pub String);

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        let ApiFailure(status, code, message) = self;
        tracing::info!(%status, code, %message, "request refused");
        let body = Json(ApiError {
            error: code.to_string(),
            message,
        });
        match retry_after(code) {
            Some(secs) => (
                status,
                [(axum::http::header::RETRY_AFTER, secs.to_string())],
                body,
            )
                .into_response(),
            None => (status, body).into_response(),
        }
    }
}

/// `Retry-After` (seconds) for the refusals that pass by themselves: the fleet quota's window
/// is a minute; step-ca is given a moment to come back. Devices wait at least this long.
pub fn retry_after(code: &str) -> Option<u64> {
    match code {
        thingsly_proto::enroll::error_code::QUOTA_EXCEEDED => Some(60),
        thingsly_proto::enroll::error_code::SIGNER_UNAVAILABLE => Some(15),
        _ => None,
    }
}

pub fn fail(status: StatusCode, code: &'static str, msg: impl Into<String>) -> ApiFailure {
    ApiFailure(status, code, msg.into())
}

static INCIDENT: AtomicU64 = AtomicU64::new(1);

/// A failure of ours: the detail goes to the log under a number the client is given.
pub fn internal(e: impl std::fmt::Display) -> ApiFailure {
    let n = INCIDENT.fetch_add(1, Ordering::Relaxed);
    tracing::error!(incident = n, error = %e, "request failed");
    fail(
        StatusCode::INTERNAL_SERVER_ERROR,
        error_code::INTERNAL,
        format!("internal error (incident {n} in the bridge's log)"),
    )
}

impl From<anyhow::Error> for ApiFailure {
    fn from(e: anyhow::Error) -> Self {
        internal(format!("{e:#}"))
    }
}

impl From<rusqlite::Error> for ApiFailure {
    fn from(e: rusqlite::Error) -> Self {
        internal(e)
    }
}
