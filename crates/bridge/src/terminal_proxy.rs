//! The terminal proxy: `GET /terminal?deviceId=…&token=<operator JWT>` (WebSocket, ttyd
//! protocol) → the device's terminal at `ws://<tunnel address>:<device_port>/ws`.
//!
//! Order matters, and every refusal is a real HTTP status before any upgrade:
//! operator token (401) → policy (403, before the device is contacted) → device in the
//! registry (404) → connection to the device (502/504) → 101 to the browser. The browser's
//! first message (`{"AuthToken","columns","rows"}`) is forwarded with `AuthToken` replaced by
//! a fresh single-use ticket for this device, so ttyd's stock page works unchanged. Then
//! messages are relayed one at a time in each direction: a message is only read from one side
//! once the other side took the previous one, so a slow browser slows the device down (whose
//! own backpressure pauses the PTY) instead of filling the bridge's memory.

use crate::authz::{Authz, TerminalGrant};
use crate::config::TerminalSection;
use crate::error::fail;
use crate::operator_auth::{AuthError, Operator, OperatorAuth, OperatorAuthConfig};
use crate::state::AppState;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thingsly_proto::enroll::error_code;
use thingsly_terminal::ticket::{Claims, TicketSigner};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// The browser's first message must arrive within this; the device allows 10 s from its
/// accept, which happened just before the upgrade.
const HELLO_TIMEOUT: Duration = Duration::from_secs(8);
/// Output frames from the device are ≤ 16 KiB; input is typed or pasted text.
const MAX_MESSAGE: usize = thingsly_terminal::MAX_INPUT_MESSAGE;

pub struct TerminalProxy {
    operators: OperatorAuth,
    policy: Authz,
    tickets: TicketSigner,
    device_port: u16,
    ticket_lifetime: Duration,
    connect_timeout: Duration,
    slots: Arc<Semaphore>,
}

impl TerminalProxy {
    pub async fn from_config(
        t: &TerminalSection,
        ticket_private_pem: &str,
    ) -> anyhow::Result<Self> {
        let ca = std::fs::read(&t.jwks_ca)
            .map_err(|e| anyhow::anyhow!("terminal.jwks_ca {}: {e}", t.jwks_ca.display()))?;
        let operators = OperatorAuth::new(
            OperatorAuthConfig {
                jwks_url: t.jwks_url.clone(),
                issuer: t.issuer.clone(),
                audience: t.audience.clone(),
                min_refresh: t.jwks_min_refresh,
                leeway: t.leeway,
            },
            &ca,
        )?;
        Ok(Self {
            operators,
            policy: Authz::load(t.policy_model.as_deref(), &t.policy).await?,
            tickets: TicketSigner::from_pem(ticket_private_pem.as_bytes())
                .map_err(anyhow::Error::msg)?,
            device_port: t.device_port,
            ticket_lifetime: t.ticket_lifetime,
            connect_timeout: t.connect_timeout,
            slots: Arc::new(Semaphore::new(t.max_sessions)),
        })
    }

    pub fn policy(&self) -> &Authz {
        &self.policy
    }
}

/// `GET /terminal`.
pub async fn handle(State(app): State<Arc<AppState>>, req: Request) -> Response {
    let Some(proxy) = app.terminal.as_ref() else {
        return fail(
            StatusCode::NOT_FOUND,
            error_code::NOT_FOUND,
            "terminal proxy not configured (add [terminal] to bridge.toml)",
        )
        .into_response();
    };
    let query = parse_query(req.uri().query().unwrap_or(""));
    let headers = req.headers();
    let Some(ws_key) = websocket_key(headers) else {
        return fail(
            StatusCode::UPGRADE_REQUIRED,
            error_code::UPGRADE_REQUIRED,
            "GET /terminal is a WebSocket endpoint (Upgrade: websocket, version 13)",
        )
        .into_response();
    };

    // Who: the operator's token from the query (browsers cannot set headers on a WebSocket)
    // or `Authorization: Bearer`.
    let token = query
        .token
        .clone()
        .or_else(|| crate::auth::bearer(headers).map(String::from))
        .unwrap_or_default();
    let operator = match proxy.operators.verify(&token).await {
        Ok(op) => op,
        Err(e) => return unauthorized(&e),
    };
    let Some(device_id) = query
        .device_id
        .filter(|d| thingsly_proto::enroll::is_valid_device_id(d))
    else {
        return fail(
            StatusCode::BAD_REQUEST,
            error_code::BAD_DEVICE_ID,
            "deviceId missing or not [A-Za-z0-9._-]{1,64}",
        )
        .into_response();
    };

    // What they may do there, before anything reaches the device.
    let grant = proxy
        .policy
        .terminal(&operator.name, &operator.roles, &device_id)
        .await;
    if grant == TerminalGrant::Denied {
        tracing::warn!(target: "audit", operator = %operator.name, device = %device_id,
            "terminal refused by policy");
        return fail(
            StatusCode::FORBIDDEN,
            error_code::FORBIDDEN,
            format!("{} may not open a terminal on {device_id}", operator.name),
        )
        .into_response();
    }

    let address = match app.store.get(&device_id) {
        Ok(Some(d)) => d.record.wireguard_address,
        Ok(None) => {
            return fail(
                StatusCode::NOT_FOUND,
                error_code::NOT_FOUND,
                format!("device {device_id} is not enrolled"),
            )
            .into_response();
        }
        Err(e) => {
            return fail(
                StatusCode::INTERNAL_SERVER_ERROR,
                error_code::INTERNAL,
                e.to_string(),
            )
            .into_response();
        }
    };
    let Some(ip) = address
        .split('/')
        .next()
        .and_then(|a| a.parse::<IpAddr>().ok())
    else {
        return fail(
            StatusCode::INTERNAL_SERVER_ERROR,
            error_code::INTERNAL,
            format!("device {device_id} has no usable tunnel address ({address:?})"),
        )
        .into_response();
    };
    let Ok(slot) = proxy.slots.clone().try_acquire_owned() else {
        return fail(
            StatusCode::SERVICE_UNAVAILABLE,
            error_code::BUSY,
            "terminal proxy session limit reached",
        )
        .into_response();
    };

    let target = SocketAddr::new(ip, proxy.device_port);
    let device = match connect_device(target, proxy.connect_timeout).await {
        Ok(ws) => ws,
        Err((status, msg)) => {
            tracing::warn!(device = %device_id, %target, error = %msg, "device unreachable");
            return fail(
                status,
                error_code::DEVICE_UNREACHABLE,
                format!("{device_id}: {msg}"),
            )
            .into_response();
        }
    };

    let offers_tty = thingsly_terminal::offers_tty(headers);
    let accept = derive_accept_key(ws_key.as_bytes());
    let session = Session {
        operator,
        device_id,
        read_only: grant == TerminalGrant::ReadOnly,
        target,
    };
    let ticket = match session.ticket(proxy) {
        Ok(t) => t,
        Err(e) => {
            return fail(StatusCode::INTERNAL_SERVER_ERROR, error_code::INTERNAL, e)
                .into_response();
        }
    };
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "terminal upgrade failed");
                return;
            }
        };
        let browser = WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            Some(ws_config()),
        )
        .await;
        session.relay(browser, device, ticket).await;
        drop(slot);
    });

    let mut resp = Response::new(axum::body::Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if offers_tty {
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("tty"),
        );
    }
    resp
}

#[derive(Default, serde::Deserialize)]
struct TerminalQuery {
    #[serde(rename = "deviceId")]
    device_id: Option<String>,
    token: Option<String>,
}

/// Unknown parameters are ignored (ttyd's page adds its own); a malformed query counts as empty.
fn parse_query(q: &str) -> TerminalQuery {
    serde_urlencoded::from_str(q).unwrap_or_default()
}

/// The client's `Sec-WebSocket-Key` if this is a well-formed version 13 upgrade request.
fn websocket_key(h: &HeaderMap) -> Option<String> {
    let has = |name: header::HeaderName, token: &str| {
        h.get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has(header::CONNECTION, "upgrade")
        || !has(header::UPGRADE, "websocket")
        || h.get(header::SEC_WEBSOCKET_VERSION)?.as_bytes() != b"13"
    {
        return None;
    }
    Some(h.get(header::SEC_WEBSOCKET_KEY)?.to_str().ok()?.to_string())
}

fn unauthorized(e: &AuthError) -> Response {
    tracing::info!(target: "audit", reason = %e, "terminal refused: operator token");
    let status = match e {
        AuthError::Jwks(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::UNAUTHORIZED,
    };
    let mut r = fail(status, error_code::BAD_TOKEN, e.to_string()).into_response();
    if status == StatusCode::UNAUTHORIZED {
        let desc = e.to_string().replace('"', "'");
        if let Ok(v) = HeaderValue::from_str(&format!(
            "Bearer error=\"invalid_token\", error_description=\"{desc}\""
        )) {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
    }
    r
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
        .write_buffer_size(0)
        // One whole message (a 1 MiB paste) must fit; it is only held while being written.
        .max_write_buffer_size(MAX_MESSAGE + 64 * 1024)
}

type DeviceWs = WebSocketStream<TcpStream>;

async fn connect_device(
    target: SocketAddr,
    timeout: Duration,
) -> Result<DeviceWs, (StatusCode, String)> {
    let attempt = async {
        let tcp = TcpStream::connect(target)
            .await
            .map_err(|e| (StatusCode::BAD_GATEWAY, format!("connect {target}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let mut req = format!("ws://{target}/ws")
            .into_client_request()
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        req.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("tty"),
        );
        let (ws, _) = tokio_tungstenite::client_async_with_config(req, tcp, Some(ws_config()))
            .await
            .map_err(|e| {
                (
                    StatusCode::BAD_GATEWAY,
                    format!("terminal handshake with {target}: {e}"),
                )
            })?;
        Ok(ws)
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| {
            Err((
                StatusCode::GATEWAY_TIMEOUT,
                format!("no answer from {target} within {}s", timeout.as_secs()),
            ))
        })
}

struct Session {
    operator: Operator,
    device_id: String,
    read_only: bool,
    target: SocketAddr,
}

/// How a relayed session ended, from the proxy's point of view.
enum Ended {
    Device(Option<CloseFrame>),
    Browser(Option<CloseFrame>),
    DeviceLost(String),
    BrowserLost(String),
}

impl Session {
    fn ticket(&self, proxy: &TerminalProxy) -> Result<String, String> {
        let mut jti = [0u8; 16];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut jti);
        let mut claims = Claims::new(
            &self.operator.name,
            &self.device_id,
            proxy.ticket_lifetime,
            &hex::encode(jti),
        );
        claims.read_only = self.read_only;
        proxy.tickets.sign(&claims)
    }

    async fn relay<B>(self, mut browser: WebSocketStream<B>, mut device: DeviceWs, ticket: String)
    where
        B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let started = Instant::now();
        tracing::info!(target: "audit", operator = %self.operator.name, device = %self.device_id,
            target = %self.target, read_only = self.read_only, "terminal session start");

        // The hello: same JSON, the operator's AuthToken swapped for the device ticket.
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, browser.next()).await {
            Ok(Some(Ok(m @ (Message::Text(_) | Message::Binary(_))))) => with_ticket(m, &ticket),
            Ok(_) => Err("closed before the first message".to_string()),
            Err(_) => Err(format!(
                "no first message within {}s",
                HELLO_TIMEOUT.as_secs()
            )),
        };
        let hello = match hello {
            Ok(h) => h,
            Err(e) => {
                thingsly_terminal::close(&mut browser, CloseCode::Policy, &e).await;
                thingsly_terminal::close(&mut device, CloseCode::Away, "operator gone").await;
                tracing::info!(target: "audit", operator = %self.operator.name,
                    device = %self.device_id, reason = %e, "terminal session refused");
                return;
            }
        };
        let mut bytes_in = 0u64; // browser → device
        let mut bytes_out = 0u64; // device → browser
        let ended = if let Err(e) = device.send(hello).await {
            Ended::DeviceLost(e.to_string())
        } else {
            let (mut b_tx, mut b_rx) = (&mut browser).split();
            let (mut d_tx, mut d_rx) = (&mut device).split();
            let up = async {
                loop {
                    match b_rx.next().await {
                        Some(Ok(Message::Close(f))) => return Ended::Browser(f),
                        Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                            bytes_in += m.len() as u64;
                            if let Err(e) = d_tx.send(m).await {
                                return Ended::DeviceLost(e.to_string());
                            }
                        }
                        Some(Ok(_)) => {} // ping/pong: answered by tungstenite per leg
                        Some(Err(e)) => return Ended::BrowserLost(e.to_string()),
                        None => return Ended::BrowserLost("connection closed".into()),
                    }
                }
            };
            let down = async {
                loop {
                    match d_rx.next().await {
                        Some(Ok(Message::Close(f))) => return Ended::Device(f),
                        Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                            bytes_out += m.len() as u64;
                            if let Err(e) = b_tx.send(m).await {
                                return Ended::BrowserLost(e.to_string());
                            }
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Ended::DeviceLost(e.to_string()),
                        None => return Ended::DeviceLost("connection closed".into()),
                    }
                }
            };
            tokio::select! {
                e = up => e,
                e = down => e,
            }
        };

        // Tell the other side, with the same code and reason where there was one.
        let reason = match &ended {
            Ended::Device(f) => {
                let f = f.clone().unwrap_or(CloseFrame {
                    code: CloseCode::Normal,
                    reason: Utf8Bytes::from_static(""),
                });
                thingsly_terminal::close(&mut browser, f.code, &f.reason).await;
                format!("device closed: {} {}", u16::from(f.code), f.reason)
            }
            Ended::Browser(f) => {
                let f = f.clone().unwrap_or(CloseFrame {
                    code: CloseCode::Normal,
                    reason: Utf8Bytes::from_static(""),
                });
                thingsly_terminal::close(&mut device, f.code, &f.reason).await;
                format!("operator closed: {} {}", u16::from(f.code), f.reason)
            }
            Ended::DeviceLost(e) => {
                thingsly_terminal::close(&mut browser, CloseCode::Error, "device connection lost")
                    .await;
                format!("device connection lost: {e}")
            }
            Ended::BrowserLost(e) => {
                thingsly_terminal::close(&mut device, CloseCode::Away, "operator disconnected")
                    .await;
                format!("operator connection lost: {e}")
            }
        };
        tracing::info!(target: "audit", operator = %self.operator.name, device = %self.device_id,
            bytes_in, bytes_out, seconds = started.elapsed().as_secs(), end = %reason,
            "terminal session end");
    }
}

/// The browser's hello with `AuthToken` set to the device ticket, in the same frame type.
fn with_ticket(m: Message, ticket: &str) -> Result<Message, String> {
    let binary = matches!(m, Message::Binary(_));
    let mut hello: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&m.into_data())
            .map_err(|e| format!("first message is not the JSON hello: {e}"))?;
    hello.insert("AuthToken".into(), ticket.into());
    let text = serde_json::Value::Object(hello).to_string();
    Ok(if binary {
        Message::Binary(text.into_bytes().into())
    } else {
        Message::Text(text.into())
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn hello_keeps_size_and_frame_type_and_swaps_the_token() {
        let m = Message::Binary(
            br#"{"AuthToken":"operator-jwt","columns":120,"rows":40}"#
                .to_vec()
                .into(),
        );
        let out = with_ticket(m, "ticket").unwrap();
        let Message::Binary(b) = out else { panic!() };
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["AuthToken"], "ticket");
        assert_eq!(v["columns"], 120);
        assert_eq!(v["rows"], 40);
        let m = Message::Text(r#"{"columns":80,"rows":24}"#.into());
        assert!(matches!(with_ticket(m, "t").unwrap(), Message::Text(_)));
        assert!(with_ticket(Message::Text("0ls".into()), "t").is_err());
    }

    #[test]
    fn query() {
        let q = parse_query("deviceId=dev-1&token=a%2Bb&x=1");
        assert_eq!(q.device_id.as_deref(), Some("dev-1"));
        assert_eq!(q.token.as_deref(), Some("a+b"));
    }
}
