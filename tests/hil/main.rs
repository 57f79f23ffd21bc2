//! `thingsly-hil`: hardware-in-the-loop scenarios on the QEMU A/B image from `hil/build-image.sh`.
//! The real agent runs in the VM as a systemd service; the real bridge (enrollment, DDI server)
//! and Mosquitto run here on loopback, reached by the VM through QEMU's guestfwd only.
//!
//!   thingsly-hil [update|rollback|health|powercut|arm64|ci|all]...   scenarios, then a table
//!   thingsly-hil [download|stream|adaptive|adaptive-fallback|stream-cuts|stream-powercut|stream-cap|streaming]...
//!                                  the same on the trixie image (RAUC 1.13, nbd): streaming
//!   thingsly-hil bench                                               boot and update phase times
//!
//! Env: HIL_OUT (image, default target/hil/out), HIL_OUT_TRIXIE (default target/hil/out-trixie),
//! HIL_WORK (runs, default target/hil/runs),
//! HIL_ACCEL (kvm|tcg; default: kvm where it can run ordinary guests, else tcg),
//! HIL_ARM64_AGENT (static aarch64 agent for `arm64`).
//! A failed scenario keeps its directory: serial.log/serial.ts.log, bridge-*.log, mqtt.log.

#![allow(clippy::unwrap_used)] // test runner: a failed unwrap is a failed scenario

mod streaming;
mod vm;

use anyhow::{Context, bail, ensure};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use thingsly_e2e::proxy::TcpProxy;
use thingsly_e2e::{Bridge, Broker};
use vm::Vm;

const DEVICE: &str = "hil-0001";
const SCENARIOS: [&str; 5] = ["update", "rollback", "health", "powercut", "arm64"];
/// On the trixie image (`HIL_SUITE=trixie hil/build-image.sh`): RAUC 1.13 streams over NBD.
const STREAM_SCENARIOS: [&str; 7] = [
    "download",
    "stream",
    "adaptive",
    "adaptive-fallback",
    "stream-cuts",
    "stream-powercut",
    "stream-cap",
];
/// The cap `stream-cap` sets (bytes per second): below what TCG streams unthrottled (~0.35 MiB/s).
const STREAM_CAP: u64 = 256 << 10;
/// Where the VM finds the bridge and the broker (QEMU guestfwd).
const GUEST_ADDR: &str = "10.0.2.100";
const BRIDGE_GUEST_PORT: u16 = 8443;
const MQTT_GUEST_PORT: u16 = 8883;

struct Paths {
    root: PathBuf,
    out: PathBuf,
    out_trixie: PathBuf,
    work: PathBuf,
}

impl Paths {
    /// The image a scenario runs on.
    fn image(&self, scenario: &str) -> &Path {
        if STREAM_SCENARIOS.contains(&scenario) {
            &self.out_trixie
        } else {
            &self.out
        }
    }
}

fn paths() -> Paths {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let root = root.canonicalize().unwrap_or(root);
    let env_or = |k: &str, d: PathBuf| std::env::var_os(k).map(PathBuf::from).unwrap_or(d);
    Paths {
        out: env_or("HIL_OUT", root.join("target/hil/out")),
        out_trixie: env_or("HIL_OUT_TRIXIE", root.join("target/hil/out-trixie")),
        work: env_or("HIL_WORK", root.join("target/hil/runs")),
        root,
    }
}

/// Seconds since the Unix epoch (the clock serial.ts.log and the bridge use).
fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn rfc3339_secs(s: &str) -> f64 {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp_nanos() as f64 / 1e9)
        .unwrap_or(0.0)
}

fn wait_until(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let end = Instant::now() + timeout;
    loop {
        if f()? {
            return Ok(());
        }
        if Instant::now() > end {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The host side of one scenario: bridge (with the fleet's CA and token the image carries),
/// Mosquitto, an MQTT subscriber logging what the device publishes, and the VM.
struct Rig {
    dir: PathBuf,
    bridge: Bridge,
    _broker: Broker,
    mqtt_sub: Child,
    proxy: Option<TcpProxy>,
    vm: Vm,
    /// Timestamps (host) of interesting moments, for the phase table.
    pub marks: Vec<(String, f64)>,
    /// The software module last uploaded, for the download baseline.
    module: String,
    /// The image this scenario runs (bundles, fleet PKI).
    out: PathBuf,
}

impl Rig {
    fn new(p: &Paths, name: &str, proxied: bool, accel: Option<&str>) -> anyhow::Result<Self> {
        let dir = p.work.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let out = p.image(name).to_path_buf();
        let fleet = out.join("fleet/data");
        ensure!(
            fleet.join("fleet-token").exists() && out.join("disk.img").exists(),
            "no HIL image in {} (run hil/run.sh, or hil/build-image.sh; HIL_SUITE=trixie for the streaming scenarios)",
            out.display()
        );
        let ca = fleet.join("ca");
        let s = |p: PathBuf| p.to_string_lossy().to_string();
        let (root_crt, root_key, iss_crt, iss_key) = (
            s(ca.join("root.crt")),
            s(ca.join("root.key")),
            s(ca.join("issuing.crt")),
            s(ca.join("issuing.key")),
        );
        let mut bridge = Bridge::init_custom(
            &dir.join("bridge"),
            "127.0.0.1",
            &[GUEST_ADDR],
            &format!(
                "fleet_token_file = \"{}\"\n[ddi]\npolling_sleep = \"3s\"\n",
                fleet.join("fleet-token").display()
            ),
            &[
                "--import-root-cert",
                &root_crt,
                "--import-root-key",
                &root_key,
                "--import-issuing-cert",
                &iss_crt,
                "--import-issuing-key",
                &iss_key,
            ],
        )?;
        bridge.start()?;
        let mut broker = Broker::with_names(&bridge, &dir.join("broker"), &[GUEST_ADDR])?;
        broker.start()?;
        let (crt, key) = bridge.client_cert("hil-observer")?;
        let mqtt_sub = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &broker.port.to_string()])
            .arg("--cafile")
            .arg(broker.ca())
            .arg("--cert")
            .arg(crt)
            .arg("--key")
            .arg(key)
            .args(["-t", "v1/devices/me/#", "-v"])
            .stdout(std::fs::File::create(dir.join("mqtt.log"))?)
            .stderr(Stdio::null())
            .spawn()
            .context("mosquitto_sub")?;
        let proxy = proxied.then(|| TcpProxy::start(bridge.port));
        let bridge_port = proxy.as_ref().map_or(bridge.port, |p| p.port);
        let vm = Vm::new(
            &dir,
            &p.root.join("hil"),
            &out,
            &[
                (BRIDGE_GUEST_PORT, bridge_port),
                (MQTT_GUEST_PORT, broker.port),
            ],
            accel,
        );
        Ok(Self {
            dir,
            bridge,
            _broker: broker,
            mqtt_sub,
            proxy,
            vm,
            marks: Vec::new(),
            module: String::new(),
            out,
        })
    }

    fn mark(&mut self, what: &str, t: f64) {
        self.marks.push((what.to_string(), t));
    }

    /// Factory-new device: power on, boot slot A, the agent enrolls.
    fn first_boot(&mut self) -> anyhow::Result<()> {
        let t0 = now();
        self.mark("power-on", t0);
        self.vm.power_on(true)?;
        let (t, _) = self
            .vm
            .wait("HIL-GRUB: booting slot A", 1, Duration::from_secs(120))?;
        self.mark("grub", t);
        let (t, _) = self.vm.wait(
            "HIL-AGENT-READY slot=A version=1.0.0",
            1,
            Duration::from_secs(300),
        )?;
        self.mark("agent-ready", t);
        // Baseline: the guest's own marker unit (after local-fs and D-Bus), no agent involved.
        if let Some((t, _)) = self
            .vm
            .lines()
            .into_iter()
            .find(|(_, l)| l.contains("HIL-BOOTED"))
        {
            self.mark("booted", t);
        }
        wait_until("the device enrolled", Duration::from_secs(120), || {
            Ok(self.bridge.cli(&["devices"])?.contains(DEVICE))
        })?;
        self.mark("enrolled", now());
        // Its first DDI poll: configData reaches the server.
        wait_until(
            "the device's first DDI poll",
            Duration::from_secs(120),
            || {
                Ok(self
                    .bridge
                    .cli(&["ota", "device", "--device", DEVICE])?
                    .contains("1.0.0"))
            },
        )?;
        Ok(())
    }

    fn upload_and_assign(&mut self, bundle: &str, version: &str) -> anyhow::Result<i64> {
        let p = self.out.join("bundles").join(bundle);
        let out = self.bridge.cli(&[
            "ota",
            "upload",
            &p.to_string_lossy(),
            "--name",
            "rootfs",
            "--version",
            version,
        ])?;
        let m: serde_json::Value = serde_json::from_str(&out)?;
        let module = m["id"].as_i64().context("module id")?.to_string();
        let out = self
            .bridge
            .cli(&["ota", "assign", "--module", &module, "--device", DEVICE])?;
        let a: serde_json::Value = serde_json::from_str(&out)?;
        self.module = module;
        self.mark("assigned", now());
        a[0]["id"].as_i64().context("action id")
    }

    fn action(&self, id: i64) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.bridge.cli(&[
            "ota",
            "show",
            &id.to_string(),
        ])?)?)
    }

    /// Feedback of an action: (bridge time, execution, finished, first detail).
    fn feedback(&self, id: i64) -> anyhow::Result<Vec<(f64, String, String, String)>> {
        let a = self.action(id)?;
        Ok(a["feedback"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|f| {
                let st = &f["body"]["status"];
                (
                    rfc3339_secs(f["at"].as_str().unwrap_or_default()),
                    st["execution"].as_str().unwrap_or_default().to_string(),
                    st["result"]["finished"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    st["details"][0].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect())
    }

    fn first_feedback(&self, id: i64, detail: &str) -> anyhow::Result<Option<f64>> {
        Ok(self
            .feedback(id)?
            .into_iter()
            .find(|f| f.3.starts_with(detail))
            .map(|f| f.0))
    }

    fn wait_feedback(&self, id: i64, detail: &str, timeout: Duration) -> anyhow::Result<f64> {
        let mut at = None;
        wait_until(&format!("feedback {detail:?}"), timeout, || {
            at = self.first_feedback(id, detail)?;
            Ok(at.is_some())
        })?;
        Ok(at.unwrap_or_default())
    }

    /// Wait for the action to close; exactly one final report is required.
    fn wait_closed(&mut self, id: i64, timeout: Duration) -> anyhow::Result<(String, String)> {
        wait_until("the action to close", timeout, || {
            Ok(self.action(id)?["action"]["status"]
                .as_str()
                .is_some_and(|s| s == "closed" || s == "failed"))
        })?;
        // A late duplicate would arrive within a poll or two.
        std::thread::sleep(Duration::from_secs(8));
        let finals: Vec<_> = self
            .feedback(id)?
            .into_iter()
            .filter(|f| f.1 == "closed")
            .collect();
        ensure!(
            finals.len() == 1,
            "expected one final report, got {}: {finals:?}",
            finals.len()
        );
        let f = finals.into_iter().next().unwrap();
        self.mark("closed", f.0);
        Ok((f.2, f.3))
    }

    /// Attribute messages the device published (as a ThingsBoard server receives them).
    fn attributes(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("mqtt.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("v1/devices/me/attributes "))
            .filter_map(|j| serde_json::from_str(j).ok())
            .collect()
    }

    /// Wait for an attributes message with these values.
    fn wait_attributes(&self, want: &[(&str, &str)], timeout: Duration) -> anyhow::Result<()> {
        wait_until(&format!("MQTT attributes {want:?}"), timeout, || {
            Ok(self
                .attributes()
                .iter()
                .any(|a| want.iter().all(|(k, v)| a[*k].as_str() == Some(*v))))
        })
    }

    /// The grubenv, which must contain each of `want`.
    fn grubenv_with(&mut self, want: &[&str]) -> anyhow::Result<String> {
        let env = self.grubenv()?;
        for w in want {
            has(&env, w)?;
        }
        Ok(env)
    }

    fn grubenv(&mut self) -> anyhow::Result<String> {
        let out = self.vm.console(
            "grub-editenv /boot/efi/EFI/BOOT/grubenv list | tr '\\n' ' '",
            Duration::from_secs(60),
        )?;
        Ok(out.trim().to_string())
    }

    /// Kept on failure (logs), trimmed on success (the disk overlay is large).
    fn finish(self, ok: bool) {
        let dir = self.dir.clone();
        drop(self);
        if ok {
            for f in ["disk.qcow2", "OVMF_VARS.fd"] {
                let _ = std::fs::remove_file(dir.join(f));
            }
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.vm.stop();
        let _ = self.mqtt_sub.kill();
        let _ = self.mqtt_sub.wait();
    }
}

fn has(text: &str, pat: &str) -> anyhow::Result<()> {
    ensure!(text.contains(pat), "expected {pat:?} in {text:?}");
    Ok(())
}

/// Update A -> B: download, install, reboot into B, health checks, marked good, success.
fn update(r: &mut Rig) -> anyhow::Result<String> {
    r.first_boot()?;
    let id = r.upload_and_assign("good.raucb", "2.0.0")?;
    let t = r.wait_feedback(id, "downloading", Duration::from_secs(120))?;
    r.mark("download", t);
    let t = r.wait_feedback(id, "installing", Duration::from_secs(300))?;
    r.mark("install", t);
    let t = r.wait_feedback(id, "rebooting into the new slot", Duration::from_secs(600))?;
    r.mark("reboot", t);
    let (t, _) =
        r.vm.wait("HIL-GRUB: booting slot B", 1, Duration::from_secs(180))?;
    r.mark("grub-b", t);
    let (t, _) = r.vm.wait(
        "HIL-AGENT-READY slot=B version=2.0.0",
        1,
        Duration::from_secs(300),
    )?;
    r.mark("ready-b", t);
    let (finished, detail) = r.wait_closed(id, Duration::from_secs(300))?;
    ensure!(finished == "success", "finished {finished}: {detail}");
    has(&detail, "marked good")?;
    r.wait_attributes(
        &[
            ("sw_version", "2.0.0"),
            ("rauc_slot", "B"),
            ("ota_status", "success"),
        ],
        Duration::from_secs(60),
    )?;
    let env = r.grubenv_with(&["ORDER=B A", "B_OK=1", "B_TRY=0"])?;
    Ok(format!("closed/success \"{detail}\"; grubenv {env}"))
}

/// A slot that cannot boot: GRUB falls back to A, the agent reports the rollback.
fn rollback(r: &mut Rig) -> anyhow::Result<String> {
    r.first_boot()?;
    let id = r.upload_and_assign("broken.raucb", "2.0.1-broken")?;
    let t = r.wait_feedback(id, "rebooting into the new slot", Duration::from_secs(600))?;
    r.mark("reboot", t);
    r.vm.wait("HIL-GRUB: booting slot B", 1, Duration::from_secs(180))?;
    let (t, _) = r.vm.wait_any(
        &["HIL-BROKEN-INIT", "Kernel panic"],
        1,
        Duration::from_secs(300),
    )?;
    r.mark("b-fails", t);
    r.vm.wait(
        "HIL-GRUB: booting slot A (ORDER=B A",
        1,
        Duration::from_secs(180),
    )?;
    let (t, _) = r.vm.wait(
        "HIL-AGENT-READY slot=A version=1.0.0",
        2,
        Duration::from_secs(300),
    )?;
    r.mark("ready-a", t);
    let (finished, detail) = r.wait_closed(id, Duration::from_secs(300))?;
    ensure!(finished == "failure", "finished {finished}: {detail}");
    has(&detail, "rolled back: booted slot A again instead of B")?;
    // Still working on A: telemetry and attributes after the report.
    r.wait_attributes(
        &[
            ("sw_version", "1.0.0"),
            ("rauc_slot", "A"),
            ("ota_status", "failed"),
        ],
        Duration::from_secs(60),
    )?;
    let env = r.grubenv_with(&["ORDER=A B", "A_TRY=0", "B_OK=0"])?;
    Ok(format!("closed/failure \"{detail}\"; grubenv {env}"))
}

/// A slot that boots but fails the health check: marked bad, back to A, reported.
fn health(r: &mut Rig) -> anyhow::Result<String> {
    r.first_boot()?;
    let id = r.upload_and_assign("unhealthy.raucb", "2.0.2-unhealthy")?;
    r.vm.wait(
        "HIL-AGENT-READY slot=B version=2.0.2-unhealthy",
        1,
        Duration::from_secs(900),
    )?;
    let (t, _) =
        r.vm.wait("HIL-GRUB: booting slot A", 2, Duration::from_secs(300))?;
    r.mark("back-to-a", t);
    r.vm.wait(
        "HIL-AGENT-READY slot=A version=1.0.0",
        2,
        Duration::from_secs(300),
    )?;
    let (finished, detail) = r.wait_closed(id, Duration::from_secs(300))?;
    ensure!(finished == "failure", "finished {finished}: {detail}");
    has(&detail, "health checks failed on slot B")?;
    has(&detail, "database schema 7")?;
    r.wait_attributes(
        &[("sw_version", "1.0.0"), ("rauc_slot", "A")],
        Duration::from_secs(60),
    )?;
    let env = r.grubenv_with(&["ORDER=A B", "A_OK=1", "A_TRY=0", "B_OK=0"])?;
    Ok(format!("closed/failure \"{detail}\"; grubenv {env}"))
}

/// Power cuts (QEMU SIGKILLed) during the download and during the install.
fn powercut(r: &mut Rig) -> anyhow::Result<String> {
    r.first_boot()?;
    // Slow enough to cut in the middle: 96 MiB at 8 MiB/s.
    r.proxy.as_ref().unwrap().throttle(8 << 20);
    let id = r.upload_and_assign("good.raucb", "2.0.0")?;
    r.wait_feedback(id, "downloading: 30%", Duration::from_secs(300))?;
    r.vm.kill_hard()?;
    r.mark("cut-download", now());
    r.vm.power_on(false)?;
    // RAUC 1.8 reports 90 % ("Checking slot … done") and then writes the image, about 10 s
    // under TCG, before 100 %: cut in the middle of the write.
    r.wait_feedback(id, "installing: 90%", Duration::from_secs(600))?;
    std::thread::sleep(Duration::from_secs(4));
    ensure!(
        r.first_feedback(id, "installing: 100%")?.is_none(),
        "the install finished before the cut"
    );
    r.vm.kill_hard()?;
    r.mark("cut-install", now());
    r.vm.power_on(false)?;
    r.vm.wait(
        "HIL-AGENT-READY slot=B version=2.0.0",
        1,
        Duration::from_secs(900),
    )?;
    let (finished, detail) = r.wait_closed(id, Duration::from_secs(300))?;
    ensure!(finished == "success", "finished {finished}: {detail}");
    // The download resumed instead of starting over: less than 1.5 bundles crossed the link.
    let bundle_len = std::fs::metadata(r.out.join("bundles/good.raucb"))?.len();
    let down = r.proxy.as_ref().map_or(0, |p| p.down_bytes());
    ensure!(
        down < bundle_len * 3 / 2,
        "{down} bytes crossed the link for a {bundle_len}-byte bundle: the download started over"
    );
    let serial: String = r.vm.lines().into_iter().map(|(_, l)| l + "\n").collect();
    has(&serial, "installing again")?;
    let fb = r.feedback(id)?;
    let installs = fb.iter().filter(|f| f.3 == "installing").count();
    let completed = fb
        .iter()
        .filter(|f| f.3.starts_with("installing: 100%"))
        .count();
    ensure!(
        completed == 1,
        "one install must complete, {completed} did: {fb:?}"
    );
    // RAUC's own count of completed installs into B.
    let shell = r.vm.console(
        "rauc status --detailed --output-format=shell",
        Duration::from_secs(60),
    )?;
    let var = |k: &str| {
        shell.lines().find_map(|l| {
            l.trim()
                .strip_prefix(k)
                .map(|v| v.trim_matches(|c| c == '\'' || c == '"').to_string())
        })
    };
    let b = (1..=4)
        .find(|i| var(&format!("RAUC_SLOT_BOOTNAME_{i}=")).as_deref() == Some("B"))
        .with_context(|| format!("slot B in {shell}"))?;
    let count = var(&format!("RAUC_SLOT_STATUS_INSTALLED_COUNT_{b}="));
    let version = var(&format!("RAUC_SLOT_STATUS_BUNDLE_VERSION_{b}="));
    ensure!(
        count.as_deref() == Some("1") && version.as_deref() == Some("2.0.0"),
        "RAUC on B: installed count {count:?}, version {version:?}"
    );
    r.wait_attributes(
        &[("sw_version", "2.0.0"), ("rauc_slot", "B")],
        Duration::from_secs(60),
    )?;
    Ok(format!(
        "closed/success after 2 cuts; {:.0} MiB crossed the link for a {:.0} MiB bundle (resumed); \
         {installs} install starts, {completed} reached 100 %; RAUC: B installed count 1, version 2.0.0",
        down as f64 / 1048576.0,
        bundle_len as f64 / 1048576.0
    ))
}

/// The cross-compiled aarch64 agent on an emulated arm64 board.
fn arm64(p: &Paths) -> anyhow::Result<String> {
    let bin = std::env::var_os("HIL_ARM64_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            p.root
                .join("target/aarch64-unknown-linux-musl/release/thingsly-agent")
        });
    ensure!(
        bin.exists(),
        "{} missing (hil/run.sh builds it)",
        bin.display()
    );
    let dir = p.work.join("arm64");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        "[device]\nid = \"arm64-board\"\nstate_dir = \"/tmp/agent\"\n[enroll]\nserver_url = \"\"\n\
         [telemetry]\nenabled = false\n[tunnel]\nenabled = false\n[terminal]\nenabled = false\n\
         [ota]\nenabled = false\n",
    )?;
    let out = Command::new(p.root.join("hil/arm64-boot.sh"))
        .env("HIL_ARM64_OUT", &dir)
        .arg("--file")
        .arg(format!("{}:/bin/thingsly-agent", bin.display()))
        .arg("--file")
        .arg(format!("{}:/etc/agent.toml", cfg.display()))
        .args([
            "--run",
            "thingsly-agent --version",
            "--run",
            "thingsly-agent check-config --config /etc/agent.toml",
            "--run",
            "thingsly-agent --config /etc/agent.toml metrics --once --interval 1s",
        ])
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(dir.join("arm64.log"), &text)?;
    ensure!(out.status.success(), "arm64-boot.sh failed: {text}");
    let serial = std::fs::read_to_string(dir.join("serial.log")).unwrap_or_default();
    for want in [
        "HIL-ARM64-INIT",
        "aarch64",
        "HIL-ARM64-RUN-OK: thingsly-agent --version",
        "HIL-ARM64-RUN-OK: thingsly-agent check-config",
        "HIL-ARM64-RUN-OK: thingsly-agent --config /etc/agent.toml metrics",
        "ok (device arm64-board)",
        "mem,host=arm64-board",
        "cpu,cpu=cpu-total,host=arm64-board",
        // the board's two emulated cores, as /proc/cpuinfo on aarch64 lists them
        "n_cpus=2i",
    ] {
        has(&serial, want)?;
    }
    let version = serial
        .lines()
        .find(|l| l.starts_with("thingsly-agent "))
        .unwrap_or_default()
        .trim()
        .to_string();
    let points = serial
        .lines()
        .filter(|l| l.contains(",host=arm64-board"))
        .count();
    Ok(format!(
        "{version}; check-config ok; metrics --once: {points} points (aarch64 /proc, /sys)"
    ))
}

/// KVM only where it runs ordinary guests (a CPU with vmx/svm), as boot.sh decides.
fn kvm_usable() -> Result<(), String> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if !(cpu.contains(" vmx") || cpu.contains(" svm")) {
        return Err("no vmx/svm CPU flag (this /dev/kvm cannot run ordinary guests)".into());
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/kvm")
        .map(|_| ())
        .map_err(|e| format!("/dev/kvm: {e}"))
}

struct Row {
    name: String,
    ok: bool,
    secs: f64,
    detail: String,
}

fn run_x86(p: &Paths, name: &str) -> Row {
    let t0 = Instant::now();
    let accel = std::env::var("HIL_ACCEL").ok();
    let proxied = name == "powercut" || STREAM_SCENARIOS.contains(&name);
    let mut rig = match Rig::new(p, name, proxied, accel.as_deref()) {
        Ok(r) => r,
        Err(e) => {
            return Row {
                name: name.into(),
                ok: false,
                secs: t0.elapsed().as_secs_f64(),
                detail: format!("{e:#}"),
            };
        }
    };
    let r = match name {
        "update" => update(&mut rig),
        "rollback" => rollback(&mut rig),
        "health" => health(&mut rig),
        "powercut" => powercut(&mut rig),
        "download" => streaming::download(&mut rig),
        "stream" => streaming::stream(&mut rig),
        "adaptive" => streaming::adaptive(&mut rig),
        "adaptive-fallback" => streaming::adaptive_fallback(&mut rig),
        "stream-cuts" => streaming::cuts(&mut rig),
        "stream-powercut" => streaming::powercut(&mut rig),
        "stream-cap" => streaming::cap(&mut rig),
        _ => unreachable!(),
    };
    let ok = r.is_ok();
    let detail = match r {
        Ok(d) => d,
        Err(e) => format!(
            "{e:#} (logs: {}: serial.log, bridge/bridge-*.log, mqtt.log)",
            rig.dir.display()
        ),
    };
    rig.finish(ok);
    Row {
        name: name.into(),
        ok,
        secs: t0.elapsed().as_secs_f64(),
        detail,
    }
}

/// Baseline for the agent's download: curl in the guest fetches the same artifact over the
/// same forwarded port with the device's certificate (mTLS), after the update.
fn curl_download_secs(r: &mut Rig) -> anyhow::Result<f64> {
    let url = format!(
        "https://{GUEST_ADDR}:{BRIDGE_GUEST_PORT}/DEFAULT/controller/v1/{DEVICE}/softwaremodules/{}/artifacts/good.raucb",
        r.module
    );
    let id = "/data/thingsly-agent/identity";
    let out = r.vm.console(
        &format!(
            "curl -sS -o /dev/null -w 'CURL-SECS=%{{time_total}}\\n' --cacert /etc/thingsly/bridge-ca.pem \
             --cert {id}/device.crt --key {id}/device.key '{url}'"
        ),
        Duration::from_secs(300),
    )?;
    out.lines()
        .find_map(|l| l.trim().strip_prefix("CURL-SECS="))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("curl in the guest: {out}"))
}

fn bench(p: &Paths) -> anyhow::Result<()> {
    println!(
        "| accel | boot → systemd up (baseline) | boot → agent ready | download 96 MiB: agent | same file: curl in the guest (baseline) | install | reboot → ready on B | verify → success | update total |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for accel in ["kvm", "tcg"] {
        if accel == "kvm"
            && let Err(why) = kvm_usable()
        {
            println!("| kvm | n/a: {why} | | | | | | | |");
            continue;
        }
        let mut rig = Rig::new(p, &format!("bench-{accel}"), false, Some(accel))?;
        let r = update(&mut rig);
        let curl = match &r {
            Ok(_) => curl_download_secs(&mut rig)
                .map_or_else(|e| format!("failed: {e:#}"), |s| format!("{s:.1} s")),
            Err(_) => String::new(),
        };
        let m = |k: &str| {
            rig.marks
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, t)| *t)
                .unwrap_or(f64::NAN)
        };
        match r {
            Ok(_) => println!(
                "| {accel} | {:.1} s | {:.1} s | {:.1} s | {curl} | {:.1} s | {:.1} s | {:.1} s | {:.1} s |",
                m("booted") - m("power-on"),
                m("agent-ready") - m("power-on"),
                m("install") - m("download"),
                m("reboot") - m("install"),
                m("ready-b") - m("reboot"),
                m("closed") - m("ready-b"),
                m("closed") - m("assigned"),
            ),
            Err(e) => println!("| {accel} | failed: {e:#} | | | | | | | |"),
        }
        rig.finish(true);
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let p = paths();
    std::fs::create_dir_all(&p.work)?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("bench") {
        return bench(&p);
    }
    let mut names = Vec::new();
    for a in if args.is_empty() {
        vec!["all".to_string()]
    } else {
        args
    } {
        match a.as_str() {
            "ci" => names.extend(["update", "rollback", "arm64"]),
            "all" => names.extend(SCENARIOS),
            "streaming" => names.extend(STREAM_SCENARIOS),
            s if SCENARIOS.contains(&s) => names.extend(SCENARIOS.iter().filter(|n| **n == s)),
            s if STREAM_SCENARIOS.contains(&s) => {
                names.extend(STREAM_SCENARIOS.iter().filter(|n| **n == s))
            }
            other => bail!(
                "unknown scenario {other:?} (update, rollback, health, powercut, arm64, ci, all, {}, streaming, bench)",
                STREAM_SCENARIOS.join(", ")
            ),
        }
    }
    let mut rows = Vec::new();
    for n in names {
        eprintln!("thingsly-hil: {n} ...");
        let row = if n == "arm64" {
            let t0 = Instant::now();
            let r = arm64(&p);
            Row {
                name: n.into(),
                ok: r.is_ok(),
                secs: t0.elapsed().as_secs_f64(),
                detail: r.unwrap_or_else(|e| format!("{e:#}")),
            }
        } else {
            run_x86(&p, n)
        };
        eprintln!(
            "thingsly-hil: {n} {} in {:.0} s",
            if row.ok { "PASS" } else { "FAIL" },
            row.secs
        );
        rows.push(row);
    }
    println!("\n| scenario | result | time | detail |\n| --- | --- | --- | --- |");
    for r in &rows {
        println!(
            "| {} | {} | {:.0} s | {} |",
            r.name,
            if r.ok { "PASS" } else { "FAIL" },
            r.secs,
            r.detail.replace('|', "\\|")
        );
    }
    let failed = rows.iter().filter(|r| !r.ok).count();
    if failed > 0 {
        eprintln!("thingsly-hil: {failed} scenario(s) failed");
        std::process::exit(1);
    }
    Ok(())
}
