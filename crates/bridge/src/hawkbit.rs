//! Provisioning devices in a hawkBit of the platform's through its Management API
//! (`[hawkbit]`): on a device's connect (ThingsBoard's webhook, `connect_webhook.rs`) its
//! target is created, or updated when it exists (hawkBit answers 409 to a second create),
//! with controllerId = device id, the device's token and its group as a tag or a target type.
//! Jobs live in the registry (`provision_store.rs`) and are retried with backoff until
//! hawkBit takes them; nothing is lost across a restart.
//!
//! Requests follow hawkBit's own OpenAPI document (`tests/fixtures/hawkbit-mgmt/`), which the
//! test server checks every request against.

use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;
use thingsly_proto::enroll::{DdiAssignedAuth, DdiAssignment};
use tokio_util::sync::CancellationToken;

use crate::config::{GroupAs, HawkbitSection};
use crate::store::Store;

/// A Management API answer is a page of entities at most; bounded before parsing.
const MAX_ANSWER: usize = 1024 * 1024;
/// Jobs taken per round; the rest wait for the next.
const BATCH: usize = 16;
/// Retries back off from 5 s to 10 min.
const RETRY_BASE: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(600);

pub struct Hawkbit {
    pub settings: HawkbitSection,
    mgmt: MgmtClient,
    /// Woken by the webhook when it queues a job.
    pub wake: tokio::sync::Notify,
}

/// Why a Management API call did not do its job. Every kind is retried (an operator fixing
/// hawkBit's users or types needs no resend); the kind says what to look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MgmtError {
    /// Transport error, timeout, 429 or 5xx: hawkBit is down or busy.
    Unavailable(String),
    /// 401/403: the bridge's user or its permissions.
    Unauthorized(String),
    /// Any other refusal (400, 404 of a target type ...), or an answer that is not hawkBit's.
    Refused(String),
}

impl std::fmt::Display for MgmtError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unavailable(m) => write!(f, "hawkBit unavailable: {m}"),
            Self::Unauthorized(m) => write!(f, "hawkBit refused the bridge's user: {m}"),
            Self::Refused(m) => write!(f, "hawkBit refused: {m}"),
        }
    }
}

/// What a non-2xx status means for the job.
pub fn classify(status: u16, body: &[u8]) -> MgmtError {
    // hawkBit's ExceptionInfo: {"exceptionClass","errorCode","message"}.
    let msg = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("errorCode")
                .or(v.get("message"))
                .and_then(|m| m.as_str().map(String::from))
        })
        .unwrap_or_default();
    let msg: String = format!("HTTP {status} {msg}")
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(200)
        .collect();
    match status {
        401 | 403 => MgmtError::Unauthorized(msg),
        429 | 500..=599 => MgmtError::Unavailable(msg),
        _ => MgmtError::Refused(msg),
    }
}

/// The body of `POST /rest/v1/targets` (one element) and of `PUT /rest/v1/targets/{id}`:
/// `MgmtTargetRequestBody` of hawkBit's OpenAPI document.
pub fn target_body(
    device_id: &str,
    token: Option<&str>,
    target_type: Option<i64>,
    device_type: Option<&str>,
) -> serde_json::Value {
    let mut b = serde_json::json!({
        "controllerId": device_id,
        "name": device_id,
        "description": match device_type {
            Some(t) => format!("provisioned by thingsly-bridge (ThingsBoard device type {t})"),
            None => "provisioned by thingsly-bridge".to_string(),
        },
    });
    if let Some(t) = token {
        b["securityToken"] = t.into();
    }
    if let Some(id) = target_type {
        b["targetType"] = id.into();
    }
    b
}

struct MgmtClient {
    base: String,
    http: reqwest::Client,
    username: String,
    password: String,
}

impl MgmtClient {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, serde_json::Value), MgmtError> {
        let unavailable =
            |e: reqwest::Error| MgmtError::Unavailable(thingsly_core::error_chain(&e));
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .basic_auth(&self.username, Some(&self.password))
            .header(reqwest::header::ACCEPT, "application/hal+json");
        if let Some(b) = body {
            req = req.json(b);
        }
        let mut resp = req.send().await.map_err(unavailable)?;
        let status = resp.status().as_u16();
        let mut bytes = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(unavailable)? {
            bytes.extend_from_slice(&chunk);
            if bytes.len() > MAX_ANSWER {
                return Err(MgmtError::Refused(format!(
                    "answer over {MAX_ANSWER} bytes"
                )));
            }
        }
        if !(200..300).contains(&status) && status != 409 {
            return Err(classify(status, &bytes));
        }
        let v = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .map_err(|e| MgmtError::Refused(format!("answer is not JSON: {e}")))?
        };
        Ok((status, v))
    }

    /// The id of the entity named `name` in a paged list (`GET <path>?q=name==<name>`).
    async fn id_by_name(&self, path: &str, name: &str) -> Result<Option<i64>, MgmtError> {
        // Group names are [A-Za-z0-9._-]: nothing in them needs FIQL quoting.
        let q: String = url_query(&[("q", &format!("name=={name}")), ("limit", "2")]);
        let (_, v) = self
            .call(reqwest::Method::GET, &format!("{path}?{q}"), None)
            .await?;
        Ok(v["content"]
            .as_array()
            .and_then(|c| c.iter().find(|e| e["name"] == name))
            .and_then(|e| e["id"].as_i64()))
    }
}

fn url_query(pairs: &[(&str, &str)]) -> String {
    serde_urlencoded::to_string(pairs).unwrap_or_default()
}

impl Hawkbit {
    pub fn from_config(h: &HawkbitSection) -> anyhow::Result<Self> {
        let ca = std::fs::read(&h.mgmt_ca)
            .with_context(|| format!("hawkbit.mgmt_ca {}", h.mgmt_ca.display()))?;
        let tls = thingsly_enroll::client_config(&ca, None)
            .map_err(|e| anyhow::anyhow!("hawkbit.mgmt_ca {}: {e}", h.mgmt_ca.display()))?;
        let password = std::fs::read_to_string(&h.password_file)
            .with_context(|| format!("hawkbit.password_file {}", h.password_file.display()))?
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .https_only(true)
            .timeout(h.timeout)
            .connect_timeout(h.timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("thingsly-bridge/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            settings: h.clone(),
            mgmt: MgmtClient {
                base: h.mgmt_url.clone(),
                http,
                username: h.username.clone(),
                password,
            },
            wake: tokio::sync::Notify::new(),
        })
    }

    /// What an enrollment or renewal answer tells the device (its token made on first use).
    pub fn assignment(&self, store: &Store, device_id: &str) -> anyhow::Result<DdiAssignment> {
        let s = &self.settings;
        let target_token = match s.device_auth {
            DdiAssignedAuth::TargetToken => store.hawkbit_token(device_id, true)?,
            DdiAssignedAuth::Certificate => None,
        };
        Ok(DdiAssignment {
            server_url: s.ddi_url.clone(),
            tenant: s.tenant.clone(),
            auth: s.device_auth,
            target_token,
        })
    }

    /// Create the target, or update it when hawkBit already has it; then its tag.
    pub async fn provision(
        &self,
        device_id: &str,
        token: Option<&str>,
        group: Option<&str>,
        device_type: Option<&str>,
    ) -> Result<&'static str, MgmtError> {
        use reqwest::Method;
        let target_type = match (self.settings.group_as, group) {
            (GroupAs::Type, Some(g)) => Some(
                self.mgmt
                    .id_by_name("/rest/v1/targettypes", g)
                    .await?
                    .ok_or_else(|| {
                        MgmtError::Refused(format!("hawkBit has no target type named {g:?}"))
                    })?,
            ),
            _ => None,
        };
        let body = target_body(device_id, token, target_type, device_type);
        let (status, created) = self
            .mgmt
            .call(
                Method::POST,
                "/rest/v1/targets",
                Some(&serde_json::Value::Array(vec![body.clone()])),
            )
            .await?;
        let outcome = if status == 409 {
            let (s, _) = self
                .mgmt
                .call(
                    Method::PUT,
                    &format!("/rest/v1/targets/{device_id}"),
                    Some(&body),
                )
                .await?;
            if s == 409 {
                return Err(MgmtError::Refused("update answered 409".into()));
            }
            "updated"
        } else {
            if created[0]["controllerId"] != device_id {
                return Err(MgmtError::Refused(format!(
                    "create answered {status} without the target"
                )));
            }
            "created"
        };
        if let (GroupAs::Tag, Some(g)) = (self.settings.group_as, group) {
            let tag = match self.mgmt.id_by_name("/rest/v1/targettags", g).await? {
                Some(id) => id,
                None => {
                    let body = serde_json::json!([{"name": g,
                        "description": "OTA group of thingsly-bridge"}]);
                    let (s, v) = self
                        .mgmt
                        .call(Method::POST, "/rest/v1/targettags", Some(&body))
                        .await?;
                    match v[0]["id"].as_i64() {
                        Some(id) if s != 409 => id,
                        // Created by another bridge meanwhile: look it up again.
                        _ => self
                            .mgmt
                            .id_by_name("/rest/v1/targettags", g)
                            .await?
                            .ok_or_else(|| MgmtError::Refused(format!("tag {g:?} not created")))?,
                    }
                }
            };
            self.mgmt
                .call(
                    Method::PUT,
                    &format!("/rest/v1/targettags/{tag}/assigned"),
                    Some(&serde_json::json!([device_id])),
                )
                .await?;
        }
        Ok(outcome)
    }

    /// The worker: runs due jobs, sleeps until the next is due or the webhook wakes it.
    pub async fn run(
        self: Arc<Self>,
        st: Arc<crate::state::AppState>,
        shutdown: CancellationToken,
    ) {
        loop {
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let jobs = match st.store.due_targets(now, BATCH) {
                Ok(j) => j,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "hawkBit queue unreadable");
                    Vec::new()
                }
            };
            for job in &jobs {
                let (group, device_type) = match st.store.get(&job.device_id) {
                    Ok(Some(d)) => (
                        d.record.group.clone(),
                        st.store
                            .connect_info(&job.device_id)
                            .ok()
                            .flatten()
                            .and_then(|c| c.metadata["deviceType"].as_str().map(String::from)),
                    ),
                    Ok(None) => {
                        // Revoked after its connect: it gets no target.
                        tracing::info!(device = %job.device_id, "hawkBit job dropped: the device is no longer enrolled");
                        if let Err(e) = st
                            .store
                            .target_abandoned(&job.device_id, "no longer enrolled")
                        {
                            tracing::error!(error = %format!("{e:#}"), "hawkBit job state not saved");
                        }
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "registry unreadable; hawkBit job retried");
                        let _ =
                            st.store
                                .target_failed(&job.device_id, "registry unreadable", now + 5);
                        continue;
                    }
                };
                let r = self
                    .provision(
                        &job.device_id,
                        job.token.as_deref(),
                        group.as_deref(),
                        device_type.as_deref(),
                    )
                    .await;
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                let saved = match r {
                    Ok(outcome) => {
                        tracing::info!(target: "audit", device = %job.device_id, outcome, "hawkBit target provisioned");
                        st.store.target_synced(job, now)
                    }
                    Err(e) => {
                        let mut b = thingsly_core::backoff::Backoff::new(RETRY_BASE, RETRY_MAX);
                        for _ in 0..job.attempts {
                            b.next_delay();
                        }
                        let delay = b.next_delay();
                        tracing::warn!(device = %job.device_id, error = %e, retry_in = ?delay, "hawkBit provisioning failed");
                        st.store.target_failed(
                            &job.device_id,
                            &e.to_string(),
                            now + delay.as_secs().max(1) as i64,
                        )
                    }
                };
                if let Err(e) = saved {
                    tracing::error!(error = %format!("{e:#}"), "hawkBit job state not saved");
                }
            }
            if jobs.len() == BATCH {
                continue;
            }
            let wait = match st.store.next_target_due() {
                Ok(Some(at)) => Duration::from_secs(
                    (at - time::OffsetDateTime::now_utc().unix_timestamp()).clamp(0, 600) as u64,
                ),
                _ => Duration::from_secs(600),
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_bodies_carry_what_hawkbit_needs_and_nothing_it_would_refuse() {
        let b = target_body("dev-1", Some("tok"), Some(7), Some("gateway"));
        assert_eq!(b["controllerId"], "dev-1");
        assert_eq!(b["name"], "dev-1");
        assert_eq!(b["securityToken"], "tok");
        assert_eq!(b["targetType"], 7);
        let b = target_body("dev-1", None, None, None);
        assert!(b.get("securityToken").is_none() && b.get("targetType").is_none());
    }

    #[test]
    fn statuses_map_to_what_to_look_at() {
        assert!(matches!(classify(503, b""), MgmtError::Unavailable(_)));
        assert!(matches!(classify(429, b""), MgmtError::Unavailable(_)));
        assert!(matches!(classify(401, b""), MgmtError::Unauthorized(_)));
        let e = classify(
            400,
            br#"{"exceptionClass":"x","errorCode":"hawkbit.server.error.rest.param.invalid","message":"m"}"#,
        );
        assert_eq!(
            e,
            MgmtError::Refused("HTTP 400 hawkbit.server.error.rest.param.invalid".into())
        );
    }
}
