//! A real InfluxDB 1.x (Debian's `influxdb`, `influxd`) on loopback ports of its own, with
//! optional authentication, optionally inside a network namespace. Queried with `curl`.

use crate::{Proc, free_port, wait_for};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub const ADMIN: (&str, &str) = ("admin", "admin-pw");

pub struct Influx {
    pub dir: PathBuf,
    pub port: u16,
    pub auth: bool,
    /// `ip netns exec NAME` prefix when it runs inside a namespace.
    pub netns: Option<String>,
    pub proc: Option<Proc>,
}

impl Influx {
    /// Write the config; `start` runs it. Data survives `stop`/`start`.
    pub fn new(dir: &Path, auth: bool, netns: Option<&str>) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        // Inside a fresh namespace every port is free; outside, ask the kernel.
        let (port, rpc) = match netns {
            Some(_) => (8086, 8088),
            None => (free_port(), free_port()),
        };
        std::fs::write(
            dir.join("influxdb.conf"),
            format!(
                "reporting-disabled = true\nreporting-enabled = false\nbind-address = \"127.0.0.1:{rpc}\"\n\
                 [meta]\n  dir = \"{d}/meta\"\n\
                 [data]\n  dir = \"{d}/data\"\n  wal-dir = \"{d}/wal\"\n  query-log-enabled = false\n\
                 [monitor]\n  store-enabled = false\n\
                 [http]\n  enabled = true\n  bind-address = \"127.0.0.1:{port}\"\n  auth-enabled = {auth}\n  log-enabled = true\n  pprof-enabled = false\n\
                 [ifql]\n  enabled = false\n",
                d = dir.display()
            ),
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
            port,
            auth,
            netns: netns.map(String::from),
            proc: None,
        })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        }
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        let mut cmd = self.command("influxd");
        cmd.args(["run", "-config"])
            .arg(self.dir.join("influxdb.conf"));
        let n = std::fs::read_dir(&self.dir)?.count();
        self.proc = Some(Proc::spawn(
            &mut cmd,
            self.dir.join(format!("influxd-{n}.log")),
        )?);
        wait_for("influxd /ping", Duration::from_secs(30), || {
            self.curl(&[
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("{}/ping", self.url()),
            ])
            .is_some_and(|s| s == "204")
        });
        Ok(())
    }

    /// SIGTERM; only the process this harness started.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate();
        }
    }

    fn curl(&self, args: &[&str]) -> Option<String> {
        let out = self.command("curl").arg("-sS").args(args).output().ok()?;
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `/query` as the admin (when auth is on); the JSON answer.
    pub fn query(&self, db: &str, q: &str) -> serde_json::Value {
        let url = format!("{}/query", self.url());
        let dbp = format!("db={db}");
        let qp = format!("q={q}");
        let user = format!("{}:{}", ADMIN.0, ADMIN.1);
        let mut args = vec![
            "-XPOST",
            &url,
            "--data-urlencode",
            &dbp,
            "--data-urlencode",
            &qp,
        ];
        if self.auth {
            args.extend(["-u", &user]);
        }
        let text = self.curl(&args).unwrap_or_default();
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
    }

    /// Rows of the first series of a query: each row is its values.
    pub fn rows(&self, db: &str, q: &str) -> Vec<Vec<serde_json::Value>> {
        let v = self.query(db, q);
        let mut out = Vec::new();
        for s in v["results"][0]["series"].as_array().into_iter().flatten() {
            for row in s["values"].as_array().into_iter().flatten() {
                out.push(row.as_array().cloned().unwrap_or_default());
            }
        }
        out
    }

    /// Write raw line protocol (precision s) as the admin; (HTTP status, body).
    pub fn write(&self, db: &str, lines: &str) -> (String, String) {
        let url = format!("{}/write?db={db}&precision=s", self.url());
        let user = format!("{}:{}", ADMIN.0, ADMIN.1);
        let body_file = self.dir.join("write-body.txt");
        let _ = std::fs::write(&body_file, lines);
        let data = format!("@{}", body_file.display());
        let mut args = vec![
            "-w",
            "\n%{http_code}",
            "-XPOST",
            &url,
            "--data-binary",
            &data,
        ];
        if self.auth {
            args.extend(["-u", &user]);
        }
        let text = self.curl(&args).unwrap_or_default();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
        (code.to_string(), body.to_string())
    }

    /// With auth on: the admin, database `db` and a write-only user.
    pub fn create_writer(&self, db: &str, user: &str, password: &str) {
        for q in [
            format!(
                "CREATE USER {} WITH PASSWORD '{}' WITH ALL PRIVILEGES",
                ADMIN.0, ADMIN.1
            ),
            format!("CREATE DATABASE \"{db}\""),
            format!("CREATE USER {user} WITH PASSWORD '{password}'"),
            format!("GRANT WRITE ON \"{db}\" TO {user}"),
        ] {
            let v = self.query("", &q);
            assert!(
                v["results"][0]["error"].is_null() && v["error"].is_null(),
                "{q}: {v}"
            );
        }
    }

    pub fn log_text(&self) -> String {
        self.proc.as_ref().map(|p| p.log_text()).unwrap_or_default()
    }
}

impl Drop for Influx {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A network namespace of our own with loopback up; deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let name = format!("tm-{tag}-{}", std::process::id());
        run(&["ip", "netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME …`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }
}

impl Netns {
    /// Run `f` on a thread inside this namespace: sockets it creates (listeners, client
    /// connections, a runtime's whole I/O) belong to the namespace for their whole life.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                enter_netns(&self.name);
                f()
            })
            .join()
            .unwrap()
        })
    }

    /// `ip netns exec NAME argv…`, its stdout; an error with stderr if it fails.
    pub fn exec(&self, argv: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "{argv:?} in {}: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Move the calling thread into network namespace `name` (for good: use a thread of its own).
pub fn enter_netns(name: &str) {
    let ns = std::fs::File::open(format!("/var/run/netns/{name}")).unwrap();
    rustix::thread::move_into_link_name_space(
        std::os::fd::AsFd::as_fd(&ns),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .unwrap();
}

/// Two namespaces joined by a veth pair: `server` 192.0.2.1/24, `device` 192.0.2.2/24 (the
/// documentation range; nothing leaves the machine).
pub struct VethPair {
    pub server: Netns,
    pub device: Netns,
}

impl VethPair {
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let server = Netns::new(&format!("{tag}s"))?;
        let device = Netns::new(&format!("{tag}d"))?;
        run(&[
            "ip",
            "link",
            "add",
            "veth0",
            "netns",
            &device.name,
            "type",
            "veth",
            "peer",
            "name",
            "veth0",
            "netns",
            &server.name,
        ])?;
        server.ip(&["addr", "add", "192.0.2.1/24", "dev", "veth0"])?;
        device.ip(&["addr", "add", "192.0.2.2/24", "dev", "veth0"])?;
        server.ip(&["link", "set", "veth0", "up"])?;
        device.ip(&["link", "set", "veth0", "up"])?;
        Ok(Self { server, device })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}

pub fn run(argv: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(argv[0]).args(&argv[1..]).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
