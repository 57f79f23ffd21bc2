#![allow(clippy::unwrap_used)]
//! The bundle relay of a streaming install (`crates/ota/src/relay.rs`) against the real bridge:
//! curl plays RAUC's side, which is the HTTP client RAUC's NBD server uses (libcurl, range
//! requests of one NBD read each). A [`TcpProxy`] between the relay and the bridge cuts the
//! link and counts the bytes that crossed it. RAUC's own streaming is exercised in the HIL
//! trixie image; this machine's kernel has no NBD.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thingsly_e2e::Bridge;
use thingsly_e2e::proxy::TcpProxy;
use thingsly_e2e::rauc::RaucSandbox;
use thingsly_ota::ddi_client::{Auth, DdiClient};
use thingsly_ota::relay::{Relay, RelayLimits, RelaySource};

struct Rig {
    bridge: Bridge,
    link: TcpProxy,
    bundle: Vec<u8>,
    source: RelaySource,
    _rauc: RaucSandbox,
    _t: tempfile::TempDir,
}

/// A bridge with a 4 MiB bundle assigned to an enrolled device, and that device's DDI client
/// reaching the bridge through `link`.
async fn rig() -> Rig {
    let t = tempfile::tempdir().unwrap();
    let rauc = RaucSandbox::start(&t.path().join("rauc")).unwrap();
    let mut bridge = Bridge::init_with(&t.path().join("bridge"), "").unwrap();
    bridge.start().unwrap();
    let path = rauc
        .bundle("relay.raucb", "3.0.0", &["--size-mib", "4"])
        .unwrap();
    let bundle = std::fs::read(&path).unwrap();
    let module = bridge.ota_upload(&path, "rootfs", "3.0.0").unwrap();
    let ca = std::fs::read(bridge.ca_chain()).unwrap();
    let state = thingsly_core::state_dir::StateDir::open(t.path().join("dev")).unwrap();
    let identity = thingsly_enroll::Identity::load_or_create(&state, "dev-relay").unwrap();
    let creds = thingsly_enroll::ensure_enrolled(
        &state,
        &identity,
        &thingsly_enroll::BridgeEndpoint::direct(&bridge.url(), &ca, Duration::from_secs(10)),
        &bridge.fleet_token(),
        Default::default(),
    )
    .await
    .unwrap();
    bridge
        .ota_assign(module["id"].as_i64().unwrap(), &["--device", "dev-relay"])
        .unwrap();
    let link = TcpProxy::start(bridge.port);
    let chain = creds.full_chain_pem();
    let tls =
        thingsly_enroll::client_config(&ca, Some((chain.as_bytes(), creds.key_pem.as_bytes())))
            .unwrap();
    let ddi = DdiClient::new(
        &format!("https://127.0.0.1:{}", link.port),
        "DEFAULT",
        "dev-relay",
        tls,
        Auth::Certificate,
        &thingsly_core::proxy::DIRECT,
    )
    .unwrap();
    let url = format!(
        "{}/softwaremodules/{}/artifacts/{}",
        ddi.base,
        module["id"],
        module["filename"].as_str().unwrap()
    );
    let source = RelaySource {
        ddi,
        url,
        size: bundle.len() as u64,
    };
    Rig {
        bridge,
        link,
        bundle,
        source,
        _rauc: rauc,
        _t: t,
    }
}

/// curl's answer to a request to the relay: (HTTP status, body, headers).
fn curl(args: &[&str]) -> (u32, Vec<u8>, String) {
    let t = tempfile::tempdir().unwrap();
    let (body, head) = (t.path().join("body"), t.path().join("head"));
    let out = Command::new("curl")
        .args(["-sS", "--noproxy", "*", "-o"])
        .arg(&body)
        .arg("-D")
        .arg(&head)
        .args(["-w", "%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let code = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    (
        code,
        std::fs::read(&body).unwrap_or_default(),
        std::fs::read_to_string(&head).unwrap_or_default(),
    )
}

async fn curl_async(args: Vec<String>) -> (u32, Vec<u8>, String) {
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&a)
    })
    .await
    .unwrap()
}

fn range(url: &str, a: u64, b: u64) -> Vec<String> {
    vec!["-r".into(), format!("{a}-{b}"), url.to_string()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raucs_reads_come_back_byte_exact_through_cuts_and_a_server_restart() {
    let mut r = rig().await;
    let relay = Relay::start(r.source.clone(), RelayLimits::default())
        .await
        .unwrap();
    let url = relay.url().to_string();
    let size = r.bundle.len() as u64;
    // RAUC's first request: the "sqsh" magic and, in Content-Range, the bundle's size.
    let (code, body, head) = curl_async(range(&url, 0, 3)).await;
    assert_eq!(code, 206, "{head}");
    assert_eq!(body, &r.bundle[..4]);
    assert!(
        head.to_lowercase()
            .contains(&format!("content-range: bytes 0-3/{size}")),
        "{head}"
    );

    // A 2 MiB read whose connection to the server is cut after 512 KiB: RAUC's request just
    // takes longer, and only what was lost crosses the link again.
    let before = r.link.down_bytes();
    r.link.cut_once_after(512 * 1024);
    let (a, b) = (1_000_000u64, 1_000_000 + 2 * 1024 * 1024 - 1);
    let (code, body, _) = curl_async(range(&url, a, b)).await;
    assert_eq!(code, 206);
    assert!(body == r.bundle[a as usize..=b as usize], "bytes differ");
    assert_eq!(r.link.cuts(), 1);
    assert!(
        relay
            .stats()
            .retries
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    let crossed = r.link.down_bytes() - before;
    assert!(
        crossed < (b - a + 1) + 512 * 1024,
        "{crossed} bytes crossed the link for a {} byte read cut once",
        b - a + 1
    );

    // The server goes away in the middle of RAUC's request and comes back 3 s later.
    r.link.throttle(256 * 1024);
    let read = tokio::spawn(curl_async(range(&url, 0, size - 1)));
    tokio::time::sleep(Duration::from_millis(700)).await;
    r.bridge.proc.as_mut().unwrap().kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    r.link.throttle(0);
    r.bridge.start().unwrap();
    let (code, body, _) = read.await.unwrap();
    assert_eq!(code, 206);
    assert!(
        body == r.bundle,
        "the whole bundle differs after a server restart"
    );
    assert!(
        relay.stats().failure().is_none(),
        "{:?}",
        relay.stats().failure()
    );
    let s = relay.stats();
    let (fetched, served) = (
        s.fetched.load(std::sync::atomic::Ordering::Relaxed),
        s.served.load(std::sync::atomic::Ordering::Relaxed),
    );
    assert_eq!(served, 4 + (b - a + 1) + size);
    assert!(fetched >= served, "fetched {fetched} < served {served}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_get_nothing_and_a_dead_link_fails_the_read_with_a_reason() {
    let mut r = rig().await;
    let relay = Relay::start(
        r.source.clone(),
        RelayLimits {
            hold: Duration::from_secs(3),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let url = relay.url().to_string();
    let size = r.bundle.len();
    // Another path on the same port (someone guessing), another method, a range past the end.
    let port = url.split(':').nth(2).unwrap().split('/').next().unwrap();
    let guess = format!("http://127.0.0.1:{port}/bundle.raucb");
    assert_eq!(curl(&[&guess]).0, 404);
    assert_eq!(curl(&["-X", "POST", &url]).0, 405);
    let (code, _, head) = curl(&["-r", &format!("{size}-"), &url]);
    assert_eq!(code, 416);
    assert!(head.contains(&format!("bytes */{size}")), "{head}");
    let (code, _, head) = curl(&["-I", &url]);
    assert!(
        code == 200 && head.contains(&format!("content-length: {size}")),
        "{code} {head}"
    );
    let s = relay.stats();
    assert_eq!(s.fetched.load(std::sync::atomic::Ordering::Relaxed), 0);

    // The server is gone for good: after `hold` the read fails, and the relay says why.
    r.bridge.proc.as_mut().unwrap().kill();
    let started = Instant::now();
    let (code, body, _) = curl(&["-r", "0-65535", &url]);
    assert!(
        body.len() < 65536,
        "{code}: a read succeeded without a server"
    );
    assert!(started.elapsed() >= Duration::from_secs(3));
    let why = s.failure().unwrap();
    assert!(why.contains("no data from the server for 3 s"), "{why}");

    // A refusal (a module the device is not assigned): at once, not after `hold`.
    r.bridge.start().unwrap();
    let refused = Relay::start(
        RelaySource {
            url: r.source.url.replace("/artifacts/", "/artifacts/missing-"),
            ..r.source.clone()
        },
        RelayLimits {
            hold: Duration::from_secs(30),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let started = Instant::now();
    let _ = curl(&["-r", "0-3", refused.url()]);
    assert!(started.elapsed() < Duration::from_secs(10));
    let why = refused.stats().failure().unwrap();
    assert!(why.contains("HTTP 404"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_cap_holds_for_all_of_raucs_requests_together() {
    // Correctness, not speed: three parallel reads cannot be faster than the cap allows.
    const CAP: u64 = 1024 * 1024;
    let r = rig().await;
    let cap = Arc::new(std::sync::atomic::AtomicU64::new(CAP));
    let c = cap.clone();
    let relay = Relay::start(
        r.source.clone(),
        RelayLimits {
            rate: Arc::new(move || c.load(std::sync::atomic::Ordering::Relaxed)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let url = relay.url().to_string();
    let part = 1024 * 1024u64;
    let started = Instant::now();
    let reads: Vec<_> = (0..3)
        .map(|i| tokio::spawn(curl_async(range(&url, i * part, (i + 1) * part - 1))))
        .collect();
    for (i, h) in reads.into_iter().enumerate() {
        let (code, body, _) = h.await.unwrap();
        assert_eq!(code, 206);
        let i = i as u64;
        assert!(body == r.bundle[(i * part) as usize..((i + 1) * part) as usize]);
    }
    let took = started.elapsed().as_secs_f64();
    // 3 MiB at 1 MiB/s, less the tenth of a second of burst.
    assert!(took >= 2.85, "3 MiB in {took:.2} s under a {CAP} B/s cap");
    // Lifted: the next read is not held back.
    cap.store(0, std::sync::atomic::Ordering::Relaxed);
    let started = Instant::now();
    let (code, _, _) = curl_async(range(&url, 0, 3 * part - 1)).await;
    assert_eq!(code, 206);
    assert!(started.elapsed() < Duration::from_secs(3));
}
