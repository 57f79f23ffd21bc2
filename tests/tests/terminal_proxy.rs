//! The bridge's terminal proxy end to end: a real identity provider endpoint (HTTPS JWKS), the
//! real bridge with a Casbin policy, a real agent whose terminal listens on its registry
//! address, and WebSocket clients speaking ttyd's protocol over TLS.
//!
//! The device's tunnel address comes from the bridge's pool; the pool here is a loopback
//! range (127.77.x.0/24), so the proxy's lookup-and-connect path runs for real without a
//! tunnel (the tunnel's own tests cover reaching 10.8.0.x).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use thingsly_e2e::ttyd::{Ws, hello, input, read_until};
use thingsly_e2e::*;
use tokio_tungstenite::tungstenite::Message;

const POLICY: &str = "\
p, role:operator, group:line-3, terminal
p, role:auditor, *, terminal-readonly
g2, dev-proxy, group:line-3
";

struct Setup {
    _dir: tempfile::TempDir,
    bridge: Bridge,
    agent: Agent,
    idp: Idp,
    /// The bridge's `terminal.listen` (no client-certificate request).
    operator_port: u16,
    es: SigningKey,
    tls: Arc<rustls::ClientConfig>,
}

/// Bridge with `[terminal]` and a loopback pool `127.77.<net>.0/24`, IdP with one ES256 key,
/// an enrolled agent `dev-proxy` whose terminal listens on its registry address.
async fn setup(net: u8) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let mut bridge = Bridge::init_with(
        &dir.path().join("bridge"),
        &format!("[wireguard]\npool = \"127.77.{net}.0/24\"\n"),
    )
    .unwrap();
    let device_port = free_port();
    let ops = Idp::for_bridge(
        &bridge,
        dir.path(),
        std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        POLICY,
        device_port,
    )
    .await
    .unwrap();
    let (idp, es, operator_port) = (ops.idp, ops.signing, ops.operator_port);
    bridge.start().unwrap();

    let device_ip = format!("127.77.{net}.2"); // first device address (.1 is the hub's)
    let mut agent = Agent::new(
        &dir.path().join("agent"),
        &AgentOpts {
            device_id: "dev-proxy".into(),
            server_url: bridge.url(),
            token: bridge.fleet_token(),
            ca_bundle: bridge.ca_chain(),
            extra: format!(
                "\n[terminal]\nlisten = \"{device_ip}\"\nport = {device_port}\nmax_sessions = 4\n# the tests write into their own (root's) temporary directories\nuser = \"\"\nallow_agent_user = true\n"
            ),
            ..Default::default()
        },
    )
    .unwrap();
    agent.start().unwrap();
    wait_for("terminal listening", Duration::from_secs(30), || {
        agent.status()["state"]["modules"]["terminal"]["state"] == "running"
    });
    let devices: serde_json::Value =
        serde_json::from_str(&bridge.cli(&["devices"]).unwrap()).unwrap();
    assert_eq!(devices[0]["wireguard_address"], format!("{device_ip}/32"));
    let tls = Arc::new(
        thingsly_enroll::client_config(&std::fs::read(bridge.ca_chain()).unwrap(), None).unwrap(),
    );
    Setup {
        _dir: dir,
        bridge,
        agent,
        idp,
        operator_port,
        es,
        tls,
    }
}

impl Setup {
    /// Open `/terminal?<query>` on the operator port; `Err((status, body))` when refused.
    async fn open(&self, query: &str, bearer: Option<&str>) -> Result<Ws, (u16, String)> {
        self.open_on(self.operator_port, query, bearer).await
    }

    async fn open_on(
        &self,
        port: u16,
        query: &str,
        bearer: Option<&str>,
    ) -> Result<Ws, (u16, String)> {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        thingsly_e2e::ttyd::open(tcp, self.tls.clone(), "127.0.0.1", port, query, bearer).await
    }

    /// A session as ttyd's page runs it: hello with the operator's JWT as AuthToken.
    async fn session(&self, token: &str) -> Ws {
        let mut ws = self
            .open(&format!("deviceId=dev-proxy&token={token}"), None)
            .await
            .unwrap_or_else(|(s, b)| panic!("refused: {s} {b}"));
        hello(&mut ws, token).await;
        ws
    }

    fn refused(&self, r: Result<Ws, (u16, String)>) -> (u16, String) {
        match r {
            Ok(_) => panic!("upgrade should have been refused"),
            Err(e) => e,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_reach_the_device_shell_only_as_their_policy_allows() {
    let mut s = setup(1).await;
    let rs = SigningKey::rs256("rs-1", s._dir.path());
    s.idp.publish(&rs);

    // ES256 operator with a role for the device's group: a shell, resized by the hello, whose
    // exit closes the browser side with the device's own close (1000, exit status).
    let op = s.es.token("olga", &["operator"]);
    let mut ws = s.session(&op).await;
    input(&mut ws, "stty size; echo sum=$((40+2))").await;
    let out = read_until(&mut ws, "sum=42").await.unwrap();
    assert!(out.contains("30 100"), "{out}");
    input(&mut ws, "exit 5").await;
    let (_, close) = read_until(&mut ws, "never").await.unwrap_err();
    assert_eq!(close, "1000 exit status 5");

    // RS256 (Keycloak's default), the token in a header, and the main API port work as well.
    let rs_op = rs.token("rita", &["operator"]);
    let mut ws = s
        .open_on(s.bridge.port, "deviceId=dev-proxy", Some(&rs_op))
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
    hello(&mut ws, "").await;
    input(&mut ws, "echo rs=$((6*7))").await;
    read_until(&mut ws, "rs=42").await.unwrap();

    // The browser going away ends the shell on the device (SIGHUP to its process group).
    // `DO NE` joined by printf, so the typed command's echo cannot match `DONE`.
    input(&mut ws, "printf 'pid=%d%s%s\\n' $$ DO NE").await;
    let out = read_until(&mut ws, "DONE").await.unwrap();
    let pid: u32 = out
        .rsplit("pid=")
        .next()
        .and_then(|rest| rest.split("DONE").next())
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {out:?}"));
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    drop(ws);
    wait_for(
        "shell gone after disconnect",
        Duration::from_secs(10),
        || !std::path::Path::new(&format!("/proc/{pid}")).exists(),
    );

    // Watch-only role: the session opens, typed input never runs.
    let marker = s._dir.path().join("readonly-ran");
    let mut ws = s.session(&s.es.token("otto", &["auditor"])).await;
    input(&mut ws, &format!("touch {}", marker.display())).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    ws.close(None).await.unwrap();
    assert!(!marker.exists(), "input reached a read-only session");

    // Refusals, each a real HTTP status with a reason, none opening a session.
    let q = |t: &str| format!("deviceId=dev-proxy&token={t}");
    let now = idp_now();
    let foreign = SigningKey::es256(&s.es.kid); // same kid, other key: bad signature
    let cases = [
        (foreign.token("olga", &["operator"]), 401, "signature"),
        (
            s.es.token_with(serde_json::json!({"preferred_username": "olga",
                "realm_access": {"roles": ["operator"]}, "exp": now - 120, "iat": now - 600})),
            401,
            "expired",
        ),
        (
            s.es.token_with(serde_json::json!({"preferred_username": "olga",
                "realm_access": {"roles": ["operator"]}, "aud": "grafana"})),
            401,
            "audience",
        ),
        (
            SigningKey::es256("es-unknown").token("olga", &["operator"]),
            401,
            "unknown signing key",
        ),
        (
            s.es.token("mallory", &["guest"]),
            403,
            "may not open a terminal",
        ),
        // Issue 17: a user whose name is a role's subject got that role's grants.
        (
            s.es.token("role:operator", &["guest"]),
            403,
            "may not open a terminal",
        ),
        (String::new(), 401, "no token"),
    ];
    for (token, status, why) in cases {
        let (code, body) = s.refused(s.open(&q(&token), None).await);
        assert_eq!(code, status, "{why}: {body}");
        assert!(body.contains(why), "{body:?} should say {why:?}");
    }
    // Operator of another device group, device not enrolled, not a WebSocket.
    let (code, _) = s.refused(
        s.open(
            &format!(
                "deviceId=dev-other&token={}",
                s.es.token("olga", &["operator"])
            ),
            None,
        )
        .await,
    );
    assert_eq!(code, 403);
    let (code, body) = s.refused(
        s.open(
            &format!(
                "deviceId=dev-ghost&token={}",
                s.es.token("root", &["auditor"])
            ),
            None,
        )
        .await,
    );
    assert_eq!((code, body.contains("not enrolled")), (404, true), "{body}");
    let plain = s
        .bridge
        .http()
        .unwrap()
        .get(format!("{}/terminal?{}", s.bridge.url(), q(&op)))
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status().as_u16(), 426);

    // An unknown kid refetches the key set, at most once per jwks_min_refresh (1 s here):
    // a burst of bogus kids does not hammer the provider.
    let before = s.idp.fetches();
    let burst = std::time::Instant::now();
    for _ in 0..20 {
        let t = SigningKey::es256("bogus").token("olga", &["operator"]);
        s.refused(s.open(&q(&t), None).await);
    }
    let fetched = s.idp.fetches() - before;
    let allowed = burst.elapsed().as_secs() as usize + 1;
    assert!(
        fetched <= allowed,
        "{fetched} fetches in {:?}",
        burst.elapsed()
    );
    // Key rotation: a key published after start is picked up on first use.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let rotated = SigningKey::es256("es-2");
    s.idp.publish(&rotated);
    let mut ws = s.session(&rotated.token("olga", &["operator"])).await;
    input(&mut ws, "echo rotated-$((1+1))").await;
    read_until(&mut ws, "rotated-2").await.unwrap();
    ws.close(None).await.unwrap();

    // Policy order: with the device down, a permitted operator gets 502 (the proxy tried the
    // device) while a forbidden one still gets 403 (it never did).
    s.agent.proc.as_mut().unwrap().terminate();
    let (code, body) = s.refused(s.open(&q(&op), None).await);
    assert_eq!(code, 502, "{body}");
    assert!(body.contains("device_unreachable"), "{body}");
    let (code, _) = s.refused(s.open(&q(&s.es.token("mallory", &[])), None).await);
    assert_eq!(code, 403);

    // The policy is reread on SIGHUP: mallory is now allowed (and so reaches the missing
    // device: 502); a broken policy file keeps the last good one.
    let policy = s._dir.path().join("policy.csv");
    std::fs::write(
        &policy,
        format!("{POLICY}p, mallory, dev-proxy, terminal\n"),
    )
    .unwrap();
    s.bridge.proc.as_ref().unwrap().signal(libc::SIGHUP);
    let mallory = s.es.token("mallory", &[]);
    let mut code = 0;
    for _ in 0..50 {
        code = s.refused(s.open(&q(&mallory), None).await).0;
        if code == 502 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(code, 502, "policy not reloaded on SIGHUP");
    std::fs::remove_file(&policy).unwrap();
    s.bridge.proc.as_ref().unwrap().signal(libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(s.refused(s.open(&q(&mallory), None).await).0, 502);
    assert!(
        s.bridge
            .log_text()
            .contains("terminal policy reload failed; old policy kept")
    );

    // Audit: who, where, bytes, how it ended.
    let log = s.bridge.log_text();
    assert!(
        log.contains("terminal session end")
            && log.contains("operator=olga")
            && log.contains("device closed: 1000 exit status 5"),
        "{log}"
    );
}

/// A fast producer through the proxy with a paused client: the device stops reading its PTY,
/// the bridge's memory stays flat; after resume, the rest arrives intact (checksum).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_control_holds_across_the_proxy() {
    let s = setup(2).await;
    let mut ws = s.session(&s.es.token("olga", &["operator"])).await;
    // RE""ADY: the typed line's echo must not count as the shell having run `stty -echo`.
    input(&mut ws, "stty -echo; echo RE\"\"ADY").await;
    read_until(&mut ws, "READY").await.unwrap();
    // 20 MB of deterministic output, then its checksum from the device's point of view.
    input(
        &mut ws,
        "head -c 20000000 /dev/zero | tr '\\0' 'x' | fold -w 100 > /tmp/.tp-$$; \
         sha256sum < /tmp/.tp-$$ | sed 's/ .*/ SUM/'; cat /tmp/.tp-$$; rm /tmp/.tp-$$; echo; echo DONE",
    )
    .await;
    let mut out = Vec::new();
    let mut paused_once = false;
    let bridge_pid = s.bridge.proc.as_ref().unwrap().pid();
    while !String::from_utf8_lossy(&out[out.len().saturating_sub(64)..]).contains("DONE") {
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) if b.first() == Some(&b'0') => {
                out.extend_from_slice(&b[1..])
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("{other:?}"),
        }
        if !paused_once && out.len() > 2_000_000 {
            paused_once = true;
            ws.send(Message::Binary(b"2".to_vec().into()))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
            let before = rss_kib(bridge_pid);
            tokio::time::sleep(Duration::from_secs(3)).await;
            let after = rss_kib(bridge_pid);
            assert!(
                after < before + 2048,
                "bridge RSS grew from {before} to {after} KiB while paused"
            );
            // Repeated resume is harmless.
            for _ in 0..3 {
                ws.send(Message::Binary(b"3".to_vec().into()))
                    .await
                    .unwrap();
            }
        }
    }
    let text = String::from_utf8_lossy(&out).replace("\r\n", "\n");
    // The line may start with the shell's prompt.
    let sum = text
        .lines()
        .find_map(|l| l.strip_suffix(" SUM"))
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or_else(|| panic!("no SUM line in {:?}", &text[..text.len().min(400)]))
        .to_string();
    let start = text.find(" SUM\n").unwrap() + 5;
    let end = text.rfind("\nDONE").unwrap();
    // `fold` leaves the last line without newline; the `\n` before DONE is our `echo`'s.
    let body = &text[start..end];
    use sha2::Digest;
    let got = hex::encode(sha2::Sha256::digest(body.as_bytes()));
    assert_eq!(got, sum, "{} bytes arrived", body.len());
    assert!(body.len() >= 20_000_000);
}

fn idp_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

/// The browser's view: Debian's headless Chromium loads the bridge's terminal page (xterm.js
/// compiled into the bridge) that speaks ttyd's protocol through the proxy; keystrokes typed into the page run on the
/// device, the output is read from the rendered page, and the shell's exit shows as a clean
/// close with its status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xterm_in_headless_chromium_runs_a_command_through_the_proxy() {
    let s = setup(3).await;
    let browser = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("browser");
    npm_ci(&browser);
    let token = s.es.token("olga", &["operator"]);
    // The bridge's own page, as an operator opens it (the token in the fragment).
    let page_url = format!(
        "https://127.0.0.1:{}/terminal/#deviceId=dev-proxy&token={token}",
        s.operator_port
    );
    let out = tokio::process::Command::new("node")
        .arg(browser.join("terminal-session.mjs"))
        .env("PAGE_URL", page_url)
        .env("SERVER_CERT", s.bridge.data().join("ca/server.crt"))
        .env("TYPE", "echo browser-$((20+22)) ünïcode-✓")
        .env("EXPECT", "browser-42 ünïcode-✓")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {stdout:?}, stderr {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(
        result["ok"],
        true,
        "{result:#}\nbridge log:\n{}",
        s.bridge.log_text()
    );
    assert!(
        result["screen"]
            .as_str()
            .unwrap()
            .contains("browser-42 ünïcode-✓"),
        "{result:#}"
    );
    assert_eq!(result["status"], "closed 1000 exit status 3", "{result:#}");
}

/// Install the test's npm packages (playwright-core) from the lock file when they
/// are missing or older than it.
fn npm_ci(dir: &std::path::Path) {
    let stamp = dir.join("node_modules/.package-lock.json");
    let lock = dir.join("package-lock.json");
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if modified(&stamp).is_some() && modified(&stamp) >= modified(&lock) {
        return;
    }
    let st = std::process::Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(dir)
        .status()
        .expect("npm (Node.js >= 20) is needed for the browser test");
    assert!(st.success(), "npm ci in {} failed", dir.display());
}

/// Issue 17: a paste over 64 KiB dropped the session. A full 1 MiB paste (ttyd's page sends
/// it as one message) crosses the proxy and reaches the device's program byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_mebibyte_paste_crosses_the_proxy_whole() {
    let s = setup(5).await;
    let mut ws = s.session(&s.es.token("olga", &["operator"])).await;
    input(&mut ws, "stty -echo; echo RE\"\"ADY").await;
    read_until(&mut ws, "READY").await.unwrap();
    input(
        &mut ws,
        "stty raw; head -c 1048576 | sha256sum | sed 's/ .*/ PASTED/'; stty -raw",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await; // raw mode is on
    let data: Vec<u8> = (0..1_048_576u32).map(|i| b'a' + (i % 26) as u8).collect();
    let mut m = vec![b'0'];
    m.extend_from_slice(&data);
    ws.send(Message::Binary(m.into())).await.unwrap();
    let out = read_until(&mut ws, " PASTED").await.unwrap();
    use sha2::Digest;
    let want = hex::encode(sha2::Sha256::digest(&data));
    assert!(out.contains(&format!("{want} PASTED")), "{out}");
}

/// Issue 17: the operator port kept idle connections forever, like the device port. It is
/// served by the same code: a TLS connection that sends nothing and one with half a request
/// are closed at the header timeout (10 s by default), and the port keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_port_closes_idle_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = setup(4).await;
    let connect = || async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", s.operator_port))
            .await
            .unwrap();
        tokio_rustls::TlsConnector::from(s.tls.clone())
            .connect("127.0.0.1".try_into().unwrap(), tcp)
            .await
            .unwrap()
    };
    let mut silent = connect().await;
    let mut half = connect().await;
    half.write_all(b"GET /terminal?deviceId=dev-proxy HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let t0 = std::time::Instant::now();
    for s in [&mut silent, &mut half] {
        let mut buf = [0u8; 512];
        loop {
            match tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => continue,
                Err(_) => panic!("operator port kept an idle connection for 20 s"),
            }
        }
    }
    assert!(t0.elapsed() >= Duration::from_secs(8), "{:?}", t0.elapsed());
    let (code, _) = s.refused(s.open("deviceId=dev-proxy", None).await);
    assert_eq!(code, 401, "still serving");
}
