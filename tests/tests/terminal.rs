//! The remote terminal end to end on the device side: the bridge's ticket key reaches the
//! device with its certificate, and the agent's terminal accepts exactly the tickets that key
//! signs for this device (real bridge, real agent process, real shell).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use thingsly_e2e::*;
use thingsly_terminal::ticket::{Claims, TicketSigner};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn ticket(key_pem: &[u8], device: &str, jti: &str) -> String {
    let claims = Claims::new("operator@example.com", device, Duration::from_secs(60), jti);
    TicketSigner::from_pem(key_pem)
        .unwrap()
        .sign(&claims)
        .unwrap()
}

/// A ttyd client session: connect with subprotocol `tty` and send the auth message.
async fn open(port: u16, token: &str) -> Ws {
    let mut req = format!("ws://127.0.0.1:{port}/ws")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "tty".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let hello = serde_json::json!({"AuthToken": token, "columns": 80, "rows": 24}).to_string();
    ws.send(Message::Text(hello.into())).await.unwrap();
    ws
}

/// Runs `line` in a session; returns the output and the close reason.
async fn session(port: u16, token: &str, line: &str) -> (String, String) {
    let mut ws = open(port, token).await;
    ws.send(Message::Text(format!("0{line}\r").into()))
        .await
        .unwrap();
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) if b.first() == Some(&b'0') => {
                out.extend_from_slice(&b[1..])
            }
            Ok(Some(Ok(Message::Close(f)))) => {
                return (
                    String::from_utf8_lossy(&out).into_owned(),
                    f.map(|f| f.reason.to_string()).unwrap_or_default(),
                );
            }
            Ok(Some(Ok(_))) => {}
            other => panic!(
                "session ended without close: {other:?} after {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_signed_tickets_open_a_shell_on_the_enrolled_device() {
    let t = tempfile::tempdir().unwrap();
    let mut bridge = Bridge::init(&t.path().join("bridge")).unwrap();
    bridge.start().unwrap();
    let port = free_port();
    let mut agent = Agent::new(
        &t.path().join("agent"),
        &AgentOpts {
            device_id: "dev-shell".into(),
            server_url: bridge.url(),
            token: bridge.fleet_token(),
            ca_bundle: bridge.ca_chain(),
            extra: format!(
                "\n[terminal]\nlisten = \"127.0.0.1\"\nport = {port}\nmax_sessions = 2\n"
            ),
            ..Default::default()
        },
    )
    .unwrap();
    agent.start().unwrap();
    wait_for("terminal listening", Duration::from_secs(30), || {
        agent.status()["state"]["modules"]["terminal"]["state"] == "running"
    });
    let stored = std::fs::read(agent.state().join("identity/terminal-ticket.pub")).unwrap();
    let key = std::fs::read(bridge.data().join("terminal-ticket.key")).unwrap();
    assert!(String::from_utf8_lossy(&stored).contains("BEGIN PUBLIC KEY"));

    let (out, reason) = session(
        port,
        &ticket(&key, "dev-shell", "j1"),
        "echo sum=$((40+2)) user=$(id -un); exit 7",
    )
    .await;
    assert!(out.contains("sum=42"), "{out}");
    // Issue 17: not the agent's own user (root here), which can read the device key.
    assert!(out.contains("user=thingsly-terminal"), "{out}");
    assert_eq!(reason, "exit status 7");

    // Another device's ticket, a replay, a key that is not the bridge's: refused, no shell.
    let foreign = rcgen::KeyPair::generate().unwrap().serialize_pem();
    for (token, why) in [
        (ticket(&key, "dev-other", "j2"), "for device"),
        (ticket(&key, "dev-shell", "j1"), "already used"),
        (
            ticket(foreign.as_bytes(), "dev-shell", "j3"),
            "signature invalid",
        ),
    ] {
        let (out, reason) = session(port, &token, "echo should-not-run").await;
        assert!(!out.contains("should-not-run"), "{out}");
        assert!(reason.contains(why), "{reason:?} should say {why:?}");
    }
    // A paused client with a fast producer (`yes`): the agent stops reading the PTY, its
    // memory stays flat.
    let pid = agent.proc.as_ref().unwrap().pid();
    let rss = || -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap()
    };
    let mut ws = open(port, &ticket(&key, "dev-shell", "j4")).await;
    ws.send(Message::Text("0yes flat-memory-check\r".into()))
        .await
        .unwrap();
    let mut seen = 0usize;
    while seen < 1 << 20 {
        if let Some(Ok(Message::Binary(b))) = ws.next().await {
            seen += b.len();
        }
    }
    ws.send(Message::Binary(b"2".to_vec().into()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rss();
    assert!(
        after < before + 2048,
        "agent RSS grew from {before} to {after} KiB while paused"
    );
    drop(ws);

    // Issue 17: the replay set lives in memory, so a ticket used before a restart could be
    // used again after it. Tickets issued before the agent started are refused now.
    let used = ticket(&key, "dev-shell", "j5");
    let (out, reason) = session(port, &used, "echo first-use; exit 0").await;
    assert!(out.contains("first-use"), "{out} {reason}");
    tokio::time::sleep(Duration::from_millis(1100)).await; // the restart is a later second

    let (code, took) = agent.proc.as_mut().unwrap().terminate();
    assert!(code.is_some_and(|c| c.success()) && took < Duration::from_secs(5));

    agent.start().unwrap();
    wait_for("terminal listening again", Duration::from_secs(30), || {
        agent.status()["state"]["modules"]["terminal"]["state"] == "running"
    });
    let (out, reason) = session(port, &used, "echo replayed-$((1+1))").await;
    assert!(!out.contains("replayed-2"), "{out}");
    assert!(reason.contains("before this agent started"), "{reason}");
    let (out, _) = session(
        port,
        &ticket(&key, "dev-shell", "j6"),
        "echo fresh-$((2+2)); exit 0",
    )
    .await;
    assert!(out.contains("fresh-4"), "{out}");
}
