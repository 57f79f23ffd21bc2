//! WireGuard end to end, in network namespaces this test creates: a server namespace (bridge
//! with its userspace hub, identity provider) and a device namespace (agent with its userspace
//! tunnel) joined by a veth pair (192.0.2.0/24). Tunnel addresses exist only inside them.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::{Duration, Instant};
use thingsly_e2e::ttyd::{hello, input, read_until};
use thingsly_e2e::*;

const KEEPALIVE: u16 = 5;

struct Site {
    /// Extra processes of the site (wireguard-go), stopped with it.
    _extra: Vec<Proc>,
    dir: tempfile::TempDir,
    net: VethPair,
    bridge: Bridge,
    agent: Agent,
    _idp: Idp,
    jwt: String,
    operator_port: u16,
}

/// Bridge (hub `mode`, endpoint 192.0.2.1) in the server namespace, agent with its tunnel in
/// the device namespace, enrolled over the veth; returns once the tunnel is up.
async fn site(tag: &str, wireguard_extra: &str) -> Site {
    site_with(tag, wireguard_extra, |_, _| Vec::new(), "", Vec::new()).await
}

/// `before_bridge` prepares the namespaces first (e.g. a wireguard-go interface for the hub).
async fn site_with(
    tag: &str,
    wireguard_extra: &str,
    before_bridge: impl FnOnce(&VethPair, &std::path::Path) -> Vec<Proc>,
    tunnel_extra: &str,
    agent_wrapper: Vec<String>,
) -> Site {
    let dir = tempfile::tempdir().unwrap();
    let net = VethPair::new(tag).unwrap();
    let extra_procs = before_bridge(&net, dir.path());
    let mut bridge = Bridge::init_at(
        &dir.path().join("bridge"),
        "192.0.2.1",
        &format!(
            "[wireguard]\nendpoint = \"192.0.2.1:51820\"\npersistent_keepalive = {KEEPALIVE}\n{wireguard_extra}"
        ),
    )
    .unwrap();
    bridge.netns = Some(net.server.name.clone());
    // The operators' identity provider and the terminal proxy's policy, on the server side.
    let listener = net
        .server
        .run(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let ops = Idp::for_bridge(
        &bridge,
        dir.path(),
        listener,
        "p, role:operator, *, terminal\n",
        7681,
    )
    .await
    .unwrap();
    bridge.start().unwrap();

    let mut agent = Agent::new(
        &dir.path().join("agent"),
        &AgentOpts {
            device_id: format!("dev-{tag}"),
            server_url: bridge.url(),
            token: bridge.fleet_token(),
            ca_bundle: bridge.ca_chain(),
            tunnel: Some(tunnel_extra.to_string()),
            ..Default::default()
        },
    )
    .unwrap();
    agent.netns = Some(net.device.name.clone());
    agent.wrapper = agent_wrapper;
    agent.start().unwrap();
    let s = Site {
        _extra: extra_procs,
        jwt: ops.signing.token("olga", &["operator"]),
        dir,
        net,
        bridge,
        agent,
        _idp: ops.idp,
        operator_port: ops.operator_port,
    };
    s.wait_tunnel_up(Duration::from_secs(30));
    s
}

impl Site {
    fn wait_tunnel_up(&self, timeout: Duration) {
        wait_for("tunnel up", timeout, || {
            self.agent.status()["state"]["tunnel_state"] == "up"
        });
    }

    /// `ping` across the tunnel from `ns`, true if every reply came.
    fn ping(&self, from: &Netns, to: &str, count: u32) -> bool {
        from.exec(&["ping", "-c", &count.to_string(), "-W", "1", "-i", "0.2", to])
            .is_ok()
    }

    /// A shell session through the bridge's terminal proxy, which reaches the device over
    /// the tunnel; returns the output of `line`.
    async fn shell(&self, line: &str, expect: &str) -> String {
        let port = self.operator_port;
        let tcp = self
            .net
            .server
            .run(|| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap());
        tcp.set_nonblocking(true).unwrap();
        let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
        let tls = Arc::new(
            thingsly_enroll::client_config(&std::fs::read(self.bridge.ca_chain()).unwrap(), None)
                .unwrap(),
        );
        let query = format!("deviceId={}&token={}", self.agent_id(), self.jwt);
        let mut ws = ttyd::open(tcp, tls, "127.0.0.1", port, &query, None)
            .await
            .unwrap_or_else(|e| panic!("{e:?}"));
        hello(&mut ws, "").await;
        input(&mut ws, line).await;
        let out = read_until(&mut ws, expect).await.unwrap();
        ws.close(None).await.unwrap();
        out
    }

    fn agent_id(&self) -> String {
        self.agent.status()["state"]["device_id"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_tunnel_to_the_userspace_hub_carries_ping_tcp_and_the_terminal() {
    let mut s = site("wg1", "mode = \"userspace\"\n").await;
    let st = s.agent.status();
    assert_eq!(st["state"]["tunnel_address"], "10.8.0.2/32", "{st:#}");
    assert_eq!(st["state"]["tunnel_endpoint"], "192.0.2.1:51820", "{st:#}");
    // The interfaces exist only in their namespaces, with the expected addresses and MTU.
    let dev_if = s
        .net
        .device
        .exec(&["ip", "-o", "addr", "show", "dev", "thingsly0"])
        .unwrap();
    assert!(dev_if.contains("10.8.0.2/24"), "{dev_if}");
    let mtu = s
        .net
        .device
        .exec(&["cat", "/sys/class/net/thingsly0/mtu"])
        .unwrap();
    assert_eq!(mtu.trim(), "1420");
    assert!(
        !std::path::Path::new("/sys/class/net/thingsly0").exists(),
        "the tunnel interface leaked into the test's own namespace"
    );

    // Both directions, and the don't-fragment limit of a 1420 MTU.
    assert!(
        s.ping(&s.net.device, "10.8.0.1", 3),
        "{:?}\nagent:\n{}\nbridge:\n{}",
        s.net
            .device
            .exec(&["ping", "-c", "1", "-W", "1", "10.8.0.1"]),
        s.agent.log_text(),
        s.bridge.log_text()
    );
    assert!(s.ping(&s.net.server, "10.8.0.2", 3));
    assert!(
        s.net
            .device
            .exec(&[
                "ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1392", "10.8.0.1"
            ])
            .is_ok()
    );
    assert!(
        s.net
            .device
            .exec(&[
                "ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1393", "10.8.0.1"
            ])
            .is_err()
    );

    // TCP across: the operator's shell goes browser side → proxy (server ns) → tunnel → PTY.
    let out = s.shell("echo via-tunnel-$((6*7))", "via-tunnel-42").await;
    assert!(out.contains("via-tunnel-42"));
    let log = s.bridge.log_text();
    assert!(log.contains("target=10.8.0.2:7681"), "{log}");

    // Tunnel state in `status` (and from there in telemetry attributes).
    wait_for("tunnel byte counters", Duration::from_secs(10), || {
        let st = s.agent.status();
        let c = &st["state"]["modules"]["tunnel"]["counters"];
        c["rx_bytes"].as_u64().unwrap_or(0) > 1000
            && c["tx_bytes"].as_u64().unwrap_or(0) > 1000
            && st["state"]["tunnel_rx_bytes"].as_u64().unwrap_or(0) > 1000
    });
    let handshake = s.agent.status()["state"]["tunnel_last_handshake"]
        .as_i64()
        .unwrap();
    let now = idp_unix_now();
    assert!(
        (now - 60..=now).contains(&handshake),
        "{handshake} vs {now}"
    );

    // Hub restart: it lost every session; the device notices the silence (the hub sends
    // keepalives) and handshakes again on its own.
    s.bridge.proc.as_mut().unwrap().kill();
    s.bridge.start().unwrap();
    let restarted = Instant::now();
    wait_for("ping after hub restart", Duration::from_secs(60), || {
        s.ping(&s.net.server, "10.8.0.2", 1)
    });
    eprintln!(
        "tunnel back {:?} after the hub restarted",
        restarted.elapsed()
    );

    // The device's own address changes (DHCP, roaming): the hub follows its new endpoint.
    s.net
        .device
        .ip(&["addr", "del", "192.0.2.2/24", "dev", "veth0"])
        .unwrap();
    s.net
        .device
        .ip(&["addr", "add", "192.0.2.3/24", "dev", "veth0"])
        .unwrap();
    let moved = Instant::now();
    wait_for(
        "ping after the device moved",
        Duration::from_secs(30),
        || s.ping(&s.net.server, "10.8.0.2", 1),
    );
    eprintln!(
        "tunnel followed the device's new address in {:?}",
        moved.elapsed()
    );

    // Revocation: the hub drops the peer; the tunnel goes silent.
    s.bridge.cli(&["revoke", "--device", "dev-wg1"]).unwrap();
    wait_for("peer removed after revoke", Duration::from_secs(15), || {
        !s.ping(&s.net.server, "10.8.0.2", 1)
    });
    assert!(s.bridge.log_text().contains("hub peer removed"));
    drop(s.dir);
}

/// wireguard-go (Debian's, an independent implementation) in `ns` as interface `name` with
/// `address`, in the foreground so the test owns the process.
fn wireguard_go(ns: &Netns, name: &str, address: &str, dir: &std::path::Path) -> Proc {
    // The name carries this test process's pid: a socket under it is a leftover of an earlier
    // run killed with the same pid, and wireguard-go refuses to start over it.
    let _ = std::fs::remove_file(format!("/var/run/wireguard/{name}.sock"));
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, "wireguard-go", "-f", name])
        .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1");
    let p = Proc::spawn(&mut cmd, dir.join(format!("{name}.log"))).unwrap();
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while ns.exec(&["ip", "link", "show", name]).is_err() {
        assert!(
            std::time::Instant::now() < end,
            "wireguard-go interface {name} not up after 10 s: {}",
            p.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    ns.ip(&["addr", "add", address, "dev", name]).unwrap();
    ns.ip(&["link", "set", name, "mtu", "1420", "up"]).unwrap();
    p
}

/// The hub is wireguard-go configured by the bridge through wg(8) (`mode = "wg"`, the same
/// path as a kernel interface); the device is the agent's boringtun tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_tunnel_against_a_wireguard_go_hub_configured_with_wg() {
    let iface = format!("wgh{}", std::process::id() % 100_000);
    let extra = format!("mode = \"wg\"\ninterface = \"{iface}\"\n");
    let i = iface.clone();
    let s = site_with(
        "wg2",
        &extra,
        move |net, dir| vec![wireguard_go(&net.server, &i, "10.8.0.1/24", dir)],
        "",
        Vec::new(),
    )
    .await;
    assert!(s.ping(&s.net.device, "10.8.0.1", 3));
    assert!(s.ping(&s.net.server, "10.8.0.2", 3));
    let peers = s
        .net
        .server
        .exec(&["wg", "show", &iface, "allowed-ips"])
        .unwrap();
    assert!(peers.contains("10.8.0.2/32"), "{peers}");
    let out = s.shell("echo go-hub-$((6*7))", "go-hub-42").await;
    assert!(out.contains("go-hub-42"));
    // Revocation goes through wg(8) too.
    s.bridge.cli(&["revoke", "--device", "dev-wg2"]).unwrap();
    wait_for("wg peer removed", Duration::from_secs(15), || {
        !s.net
            .server
            .exec(&["wg", "show", &iface, "allowed-ips"])
            .unwrap()
            .contains("10.8.0.2")
    });
}

/// A wireguard-go device (enrolled like an agent, configured with wg(8) from what enrollment
/// returned) against the bridge's userspace hub.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wireguard_go_device_against_the_userspace_hub() {
    let dir = tempfile::tempdir().unwrap();
    let net = VethPair::new("wg3").unwrap();
    let mut bridge = Bridge::init_at(
        &dir.path().join("bridge"),
        "192.0.2.1",
        &format!("[wireguard]\nmode = \"userspace\"\nendpoint = \"192.0.2.1:51820\"\npersistent_keepalive = {KEEPALIVE}\n"),
    )
    .unwrap();
    bridge.netns = Some(net.server.name.clone());
    bridge.start().unwrap();
    // Enroll from the device namespace, as a device would.
    let state = dir.path().join("go-device");
    let (url, ca, token) = (
        bridge.url(),
        std::fs::read(bridge.ca_chain()).unwrap(),
        bridge.fleet_token(),
    );
    let st = state.clone();
    net.device.run(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let dir = thingsly_core::state_dir::StateDir::open(&st).unwrap();
                let id = thingsly_enroll::Identity::load_or_create(&dir, "dev-go").unwrap();
                thingsly_enroll::ensure_enrolled(
                    &dir,
                    &id,
                    &thingsly_enroll::BridgeEndpoint::direct(&url, &ca, Duration::from_secs(10)),
                    &token,
                    Default::default(),
                )
                .await
                .unwrap();
            })
    });
    let wg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("tunnel/wireguard.json")).unwrap())
            .unwrap();
    let key_file = dir.path().join("go.key");
    std::fs::write(&key_file, wg["private_key"].as_str().unwrap()).unwrap();
    let iface = format!("wgd{}", std::process::id() % 100_000);
    let address = wg["address"].as_str().unwrap().replace("/32", "/24");
    let _go = wireguard_go(&net.device, &iface, &address, dir.path());
    net.device
        .exec(&[
            "wg",
            "set",
            &iface,
            "private-key",
            key_file.to_str().unwrap(),
            "peer",
            wg["peer_public_key"].as_str().unwrap(),
            "endpoint",
            wg["endpoint"].as_str().unwrap(),
            "allowed-ips",
            wg["allowed_ips"][0].as_str().unwrap(),
            "persistent-keepalive",
            &KEEPALIVE.to_string(),
        ])
        .unwrap();
    wait_for(
        "ping from the wireguard-go device",
        Duration::from_secs(20),
        || {
            net.device
                .exec(&["ping", "-c", "1", "-W", "1", "10.8.0.1"])
                .is_ok()
        },
    );
    assert!(
        net.server
            .exec(&["ping", "-c", "3", "-W", "1", "-i", "0.2", "10.8.0.2"])
            .is_ok()
    );
    let show = net
        .device
        .exec(&["wg", "show", &iface, "latest-handshakes"])
        .unwrap();
    assert!(!show.contains("\t0\n"), "no handshake: {show}");
}

/// 100 devices on one hub: each enrolled through the API with its own WireGuard key, each a
/// boringtun peer on its own UDP socket in the device namespace; every one handshakes and gets
/// an ICMP echo answered by the hub's kernel through its own /32.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hub_serves_100_device_peers() {
    use boringtun::noise::{Tunn, TunnResult};
    const N: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    let net = VethPair::new("wg4").unwrap();
    let mut bridge = Bridge::init_at(
        &dir.path().join("bridge"),
        "192.0.2.1",
        "[wireguard]\nmode = \"userspace\"\nendpoint = \"192.0.2.1:51820\"\n",
    )
    .unwrap();
    bridge.netns = Some(net.server.name.clone());
    bridge.start().unwrap();
    let (url, ca, token) = (
        bridge.url(),
        std::fs::read(bridge.ca_chain()).unwrap(),
        bridge.fleet_token(),
    );
    let base = dir.path().to_path_buf();
    let answered = net.device.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Enroll N devices (each gets a /32 and a hub peer).
        let devices: Vec<(x25519_dalek::StaticSecret, String, String)> = rt.block_on(async {
            let mut v = Vec::new();
            for i in 0..N {
                let st =
                    thingsly_core::state_dir::StateDir::open(base.join(format!("d{i}"))).unwrap();
                let id =
                    thingsly_enroll::Identity::load_or_create(&st, &format!("sim-{i}")).unwrap();
                thingsly_enroll::ensure_enrolled(
                    &st,
                    &id,
                    &thingsly_enroll::BridgeEndpoint::direct(&url, &ca, Duration::from_secs(10)),
                    &token,
                    Default::default(),
                )
                .await
                .unwrap();
                let wg: serde_json::Value = serde_json::from_slice(
                    &std::fs::read(base.join(format!("d{i}/tunnel/wireguard.json"))).unwrap(),
                )
                .unwrap();
                let key =
                    thingsly_tunnel::keys::parse("k", wg["private_key"].as_str().unwrap()).unwrap();
                v.push((
                    x25519_dalek::StaticSecret::from(key),
                    wg["peer_public_key"].as_str().unwrap().to_string(),
                    wg["address"]
                        .as_str()
                        .unwrap()
                        .trim_end_matches("/32")
                        .to_string(),
                ));
            }
            v
        });
        let hub: std::net::SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let mut buf = vec![0u8; 2048];
        let mut rx = vec![0u8; 2048];
        let mut answered = 0;
        for (i, (secret, hub_pub, addr)) in devices.into_iter().enumerate() {
            let hub_pub = thingsly_tunnel::keys::parse("hub", &hub_pub).unwrap();
            let mut t = Tunn::new(secret, hub_pub.into(), None, None, i as u32 + 1, None);
            let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let src: std::net::Ipv4Addr = addr.parse().unwrap();
            let ping = icmp_echo(src, "10.8.0.1".parse().unwrap(), i as u16);
            // Sending the ping starts the handshake; the ping is queued until it completes.
            if let TunnResult::WriteToNetwork(p) = t.encapsulate(&ping, &mut buf) {
                sock.send_to(p, hub).unwrap();
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            'peer: while Instant::now() < deadline {
                let Ok((n, _)) = sock.recv_from(&mut rx) else {
                    // Lost or rate-limited (cookie): the timers resend.
                    if let TunnResult::WriteToNetwork(p) =
                        t.format_handshake_initiation(&mut buf, true)
                    {
                        sock.send_to(p, hub).unwrap();
                    }
                    continue;
                };
                let mut res = t.decapsulate(Some(hub.ip()), &rx[..n], &mut buf);
                loop {
                    match res {
                        TunnResult::WriteToNetwork(p) => {
                            sock.send_to(p, hub).unwrap();
                            res = t.decapsulate(None, &[], &mut buf);
                        }
                        TunnResult::WriteToTunnelV4(p, from) => {
                            // ICMP echo reply (type 0) from the hub, for our id.
                            if from == std::net::Ipv4Addr::new(10, 8, 0, 1)
                                && p[20] == 0
                                && u16::from_be_bytes([p[24], p[25]]) == i as u16
                            {
                                answered += 1;
                                break 'peer;
                            }
                            break;
                        }
                        _ => break,
                    }
                }
            }
        }
        answered
    });
    assert_eq!(
        answered, N,
        "{answered} of {N} simulated devices got their echo"
    );
    let log = bridge.log_text();
    assert_eq!(log.matches("hub peer added").count(), N);
}

/// An IPv4 ICMP echo request.
fn icmp_echo(src: std::net::Ipv4Addr, dst: std::net::Ipv4Addr, id: u16) -> Vec<u8> {
    fn sum(b: &[u8]) -> u16 {
        let mut s: u32 = b
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
            .sum();
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&1u16.to_be_bytes());
    icmp.extend_from_slice(b"thingsly-hub-load");
    let c = sum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = sum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&icmp);
    ip
}

/// Without CAP_NET_ADMIN, or without /dev/net/tun, the tunnel module says exactly that (and
/// what to put in the unit) in `status`; the rest of the agent keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_capability_or_tun_device_is_a_clear_status() {
    let dir = tempfile::tempdir().unwrap();
    let net = VethPair::new("wg5").unwrap();
    let mut bridge = Bridge::init_at(&dir.path().join("bridge"), "192.0.2.1", "").unwrap();
    bridge.netns = Some(net.server.name.clone());
    bridge.start().unwrap();
    let cases = [
        (
            "dev-nocap",
            // Root, but CAP_NET_ADMIN gone from the bounding set: the agent's exec drops it.
            vec![
                "setpriv",
                "--bounding-set",
                "-net_admin",
                "--inh-caps",
                "-net_admin",
            ],
            "needs CAP_NET_ADMIN",
        ),
        (
            "dev-notun",
            // A private mount namespace where /dev/net is empty.
            vec![
                "unshare",
                "-m",
                "sh",
                "-c",
                "mount -t tmpfs tmpfs /dev/net && exec \"$0\" \"$@\"",
            ],
            "/dev/net/tun is not available",
        ),
    ];
    let mut agents = Vec::new();
    for (id, wrapper, _) in &cases {
        let mut a = Agent::new(
            &dir.path().join(id),
            &AgentOpts {
                device_id: id.to_string(),
                server_url: bridge.url(),
                token: bridge.fleet_token(),
                ca_bundle: bridge.ca_chain(),
                tunnel: Some(String::new()),
                ..Default::default()
            },
        )
        .unwrap();
        a.netns = Some(net.device.name.clone());
        a.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        a.start().unwrap();
        agents.push(a);
    }
    for (a, (_, _, why)) in agents.iter().zip(cases) {
        wait_for(why, Duration::from_secs(30), || {
            let m = &a.status()["state"]["modules"]["tunnel"];
            m["state"] == "waiting" && m["detail"].as_str().unwrap_or("").contains(why)
        });
        let st = a.status();
        assert_eq!(
            st["state"]["modules"]["enroll"]["state"], "running",
            "{st:#}"
        );
        assert!(a.log_text().contains(why));
    }
}

fn idp_unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Across the protocol's 120 s rekey under steady traffic: no lost echo, a new handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_survives_the_rekey_without_loss() {
    let s = site("wg6", "mode = \"userspace\"\n").await;
    let first = s.agent.status()["state"]["tunnel_last_handshake"].as_i64();
    let out = s
        .net
        .device
        .exec(&["ping", "-q", "-c", "140", "-i", "1", "-W", "2", "10.8.0.1"])
        .unwrap();
    assert!(out.contains(" 0% packet loss"), "{out}");
    wait_for(
        "a newer handshake in status",
        Duration::from_secs(10),
        || {
            let now = s.agent.status()["state"]["tunnel_last_handshake"].as_i64();
            now.is_some() && now > first.map(|f| f + 100)
        },
    );
}

/// The hub moves to another address and its name is updated (the agent dials it by name,
/// `tunnel.endpoint`); the agent notices the silence, resolves again and follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_follows_the_hub_name_to_a_new_address() {
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n192.0.2.1 hub.thingsly.test\n").unwrap();
    // The agent sees our hosts file (a bind mount in its own mount namespace).
    let wrapper = vec![
        "unshare".into(),
        "-m".into(),
        "sh".into(),
        "-c".into(),
        format!(
            "mount --bind {} /etc/hosts && exec \"$0\" \"$@\"",
            hosts.display()
        ),
    ];
    let s = site_with(
        "wg7",
        "mode = \"userspace\"\n",
        |_, _| Vec::new(),
        "endpoint = \"hub.thingsly.test:51820\"",
        wrapper,
    )
    .await;
    assert_eq!(
        s.agent.status()["state"]["tunnel_endpoint"],
        "192.0.2.1:51820"
    );
    // New address for the hub, DNS updated, the old address gone.
    s.net
        .server
        .ip(&["addr", "add", "198.51.100.1/24", "dev", "veth0"])
        .unwrap();
    s.net
        .device
        .ip(&["addr", "add", "198.51.100.2/24", "dev", "veth0"])
        .unwrap();
    std::fs::write(
        &hosts,
        "127.0.0.1 localhost\n198.51.100.1 hub.thingsly.test\n",
    )
    .unwrap();
    s.net
        .server
        .ip(&["addr", "del", "192.0.2.1/24", "dev", "veth0"])
        .unwrap();
    let moved = Instant::now();
    wait_for(
        "agent on the new hub address",
        Duration::from_secs(60),
        || {
            s.agent.status()["state"]["tunnel_endpoint"] == "198.51.100.1:51820"
                && s.ping(&s.net.device, "10.8.0.1", 1)
        },
    );
    eprintln!("followed the hub's name in {:?}", moved.elapsed());
    drop(dir);
}
