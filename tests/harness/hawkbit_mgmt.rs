//! A hawkBit stand-in for the tests (hawkBit needs Maven, which this machine cannot reach):
//! the Management API paths the bridge provisions targets with, checked against hawkBit's own
//! OpenAPI document (`tests/fixtures/hawkbit-mgmt/`), and the DDI root poll so that a device's
//! TargetToken can be tried against the target the bridge created.
//!
//! Every request is checked against the document before it is served: the path must be one
//! of its paths and the method one of that path's operations, every query parameter and path
//! parameter one the operation declares (path parameters of the declared type), the body
//! present exactly when the operation has a `requestBody`, with one of its content types, and
//! valid against its schema (`$ref`s resolved; types, `required`, and no property the schema
//! does not name). Anything else is recorded as a violation (the tests require none) and
//! answered 400. Answers use the document's statuses and shapes (201 with the created
//! entities, 409 for an existing controllerId, 401 without valid Basic credentials, 404) and
//! are checked against its response schemas as well. hawkBit's error body is ExceptionInfo
//! with the error codes of hawkBit's `SpServerError` (`hawkbit.server.error.repo.
//! entitiyAlreadyExists` for 409, as spelled there).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn spec() -> &'static serde_json::Value {
    static SPEC: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    SPEC.get_or_init(|| {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/hawkbit-mgmt/hawkbit-mgmt-openapi-3.0.1.json");
        serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
    })
}

/// `#/components/schemas/X` → the schema.
fn resolve(schema: &serde_json::Value) -> &serde_json::Value {
    match schema["$ref"].as_str() {
        Some(r) => {
            let name = r.trim_start_matches("#/components/schemas/");
            resolve(&spec()["components"]["schemas"][name])
        }
        None => schema,
    }
}

/// Violations of `schema` by `v`, each with its JSON path.
pub fn validate(
    schema: &serde_json::Value,
    v: &serde_json::Value,
    at: &str,
    out: &mut Vec<String>,
) {
    let s = resolve(schema);
    let ty = s["type"].as_str();
    let ok = match (ty, v) {
        (None, _) => true,
        (Some("object"), serde_json::Value::Object(_)) => true,
        (Some("array"), serde_json::Value::Array(_)) => true,
        (Some("string"), serde_json::Value::String(_)) => true,
        (Some("boolean"), serde_json::Value::Bool(_)) => true,
        (Some("integer"), serde_json::Value::Number(n)) => n.is_i64() || n.is_u64(),
        (Some("number"), serde_json::Value::Number(_)) => true,
        _ => false,
    };
    if !ok {
        out.push(format!("{at}: expected {}, got {v}", ty.unwrap_or("?")));
        return;
    }
    if let Some(allowed) = s["enum"].as_array()
        && !allowed.contains(v)
    {
        out.push(format!("{at}: {v} is not one of {allowed:?}"));
    }
    match v {
        serde_json::Value::Object(o) => {
            let props = s["properties"].as_object();
            for r in s["required"].as_array().into_iter().flatten() {
                if let Some(k) = r.as_str()
                    && !o.contains_key(k)
                {
                    out.push(format!("{at}: required property {k:?} missing"));
                }
            }
            if let Some(props) = props {
                for (k, val) in o {
                    match props.get(k) {
                        Some(ps) => validate(ps, val, &format!("{at}.{k}"), out),
                        None if s["additionalProperties"].is_object() => {}
                        None => out.push(format!("{at}: property {k:?} is not in the schema")),
                    }
                }
            }
        }
        serde_json::Value::Array(a) => {
            for (i, item) in a.iter().enumerate() {
                validate(&s["items"], item, &format!("{at}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// The document's path template matching `path`, and the path parameters.
fn match_path(path: &str) -> Option<(String, HashMap<String, String>)> {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    for template in spec()["paths"].as_object()?.keys() {
        let t: Vec<&str> = template.split('/').collect();
        if t.len() != segs.len() {
            continue;
        }
        let mut params = HashMap::new();
        let fits = t.iter().zip(&segs).all(|(a, b)| {
            if a.starts_with('{') && a.ends_with('}') {
                params.insert(a[1..a.len() - 1].to_string(), b.to_string());
                !b.is_empty()
            } else {
                a == b
            }
        });
        if fits {
            return Some((template.clone(), params));
        }
    }
    None
}

#[derive(Default)]
pub struct Target {
    pub id: i64,
    pub name: String,
    pub description: Option<String>,
    pub security_token: String,
    pub target_type: Option<i64>,
    pub tags: Vec<i64>,
    pub created_at: i64,
    pub updated: u32,
}

#[derive(Default)]
pub struct World {
    pub targets: HashMap<String, Target>,
    pub tags: Vec<(i64, String)>,
    pub target_types: Vec<(i64, String)>,
    next_id: i64,
    /// Every request that broke the document (the tests require none).
    pub violations: Vec<String>,
    /// (method, path, status) of every Management API request.
    pub requests: Vec<(String, String, u16)>,
    /// (controllerId, authorized) of every DDI root poll.
    pub polls: Vec<(String, bool)>,
    /// When each DDI root poll arrived (same order as `polls`).
    pub poll_times: Vec<std::time::Instant>,
    /// Answer DDI polls 429 with `Retry-After: <n>` while set (hawkBit's per-client read
    /// limit, as devices behind one NAT meet it).
    pub throttle_polls: Option<u64>,
    /// Answer every Management API request with this status (an outage) while set.
    pub fail_with: Option<u16>,
    /// Delay every Management API answer (a slow hawkBit).
    pub delay: Option<Duration>,
}

struct Inner {
    world: Arc<Mutex<World>>,
    basic: String,
}

pub struct HawkbitMgmt {
    pub port: u16,
    pub world: Arc<Mutex<World>>,
    _task: tokio::task::JoinHandle<()>,
}

fn exception(status: StatusCode, class: &str, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(
            serde_json::json!({"exceptionClass": class, "errorCode": code,
            "message": message}),
        ),
    )
        .into_response()
}

impl HawkbitMgmt {
    /// Serve on a free loopback port with TLS `cert` (chain PEM) and `key`; Basic
    /// `user`:`password`.
    pub async fn start(cert: &Path, key: &Path, user: &str, password: &str) -> Self {
        use base64::Engine;
        use rustls_pki_types::pem::PemObject;
        let chain: Vec<rustls_pki_types::CertificateDer<'static>> =
            rustls_pki_types::CertificateDer::pem_file_iter(cert)
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
        let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
        let tls = crate::https::server_config(chain, key);
        let world: Arc<Mutex<World>> = Arc::default();
        let inner = Arc::new(Inner {
            world: world.clone(),
            basic: format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
            ),
        });
        let app = axum::Router::new().fallback(handle).with_state(inner);
        let (port, task) = crate::https::serve(app, tls).await;
        Self {
            port,
            world,
            _task: task,
        }
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().unwrap()
    }
}

async fn handle(
    State(h): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    if !path.starts_with("/rest/") {
        return ddi_poll(&h, &method, &path, &headers);
    }
    let delay = h.world.lock().unwrap().delay;
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    let r = mgmt(&h, &method, &uri, &headers, &body);
    let status = r.status().as_u16();
    h.world
        .lock()
        .unwrap()
        .requests
        .push((method.to_string(), path, status));
    r
}

/// `GET /{tenant}/controller/v1/{controllerId}` with `TargetToken`: 200 with a polling config
/// when the token is the target's securityToken, 401 otherwise (hawkBit's DDI security).
fn ddi_poll(h: &Inner, method: &Method, path: &str, headers: &HeaderMap) -> Response {
    let segs: Vec<&str> = path.split('/').collect();
    let [_, _tenant, "controller", "v1", cid] = segs.as_slice() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if method != Method::GET {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("TargetToken "))
        .unwrap_or_default();
    let mut w = h.world.lock().unwrap();
    w.poll_times.push(std::time::Instant::now());
    if let Some(secs) = w.throttle_polls {
        w.polls.push((cid.to_string(), false));
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", secs.to_string())],
        )
            .into_response();
    }
    let ok = w
        .targets
        .get(*cid)
        .is_some_and(|t| !token.is_empty() && t.security_token == token);
    w.polls.push((cid.to_string(), ok));
    if !ok {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    axum::Json(serde_json::json!({"config": {"polling": {"sleep": "00:00:05"}}, "_links": {}}))
        .into_response()
}

fn target_json(cid: &str, t: &Target) -> serde_json::Value {
    let mut v = serde_json::json!({
        "createdBy": "thingsly-bridge", "createdAt": t.created_at,
        "lastModifiedBy": "thingsly-bridge", "lastModifiedAt": t.created_at + t.updated as i64,
        "name": t.name, "controllerId": cid, "updateStatus": "registered",
        "securityToken": t.security_token, "requestAttributes": true,
        "_links": {"self": {"href": format!("/rest/v1/targets/{cid}")}},
    });
    if let Some(d) = &t.description {
        v["description"] = d.clone().into();
    }
    if let Some(ty) = t.target_type {
        v["targetType"] = ty.into();
    }
    v
}

fn mgmt(h: &Inner, method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Response {
    let path = uri.path();
    // Spring Security answers before anything else, with an empty body.
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(h.basic.as_str()) {
        return (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", "Basic realm=\"hawkBit\"")],
        )
            .into_response();
    }
    let mut w = h.world.lock().unwrap();
    let mut violations = Vec::new();
    let Some((template, params)) = match_path(path) else {
        w.violations
            .push(format!("{method} {path}: not a path of the document"));
        return StatusCode::NOT_FOUND.into_response();
    };
    let m = method.as_str().to_ascii_lowercase();
    let Some(op) = spec()["paths"][&template].get(&m) else {
        w.violations.push(format!(
            "{method} {template}: not an operation of the document"
        ));
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    };
    let declared: Vec<&serde_json::Value> =
        op["parameters"].as_array().into_iter().flatten().collect();
    for (k, _) in form_urlencoded(uri.query().unwrap_or_default()) {
        if !declared
            .iter()
            .any(|p| p["in"] == "query" && p["name"] == k.as_str())
        {
            violations.push(format!("query parameter {k:?} is not declared"));
        }
    }
    for (k, v) in &params {
        match declared
            .iter()
            .find(|p| p["in"] == "path" && p["name"] == k.as_str())
        {
            None => violations.push(format!("path parameter {k:?} is not declared")),
            Some(p) if p["schema"]["type"] == "integer" && v.parse::<i64>().is_err() => {
                violations.push(format!("path parameter {k} = {v:?} is not an integer"))
            }
            _ => {}
        }
    }
    let parsed: Option<serde_json::Value> = if body.is_empty() {
        None
    } else {
        serde_json::from_slice(body).ok()
    };
    match (op.get("requestBody"), &parsed) {
        (Some(rb), Some(v)) => {
            let ct = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_string();
            match rb["content"].get(&ct) {
                Some(c) => validate(&c["schema"], v, "body", &mut violations),
                None => violations.push(format!("content type {ct:?} is not accepted")),
            }
        }
        (Some(_), None) => violations.push("a body is required".into()),
        (None, Some(_)) => violations.push("this operation takes no body".into()),
        (None, None) if !body.is_empty() => violations.push("the body is not JSON".into()),
        (None, None) => {}
    }
    if !violations.is_empty() {
        for v in &violations {
            w.violations.push(format!("{method} {path}: {v}"));
        }
        return exception(
            StatusCode::BAD_REQUEST,
            "org.eclipse.hawkbit.rest.exception.MessageNotReadableException",
            "hawkbit.server.error.rest.body.notReadable",
            &violations.join("; "),
        );
    }
    if let Some(s) = w.fail_with {
        return exception(
            StatusCode::from_u16(s).unwrap(),
            "java.lang.RuntimeException",
            "hawkbit.server.error.unknown",
            "test outage",
        );
    }
    let now = super::step_ca::unix_now() as i64 * 1000;
    let body = parsed.unwrap_or_default();
    let (status, answer) = match (m.as_str(), template.as_str()) {
        ("post", "/rest/v1/targets") => {
            let items = body.as_array().cloned().unwrap_or_default();
            if let Some(dup) = items
                .iter()
                .filter_map(|t| t["controllerId"].as_str())
                .find(|c| w.targets.contains_key(*c))
            {
                return exception(
                    StatusCode::CONFLICT,
                    "org.eclipse.hawkbit.repository.exception.EntityAlreadyExistsException",
                    "hawkbit.server.error.repo.entitiyAlreadyExists",
                    &format!("target {dup} already exists"),
                );
            }
            let mut out = Vec::new();
            for t in items {
                w.next_id += 1;
                let cid = t["controllerId"].as_str().unwrap_or_default().to_string();
                let target = Target {
                    id: w.next_id,
                    name: t["name"].as_str().unwrap_or_default().into(),
                    description: t["description"].as_str().map(String::from),
                    // hawkBit generates one when none is given.
                    security_token: t["securityToken"]
                        .as_str()
                        .map(String::from)
                        .unwrap_or_else(|| format!("generated-{}", w.next_id)),
                    target_type: t["targetType"].as_i64(),
                    tags: Vec::new(),
                    created_at: now,
                    updated: 0,
                };
                out.push(target_json(&cid, &target));
                w.targets.insert(cid, target);
            }
            (StatusCode::CREATED, serde_json::Value::Array(out))
        }
        ("get", "/rest/v1/targets/{targetId}") => match w.targets.get(&params["targetId"]) {
            Some(t) => (StatusCode::OK, target_json(&params["targetId"], t)),
            None => return not_found(&params["targetId"]),
        },
        ("put", "/rest/v1/targets/{targetId}") => {
            let cid = params["targetId"].clone();
            let Some(t) = w.targets.get_mut(&cid) else {
                return not_found(&cid);
            };
            if let Some(n) = body["name"].as_str() {
                t.name = n.into();
            }
            if let Some(s) = body["securityToken"].as_str() {
                t.security_token = s.into();
            }
            if let Some(d) = body["description"].as_str() {
                t.description = Some(d.into());
            }
            if let Some(ty) = body["targetType"].as_i64() {
                t.target_type = Some(ty);
            }
            t.updated += 1;
            (StatusCode::OK, target_json(&cid, t))
        }
        ("get", "/rest/v1/targettags") | ("get", "/rest/v1/targettypes") => {
            let q = form_urlencoded(uri.query().unwrap_or_default())
                .into_iter()
                .find(|(k, _)| k == "q")
                .map(|(_, v)| v)
                .unwrap_or_default();
            let name = q.strip_prefix("name==").unwrap_or_default();
            let list = if template.ends_with("targettags") {
                &w.tags
            } else {
                &w.target_types
            };
            let content: Vec<serde_json::Value> = list
                .iter()
                .filter(|(_, n)| n == name)
                .map(|(id, n)| {
                    let mut e = serde_json::json!({"id": id, "name": n, "createdAt": now});
                    if template.ends_with("targettypes") {
                        e["key"] = n.clone().into();
                    }
                    e
                })
                .collect();
            (
                StatusCode::OK,
                serde_json::json!({"content": content, "total": content.len(), "size": content.len()}),
            )
        }
        ("post", "/rest/v1/targettags") => {
            let mut out = Vec::new();
            for t in body.as_array().cloned().unwrap_or_default() {
                w.next_id += 1;
                let (id, name) = (
                    w.next_id,
                    t["name"].as_str().unwrap_or_default().to_string(),
                );
                w.tags.push((id, name.clone()));
                out.push(serde_json::json!({"id": id, "name": name, "createdAt": now}));
            }
            (StatusCode::CREATED, serde_json::Value::Array(out))
        }
        ("put", "/rest/v1/targettags/{targetTagId}/assigned") => {
            let tag: i64 = params["targetTagId"].parse().unwrap_or_default();
            if !w.tags.iter().any(|(id, _)| *id == tag) {
                return not_found(&params["targetTagId"]);
            }
            for cid in body.as_array().cloned().unwrap_or_default() {
                let Some(t) = w.targets.get_mut(cid.as_str().unwrap_or_default()) else {
                    return not_found(cid.as_str().unwrap_or_default());
                };
                if !t.tags.contains(&tag) {
                    t.tags.push(tag);
                }
            }
            return StatusCode::OK.into_response();
        }
        _ => {
            w.violations
                .push(format!("{method} {template}: not served by this stand-in"));
            return StatusCode::NOT_IMPLEMENTED.into_response();
        }
    };
    // The answer must be what the document says this status carries.
    if let Some(schema) =
        op["responses"][status.as_str()]["content"]["application/hal+json"].get("schema")
    {
        let mut bad = Vec::new();
        validate(schema, &answer, "answer", &mut bad);
        w.violations.extend(
            bad.into_iter()
                .map(|b| format!("stand-in {method} {path}: {b}")),
        );
    }
    (
        status,
        [("content-type", "application/hal+json")],
        answer.to_string(),
    )
        .into_response()
}

fn not_found(what: &str) -> Response {
    exception(
        StatusCode::NOT_FOUND,
        "org.eclipse.hawkbit.repository.exception.EntityNotFoundException",
        "hawkbit.server.error.repo.entitiyNotFound",
        &format!("{what} not found"),
    )
}

fn form_urlencoded(q: &str) -> Vec<(String, String)> {
    serde_urlencoded::from_str(q).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_read_and_its_schemas_check_bodies() {
        let op = &spec()["paths"]["/rest/v1/targets"]["post"];
        let schema = &op["requestBody"]["content"]["application/json"]["schema"];
        let mut v = Vec::new();
        validate(
            schema,
            &serde_json::json!([{"controllerId": "a", "name": "a"}]),
            "b",
            &mut v,
        );
        assert!(v.is_empty(), "{v:?}");
        validate(
            schema,
            &serde_json::json!([{"controllerId": "a"}]),
            "b",
            &mut v,
        );
        validate(
            schema,
            &serde_json::json!([{"controllerId": "a", "name": "a", "x": 1}]),
            "b",
            &mut v,
        );
        validate(
            schema,
            &serde_json::json!([{"controllerId": "a", "name": "a", "targetType": "t"}]),
            "b",
            &mut v,
        );
        assert_eq!(v.len(), 3, "{v:?}");
        assert_eq!(
            match_path("/rest/v1/targettags/5/assigned")
                .map(|m| m.0)
                .as_deref(),
            Some("/rest/v1/targettags/{targetTagId}/assigned")
        );
        assert_eq!(
            form_urlencoded("q=name%3D%3Dline-3&limit=2")[0].1,
            "name==line-3"
        );
    }
}
