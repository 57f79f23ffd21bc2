//! Accepts connections, answers plain HTTP itself (ttyd's `/token`, refusals with a real
//! status), upgrades `/ws` with subprotocol `tty`, checks the ticket, then hands over to a
//! session. Nothing touches a PTY before the ticket and the session limit are satisfied.

use crate::session::{self, SessionConfig};
use crate::ticket::TicketVerifier;
use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, http};
use tokio_util::sync::CancellationToken;

/// Longest request head we read before refusing (ttyd clients send well under 2 KiB).
const MAX_HEAD: usize = 8192;
/// Time a client gets to send its head and then its first (auth) message.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// WebSocket messages larger than this are refused with 1009 (input is typed or pasted
/// text; the bridge's proxy allows the same 1 MiB, and the input queue holds one whole).
const MAX_MESSAGE: usize = MAX_INPUT_MESSAGE;

/// The largest WebSocket message a terminal accepts: 1 MiB of input plus ttyd's command
/// byte. The bridge's proxy uses the same limit.
pub const MAX_INPUT_MESSAGE: usize = crate::input::MAX_BACKLOG + 1;
/// Bytes a client may send before its ticket is accepted (the head and the hello take
/// about 2 KiB): caps what an unauthenticated client can make us parse (a stream of empty
/// continuation frames cost 7 CPU-s in 12 s without it).
const PRE_AUTH_BUDGET: usize = 64 * 1024;
/// Connections between accept and an accepted ticket, all clients together; over it new
/// ones are closed at once.
const MAX_PRE_AUTH: usize = 16;
/// A refused ticket or a full device is answered after this pause, so a page that
/// reconnects on every close (ttyd's does) retries at most about once a second.
const REFUSAL_DELAY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct TerminalConfig {
    pub session: SessionConfig,
    pub max_sessions: usize,
}

struct Shared {
    cfg: TerminalConfig,
    tickets: Mutex<TicketVerifier>,
    slots: Arc<Semaphore>,
    pre_auth: Arc<Semaphore>,
}

/// Serve on `listener` (bound by the caller to the tunnel address) until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    cfg: TerminalConfig,
    tickets: TicketVerifier,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    tracing::info!(listen = %listener.local_addr()?, "terminal listening");
    let shared = Arc::new(Shared {
        slots: Arc::new(Semaphore::new(cfg.max_sessions)),
        pre_auth: Arc::new(Semaphore::new(MAX_PRE_AUTH)),
        cfg,
        tickets: Mutex::new(tickets),
    });
    let sessions = tokio_util::task::TaskTracker::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "terminal accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(unauthenticated) = shared.pre_auth.clone().try_acquire_owned() else {
                    tracing::debug!(%peer, "terminal: too many connections without a ticket; closed");
                    continue;
                };
                // Keystrokes are single bytes: never wait for Nagle.
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                let stop = shutdown.clone();
                sessions.spawn(async move {
                    let stream = Budgeted::new(stream, PRE_AUTH_BUDGET, unauthenticated);
                    if let Err(e) = connection(stream, peer, shared, stop).await {
                        tracing::debug!(%peer, error = %e, "terminal connection ended");
                    }
                });
            }
        }
    }
    sessions.close();
    sessions.wait().await;
    Ok(())
}

async fn connection(
    mut stream: Budgeted<TcpStream>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let head = tokio::time::timeout(HANDSHAKE_TIMEOUT, peek_head(stream.get_ref()))
        .await
        .map_err(|_| "request head timeout".to_string())??;
    match head {
        Head::Token => {
            // ttyd's page fetches /token first; the ticket comes from the proxy instead.
            return reply(
                &mut stream,
                200,
                "OK",
                "application/json",
                "{\"token\": \"\"}",
            )
            .await;
        }
        Head::Refuse(code, reason) => {
            return reply(&mut stream, code, reason, "text/plain", reason).await;
        }
        Head::Upgrade => {}
    }
    let ws_cfg = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
        .write_buffer_size(0)
        .max_write_buffer_size(256 * 1024);
    let mut ws = tokio_tungstenite::accept_hdr_async_with_config(stream, select_tty, Some(ws_cfg))
        .await
        .map_err(|e| e.to_string())?;

    // First message: {"AuthToken","columns","rows"}.
    let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, ws.next()).await;
    let hello = match first {
        Ok(Some(Ok(Message::Text(t)))) => crate::protocol::parse_hello(t.as_bytes()),
        Ok(Some(Ok(Message::Binary(b)))) => crate::protocol::parse_hello(&b),
        Ok(_) => return Err("closed before the first message".into()),
        Err(_) => {
            close(
                &mut ws,
                CloseCode::Policy,
                "no AuthToken message within 10s",
            )
            .await;
            return Err("auth timeout".into());
        }
    };
    let hello = match hello {
        Ok(h) => h,
        Err(e) => {
            close(
                &mut ws,
                CloseCode::Protocol,
                &format!("bad first message: {e}"),
            )
            .await;
            return Err(e.to_string());
        }
    };
    // Checked, then a slot taken, then the ticket used, under one lock: a ticket refused
    // because the device is full stays good for the operator's next try.
    let admitted = {
        let mut tickets = shared
            .tickets
            .lock()
            .map_err(|_| "ticket verifier poisoned".to_string())?;
        match tickets.check(&hello.auth_token) {
            Err(e) => Err((
                CloseCode::Policy,
                format!("refused: {e}"),
                e.to_string(),
                None,
            )),
            Ok(claims) => match shared.slots.clone().try_acquire_owned() {
                Err(_) => Err((
                    CloseCode::Again,
                    format!("refused: {} sessions already open", shared.cfg.max_sessions),
                    "session limit".to_string(),
                    Some(claims.sub),
                )),
                Ok(slot) => {
                    tickets.consume(&claims);
                    Ok((claims, slot))
                }
            },
        }
    };
    let (claims, slot) = match admitted {
        Ok(x) => x,
        Err((code, reason, why, operator)) => {
            tracing::warn!(%peer, operator = ?operator, reason = %why, "terminal session refused");
            tokio::time::sleep(REFUSAL_DELAY).await;
            close(&mut ws, code, &reason).await;
            return Err(why);
        }
    };
    ws.get_mut().authenticated();
    let result = session::run(ws, &shared.cfg.session, &hello, &claims, peer, shutdown).await;
    drop(slot);
    result
}

/// True when the client's `Sec-WebSocket-Protocol` offers `tty` (ttyd's clients always do);
/// the bridge's proxy asks the same of the browser.
pub fn offers_tty(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == "tty")
}

/// Answer with subprotocol `tty` when the client offers it (ttyd's clients always do).
// The signature is tungstenite's handshake callback; its error type is not ours to shrink.
#[allow(clippy::result_large_err)]
fn select_tty(req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    if offers_tty(req.headers()) {
        resp.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            http::HeaderValue::from_static("tty"),
        );
    }
    Ok(resp)
}

enum Head {
    Token,
    Upgrade,
    Refuse(u16, &'static str),
}

/// Look at the request head without consuming it, so the WebSocket handshake reads it again.
async fn peek_head(stream: &TcpStream) -> Result<Head, String> {
    let mut buf = vec![0u8; MAX_HEAD];
    loop {
        let n = stream.peek(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed".into());
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..n]) {
            Ok(httparse::Status::Complete(_)) => {
                let path = req.path.unwrap_or("");
                let upgrade = req.headers.iter().any(|h| {
                    h.name.eq_ignore_ascii_case("upgrade")
                        && String::from_utf8_lossy(h.value).eq_ignore_ascii_case("websocket")
                });
                return Ok(match (req.method, path) {
                    (Some("GET"), "/token") => Head::Token,
                    (Some("GET"), "/ws") if upgrade => Head::Upgrade,
                    (Some("GET"), "/ws") => Head::Refuse(426, "Upgrade Required"),
                    (Some("GET"), _) => Head::Refuse(404, "Not Found"),
                    _ => Head::Refuse(405, "Method Not Allowed"),
                });
            }
            Ok(httparse::Status::Partial) if n < MAX_HEAD => {
                // More is on its way: wait for it without busy-looping on peek.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(httparse::Status::Partial) => {
                return Ok(Head::Refuse(431, "Request Header Fields Too Large"));
            }
            Err(_) => return Ok(Head::Refuse(400, "Bad Request")),
        }
    }
}

async fn reply(
    stream: &mut Budgeted<TcpStream>,
    code: u16,
    reason: &str,
    content_type: &str,
    body: &str,
) -> Result<(), String> {
    let text = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(text.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let _ = stream.shutdown().await;
    Ok(())
}

/// A stream that allows a client only `budget` bytes until it is authenticated, and holds
/// its place among the unauthenticated connections until then.
struct Budgeted<S> {
    inner: S,
    budget: usize,
    unauthenticated: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl<S> Budgeted<S> {
    fn new(inner: S, budget: usize, permit: tokio::sync::OwnedSemaphorePermit) -> Self {
        Self {
            inner,
            budget,
            unauthenticated: Some(permit),
        }
    }

    fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The ticket was accepted: no budget from now on, and the place is freed.
    fn authenticated(&mut self) {
        self.budget = usize::MAX;
        self.unauthenticated = None;
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Budgeted<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.budget == 0 {
            return std::task::Poll::Ready(Err(std::io::Error::other(
                "sent too much before a ticket was accepted",
            )));
        }
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if self.budget != usize::MAX {
            self.budget = self.budget.saturating_sub(n);
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Budgeted<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Send a close frame (reason cut to the protocol's 123 bytes) and wait briefly for the peer's.
pub async fn close<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, code: CloseCode, reason: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    // Close reasons are limited to 123 bytes by the protocol.
    let mut reason = reason.to_string();
    while reason.len() > 123 {
        reason.pop();
    }
    // A client that reads nothing (its buffers full) must not hold the session forever.
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        ws.send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }))),
    )
    .await;
    // Wait briefly for the client's close so the TCP connection ends cleanly.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(m)) = ws.next().await {
            if m.is_close() {
                break;
            }
        }
    })
    .await;
}
