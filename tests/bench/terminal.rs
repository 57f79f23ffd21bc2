//! Terminal session throughput and echo latency: the device's PTY bridge (WebSocket, ticket,
//! ttyd framing) against the floor of a bare PTY copied to a TCP socket on loopback.

use futures_util::{SinkExt, StreamExt};
use std::time::{Duration, Instant};
use thingsly_terminal::ticket::{Claims, TicketSigner, TicketVerifier};
use thingsly_terminal::{SessionConfig, TerminalConfig, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const ECHOES: usize = 1000;

fn sh(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

/// Floor: a PTY running `script`, its output copied to a loopback TCP socket, read by a client.
/// Returns the bytes read and the times: one echo latency per key sent, or (no keys) the
/// time from the first to the last output byte.
async fn bare(
    script: &str,
    send: Option<&[u8]>,
    expect: usize,
) -> anyhow::Result<(usize, Vec<Duration>)> {
    let (pty, pts) = pty_process::open()?;
    let mut child = pty_process::Command::new("/bin/sh")
        .args(["-c", script])
        .spawn(pts)?;
    let (mut pr, mut pw) = pty.into_split();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let (sock, _) = listener.accept().await?;
        let (mut sr, mut sw) = sock.into_split();
        let up = tokio::spawn(async move { tokio::io::copy(&mut sr, &mut pw).await });
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match pr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => sw.write_all(&buf[..n]).await?,
            }
        }
        up.abort();
        anyhow::Ok(())
    });
    let mut c = tokio::net::TcpStream::connect(addr).await?;
    let mut lat = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    tokio::time::sleep(Duration::from_millis(300)).await; // stty raw has run
    if let Some(keys) = send {
        for k in keys {
            let t = Instant::now();
            c.write_all(&[*k]).await?;
            let n = c.read(&mut buf).await?;
            got += n;
            lat.push(t.elapsed());
        }
    } else {
        // Throughput is timed from the first output byte, so start-up and settle sleeps
        // do not count.
        let mut first = None;
        while got < expect {
            let n = c.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            first.get_or_insert_with(Instant::now);
            got += n;
        }
        lat.extend(first.map(|f| f.elapsed()));
    }
    let _ = child.kill().await;
    server.abort();
    Ok((got, lat))
}

async fn direct(
    script: &str,
    send: Option<&[u8]>,
    expect: usize,
) -> anyhow::Result<(usize, Vec<Duration>)> {
    let sk = p256::SecretKey::random(&mut rand_core::OsRng);
    use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let public = sk.public_key().to_public_key_pem(LineEnding::LF)?;
    let private = sk.to_pkcs8_pem(LineEnding::LF)?;
    let verifier = TicketVerifier::new(public.as_bytes(), "bench").map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = tokio_util::sync::CancellationToken::new();
    let cfg = TerminalConfig {
        session: SessionConfig {
            command: sh(script),
            ..SessionConfig::default()
        },
        max_sessions: 1,
    };
    tokio::spawn(serve(listener, cfg, verifier, stop.clone()));
    let claims = Claims::new("bench", "bench", Duration::from_secs(60), "1");
    let token = TicketSigner::from_pem(private.as_bytes())
        .and_then(|s| s.sign(&claims))
        .map_err(anyhow::Error::msg)?;
    let mut req = format!("ws://{addr}/ws").into_client_request()?;
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "tty".parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
    let hello = serde_json::json!({"AuthToken": token, "columns": 80, "rows": 24}).to_string();
    ws.send(Message::Text(hello.into())).await?;
    let mut got = 0;
    let mut lat = Vec::new();
    let next_output =
        async |ws: &mut tokio_tungstenite::WebSocketStream<_>| -> anyhow::Result<usize> {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Binary(b))) if b.first() == Some(&b'0') => {
                        return Ok(b.len() - 1);
                    }
                    Some(Ok(Message::Close(_))) | None => return Ok(0),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e.into()),
                }
            }
        };
    tokio::time::sleep(Duration::from_millis(300)).await;
    if let Some(keys) = send {
        for k in keys {
            let t = Instant::now();
            ws.send(Message::Binary(vec![b'0', *k].into())).await?;
            got += next_output(&mut ws).await?;
            lat.push(t.elapsed());
        }
    } else {
        // Throughput is timed from the first output byte, so start-up and settle sleeps
        // do not count.
        let mut first = None;
        while got < expect {
            let n = next_output(&mut ws).await?;
            if n == 0 {
                break;
            }
            first.get_or_insert_with(Instant::now);
            got += n;
        }
        lat.extend(first.map(|f| f.elapsed()));
    }
    stop.cancel();
    Ok((got, lat))
}

fn pct(mut v: Vec<Duration>, p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).map(|d| d.as_secs_f64() * 1e6).unwrap_or(0.0)
}

pub async fn run(mb: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("data");
    let bytes = mb * 1024 * 1024;
    std::fs::write(
        &file,
        (0..bytes).map(|i| (i % 251) as u8).collect::<Vec<u8>>(),
    )?;
    let cat = format!("stty raw -echo; sleep 0.2; cat '{}'", file.display());
    let echo = "stty raw -echo; cat";
    let keys: Vec<u8> = (0..ECHOES).map(|i| b'a' + (i % 26) as u8).collect();
    for (name, is_direct) in [
        ("bare PTY → TCP socket (floor)", false),
        ("device PTY bridge, WebSocket direct", true),
    ] {
        let (got, transfer) = if is_direct {
            direct(&cat, None, bytes).await?
        } else {
            bare(&cat, None, bytes).await?
        };
        let secs = transfer.first().map_or(f64::NAN, Duration::as_secs_f64);
        anyhow::ensure!(got >= bytes, "{name}: only {got} of {bytes} bytes");
        let (_, lat) = if is_direct {
            direct(echo, Some(&keys), 0).await?
        } else {
            bare(echo, Some(&keys), 0).await?
        };
        println!(
            "| terminal: {name}: output, echo latency median / p99 ({ECHOES} keys) | {:.0} MB/s, {:.0} µs / {:.0} µs |",
            bytes as f64 / 1e6 / secs,
            pct(lat.clone(), 0.5),
            pct(lat, 0.99)
        );
    }
    Ok(())
}
