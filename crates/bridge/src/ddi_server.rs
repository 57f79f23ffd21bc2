//! A hawkBit-compatible DDI server for development, CI and QEMU tests: the same paths, bodies,
//! authentication (mTLS with the enrolled certificate, `TargetToken`, `GatewayToken`),
//! ETag/If-None-Match on the root poll, `Range` (206/416) and `.MD5SUM` on artifacts, and the
//! same feedback checks (400 on malformed bodies, 410 on closed actions) as hawkBit.
//! Plus the management side: upload a bundle, assign it, cancel, read an action's history.

use crate::auth::{authorization, token_eq};
use crate::ota_store::{Action, ActionKind, MAX_DDI_TARGETS, Module, Registered, status};
use crate::state::{AppState, PeerCert};
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use sha2::Digest;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thingsly_proto::ddi::{self, ActionFeedback, Execution, Finished};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

/// The DDI server's settings (`[ddi]` in bridge.toml).
#[derive(Debug, Clone)]
pub struct DdiSettings {
    pub tenant: String,
    pub polling_sleep: Duration,
    /// Empty: GatewayToken authentication is off.
    pub gateway_token: String,
    pub artifacts_dir: PathBuf,
}

/// hawkBit's error codes (`errorCode` of its `ExceptionInfo` body), from its `SpServerError`
/// (hawkbit-core `org.eclipse.hawkbit.exception.SpServerError`). The last three are ours:
/// hawkBit answers those cases without a body, we keep the JSON shape clients parse.
pub mod code {
    pub const GENERIC: &str = "hawkbit.server.error.repo.genericError";
    pub const NOT_FOUND: &str = "hawkbit.server.error.repo.entityNotFound";
    pub const AUTO_CONFIRM_ACTIVE: &str = "hawkbit.server.error.repo.autoConfAlreadyActive";
    pub const BODY_NOT_READABLE: &str = "hawkbit.server.error.rest.body.notReadable";
    pub const INSUFFICIENT_PERMISSION: &str = "hawkbit.server.error.insufficientPermission";
    pub const BINARY_DELETED: &str = "hawkbit.server.error.artifact.binaryDeleted";
    pub const QUOTA_EXCEEDED: &str = "hawkbit.server.error.quota.tooManyEntries";
    pub const UNAUTHORIZED: &str = "hawkbit.server.error.unauthorized";
    pub const ACTION_CLOSED: &str = "hawkbit.server.error.action.closed";
    pub const PRECONDITION_FAILED: &str = "hawkbit.server.error.preconditionFailed";
}

/// hawkBit's error body, with its HTTP status.
pub struct DdiError(StatusCode, &'static str, String);

impl IntoResponse for DdiError {
    fn into_response(self) -> Response {
        let DdiError(status, code, message) = self;
        if status.is_server_error() {
            tracing::error!(%status, code, %message, "DDI request failed");
        } else {
            tracing::info!(%status, code, %message, "DDI request refused");
        }
        let body = ddi::ExceptionInfo {
            exception_class: String::new(),
            error_code: code.to_string(),
            message,
        };
        (status, Json(body)).into_response()
    }
}

fn err(status: StatusCode, code: &'static str, msg: impl Into<String>) -> DdiError {
    DdiError(status, code, msg.into())
}

fn internal(e: impl std::fmt::Display) -> DdiError {
    err(
        StatusCode::INTERNAL_SERVER_ERROR,
        code::GENERIC,
        e.to_string(),
    )
}

pub fn router() -> Router<Arc<AppState>> {
    let base = "/{tenant}/controller/v1/{cid}";
    Router::new()
        .route(base, get(root))
        .route(&format!("{base}/deploymentBase/{{aid}}"), get(deployment))
        .route(
            &format!("{base}/deploymentBase/{{aid}}/feedback"),
            post(deployment_feedback),
        )
        .route(&format!("{base}/installedBase/{{aid}}"), get(installed))
        .route(&format!("{base}/cancelAction/{{aid}}"), get(cancel_action))
        .route(
            &format!("{base}/cancelAction/{{aid}}/feedback"),
            post(cancel_feedback),
        )
        .route(&format!("{base}/configData"), put(config_data))
        .route(&format!("{base}/installedBase"), put(put_installed_base))
        .route(&format!("{base}/confirmationBase"), get(confirmation_base))
        .route(
            &format!("{base}/confirmationBase/activateAutoConfirm"),
            post(activate_auto_confirm),
        )
        .route(
            &format!("{base}/confirmationBase/deactivateAutoConfirm"),
            post(deactivate_auto_confirm),
        )
        .route(
            &format!("{base}/confirmationBase/{{aid}}"),
            get(confirmation_action),
        )
        .route(
            &format!("{base}/confirmationBase/{{aid}}/feedback"),
            post(confirmation_feedback),
        )
        .route(
            &format!("{base}/softwaremodules/{{mid}}/artifacts"),
            get(artifacts),
        )
        .route(
            &format!("{base}/softwaremodules/{{mid}}/artifacts/{{file}}"),
            get(artifact_file),
        )
        // Every body above is a small JSON document; uploads below stream (no buffer).
        .route_layer(axum::extract::DefaultBodyLimit::max(DDI_BODY_LIMIT))
        .route("/ota/modules", post(upload_module).get(list_modules))
        .route("/ota/actions", post(assign).get(list_actions))
        .route("/ota/actions/{id}", get(show_action))
        .route("/ota/actions/{id}/cancel", post(cancel))
        .route("/ota/devices/{id}", get(show_device))
        .route("/ota/devices/{id}/target-token", post(new_target_token))
        .route("/ota/targets", get(list_ddi_targets))
        .layer(axum::middleware::map_response(as_hawkbit_error))
}

/// Errors raised by the framework before a handler runs (a path, query or body the extractors
/// refuse, a method not allowed, a body over the limit) come as plain text; hawkBit answers
/// every client error with its JSON `ExceptionInfo`, so clients parse the same shape here.
async fn as_hawkbit_error(resp: Response) -> Response {
    let st = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"));
    // 416 carries only Content-Range, as hawkBit's; 3xx and 2xx are not errors.
    if !st.is_client_error() || is_json || st == StatusCode::RANGE_NOT_SATISFIABLE {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let code = match st {
        StatusCode::NOT_FOUND => code::NOT_FOUND,
        StatusCode::BAD_REQUEST
        | StatusCode::PAYLOAD_TOO_LARGE
        | StatusCode::UNSUPPORTED_MEDIA_TYPE
        | StatusCode::UNPROCESSABLE_ENTITY => code::BODY_NOT_READABLE,
        _ => code::GENERIC,
    };
    let mut out = err(
        // axum refuses a JSON body it cannot deserialize with 422; hawkBit says 400.
        if st == StatusCode::UNPROCESSABLE_ENTITY {
            StatusCode::BAD_REQUEST
        } else {
            st
        },
        code,
        String::from_utf8_lossy(&text).trim().to_string(),
    )
    .into_response();
    // Keep what the framework said besides the body (Allow on a 405).
    for (k, v) in parts.headers.iter() {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

// ----------------------------------------------------------------------------- authentication

/// Who may act as controller `cid`: its own current certificate, its target token, or the
/// gateway token. hawkBit answers 401 to anything else. An extractor, so that it is decided
/// before any body is read.
pub struct Controller {
    pub via: Via,
}

/// How a controller authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Certificate,
    TargetToken,
    /// The tenant-wide gateway token: any controller id, enrolled or not.
    GatewayToken,
}

impl axum::extract::FromRequestParts<Arc<AppState>> for Controller {
    type Rejection = DdiError;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        st: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let Path(ids) =
            Path::<std::collections::HashMap<String, String>>::from_request_parts(parts, st)
                .await
                .map_err(|_| not_found("no such controller"))?;
        let (Some(tenant), Some(cid)) = (ids.get("tenant"), ids.get("cid")) else {
            return Err(not_found("no such controller"));
        };
        let peer = parts
            .extensions
            .get::<PeerCert>()
            .cloned()
            .unwrap_or_default();
        let via = authenticate(st, tenant, cid, &parts.headers, &peer)?;
        Ok(Controller { via })
    }
}

fn not_found(msg: impl Into<String>) -> DdiError {
    err(StatusCode::NOT_FOUND, code::NOT_FOUND, msg)
}

fn authenticate(
    st: &AppState,
    tenant: &str,
    cid: &str,
    headers: &HeaderMap,
    peer: &PeerCert,
) -> Result<Via, DdiError> {
    let ddi = st
        .ddi
        .as_ref()
        .ok_or_else(|| not_found("the DDI server is off ([ddi] in bridge.toml)"))?;
    if tenant != ddi.tenant {
        return Err(not_found(format!("no tenant {tenant:?}")));
    }
    if let Some(der) = &peer.0 {
        return match crate::api::current_device_of_cert(st, der, cid) {
            Ok(()) => Ok(Via::Certificate),
            Err(why) => Err(err(
                StatusCode::FORBIDDEN,
                code::INSUFFICIENT_PERMISSION,
                why,
            )),
        };
    }
    if let Some(t) = authorization(headers, "GatewayToken")
        && token_eq(t, &ddi.gateway_token)
    {
        return Ok(Via::GatewayToken);
    }
    if let Some(t) = authorization(headers, "TargetToken")
        && st.store.target_token_valid(cid, t).map_err(internal)?
    {
        return Ok(Via::TargetToken);
    }
    Err(err(
        StatusCode::UNAUTHORIZED,
        "hawkbit.server.error.unauthorized",
        "authenticate with the device certificate, a TargetToken or a GatewayToken",
    ))
}

fn settings(st: &AppState) -> Result<&DdiSettings, DdiError> {
    st.ddi
        .as_ref()
        .ok_or_else(|| internal("DDI server not configured"))
}

/// The base of the links sent to the device: `external_url` when configured; else the
/// address the device used (its `Host`, kept only when it is a plain host[:port], so a
/// client cannot make us send it links with paths, queries or other schemes).
fn base_url(st: &AppState, headers: &HeaderMap, tenant: &str, cid: &str) -> String {
    if let Some(u) = &st.external_url {
        return format!("{u}/{tenant}/controller/v1/{cid}");
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| plain_authority(h))
        .unwrap_or("localhost");
    format!("https://{host}/{tenant}/controller/v1/{cid}")
}

/// `host`, `host:port`, `[v6]:port`: the characters of an authority without userinfo.
fn plain_authority(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 255
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
}

/// The device's action `aid`; 404 when it does not exist or is someone else's.
fn own_action(st: &AppState, cid: &str, aid: &str) -> Result<Action, DdiError> {
    let not_found = || {
        err(
            StatusCode::NOT_FOUND,
            code::NOT_FOUND,
            format!("action {aid} not found for {cid}"),
        )
    };
    let id: i64 = aid.parse().map_err(|_| not_found())?;
    match st.store.action(id).map_err(internal)? {
        Some(a) if a.device_id == cid => Ok(a),
        _ => Err(not_found()),
    }
}

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

// ----------------------------------------------------------------------------- DDI resources

type Ids = Path<(String, String)>;
type ActionIds = Path<(String, String, String)>;

async fn root(
    State(st): State<Arc<AppState>>,
    device: Controller,
    Path((tenant, cid)): Ids,
    headers: HeaderMap,
) -> Result<Response, DdiError> {
    let ddi = settings(&st)?;
    if device.via == Via::GatewayToken {
        register_unknown(&st, &cid)?;
    }
    let base = base_url(&st, &headers, &tenant, &cid);
    let mut links = ddi::Links::new();
    if let Some(a) = st.store.open_action(&cid).map_err(internal)? {
        if a.status == status::CANCELING {
            links.insert(
                "cancelAction".into(),
                ddi::link(format!("{base}/cancelAction/{}", a.id)),
            );
        } else if a.status == status::CONFIRMING {
            let c = cache_buster(&a, now_unix());
            links.insert(
                "confirmationBase".into(),
                ddi::link(format!("{base}/confirmationBase/{}?c={c}", a.id)),
            );
        } else {
            // hawkBit's opaque cache-buster: changes when what the device must do changes.
            let c = cache_buster(&a, now_unix());
            links.insert(
                "deploymentBase".into(),
                ddi::link(format!("{base}/deploymentBase/{}?c={c}", a.id)),
            );
        }
    }
    if st.store.config_data(&cid).map_err(internal)?.is_none() {
        links.insert("configData".into(), ddi::link(format!("{base}/configData")));
    }
    if let Some(a) = st.store.installed_action(&cid).map_err(internal)? {
        links.insert(
            "installedBase".into(),
            ddi::link(format!("{base}/installedBase/{}", a.id)),
        );
    }
    let body = ddi::ControllerBase {
        config: Some(ddi::Config {
            polling: Some(ddi::Polling {
                sleep: ddi::format_sleep(ddi.polling_sleep),
            }),
        }),
        links,
    };
    let json = serde_json::to_vec(&body).map_err(internal)?;
    let etag = format!("\"{}\"", &hex::encode(sha2::Sha256::digest(&json))[..16]);
    let etag_value = HeaderValue::from_str(&etag).map_err(internal)?;
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes())
    {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag_value)]).into_response());
    }
    // hawkBit produces both; clients asking for plain JSON (aiohttp checks) get that.
    let hal = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|a| a.contains("hal+json") || !a.contains("application/json"));
    let content_type = if hal {
        "application/hal+json"
    } else {
        "application/json"
    };
    Ok((
        [
            (header::ETAG, etag_value),
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        ],
        json,
    )
        .into_response())
}

/// hawkBit registers a controller it does not know on its first authenticated poll
/// (`findOrRegisterTargetIfItDoesNotExist`); only a gateway-token poll can come from one.
/// Enrolled devices are not registered twice.
fn register_unknown(st: &AppState, cid: &str) -> Result<(), DdiError> {
    if st.store.get(cid).map_err(internal)?.is_some() {
        return Ok(());
    }
    if !thingsly_proto::enroll::is_valid_device_id(cid) {
        return Err(err(
            StatusCode::BAD_REQUEST,
            code::GENERIC,
            format!("controller id {cid:?}: 1-64 of A-Z a-z 0-9 . _ - (not starting with .)"),
        ));
    }
    match st.store.register_ddi_target(cid).map_err(internal)? {
        Registered::New => {
            tracing::info!(device = %cid, "DDI target registered (first gateway-token poll)");
            Ok(())
        }
        Registered::Known => Ok(()),
        Registered::Full => Err(quota_exceeded(format!(
            "{MAX_DDI_TARGETS} DDI targets registered already; remove some before new ones poll"
        ))),
    }
}

fn cache_buster(a: &Action, now: i64) -> i32 {
    let key = format!("{}:{}:{:?}", a.id, a.kind.as_str(), a.window_open(now));
    let d = sha2::Sha256::digest(key.as_bytes());
    i32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

/// `download`, `update` and `maintenanceWindow` of a deployment, as hawkBit's
/// `DdiRootController` computes them (`calculateDownloadType`, `calculateUpdateType`,
/// `calculateMaintenanceWindow`): download-only or forced actions download `forced`, soft ones
/// `attempt`; the update is `skip` for download-only and while the window is closed, else the
/// download's type; `maintenanceWindow` only for an action that has one. Third-party clients
/// decide on `update` alone, so a closed window must say `skip`.
fn handling(
    kind: ActionKind,
    window_open: Option<bool>,
) -> (
    ddi::HandlingType,
    ddi::HandlingType,
    Option<ddi::MaintenanceWindow>,
) {
    use ddi::HandlingType::{Attempt, Forced, Skip};
    let download = match kind {
        ActionKind::Forced | ActionKind::Downloadonly => Forced,
        ActionKind::Soft => Attempt,
    };
    let update = match (kind, window_open) {
        (ActionKind::Downloadonly, _) | (_, Some(false)) => Skip,
        _ => download,
    };
    let window = window_open.map(|open| {
        if open {
            ddi::MaintenanceWindow::Available
        } else {
            ddi::MaintenanceWindow::Unavailable
        }
    });
    (download, update, window)
}

fn deployment_of(a: &Action, m: &Module, base: &str) -> ddi::Deployment {
    let (download, update, maintenance_window) = handling(a.kind, a.window_open(now_unix()));
    ddi::Deployment {
        download: Some(download),
        update: Some(update),
        maintenance_window,
        chunks: vec![ddi::Chunk {
            part: "os".into(),
            version: m.version.clone(),
            name: m.name.clone(),
            encrypted: None,
            artifacts: vec![artifact_of(m, base)],
            metadata: vec![],
        }],
    }
}

fn artifact_of(m: &Module, base: &str) -> ddi::Artifact {
    let url = format!("{base}/softwaremodules/{}/artifacts/{}", m.id, m.filename);
    let mut links = ddi::Links::new();
    links.insert("download".into(), ddi::link(url.clone()));
    links.insert("md5sum".into(), ddi::link(format!("{url}.MD5SUM")));
    ddi::Artifact {
        filename: m.filename.clone(),
        hashes: ddi::Hashes {
            sha1: Some(m.sha1.clone()),
            md5: Some(m.md5.clone()),
            sha256: Some(m.sha256.clone()),
        },
        size: Some(m.size),
        links,
    }
}

#[derive(serde::Deserialize, Default)]
struct HistoryQuery {
    #[serde(rename = "actionHistory")]
    action_history: Option<i64>,
}

/// hawkBit's quotas (`hawkbit.server.security.dos.*` in its `HawkbitSecurityProperties`, and
/// `RepositoryConstants.MAX_ACTION_HISTORY_MSG_COUNT`): feedback statuses per action, messages
/// per status (details are split at 512 characters, as hawkBit's `ActionStatus.addMessage`
/// does), and the messages `actionHistory` returns at most (also for -1).
pub const MAX_STATUS_ENTRIES_PER_ACTION: usize = 1000;
pub const MAX_MESSAGES_PER_ACTION_STATUS: usize = 50;
pub const MESSAGE_SPLIT_CHARS: usize = 512;
pub const MAX_ACTION_HISTORY_MESSAGES: usize = 100;
/// Feedback and configData bodies: 50 messages of 512 characters fit with room to spare.
pub const DDI_BODY_LIMIT: usize = 64 * 1024;

/// How many stored messages `details` makes once split as hawkBit splits them.
fn message_count(details: &[String]) -> usize {
    details
        .iter()
        .map(|d| d.chars().count().div_ceil(MESSAGE_SPLIT_CHARS).max(1))
        .sum()
}

fn quota_exceeded(msg: String) -> DdiError {
    err(StatusCode::TOO_MANY_REQUESTS, code::QUOTA_EXCEEDED, msg)
}

/// hawkBit's quotas on one more feedback for action `a`.
fn check_feedback_quota(st: &AppState, a: &Action, details: &[String]) -> Result<(), DdiError> {
    let n = message_count(details);
    if n > MAX_MESSAGES_PER_ACTION_STATUS {
        return Err(quota_exceeded(format!(
            "{n} messages in one status; at most {MAX_MESSAGES_PER_ACTION_STATUS} of {MESSAGE_SPLIT_CHARS} characters"
        )));
    }
    if st.store.feedback_count(a.id).map_err(internal)? >= MAX_STATUS_ENTRIES_PER_ACTION {
        return Err(quota_exceeded(format!(
            "action {} holds {MAX_STATUS_ENTRIES_PER_ACTION} statuses already",
            a.id
        )));
    }
    Ok(())
}

/// hawkBit's `actionHistory`: the newest `n` feedback messages first (-1: as many as allowed).
fn history(
    st: &AppState,
    a: &Action,
    n: Option<i64>,
) -> Result<Option<ddi::ActionHistory>, DdiError> {
    let Some(n) = n.filter(|n| *n != 0) else {
        return Ok(None);
    };
    let n = usize::try_from(n)
        .unwrap_or(MAX_ACTION_HISTORY_MESSAGES)
        .min(MAX_ACTION_HISTORY_MESSAGES);
    // Every entry yields at least one message: the newest n entries are enough.
    let mut messages: Vec<String> = st
        .store
        .feedback_newest(a.id, n)
        .map_err(internal)?
        .into_iter()
        .rev()
        .flat_map(|f| {
            let exec = f.body["status"]["execution"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let details: Vec<String> = f.body["status"]["details"]
                .as_array()
                .map(|d| {
                    d.iter()
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            if details.is_empty() {
                vec![exec]
            } else {
                details
            }
        })
        .collect();
    messages.truncate(n);
    Ok(Some(ddi::ActionHistory {
        status: Some(a.status.to_uppercase()),
        messages,
    }))
}

async fn deployment_body(
    st: &AppState,
    headers: &HeaderMap,
    tenant: &str,
    cid: &str,
    a: &Action,
    q: HistoryQuery,
) -> Result<Json<ddi::DeploymentBase>, DdiError> {
    let m = st
        .store
        .module(a.module_id)
        .map_err(internal)?
        .ok_or_else(|| internal("the action's module is gone"))?;
    let base = base_url(st, headers, tenant, cid);
    Ok(Json(ddi::DeploymentBase {
        id: a.id.to_string(),
        deployment: deployment_of(a, &m, &base),
        action_history: history(st, a, q.action_history)?,
        links: ddi::Links::new(),
    }))
}

/// `deploymentBase/{id}`.
async fn deployment(
    State(st): State<Arc<AppState>>,
    _device: Controller,
    Path((tenant, cid, aid)): ActionIds,
    Query(q): Query<HistoryQuery>,
    headers: HeaderMap,
) -> Result<Json<ddi::DeploymentBase>, DdiError> {
    let a = own_action(&st, &cid, &aid)?;
    deployment_body(&st, &headers, &tenant, &cid, &a, q).await
}

/// `installedBase/{id}`: only an action that finished (hawkBit's `getControllerInstalledAction`
/// answers 404 for one still active, canceling or canceled).
async fn installed(
    State(st): State<Arc<AppState>>,
    _device: Controller,
    Path((tenant, cid, aid)): ActionIds,
    Query(q): Query<HistoryQuery>,
    headers: HeaderMap,
) -> Result<Json<ddi::DeploymentBase>, DdiError> {
    let a = own_action(&st, &cid, &aid)?;
    if status::is_open(&a.status) || a.status == status::CANCELED {
        return Err(not_found(format!(
            "action {aid} is {}, not installed",
            a.status
        )));
    }
    deployment_body(&st, &headers, &tenant, &cid, &a, q).await
}

/// A DDI request body as hawkBit reads it (strict types, unknown fields tolerated); 400
/// `rest.body.notReadable` naming `what` otherwise.
fn parse_body<T: serde::de::DeserializeOwned>(what: &str, body: &[u8]) -> Result<T, DdiError> {
    serde_json::from_slice(body).map_err(|e| {
        err(
            StatusCode::BAD_REQUEST,
            code::BODY_NOT_READABLE,
            format!("{what}: {e}"),
        )
    })
}

/// A feedback body, and what is stored of it.
fn parse_feedback(body: &Bytes) -> Result<(ActionFeedback, serde_json::Value), DdiError> {
    let fb: ActionFeedback = parse_body("feedback", body)?;
    let raw = serde_json::to_value(&fb).map_err(internal)?;
    Ok((fb, raw))
}

fn gone(a: &Action) -> DdiError {
    err(
        StatusCode::GONE,
        "hawkbit.server.error.action.closed",
        format!("action {} is {} and takes no more feedback", a.id, a.status),
    )
}

async fn deployment_feedback(
    State(st): State<Arc<AppState>>,
    _device: Controller,
    Path((_, cid, aid)): ActionIds,
    body: Bytes,
) -> Result<StatusCode, DdiError> {
    let (fb, raw) = parse_feedback(&body)?;
    let a = own_action(&st, &cid, &aid)?;
    if !status::is_open(&a.status) {
        return Err(gone(&a));
    }
    check_feedback_quota(&st, &a, &fb.status.details)?;
    st.store
        .add_feedback(a.id, "deploymentBase", &raw)
        .map_err(internal)?;
    let to = match (fb.status.execution, fb.status.result.finished) {
        (Execution::Closed, Finished::Success) => Some(status::CLOSED),
        (Execution::Closed, Finished::Failure) => Some(status::FAILED),
        (Execution::Downloaded, _) if a.kind == ActionKind::Downloadonly => Some(status::CLOSED),
        _ => None,
    };
    if let Some(to) = to {
        st.store
            .set_action_status(a.id, &[status::RUNNING, status::CANCELING], to)
            .map_err(internal)?;
        tracing::info!(device = %cid, action = a.id, status = to, details = ?fb.status.details, "OTA action finished");
    }
    Ok(StatusCode::OK)
}

async fn cancel_action(
    State(st): State<Arc<AppState>>,
    _device: Controller,
    Path((_, cid, aid)): ActionIds,
) -> Result<Json<ddi::Cancel>, DdiError> {
    let a = own_action(&st, &cid, &aid)?;
    Ok(Json(ddi::Cancel {
        id: Some(a.id.to_string()),
        cancel_action: ddi::CancelActionToStop {
            stop_id: a.id.to_string(),
        },
    }))
}

async fn cancel_feedback(
    State(st): State<Arc<AppState>>,
    _device: Controller,
    Path((_, cid, aid)): ActionIds,
    body: Bytes,
) -> Result<StatusCode, DdiError> {
    let (fb, raw) = parse_feedback(&body)?;
    let a = own_action(&st, &cid, &aid)?;
    if a.status != status::CANCELING {
        return Err(gone(&a));
    }
    check_feedback_quota(&st, &a, &fb.status.details)?;
    st.store
        .add_feedback(a.id, "cancelAction", &raw)
        .map_err(internal)?;
    let to = match (fb.status.execution, fb.status.result.finished) {
        (Execution::Rejected, _) | (_, Finished::Failure) => Some(status::RUNNING),
        (Execution::Closed | Execution::Canceled, Finished::Success) => Some(status::CANCELED),
        _ => None,
    };
    if let Some(to) = to {
        st.store
            .set_action_status(a.id, &[status::CANCELING], to)
            .map_err(internal)?;
    }
    Ok(StatusCode::OK)
}

async fn config_data(
    State(st): State<Arc<AppState>>,
    _device: Controller,
    Path((_, cid)): Ids,
    body: Bytes,
) -> Result<StatusCode, DdiError> {
    let cd: ddi::ConfigData = parse_body("configData", &body)?;
    let mut data = st
        .store
        .config_data(&cid)
        .map_err(internal)?
        .unwrap_or_default();
    match cd.mode.unwrap_or(ddi::ConfigDataMode::Merge) {
        ddi::ConfigDataMode::Merge => data.extend(cd.data),
        ddi::ConfigDataMode::Replace => data = cd.data,
        ddi::ConfigDataMode::Remove => data.retain(|k, _| !cd.data.contains_key(k)),
    }
    st.store.put_config_data(&cid, &data).map_err(internal)?;
    Ok(StatusCode::OK)
}

/// The action awaiting the device's consent.
async fn confirmation_action(
    State(st): State<Arc<AppState>>,
    _device: Controller,
    Path((tenant, cid, aid)): ActionIds,
    Query(q): Query<HistoryQuery>,
    headers: HeaderMap,
) -> Result<Json<ddi::ConfirmationBaseAction>, DdiError> {
    let a = own_action(&st, &cid, &aid)?;
    let d = deployment_body(&st, &headers, &tenant, &cid, &a, q)
        .await?
        .0;
    Ok(Json(ddi::ConfirmationBaseAction {
        id: d.id,
        confirmation: d.deployment,
        action_history: d.action_history,
        links: d.links,
    }))
}

/// `confirmed` starts the action; `denied` leaves it waiting (as hawkBit does).
async fn confirmation_feedback(
    State(st): State<Arc<AppState>>,
    _device: Controller,
    Path((_, cid, aid)): ActionIds,
    body: Bytes,
) -> Result<StatusCode, DdiError> {
    let fb: ddi::ConfirmationFeedback = parse_body("confirmation feedback", &body)?;
    let a = own_action(&st, &cid, &aid)?;
    if a.status != status::CONFIRMING {
        return Err(gone(&a));
    }
    check_feedback_quota(&st, &a, &fb.details)?;
    let raw = serde_json::to_value(&fb).map_err(internal)?;
    st.store
        .add_feedback(a.id, "confirmationBase", &raw)
        .map_err(internal)?;
    if fb.confirmation == ddi::Confirmation::Confirmed {
        st.store
            .set_action_status(a.id, &[status::CONFIRMING], status::RUNNING)
            .map_err(internal)?;
    }
    Ok(StatusCode::OK)
}

/// The device's auto-confirmation state, the link that switches it, and the action waiting
/// for consent (hawkBit's `getConfirmationBase` / `DataConversionHelper.createConfirmationBase`).
async fn confirmation_base(
    State(st): State<Arc<AppState>>,
    device: Controller,
    Path((tenant, cid)): Ids,
    headers: HeaderMap,
) -> Result<Json<ddi::ConfirmationBase>, DdiError> {
    // hawkBit registers an unknown controller here too.
    if device.via == Via::GatewayToken {
        register_unknown(&st, &cid)?;
    }
    let base = base_url(&st, &headers, &tenant, &cid);
    let auto = st.store.auto_confirm(&cid).map_err(internal)?;
    let mut links = ddi::Links::new();
    let (rel, path) = if auto.is_some() {
        (
            "deactivateAutoConfirm",
            "confirmationBase/deactivateAutoConfirm",
        )
    } else {
        (
            "activateAutoConfirm",
            "confirmationBase/activateAutoConfirm",
        )
    };
    links.insert(rel.into(), ddi::link(format!("{base}/{path}")));
    if let Some(a) = st.store.open_action(&cid).map_err(internal)?
        && a.status == status::CONFIRMING
    {
        let c = cache_buster(&a, now_unix());
        links.insert(
            "confirmationBase".into(),
            ddi::link(format!("{base}/confirmationBase/{}?c={c}", a.id)),
        );
    }
    Ok(Json(ddi::ConfirmationBase {
        auto_confirm: ddi::AutoConfirm {
            active: auto.is_some(),
            initiator: auto.as_ref().and_then(|a| a.initiator.clone()),
            remark: auto.as_ref().and_then(|a| a.remark.clone()),
            activated_at: auto.as_ref().map(|a| a.activated_at),
        },
        links,
    }))
}

/// hawkBit's `DdiActivateAutoConfirmation`: both fields optional, the body too.
#[derive(serde::Deserialize, Default)]
struct ActivateAutoConfirm {
    initiator: Option<String>,
    remark: Option<String>,
}

/// Initiator and remark are kept and shown: bounded like a feedback message.
const AUTO_CONFIRM_FIELD_MAX: usize = MESSAGE_SPLIT_CHARS;

async fn activate_auto_confirm(
    State(st): State<Arc<AppState>>,
    _device: Controller,
    Path((_, cid)): Ids,
    body: Bytes,
) -> Result<StatusCode, DdiError> {
    let req: ActivateAutoConfirm = if body.iter().all(u8::is_ascii_whitespace) {
        ActivateAutoConfirm::default()
    } else {
        parse_body("activateAutoConfirm", &body)?
    };
    for f in [&req.initiator, &req.remark].into_iter().flatten() {
        if f.chars().count() > AUTO_CONFIRM_FIELD_MAX {
            return Err(err(
                StatusCode::BAD_REQUEST,
                code::BODY_NOT_READABLE,
                format!("initiator and remark: at most {AUTO_CONFIRM_FIELD_MAX} characters"),
            ));
        }
    }
    let now_ms = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
    let activated = st
        .store
        .activate_auto_confirm(
            &cid,
            req.initiator.as_deref(),
            req.remark.as_deref(),
            now_ms,
        )
        .map_err(internal)?;
    if !activated {
        return Err(err(
            StatusCode::CONFLICT,
            code::AUTO_CONFIRM_ACTIVE,
            format!("auto-confirmation is already active for {cid}"),
        ));
    }
    tracing::info!(device = %cid, initiator = ?req.initiator, "DDI auto-confirmation activated");
    Ok(StatusCode::OK)
}

async fn deactivate_auto_confirm(
    State(st): State<Arc<AppState>>,
    _device: Controller,
    Path((_, cid)): Ids,
) -> Result<StatusCode, DdiError> {
    st.store.deactivate_auto_confirm(&cid).map_err(internal)?;
    tracing::info!(device = %cid, "DDI auto-confirmation deactivated");
    Ok(StatusCode::OK)
}

/// hawkBit's `DdiAssignedVersion`: the distribution set's name and version, both required.
#[derive(serde::Deserialize)]
struct AssignedVersion {
    name: String,
    version: String,
}

/// `PUT installedBase`: the device says what it runs (hawkBit's `setAssignedOfflineVersion`):
/// 201 when recorded as news, 200 when nothing changed, 404 for a set the server lacks.
async fn put_installed_base(
    State(st): State<Arc<AppState>>,
    _device: Controller,
    Path((_, cid)): Ids,
    body: Bytes,
) -> Result<StatusCode, DdiError> {
    let v: AssignedVersion = parse_body("installedBase", &body)?;
    let m = st
        .store
        .module_named(&v.name, &v.version)
        .map_err(internal)?
        .ok_or_else(|| not_found(format!("no software {:?} version {:?}", v.name, v.version)))?;
    match st
        .store
        .record_offline_install(&cid, m.id)
        .map_err(internal)?
    {
        Some(a) => {
            tracing::info!(device = %cid, module = m.id, action = a.id, "installed version reported by the device");
            Ok(StatusCode::CREATED)
        }
        None => Ok(StatusCode::OK),
    }
}

/// The module, when the device has (or had) an action for it.
fn device_module(st: &AppState, cid: &str, mid: &str) -> Result<Module, DdiError> {
    let not_found = || {
        err(
            StatusCode::NOT_FOUND,
            code::NOT_FOUND,
            format!("software module {mid} not found"),
        )
    };
    let id: i64 = mid.parse().map_err(|_| not_found())?;
    let assigned = st
        .store
        .actions(Some(cid))
        .map_err(internal)?
        .iter()
        .any(|a| a.module_id == id);
    if !assigned {
        return Err(not_found());
    }
    st.store.module(id).map_err(internal)?.ok_or_else(not_found)
}

async fn artifacts(
    State(st): State<Arc<AppState>>,
    _device: Controller,
    Path((tenant, cid, mid)): ActionIds,
    headers: HeaderMap,
) -> Result<Json<Vec<ddi::Artifact>>, DdiError> {
    let m = device_module(&st, &cid, &mid)?;
    let base = base_url(&st, &headers, &tenant, &cid);
    Ok(Json(vec![artifact_of(&m, &base)]))
}

pub fn artifact_path(dir: &FsPath, sha256: &str) -> PathBuf {
    dir.join(format!("{sha256}.bin"))
}

/// `If-Match` against an artifact's ETag: absent, `*`, or listing it passes. The comparison is
/// strong (RFC 9110 13.1.1): a weak `W/"…"` tag never matches.
fn if_match_passes(header: Option<&str>, etag: &str) -> bool {
    header.is_none_or(|h| h.split(',').map(str::trim).any(|t| t == "*" || t == etag))
}

async fn artifact_file(
    State(st): State<Arc<AppState>>,
    _device: Controller,
    Path((_, cid, mid, file)): Path<(String, String, String, String)>,
    method: axum::http::Method,
    headers: HeaderMap,
) -> Result<Response, DdiError> {
    let m = device_module(&st, &cid, &mid)?;
    if file == format!("{}.MD5SUM", m.filename) {
        // hawkBit's `writeMD5FileResponse`: "<md5>  <filename>", no newline.
        return Ok((
            [
                (header::CONTENT_TYPE, "text/plain".to_string()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment;filename={}.MD5SUM", m.filename),
                ),
            ],
            format!("{}  {}", m.md5, m.filename),
        )
            .into_response());
    }
    if file != m.filename {
        return Err(err(
            StatusCode::NOT_FOUND,
            code::NOT_FOUND,
            format!("no artifact {file:?} in module {mid}"),
        ));
    }
    let path = artifact_path(&settings(&st)?.artifacts_dir, &m.sha256);
    let mut f = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::error!(module = m.id, path = %path.display(), "artifact file missing from the store");
            return Err(err(
                StatusCode::NOT_FOUND,
                code::BINARY_DELETED,
                format!("the file of module {} is gone from the server", m.id),
            ));
        }
        Err(e) => return Err(internal(e)),
    };
    let size = m.size;
    // hawkBit's artifact ETag is the SHA-1 (`FileStreamingUtil`, `artifact.getSha1Hash()`).
    let etag = format!("\"{}\"", m.sha1);
    let if_match = headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok());
    if !if_match_passes(if_match, &etag) {
        return Err(err(
            StatusCode::PRECONDITION_FAILED,
            code::PRECONDITION_FAILED,
            format!("If-Match does not match the artifact's ETag {etag}"),
        ));
    }
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    if method == axum::http::Method::HEAD {
        // Metadata only: not a download (hawkBit logs a download on GET).
        tracing::debug!(device = %cid, module = m.id, "artifact HEAD");
    } else {
        tracing::info!(device = %cid, module = m.id, range = range.unwrap_or("-"), "artifact download");
    }
    let common = [
        (header::ACCEPT_RANGES, "bytes".to_string()),
        (header::ETAG, etag),
        (header::CONTENT_TYPE, "application/octet-stream".into()),
        (
            header::CONTENT_DISPOSITION,
            format!("attachment;filename={}", m.filename),
        ),
    ];
    match thingsly_proto::http_range::parse_range(range, size) {
        Err(thingsly_proto::http_range::Unsatisfiable) => Ok((
            StatusCode::RANGE_NOT_SATISFIABLE,
            [(header::CONTENT_RANGE, format!("bytes */{size}"))],
        )
            .into_response()),
        Ok(None) => {
            let body = Body::from_stream(tokio_util::io::ReaderStream::new(f));
            Ok((common, [(header::CONTENT_LENGTH, size.to_string())], body).into_response())
        }
        Ok(Some((start, end))) => {
            f.seek(std::io::SeekFrom::Start(start))
                .await
                .map_err(internal)?;
            let len = end - start + 1;
            let body = Body::from_stream(tokio_util::io::ReaderStream::new(f.take(len)));
            Ok((
                StatusCode::PARTIAL_CONTENT,
                common,
                [
                    (header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}")),
                    (header::CONTENT_LENGTH, len.to_string()),
                ],
                body,
            )
                .into_response())
        }
    }
}

// ----------------------------------------------------------------------------- management

/// The admin token, checked before any body (an upload, an assignment) is read.
pub struct OtaAdmin;

impl axum::extract::FromRequestParts<Arc<AppState>> for OtaAdmin {
    type Rejection = DdiError;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        st: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        if crate::auth::is_admin(st, &parts.headers) {
            Ok(OtaAdmin)
        } else {
            Err(err(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the OTA management API needs the admin token (Authorization: Bearer)",
            ))
        }
    }
}

/// Streams `body` into the artifact store while hashing it; returns the module's hashes.
pub struct Stored {
    pub size: u64,
    pub sha256: String,
    pub sha1: String,
    pub md5: String,
}

pub struct ArtifactWriter {
    dir: PathBuf,
    tmp: tempfile::NamedTempFile,
    file: tokio::fs::File,
    size: u64,
    sha256: sha2::Sha256,
    sha1: sha1::Sha1,
    md5: md5::Md5,
}

impl ArtifactWriter {
    pub fn new(dir: &FsPath) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let tmp = tempfile::NamedTempFile::new_in(dir)?;
        let file = tokio::fs::File::from_std(tmp.reopen()?);
        Ok(Self {
            dir: dir.to_path_buf(),
            tmp,
            file,
            size: 0,
            sha256: sha2::Sha256::new(),
            sha1: sha1::Sha1::new(),
            md5: md5::Md5::new(),
        })
    }
    pub async fn write(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        self.sha256.update(chunk);
        self.sha1.update(chunk);
        self.md5.update(chunk);
        self.size += chunk.len() as u64;
        self.file.write_all(chunk).await
    }
    pub async fn finish(mut self) -> std::io::Result<Stored> {
        self.file.flush().await?;
        self.file.sync_all().await?;
        let stored = Stored {
            size: self.size,
            sha256: hex::encode(self.sha256.finalize()),
            sha1: hex::encode(self.sha1.finalize()),
            md5: hex::encode(self.md5.finalize()),
        };
        self.tmp
            .persist(artifact_path(&self.dir, &stored.sha256))
            .map_err(|e| e.error)?;
        Ok(stored)
    }
}

/// Store a bundle file (the CLI's upload).
pub async fn store_file(dir: &FsPath, src: &FsPath) -> std::io::Result<Stored> {
    let mut w = ArtifactWriter::new(dir)?;
    let mut f = tokio::fs::File::open(src).await?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        w.write(&buf[..n]).await?;
    }
    w.finish().await
}

#[derive(serde::Deserialize)]
struct UploadQuery {
    name: String,
    version: String,
    filename: Option<String>,
}

fn is_safe_filename(f: &str) -> bool {
    !f.is_empty()
        && f.len() <= 128
        && !f.starts_with('.')
        && f.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-+".contains(c))
}

async fn upload_module(
    State(st): State<Arc<AppState>>,
    _admin: OtaAdmin,
    Query(q): Query<UploadQuery>,
    body: Body,
) -> Result<Json<Module>, DdiError> {
    let filename = q
        .filename
        .unwrap_or_else(|| format!("{}-{}.raucb", q.name, q.version));
    if !is_safe_filename(&filename) {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("filename {filename:?}: use letters, digits and ._-+"),
        ));
    }
    let mut w = ArtifactWriter::new(&settings(&st)?.artifacts_dir).map_err(internal)?;
    let mut stream = body.into_data_stream();
    use futures_util::StreamExt;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            err(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("upload interrupted: {e}"),
            )
        })?;
        w.write(&chunk).await.map_err(internal)?;
    }
    let s = w.finish().await.map_err(internal)?;
    let m = st
        .store
        .add_module(
            &q.name, &q.version, &filename, s.size, &s.sha256, &s.sha1, &s.md5,
        )
        .map_err(internal)?;
    tracing::info!(module = m.id, name = %m.name, version = %m.version, size = m.size, "OTA module uploaded");
    Ok(Json(m))
}

async fn list_modules(
    State(st): State<Arc<AppState>>,
    _admin: OtaAdmin,
) -> Result<Json<Vec<Module>>, DdiError> {
    Ok(Json(st.store.modules().map_err(internal)?))
}

/// `POST /ota/actions`.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AssignRequest {
    pub module: i64,
    #[serde(default)]
    pub devices: Vec<String>,
    /// Every enrolled device an operator put in this group (`thingsly-bridge group`,
    /// `PUT /devices/{id}/group`); what a device claims in its metadata counts for nothing.
    #[serde(default)]
    pub group: Option<String>,
    #[serde(rename = "type", default = "forced")]
    pub kind: ActionKind,
    #[serde(default)]
    pub maintenance_window: Option<Window>,
    /// The device must confirm first (hawkBit's user consent flow).
    #[serde(default)]
    pub confirm: bool,
}

fn forced() -> ActionKind {
    ActionKind::Forced
}

#[derive(Debug, Clone, Copy, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// Unix seconds.
    pub start: i64,
    /// Seconds.
    pub duration: i64,
}

/// Assign (shared by the API and the CLI): the devices named plus the group's members.
pub fn assign_to(st: &crate::store::Store, req: &AssignRequest) -> Result<Vec<Action>, String> {
    if st.module(req.module).map_err(|e| e.to_string())?.is_none() {
        return Err(format!("no module {}", req.module));
    }
    let mut devices = req.devices.clone();
    if let Some(g) = &req.group {
        devices.extend(st.group_members(g).map_err(|e| e.to_string())?);
    }
    devices.sort();
    devices.dedup();
    if devices.is_empty() {
        return Err("no device: give devices or a group with members".into());
    }
    for d in &devices {
        if !is_ota_target(st, d).map_err(|e| e.to_string())? {
            return Err(format!(
                "device {d:?} is neither enrolled nor registered by a DDI poll"
            ));
        }
    }
    if let Some(w) = req.maintenance_window
        && w.duration <= 0
    {
        return Err("maintenance_window.duration must be positive".into());
    }
    devices
        .iter()
        .map(|d| {
            st.assign(
                d,
                req.module,
                req.kind,
                req.maintenance_window.map(|w| (w.start, w.duration)),
                req.confirm,
            )
            .map_err(|e| e.to_string())
        })
        .collect()
}

async fn assign(
    State(st): State<Arc<AppState>>,
    _admin: OtaAdmin,
    body: Bytes,
) -> Result<Json<Vec<Action>>, DdiError> {
    let req: AssignRequest = serde_json::from_slice(&body)
        .map_err(|e| err(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))?;
    let actions =
        assign_to(&st.store, &req).map_err(|e| err(StatusCode::BAD_REQUEST, "bad_request", e))?;
    for a in &actions {
        tracing::info!(action = a.id, device = %a.device_id, module = a.module_id, kind = a.kind.as_str(), "OTA assigned");
    }
    Ok(Json(actions))
}

#[derive(serde::Deserialize)]
struct ActionsQuery {
    device: Option<String>,
}

async fn list_actions(
    State(st): State<Arc<AppState>>,
    _admin: OtaAdmin,
    Query(q): Query<ActionsQuery>,
) -> Result<Json<Vec<Action>>, DdiError> {
    Ok(Json(
        st.store.actions(q.device.as_deref()).map_err(internal)?,
    ))
}

#[derive(serde::Serialize, serde::Deserialize, Debug)]
pub struct ActionDetail {
    pub action: Action,
    pub feedback: Vec<crate::ota_store::FeedbackEntry>,
}

async fn show_action(
    State(st): State<Arc<AppState>>,
    _admin: OtaAdmin,
    Path(id): Path<i64>,
) -> Result<Json<ActionDetail>, DdiError> {
    let action = st.store.action(id).map_err(internal)?.ok_or_else(|| {
        err(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no action {id}"),
        )
    })?;
    let feedback = st.store.feedback(id).map_err(internal)?;
    Ok(Json(ActionDetail { action, feedback }))
}

async fn cancel(
    State(st): State<Arc<AppState>>,
    _admin: OtaAdmin,
    Path(id): Path<i64>,
) -> Result<Json<Action>, DdiError> {
    if !st
        .store
        .set_action_status(
            id,
            &[status::RUNNING, status::CONFIRMING],
            status::CANCELING,
        )
        .map_err(internal)?
    {
        return Err(err(
            StatusCode::CONFLICT,
            "conflict",
            format!("action {id} is not running"),
        ));
    }
    let a = st
        .store
        .action(id)
        .map_err(internal)?
        .ok_or_else(|| internal("vanished"))?;
    Ok(Json(a))
}

/// An id the DDI server serves: an enrolled device, or a controller registered by its
/// gateway-token poll.
pub fn is_ota_target(st: &crate::store::Store, id: &str) -> anyhow::Result<bool> {
    Ok(st.get(id)?.is_some() || st.ddi_target(id)?.is_some())
}

async fn list_ddi_targets(
    State(st): State<Arc<AppState>>,
    _admin: OtaAdmin,
) -> Result<Json<Vec<crate::ota_store::DdiTarget>>, DdiError> {
    Ok(Json(st.store.ddi_targets().map_err(internal)?))
}

/// What the DDI server knows of a device: its configData and its actions.
#[derive(serde::Serialize, serde::Deserialize, Debug)]
pub struct DeviceOta {
    pub device_id: String,
    /// `enrolled` (certificate from this bridge), `ddi` (registered by a gateway-token poll)
    /// or `unknown`.
    pub registration: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_confirm: Option<crate::ota_store::AutoConfirm>,
    pub config_data: Option<std::collections::BTreeMap<String, String>>,
    pub actions: Vec<Action>,
}

pub fn device_ota(st: &crate::store::Store, id: &str) -> anyhow::Result<DeviceOta> {
    let registration = if st.get(id)?.is_some() {
        "enrolled"
    } else if st.ddi_target(id)?.is_some() {
        "ddi"
    } else {
        "unknown"
    };
    Ok(DeviceOta {
        device_id: id.to_string(),
        registration: registration.to_string(),
        auto_confirm: st.auto_confirm(id)?,
        config_data: st.config_data(id)?,
        actions: st.actions(Some(id))?,
    })
}

async fn show_device(
    State(st): State<Arc<AppState>>,
    _admin: OtaAdmin,
    Path(id): Path<String>,
) -> Result<Json<DeviceOta>, DdiError> {
    Ok(Json(device_ota(&st.store, &id).map_err(internal)?))
}

async fn new_target_token(
    State(st): State<Arc<AppState>>,
    _admin: OtaAdmin,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, DdiError> {
    if !is_ota_target(&st.store, &id).map_err(internal)? {
        return Err(err(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no device {id} (neither enrolled nor registered by a DDI poll)"),
        ));
    }
    let token = crate::api::random_token();
    st.store.set_target_token(&id, &token).map_err(internal)?;
    Ok(Json(
        serde_json::json!({ "device_id": id, "target_token": token }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// hawkBit's DdiRootController for every action type and window state.
    #[test]
    fn handling_types_are_hawkbits() {
        use ddi::HandlingType::{Attempt, Forced, Skip};
        use ddi::MaintenanceWindow::{Available, Unavailable};
        let table = [
            (ActionKind::Forced, None, (Forced, Forced, None)),
            (
                ActionKind::Forced,
                Some(true),
                (Forced, Forced, Some(Available)),
            ),
            (
                ActionKind::Forced,
                Some(false),
                (Forced, Skip, Some(Unavailable)),
            ),
            (ActionKind::Soft, None, (Attempt, Attempt, None)),
            (
                ActionKind::Soft,
                Some(true),
                (Attempt, Attempt, Some(Available)),
            ),
            (
                ActionKind::Soft,
                Some(false),
                (Attempt, Skip, Some(Unavailable)),
            ),
            (ActionKind::Downloadonly, None, (Forced, Skip, None)),
            (
                ActionKind::Downloadonly,
                Some(true),
                (Forced, Skip, Some(Available)),
            ),
            (
                ActionKind::Downloadonly,
                Some(false),
                (Forced, Skip, Some(Unavailable)),
            ),
        ];
        for (kind, window, want) in table {
            assert_eq!(handling(kind, window), want, "{kind:?} window {window:?}");
        }
    }

    #[test]
    fn a_group_assignment_reaches_its_members_only() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let st =
            crate::store::Store::open(&dir.path().join("db")).unwrap_or_else(|e| panic!("{e}"));
        let pool: ipnet::Ipv4Net = "10.9.0.0/24".parse().unwrap_or_else(|e| panic!("{e}"));
        for (id, group) in [("a", "line-3"), ("b", "line-3"), ("c", "line-4")] {
            st.record(
                id,
                "00",
                "01",
                "2030-01-01T00:00:00Z",
                None,
                pool,
                &Default::default(),
                "fleet",
            )
            .unwrap_or_else(|e| panic!("{e}"));
            assert!(
                st.set_group(id, Some(group))
                    .unwrap_or_else(|e| panic!("{e}"))
            );
        }
        // A squatter claiming line-3 in its metadata is not a member.
        let mut meta = serde_json::Map::new();
        meta.insert("group".into(), "line-3".into());
        st.record(
            "squat",
            "00",
            "02",
            "2030-01-01T00:00:00Z",
            None,
            pool,
            &meta,
            "fleet",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let m = st
            .add_module("os", "1", "os.raucb", 1, "s", "s1", "m")
            .unwrap_or_else(|e| panic!("{e}"));
        let req = AssignRequest {
            module: m.id,
            devices: vec!["c".into()],
            group: Some("line-3".into()),
            kind: ActionKind::Soft,
            maintenance_window: None,
            confirm: false,
        };
        let actions = assign_to(&st, &req).unwrap_or_else(|e| panic!("{e}"));
        let mut who: Vec<_> = actions.iter().map(|a| a.device_id.as_str()).collect();
        who.sort();
        assert_eq!(who, ["a", "b", "c"]);
        let none = AssignRequest {
            devices: vec!["zz".into()],
            group: None,
            ..req
        };
        assert!(
            assign_to(&st, &none)
                .unwrap_err()
                .contains("neither enrolled nor registered")
        );
    }

    #[test]
    fn if_match_is_rfc_9110() {
        let e = "\"abc\"";
        assert!(if_match_passes(None, e));
        assert!(if_match_passes(Some("*"), e));
        assert!(if_match_passes(Some("\"x\", \"abc\""), e));
        assert!(!if_match_passes(Some("W/\"abc\""), e));
        assert!(!if_match_passes(Some("\"abcd\""), e));
        assert!(!if_match_passes(Some(""), e));
    }

    #[test]
    fn filenames_cannot_escape_the_store() {
        assert!(is_safe_filename("os-2.0.raucb"));
        for bad in ["", "../x", ".hidden", "a/b", "a b"] {
            assert!(!is_safe_filename(bad), "{bad}");
        }
    }
}
