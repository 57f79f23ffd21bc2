//! Test harness: starts the real `thingsly-bridge`, a real Mosquitto with mutual TLS and the
//! real `thingsly-agent` as processes on loopback, each on its own free port and directory,
//! and stops only the processes it started (on drop).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

pub mod hawkbit_mgmt;
mod https;
mod idp;
mod influx;
pub mod proxy;
pub mod rauc;
pub mod step_ca;
pub mod tinyproxy;
pub mod ttyd;
pub use idp::{Idp, Operators, SigningKey};
pub use influx::{Influx, Netns, VethPair, enter_netns, run};

use anyhow::{Context, bail};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A built binary: beside the running executable (a benchmark in target/release uses the
/// release bridge next to it), else in target/debug (`cargo build --bins`; scripts/test.sh does).
pub fn bin(name: &str) -> PathBuf {
    if let Some(p) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(name)))
        .filter(|p| p.exists())
    {
        return p;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let p = target.join("debug").join(name);
    assert!(
        p.exists(),
        "{} missing: run `cargo build --bins` first (scripts/test.sh does)",
        p.display()
    );
    p
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

fn wait_port(port: u16, timeout: Duration) {
    wait_for(&format!("port {port}"), timeout, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
}

/// A child process killed on drop.
pub struct Proc {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(cmd: &mut Command, log: PathBuf) -> anyhow::Result<Self> {
        let out = std::fs::File::create(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("{cmd:?}"))?;
        Ok(Self {
            child: Some(child),
            log,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY-free: libc::kill on our own child's pid.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    /// SIGTERM and wait; returns the exit status and how long it took.
    pub fn terminate(&mut self) -> (Option<std::process::ExitStatus>, Duration) {
        let start = Instant::now();
        self.signal(libc::SIGTERM);
        let mut status = None;
        if let Some(c) = self.child.as_mut() {
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end {
                if let Ok(Some(s)) = c.try_wait() {
                    status = Some(s);
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if status.is_none() {
            self.kill();
        }
        self.child = None;
        (status, start.elapsed())
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An initialised bridge serving on a free port.
pub struct Bridge {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub port: u16,
    pub proc: Option<Proc>,
    /// Serve inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
    /// The address it listens on and puts in its certificate.
    pub host: String,
    /// A command `serve` runs under (e.g. `prlimit --nofile=1024:1024`).
    pub prefix: Vec<String>,
}

impl Bridge {
    pub fn init(dir: &Path) -> anyhow::Result<Self> {
        Self::init_with(dir, "")
    }

    /// `extra` is appended to the generated bridge.toml (e.g. a `[wireguard]` pool). The
    /// WireGuard hub is off unless `extra` sets `mode` (a hub would create an interface with a
    /// tunnel address in the test's own network namespace).
    pub fn init_with(dir: &Path, extra: &str) -> anyhow::Result<Self> {
        Self::init_at(dir, "127.0.0.1", extra)
    }

    /// A bridge listening on `host` (an address inside a test's network namespace).
    pub fn init_at(dir: &Path, host: &str, extra: &str) -> anyhow::Result<Self> {
        Self::init_custom(dir, host, &[], extra, &[])
    }

    /// The general form: `names` go into the server certificate besides localhost, 127.0.0.1
    /// and `host`; `init_args` are given to `thingsly-bridge init` (e.g. `--import-root-cert`).
    pub fn init_custom(
        dir: &Path,
        host: &str,
        names: &[&str],
        extra: &str,
        init_args: &[&str],
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let port = free_port();
        let config = dir.join("bridge.toml");
        let extra = if extra.contains("mode =") {
            extra.to_string()
        } else if extra.contains("[wireguard]\n") {
            extra.replace("[wireguard]\n", "[wireguard]\nmode = \"off\"\n")
        } else {
            format!("{extra}\n[wireguard]\nmode = \"off\"\n")
        };
        std::fs::write(
            &config,
            format!(
                "data_dir = \"{}\"\nlisten = \"{host}:{port}\"\nserver_names = [\"localhost\", \"127.0.0.1\", \"{host}\"{}]\n{extra}\n",
                dir.join("data").display(),
                names
                    .iter()
                    .map(|n| format!(", \"{n}\""))
                    .collect::<String>()
            ),
        )?;
        let b = Self {
            dir: dir.to_path_buf(),
            config,
            port,
            proc: None,
            netns: None,
            host: host.to_string(),
            prefix: Vec::new(),
        };
        let mut init = vec!["init"];
        init.extend_from_slice(init_args);
        b.cli(&init)?;
        Ok(b)
    }

    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(bin("thingsly-bridge"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "thingsly-bridge {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ota upload BUNDLE --name NAME --version VERSION`: the module as the CLI prints it
    /// (`id`, `filename`, ...).
    pub fn ota_upload(
        &self,
        bundle: &Path,
        name: &str,
        version: &str,
    ) -> anyhow::Result<serde_json::Value> {
        let bundle = bundle.to_str().context("bundle path is not UTF-8")?;
        let out = self.cli(&[
            "ota",
            "upload",
            bundle,
            "--name",
            name,
            "--version",
            version,
        ])?;
        Ok(serde_json::from_str(&out)?)
    }

    /// `ota assign --module MODULE ARGS...` (`--device`, `--group`, `--type`, ...): the actions
    /// it created, a JSON array.
    pub fn ota_assign(&self, module: i64, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let m = module.to_string();
        let mut all = vec!["ota", "assign", "--module", &m];
        all.extend_from_slice(args);
        Ok(serde_json::from_str(&self.cli(&all)?)?)
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin("thingsly-bridge"));
                c
            }
            None if !self.prefix.is_empty() => {
                let mut c = Command::new(&self.prefix[0]);
                c.args(&self.prefix[1..]).arg(bin("thingsly-bridge"));
                c
            }
            None => Command::new(bin("thingsly-bridge")),
        };
        cmd.arg("--config").arg(&self.config).arg("serve");
        let n = std::fs::read_dir(&self.dir)?.count();
        let log = self.dir.join(format!("bridge-{n}.log"));
        self.proc = Some(Proc::spawn(&mut cmd, log)?);
        if self.netns.is_some() {
            let p = self.proc.as_ref().unwrap();
            wait_for("bridge serving", Duration::from_secs(10), || {
                p.log_text().contains("thingsly-bridge serving")
            });
        } else {
            wait_port(self.port, Duration::from_secs(10));
        }
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("https://{}:{}", self.host, self.port)
    }

    /// The current `serve` process's log (empty before `start`).
    pub fn log_text(&self) -> String {
        self.proc.as_ref().map(Proc::log_text).unwrap_or_default()
    }

    /// An HTTPS client that trusts this bridge's CA (no client certificate).
    pub fn http(&self) -> anyhow::Result<reqwest::Client> {
        let tls = thingsly_enroll::client_config(&std::fs::read(self.ca_chain())?, None)
            .map_err(anyhow::Error::msg)?;
        Ok(reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .build()?)
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn ca_chain(&self) -> PathBuf {
        self.data().join("ca/chain.pem")
    }

    pub fn fleet_token(&self) -> String {
        std::fs::read_to_string(self.data().join("fleet-token"))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data().join("admin-token"))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// A client certificate (leaf + chain) and key from the bridge's issuing CA.
    pub fn client_cert(&self, cn: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        let crt = self.dir.join(format!("{cn}.crt"));
        let key = self.dir.join(format!("{cn}.key"));
        self.cli(&[
            "issue-client-cert",
            "--cn",
            cn,
            "--out-cert",
            crt.to_str().unwrap_or_default(),
            "--out-key",
            key.to_str().unwrap_or_default(),
        ])?;
        Ok((crt, key))
    }
}

/// Mosquitto with `require_certificate true`, trusting the bridge's CA.
pub struct Broker {
    pub dir: PathBuf,
    pub port: u16,
    pub proc: Option<Proc>,
    /// Serve inside this network namespace (on its own 127.0.0.1).
    pub netns: Option<String>,
}

impl Broker {
    pub fn new(bridge: &Bridge, dir: &Path) -> anyhow::Result<Self> {
        Self::with_names(bridge, dir, &[])
    }

    /// `names`: more DNS names or addresses in its certificate (e.g. the address a VM uses).
    pub fn with_names(bridge: &Bridge, dir: &Path, names: &[&str]) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let port = free_port();
        let crt = dir.join("server.crt");
        let key = dir.join("server.key");
        let mut args = vec![
            "issue-server-cert",
            "--name",
            "localhost",
            "--name",
            "127.0.0.1",
        ];
        for n in names {
            args.extend_from_slice(&["--name", n]);
        }
        args.extend_from_slice(&[
            "--out-cert",
            crt.to_str().unwrap_or_default(),
            "--out-key",
            key.to_str().unwrap_or_default(),
        ]);
        bridge.cli(&args)?;
        std::fs::copy(bridge.ca_chain(), dir.join("ca.pem"))?;
        // Mosquitto started as root drops to its own user: it must read these test files.
        use std::os::unix::fs::PermissionsExt;
        for p in [dir.to_path_buf(), dir.join("persist")] {
            std::fs::create_dir_all(&p)?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777))?;
        }
        for f in ["server.crt", "server.key", "ca.pem"] {
            std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644))?;
        }
        let mut parent = dir.parent();
        while let Some(p) = parent {
            if p == Path::new("/") || p == Path::new("/tmp") {
                break;
            }
            let mode = std::fs::metadata(p)?.permissions().mode();
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode | 0o711))?;
            parent = p.parent();
        }
        std::fs::write(
            dir.join("mosquitto.conf"),
            format!(
                "per_listener_settings false\n\
                 persistence true\npersistence_location {}/\n\
                 allow_anonymous false\nlog_dest stdout\nconnection_messages true\n\
                 listener {port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n\
                 require_certificate true\nuse_identity_as_username true\n",
                dir.join("persist").display(),
                dir.join("ca.pem").display(),
                crt.display(),
                key.display()
            ),
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
            port,
            proc: None,
            netns: None,
        })
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "/usr/sbin/mosquitto"]);
                c
            }
            None => Command::new("/usr/sbin/mosquitto"),
        };
        cmd.arg("-c").arg(self.dir.join("mosquitto.conf"));
        let n = std::fs::read_dir(&self.dir)?.count();
        self.proc = Some(Proc::spawn(
            &mut cmd,
            self.dir.join(format!("mosquitto-{n}.log")),
        )?);
        match &self.netns {
            Some(ns) => {
                let (ns, port) = (ns.clone(), self.port);
                std::thread::spawn(move || {
                    enter_netns(&ns);
                    wait_port(port, Duration::from_secs(10));
                })
                .join()
                .map_err(|_| anyhow::anyhow!("mosquitto did not listen on {port}"))?;
            }
            None => wait_port(self.port, Duration::from_secs(10)),
        }
        Ok(())
    }

    /// Mosquitto's log (connections and disconnections, with reasons).
    pub fn log_text(&self) -> String {
        self.proc.as_ref().map(Proc::log_text).unwrap_or_default()
    }

    /// Clean stop (SIGTERM: persistent sessions are saved).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate();
        }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
}

/// Options for an agent config.
pub struct AgentOpts {
    pub device_id: String,
    pub server_url: String,
    pub token: String,
    pub ca_bundle: PathBuf,
    /// The broker `[telemetry]` connects to (127.0.0.1 unless it is in another namespace).
    pub mqtt_host: String,
    pub mqtt_port: u16,
    pub interval: String,
    pub spool_max_messages: usize,
    /// Extra lines inside `[enroll]` (e.g. `renew_fraction = 0.5`).
    pub enroll_extra: String,
    /// Extra lines inside `[telemetry]`.
    pub telemetry_extra: String,
    pub rauc_enabled: bool,
    /// The WireGuard tunnel module (off by default: it would create an interface with a
    /// tunnel address in the test's own network namespace). Lines inside `[tunnel]` follow.
    pub tunnel: Option<String>,
    /// Extra sections at the end of the file.
    pub extra: String,
    /// `[commands] reboot` (a TOML array).
    pub reboot: String,
}

impl Default for AgentOpts {
    fn default() -> Self {
        Self {
            device_id: "dev-test".into(),
            server_url: format!("https://127.0.0.1:{}", free_port()),
            token: "unused".into(),
            ca_bundle: PathBuf::from("/nonexistent/ca.pem"),
            mqtt_host: "127.0.0.1".into(),
            mqtt_port: free_port(),
            interval: "1s".into(),
            spool_max_messages: 10_000,
            enroll_extra: String::new(),
            telemetry_extra: String::new(),
            rauc_enabled: false,
            tunnel: None,
            extra: String::new(),
            reboot: "[\"true\"]".into(),
        }
    }
}

pub struct Agent {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub proc: Option<Proc>,
    /// Environment for `run` and subcommands (e.g. DBUS_SYSTEM_BUS_ADDRESS, NOTIFY_SOCKET).
    pub env: Vec<(String, String)>,
    /// Run `run` and subcommands inside this network namespace.
    pub netns: Option<String>,
    /// argv put in front of the agent binary for `run` (e.g. `setpriv …` to drop a capability).
    pub wrapper: Vec<String>,
}

impl Agent {
    pub fn new(dir: &Path, o: &AgentOpts) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "[device]\nid = \"{}\"\nstate_dir = \"{}\"\nruntime_dir = \"{}\"\nsw_version = \"1.0.0\"\n\n\
                 [enroll]\nserver_url = \"{}\"\nca_bundle = \"{}\"\nbootstrap_token = \"{}\"\ntimeout = \"5s\"\n{}\n\n\
                 [telemetry]\nhost = \"{}\"\nport = {}\ninterval = \"{}\"\nspool_max_messages = {}\n{}\n\n\
                 [rauc]\nenabled = {}\n\n[commands]\nreboot = {}\n\n[tunnel]\nenabled = {}\n{}\n{}\n",
                o.device_id,
                dir.join("state").display(),
                dir.join("run").display(),
                o.server_url,
                o.ca_bundle.display(),
                o.token,
                o.enroll_extra,
                o.mqtt_host,
                o.mqtt_port,
                o.interval,
                o.spool_max_messages,
                o.telemetry_extra,
                o.rauc_enabled,
                o.reboot,
                o.tunnel.is_some(),
                o.tunnel.as_deref().unwrap_or_default(),
                o.extra,
            ),
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            proc: None,
            env: Vec::new(),
            netns: None,
            wrapper: Vec::new(),
        })
    }

    fn command(&self) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin("thingsly-agent"));
                c
            }
            None => Command::new(bin("thingsly-agent")),
        }
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        let mut cmd = if self.wrapper.is_empty() {
            self.command()
        } else {
            let mut argv: Vec<String> = Vec::new();
            if let Some(ns) = &self.netns {
                argv.extend(["ip", "netns", "exec", ns].map(String::from));
            }
            argv.extend(self.wrapper.iter().cloned());
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]).arg(bin("thingsly-agent"));
            c
        };
        cmd.arg("--config")
            .arg(&self.config)
            .arg("run")
            .env("RUST_LOG", "info");
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let n = std::fs::read_dir(&self.dir)?.count();
        self.proc = Some(Proc::spawn(
            &mut cmd,
            self.dir.join(format!("agent-{n}.log")),
        )?);
        Ok(())
    }

    /// Run a one-shot subcommand: (success, stdout, stderr).
    pub fn cmd(&self, args: &[&str]) -> (bool, String, String) {
        let out = self
            .command()
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run thingsly-agent");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// `status --json`.
    pub fn status(&self) -> serde_json::Value {
        let (_, out, _) = self.cmd(&["status", "--json"]);
        serde_json::from_str(&out).unwrap_or_default()
    }

    pub fn telemetry_counter(&self, name: &str) -> u64 {
        self.status()["state"]["modules"]["telemetry"]["counters"][name]
            .as_u64()
            .unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        self.proc.as_ref().map(|p| p.log_text()).unwrap_or_default()
    }
}

/// A real MQTT client (rumqttc over mTLS) that records what it receives.
pub struct Observer {
    pub client: rumqttc::AsyncClient,
    pub rx: tokio::sync::mpsc::UnboundedReceiver<(String, serde_json::Value)>,
    pub errors: tokio::sync::mpsc::UnboundedReceiver<String>,
    ready: tokio::sync::watch::Receiver<bool>,
}

pub fn mqtt_tls(ca: &Path, cert: &Path, key: &Path) -> anyhow::Result<rumqttc::TlsConfiguration> {
    let cfg = thingsly_enroll::client_config(
        &std::fs::read(ca)?,
        Some((&std::fs::read(cert)?, &std::fs::read(key)?)),
    )
    .map_err(anyhow::Error::msg)?;
    Ok(rumqttc::TlsConfiguration::Rustls(Arc::new(cfg)))
}

impl Observer {
    /// Connect with a persistent session (survives a broker restart) and subscribe to `filter`.
    pub fn start(port: u16, tls: rumqttc::TlsConfiguration, client_id: &str, filter: &str) -> Self {
        let mut opts = rumqttc::MqttOptions::new(client_id, "127.0.0.1", port);
        opts.set_clean_session(false);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_transport(rumqttc::Transport::tls_with_config(tls));
        let (client, mut events) = rumqttc::AsyncClient::new(opts, 100);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (etx, errors) = tokio::sync::mpsc::unbounded_channel();
        let (ready_tx, ready) = tokio::sync::watch::channel(false);
        let c2 = client.clone();
        let filter = filter.to_string();
        tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack))) => {
                        if ack.session_present {
                            let _ = ready_tx.send(true);
                        } else {
                            let _ = c2
                                .subscribe(filter.clone(), rumqttc::QoS::AtLeastOnce)
                                .await;
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        let _ = ready_tx.send(true);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let v =
                            serde_json::from_slice(&p.payload).unwrap_or(serde_json::Value::Null);
                        if tx.send((p.topic.clone(), v)).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = etx.send(e.to_string());
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        Self {
            client,
            rx,
            errors,
            ready,
        }
    }

    /// Wait until the subscription is in place.
    pub async fn wait_ready(&mut self) {
        let r = tokio::time::timeout(Duration::from_secs(15), self.ready.wait_for(|r| *r)).await;
        assert!(
            matches!(r, Ok(Ok(_))),
            "observer did not subscribe within 15 s"
        );
    }

    /// Next message on a topic matching `pred`, within `timeout`.
    pub async fn next_where(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&str, &serde_json::Value) -> bool,
    ) -> (String, serde_json::Value) {
        let end = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(end, self.rx.recv()).await {
                Ok(Some((t, v))) if pred(&t, &v) => return (t, v),
                Ok(Some(_)) => continue,
                _ => panic!("no matching MQTT message within {timeout:?}"),
            }
        }
    }
}

/// A fresh WireGuard public key (base64), as a device would make.
/// A PEM CSR with CN = `cn`, signed by `kp`, as a device would send it.
pub fn csr_pem(cn: &str, kp: &rcgen::KeyPair) -> String {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.serialize_request(kp)
        .and_then(|r| r.pem())
        .unwrap_or_else(|e| panic!("CSR for {cn}: {e}"))
}

pub fn wg_public_key() -> String {
    use base64::Engine;
    let secret = x25519_dalek::StaticSecret::random_from_rng(rand_core::OsRng);
    base64::engine::general_purpose::STANDARD
        .encode(x25519_dalek::PublicKey::from(&secret).as_bytes())
}
