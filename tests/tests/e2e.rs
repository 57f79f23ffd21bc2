//! End to end: real bridge, real Mosquitto (mTLS), real agent processes.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;
use thingsly_e2e::*;

fn opts(bridge: &Bridge, broker_port: u16, id: &str) -> AgentOpts {
    AgentOpts {
        device_id: id.into(),
        server_url: bridge.url(),
        token: bridge.fleet_token(),
        ca_bundle: bridge.ca_chain(),
        mqtt_port: broker_port,
        ..Default::default()
    }
}

fn observer(bridge: &Bridge, broker: &Broker, name: &str) -> Observer {
    observer_on(bridge, broker, name, "v1/devices/me/#")
}

fn observer_on(bridge: &Bridge, broker: &Broker, name: &str, filter: &str) -> Observer {
    let (crt, key) = bridge.client_cert(name).expect("observer cert");
    let tls = mqtt_tls(&broker.ca(), &crt, &key).expect("tls");
    Observer::start(broker.port, tls, name, filter)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolls_publishes_answers_rpc_and_applies_shared_attributes() {
    let t = tempfile::tempdir().unwrap();
    let mut bridge = Bridge::init(&t.path().join("bridge")).unwrap();
    bridge.start().unwrap();
    let mut broker = Broker::new(&bridge, &t.path().join("broker")).unwrap();
    broker.start().unwrap();
    let mut obs = observer(&bridge, &broker, "observer-1");
    obs.wait_ready().await;
    let mut agent = Agent::new(
        &t.path().join("agent"),
        &opts(&bridge, broker.port, "dev-e2e-1"),
    )
    .unwrap();
    agent.start().unwrap();

    // Registration attributes, then telemetry in the seed's shape (with the sample time).
    let (_, attrs) = obs
        .next_where(Duration::from_secs(30), |t, v| {
            t == "v1/devices/me/attributes" && v["device_id"] == "dev-e2e-1"
        })
        .await;
    assert_eq!(attrs["sw_version"], "1.0.0");
    assert_eq!(attrs["agent_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(attrs["tunnel_address"], "10.8.0.2/32");
    let (_, tel) = obs
        .next_where(Duration::from_secs(10), |t, _| {
            t == "v1/devices/me/telemetry"
        })
        .await;
    let values = &tel["values"];
    assert!(tel["ts"].as_i64().unwrap_or(0) > 1_600_000_000_000, "{tel}");
    for k in [
        "cpu_usage",
        "mem_free_mb",
        "sw_version",
        "rauc_slot",
        "ota_status",
    ] {
        assert!(values.get(k).is_some(), "telemetry lacks {k}: {tel}");
    }
    assert_eq!(values["ota_status"], "idle");

    // RPC round trips: known, status, unknown.
    obs.client
        .publish(
            "v1/devices/me/rpc/request/7",
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"method":"ping","params":{"x":1}}"#,
        )
        .await
        .unwrap();
    let (_, pong) = obs
        .next_where(Duration::from_secs(10), |t, _| {
            t == "v1/devices/me/rpc/response/7"
        })
        .await;
    assert_eq!(pong["pong"], true);
    assert_eq!(pong["params"]["x"], 1);
    obs.client
        .publish(
            "v1/devices/me/rpc/request/8",
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"method":"status","params":{}}"#,
        )
        .await
        .unwrap();
    let (_, st) = obs
        .next_where(Duration::from_secs(10), |t, _| {
            t == "v1/devices/me/rpc/response/8"
        })
        .await;
    assert_eq!(st["device_id"], "dev-e2e-1");
    assert_eq!(st["modules"]["telemetry"]["state"], "running");
    obs.client
        .publish(
            "v1/devices/me/rpc/request/9",
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"method":"selfDestruct"}"#,
        )
        .await
        .unwrap();
    let (_, err) = obs
        .next_where(Duration::from_secs(10), |t, _| {
            t == "v1/devices/me/rpc/response/9"
        })
        .await;
    assert_eq!(err["error"], "unknown method: selfDestruct");

    // A shared attribute update is applied live, reported back, and persisted.
    obs.client
        .publish(
            "v1/devices/me/attributes",
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"telemetry_interval":2}"#,
        )
        .await
        .unwrap();
    obs.next_where(Duration::from_secs(10), |t, v| {
        t == "v1/devices/me/attributes" && v["telemetry_interval_s"] == 2.0
    })
    .await;
    let saved = std::fs::read_to_string(agent.state().join("telemetry/settings.json")).unwrap();
    assert!(saved.contains("\"telemetry_interval\": 2"), "{saved}");

    // The bridge's registry knows the device (admin token), and refuses without it.
    let http = bridge.http().unwrap();
    let url = format!("{}/devices/dev-e2e-1", bridge.url());
    let rec: serde_json::Value = http
        .get(&url)
        .bearer_auth(bridge.admin_token())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rec["wireguard_address"], "10.8.0.2/32");
    assert_eq!(rec["metadata"]["sw_version"], "1.0.0");
    assert_eq!(http.get(&url).send().await.unwrap().status(), 401);

    // status shows the identity and the running modules; SIGTERM stops within 5 s.
    wait_for(
        "status shows modules running",
        Duration::from_secs(5),
        || {
            let s = agent.status();
            s["identity"]["enrolled"] == true
                && s["state"]["modules"]["enroll"]["state"] == "running"
                && s["state"]["modules"]["telemetry"]["state"] == "running"
                && s["state"]["tunnel_address"] == "10.8.0.2/32"
        },
    );
    let (code, took) = agent.proc.as_mut().unwrap().terminate();
    assert!(code.is_some_and(|c| c.success()), "agent exit: {code:?}");
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_refuses_foreign_and_expired_certificates() {
    let t = tempfile::tempdir().unwrap();
    let bridge = Bridge::init(&t.path().join("bridge")).unwrap();
    let mut broker = Broker::new(&bridge, &t.path().join("broker")).unwrap();
    broker.start().unwrap();

    // Control: a certificate from the bridge's CA is accepted.
    let mut ok = observer(&bridge, &broker, "good-client");
    ok.wait_ready().await;
    ok.client
        .publish(
            "v1/devices/me/telemetry",
            rumqttc::QoS::AtLeastOnce,
            false,
            "{\"probe\":1}",
        )
        .await
        .unwrap();
    ok.next_where(Duration::from_secs(10), |_, v| v["probe"] == 1)
        .await;

    // Another CA: same CN, different issuer.
    let rogue_dir = t.path().join("rogue");
    let rogue = Bridge::init(&rogue_dir).unwrap();
    let (crt, key) = rogue.client_cert("good-client").unwrap();
    let tls = mqtt_tls(&broker.ca(), &crt, &key).unwrap();
    let mut foreign = Observer::start(broker.port, tls, "foreign", "#");
    let e = tokio::time::timeout(Duration::from_secs(10), foreign.errors.recv()).await;
    let e = e
        .expect("foreign certificate must be refused")
        .unwrap_or_default();
    // OpenSSL answers UnknownCA, or DecryptError when a CA of the same name but another key
    // is found (our rogue CA copies the names): both are fatal TLS alerts.
    assert!(e.contains("fatal alert"), "{e}");

    // Expired, from the right CA.
    let ca = thingsly_bridge::ca::Ca::load(&bridge.data()).unwrap();
    let kp = rcgen::KeyPair::generate().unwrap();
    let now = time::OffsetDateTime::now_utc();
    let pem = ca
        .sign_device_with_validity(
            "expired-client",
            &rcgen::PublicKeyData::subject_public_key_info(&kp),
            now - time::Duration::days(30),
            now - time::Duration::days(1),
        )
        .unwrap()
        .pem;
    let crt = t.path().join("expired.crt");
    let key = t.path().join("expired.key");
    std::fs::write(&crt, format!("{pem}{}", ca.chain_pem)).unwrap();
    std::fs::write(&key, kp.serialize_pem()).unwrap();
    let tls = mqtt_tls(&broker.ca(), &crt, &key).unwrap();
    let mut expired = Observer::start(broker.port, tls, "expired", "#");
    let e = tokio::time::timeout(Duration::from_secs(10), expired.errors.recv()).await;
    let e = e
        .expect("expired certificate must be refused")
        .unwrap_or_default();
    assert!(
        e.to_lowercase().contains("expired")
            || e.contains("CertificateExpired")
            || e.contains("Alert"),
        "{e}"
    );
    let log = std::fs::read_dir(&broker.dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("mosquitto-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect::<String>();
    assert!(
        !log.contains("as expired"),
        "expired client must never be connected:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_loses_nothing_and_keeps_order() {
    let t = tempfile::tempdir().unwrap();
    let mut bridge = Bridge::init(&t.path().join("bridge")).unwrap();
    bridge.start().unwrap();
    let mut broker = Broker::new(&bridge, &t.path().join("broker")).unwrap();
    broker.start().unwrap();
    let mut obs = observer(&bridge, &broker, "observer-outage");
    obs.wait_ready().await;
    let mut o = opts(&bridge, broker.port, "dev-outage");
    o.interval = "200ms".into();
    let mut agent = Agent::new(&t.path().join("agent"), &o).unwrap();
    agent.start().unwrap();
    obs.next_where(Duration::from_secs(30), |t, _| {
        t == "v1/devices/me/telemetry"
    })
    .await;

    // Broker away for 3 s while the agent keeps sampling every 200 ms.
    broker.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let spooled = agent.telemetry_counter("spooled");
    assert!(
        spooled >= 5,
        "agent should spool during the outage, spooled={spooled}"
    );
    broker.start().unwrap();

    // Wait until the agent drained its spool, then compare what arrived with what was made.
    wait_for("spool drained", Duration::from_secs(60), || {
        agent.telemetry_counter("spooled") == 0 && agent.telemetry_counter("reconnects") >= 1
    });
    let produced = agent.telemetry_counter("produced");
    let mut ts: Vec<i64> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while (ts.len() as u64) < produced && tokio::time::Instant::now() < deadline {
        if let Ok(Some((topic, v))) =
            tokio::time::timeout(Duration::from_secs(5), obs.rx.recv()).await
            && topic == "v1/devices/me/telemetry"
        {
            let t = v["ts"].as_i64().unwrap_or(0);
            // QoS 1 may deliver a message twice after a reconnect; never out of order.
            if ts.last() != Some(&t) {
                ts.push(t);
            }
        }
    }
    assert!(
        ts.len() as u64 >= produced - 1,
        "received {} of {produced}",
        ts.len()
    );
    assert!(ts.windows(2).all(|w| w[0] < w[1]), "out of order: {ts:?}");
    let max_gap = ts.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    assert!(
        max_gap < 700,
        "a gap of {max_gap} ms means lost messages: {ts:?}"
    );
    assert_eq!(agent.telemetry_counter("dropped"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_spool_drops_oldest_and_counts() {
    let t = tempfile::tempdir().unwrap();
    let mut bridge = Bridge::init(&t.path().join("bridge")).unwrap();
    bridge.start().unwrap();
    let mut broker = Broker::new(&bridge, &t.path().join("broker")).unwrap();
    let mut o = opts(&bridge, broker.port, "dev-spool");
    o.interval = "200ms".into();
    o.spool_max_messages = 5;
    let mut agent = Agent::new(&t.path().join("agent"), &o).unwrap();
    agent.start().unwrap();
    wait_for("20 messages produced", Duration::from_secs(30), || {
        agent.telemetry_counter("produced") >= 20
    });
    assert_eq!(agent.telemetry_counter("spooled"), 5);
    let dropped_before = agent.telemetry_counter("dropped");
    assert!(dropped_before >= 15, "dropped={dropped_before}");

    // The drop count survives a restart, and the kept (newest) messages are sent.
    agent.proc.as_mut().unwrap().terminate();
    agent.start().unwrap();
    wait_for("agent status", Duration::from_secs(10), || {
        agent.telemetry_counter("dropped") >= dropped_before
    });
    broker.start().unwrap();
    let sent = (0..600).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        agent.telemetry_counter("sent") >= 5
    });
    assert!(sent, "{:#}\n{}", agent.status(), agent.log_text());
}

#[test]
fn kill_9_during_enrollment_then_restart_keeps_the_key() {
    let t = tempfile::tempdir().unwrap();
    let mut bridge = Bridge::init(&t.path().join("bridge")).unwrap();
    // A server that accepts and never answers: the agent is stuck mid-enrollment.
    let hang = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut o = opts(&bridge, free_port(), "dev-kill");
    o.server_url = format!("https://127.0.0.1:{}", hang.local_addr().unwrap().port());
    let mut agent = Agent::new(&t.path().join("agent"), &o).unwrap();
    agent.start().unwrap();
    let key_path = agent.state().join("identity/device.key");
    wait_for("device key", Duration::from_secs(10), || key_path.exists());
    let _conn = hang.accept().unwrap();
    let key_before = std::fs::read(&key_path).unwrap();
    agent.proc.as_ref().unwrap().signal(libc::SIGKILL);
    agent.proc.as_mut().unwrap().kill();
    assert!(!agent.state().join("identity/device.crt").exists());

    // Restart against the real bridge: enrollment completes with the same key.
    bridge.start().unwrap();
    let cfg = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(&agent.config, cfg.replace(&o.server_url, &bridge.url())).unwrap();
    let (ok, out, err) = agent.cmd(&["enroll"]);
    assert!(ok, "{out}{err}");
    assert_eq!(std::fs::read(&key_path).unwrap(), key_before);
    let s = agent.status();
    assert_eq!(s["identity"]["enrolled"], true);
    // A second run does not enroll again.
    let serial = s["identity"]["certificate"]["serial"].clone();
    let (ok, _, _) = agent.cmd(&["enroll"]);
    assert!(ok);
    assert_eq!(agent.status()["identity"]["certificate"]["serial"], serial);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thingsly_dialect_telemetry_commands_and_attribute_set() {
    let t = tempfile::tempdir().unwrap();
    let mut bridge = Bridge::init(&t.path().join("bridge")).unwrap();
    bridge.start().unwrap();
    let mut broker = Broker::new(&bridge, &t.path().join("broker")).unwrap();
    broker.start().unwrap();
    let mut obs = observer_on(&bridge, &broker, "observer-ts", "devices/#");
    obs.wait_ready().await;
    let mut o = opts(&bridge, broker.port, "dev-ts");
    o.telemetry_extra = "dialect = \"thingsly\"".into();
    let mut agent = Agent::new(&t.path().join("agent"), &o).unwrap();
    agent.start().unwrap();

    let (_, attrs) = obs
        .next_where(Duration::from_secs(30), |t, v| {
            t.starts_with("devices/attributes/") && v["device_id"] == "dev-ts"
        })
        .await;
    assert_eq!(attrs["mqtt_dialect"], "thingsly");
    let (_, tel) = obs
        .next_where(Duration::from_secs(10), |t, _| t == "devices/telemetry")
        .await;
    assert!(
        tel.get("cpu_usage").is_some() && tel.get("sw_version").is_some(),
        "flat values: {tel}"
    );

    obs.client
        .publish(
            "devices/command/dev-ts/m1",
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"method":"ping","params":{}}"#,
        )
        .await
        .unwrap();
    let (_, r) = obs
        .next_where(Duration::from_secs(10), |t, _| {
            t == "devices/command/response/m1"
        })
        .await;
    assert_eq!(r["result"], 0);
    assert_eq!(r["method"], "ping");
    obs.client
        .publish(
            "devices/command/dev-ts/m2",
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"method":"nope"}"#,
        )
        .await
        .unwrap();
    let (_, r) = obs
        .next_where(Duration::from_secs(10), |t, _| {
            t == "devices/command/response/m2"
        })
        .await;
    assert_eq!(r["result"], 1);

    obs.client
        .publish(
            "devices/attributes/set/dev-ts/m3",
            rumqttc::QoS::AtLeastOnce,
            false,
            r#"{"telemetry_interval":3}"#,
        )
        .await
        .unwrap();
    let (_, r) = obs
        .next_where(Duration::from_secs(10), |t, _| {
            t == "devices/attributes/set/response/m3"
        })
        .await;
    assert_eq!(r["result"], 0);
    obs.next_where(Duration::from_secs(10), |t, v| {
        t.starts_with("devices/attributes/") && v["telemetry_interval_s"] == 3.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_renews_its_certificate_and_reconnects_with_it() {
    let t = tempfile::tempdir().unwrap();
    // 60 s certificates; the agent renews at half their life (about 27 s after enrollment).
    let mut bridge =
        Bridge::init_with(&t.path().join("bridge"), "device_cert_lifetime = \"60s\"").unwrap();
    bridge.start().unwrap();
    let mut broker = Broker::new(&bridge, &t.path().join("broker")).unwrap();
    broker.start().unwrap();
    let mut obs = observer(&bridge, &broker, "observer-renew");
    obs.wait_ready().await;
    let o = AgentOpts {
        enroll_extra: "renew_fraction = 0.5".into(),
        ..opts(&bridge, broker.port, "dev-renew")
    };
    let mut agent = Agent::new(&t.path().join("agent"), &o).unwrap();
    agent.start().unwrap();
    obs.next_where(Duration::from_secs(30), |t, _| {
        t == "v1/devices/me/telemetry"
    })
    .await;
    let first = agent.status()["identity"]["certificate"]["serial"].clone();
    assert!(first.is_string());
    wait_for("renewed certificate", Duration::from_secs(60), || {
        let s = agent.status();
        s["identity"]["certificate"]["serial"] != first && s["state"]["credentials_generation"] == 2
    });
    // The MQTT session was re-established with the new certificate and telemetry goes on.
    let key = std::fs::read(agent.state().join("identity/device.key")).unwrap();
    obs.next_where(Duration::from_secs(20), |t, v| {
        t == "v1/devices/me/attributes" && v["device_id"] == "dev-renew"
    })
    .await;
    obs.next_where(Duration::from_secs(10), |t, _| {
        t == "v1/devices/me/telemetry"
    })
    .await;
    assert_eq!(
        std::fs::read(agent.state().join("identity/device.key")).unwrap(),
        key
    );
    let rec = bridge.cli(&["devices"]).unwrap();
    let new_serial = agent.status()["identity"]["certificate"]["serial"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        rec.contains(&new_serial),
        "bridge registry has the new serial: {rec}"
    );
}

/// The first command a new user runs (`scripts/run-local.sh` runs `thingsly-local`): every
/// module acts, in order, and everything it made is gone when it ends by itself.
#[test]
fn the_local_loop_shows_every_module_and_cleans_up() {
    let t = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin("thingsly-local"))
        .arg("--dir")
        .arg(t.path().join("run"))
        .args([
            "--duration",
            "1",
            "--operator-port",
            &free_port().to_string(),
        ])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    let mut at = 0;
    // Each step in the story's order, with what shows that it acted.
    for want in [
        "enrolled   device-0001",
        "tunnel address 10.8.0.2/32",
        "0% packet loss",
        "\"sw_version\":\"1.0.0\"",
        "metrics    InfluxDB",
        "installed into slot B",
        "rebooted into slot B",
        "action 1: closed; 1.0.0 -> 2.0.0",
        "hello from thingsly-terminal",
        ": 42",
        "software:    2.0.0 slot B ota success",
        "/terminal/#deviceId=device-0001&token=",
    ] {
        let i = text[at..]
            .find(want)
            .unwrap_or_else(|| panic!("{want:?} missing after byte {at}:\n{text}"));
        at += i + want.len();
    }
    assert!(
        !text.contains("cpu 0,"),
        "no metrics reached InfluxDB:\n{text}"
    );
    let netns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let pid = out_pid(&text);
    assert!(
        !String::from_utf8_lossy(&netns.stdout).contains(&format!("-{pid}")),
        "namespaces left behind"
    );
}

/// The pid in the namespace names the story's first line prints (`tm-locs-PID`).
fn out_pid(text: &str) -> String {
    text.split("tm-locs-")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .unwrap_or("none")
        .to_string()
}
