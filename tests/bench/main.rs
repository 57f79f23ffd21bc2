//! Benchmarks that print markdown table rows.
//!
//! `thingsly-bench enroll URL CA FLEET_TOKEN ADMIN_TOKEN N CONCURRENCY`: enrollments per second
//! against a running bridge, next to authenticated GETs (new TLS connection each, like a device)
//! as the baseline of the same TLS + HTTP path.
//!
//! `thingsly-bench metrics N`: CPU time and heap allocations of one metrics collect+encode cycle
//! against the floor of only reading the same /proc and /sys files; bytes per hour on the wire
//! at a 10 s interval with and without gzip.
//!
//! `thingsly-bench terminal MB`: output throughput and keystroke echo latency of a terminal
//! session, direct to the device's PTY bridge and through the bridge's terminal proxy (a real
//! bridge process beside this binary), against a plain PTY copied to a local socket.
//!
//! `thingsly-bench tunnel SECONDS` (root): iperf3 TCP and ping across the WireGuard tunnel vs
//! the bare veth, hub and agent CPU per 100 Mbit/s, agent RSS with the tunnel up vs off.
//!
//! `thingsly-bench connections N`: bridge RSS with N idle TLS connections held and a
//! legitimate enrollment's latency meanwhile, against the same bridge before; then 200
//! unauthenticated connections stalled in a 2 MiB body.
//!
//! `thingsly-bench ota MIB` (root: RAUC sandbox): the agent's download + verify throughput vs
//! curl from the same bridge, its peak RSS after 64 MiB and after MIB, bridge DDI polls/s.

mod connections;
mod metrics;
mod ota;
mod terminal;
mod tunnel;

use std::sync::Arc;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    if a.get(1).map(String::as_str) == Some("metrics") {
        return metrics::run(a.get(2).and_then(|n| n.parse().ok()).unwrap_or(2000));
    }
    if a.get(1).map(String::as_str) == Some("ota") {
        return ota::run(a.get(2).and_then(|n| n.parse().ok()).unwrap_or(1024));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let n = |default| a.get(2).and_then(|n| n.parse().ok()).unwrap_or(default);
    match a.get(1).map(String::as_str) {
        Some("tunnel") => rt.block_on(tunnel::run(n(10) as u64)),
        Some("terminal") => rt.block_on(terminal::run(n(64))),
        Some("connections") => rt.block_on(connections::run(n(10_000))),
        _ => rt.block_on(enroll(a)),
    }
}

async fn enroll(a: Vec<String>) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.len() == 8 && a[1] == "enroll",
        "usage: thingsly-bench enroll URL CA FLEET ADMIN N CONCURRENCY"
    );
    let (url, ca, fleet, admin) = (
        a[2].clone(),
        std::fs::read(&a[3])?,
        a[4].clone(),
        a[5].clone(),
    );
    let n: usize = a[6].parse()?;
    let conc: usize = a[7].parse()?;
    let tmp = tempfile::tempdir()?;
    let ca = Arc::new(ca);

    // Baseline: GET /devices/{id} with the admin token, one fresh client (TLS handshake) per request.
    let start = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(conc));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (url, ca, admin, sem) = (url.clone(), ca.clone(), admin.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await?;
            let tls = thingsly_enroll::client_config(&ca, None).map_err(anyhow::Error::msg)?;
            let http = reqwest::Client::builder()
                .use_preconfigured_tls(tls)
                .build()?;
            let st = http
                .get(format!("{url}/devices/none"))
                .bearer_auth(admin)
                .send()
                .await?
                .status();
            anyhow::ensure!(st == 404, "unexpected {st}");
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let base = n as f64 / start.elapsed().as_secs_f64();

    // Enrollments: each a new device with its own key and CSR (key generation included).
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let (url, ca, fleet, sem) = (url.clone(), ca.clone(), fleet.clone(), sem.clone());
        let dir = tmp.path().join(format!("d{i}"));
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await?;
            let state = thingsly_core::state_dir::StateDir::open(&dir)?;
            let id = format!("bench-{}-{i}", std::process::id());
            let identity = thingsly_enroll::Identity::load_or_create(&state, &id)?;
            thingsly_enroll::ensure_enrolled(
                &state,
                &identity,
                &thingsly_enroll::BridgeEndpoint::direct(
                    &url,
                    &ca,
                    std::time::Duration::from_secs(30),
                ),
                &fleet,
                Default::default(),
            )
            .await?;
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let enr = n as f64 / start.elapsed().as_secs_f64();
    println!("| bridge: authenticated GET, new TLS connection each (baseline) | {base:.0} /s |");
    println!("| bridge: enrollments (key + CSR + sign + SQLite + store) | {enr:.0} /s |");
    Ok(())
}
