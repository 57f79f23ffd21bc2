#![allow(clippy::unwrap_used)]
//! The agent behind a corporate HTTP proxy, with real components: Debian's tinyproxy (Basic
//! auth), the bridge (enrollment, DDI, bundle download), Mosquitto (MQTT over mTLS), InfluxDB
//! (plain http) and `rauc service`. The servers listen on the loopback of one network
//! namespace; the agent runs in another whose only way out is tinyproxy on 192.0.2.1, so
//! a connection that ignored the proxy would be refused, not silently succeed. tinyproxy's
//! own log is the witness of what crossed it.

use std::path::Path;
use std::time::Duration;
use thingsly_e2e::rauc::RaucSandbox;
use thingsly_e2e::tinyproxy::Tinyproxy;
use thingsly_e2e::{Agent, AgentOpts, Bridge, Broker, Influx, VethPair, wait_for};

const USER: &str = "fleet-proxy";
// tinyproxy's config accepts no `:` or `@` in it; the unit tests cover those.
const PASSWORD: &str = "pr0xy-pass";
const PROXY_PORT: u16 = 3128;

struct Site {
    bridge: Bridge,
    broker: Broker,
    influx: Influx,
    proxy: Tinyproxy,
    rauc: RaucSandbox,
    net: VethPair,
    /// Last: the processes above find their files here until they are stopped.
    dir: tempfile::TempDir,
}

fn site(tag: &str) -> Site {
    let dir = tempfile::tempdir().unwrap();
    let net = VethPair::new(tag).unwrap();
    let server = net.server.name.clone();
    let mut bridge = Bridge::init_with(
        &dir.path().join("bridge"),
        "[ddi]\npolling_sleep = \"1s\"\n",
    )
    .unwrap();
    bridge.netns = Some(server.clone());
    bridge.start().unwrap();
    let mut broker = Broker::new(&bridge, &dir.path().join("broker")).unwrap();
    broker.netns = Some(server.clone());
    broker.start().unwrap();
    let mut influx = Influx::new(&dir.path().join("influx"), false, Some(&server)).unwrap();
    influx.start().unwrap();
    let proxy = Tinyproxy::start(
        &dir.path().join("proxy"),
        Some(&server),
        "192.0.2.1",
        PROXY_PORT,
        Some((USER, PASSWORD)),
    )
    .unwrap();
    let rauc = RaucSandbox::start(&dir.path().join("rauc")).unwrap();
    Site {
        bridge,
        broker,
        influx,
        proxy,
        rauc,
        net,
        dir,
    }
}

impl Site {
    /// An agent in the device namespace with every module that talks to a server on
    /// (telemetry, metrics, OTA); `proxy` is its `[proxy]` section, `env` its environment.
    fn agent(&self, id: &str, proxy: &str, env: &[(&str, &str)]) -> Agent {
        let mut agent = Agent::new(
            &self.dir.path().join(id),
            &AgentOpts {
                device_id: id.into(),
                server_url: self.bridge.url(),
                token: self.bridge.fleet_token(),
                ca_bundle: self.bridge.ca_chain(),
                mqtt_port: self.broker.port,
                rauc_enabled: true,
                extra: format!(
                    "[metrics]\ninterval = \"1s\"\n[metrics.influxdb]\nurl = \"{}\"\ndatabase = \"telegraf\"\n\n\
                     [ota]\npoll_interval = \"1s\"\n\n[proxy]\n{proxy}\n",
                    self.influx.url()
                ),
                ..Default::default()
            },
        )
        .unwrap();
        agent.netns = Some(self.net.device.name.clone());
        agent.env = vec![("DBUS_SYSTEM_BUS_ADDRESS".into(), self.rauc.bus.clone())];
        agent
            .env
            .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        agent.start().unwrap();
        agent
    }

    fn credentials_file(&self, text: &str) -> std::path::PathBuf {
        let f = self.dir.path().join(format!("cred-{}", text.len()));
        std::fs::write(&f, text).unwrap();
        f
    }

    fn enrolled(&self, id: &str) -> bool {
        self.bridge.cli(&["devices"]).unwrap().contains(id)
    }

    fn points(&self, host: &str) -> usize {
        self.influx
            .rows(
                "telegraf",
                &format!("SELECT uptime FROM system WHERE host = '{host}'"),
            )
            .len()
    }
}

fn module(agent: &Agent, name: &str) -> serde_json::Value {
    agent.status()["state"]["modules"][name].clone()
}

fn logs(dir: &Path) -> String {
    let mut all = String::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "log") {
            all.push_str(&std::fs::read_to_string(p).unwrap_or_default());
        }
    }
    all
}

#[test]
fn every_server_connection_crosses_an_authenticating_proxy_and_nothing_else_reaches_out() {
    let s = site("hpx");
    // The premise: from the device namespace the servers are not reachable directly.
    let direct = s.net.device.run(|| {
        std::net::TcpStream::connect(("127.0.0.1", s.bridge.port)).is_err()
            && std::net::TcpStream::connect(("127.0.0.1", s.broker.port)).is_err()
    });
    assert!(
        direct,
        "the device namespace reaches a server without the proxy"
    );

    let cred = s.credentials_file(&format!("{USER}:{PASSWORD}\n"));
    let agent = s.agent(
        "dev-proxied",
        &format!(
            "url = \"{}\"\ncredentials_file = \"{}\"\n",
            s.proxy.url(),
            cred.display()
        ),
        // Ignored: the config wins over the environment.
        &[("HTTPS_PROXY", "http://192.0.2.9:1")],
    );
    // Enrollment (CONNECT to the bridge).
    wait_for(
        "enrolled through the proxy",
        Duration::from_secs(30),
        || s.enrolled("dev-proxied"),
    );
    // MQTT over mTLS (CONNECT to the broker): telemetry acknowledged (PUBACK) by Mosquitto.
    wait_for(
        "telemetry through the proxy",
        Duration::from_secs(30),
        || agent.telemetry_counter("sent") >= 2,
    );
    // Metrics to InfluxDB over plain http (forwarded, with Proxy-Authorization).
    wait_for("metrics through the proxy", Duration::from_secs(30), || {
        s.points("dev-proxied") >= 2
    });
    // DDI polls and a bundle download (CONNECT to the bridge), download-only.
    let bundle = s
        .rauc
        .bundle("px.raucb", "2.0.0", &["--size-mib", "1"])
        .unwrap();
    let module_id = s.bridge.ota_upload(&bundle, "rootfs", "2.0.0").unwrap()["id"]
        .as_i64()
        .unwrap();
    let action = s
        .bridge
        .ota_assign(
            module_id,
            &["--device", "dev-proxied", "--type", "downloadonly"],
        )
        .unwrap()[0]["id"]
        .as_i64()
        .unwrap();
    wait_for(
        "downloaded through the proxy",
        Duration::from_secs(60),
        || {
            let a: serde_json::Value =
                serde_json::from_str(&s.bridge.cli(&["ota", "show", &action.to_string()]).unwrap())
                    .unwrap();
            a["action"]["status"] == "closed"
                && a["feedback"].to_string().contains("\"downloaded\"")
        },
    );

    // tinyproxy's word: each server was reached through it, with the right requests.
    let requests = s.proxy.requests();
    let saw = |what: &str| requests.iter().any(|r| r.contains(what));
    for want in [
        format!("CONNECT 127.0.0.1:{} ", s.bridge.port),
        format!("CONNECT 127.0.0.1:{} ", s.broker.port),
        format!("POST {}/write?", s.influx.url()),
    ] {
        assert!(saw(&want), "no {want:?} in {requests:#?}");
    }
    // The download went through a tunnel, so the proxy only saw CONNECTs to the bridge: no
    // request of the agent's reached it in clear text except InfluxDB's.
    for r in &requests {
        assert!(
            r.starts_with("CONNECT ") || r.contains(&s.influx.url()),
            "{r}"
        );
    }
    // The secret never reaches the agent's log or its status.
    let text = logs(&agent.dir) + agent.status().to_string().as_str();
    assert!(
        !text.contains(PASSWORD),
        "the proxy password was written out"
    );
    assert!(text.contains("through an HTTP proxy"), "{text}");
}

#[test]
fn wrong_proxy_credentials_are_a_clear_status_and_the_environment_works_too() {
    let s = site("hpy");
    // A wrong password: enrollment waits, saying the proxy refused, and retries.
    let bad = s.credentials_file(&format!("{USER}:wrong\n"));
    let refused = s.agent(
        "dev-refused",
        &format!(
            "url = \"{}\"\ncredentials_file = \"{}\"\n",
            s.proxy.url(),
            bad.display()
        ),
        &[],
    );
    // From the environment, curl's way (credentials in the URL), and no [proxy] url.
    let password = PASSWORD.replace('-', "%2D"); // percent-decoded by the agent
    let from_env = s.agent(
        "dev-env",
        "",
        &[(
            "https_proxy",
            &format!("http://{USER}:{password}@192.0.2.1:{PROXY_PORT}"),
        )],
    );
    wait_for(
        "enrolled through the environment's proxy",
        Duration::from_secs(30),
        || s.enrolled("dev-env"),
    );
    wait_for(
        "MQTT through the environment's proxy",
        Duration::from_secs(30),
        || from_env.telemetry_counter("sent") >= 1,
    );
    // InfluxDB is plain http and there is no HTTP_PROXY: the agent tries directly, which
    // this namespace refuses; the metrics module says so and keeps its points.
    wait_for("metrics direct, refused", Duration::from_secs(30), || {
        module(&from_env, "metrics")["detail"]
            .as_str()
            .is_some_and(|d| !d.is_empty())
    });
    assert_eq!(s.points("dev-env"), 0);

    // The refused agent, seen after the working one enrolled (evidence that it had time):
    // it names the proxy and where its setting came from, and keeps trying.
    let m = module(&refused, "enroll");
    let detail = m["detail"].as_str().unwrap_or_default();
    assert!(
        m["state"] == "waiting"
            && detail.contains("the HTTP proxy 192.0.2.1:3128 from proxy.url refused the CONNECT"),
        "{m:#}"
    );
    assert!(!s.enrolled("dev-refused"));
}
