//! OTA: the agent's download + sha256 verify throughput against curl fetching the same artifact
//! from the same bridge in the same run (to /dev/null, and to a file plus `sha256sum`); the
//! agent's peak RSS after a 64 MiB and after a large download (it must not grow with the
//! bundle); the bridge's DDI root polls per second (full answer and 304).
//! Download-only actions: RAUC runs (the OTA module needs it) but installs nothing.

use std::process::Command;
use std::time::{Duration, Instant};
use thingsly_e2e::rauc::RaucSandbox;
use thingsly_e2e::{Agent, AgentOpts, Bridge, wait_for};

const GATEWAY_TOKEN: &str = "bench-gateway-token";

fn rfc3339(s: &str) -> anyhow::Result<time::OffsetDateTime> {
    Ok(time::OffsetDateTime::parse(
        s,
        &time::format_description::well_known::Rfc3339,
    )?)
}

fn vm_hwm_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Seconds `curl` takes for `url`, to /dev/null or to `out` (then `sha256sum` of it, timed too).
fn curl(url: &str, ca: &std::path::Path, out: Option<&std::path::Path>) -> anyhow::Result<f64> {
    let start = Instant::now();
    let st = Command::new("curl")
        .args(["-sS", "--fail", "--cacert"])
        .arg(ca)
        .args([
            "-H",
            &format!("Authorization: GatewayToken {GATEWAY_TOKEN}"),
            "-o",
        ])
        .arg(out.map_or(std::path::Path::new("/dev/null"), |p| p))
        .arg(url)
        .status()?;
    anyhow::ensure!(st.success(), "curl {url}: {st}");
    if let Some(p) = out {
        let st = Command::new("sha256sum").arg(p).output()?;
        anyhow::ensure!(st.status.success(), "sha256sum");
        std::fs::remove_file(p)?;
    }
    Ok(start.elapsed().as_secs_f64())
}

pub fn run(large_mib: u64) -> anyhow::Result<()> {
    let t = tempfile::tempdir()?;
    let dir = t.path();
    let rauc = RaucSandbox::start(&dir.join("rauc"))?;
    let token_file = dir.join("gateway.token");
    std::fs::write(&token_file, format!("{GATEWAY_TOKEN}\n"))?;
    let mut bridge = Bridge::init_with(
        &dir.join("bridge"),
        &format!(
            "[ddi]\npolling_sleep = \"1s\"\ngateway_token_file = \"{}\"\n",
            token_file.display()
        ),
    )?;
    bridge.start()?;
    let mut agent = Agent::new(
        &dir.join("agent"),
        &AgentOpts {
            device_id: "bench-dev".into(),
            server_url: bridge.url(),
            token: bridge.fleet_token(),
            ca_bundle: bridge.ca_chain(),
            telemetry_extra: "enabled = false".into(),
            rauc_enabled: true,
            extra: "[ota]\npoll_interval = \"1s\"\nhealth_mqtt = false\n".into(),
            ..Default::default()
        },
    )?;
    agent.env = vec![("DBUS_SYSTEM_BUS_ADDRESS".into(), rauc.bus.clone())];
    agent.start()?;
    wait_for("agent enrolled", Duration::from_secs(30), || {
        bridge
            .cli(&["devices"])
            .map(|d| d.contains("bench-dev"))
            .unwrap_or(false)
    });
    let pid = agent.proc.as_ref().map(|p| p.pid()).unwrap_or(0);

    println!(
        "| OTA download of N MiB (same bridge, same run) | agent: download + sha256 + fsync | curl → /dev/null | curl → file + sha256sum | agent peak RSS (VmHWM) after |"
    );
    println!("| --- | --- | --- | --- | --- |");
    for mib in [64, large_mib] {
        let (secs, module, filename) = download_only(&bridge, dir, "bench-dev", mib)?;
        let url = format!(
            "{}/DEFAULT/controller/v1/bench-dev/softwaremodules/{module}/artifacts/{filename}",
            bridge.url()
        );
        let ca = bridge.ca_chain();
        let null = curl(&url, &ca, None)?;
        let file = curl(&url, &ca, Some(&dir.join("curl.out")))?;
        let mbps = |s: f64| mib as f64 / s;
        println!(
            "| {mib} MiB | {:.0} MiB/s ({secs:.2} s) | {:.0} MiB/s | {:.0} MiB/s | {:.1} MiB |",
            mbps(secs),
            mbps(null),
            mbps(file),
            vm_hwm_kib(pid) as f64 / 1024.0
        );
    }

    // The download rate cap: one agent per cap (ota.download_rate_limit), about 10 s each.
    println!();
    println!("| download with `ota.download_rate_limit` | cap | measured | off by |");
    println!("| --- | --- | --- | --- |");
    let mut capped = Vec::new();
    for (i, cap_kib) in [256u64, 1024, 4096].into_iter().enumerate() {
        let id = format!("bench-cap-{i}");
        let mut a = Agent::new(
            &dir.join(&id),
            &AgentOpts {
                device_id: id.clone(),
                server_url: bridge.url(),
                token: bridge.fleet_token(),
                ca_bundle: bridge.ca_chain(),
                telemetry_extra: "enabled = false".into(),
                rauc_enabled: true,
                extra: format!(
                    "[ota]\npoll_interval = \"1s\"\nhealth_mqtt = false\ndownload_rate_limit = {}\n",
                    cap_kib * 1024
                ),
                ..Default::default()
            },
        )?;
        a.env = vec![("DBUS_SYSTEM_BUS_ADDRESS".into(), rauc.bus.clone())];
        a.start()?;
        wait_for("capped agent enrolled", Duration::from_secs(30), || {
            bridge
                .cli(&["devices"])
                .map(|d| d.contains(&id))
                .unwrap_or(false)
        });
        // Ten seconds at the cap.
        let mib = (cap_kib * 10).div_ceil(1024);
        let (secs, _, _) = download_only(&bridge, dir, &id, mib)?;
        let rate = (mib * 1024) as f64 / secs;
        println!(
            "| {mib} MiB | {cap_kib} KiB/s | {rate:.0} KiB/s ({secs:.2} s) | {:+.1} % |",
            (rate / cap_kib as f64 - 1.0) * 100.0
        );
        capped.push(a);
    }
    drop(capped);

    // The bridge's DDI root: many devices polling at once.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let http = bridge.http()?;
    let root = format!("{}/DEFAULT/controller/v1/bench-dev", bridge.url());
    let etag = rt.block_on(async {
        http.get(&root)
            .header("Authorization", format!("GatewayToken {GATEWAY_TOKEN}"))
            .send()
            .await
            .ok()
            .and_then(|r| r.headers().get("etag")?.to_str().ok().map(String::from))
            .unwrap_or_default()
    });
    println!();
    println!("| bridge DDI root poll (32 concurrent, keep-alive, 5 s) | polls/s |");
    println!("| --- | --- |");
    for (label, inm) in [
        ("full answer (200)", None),
        ("If-None-Match (304)", Some(etag)),
    ] {
        let n = rt.block_on(async {
            let end = Instant::now() + Duration::from_secs(5);
            let mut tasks = Vec::new();
            for _ in 0..32 {
                let (http, root, inm) = (http.clone(), root.clone(), inm.clone());
                tasks.push(tokio::spawn(async move {
                    let mut n = 0u64;
                    while Instant::now() < end {
                        let mut r = http
                            .get(&root)
                            .header("Authorization", format!("GatewayToken {GATEWAY_TOKEN}"));
                        if let Some(t) = &inm {
                            r = r.header("If-None-Match", t);
                        }
                        if r.send().await.is_ok() {
                            n += 1;
                        }
                    }
                    n
                }));
            }
            let mut total = 0;
            for t in tasks {
                total += t.await.unwrap_or(0);
            }
            total
        });
        println!("| {label} | {:.0} |", n as f64 / 5.0);
    }
    Ok(())
}

/// Uploads `mib` MiB of random data, assigns it download-only to `device`, waits until the
/// action is closed; returns the seconds from "accepted" to "hash verified" (the agent's own
/// feedback, timed by the bridge), the module id and the artifact's file name.
fn download_only(
    bridge: &Bridge,
    dir: &std::path::Path,
    device: &str,
    mib: u64,
) -> anyhow::Result<(f64, i64, String)> {
    let blob = dir.join(format!("blob-{device}-{mib}.bin"));
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c {}M /dev/urandom > {}",
            mib,
            blob.display()
        ))
        .status()?;
    anyhow::ensure!(st.success(), "making the test file");
    let m: serde_json::Value = serde_json::from_str(&bridge.cli(&[
        "ota",
        "upload",
        blob.to_str().unwrap_or_default(),
        "--name",
        &format!("blob-{device}"),
        "--version",
        &mib.to_string(),
    ])?)?;
    std::fs::remove_file(&blob)?;
    let module = m["id"].as_i64().unwrap_or_default();
    let filename = m["filename"].as_str().unwrap_or_default().to_string();
    let a: serde_json::Value = serde_json::from_str(&bridge.cli(&[
        "ota",
        "assign",
        "--module",
        &module.to_string(),
        "--device",
        device,
        "--type",
        "downloadonly",
    ])?)?;
    let action = a[0]["id"].as_i64().unwrap_or_default().to_string();
    let show = || -> serde_json::Value {
        bridge
            .cli(&["ota", "show", &action])
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default()
    };
    wait_for(
        "download-only action closed",
        Duration::from_secs(900),
        || show()["action"]["status"] == "closed",
    );
    let fb = show()["feedback"].as_array().cloned().unwrap_or_default();
    let at = |needle: &str| -> anyhow::Result<time::OffsetDateTime> {
        let f = fb
            .iter()
            .find(|f| f["body"]["status"]["details"].to_string().contains(needle))
            .ok_or_else(|| anyhow::anyhow!("no feedback {needle}"))?;
        rfc3339(f["at"].as_str().unwrap_or_default())
    };
    let secs = (at("hash verified")? - at("accepted")?).as_seconds_f64();
    Ok((secs, module, filename))
}
