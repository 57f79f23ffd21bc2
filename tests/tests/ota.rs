#![allow(clippy::unwrap_used)]
//! OTA end to end with real components: the bridge's DDI server, the agent, and a real
//! `rauc service` (Debian's rauc 1.8) on a private D-Bus with file-backed A/B slots and a
//! custom bootloader backend, installing real signed bundles. A "reboot" is: the agent's
//! reboot command drops a marker, the test kills the agent (-9, like the power going),
//! restarts RAUC booted from the primary slot, changes the boot id and starts the agent.

use std::path::PathBuf;
use std::time::Duration;
use thingsly_e2e::proxy::TcpProxy;
use thingsly_e2e::rauc::RaucSandbox;
use thingsly_e2e::{Agent, AgentOpts, Bridge, Broker, Observer, mqtt_tls, wait_for};

struct Rig {
    dir: PathBuf,
    bridge: Bridge,
    rauc: RaucSandbox,
    agent: Agent,
    boots: u32,
    /// Between the agent's DDI client and the bridge, when asked for.
    proxy: Option<TcpProxy>,
    /// Mosquitto with mTLS, when telemetry is part of the test.
    broker: Option<Broker>,
    /// Last: fields drop in order, and the RAUC sandbox finds the processes to stop through
    /// PID files in this directory (dropped first, it leaked a dbus-daemon per test).
    _t: tempfile::TempDir,
}

impl Rig {
    fn new(ota_extra: &str) -> Self {
        Self::with_ddi(ota_extra, "")
    }

    /// `ddi_extra`: more lines in the bridge's `[ddi]`.
    fn with_ddi(ota_extra: &str, ddi_extra: &str) -> Self {
        Self::build(ota_extra, ddi_extra, false, false)
    }

    /// The agent reaches the DDI server (polls and downloads) through a [`TcpProxy`].
    fn with_proxy(ota_extra: &str) -> Self {
        Self::build(ota_extra, "", true, false)
    }

    fn build(ota_extra: &str, ddi_extra: &str, proxied: bool, mqtt: bool) -> Self {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().to_path_buf();
        let rauc = RaucSandbox::start(&dir.join("rauc")).unwrap();
        let mut bridge = Bridge::init_with(
            &dir.join("bridge"),
            &format!("[ddi]\npolling_sleep = \"1s\"\n{ddi_extra}\n"),
        )
        .unwrap();
        bridge.start().unwrap();
        let proxy = proxied.then(|| TcpProxy::start(bridge.port));
        let broker = mqtt.then(|| {
            let mut b = Broker::new(&bridge, &dir.join("broker")).unwrap();
            b.start().unwrap();
            b
        });
        let telemetry = match &broker {
            Some(_) => String::new(),
            None => "enabled = false".to_string(),
        };
        let health_mqtt = broker.is_some();
        let ota_server = proxy
            .as_ref()
            .map(|p| format!("server_url = \"https://127.0.0.1:{}\"\n", p.port))
            .unwrap_or_default();
        std::fs::write(dir.join("boot_id"), "boot-0\n").unwrap();
        let mut agent = Agent::new(
            &dir.join("agent"),
            &AgentOpts {
                device_id: "ota-dev".into(),
                server_url: bridge.url(),
                token: bridge.fleet_token(),
                ca_bundle: bridge.ca_chain(),
                telemetry_extra: telemetry,
                mqtt_port: broker.as_ref().map_or(1, |b| b.port),
                rauc_enabled: true,
                reboot: format!(
                    "[\"sh\", \"-c\", \"touch {}\"]",
                    dir.join("reboot-requested").display()
                ),
                extra: format!(
                    "[ota]\npoll_interval = \"1s\"\nhealth_deadline = \"6s\"\nhealth_mqtt = {health_mqtt}\nboot_id_path = \"{}\"\n{ota_server}{ota_extra}\n",
                    dir.join("boot_id").display()
                ),
                ..Default::default()
            },
        )
        .unwrap();
        agent.env = vec![("DBUS_SYSTEM_BUS_ADDRESS".into(), rauc.bus.clone())];
        agent.start().unwrap();
        wait_for("agent enrolled", Duration::from_secs(20), || {
            bridge.cli(&["devices"]).unwrap().contains("ota-dev")
        });
        Rig {
            _t: t,
            dir,
            bridge,
            rauc,
            agent,
            boots: 0,
            proxy,
            broker,
        }
    }

    /// Upload a bundle and return the module id.
    fn upload(&self, bundle: &std::path::Path, version: &str) -> i64 {
        let m = self.bridge.ota_upload(bundle, "rootfs", version).unwrap();
        m["id"].as_i64().unwrap()
    }

    fn assign(&self, module: i64, extra: &[&str]) -> i64 {
        let mut args = vec!["--device", "ota-dev"];
        args.extend_from_slice(extra);
        let a = self.bridge.ota_assign(module, &args).unwrap();
        a[0]["id"].as_i64().unwrap()
    }

    fn action(&self, id: i64) -> serde_json::Value {
        serde_json::from_str(&self.bridge.cli(&["ota", "show", &id.to_string()]).unwrap()).unwrap()
    }

    fn wait_status(&self, id: i64, want: &str, timeout: Duration) -> serde_json::Value {
        wait_for(&format!("action {id} {want}"), timeout, || {
            self.action(id)["action"]["status"] == want
        });
        self.action(id)
    }

    fn reboot_requested(&self) -> bool {
        self.dir.join("reboot-requested").exists()
    }

    /// Wait for the reboot command, then power-cycle: kill -9, RAUC boots the primary slot.
    fn reboot(&mut self) {
        wait_for("reboot command", Duration::from_secs(60), || {
            self.reboot_requested()
        });
        self.agent.proc.as_mut().unwrap().kill();
        std::fs::remove_file(self.dir.join("reboot-requested")).unwrap();
        self.rauc.reboot().unwrap();
        self.boots += 1;
        std::fs::write(self.dir.join("boot_id"), format!("boot-{}\n", self.boots)).unwrap();
        self.agent.start().unwrap();
    }

    fn status(&self) -> serde_json::Value {
        self.agent.status()
    }

    /// Final (closed) feedbacks the device sent for an action.
    fn final_reports(&self, id: i64) -> Vec<serde_json::Value> {
        self.action(id)["feedback"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["body"]["status"]["execution"] == "closed")
            .cloned()
            .collect()
    }

    fn proxy(&self) -> &TcpProxy {
        self.proxy.as_ref().unwrap()
    }

    fn feedback_text(&self, id: i64) -> String {
        self.action(id)["feedback"].to_string()
    }

    fn phase(&self) -> String {
        std::fs::read_to_string(self.agent.state().join("ota/deployment.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["phase"].as_str().map(String::from))
            .unwrap_or_default()
    }

    fn installs_into_b(&self) -> usize {
        self.rauc.boot_calls().matches("set-primary B").count()
    }

    fn log(&self) -> String {
        let mut all = String::new();
        for e in std::fs::read_dir(&self.agent.dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "log") {
                all.push_str(&std::fs::read_to_string(p).unwrap_or_default());
            }
        }
        all
    }
}

fn details(f: &serde_json::Value) -> String {
    f["body"]["status"]["details"].to_string()
}

#[test]
fn full_cycle_installs_the_other_slot_reboots_verifies_and_reports_success() {
    let mut rig = Rig::new("");
    let bundle = rig
        .rauc
        .bundle("v2.raucb", "2.0.0", &["--size-mib", "4"])
        .unwrap();
    let module = rig.upload(&bundle, "2.0.0");
    wait_for("agent polling DDI", Duration::from_secs(20), || {
        rig.status()["state"]["modules"]["ota"]["state"] == "running"
    });
    let action = rig.assign(module, &[]);
    rig.reboot();
    let done = rig.wait_status(action, "closed", Duration::from_secs(60));
    let finals = rig.final_reports(action);
    assert_eq!(finals.len(), 1, "one final report: {done:#}");
    assert_eq!(finals[0]["body"]["status"]["result"]["finished"], "success");
    assert!(
        details(&finals[0]).contains("marked good"),
        "{}",
        details(&finals[0])
    );
    // Progress went through downloading and installing with {cnt, of}.
    let fb = done["feedback"].to_string();
    assert!(fb.contains("downloading: "), "{fb}");
    assert!(fb.contains("hash verified"), "{fb}");
    assert!(fb.contains("\"of\":100"), "{fb}");
    assert!(fb.contains("installing"), "{fb}");
    wait_for("status shows the new slot", Duration::from_secs(10), || {
        let s = rig.status();
        s["state"]["rauc_slot"] == "B"
            && s["state"]["sw_version"] == "2.0.0"
            && s["state"]["ota_status"] == "success"
    });
    let boot = rig.rauc.boot_state();
    assert!(boot.contains("STATE_B=good"), "{boot}");
    // Installed exactly once.
    assert_eq!(
        rig.rauc.boot_calls().matches("set-primary B").count(),
        1,
        "{}",
        rig.rauc.boot_calls()
    );
    assert!(!rig.agent.state().join("ota/deployment.json").exists());
    // configData reached the server, and again when the version changed.
    wait_for("configData updated", Duration::from_secs(10), || {
        let d: serde_json::Value = serde_json::from_str(
            &rig.bridge
                .cli(&["ota", "device", "--device", "ota-dev"])
                .unwrap(),
        )
        .unwrap();
        d["config_data"]["sw_version"] == "2.0.0"
            && d["config_data"]["slot"] == "B"
            && d["config_data"]["compatible"] == "rauc-sandbox-board"
    });
    // Restarting the agent does not report again.
    rig.agent.proc.as_mut().unwrap().kill();
    rig.agent.start().unwrap();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(rig.final_reports(action).len(), 1);
}

#[test]
fn failing_health_check_marks_the_slot_bad_rolls_back_and_reports_failure() {
    let mut rig = Rig::new("health_command = [\"sh\", \"-c\", \"echo db not ready >&2; exit 1\"]");
    let bundle = rig
        .rauc
        .bundle("v3.raucb", "3.0.0", &["--size-mib", "2"])
        .unwrap();
    let module = rig.upload(&bundle, "3.0.0");
    let action = rig.assign(module, &[]);
    // Into B: the health command fails within the deadline, the slot is marked bad.
    rig.reboot();
    // Back into A.
    rig.reboot();
    let done = rig.wait_status(action, "failed", Duration::from_secs(60));
    let finals = rig.final_reports(action);
    assert_eq!(finals.len(), 1, "{done:#}");
    let d = details(&finals[0]);
    assert!(
        d.contains("health checks failed") && d.contains("db not ready"),
        "{d}"
    );
    wait_for(
        "status shows the old slot and the failure",
        Duration::from_secs(5),
        || {
            let s = rig.status();
            s["state"]["rauc_slot"] == "A" && s["state"]["ota_status"] == "failed"
        },
    );
    assert!(
        rig.rauc.boot_state().contains("STATE_B=bad"),
        "{}",
        rig.rauc.boot_state()
    );
}

#[test]
fn broken_bundles_fail_cleanly_and_the_device_stays_on_its_slot() {
    let rig = Rig::new("");
    // 1. sha256 mismatch: the stored artifact changes under the server's published hash.
    let good = rig
        .rauc
        .bundle("ok.raucb", "4.0.0", &["--size-mib", "1"])
        .unwrap();
    let module = rig.upload(&good, "4.0.0");
    let m: serde_json::Value =
        serde_json::from_str(&rig.bridge.cli(&["ota", "list"]).unwrap()).unwrap();
    let sha = m["modules"][0]["sha256"].as_str().unwrap().to_string();
    let stored = rig.bridge.data().join(format!("artifacts/{sha}.bin"));
    let mut bytes = std::fs::read(&stored).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&stored, &bytes).unwrap();
    let a1 = rig.assign(module, &[]);
    rig.wait_status(a1, "failed", Duration::from_secs(60));
    let d = details(&rig.final_reports(a1)[0]);
    assert!(d.contains("sha256 mismatch"), "{d}");

    // 2. Signed by a CA RAUC does not trust.
    let untrusted = rig
        .rauc
        .bundle("untrusted.raucb", "5.0.0", &["--signer", "untrusted"])
        .unwrap();
    let a2 = rig.assign(rig.upload(&untrusted, "5.0.0"), &[]);
    rig.wait_status(a2, "failed", Duration::from_secs(60));
    let d = details(&rig.final_reports(a2)[0]);
    assert!(d.contains("signature verification failed"), "{d}");

    // 3. Another board's bundle.
    let other = rig
        .rauc
        .bundle(
            "other.raucb",
            "6.0.0",
            &["--compatible", "some-other-board"],
        )
        .unwrap();
    let a3 = rig.assign(rig.upload(&other, "6.0.0"), &[]);
    rig.wait_status(a3, "failed", Duration::from_secs(60));
    let d = details(&rig.final_reports(a3)[0]);
    assert!(d.contains("Compatible mismatch"), "{d}");

    // 4. The server lost the file (404): final at once, not retried.
    let gone = rig
        .rauc
        .bundle("gone.raucb", "7.0.0", &["--size-mib", "1"])
        .unwrap();
    let m4 = rig.upload(&gone, "7.0.0");
    let m: serde_json::Value =
        serde_json::from_str(&rig.bridge.cli(&["ota", "list"]).unwrap()).unwrap();
    let sha = m["modules"][3]["sha256"].as_str().unwrap().to_string();
    std::fs::remove_file(rig.bridge.data().join(format!("artifacts/{sha}.bin"))).unwrap();
    let a4 = rig.assign(m4, &[]);
    rig.wait_status(a4, "failed", Duration::from_secs(30));
    let d = details(&rig.final_reports(a4)[0]);
    assert!(d.contains("404"), "{d}");
    assert!(!rig.feedback_text(a4).contains("interrupted"));

    // Nothing rebooted, the running slot untouched, the agent still fine.
    assert!(!rig.reboot_requested());
    wait_for("status shows the failure", Duration::from_secs(5), || {
        let s = rig.status();
        s["state"]["rauc_slot"] == "A" && s["state"]["ota_status"] == "failed"
    });
    assert!(
        !rig.rauc.boot_calls().contains("set-primary"),
        "{}",
        rig.rauc.boot_calls()
    );
}

#[test]
fn download_only_then_maintenance_window_closed_then_open() {
    let mut rig = Rig::new("");
    let bundle = rig
        .rauc
        .bundle("v7.raucb", "7.0.0", &["--size-mib", "1"])
        .unwrap();
    let module = rig.upload(&bundle, "7.0.0");
    let a1 = rig.assign(module, &["--type", "downloadonly"]);
    let done = rig.wait_status(a1, "closed", Duration::from_secs(60));
    assert!(
        done["feedback"].to_string().contains("\"downloaded\""),
        "{done:#}"
    );
    assert!(!rig.rauc.boot_calls().contains("set-primary"));
    assert!(!rig.reboot_requested());

    // A window opening in 8 s: downloaded and waiting, installed only once it opens.
    let a2 = rig.assign(
        module,
        &["--window-start", "+8s", "--window-duration", "10m"],
    );
    wait_for("waiting for the window", Duration::from_secs(30), || {
        rig.action(a2)["feedback"]
            .to_string()
            .contains("waiting for the maintenance window")
    });
    assert!(!rig.rauc.boot_calls().contains("set-primary"));
    // A power cut while waiting: it keeps the downloaded bundle and keeps waiting.
    rig.agent.proc.as_mut().unwrap().kill();
    assert_eq!(rig.phase(), "downloaded");
    rig.agent.start().unwrap();
    rig.reboot();
    rig.wait_status(a2, "closed", Duration::from_secs(60));
    assert_eq!(rig.installs_into_b(), 1);
    assert_eq!(rig.status()["state"]["sw_version"], "7.0.0");
}

#[test]
fn cancel_is_accepted_before_installation_and_rejected_after() {
    let mut rig = Rig::new("");
    let bundle = rig
        .rauc
        .bundle("v8.raucb", "8.0.0", &["--size-mib", "1"])
        .unwrap();
    let module = rig.upload(&bundle, "8.0.0");
    // Before installation (downloaded, window not open yet): canceled, nothing installed.
    let a1 = rig.assign(
        module,
        &["--window-start", "+1h", "--window-duration", "1h"],
    );
    wait_for("downloaded", Duration::from_secs(30), || {
        rig.action(a1)["feedback"]
            .to_string()
            .contains("maintenance window")
    });
    rig.bridge.cli(&["ota", "cancel", &a1.to_string()]).unwrap();
    rig.wait_status(a1, "canceled", Duration::from_secs(30));
    assert!(!rig.rauc.boot_calls().contains("set-primary"));
    assert!(!rig.agent.state().join("ota/deployment.json").exists());

    // After installation started (installed, waiting for the reboot): rejected, goes on.
    let a2 = rig.assign(module, &[]);
    wait_for("reboot command", Duration::from_secs(60), || {
        rig.reboot_requested()
    });
    rig.bridge.cli(&["ota", "cancel", &a2.to_string()]).unwrap();
    wait_for("cancel rejected", Duration::from_secs(30), || {
        rig.action(a2)["action"]["status"] == "running"
            && rig.action(a2)["feedback"].to_string().contains("rejected")
    });
    rig.reboot();
    rig.wait_status(a2, "closed", Duration::from_secs(60));
    assert_eq!(rig.final_reports(a2).len(), 1);
}

#[test]
fn kill_during_install_resumes_without_installing_twice() {
    let mut rig = Rig::new("");
    let bundle = rig
        .rauc
        .bundle("v9.raucb", "9.0.0", &["--size-mib", "24"])
        .unwrap();
    let module = rig.upload(&bundle, "9.0.0");
    let action = rig.assign(module, &[]);
    let state_file = rig.agent.state().join("ota/deployment.json");
    wait_for("installing phase", Duration::from_secs(60), || {
        std::fs::read_to_string(&state_file).is_ok_and(|s| s.contains("\"phase\": \"installing\""))
            && rig.agent.state().join("ota/install-called").exists()
    });
    rig.agent.proc.as_mut().unwrap().kill();
    rig.agent.start().unwrap();
    rig.reboot();
    rig.wait_status(action, "closed", Duration::from_secs(60));
    assert_eq!(
        rig.rauc.boot_calls().matches("set-primary B").count(),
        1,
        "installed once: {}\n{}",
        rig.rauc.boot_calls(),
        rig.log()
    );
    assert_eq!(rig.final_reports(action).len(), 1);
    assert_eq!(rig.status()["state"]["sw_version"], "9.0.0");
}

/// The bridge's DDI server answers like hawkBit to a RAUC bundle: auth, ETag, Range, .MD5SUM,
/// 410 after closing. Endpoint-by-endpoint conformance: ddi_conformance.rs.
#[test]
fn ddi_server_speaks_hawkbit() {
    let t0 = tempfile::tempdir().unwrap();
    let token_file = t0.path().join("gateway.token");
    std::fs::write(&token_file, "gw-secret-1\n").unwrap();
    // The agent's own OTA is off: this test is the DDI client.
    let rig = Rig::with_ddi(
        "enabled = false",
        &format!("gateway_token_file = \"{}\"", token_file.display()),
    );
    let http = rig.bridge.http().unwrap();
    let base = format!("{}/DEFAULT/controller/v1/ota-dev", rig.bridge.url());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let gw = "GatewayToken gw-secret-1";
    let get = |url: &str, auth: Option<&str>, headers: &[(&str, &str)]| {
        let mut r = http.get(url);
        if let Some(a) = auth {
            r = r.header("Authorization", a);
        }
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        rt.block_on(async {
            let resp = r.send().await.unwrap();
            let status = resp.status().as_u16();
            let h = resp.headers().clone();
            (status, h, resp.bytes().await.unwrap().to_vec())
        })
    };
    // Authentication.
    assert_eq!(get(&base, None, &[]).0, 401);
    assert_eq!(get(&base, Some("GatewayToken wrong"), &[]).0, 401);
    assert_eq!(get(&base, Some("TargetToken nope"), &[]).0, 401);
    let (s, h, body) = get(&base, Some(gw), &[]);
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    let etag = h["etag"].to_str().unwrap().to_string();
    assert_eq!(get(&base, Some(gw), &[("If-None-Match", &etag)]).0, 304);
    // A TargetToken made for the device works too.
    let target = rig
        .bridge
        .cli(&["ota", "target-token", "--device", "ota-dev"])
        .unwrap();
    let tt = format!("TargetToken {}", target.trim());
    assert_eq!(get(&base, Some(&tt), &[]).0, 200);

    // An assignment changes the root (new ETag) and links the deployment.
    let bundle = rig
        .rauc
        .bundle("d.raucb", "1.2.3", &["--size-mib", "1"])
        .unwrap();
    let bytes = std::fs::read(&bundle).unwrap();
    let action = rig.assign(rig.upload(&bundle, "1.2.3"), &[]);
    let (s, _, body) = get(&base, Some(gw), &[("If-None-Match", &etag)]);
    assert_eq!(s, 200);
    let root: thingsly_proto::ddi::ControllerBase = serde_json::from_slice(&body).unwrap();
    let href = root.href("deploymentBase").unwrap().to_string();
    assert!(
        href.contains(&format!("/deploymentBase/{action}?c=")),
        "{href}"
    );
    let (s, _, body) = get(&href, Some(gw), &[]);
    assert_eq!(s, 200);
    let dep: thingsly_proto::ddi::DeploymentBase = serde_json::from_slice(&body).unwrap();
    let art = &dep.deployment.chunks[0].artifacts[0];
    assert_eq!(art.size, Some(bytes.len() as u64));
    let url = art.download_href().unwrap().to_string();
    // Range: 206 with the exact bytes, 416 past the end, whole file without.
    let (s, h, part) = get(&url, Some(gw), &[("Range", "bytes=100-199")]);
    assert_eq!(s, 206);
    assert_eq!(part, bytes[100..200]);
    assert_eq!(
        h["content-range"].to_str().unwrap(),
        format!("bytes 100-199/{}", bytes.len())
    );
    let past = format!("bytes={}-", bytes.len());
    let (s, h, _) = get(&url, Some(gw), &[("Range", &past)]);
    assert_eq!(s, 416);
    assert_eq!(
        h["content-range"].to_str().unwrap(),
        format!("bytes */{}", bytes.len())
    );
    let (s, _, whole) = get(&url, Some(gw), &[]);
    assert_eq!((s, whole.len()), (200, bytes.len()));
    let (s, _, md5) = get(&format!("{url}.MD5SUM"), Some(gw), &[]);
    assert_eq!(s, 200);
    assert_eq!(
        String::from_utf8_lossy(&md5)
            .split_whitespace()
            .next()
            .unwrap(),
        art.hashes.md5.as_deref().unwrap()
    );
    assert_eq!(get(&url, None, &[]).0, 401);

    // Feedback: a good one 200, after closing 410 (hawkBit's INVALID bodies: ddi_conformance.rs).
    let post = |body: Vec<u8>| {
        rt.block_on(async {
            http.post(format!("{base}/deploymentBase/{action}/feedback"))
                .header("Authorization", gw)
                .header("Content-Type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    let fixtures =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/proto/tests/fixtures/ddi");
    let ok = std::fs::read(
        fixtures.join("deploymentBase-feedback_POST_request_download_no-timestamp.json"),
    )
    .unwrap();
    assert_eq!(post(ok.clone()), 200);
    let closed =
        br#"{"status":{"execution":"closed","result":{"finished":"success"},"details":["done"]}}"#;
    assert_eq!(post(closed.to_vec()), 200);
    assert_eq!(post(ok), 410);
    assert_eq!(rig.action(action)["action"]["status"], "closed");
    // Another device's action is not found; an unknown tenant neither.
    let other = format!(
        "{}/DEFAULT/controller/v1/someone-else/deploymentBase/{action}",
        rig.bridge.url()
    );
    assert_eq!(get(&other, Some(gw), &[]).0, 404);
    let tenant = format!("{}/OTHER/controller/v1/ota-dev", rig.bridge.url());
    assert_eq!(get(&tenant, Some(gw), &[]).0, 404);
}

#[test]
fn a_connection_cut_mid_download_resumes_with_range() {
    let mut rig = Rig::with_proxy("");
    let bundle = rig
        .rauc
        .bundle("c.raucb", "10.0.0", &["--size-mib", "16"])
        .unwrap();
    let size = std::fs::metadata(&bundle).unwrap().len();
    let module = rig.upload(&bundle, "10.0.0");
    rig.proxy().cut_once_after(5 * 1024 * 1024);
    let action = rig.assign(module, &[]);
    rig.reboot();
    rig.wait_status(action, "closed", Duration::from_secs(60));
    assert_eq!(rig.proxy().cuts(), 1);
    let fb = rig.feedback_text(action);
    assert!(fb.contains("download interrupted"), "{fb}");
    // Resumed, not restarted: well under two copies went through the link.
    let down = rig.proxy().down_bytes();
    assert!(
        down < size + size / 2,
        "{down} bytes for a {size}-byte bundle"
    );
    let log = rig.bridge.log_text();
    assert!(
        log.contains("range=\"bytes=") && !log.contains("range=\"bytes=0-"),
        "the retry asked for the rest: {}",
        log.lines()
            .filter(|l| l.contains("artifact"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(rig.installs_into_b(), 1);
}

#[test]
fn the_download_rate_limit_caps_the_bundle_download() {
    // A correctness check, not a speed target: the download cannot be faster than the cap
    // allows (a slower machine only makes it slower). The cap's accuracy is measured by
    // `thingsly-bench ota`.
    const CAP: u64 = 1024 * 1024;
    let mut rig = Rig::with_proxy(&format!("download_rate_limit = {CAP}"));
    let bundle = rig
        .rauc
        .bundle("r.raucb", "11.0.0", &["--size-mib", "4"])
        .unwrap();
    let size = std::fs::metadata(&bundle).unwrap().len();
    let module = rig.upload(&bundle, "11.0.0");
    // The polls before it are small: the download has started once 64 KiB more went down.
    const HEAD: u64 = 64 * 1024;
    let before = rig.proxy().down_bytes();
    let action = rig.assign(module, &[]);
    wait_for("the download to start", Duration::from_secs(60), || {
        rig.proxy().down_bytes() > before + HEAD
    });
    let started = std::time::Instant::now();
    wait_for("the download to end", Duration::from_secs(120), || {
        rig.feedback_text(action).contains("download complete")
    });
    let took = started.elapsed().as_secs_f64();
    // Unpaused: a tenth of a second's worth after the start, and 50 ms of polling above.
    let least = (size - HEAD) as f64 / CAP as f64 - 0.15;
    assert!(
        took >= least,
        "{size} bytes in {took:.2} s: faster than {CAP} B/s allows (at least {least:.2} s)"
    );
    rig.reboot();
    rig.wait_status(action, "closed", Duration::from_secs(60));
    assert_eq!(rig.installs_into_b(), 1);
}

#[test]
fn a_local_install_goes_through_the_same_update_and_the_server_learns_it() {
    let mut rig = Rig::new("");
    let bundle = rig.rauc.bundle("usb.raucb", "12.0.0", &[]).unwrap();
    // The server has that software: the device's report names it ("rootfs", as uploaded).
    rig.upload(&bundle, "12.0.0");
    let path = bundle.to_str().unwrap();
    let (ok, out, err) = rig.agent.cmd(&["install", path, "--name", "rootfs"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("handed rootfs 12.0.0"), "{out}");
    // A second one while it is in flight is refused, and names the one in flight.
    let (ok, _, err) = rig.agent.cmd(&["install", path]);
    assert!(
        !ok && err.contains("in flight") && err.contains("rootfs 12.0.0"),
        "{err}"
    );
    // The command woke the agent (SIGUSR1) rather than leaving it to the next poll.
    wait_for("the agent woken", Duration::from_secs(10), || {
        rig.log().contains("woken up (SIGUSR1)")
    });
    rig.reboot();
    wait_for("local install verified", Duration::from_secs(60), || {
        !rig.agent.state().join("ota/deployment.json").exists()
    });
    wait_for(
        "12.0.0 running, update a success",
        Duration::from_secs(10),
        || {
            let s = rig.status();
            s["state"]["sw_version"] == "12.0.0" && s["state"]["ota_status"] == "success"
        },
    );
    assert_eq!(rig.installs_into_b(), 1);
    assert!(bundle.exists(), "the user's bundle is left where it was");
    wait_for("installedBase reported", Duration::from_secs(30), || {
        rig.bridge
            .log_text()
            .contains("installed version reported by the device")
    });
    assert!(!rig.agent.state().join("ota/installed-base.json").exists());
    // A bundle for another board is refused before anything is persisted.
    let other = rig
        .rauc
        .bundle("other.raucb", "13.0.0", &["--compatible", "another-board"])
        .unwrap();
    let (ok, _, err) = rig.agent.cmd(&["install", other.to_str().unwrap()]);
    assert!(!ok && err.contains("another-board"), "{err}");
    assert!(!rig.agent.state().join("ota/deployment.json").exists());
}

#[test]
fn cancel_during_download_stops_it_and_leaves_nothing_behind() {
    let rig = Rig::with_proxy("");
    let bundle = rig
        .rauc
        .bundle("s.raucb", "11.0.0", &["--size-mib", "8"])
        .unwrap();
    let module = rig.upload(&bundle, "11.0.0");
    rig.proxy().throttle(1024 * 1024);
    let action = rig.assign(module, &[]);
    wait_for("download under way", Duration::from_secs(30), || {
        rig.feedback_text(action).contains("downloading: 20%")
    });
    rig.bridge
        .cli(&["ota", "cancel", &action.to_string()])
        .unwrap();
    rig.wait_status(action, "canceled", Duration::from_secs(30));
    assert!(!rig.feedback_text(action).contains("downloading: 100%"));
    let leftovers: Vec<_> = std::fs::read_dir(rig.agent.state().join("ota"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".raucb") || n.ends_with(".part") || n == "deployment.json")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(rig.installs_into_b(), 0);
    assert_eq!(rig.status()["state"]["rauc_slot"], "A");
}

#[test]
fn kill_during_download_resumes_the_partial_file() {
    let mut rig = Rig::with_proxy("");
    let bundle = rig
        .rauc
        .bundle("k.raucb", "12.0.0", &["--size-mib", "12"])
        .unwrap();
    let size = std::fs::metadata(&bundle).unwrap().len();
    let module = rig.upload(&bundle, "12.0.0");
    rig.proxy().throttle(3 * 1024 * 1024);
    let action = rig.assign(module, &[]);
    wait_for("a third downloaded", Duration::from_secs(30), || {
        rig.feedback_text(action).contains("downloading: 30%")
    });
    rig.agent.proc.as_mut().unwrap().kill();
    assert_eq!(rig.phase(), "downloading");
    rig.proxy().throttle(0);
    rig.agent.start().unwrap();
    rig.reboot();
    rig.wait_status(action, "closed", Duration::from_secs(60));
    let down = rig.proxy().down_bytes();
    assert!(
        down < size + size / 2,
        "{down} bytes for a {size}-byte bundle"
    );
    assert_eq!(rig.installs_into_b(), 1);
    assert_eq!(rig.final_reports(action).len(), 1);
}

#[test]
fn kill_while_verifying_checks_again_and_reports_once() {
    let mut rig = Rig::new("health_command = [\"sh\", \"-c\", \"sleep 2\"]");
    let bundle = rig
        .rauc
        .bundle("h.raucb", "13.0.0", &["--size-mib", "1"])
        .unwrap();
    let action = rig.assign(rig.upload(&bundle, "13.0.0"), &[]);
    rig.reboot();
    wait_for("verifying", Duration::from_secs(30), || {
        rig.phase() == "verifying"
    });
    rig.agent.proc.as_mut().unwrap().kill();
    rig.agent.start().unwrap();
    rig.wait_status(action, "closed", Duration::from_secs(60));
    assert_eq!(rig.final_reports(action).len(), 1);
    assert!(rig.rauc.boot_state().contains("STATE_B=good"));
    assert_eq!(rig.installs_into_b(), 1);
}

#[test]
fn the_final_report_survives_a_server_outage_and_a_power_cut() {
    let mut rig = Rig::new("health_ddi = false");
    let bundle = rig
        .rauc
        .bundle("r.raucb", "14.0.0", &["--size-mib", "1"])
        .unwrap();
    let action = rig.assign(rig.upload(&bundle, "14.0.0"), &[]);
    wait_for("reboot command", Duration::from_secs(60), || {
        rig.reboot_requested()
    });
    rig.bridge.proc.as_mut().unwrap().kill();
    rig.reboot();
    // On B, healthy, marked good; the report cannot go out.
    wait_for("outcome persisted", Duration::from_secs(30), || {
        rig.phase() == "reporting"
    });
    assert!(rig.rauc.boot_state().contains("STATE_B=good"));
    rig.agent.proc.as_mut().unwrap().kill();
    rig.bridge.start().unwrap();
    rig.agent.start().unwrap();
    rig.wait_status(action, "closed", Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(rig.final_reports(action).len(), 1);
    assert_eq!(rig.installs_into_b(), 1);
}

/// MQTT is one of the health checks, and ThingsBoard sees the update in the device's attributes
/// (our keys and its OTA dashboard's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_shows_the_update_and_gates_the_health_check() {
    let mut rig = Rig::build("", "", false, true);
    let broker = rig.broker.as_ref().unwrap();
    let (crt, key) = rig.bridge.client_cert("ota-observer").unwrap();
    let tls = mqtt_tls(&broker.ca(), &crt, &key).unwrap();
    let mut obs = Observer::start(broker.port, tls, "ota-observer", "v1/devices/me/attributes");
    obs.wait_ready().await;
    let bundle = rig
        .rauc
        .bundle("t.raucb", "15.0.0", &["--size-mib", "1"])
        .unwrap();
    let action = rig.assign(rig.upload(&bundle, "15.0.0"), &[]);
    rig.reboot();
    rig.wait_status(action, "closed", Duration::from_secs(60));
    let (_, attrs) = obs
        .next_where(Duration::from_secs(30), |_, v| {
            v["sw_version"] == "15.0.0" && v["ota_status"] == "success"
        })
        .await;
    assert_eq!(attrs["rauc_slot"], "B");
    assert_eq!(attrs["current_sw_version"], "15.0.0");
    assert_eq!(attrs["sw_state"], "UPDATED");
    // The health check waited for the MQTT session on the new slot.
    assert!(rig.log().contains("OTA action succeeded"), "{}", rig.log());
}

/// hawkBit's user consent: the action starts only after the device confirms it.
#[test]
fn actions_needing_consent_are_confirmed_then_run() {
    let mut rig = Rig::new("");
    let bundle = rig
        .rauc
        .bundle("u.raucb", "16.0.0", &["--size-mib", "1"])
        .unwrap();
    let action = rig.assign(rig.upload(&bundle, "16.0.0"), &["--confirm"]);
    rig.reboot();
    rig.wait_status(action, "closed", Duration::from_secs(60));
    let fb = rig.action(action)["feedback"].clone();
    assert_eq!(fb[0]["endpoint"], "confirmationBase", "{fb:#}");
    assert_eq!(fb[0]["body"]["confirmation"], "confirmed");
}

/// Needs root (a small tmpfs as the download directory); CI runs as root.
#[test]
fn too_little_space_is_reported_before_downloading() {
    let t = tempfile::tempdir().unwrap();
    let small = t.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(st.success(), "this test needs root to mount a tmpfs");
    let _unmount = Unmount(small.clone());
    let rig = Rig::new(&format!("download_dir = \"{}\"", small.display()));
    let bundle = rig
        .rauc
        .bundle("big.raucb", "17.0.0", &["--size-mib", "4"])
        .unwrap();
    assert!(std::fs::metadata(&bundle).unwrap().len() > 1024 * 1024);
    let action = rig.assign(rig.upload(&bundle, "17.0.0"), &[]);
    rig.wait_status(action, "failed", Duration::from_secs(60));
    let d = details(&rig.final_reports(action)[0]);
    assert!(d.contains("not enough space"), "{d}");
    assert!(!rig.feedback_text(action).contains("downloading: 10%"));
    assert_eq!(std::fs::read_dir(&small).unwrap().count(), 0);
    assert!(!rig.reboot_requested());
}

/// The agent with hawkBit's GatewayToken instead of its certificate, and asked to let RAUC
/// fetch the bundle: Debian's RAUC 1.8 cannot pass TLS options, so the agent downloads itself.
#[test]
fn gateway_token_auth_and_url_install_falls_back_on_rauc_1_8() {
    let t = tempfile::tempdir().unwrap();
    let token = t.path().join("gw.token");
    std::fs::write(&token, "gw-agent-secret\n").unwrap();
    let mut rig = Rig::with_ddi(
        &format!(
            "auth = \"gateway_token\"\ntoken_file = \"{}\"\nrauc_url_install = true",
            token.display()
        ),
        &format!("gateway_token_file = \"{}\"", token.display()),
    );
    let bundle = rig
        .rauc
        .bundle("g.raucb", "18.0.0", &["--size-mib", "1"])
        .unwrap();
    let action = rig.assign(rig.upload(&bundle, "18.0.0"), &[]);
    rig.reboot();
    rig.wait_status(action, "closed", Duration::from_secs(60));
    assert!(
        rig.log().contains("cannot pass TLS options"),
        "{}",
        rig.log()
    );
    assert_eq!(rig.status()["state"]["sw_version"], "18.0.0");
}

/// A third-party DDI client, used unchanged: pengutronix's rauc-hawkbit (PyPI, pinned in
/// `tests/ddi/requirements.txt`, installed into a venv under target/) with a TargetToken.
#[test]
fn a_third_party_ddi_client_works_against_the_bridge_unchanged() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = root.join("../target/ddi-venv");
    if !venv.join("bin/python").exists() {
        let st = std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .unwrap();
        assert!(st.success(), "python3 -m venv (python3-venv)");
    }
    let st = std::process::Command::new(venv.join("bin/pip"))
        .args(["install", "-q", "--no-deps", "-r"])
        .arg(root.join("ddi/requirements.txt"))
        .status()
        .unwrap();
    assert!(st.success(), "pip install (PyPI)");

    let rig = Rig::with_ddi("enabled = false", "");
    let bundle = rig
        .rauc
        .bundle("p.raucb", "19.0.0", &["--size-mib", "2"])
        .unwrap();
    let action = rig.assign(rig.upload(&bundle, "19.0.0"), &[]);
    let token = rig
        .bridge
        .cli(&["ota", "target-token", "--device", "ota-dev"])
        .unwrap();
    let dl = rig.dir.join("third-party-dl");
    std::fs::create_dir_all(&dl).unwrap();
    let out = std::process::Command::new(venv.join("bin/python"))
        .arg(root.join("ddi/third_party_client.py"))
        .arg(format!("127.0.0.1:{}", rig.bridge.port))
        .arg("ota-dev")
        .arg(token.trim())
        .arg(&dl)
        .env("SSL_CERT_FILE", rig.bridge.ca_chain())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&format!("action {action} done")), "{text}");
    assert_eq!(
        std::fs::read(dl.join("p.raucb")).unwrap(),
        std::fs::read(&bundle).unwrap()
    );
    let done = rig.wait_status(action, "closed", Duration::from_secs(10));
    assert!(
        done["feedback"]
            .to_string()
            .contains("installed by rauc-hawkbit"),
        "{done:#}"
    );
}

/// The new slot never comes up (the bootloader's tries run out and it boots the old one): the
/// agent, back on A after a reboot, reports the rollback.
#[test]
fn a_bootloader_fallback_is_reported_as_a_rollback() {
    let mut rig = Rig::new("");
    let bundle = rig
        .rauc
        .bundle("f.raucb", "20.0.0", &["--size-mib", "1"])
        .unwrap();
    let action = rig.assign(rig.upload(&bundle, "20.0.0"), &[]);
    wait_for("reboot command", Duration::from_secs(60), || {
        rig.reboot_requested()
    });
    // What a bootloader does when B fails to boot: B is bad, A boots.
    let state = rig.rauc.dir.join("boot/state");
    let text = std::fs::read_to_string(&state).unwrap();
    std::fs::write(&state, text.replace("STATE_B=good", "STATE_B=bad")).unwrap();
    rig.reboot();
    rig.wait_status(action, "failed", Duration::from_secs(60));
    let d = details(&rig.final_reports(action)[0]);
    assert!(
        d.contains("rolled back: booted slot A again instead of B"),
        "{d}"
    );
    wait_for("status", Duration::from_secs(5), || {
        let s = rig.status();
        s["state"]["rauc_slot"] == "A" && s["state"]["ota_status"] == "failed"
    });
}
