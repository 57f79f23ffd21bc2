//! WireGuard tunnel: TCP throughput (iperf3) and ping latency across the tunnel against the
//! bare veth in the same run; hub and agent CPU per 100 Mbit/s; the agent's RSS with the
//! tunnel up against an agent with the tunnel off. Release bridge and agent (beside this
//! binary) in two network namespaces joined by a veth pair.

use std::time::Duration;
use thingsly_e2e::*;

fn cpu_seconds(pid: i32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let f: Vec<&str> = s.rsplit(')').next()?.split_whitespace().collect();
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        })
        .unwrap_or(f64::NAN)
        / 100.0 // USER_HZ
}

fn rss_mib(pid: i32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(f64::NAN)
        / 1024.0
}

/// `ping` avg / max (ms) of `count` echoes at 10 ms intervals.
fn ping(ns: &Netns, to: &str, count: u32) -> anyhow::Result<(f64, f64)> {
    let out = ns.exec(&["ping", "-q", "-c", &count.to_string(), "-i", "0.01", to])?;
    let stats = out
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .and_then(|l| l.split('=').nth(1))
        .ok_or_else(|| anyhow::anyhow!("no ping summary: {out}"))?;
    let v: Vec<f64> = stats
        .trim()
        .trim_end_matches(" ms")
        .split('/')
        .filter_map(|x| x.parse().ok())
        .collect();
    Ok((v[1], v[2]))
}

/// iperf3 TCP from the device namespace to `to` for `secs`: Mbit/s received.
fn iperf(net: &VethPair, to: &str, secs: u64) -> anyhow::Result<f64> {
    let mut server = Proc::spawn(
        std::process::Command::new("ip").args([
            "netns",
            "exec",
            &net.server.name,
            "iperf3",
            "-s",
            "-1",
            "-p",
            "5201",
        ]),
        std::env::temp_dir().join(format!("iperf3-{}.log", std::process::id())),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let out = net.device.exec(&[
        "iperf3",
        "-c",
        to,
        "-p",
        "5201",
        "-t",
        &secs.to_string(),
        "-J",
    ])?;
    server.kill();
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e6)
}

pub async fn run(secs: u64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let net = VethPair::new("bench")?;
    let mut bridge = Bridge::init_at(
        &dir.path().join("bridge"),
        "192.0.2.1",
        "[wireguard]\nmode = \"userspace\"\nendpoint = \"192.0.2.1:51820\"\n",
    )?;
    bridge.netns = Some(net.server.name.clone());
    bridge.start()?;
    let agent = |name: &str, tunnel: bool| -> anyhow::Result<Agent> {
        let mut a = Agent::new(
            &dir.path().join(name),
            &AgentOpts {
                device_id: name.into(),
                server_url: bridge.url(),
                token: bridge.fleet_token(),
                ca_bundle: bridge.ca_chain(),
                tunnel: tunnel.then(String::new),
                interval: "10s".into(),
                extra: "[terminal]\nenabled = false\n".into(),
                ..Default::default()
            },
        )?;
        a.netns = Some(net.device.name.clone());
        a.start()?;
        Ok(a)
    };
    let with = agent("bench-tunnel", true)?;
    let without = agent("bench-no-tunnel", false)?;
    wait_for("tunnel up", Duration::from_secs(30), || {
        with.status()["state"]["tunnel_state"] == "up"
    });
    let agent_pid = with.proc.as_ref().map(|p| p.pid()).unwrap_or(0);
    let other_pid = without.proc.as_ref().map(|p| p.pid()).unwrap_or(0);
    let hub_pid = bridge.proc.as_ref().map(|p| p.pid()).unwrap_or(0);
    let idle_rss = (rss_mib(agent_pid), rss_mib(other_pid));

    let (bare_avg, bare_max) = ping(&net.device, "192.0.2.1", 200)?;
    let (tun_avg, tun_max) = ping(&net.device, "10.8.0.1", 200)?;
    let bare = iperf(&net, "192.0.2.1", secs)?;
    let (hub0, dev0) = (cpu_seconds(hub_pid), cpu_seconds(agent_pid));
    let tunnel = iperf(&net, "10.8.0.1", secs)?;
    let (hub_cpu, dev_cpu) = (cpu_seconds(hub_pid) - hub0, cpu_seconds(agent_pid) - dev0);
    let per_100 = |cpu: f64| cpu / secs as f64 * 100.0 / (tunnel / 100.0);
    println!(
        "| tunnel: ping avg / max, bare veth (baseline) | {bare_avg:.3} ms / {bare_max:.3} ms |"
    );
    println!(
        "| tunnel: ping avg / max, through the tunnel (agent → userspace hub) | {tun_avg:.3} ms / {tun_max:.3} ms |"
    );
    println!("| tunnel: TCP (iperf3, {secs} s), bare veth (baseline) | {bare:.0} Mbit/s |");
    println!(
        "| tunnel: TCP (iperf3, {secs} s), device → hub through the tunnel | {tunnel:.0} Mbit/s |"
    );
    println!(
        "| tunnel: hub (bridge) CPU per 100 Mbit/s | {:.1} % of a core |",
        per_100(hub_cpu)
    );
    println!(
        "| tunnel: device (agent) CPU per 100 Mbit/s | {:.1} % of a core |",
        per_100(dev_cpu)
    );
    println!(
        "| tunnel: agent RSS, tunnel up (idle / after the TCP run) vs tunnel off | {:.1} / {:.1} MiB vs {:.1} MiB |",
        idle_rss.0,
        rss_mib(agent_pid),
        idle_rss.1
    );
    Ok(())
}
