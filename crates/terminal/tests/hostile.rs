//! The device terminal against careless and hostile clients (issue 17), over real sockets
//! with a real PTY and shell: a paste nobody reads, a huge paste, oversized and invalid
//! frames, a close that must be answered, a client that vanishes, a flood before the
//! ticket, and a ticket refused because the device is full.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use futures_util::{SinkExt, StreamExt};
use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use sha2::Digest;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use thingsly_terminal::ticket::{Claims, TicketSigner, TicketVerifier};
use thingsly_terminal::{SessionConfig, TerminalConfig, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

const DEVICE: &str = "dev-hostile";

struct Server {
    addr: SocketAddr,
    signer: TicketSigner,
    stop: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Server {
    fn ticket(&self) -> String {
        static JTI: AtomicU64 = AtomicU64::new(0);
        let jti = format!("h{}", JTI.fetch_add(1, Ordering::Relaxed));
        let c = Claims::new("mallory@example.com", DEVICE, Duration::from_secs(60), &jti);
        self.signer.sign(&c).unwrap()
    }
}

async fn server(session: SessionConfig, max_sessions: usize) -> Server {
    let sk = p256::SecretKey::random(&mut rand_core::OsRng);
    let pem = sk.to_pkcs8_pem(LineEnding::LF).unwrap();
    let public = sk.public_key().to_public_key_pem(LineEnding::LF).unwrap();
    // Started a little in the past: tickets issued this second are not "before the start".
    let verifier = TicketVerifier::new(public.as_bytes(), DEVICE)
        .unwrap()
        .started_at(0);
    let stop = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = TerminalConfig {
        session,
        max_sessions,
    };
    tokio::spawn(serve(listener, cfg, verifier, stop.clone()));
    Server {
        addr,
        signer: TicketSigner::from_pem(pem.as_bytes()).unwrap(),
        stop,
    }
}

fn sh(script: &str) -> SessionConfig {
    SessionConfig {
        command: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn connect(addr: SocketAddr, token: &str) -> Ws {
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "tty".parse().unwrap());
    let cfg = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(8 << 20))
        .max_frame_size(Some(8 << 20));
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(cfg), false)
        .await
        .unwrap();
    let hello = serde_json::json!({"AuthToken": token, "columns": 80, "rows": 24}).to_string();
    ws.send(Message::Text(hello.into())).await.unwrap();
    ws
}

fn input(bytes: &[u8]) -> Message {
    let mut m = vec![b'0'];
    m.extend_from_slice(bytes);
    Message::Binary(m.into())
}

/// Reads output until `needle` appears; panics with what came when it does not.
async fn until(ws: &mut Ws, needle: &str, limit: Duration) -> String {
    let mut out = Vec::new();
    let end = tokio::time::Instant::now() + limit;
    loop {
        if String::from_utf8_lossy(&out).contains(needle) {
            return String::from_utf8_lossy(&out).into_owned();
        }
        match tokio::time::timeout_at(end, ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) if b.first() == Some(&b'0') => {
                out.extend_from_slice(&b[1..])
            }
            Ok(Some(Ok(_))) => {}
            other => {
                let tail =
                    String::from_utf8_lossy(&out[out.len().saturating_sub(300)..]).into_owned();
                panic!("no {needle:?} (last output {tail:?}): {other:?}")
            }
        }
    }
}

/// The close frame's code and reason (output before it is skipped).
async fn close_of(ws: &mut Ws, limit: Duration) -> (CloseCode, String) {
    let end = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(end, ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) => return (f.code, f.reason.to_string()),
            Ok(Some(Ok(_))) => {}
            other => panic!("no close frame: {other:?}"),
        }
    }
}

#[allow(unsafe_code)]
fn ignore_sigint_like_a_background_job() {
    // SAFETY: setting a disposition to SIG_IGN installs no handler; nothing in this test
    // binary relies on SIGINT.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
    }
}

/// Issue 17: ~16 kB of input the program does not read froze the session for good. Now the
/// output keeps coming, and ^C reaches the program (the unread paste is discarded, as the
/// terminal driver discards its input queue on INTR, so it does not run as commands).
#[tokio::test]
async fn unread_input_never_blocks_output_or_interrupt() {
    // As a shell's `agent &` leaves it (and every clean-clone CI run here started in the
    // background): SIGINT ignored in the agent. The operator's shell must still get ^C.
    ignore_sigint_like_a_background_job();
    let s = server(
        sh("trap 'echo got-int; exit 7' INT; echo ready; while :; do sleep 0.1; echo tick; done"),
        1,
    )
    .await;
    let mut ws = connect(s.addr, &s.ticket()).await;
    until(&mut ws, "ready", Duration::from_secs(10)).await;
    let paste: Vec<u8> = (0..4000)
        .flat_map(|i| format!("echo pasted-{i}\n").into_bytes())
        .collect();
    assert!(paste.len() > 60_000);
    ws.send(input(&paste)).await.unwrap();
    // Output still flows past the stuck input: three more ticks.
    for _ in 0..3 {
        until(&mut ws, "tick", Duration::from_secs(10)).await;
    }
    ws.send(input(b"\x03")).await.unwrap();
    let out = until(&mut ws, "got-int", Duration::from_secs(10)).await;
    let _ = out;
    let (code, reason) = close_of(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(
        (code, reason.as_str()),
        (CloseCode::Normal, "exit status 7")
    );
}

/// Issue 17: the client's close was not answered (clients saw 1006) and, with input stuck,
/// not even seen; the slot stayed taken. Now the close is answered and the slot freed.
#[tokio::test]
async fn a_close_is_answered_and_frees_the_slot_even_with_input_stuck() {
    let s = server(sh("echo ready; exec sleep 1000"), 1).await;
    let mut ws = connect(s.addr, &s.ticket()).await;
    until(&mut ws, "ready", Duration::from_secs(10)).await;
    ws.send(input(&vec![b'x'; 200_000])).await.unwrap();
    ws.send(Message::Close(None)).await.unwrap();
    // The server's close reply (tungstenite ends the stream after it).
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(f))) => return Some(f),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .unwrap();
    assert!(r.is_some(), "no close reply: the client would see 1006");
    let mut again = connect(s.addr, &s.ticket()).await;
    until(&mut again, "ready", Duration::from_secs(10)).await;
}

/// Issue 17: an input message over 64 KiB dropped the connection and hung up the shell. Now
/// a 900 KB paste arrives whole, and one over 1 MiB gets 1009 with nothing of it delivered.
#[tokio::test]
async fn a_large_paste_arrives_whole_and_an_oversized_one_gets_1009() {
    let s = server(
        sh("stty raw -echo; echo ready; head -c 900000 | sha256sum; stty sane; echo done; exec sleep 1000"),
        2,
    )
    .await;
    let mut ws = connect(s.addr, &s.ticket()).await;
    until(&mut ws, "ready", Duration::from_secs(10)).await;
    let data: Vec<u8> = (0..900_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let want = hex::encode(sha2::Sha256::digest(&data));
    ws.send(input(&data)).await.unwrap();
    let out = until(&mut ws, "done", Duration::from_secs(30)).await;
    assert!(out.contains(&want), "{out}");
    ws.send(input(&vec![b'y'; 1024 * 1024 + 1])).await.unwrap();
    let (code, reason) = close_of(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(code, CloseCode::Size, "{reason}");
}

/// Issue 17: invalid UTF-8 in a text frame must close with 1007.
#[tokio::test]
async fn invalid_utf8_in_a_text_frame_gets_1007() {
    let s = server(sh("echo ready; exec sleep 1000"), 1).await;
    let mut ws = connect(s.addr, &s.ticket()).await;
    until(&mut ws, "ready", Duration::from_secs(10)).await;
    let bad = Frame::message(vec![b'0', 0xff, 0xfe], OpCode::Data(Data::Text), true);
    ws.send(Message::Frame(bad)).await.unwrap();
    let (code, _) = close_of(&mut ws, Duration::from_secs(5)).await;
    assert_eq!(code, CloseCode::Invalid);
}

/// Issue 17: a dead tunnel kept its slot until the 15-minute idle timeout. Now a client that
/// answers no ping for three intervals is gone.
#[tokio::test]
async fn a_client_that_answers_no_pings_loses_its_slot() {
    let cfg = SessionConfig {
        ping_interval: Duration::from_millis(500),
        ..sh("echo ready; exec sleep 1000")
    };
    let s = server(cfg, 1).await;
    let mut dead = connect(s.addr, &s.ticket()).await;
    until(&mut dead, "ready", Duration::from_secs(10)).await;
    // From now on `dead` is never polled: no pongs, as over a tunnel that went away.
    let t0 = tokio::time::Instant::now();
    loop {
        let mut ws = connect(s.addr, &s.ticket()).await;
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) if f.code == CloseCode::Again => {}
            _ => break, // admitted: the dead session's slot is free
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "slot still held");
    }
    drop(dead);
}

/// Issue 17: a ticket refused at the session limit was still marked used. Now it stays good,
/// and refusals come no faster than one a second per connection.
#[tokio::test]
async fn a_ticket_refused_because_the_device_is_full_stays_good() {
    let s = server(sh("echo ready; exec sleep 1000"), 1).await;
    let mut first = connect(s.addr, &s.ticket()).await;
    until(&mut first, "ready", Duration::from_secs(10)).await;
    let t = s.ticket();
    let t0 = tokio::time::Instant::now();
    let mut refused = connect(s.addr, &t).await;
    let (code, _) = close_of(&mut refused, Duration::from_secs(5)).await;
    assert_eq!(code, CloseCode::Again);
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    first.send(Message::Close(None)).await.unwrap();
    drop(first);
    let t0 = tokio::time::Instant::now();
    loop {
        let mut ws = connect(s.addr, &t).await;
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) => {
                assert_eq!(f.code, CloseCode::Again, "{}", f.reason);
            }
            _ => break,
        }
        assert!(t0.elapsed() < Duration::from_secs(10));
    }
}

/// Issue 17: empty continuation frames before the ticket cost 7.3 CPU-s in 12 s. Now a
/// client gets 64 KiB before its ticket, then the connection is cut.
#[tokio::test]
async fn a_flood_before_the_ticket_is_cut_off() {
    let s = server(sh("exec sleep 1000"), 1).await;
    let mut tcp = TcpStream::connect(s.addr).await.unwrap();
    tcp.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: tty\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = vec![0u8; 1024];
    let n = tcp.read(&mut head).await.unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 101"));
    // A text frame that never ends: "{" with FIN clear, then empty masked continuations.
    tcp.write_all(&[0x01, 0x81, 0, 0, 0, 0, b'{'])
        .await
        .unwrap();
    let frame = [0x00u8, 0x80, 0, 0, 0, 0];
    let chunk: Vec<u8> = frame.iter().copied().cycle().take(6 * 4096).collect();
    let mut sent = 0usize;
    let cut = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if tcp.write_all(&chunk).await.is_err() {
                return;
            }
            sent += chunk.len();
            if sent > 64 << 20 {
                return;
            }
        }
    })
    .await;
    assert!(cut.is_ok(), "still accepting after {sent} bytes");
    assert!(sent < 4 << 20, "accepted {sent} bytes before the ticket");
}

/// CPU seconds this process has used (user + system).
fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

/// Issue 17: after the shell died with output still waiting for a client that does not
/// read, the agent spun at ~50 % CPU. Now the session waits without work until the client
/// goes (or answers no pings).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_shell_with_output_waiting_costs_no_cpu_and_frees_its_slot() {
    let cfg = SessionConfig {
        ping_interval: Duration::from_secs(2),
        // The shell exits at once; its background job keeps the PTY full of output.
        ..sh("trap '' HUP; (head -c 200000000 /dev/zero | tr '\\0' x) & sleep 0.5; exit 3")
    };
    let s = server(cfg, 1).await;
    let mut ws = connect(s.addr, &s.ticket()).await;
    until(&mut ws, "xxxx", Duration::from_secs(10)).await;
    // Stop reading: the socket buffers fill, output waits, the program exits.
    tokio::time::sleep(Duration::from_secs(2)).await; // exit + the 1 s drain have passed
    let (c0, t0) = (cpu_seconds(), std::time::Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let used = cpu_seconds() - c0;
    let wall = t0.elapsed().as_secs_f64();
    assert!(
        used < 0.3 * wall,
        "{used:.2} CPU-s in {wall:.1} s while waiting"
    );
    // And the session ends (its slot is free) although this client is still connected and
    // still reads nothing.
    let t0 = std::time::Instant::now();
    loop {
        let mut other = connect(s.addr, &s.ticket()).await;
        match tokio::time::timeout(Duration::from_secs(5), other.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) if f.code == CloseCode::Again => {}
            _ => break,
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "slot still held");
    }
    drop(ws);
}
