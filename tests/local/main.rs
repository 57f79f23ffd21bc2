//! `thingsly-local`: the whole seed loop on this machine, on embedded defaults, told as a story
//! (`scripts/run-local.sh` builds and runs it; needs root for the network namespaces).
//!
//! Two network namespaces joined by a veth pair (nothing leaves the machine): the "cloud" one
//! holds the bridge (enrollment CA, userspace WireGuard hub, DDI server, terminal proxy), an
//! operators' identity provider (HTTPS JWKS), Mosquitto with mTLS and InfluxDB; the "device"
//! one holds the agent with its tunnel, on a real `rauc service` sandbox (private D-Bus). The
//! story: enrolled, tunnel up, telemetry, metrics, update 1.0.0 -> 2.0.0 into slot B with a
//! simulated reboot, a terminal session through the proxy, `thingsly-agent status`. Then it
//! keeps running (the terminal proxy forwarded to 127.0.0.1) until `--duration` or Ctrl-C,
//! and removes what it made: processes (by their handles), namespaces, the RAUC sandbox.

#![allow(clippy::unwrap_used)] // a demo driver: a failed step ends it with the panic's message

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use thingsly_e2e::rauc::RaucSandbox;
use thingsly_e2e::ttyd::{hello, input, read_until};
use thingsly_e2e::*;

const DEVICE: &str = "device-0001";
const CLOUD: &str = "192.0.2.1";
const HUB_TUNNEL_IP: &str = "10.8.0.1";

struct Args {
    dir: PathBuf,
    duration: Option<Duration>,
    /// Host port the terminal proxy is forwarded to (127.0.0.1).
    operator_port: u16,
}

fn args() -> Args {
    let mut a = Args {
        dir: PathBuf::from(".local-run"),
        duration: None,
        operator_port: 8444,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it
            .next()
            .unwrap_or_else(|| usage(&format!("{k} needs a value")));
        match k.as_str() {
            "--dir" => a.dir = PathBuf::from(v),
            "--duration" => {
                let s: u64 = v.parse().unwrap_or_else(|_| usage("--duration: seconds"));
                a.duration = (s > 0).then(|| Duration::from_secs(s));
            }
            "--operator-port" => {
                a.operator_port = v
                    .parse()
                    .unwrap_or_else(|_| usage("--operator-port: a port"))
            }
            _ => usage(&format!("unknown argument {k}")),
        }
    }
    a
}

fn usage(why: &str) -> ! {
    eprintln!(
        "thingsly-local: {why}\nusage: thingsly-local [--dir DIR] [--duration SECONDS] [--operator-port PORT]"
    );
    std::process::exit(2)
}

/// One line of the story, with the time since the start.
struct Story(Instant);

impl Story {
    fn say(&self, step: &str, text: &str) {
        println!(
            "[{:>5.1}s] {step:<10} {text}",
            self.0.elapsed().as_secs_f64()
        );
        let _ = std::io::stdout().flush();
    }
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// A process inside `ns` (`ip netns exec`), stopped when dropped.
fn spawn_in(ns: &Netns, argv: &[&str], log: PathBuf) -> Proc {
    let mut c = std::process::Command::new("ip");
    c.args(["netns", "exec", &ns.name]).args(argv);
    Proc::spawn(&mut c, log).unwrap()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = args();
    let story = Story(Instant::now());
    // --duration counts from the start; the story is always told to its end.
    let deadline = a.duration.map(|d| tokio::time::Instant::now() + d);
    let base = std::path::absolute(&a.dir).unwrap();
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    // mosquitto drops root to its own user and must read its files.
    std::fs::set_permissions(&base, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let net = VethPair::new("loc").unwrap();
    let rauc = RaucSandbox::start(&base.join("rauc")).unwrap();

    // ---- the cloud namespace: bridge, identity provider, broker, InfluxDB
    let mut bridge = Bridge::init_at(
        &base.join("bridge"),
        CLOUD,
        &format!(
            "[wireguard]\nmode = \"userspace\"\nendpoint = \"{CLOUD}:51820\"\npersistent_keepalive = 5\n[ddi]\npolling_sleep = \"2s\"\n"
        ),
    )
    .unwrap();
    bridge.netns = Some(net.server.name.clone());
    let idp_listener = net
        .server
        .run(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let ops = Idp::for_bridge(
        &bridge,
        &base,
        idp_listener,
        "p, role:operator, *, terminal\n",
        7681,
    )
    .await
    .unwrap();
    bridge.start().unwrap();

    let mqtt = base.join("mqtt");
    std::fs::create_dir_all(&mqtt).unwrap();
    let p = |f: &str| mqtt.join(f).to_string_lossy().into_owned();
    bridge
        .cli(&[
            "issue-server-cert",
            "--name",
            CLOUD,
            "--out-cert",
            &p("server.crt"),
            "--out-key",
            &p("server.key"),
        ])
        .unwrap();
    bridge
        .cli(&[
            "issue-client-cert",
            "--cn",
            "observer",
            "--out-cert",
            &p("observer.crt"),
            "--out-key",
            &p("observer.key"),
        ])
        .unwrap();
    std::fs::copy(bridge.ca_chain(), mqtt.join("ca.pem")).unwrap();
    // Mosquitto (its own user) cannot read the bridge's data directory: a copy of the CRL as
    // of now. On a server, point crlfile at <data_dir>/crl.pem and restart on change (README).
    std::fs::copy(bridge.data().join("crl.pem"), mqtt.join("crl.pem")).unwrap();
    for f in std::fs::read_dir(&mqtt).unwrap() {
        let f = f.unwrap().path();
        std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    }
    std::fs::set_permissions(&mqtt, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    write(
        &mqtt.join("mosquitto.conf"),
        &format!(
            "per_listener_settings false\npersistence false\nallow_anonymous false\nlog_dest stdout\n\
             connection_messages true\nlistener 8883 {CLOUD}\ncafile {ca}\ncertfile {crt}\nkeyfile {key}\n\
             require_certificate true\nuse_identity_as_username true\ncrlfile {crl}\n",
            ca = p("ca.pem"),
            crt = p("server.crt"),
            key = p("server.key"),
            crl = p("crl.pem"),
        ),
    );
    let _mosquitto = spawn_in(
        &net.server,
        &["mosquitto", "-c", &p("mosquitto.conf")],
        base.join("mosquitto.log"),
    );
    let influx = base.join("influxdb");
    write(
        &influx.join("influxdb.conf"),
        &format!(
            "reporting-disabled = true\nreporting-enabled = false\nbind-address = \"127.0.0.1:8088\"\n\
             [meta]\n  dir = \"{d}/meta\"\n[data]\n  dir = \"{d}/data\"\n  wal-dir = \"{d}/wal\"\n  query-log-enabled = false\n\
             [monitor]\n  store-enabled = false\n[http]\n  bind-address = \"{CLOUD}:8086\"\n  log-enabled = false\n[ifql]\n  enabled = false\n",
            d = influx.display()
        ),
    );
    let _influxd = spawn_in(
        &net.server,
        &[
            "influxd",
            "run",
            "-config",
            &influx.join("influxdb.conf").to_string_lossy(),
        ],
        base.join("influxdb.log"),
    );

    // ---- the device namespace: the agent on the RAUC sandbox, its tunnel to the hub
    let boot_id = base.join("boot_id");
    write(&boot_id, "boot-0\n");
    let reboot_flag = base.join("reboot-requested");
    let mut agent = Agent::new(
        &base.join("agent"),
        &AgentOpts {
            device_id: DEVICE.into(),
            server_url: bridge.url(),
            token: bridge.fleet_token(),
            ca_bundle: bridge.ca_chain(),
            mqtt_host: CLOUD.into(),
            mqtt_port: 8883,
            rauc_enabled: true,
            tunnel: Some(String::new()),
            interval: "5s".into(),
            reboot: format!("[\"sh\", \"-c\", \"touch {}\"]", reboot_flag.display()),
            extra: format!(
                "[metrics.influxdb]\nurl = \"http://{CLOUD}:8086\"\n\n[ota]\npoll_interval = \"2s\"\nhealth_deadline = \"10s\"\nboot_id_path = \"{}\"\n",
                boot_id.display()
            ),
            ..Default::default()
        },
    )
    .unwrap();
    agent.netns = Some(net.device.name.clone());
    agent.env = vec![("DBUS_SYSTEM_BUS_ADDRESS".into(), rauc.bus.clone())];
    agent.start().unwrap();

    story.say(
        "start",
        &format!(
            "cloud namespace {} ({CLOUD}): bridge, identity provider, Mosquitto, InfluxDB; device namespace {}: agent on a rauc service sandbox",
            net.server.name, net.device.name
        ),
    );
    let run = async {
        tell_the_story(
            &story,
            &net,
            &bridge,
            &mut agent,
            &rauc,
            &ops,
            &reboot_flag,
            &boot_id,
            &mqtt,
        )
        .await;
        // The proxy forwarded to the host for a browser or ttyd client.
        let fwd = forward(a.operator_port, &net.server, ops.operator_port);
        let jwt = ops.signing.token_with(serde_json::json!({
            "preferred_username": "olga", "realm_access": {"roles": ["operator"]},
            "exp": idp_now() + 3600,
        }));
        std::fs::write(base.join("operator.jwt"), &jwt).unwrap();
        println!(
            "\nNext:\n  terminal page (the bridge serves it; the browser must trust the bridge's CA {ca}, or accept its warning):\n    https://127.0.0.1:{port}/terminal/#deviceId={DEVICE}&token={jwt}\n  ttyd clients: wss://127.0.0.1:{port}/terminal?deviceId={DEVICE}&token=$(cat {}/operator.jwt)\n  devices:   target/release/thingsly-bridge --config {} devices\n  OTA:       target/release/thingsly-bridge --config {} ota list\n  agent:     ip netns exec {} target/release/thingsly-agent --config {} status\n  logs:      {}/*.log, {}/bridge/bridge-*.log, {}/agent/agent-*.log",
            base.display(),
            bridge.config.display(),
            bridge.config.display(),
            net.device.name,
            agent.config.display(),
            base.display(),
            base.display(),
            base.display(),
            port = a.operator_port,
            ca = bridge.ca_chain().display(),
        );
        fwd
    };
    let stop = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        fwd = run => {
            match a.duration {
                Some(_) => println!("running until the duration is over (Ctrl-C stops now)"),
                None => println!("running until Ctrl-C"),
            }
            tokio::select! {
                _ = stop => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            drop(fwd);
        }
        _ = tokio::signal::ctrl_c() => println!("\ninterrupted"),
    }
    println!(
        "stopping: agent, bridge, broker, InfluxDB, identity provider, RAUC sandbox, namespaces"
    );
    // Drops (in reverse order of creation) stop every process and remove the namespaces.
}

fn idp_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// [`wait_for`], but yielding between checks, so that Ctrl-C can end the story at any wait.
async fn wait(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < end,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `ip netns exec NS argv…` on a blocking thread: its stdout, or the error with stderr.
async fn exec_in(ns: &Netns, argv: &[&str]) -> anyhow::Result<String> {
    let ns = ns.name.clone();
    let argv: Vec<String> = argv.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &ns])
            .args(&argv)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "{argv:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .await?
}

#[allow(clippy::too_many_arguments)]
async fn tell_the_story(
    story: &Story,
    net: &VethPair,
    bridge: &Bridge,
    agent: &mut Agent,
    rauc: &RaucSandbox,
    ops: &Operators,
    reboot_flag: &Path,
    boot_id: &Path,
    mqtt: &Path,
) {
    // 1. Enrollment
    wait("the agent enrolled", Duration::from_secs(60), || {
        bridge
            .cli(&["devices"])
            .unwrap_or_default()
            .contains(DEVICE)
    })
    .await;
    let devices: serde_json::Value =
        serde_json::from_str(&bridge.cli(&["devices"]).unwrap()).unwrap();
    let dev = devices
        .as_array()
        .and_then(|d| d.iter().find(|d| d["device_id"] == DEVICE))
        .cloned()
        .unwrap_or_default();
    story.say(
        "enrolled",
        &format!(
            "{DEVICE}: P-256 key made on the device, CSR signed by the bridge's issuing CA; tunnel address {}",
            dev["wireguard_address"].as_str().unwrap_or("?")
        ),
    );

    // 2. Tunnel
    wait("the tunnel up", Duration::from_secs(60), || {
        agent.status()["state"]["tunnel_state"] == "up"
    })
    .await;
    let ping = exec_in(
        &net.device,
        &["ping", "-c", "3", "-i", "0.2", "-W", "2", HUB_TUNNEL_IP],
    )
    .await
    .map(|o| o.lines().rev().nth(1).unwrap_or("").to_string())
    .unwrap_or_else(|e| format!("ping failed: {e}"));
    story.say(
        "tunnel",
        &format!("up (userspace WireGuard, device namespace -> hub {HUB_TUNNEL_IP}); ping: {ping}"),
    );

    // 3. Telemetry, as a ThingsBoard server receives it
    let p = |f: &str| mqtt.join(f).to_string_lossy().into_owned();
    let msg = exec_in(
        &net.server,
        &[
            "mosquitto_sub",
            "-h",
            CLOUD,
            "-p",
            "8883",
            "--cafile",
            &p("ca.pem"),
            "--cert",
            &p("observer.crt"),
            "--key",
            &p("observer.key"),
            "-t",
            "v1/devices/me/telemetry",
            "-C",
            "1",
            "-W",
            "60",
        ],
    )
    .await
    .unwrap_or_else(|e| format!("none: {e}"));
    let msg: String = msg.trim().chars().take(160).collect();
    story.say(
        "telemetry",
        &format!("MQTT over mTLS, v1/devices/me/telemetry: {msg}…"),
    );

    // 4. Metrics, in Telegraf's schema
    let count = |m: &str| -> u64 {
        let q = format!("q=SELECT count(*) FROM {m}");
        net.server
            .exec(&[
                "curl",
                "-sS",
                "-G",
                &format!("http://{CLOUD}:8086/query"),
                "--data-urlencode",
                "db=telegraf",
                "--data-urlencode",
                &q,
            ])
            .ok()
            .and_then(|o| serde_json::from_str::<serde_json::Value>(&o).ok())
            .and_then(|v| v["results"][0]["series"][0]["values"][0][1].as_u64())
            .unwrap_or(0)
    };
    wait("metrics in InfluxDB", Duration::from_secs(60), || {
        count("cpu") > 0
    })
    .await;
    let counts: Vec<String> = ["cpu", "mem", "disk", "net", "system", "agent"]
        .iter()
        .map(|m| format!("{m} {}", count(m)))
        .collect();
    story.say(
        "metrics",
        &format!(
            "InfluxDB db telegraf (points of the first field): {}",
            counts.join(", ")
        ),
    );

    // 5. OTA: a signed RAUC bundle, uploaded and assigned, installed into the other slot
    let bundle = rauc
        .bundle("update-2.0.0.raucb", "2.0.0", &["--size-mib", "4"])
        .unwrap();
    let module = bridge.ota_upload(&bundle, "rootfs", "2.0.0").unwrap()["id"]
        .as_i64()
        .unwrap();
    let action = bridge.ota_assign(module, &["--device", DEVICE]).unwrap()[0]["id"]
        .as_i64()
        .unwrap();
    story.say(
        "update",
        &format!("bundle 2.0.0 uploaded (module {module}), assigned to {DEVICE} (action {action}); the agent polls the DDI server"),
    );
    wait(
        "the install and the reboot request",
        Duration::from_secs(120),
        || reboot_flag.exists(),
    )
    .await;
    story.say(
        "update",
        "downloaded, verified, installed into slot B by rauc; the agent asks for a reboot",
    );
    agent.proc.as_mut().unwrap().kill();
    std::fs::remove_file(reboot_flag).unwrap();
    rauc.reboot().unwrap();
    std::fs::write(boot_id, "boot-1\n").unwrap();
    agent.start().unwrap();
    let show = |id: i64| -> serde_json::Value {
        serde_json::from_str(&bridge.cli(&["ota", "show", &id.to_string()]).unwrap()).unwrap()
    };
    wait("the update reported", Duration::from_secs(120), || {
        show(action)["action"]["status"] != "running"
    })
    .await;
    let st = agent.status();
    story.say(
        "update",
        &format!(
            "rebooted into slot {}, health checks passed, slot marked good; action {action}: {}; 1.0.0 -> {}",
            st["state"]["rauc_slot"].as_str().unwrap_or("?"),
            show(action)["action"]["status"].as_str().unwrap_or("?"),
            st["state"]["sw_version"].as_str().unwrap_or("?"),
        ),
    );

    // 6. Terminal: through the bridge's proxy, over the tunnel, with an operator's token
    wait(
        "the tunnel back after the reboot",
        Duration::from_secs(60),
        || agent.status()["state"]["tunnel_state"] == "up",
    )
    .await;
    let jwt = ops.signing.token("olga", &["operator"]);
    let port = ops.operator_port;
    let tcp = net
        .server
        .run(|| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap());
    tcp.set_nonblocking(true).unwrap();
    let tcp = tokio::net::TcpStream::from_std(tcp).unwrap();
    let tls = Arc::new(
        thingsly_enroll::client_config(&std::fs::read(bridge.ca_chain()).unwrap(), None).unwrap(),
    );
    let query = format!("deviceId={DEVICE}&token={jwt}");
    let mut ws = ttyd::open(tcp, tls, "127.0.0.1", port, &query, None)
        .await
        .unwrap_or_else(|e| panic!("terminal: {e:?}"));
    hello(&mut ws, "").await;
    // The answer (42) is in the output only, not in the echoed input line.
    input(
        &mut ws,
        "echo \"hello from $(id -un) on $(hostname): $((6*7))\"",
    )
    .await;
    let out = read_until(&mut ws, ": 42")
        .await
        .unwrap_or_else(|(o, e)| format!("{e}: {o}"));
    // The output line follows the shell's prompt ("$ hello from …: 42").
    let line = out
        .lines()
        .filter_map(|l| l.find("hello from").map(|i| &l[i..]))
        .find(|l| l.contains(": 42"))
        .unwrap_or("(no answer)")
        .trim()
        .to_string();
    let _ = ws.close(None).await;
    story.say(
        "terminal",
        &format!("operator olga (JWT from the identity provider, Casbin role:operator) typed `echo …`: {line}"),
    );

    // 7. The agent's own account
    println!("\n$ thingsly-agent status");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &net.device.name])
        .arg(bin("thingsly-agent"))
        .arg("--config")
        .arg(&agent.config)
        .arg("status")
        .envs(agent.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    print!("{}", String::from_utf8_lossy(&out.stdout));
}

/// 127.0.0.1:`host_port` on this machine -> 127.0.0.1:`port` inside `ns`, one thread per
/// connection; the listener closes when the returned handle is dropped.
fn forward(host_port: u16, ns: &Netns, port: u16) -> Option<std::net::TcpListener> {
    let l = match std::net::TcpListener::bind(("127.0.0.1", host_port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("127.0.0.1:{host_port}: {e} (the terminal proxy stays inside the namespace)");
            return None;
        }
    };
    let keep = l.try_clone().unwrap();
    let name = ns.name.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { break };
            let name = name.clone();
            std::thread::spawn(move || {
                enter_netns(&name);
                let Ok(up) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
                    return;
                };
                let (mut a, mut b) = (c.try_clone().unwrap(), up.try_clone().unwrap());
                let t = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut a, &mut b);
                    let _ = b.shutdown(std::net::Shutdown::Write);
                });
                let (mut c2, mut up2) = (c, up);
                let _ = std::io::copy(&mut up2, &mut c2);
                let _ = c2.shutdown(std::net::Shutdown::Write);
                let _ = t.join();
            });
        }
    });
    Some(keep)
}
