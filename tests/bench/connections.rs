//! What idle and stalled clients cost the bridge: `thingsly-bench connections N` holds N idle
//! TLS connections (handshake done, nothing sent) on a real release bridge and prints its RSS
//! and a legitimate enrollment's latency before and while they are held; then 200
//! unauthenticated connections each stalling after 2 MiB of a body, against the same baseline.

use std::sync::Arc;
use std::time::{Duration, Instant};
use thingsly_e2e::{Bridge, wg_public_key};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn rss_mib(pid: i32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(f64::NAN)
        / 1024.0
}

/// Median latency of `n` enrollments (a new TLS connection each, as a device makes).
async fn enroll_latency(bridge: &Bridge, tag: &str, n: usize) -> anyhow::Result<f64> {
    let mut lat = Vec::new();
    for i in 0..n {
        let http = bridge.http()?;
        let id = format!("bench-{tag}-{i}");
        let kp = rcgen::KeyPair::generate()?;
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name.push(rcgen::DnType::CommonName, &id);
        let csr = p.serialize_request(&kp)?.pem()?;
        let t = Instant::now();
        let r = http
            .post(format!("{}/devices/{id}/enroll", bridge.url()))
            .bearer_auth(bridge.fleet_token())
            .json(&serde_json::json!({"csr_pem": csr, "wireguard_public_key": wg_public_key()}))
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "enroll: {}", r.status());
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    lat.sort_by(f64::total_cmp);
    Ok(lat[lat.len() / 2])
}

pub async fn run(n: usize) -> anyhow::Result<()> {
    // This process holds the N connections: raise its own soft nofile limit to the hard one.
    {
        use rustix::process::{Resource, getrlimit, setrlimit};
        let mut l = getrlimit(Resource::Nofile);
        l.current = l.maximum;
        setrlimit(Resource::Nofile, l)?;
        let have = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
        anyhow::ensure!(
            have > n as u64 + 256,
            "nofile limit {have} is too small for {n} connections"
        );
    }
    let dir = tempfile::tempdir()?;
    // Long timeouts, so the bridge holds what we open for the whole measurement; the cap
    // above N. The shipped unit's LimitNOFILE.
    let mut bridge = Bridge::init_with(
        &dir.path().join("b"),
        &format!(
            "[limits]\nmax_connections = {}\nhandshake_timeout = \"5m\"\nheader_timeout = \"5m\"\nidle_timeout = \"5m\"\n[enrollment]\nfleet_enrollments_per_minute = 0\n",
            n + 1000
        ),
    )?;
    // The shipped unit's LimitNOFILE=65536, or as much of it as this machine's hard limit allows.
    let hard = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            let l = t
                .lines()
                .find(|l| l.starts_with("Max open files"))?
                .to_string();
            l.split_whitespace().nth(4)?.parse::<u64>().ok()
        })
        .unwrap_or(65536)
        .min(65536);
    // And the unit's environment (its malloc arena count), as shipped.
    let unit = include_str!("../../systemd/thingsly-bridge.service");
    let mut prefix = vec!["env".to_string()];
    prefix.extend(
        unit.lines()
            .filter_map(|l| l.strip_prefix("Environment="))
            .map(str::to_string),
    );
    prefix.extend(["prlimit".into(), format!("--nofile={hard}:{hard}")]);
    bridge.prefix = prefix;
    bridge.start()?;
    let pid = bridge.proc.as_ref().map(|p| p.pid()).unwrap_or(0);
    enroll_latency(&bridge, "warm", 20).await?;
    let rss0 = rss_mib(pid);
    let lat0 = enroll_latency(&bridge, "before", 20).await?;

    // N plain TCP connections that never start TLS (the cheapest attack: no handshake CPU).
    let mut plain = Vec::with_capacity(n);
    for _ in 0..n {
        plain.push(TcpStream::connect(("127.0.0.1", bridge.port)).await?);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_plain = rss_mib(pid);
    let lat_plain = enroll_latency(&bridge, "plain", 20).await?;
    drop(plain);
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "| bridge: {n} idle TCP connections that never start TLS: RSS, enroll latency | {rss0:.1} MiB before, {rss_plain:.1} MiB while held (+{:.1} MiB, {:.1} KiB each); enroll {lat_plain:.1} ms (baseline {lat0:.1} ms) |",
        rss_plain - rss0,
        (rss_plain - rss0) * 1024.0 / n as f64
    );
    let rss0 = rss_mib(pid);

    let cfg = thingsly_enroll::client_config(&std::fs::read(bridge.ca_chain())?, None)
        .map_err(anyhow::Error::msg)?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let mut held = Vec::with_capacity(n);
    let t = Instant::now();
    for _ in 0..n {
        let tcp = TcpStream::connect(("127.0.0.1", bridge.port)).await?;
        held.push(tls.connect("127.0.0.1".try_into()?, tcp).await?);
    }
    let opened = t.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss1 = rss_mib(pid);
    let lat1 = enroll_latency(&bridge, "during", 20).await?;
    drop(held);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_mib(pid);
    println!(
        "| bridge: {n} idle TLS connections held (opened in {:.1} s): RSS | {rss0:.1} MiB before, {rss1:.1} MiB while held (+{:.1} MiB, {:.1} KiB each), {rss_after:.1} MiB after they closed |",
        opened.as_secs_f64(),
        rss1 - rss0,
        (rss1 - rss0) * 1024.0 / n as f64
    );
    println!(
        "| bridge: enrollment latency (median of 20, new TLS connection each) | {lat0:.1} ms before, {lat1:.1} ms with the {n} connections held |"
    );

    // 200 connections without a token, each stalling after (up to) 2 MiB of a body.
    let rss0 = rss_mib(pid);
    let mut stalled = Vec::new();
    let chunk = vec![b'a'; 64 * 1024];
    for _ in 0..200 {
        let tcp = TcpStream::connect(("127.0.0.1", bridge.port)).await?;
        let mut s = tls.connect("127.0.0.1".try_into()?, tcp).await?;
        s.write_all(format!("POST /devices/x/enroll HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", 2 << 20).as_bytes()).await?;
        let mut sent = 0;
        while sent < (2 << 20) - 1 {
            match tokio::time::timeout(Duration::from_millis(20), s.write_all(&chunk)).await {
                Ok(Ok(())) => sent += chunk.len(),
                _ => break,
            }
        }
        stalled.push(s);
    }
    let rss1 = rss_mib(pid);
    let lat1 = enroll_latency(&bridge, "stalled", 20).await?;
    drop(stalled);
    println!(
        "| bridge: 200 unauthenticated connections stalling in a 2 MiB body: RSS, enroll latency | {rss0:.1} MiB before, {rss1:.1} MiB during (+{:.1} MiB); enroll {lat1:.1} ms (baseline {lat0:.1} ms) |",
        rss1 - rss0
    );
    Ok(())
}
