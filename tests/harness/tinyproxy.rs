//! Debian's tinyproxy as the HTTP proxy a corporate network puts between a device and its
//! servers: CONNECT for TLS destinations, forwarding for plain http, optional Basic auth
//! (407 without it). Its own log is the test's witness of what crossed it, not the agent's
//! word. Started in the foreground (`-d`), stopped on drop (only this process).

use crate::Proc;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub struct Tinyproxy {
    pub dir: PathBuf,
    /// `host:port` it listens on.
    pub listen: String,
    proc: Option<Proc>,
}

impl Tinyproxy {
    /// Listen on `host:port`, inside `netns` when given; `user:password` required when given.
    pub fn start(
        dir: &Path,
        netns: Option<&str>,
        host: &str,
        port: u16,
        credentials: Option<(&str, &str)>,
    ) -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir)?;
        // tinyproxy started as root keeps running as root only with a warning; its log must
        // be writable whatever user it ends up as.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))?;
        let auth = credentials
            .map(|(u, p)| format!("BasicAuth {u} {p}\n"))
            .unwrap_or_default();
        // No ConnectPort line: CONNECT to any port (the servers' test ports); no Allow line:
        // any client address.
        std::fs::write(
            dir.join("tinyproxy.conf"),
            format!(
                "Port {port}\nListen {host}\nTimeout 60\nMaxClients 64\nLogLevel Info\n\
                 LogFile \"{}\"\nDisableViaHeader Yes\n{auth}",
                dir.join("tinyproxy.log").display()
            ),
        )?;
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "tinyproxy"]);
                c
            }
            None => Command::new("tinyproxy"),
        };
        cmd.arg("-d").arg("-c").arg(dir.join("tinyproxy.conf"));
        let proc = Proc::spawn(&mut cmd, dir.join("tinyproxy-stdout.log"))?;
        let me = Self {
            dir: dir.to_path_buf(),
            listen: format!("{host}:{port}"),
            proc: Some(proc),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !me.log().contains("Starting main loop") {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "tinyproxy did not start: {}{}",
                me.log(),
                me.proc.as_ref().map(Proc::log_text).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(me)
    }

    /// `http://host:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.listen)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("tinyproxy.log")).unwrap_or_default()
    }

    /// The request lines it received (`CONNECT 127.0.0.1:8443 HTTP/1.1`, `POST http://…`).
    pub fn requests(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter_map(|l| l.split_once("): ").map(|(_, r)| r))
            .filter(|r| r.ends_with("HTTP/1.1") || r.ends_with("HTTP/1.0"))
            .map(String::from)
            .collect()
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.terminate();
        }
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        self.stop();
    }
}
