//! Terminal session throughput and echo latency: the device's PTY bridge (WebSocket, ticket,
//! ttyd framing), direct and through a real bridge process's terminal proxy, against the floor
//! of a bare PTY copied to a TCP socket on loopback.

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

/// How the bench reaches the device's PTY bridge.
#[derive(Clone, Copy)]
enum Via<'a> {
    /// `ws://` to the device, with a ticket signed by a key of the bench's own.
    Direct,
    /// `wss://` to a real bridge process's terminal proxy, with an operator JWT.
    Proxy(&'a ProxyRig),
}

/// A bridge (release build beside this binary) with `[terminal]`, an identity provider, and
/// one device enrolled so the proxy finds it at 127.78.0.2 (the pool is a loopback range, so
/// no tunnel is involved: this measures the proxy).
pub struct ProxyRig {
    _dir: tempfile::TempDir,
    bridge: thingsly_e2e::Bridge,
    _idp: thingsly_e2e::Idp,
    jwt: String,
    operator_port: u16,
    device_addr: std::net::SocketAddr,
    ticket_public_pem: Vec<u8>,
    tls: std::sync::Arc<rustls::ClientConfig>,
}

const PROXY_DEVICE: &str = "bench-term";

impl ProxyRig {
    async fn start() -> anyhow::Result<Self> {
        use thingsly_e2e::*;
        let dir = tempfile::tempdir()?;
        let mut bridge = Bridge::init_with(
            &dir.path().join("bridge"),
            "[wireguard]\npool = \"127.78.0.0/24\"\n",
        )?;
        let device_port = free_port();
        let ops = Idp::for_bridge(
            &bridge,
            dir.path(),
            std::net::TcpListener::bind("127.0.0.1:0")?,
            "p, role:operator, *, terminal\n",
            device_port,
        )
        .await?;
        bridge.start()?;
        let ca = std::fs::read(bridge.ca_chain())?;
        let state = thingsly_core::state_dir::StateDir::open(dir.path().join("device"))?;
        let identity = thingsly_enroll::Identity::load_or_create(&state, PROXY_DEVICE)?;
        thingsly_enroll::ensure_enrolled(
            &state,
            &identity,
            &thingsly_enroll::BridgeEndpoint::direct(&bridge.url(), &ca, Duration::from_secs(30)),
            &bridge.fleet_token(),
            Default::default(),
        )
        .await?;
        let ticket_public_pem =
            std::fs::read(dir.path().join("device/identity/terminal-ticket.pub"))?;
        Ok(Self {
            jwt: ops.signing.token("bench", &["operator"]),
            operator_port: ops.operator_port,
            device_addr: format!("127.78.0.2:{device_port}").parse()?,
            ticket_public_pem,
            tls: std::sync::Arc::new(
                thingsly_enroll::client_config(&ca, None).map_err(anyhow::Error::msg)?,
            ),
            bridge,
            _idp: ops.idp,
            _dir: dir,
        })
    }

    fn bridge_pid(&self) -> Option<i32> {
        self.bridge.proc.as_ref().map(|p| p.pid())
    }
}

/// Run `script` in a session of the device's PTY bridge reached `via`, then send `send` one
/// key at a time (echo latencies) or read `expect` bytes (time from the first output byte).
async fn session(
    via: Via<'_>,
    script: &str,
    send: Option<&[u8]>,
    expect: usize,
) -> anyhow::Result<(usize, Vec<Duration>)> {
    let cfg = TerminalConfig {
        session: SessionConfig {
            command: sh(script),
            ..SessionConfig::default()
        },
        max_sessions: 1,
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let mut req;
    let hello_token;
    let (listen, public_pem, device_id) = match &via {
        Via::Direct => {
            let sk = p256::SecretKey::random(&mut rand_core::OsRng);
            use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
            let public = sk.public_key().to_public_key_pem(LineEnding::LF)?;
            let private = sk.to_pkcs8_pem(LineEnding::LF)?;
            let claims = Claims::new("bench", "bench", Duration::from_secs(60), "1");
            hello_token = TicketSigner::from_pem(private.as_bytes())
                .and_then(|s| s.sign(&claims))
                .map_err(anyhow::Error::msg)?;
            ("127.0.0.1:0".parse()?, public.into_bytes(), "bench")
        }
        Via::Proxy(rig) => {
            hello_token = String::new(); // the proxy puts the device ticket in
            (rig.device_addr, rig.ticket_public_pem.clone(), PROXY_DEVICE)
        }
    };
    let verifier = TicketVerifier::new(&public_pem, device_id).map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let device = tokio::spawn(serve(listener, cfg, verifier, stop.clone()));
    let result = match via {
        Via::Direct => {
            req = format!("ws://{addr}/ws").into_client_request()?;
            req.headers_mut()
                .insert("Sec-WebSocket-Protocol", "tty".parse()?);
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let (ws, _) = tokio_tungstenite::client_async(req, tcp).await?;
            measure(ws, &hello_token, send, expect).await
        }
        Via::Proxy(rig) => {
            req = format!(
                "wss://127.0.0.1:{}/terminal?deviceId={PROXY_DEVICE}&token={}",
                rig.operator_port, rig.jwt
            )
            .into_client_request()?;
            req.headers_mut()
                .insert("Sec-WebSocket-Protocol", "tty".parse()?);
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", rig.operator_port)).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(rig.tls.clone())
                .connect("127.0.0.1".try_into()?, tcp)
                .await?;
            let (ws, _) = tokio_tungstenite::client_async(req, tls).await?;
            measure(ws, &hello_token, send, expect).await
        }
    };
    stop.cancel();
    let _ = device.await;
    result
}

async fn measure<S>(
    mut ws: tokio_tungstenite::WebSocketStream<S>,
    token: &str,
    send: Option<&[u8]>,
    expect: usize,
) -> anyhow::Result<(usize, Vec<Duration>)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let hello = serde_json::json!({"AuthToken": token, "columns": 80, "rows": 24}).to_string();
    ws.send(Message::Text(hello.into())).await?;
    let mut got = 0;
    let mut lat = Vec::new();
    let next_output =
        async |ws: &mut tokio_tungstenite::WebSocketStream<S>| -> anyhow::Result<usize> {
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
    let _ = ws.close(None).await;
    Ok((got, lat))
}

/// Enter → prompt and a 1 MiB paste over one byte stream (a socket or a WebSocket).
trait Link {
    async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()>;
    /// Reads until `needle` has arrived.
    async fn until(&mut self, needle: &[u8]) -> anyhow::Result<()>;
}

/// The shell these rows run: echo on (Enter's echo and the prompt are two writes, which is
/// what Nagle's algorithm delays without TCP_NODELAY), a prompt of its own, and a command
/// that swallows a 1 MiB paste then says so.
const INTERACTIVE: &str = "PS1='bench> ' exec /bin/sh -i";
const PROMPT: &[u8] = b"bench> ";
const PASTE: usize = 1024 * 1024;
const PROMPTS: usize = 200;

/// `PROMPTS` Enter → prompt latencies, then the time from the first byte of a 1 MiB paste
/// (to `head -c`, in raw mode) until the command's answer.
async fn prompt_and_paste(link: &mut impl Link) -> anyhow::Result<(Vec<Duration>, Duration)> {
    link.until(PROMPT).await?;
    let mut lat = Vec::new();
    for _ in 0..PROMPTS {
        let t = Instant::now();
        link.send(b"\r").await?;
        link.until(PROMPT).await?;
        lat.push(t.elapsed());
    }
    // `pasted-""ok`: the typed line's echo must not look like the answer; drain that echo
    // before the clock starts.
    link.send(
        format!("stty raw -echo; head -c {PASTE} >/dev/null; stty -raw echo; echo pasted-\"\"ok\r")
            .as_bytes(),
    )
    .await?;
    link.until(b"pasted-\"\"ok").await?;
    tokio::time::sleep(Duration::from_millis(300)).await; // raw mode is on
    let data: Vec<u8> = (0..PASTE).map(|i| b'a' + (i % 26) as u8).collect();
    let t = Instant::now();
    link.send(&data).await?;
    link.until(b"pasted-ok").await?;
    Ok((lat, t.elapsed()))
}

struct TcpLink {
    s: tokio::net::TcpStream,
    seen: Vec<u8>,
}

impl Link for TcpLink {
    async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        Ok(self.s.write_all(bytes).await?)
    }
    async fn until(&mut self, needle: &[u8]) -> anyhow::Result<()> {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            if let Some(i) = find(&self.seen, needle) {
                self.seen.drain(..i + needle.len());
                return Ok(());
            }
            let n = self.s.read(&mut buf).await?;
            anyhow::ensure!(n > 0, "closed");
            self.seen.extend_from_slice(&buf[..n]);
        }
    }
}

struct WsLink<S> {
    ws: tokio_tungstenite::WebSocketStream<S>,
    seen: Vec<u8>,
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Link for WsLink<S> {
    async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        let mut m = vec![b'0'];
        m.extend_from_slice(bytes);
        Ok(self.ws.send(Message::Binary(m.into())).await?)
    }
    async fn until(&mut self, needle: &[u8]) -> anyhow::Result<()> {
        loop {
            if let Some(i) = find(&self.seen, needle) {
                self.seen.drain(..i + needle.len());
                return Ok(());
            }
            match self.ws.next().await {
                Some(Ok(Message::Binary(b))) if b.first() == Some(&b'0') => {
                    self.seen.extend_from_slice(&b[1..])
                }
                Some(Ok(Message::Close(f))) => anyhow::bail!("closed: {f:?}"),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => anyhow::bail!("closed"),
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The floor: the same shell on a bare PTY copied to a loopback socket.
async fn bare_interactive() -> anyhow::Result<(Vec<Duration>, Duration)> {
    let (pty, pts) = pty_process::open()?;
    pty.resize(pty_process::Size::new(24, 80))?;
    let mut child = pty_process::Command::new("/bin/sh")
        .args(["-c", INTERACTIVE])
        .spawn(pts)?;
    let (mut pr, mut pw) = pty.into_split();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let (sock, _) = listener.accept().await?;
        sock.set_nodelay(true)?;
        let (mut sr, mut sw) = sock.into_split();
        let up = tokio::spawn(async move { tokio::io::copy(&mut sr, &mut pw).await });
        let _ = tokio::io::copy(&mut pr, &mut sw).await;
        up.abort();
        anyhow::Ok(())
    });
    let s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let r = prompt_and_paste(&mut TcpLink {
        s,
        seen: Vec::new(),
    })
    .await;
    let _ = child.kill().await;
    server.abort();
    r
}

/// The same shell through the device's PTY bridge, reached `via`.
async fn session_interactive(via: Via<'_>) -> anyhow::Result<(Vec<Duration>, Duration)> {
    let cfg = TerminalConfig {
        session: SessionConfig {
            command: sh(INTERACTIVE),
            ..SessionConfig::default()
        },
        max_sessions: 1,
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let (listen, public_pem, device_id, token) = match &via {
        Via::Direct => {
            let sk = p256::SecretKey::random(&mut rand_core::OsRng);
            use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
            let public = sk.public_key().to_public_key_pem(LineEnding::LF)?;
            let private = sk.to_pkcs8_pem(LineEnding::LF)?;
            let claims = Claims::new("bench", "bench", Duration::from_secs(60), "i1");
            let t = TicketSigner::from_pem(private.as_bytes())
                .and_then(|s| s.sign(&claims))
                .map_err(anyhow::Error::msg)?;
            ("127.0.0.1:0".parse()?, public.into_bytes(), "bench", t)
        }
        Via::Proxy(rig) => (
            rig.device_addr,
            rig.ticket_public_pem.clone(),
            PROXY_DEVICE,
            String::new(),
        ),
    };
    let verifier = TicketVerifier::new(&public_pem, device_id)
        .map_err(anyhow::Error::msg)?
        .started_at(0);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let device = tokio::spawn(serve(listener, cfg, verifier, stop.clone()));
    let hello = serde_json::json!({"AuthToken": token, "columns": 80, "rows": 24}).to_string();
    let ws_cfg = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(4 << 20))
        .max_frame_size(Some(4 << 20));
    let r = match via {
        Via::Direct => {
            let mut req = format!("ws://{addr}/ws").into_client_request()?;
            req.headers_mut()
                .insert("Sec-WebSocket-Protocol", "tty".parse()?);
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let (mut ws, _) =
                tokio_tungstenite::client_async_with_config(req, tcp, Some(ws_cfg)).await?;
            ws.send(Message::Text(hello.into())).await?;
            prompt_and_paste(&mut WsLink {
                ws,
                seen: Vec::new(),
            })
            .await
        }
        Via::Proxy(rig) => {
            let mut req = format!(
                "wss://127.0.0.1:{}/terminal?deviceId={PROXY_DEVICE}&token={}",
                rig.operator_port, rig.jwt
            )
            .into_client_request()?;
            req.headers_mut()
                .insert("Sec-WebSocket-Protocol", "tty".parse()?);
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", rig.operator_port)).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(rig.tls.clone())
                .connect("127.0.0.1".try_into()?, tcp)
                .await?;
            let (mut ws, _) =
                tokio_tungstenite::client_async_with_config(req, tls, Some(ws_cfg)).await?;
            ws.send(Message::Text(hello.into())).await?;
            prompt_and_paste(&mut WsLink {
                ws,
                seen: Vec::new(),
            })
            .await
        }
    };
    stop.cancel();
    let _ = device.await;
    r
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
    let rig = ProxyRig::start().await?;
    let cpu_ticks = |pid: Option<i32>| -> f64 {
        pid.and_then(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
            .and_then(|s| {
                let f: Vec<&str> = s.rsplit(')').next()?.split_whitespace().collect();
                Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
            })
            .unwrap_or(f64::NAN)
            / 100.0 // USER_HZ
    };
    let rows: [(&str, Option<Via>); 3] = [
        ("bare PTY → TCP socket (floor)", None),
        ("device PTY bridge, WebSocket direct", Some(Via::Direct)),
        (
            "through the bridge's terminal proxy (TLS, JWT, policy)",
            Some(Via::Proxy(&rig)),
        ),
    ];
    for (name, via) in rows {
        let proxied = matches!(via, Some(Via::Proxy(_)));
        let cpu_before = cpu_ticks(rig.bridge_pid());
        let (got, transfer) = match via {
            Some(v) => session(v, &cat, None, bytes).await?,
            None => bare(&cat, None, bytes).await?,
        };
        let proxy_cpu = cpu_ticks(rig.bridge_pid()) - cpu_before;
        let secs = transfer.first().map_or(f64::NAN, Duration::as_secs_f64);
        anyhow::ensure!(got >= bytes, "{name}: only {got} of {bytes} bytes");
        let (_, lat) = match via {
            Some(v) => session(v, echo, Some(&keys), 0).await?,
            None => bare(echo, Some(&keys), 0).await?,
        };
        println!(
            "| terminal: {name}: output, echo latency median / p99 ({ECHOES} keys) | {:.0} MB/s, {:.0} µs / {:.0} µs |",
            bytes as f64 / 1e6 / secs,
            pct(lat.clone(), 0.5),
            pct(lat, 0.99)
        );
        if proxied {
            println!(
                "| terminal: bridge CPU relaying {mb} MiB through the proxy | {:.2} s ({:.1} ms per MB) |",
                proxy_cpu,
                proxy_cpu * 1e3 / (bytes as f64 / 1e6)
            );
        }
    }
    let rows: [(&str, Option<Via>); 3] = [
        ("bare PTY → TCP socket (floor)", None),
        ("device PTY bridge, WebSocket direct", Some(Via::Direct)),
        (
            "through the bridge's terminal proxy",
            Some(Via::Proxy(&rig)),
        ),
    ];
    for (name, via) in rows {
        let (lat, paste) = match via {
            Some(v) => session_interactive(v).await?,
            None => bare_interactive().await?,
        };
        println!(
            "| terminal: {name}: Enter → prompt median / p99 ({PROMPTS}), 1 MiB paste into `head -c` | {:.0} µs / {:.0} µs, {:.0} ms |",
            pct(lat.clone(), 0.5),
            pct(lat, 0.99),
            paste.as_secs_f64() * 1e3
        );
    }
    Ok(())
}
