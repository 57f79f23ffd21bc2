//! The seed's production topology: step-ca signs, Mosquitto (in ThingsBoard's place) takes
//! the device by its certificate chain, ThingsBoard's rule engine calls the bridge's
//! POST_CONNECT webhook, the bridge creates the device's target in hawkBit, and the device
//! polls hawkBit with the token it was given. step-ca and hawkBit do not run here: their
//! stand-ins (`harness/step_ca.rs`, `harness/hawkbit_mgmt.rs`) follow their sources and
//! hawkBit's own OpenAPI document. The webhook is sent exactly as the shipped rule chain
//! (`thingsboard/connect-webhook-rule-chain.json`) describes it.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;
use std::time::Duration;
use thingsly_e2e::hawkbit_mgmt::HawkbitMgmt;
use thingsly_e2e::rauc::RaucSandbox;
use thingsly_e2e::step_ca::{Claims, StepCa, provisioner_jwk};
use thingsly_e2e::*;

const SECRET: &str = "0123456789abcdef0123456789abcdef-webhook";

/// What ThingsBoard's REST API Call node of the shipped rule chain sends for a Connect Event
/// of `device` (message data `data`, metadata deviceName/deviceType/deviceLabel), aimed at
/// `bridge` and signed with `secret`: (status, answer).
async fn rule_chain_connect(
    bridge: &Bridge,
    secret: &str,
    device: &str,
    device_type: &str,
) -> (u16, serde_json::Value) {
    let chain: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../thingsboard/connect-webhook-rule-chain.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let meta = &chain["metadata"];
    let link = &meta["connections"][0];
    assert_eq!(link["type"], "Connect Event");
    let node = &meta["nodes"][link["toIndex"].as_u64().unwrap() as usize];
    assert_eq!(
        node["type"],
        "org.thingsboard.rule.engine.rest.TbRestApiCallNode"
    );
    let cfg = &node["configuration"];
    let subst = |s: &str| {
        s.replace("${deviceName}", device)
            .replace("${deviceType}", device_type)
            .replace("${deviceLabel}", "label-1")
            .replace("REPLACE-WITH-THE-BRIDGE-WEBHOOK-SECRET", secret)
            .replace("https://bridge.example.com:8443", &bridge.url())
    };
    let url = subst(cfg["restEndpointUrlPattern"].as_str().unwrap());
    assert_eq!(cfg["requestMethod"], "POST");
    let mut req = bridge.http().unwrap().post(url);
    for (k, v) in cfg["headers"].as_object().unwrap() {
        req = req.header(k, subst(v.as_str().unwrap()));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    // The Connect Event's message data, as ThingsBoard's device state service sends it.
    let data = serde_json::json!({"lastConnectTime": now, "lastActivityTime": now - 5000,
        "lastDisconnectTime": now - 60_000, "lastInactivityAlarmTime": 0, "inactivityTimeout": 600_000});
    let r = req.body(data.to_string()).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or_default())
}

/// A hawkBit stand-in whose TLS certificate the bridge's CA issued (the device and the bridge
/// trust it through that chain).
async fn hawkbit(bridge: &Bridge, dir: &Path) -> HawkbitMgmt {
    std::fs::create_dir_all(dir).unwrap();
    let (crt, key) = (dir.join("hawkbit.crt"), dir.join("hawkbit.key"));
    bridge
        .cli(&[
            "issue-server-cert",
            "--name",
            "127.0.0.1",
            "--out-cert",
            crt.to_str().unwrap(),
            "--out-key",
            key.to_str().unwrap(),
        ])
        .unwrap();
    HawkbitMgmt::start(&crt, &key, "thingsly", "hawkbit-password").await
}

/// `[hawkbit]` and `[thingsboard]` for `bridge.toml`, files written beside it.
fn provisioning_sections(bridge: &Bridge, hb: &HawkbitMgmt, extra: &str) -> String {
    let pw = bridge.dir.join("hawkbit.pass");
    std::fs::write(&pw, "hawkbit-password\n").unwrap();
    let secret = bridge.dir.join("webhook.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    format!(
        "\n[hawkbit]\nmgmt_url = \"{url}\"\nmgmt_ca = \"{ca}\"\nusername = \"thingsly\"\npassword_file = \"{pw}\"\nddi_url = \"{url}\"\n{extra}\n\n[thingsboard]\nwebhook_secret_file = \"{secret}\"\n",
        url = hb.url(),
        ca = bridge.ca_chain().display(),
        pw = pw.display(),
        secret = secret.display(),
    )
}

fn append(path: &Path, text: &str) {
    let mut s = std::fs::read_to_string(path).unwrap();
    s.push_str(text);
    std::fs::write(path, s).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_topology_step_ca_broker_webhook_one_hawkbit_target_and_the_agent_polls_it() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let jwk = provisioner_jwk();
    let step = StepCa::start(
        &dir.join("step"),
        "thingsly-bridge",
        &jwk,
        Claims {
            min: Duration::from_secs(60),
            ..Claims::default()
        },
    )
    .await;
    let key = dir.join("provisioner.json");
    std::fs::write(&key, jwk.to_string()).unwrap();
    let mut bridge = Bridge::init_with(
        &dir.join("bridge"),
        &format!(
            "device_cert_lifetime = \"60s\"\n{}",
            step.signer_section("thingsly-bridge", &key, None)
        ),
    )
    .unwrap();
    let hb = hawkbit(&bridge, &dir.join("hawkbit")).await;
    append(&bridge.config, &provisioning_sections(&bridge, &hb, ""));
    bridge.start().unwrap();
    let mut broker = Broker::new(&bridge, &dir.join("broker")).unwrap();
    std::fs::write(broker.ca(), &step.root_pem).unwrap();
    broker.start().unwrap();
    let (ocrt, okey) = step.client_cert("observer-prod");
    let mut obs = Observer::start(
        broker.port,
        mqtt_tls(&bridge.ca_chain(), &ocrt, &okey).unwrap(),
        "observer-prod",
        "v1/devices/me/#",
    );
    obs.wait_ready().await;

    // The agent has no [ota] server: it polls where its enrollment answer says.
    let rauc = RaucSandbox::start(&dir.join("rauc")).unwrap();
    std::fs::write(dir.join("boot_id"), "boot-0\n").unwrap();
    let mut agent = Agent::new(
        &dir.join("agent"),
        &AgentOpts {
            device_id: "dev-prod".into(),
            enroll_extra: "renew_fraction = 0.5".into(),
            server_url: bridge.url(),
            token: bridge.fleet_token(),
            ca_bundle: bridge.ca_chain(),
            mqtt_port: broker.port,
            rauc_enabled: true,
            extra: format!(
                "[ota]\npoll_interval = \"1s\"\nboot_id_path = \"{}\"\n",
                dir.join("boot_id").display()
            ),
            ..Default::default()
        },
    )
    .unwrap();
    agent.env = vec![("DBUS_SYSTEM_BUS_ADDRESS".into(), rauc.bus.clone())];
    agent.start().unwrap();
    obs.next_where(Duration::from_secs(30), |t, v| {
        t == "v1/devices/me/attributes" && v["device_id"] == "dev-prod"
    })
    .await;
    let ddi: serde_json::Value =
        serde_json::from_slice(&std::fs::read(agent.state().join("identity/ddi.json")).unwrap())
            .unwrap();
    assert_eq!(ddi["server_url"], hb.url().as_str());
    assert_eq!(ddi["auth"], "target-token");
    let token = ddi["target_token"].as_str().unwrap().to_string();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(agent.state().join("identity/ddi.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the token file is the agent's alone");
    // No target yet: the device's polls are refused until ThingsBoard reports its connect.
    wait_for("a refused poll", Duration::from_secs(20), || {
        hb.world()
            .polls
            .iter()
            .any(|(c, ok)| c == "dev-prod" && !ok)
    });
    assert!(hb.world().targets.is_empty());

    // ThingsBoard's rule chain fires on the MQTT connect.
    let (s, body) = rule_chain_connect(&bridge, SECRET, "dev-prod", "gateway").await;
    assert_eq!(
        (s, body["provisioning"].as_str()),
        (202, Some("queued")),
        "{body}"
    );
    wait_for("an accepted poll", Duration::from_secs(20), || {
        hb.world()
            .polls
            .iter()
            .any(|(c, ok)| c == "dev-prod" && *ok)
    });
    {
        let w = hb.world();
        assert_eq!(w.targets.len(), 1);
        assert_eq!(w.targets["dev-prod"].security_token, token);
        assert!(w.violations.is_empty(), "{:?}", w.violations);
    }
    // hawkBit's read limit: a 429 with Retry-After 4 s is honoured (the agent polls every
    // second otherwise), then polling goes on at the interval.
    hb.world().throttle_polls = Some(4);
    let throttled_at = {
        let n = hb.world().poll_times.len();
        wait_for("a throttled poll", Duration::from_secs(10), || {
            hb.world().poll_times.len() > n
        });
        hb.world().poll_times.len() - 1
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    hb.world().throttle_polls = None;
    wait_for(
        "the poll after the throttle",
        Duration::from_secs(15),
        || hb.world().poll_times.len() > throttled_at + 1,
    );
    {
        let w = hb.world();
        let gap = w.poll_times[throttled_at + 1] - w.poll_times[throttled_at];
        assert!(
            gap >= Duration::from_secs(4),
            "Retry-After undercut: {gap:?}"
        );
    }
    // A second Connect Event (a reconnect) creates nothing.
    let (s, body) = rule_chain_connect(&bridge, SECRET, "dev-prod", "gateway").await;
    assert_eq!(
        (s, body["provisioning"].as_str()),
        (202, Some("current")),
        "{body}"
    );

    // Renewal goes through step-ca again; the device keeps its token and keeps polling.
    // (step-ca backdates by a minute, so a 60 s certificate is due for renewal at once: the
    // agent renews every few seconds here.)
    wait_for("renewed through step-ca", Duration::from_secs(90), || {
        step.outcomes().len() >= 2
    });
    assert!(
        step.outcomes().iter().all(|o| o.0 == 201),
        "{:?}",
        step.outcomes()
    );
    wait_for("credentials generation 2", Duration::from_secs(20), || {
        agent.status()["state"]["credentials_generation"]
            .as_u64()
            .is_some_and(|g| g >= 2)
    });
    let polls = hb.world().polls.len();
    wait_for("polls after the renewal", Duration::from_secs(20), || {
        let w = hb.world();
        w.polls.len() > polls + 1 && w.polls.last().is_some_and(|p| p.1)
    });
    let ddi: serde_json::Value =
        serde_json::from_slice(&std::fs::read(agent.state().join("identity/ddi.json")).unwrap())
            .unwrap();
    assert_eq!(ddi["target_token"].as_str(), Some(token.as_str()));
    {
        let w = hb.world();
        let creates = w
            .requests
            .iter()
            .filter(|(m, p, _)| m == "POST" && p == "/rest/v1/targets")
            .count();
        assert_eq!(creates, 1, "{:?}", w.requests);
        assert!(w.violations.is_empty(), "{:?}", w.violations);
    }
    // The registry has the connect and what ThingsBoard said about the device.
    let dev: serde_json::Value = bridge
        .http()
        .unwrap()
        .get(format!("{}/devices/dev-prod", bridge.url()))
        .bearer_auth(bridge.admin_token())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(dev["connection"]["connects"], 2, "{dev}");
    assert_eq!(dev["connection"]["metadata"]["deviceType"], "gateway");
    assert!(dev["connection"]["metadata"]["data"]["lastConnectTime"].is_u64());
    assert_eq!(dev["hawkbit"]["pending"], false);
}

async fn enroll(bridge: &Bridge, id: &str) -> serde_json::Value {
    let kp = rcgen::KeyPair::generate().unwrap();
    let r = bridge
        .http()
        .unwrap()
        .post(format!("{}/devices/{id}/enroll", bridge.url()))
        .bearer_auth(bridge.fleet_token())
        .json(&serde_json::json!({"csr_pem": csr_pem(id, &kp)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// Wait until device `id`'s hawkBit `last_error` contains `what`.
async fn until(bridge: &Bridge, id: &str, what: &str) {
    let found = tokio::time::timeout(Duration::from_secs(40), async {
        loop {
            let d = device(bridge, id).await;
            if d["hawkbit"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains(what))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(found.is_ok(), "{id}: no {what:?} in hawkbit.last_error");
}

async fn device(bridge: &Bridge, id: &str) -> serde_json::Value {
    bridge
        .http()
        .unwrap()
        .get(format!("{}/devices/{id}", bridge.url()))
        .bearer_auth(bridge.admin_token())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_refuses_strangers_survives_a_hawkbit_outage_and_a_bridge_kill_and_never_doubles_a_target()
 {
    let t = tempfile::tempdir().unwrap();
    let mut bridge = Bridge::init(&t.path().join("bridge")).unwrap();
    let hb = hawkbit(&bridge, &t.path().join("hawkbit")).await;
    append(&bridge.config, &provisioning_sections(&bridge, &hb, ""));
    bridge.start().unwrap();
    let answer = enroll(&bridge, "dev-a").await;
    let token_a = answer["ddi"]["target_token"].as_str().unwrap().to_string();
    assert_eq!(answer["ddi"]["tenant"], "DEFAULT");
    // An operator's group becomes the target's tag.
    let r = bridge
        .http()
        .unwrap()
        .put(format!("{}/devices/dev-a/group", bridge.url()))
        .bearer_auth(bridge.admin_token())
        .json(&serde_json::json!({"group": "line-3"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);

    // Strangers: no secret, a wrong one (with a body it never reads), an unknown device, a
    // body that is not an object, one that is too large.
    let url = |id: &str| format!("{}/webhooks/thingsboard/connect/{id}", bridge.url());
    let http = bridge.http().unwrap();
    let post = |id: &str, secret: Option<&str>, body: Vec<u8>| {
        let mut r = http
            .post(url(id))
            .header("content-type", "application/json")
            .body(body);
        if let Some(s) = secret {
            r = r.header("X-Thingsly-Webhook-Secret", s);
        }
        async move {
            let r = r.send().await.unwrap();
            let s = r.status().as_u16();
            let b: serde_json::Value = r.json().await.unwrap_or_default();
            (s, b["error"].as_str().unwrap_or_default().to_string())
        }
    };
    assert_eq!(
        post("dev-a", None, b"{}".to_vec()).await,
        (401, "bad_token".into())
    );
    // A wrong secret with 1 MiB behind it: refused from the head. The bridge answers 401
    // and closes without reading the body, so the client sees the 401 or, still writing,
    // a broken pipe. Its own client: the closed connection must not go back to the pool the
    // next requests take theirs from (reusing it raced the close: IncompleteMessage).
    let r = bridge
        .http()
        .unwrap()
        .post(url("dev-a"))
        .header("X-Thingsly-Webhook-Secret", "wrong")
        .header("content-type", "application/json")
        .body(vec![b' '; 1 << 20])
        .send()
        .await;
    match r {
        Ok(r) => assert_eq!(r.status(), 401),
        Err(e) => assert!(format!("{e:?}").contains("BodyWrite"), "{e:?}"),
    }
    assert_eq!(
        post("nobody", Some(SECRET), b"{}".to_vec()).await,
        (404, "not_found".into())
    );
    assert_eq!(
        post("dev-a", Some(SECRET), b"[1]".to_vec()).await,
        (400, "bad_request".into())
    );
    let mut big = b"{\"x\":\"".to_vec();
    big.extend(vec![b'a'; 9000]);
    big.extend(b"\"}");
    assert_eq!(
        post("dev-a", Some(SECRET), big).await,
        (413, "too_large".into())
    );
    assert!(hb.world().requests.is_empty(), "nothing reached hawkBit");

    // hawkBit down: the event is accepted at once and kept; retries back off.
    hb.world().fail_with = Some(503);
    let (s, b) = rule_chain_connect(&bridge, SECRET, "dev-a", "sensor").await;
    assert_eq!((s, b["provisioning"].as_str()), (202, Some("queued")));
    wait_for("a refused attempt", Duration::from_secs(15), || {
        hb.world().requests.iter().any(|r| r.2 == 503)
    });
    let d = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let d = device(&bridge, "dev-a").await;
            if d["hawkbit"]["attempts"].as_i64().unwrap_or(0) >= 1 {
                return d;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(d["hawkbit"]["pending"], true);
    assert!(
        d["hawkbit"]["last_error"].as_str().unwrap().contains("503"),
        "{d}"
    );
    // A reconnect storm meanwhile: twenty connects at once are one job.
    let storm: Vec<_> = (0..20)
        .map(|_| rule_chain_connect(&bridge, SECRET, "dev-a", "sensor"))
        .collect();
    for (s, _) in futures_util::future::join_all(storm).await {
        assert_eq!(s, 202);
    }
    // The bridge dies (kill -9) with the job pending; hawkBit comes back; a new bridge
    // process finishes the job from the registry.
    bridge.proc.as_mut().unwrap().kill();
    hb.world().fail_with = None;
    // A second device whose target an operator already made in hawkBit (409 -> update).
    bridge.start().unwrap();
    let answer_b = enroll(&bridge, "dev-b").await;
    let token_b = answer_b["ddi"]["target_token"]
        .as_str()
        .unwrap()
        .to_string();
    hb.world().targets.insert(
        "dev-b".into(),
        thingsly_e2e::hawkbit_mgmt::Target {
            id: 900,
            name: "made by hand".into(),
            security_token: "old-token".into(),
            ..Default::default()
        },
    );
    let (s, _) = rule_chain_connect(&bridge, SECRET, "dev-b", "sensor").await;
    assert_eq!(s, 202);
    wait_for("both targets provisioned", Duration::from_secs(60), || {
        let w = hb.world();
        // The tag is the job's last step.
        w.targets.get("dev-a").is_some_and(|t| !t.tags.is_empty())
            && w.targets
                .get("dev-a")
                .is_some_and(|t| t.security_token == token_a)
            && w.targets
                .get("dev-b")
                .is_some_and(|t| t.security_token == token_b)
    });
    {
        let w = hb.world();
        assert_eq!(w.targets.len(), 2);
        let tag = w.tags.iter().find(|(_, n)| n == "line-3").unwrap().0;
        assert_eq!(w.targets["dev-a"].tags, [tag]);
        assert_eq!(w.targets["dev-b"].id, 900, "updated, not created again");
        let creates_ok = w
            .requests
            .iter()
            .filter(|(m, p, s)| m == "POST" && p == "/rest/v1/targets" && *s == 201)
            .count();
        assert_eq!(creates_ok, 1, "{:?}", w.requests);
        assert!(
            w.requests
                .iter()
                .any(|(m, p, s)| m == "PUT" && p == "/rest/v1/targets/dev-b" && *s == 200)
        );
        assert!(w.violations.is_empty(), "{:?}", w.violations);
    }
    let d = device(&bridge, "dev-a").await;
    assert_eq!(d["hawkbit"]["pending"], false, "{d}");
    assert_eq!(d["connection"]["connects"], 21);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_types_a_wrong_password_and_a_slow_hawkbit_are_retried_until_they_are_fixed() {
    let t = tempfile::tempdir().unwrap();
    let mut bridge = Bridge::init(&t.path().join("bridge")).unwrap();
    let hb = hawkbit(&bridge, &t.path().join("hawkbit")).await;
    append(
        &bridge.config,
        &provisioning_sections(&bridge, &hb, "group_as = \"type\"\ntimeout = \"1s\""),
    );
    // The operator typed the wrong password.
    std::fs::write(bridge.dir.join("hawkbit.pass"), "not-the-password\n").unwrap();
    hb.world().target_types.push((7, "line-7".into()));
    bridge.start().unwrap();
    for (id, group) in [("dev-t", "line-7"), ("dev-u", "no-such-type")] {
        enroll(&bridge, id).await;
        let r = bridge
            .http()
            .unwrap()
            .put(format!("{}/devices/{id}/group", bridge.url()))
            .bearer_auth(bridge.admin_token())
            .json(&serde_json::json!({ "group": group }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
    }
    let (s, _) = rule_chain_connect(&bridge, SECRET, "dev-t", "sensor").await;
    assert_eq!(s, 202);
    until(&bridge, "dev-t", "refused the bridge's user").await;
    assert!(hb.world().requests.iter().all(|r| r.2 == 401));

    // Fixed and restarted, but hawkBit is slow (2 s against the bridge's 1 s timeout).
    bridge.proc.as_mut().unwrap().kill();
    std::fs::write(bridge.dir.join("hawkbit.pass"), "hawkbit-password\n").unwrap();
    hb.world().delay = Some(Duration::from_secs(2));
    bridge.start().unwrap();
    until(&bridge, "dev-t", "unavailable").await;
    assert!(hb.world().targets.is_empty());
    hb.world().delay = None;
    wait_for("dev-t provisioned", Duration::from_secs(60), || {
        hb.world().targets.contains_key("dev-t")
    });
    assert_eq!(hb.world().targets["dev-t"].target_type, Some(7));

    // A group hawkBit has no target type for: the job waits with the reason, no target.
    let (s, _) = rule_chain_connect(&bridge, SECRET, "dev-u", "sensor").await;
    assert_eq!(s, 202);
    until(&bridge, "dev-u", "no target type named \"no-such-type\"").await;
    assert!(!hb.world().targets.contains_key("dev-u"));
    let d = device(&bridge, "dev-t").await;
    assert_eq!(d["hawkbit"]["pending"], false, "{d}");
    let w = hb.world();
    assert!(w.violations.is_empty(), "{:?}", w.violations);
}
