//! A ttyd-protocol client for the bridge's terminal proxy (`wss://…/terminal`), as tests use
//! it: open over TLS, send the hello, type lines, read output until a pattern or the close.

use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// Open `/terminal?<query>` over `tcp` (already connected to the proxy at `host:port`);
/// `Err((status, body))` when the upgrade is refused.
pub async fn open(
    tcp: tokio::net::TcpStream,
    tls: Arc<rustls::ClientConfig>,
    host: &str,
    port: u16,
    query: &str,
    bearer: Option<&str>,
) -> Result<Ws, (u16, String)> {
    let tls = tokio_rustls::TlsConnector::from(tls)
        .connect(host.to_string().try_into().unwrap(), tcp)
        .await
        .unwrap();
    let mut req = format!("wss://{host}:{port}/terminal?{query}")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "tty".parse().unwrap());
    if let Some(b) = bearer {
        req.headers_mut()
            .insert("Authorization", format!("Bearer {b}").parse().unwrap());
    }
    match tokio_tungstenite::client_async(req, tls).await {
        Ok((ws, resp)) => {
            assert_eq!(resp.headers()["Sec-WebSocket-Protocol"], "tty");
            Ok(ws)
        }
        Err(WsError::Http(r)) => Err((
            r.status().as_u16(),
            String::from_utf8_lossy(r.body().as_deref().unwrap_or_default()).into_owned(),
        )),
        Err(e) => panic!("unexpected handshake error: {e}"),
    }
}

/// ttyd's first message; the proxy replaces `AuthToken` with the device ticket.
pub async fn hello(ws: &mut Ws, token: &str) {
    let hello = serde_json::json!({"AuthToken": token, "columns": 100, "rows": 30}).to_string();
    ws.send(Message::Binary(hello.into_bytes().into()))
        .await
        .unwrap();
}

/// Type `line` and Enter.
pub async fn input(ws: &mut Ws, line: &str) {
    ws.send(Message::Binary(format!("0{line}\r").into_bytes().into()))
        .await
        .unwrap();
}

/// Output until `pat` appears (Ok) or the socket closes (Err with text and "code reason").
pub async fn read_until(ws: &mut Ws, pat: &str) -> Result<String, (String, String)> {
    let mut out = Vec::new();
    loop {
        let text = String::from_utf8_lossy(&out).into_owned();
        if text.contains(pat) {
            return Ok(text);
        }
        match tokio::time::timeout(Duration::from_secs(15), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) if b.first() == Some(&b'0') => {
                out.extend_from_slice(&b[1..])
            }
            Ok(Some(Ok(Message::Close(f)))) => {
                let f = f.unwrap();
                return Err((text, format!("{} {}", u16::from(f.code), f.reason)));
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("waiting for {pat:?}: {other:?} after {text:?}"),
        }
    }
}
