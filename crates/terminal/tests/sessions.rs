//! The PTY bridge over real sockets with a real shell: ttyd's protocol from a WebSocket client.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use futures_util::{SinkExt, StreamExt};
use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use thingsly_terminal::ticket::{Claims, TicketSigner, TicketVerifier};
use thingsly_terminal::{SessionConfig, TerminalConfig, serve};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

const DEVICE: &str = "dev-term";

/// The bridge's role: a ticket key pair and a signer.
struct Signer {
    signer: TicketSigner,
    public_pem: String,
}

impl Signer {
    fn new() -> Self {
        let sk = p256::SecretKey::random(&mut rand_core::OsRng);
        let pem = sk.to_pkcs8_pem(LineEnding::LF).unwrap();
        Self {
            signer: TicketSigner::from_pem(pem.as_bytes()).unwrap(),
            public_pem: sk.public_key().to_public_key_pem(LineEnding::LF).unwrap(),
        }
    }

    /// A ticket for `device`; a negative lifetime gives one that expired a minute ago.
    fn ticket_for(&self, device: &str, lifetime: i64) -> String {
        static JTI: AtomicU64 = AtomicU64::new(0);
        let jti = format!("t{}", JTI.fetch_add(1, Ordering::Relaxed));
        let mut c = Claims::new(
            "alice@example.com",
            device,
            Duration::from_secs(lifetime.unsigned_abs()),
            &jti,
        );
        if lifetime < 0 {
            (c.iat, c.exp) = (c.iat - 120, c.iat - 60);
        }
        self.signer.sign(&c).unwrap()
    }

    fn ticket(&self) -> String {
        self.ticket_for(DEVICE, 60)
    }
}

struct Server {
    addr: SocketAddr,
    signer: Signer,
    stop: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn server(session: SessionConfig, max_sessions: usize) -> Server {
    let signer = Signer::new();
    let verifier = TicketVerifier::new(signer.public_pem.as_bytes(), DEVICE).unwrap();
    let stop = CancellationToken::new();
    let cfg = TerminalConfig {
        session,
        max_sessions,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, cfg, verifier, stop.clone()));
    Server { addr, signer, stop }
}

fn sh(script: &str) -> SessionConfig {
    SessionConfig {
        command: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn connect(addr: SocketAddr, token: &str, cols: u16, rows: u16) -> Ws {
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "tty".parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.headers()["Sec-WebSocket-Protocol"], "tty");
    let hello = serde_json::json!({"AuthToken": token, "columns": cols, "rows": rows}).to_string();
    ws.send(Message::Text(hello.into())).await.unwrap();
    ws
}

/// Output until the close frame: (bytes, close code, close reason).
async fn collect(ws: &mut Ws, limit: Duration) -> (Vec<u8>, Option<(CloseCode, String)>) {
    let mut out = Vec::new();
    let end = tokio::time::Instant::now() + limit;
    loop {
        let Ok(msg) = tokio::time::timeout_at(end, ws.next()).await else {
            return (out, None);
        };
        match msg {
            Some(Ok(Message::Binary(b))) if b.first() == Some(&b'0') => {
                out.extend_from_slice(&b[1..])
            }
            Some(Ok(Message::Close(Some(f)))) => {
                return (out, Some((f.code, f.reason.to_string())));
            }
            Some(Ok(_)) => {}
            _ => return (out, None),
        }
    }
}

async fn until(ws: &mut Ws, needle: &str, limit: Duration) -> String {
    let mut out = Vec::new();
    let end = tokio::time::Instant::now() + limit;
    while !String::from_utf8_lossy(&out).contains(needle) {
        match tokio::time::timeout_at(end, ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) if b.first() == Some(&b'0') => {
                out.extend_from_slice(&b[1..])
            }
            Ok(Some(Ok(_))) => {}
            other => panic!(
                "no {needle:?} (got {:?}): {other:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn resize_reaches_the_pty_and_exit_status_closes_with_1000() {
    let s = server(SessionConfig::default(), 4).await;
    let mut ws = connect(s.addr, &s.signer.ticket(), 80, 24).await;
    ws.send(Message::Binary(
        br#"1{"columns":120,"rows":40}"#.to_vec().into(),
    ))
    .await
    .unwrap();
    ws.send(Message::Text("0stty size; exit 3\r".into()))
        .await
        .unwrap();
    let (out, close) = collect(&mut ws, Duration::from_secs(10)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("40 120"), "{text}");
    assert_eq!(
        close,
        Some((CloseCode::Normal, "exit status 3".into())),
        "{text}"
    );
}

#[tokio::test]
async fn last_line_is_never_lost_and_title_is_sent() {
    let s = server(sh("printf 'line1\\nlast line without newline'"), 4).await;
    let mut ws = connect(s.addr, &s.signer.ticket(), 80, 24).await;
    let first = ws.next().await.unwrap().unwrap();
    assert_eq!(first.into_data()[0], b'1', "window title first");
    let (out, close) = collect(&mut ws, Duration::from_secs(10)).await;
    assert!(String::from_utf8_lossy(&out).ends_with("last line without newline"));
    assert_eq!(close.unwrap().1, "exit status 0");
}

#[tokio::test]
async fn fifty_megabytes_arrive_intact_and_pause_stops_reading() {
    use sha2::Digest;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data");
    let data: Vec<u8> = (0..50u32 * 1024 * 1024)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(&file, &data).unwrap();
    // Raw mode: the tty passes bytes through unchanged (no CR insertion).
    let script = format!("stty raw -echo; sleep 0.5; cat '{}'", file.display());
    let s = server(sh(&script), 4).await;
    let mut ws = connect(s.addr, &s.signer.ticket(), 80, 24).await;
    ws.send(Message::Binary(b"2".to_vec().into()))
        .await
        .unwrap();
    // While paused nothing but the title and preferences arrive.
    let (paused_out, _) = collect(&mut ws, Duration::from_secs(2)).await;
    assert!(
        paused_out.len() < 64 * 1024,
        "{} bytes while paused",
        paused_out.len()
    );
    // Resume twice: harmless.
    ws.send(Message::Binary(b"3".to_vec().into()))
        .await
        .unwrap();
    ws.send(Message::Binary(b"3".to_vec().into()))
        .await
        .unwrap();
    let (rest, close) = collect(&mut ws, Duration::from_secs(60)).await;
    let mut got = paused_out;
    got.extend_from_slice(&rest);
    assert_eq!(got.len(), data.len());
    assert_eq!(sha2::Sha256::digest(&got), sha2::Sha256::digest(&data));
    assert_eq!(close.unwrap().1, "exit status 0");
}

#[tokio::test]
async fn refused_tickets_close_with_a_reason() {
    let s = server(SessionConfig::default(), 4).await;
    let other = Signer::new();
    let replay = s.signer.ticket();
    let mut first = connect(s.addr, &replay, 80, 24).await;
    let _ = until(&mut first, "", Duration::from_secs(1)).await;
    for (token, reason) in [
        (String::new(), "no ticket"),
        (s.signer.ticket_for(DEVICE, -1), "expired"),
        (
            s.signer.ticket_for("dev-other", 60),
            "for device \"dev-other\"",
        ),
        (replay.clone(), "already used"),
        (other.ticket(), "signature invalid"),
        ("e30.e30.".to_string(), "refused"),
    ] {
        let mut ws = connect(s.addr, &token, 80, 24).await;
        let (out, close) = collect(&mut ws, Duration::from_secs(5)).await;
        assert!(out.is_empty());
        let (code, why) = close.unwrap();
        assert_eq!(code, CloseCode::Policy);
        assert!(why.contains(reason), "{why:?} should say {reason:?}");
    }
}

#[tokio::test]
async fn session_limit_idle_timeout_and_read_only() {
    let s = server(
        SessionConfig {
            idle_timeout: Duration::from_secs(2),
            read_only: true,
            ..SessionConfig::default()
        },
        1,
    )
    .await;
    let mut one = connect(s.addr, &s.signer.ticket(), 80, 24).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut two = connect(s.addr, &s.signer.ticket(), 80, 24).await;
    let (_, close) = collect(&mut two, Duration::from_secs(5)).await;
    assert_eq!(
        close.unwrap(),
        (CloseCode::Again, "refused: 1 sessions already open".into())
    );
    // Read-only: typing does nothing.
    one.send(Message::Text("0echo typed-$((6*7))\r".into()))
        .await
        .unwrap();
    let (out, close) = collect(&mut one, Duration::from_secs(6)).await;
    assert!(!String::from_utf8_lossy(&out).contains("typed-42"));
    assert_eq!(close.unwrap(), (CloseCode::Normal, "idle for 2s".into()));
}

#[tokio::test]
async fn disconnect_hangs_up_the_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let s = server(
        sh(&format!(
            "trap '' HUP; sleep 1000 & echo $! > '{}'; echo started; wait",
            pidfile.display()
        )),
        4,
    )
    .await;
    let mut ws = connect(s.addr, &s.signer.ticket(), 80, 24).await;
    until(&mut ws, "started", Duration::from_secs(5)).await;
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    drop(ws);
    let gone = |pid: i32| {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true)
    };
    let end = std::time::Instant::now() + Duration::from_secs(6);
    while !gone(pid) {
        assert!(
            std::time::Instant::now() < end,
            "sleep {pid} survived the disconnect"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn plain_http_gets_real_statuses() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = server(SessionConfig::default(), 4).await;
    for (req, want) in [
        ("GET /token HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 200"),
        ("GET /ws HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 426"),
        (
            "GET /wsx HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
            "HTTP/1.1 404",
        ),
        ("POST /ws HTTP/1.1\r\nHost: x\r\n\r\n", "HTTP/1.1 405"),
    ] {
        let mut c = TcpStream::connect(s.addr).await.unwrap();
        c.write_all(req.as_bytes()).await.unwrap();
        let mut resp = String::new();
        c.read_to_string(&mut resp).await.unwrap();
        assert!(resp.starts_with(want), "{req:?} → {resp:?}");
        if want.ends_with("200") {
            assert!(resp.ends_with("{\"token\": \"\"}"));
        }
    }
}

/// ttyd drops fragmented messages; here a command split over a text frame and a continuation
/// frame runs like any other input.
#[tokio::test]
async fn fragmented_input_is_reassembled() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let s = server(SessionConfig::default(), 4).await;
    let mut ws = connect(s.addr, &s.signer.ticket(), 80, 24).await;
    let first = Frame::message(b"0echo frag-".to_vec(), OpCode::Data(Data::Text), false);
    let rest = Frame::message(
        b"$((1+1)); exit\r".to_vec(),
        OpCode::Data(Data::Continue),
        true,
    );
    ws.send(Message::Frame(first)).await.unwrap();
    ws.send(Message::Frame(rest)).await.unwrap();
    let (out, close) = collect(&mut ws, Duration::from_secs(10)).await;
    assert!(
        String::from_utf8_lossy(&out).contains("frag-2"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(close.unwrap().1, "exit status 0");
}
