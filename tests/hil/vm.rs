//! One QEMU machine of the HIL image, driven through `hil/boot.sh` (which powers it on again
//! after every guest reboot), read through its serial log with host timestamps.

use anyhow::{Context, bail, ensure};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub struct Vm {
    pub run: PathBuf,
    boot_sh: PathBuf,
    /// The image directory (`disk.img`), given to boot.sh as `HIL_OUT`.
    image: PathBuf,
    /// `--fwd GUEST:HOST` pairs and `--accel`, kept for power-on after a hard kill.
    args: Vec<String>,
    console_seq: u32,
}

/// Host time (Unix seconds) of a serial line, and the line.
pub type Line = (f64, String);

impl Vm {
    /// `image`: the directory with `disk.img` (boot.sh's `HIL_OUT`).
    pub fn new(
        run: &Path,
        hil_dir: &Path,
        image: &Path,
        fwds: &[(u16, u16)],
        accel: Option<&str>,
    ) -> Self {
        let mut args = Vec::new();
        for (g, h) in fwds {
            args.push("--fwd".into());
            args.push(format!("{g}:{h}"));
        }
        if let Some(a) = accel {
            args.push("--accel".into());
            args.push(a.into());
        }
        Self {
            run: run.to_path_buf(),
            boot_sh: hil_dir.join("boot.sh"),
            image: image.to_path_buf(),
            args,
            console_seq: 0,
        }
    }

    fn boot_sh(&self, args: &[&str]) -> anyhow::Result<()> {
        // Output to a file, not a pipe: `start` leaves QEMU's supervisor running with it.
        let log = self.run.join("boot.out");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let status = Command::new(&self.boot_sh)
            .args(args)
            .env("HIL_OUT", &self.image)
            .stdin(std::process::Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .status()
            .context("hil/boot.sh")?;
        if !status.success() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            bail!(
                "boot.sh {args:?}: {}",
                text.lines().last().unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Power on: `fresh` makes a new overlay on the base image (a factory-new device).
    pub fn power_on(&self, fresh: bool) -> anyhow::Result<()> {
        let run = self.run.to_string_lossy().to_string();
        let mut args = vec!["start", run.as_str()];
        if fresh {
            args.push("--fresh");
        }
        args.extend(self.args.iter().map(String::as_str));
        // boot.sh start truncates serial.log: keep what earlier power-ons printed.
        let log = self.run.join("serial.ts.log");
        if log.exists() {
            let keep = self.run.join("serial.before.log");
            let mut all = std::fs::read(&keep).unwrap_or_default();
            all.extend(std::fs::read(&log)?);
            std::fs::write(keep, all)?;
        }
        self.boot_sh(&args)
    }

    /// Pull the plug: SIGKILL to QEMU (the supervisor then exits, as after a crash).
    pub fn kill_hard(&self) -> anyhow::Result<()> {
        let pid = std::fs::read_to_string(self.run.join("qemu.pid")).context("qemu.pid")?;
        let status = Command::new("kill").args(["-KILL", pid.trim()]).status()?;
        ensure!(status.success(), "kill -KILL {}", pid.trim());
        let sup = std::fs::read_to_string(self.run.join("supervisor.pid")).unwrap_or_default();
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if !Path::new("/proc").join(sup.trim()).exists() || sup.trim().is_empty() {
                // The log follower ends with the supervisor; let it flush.
                std::thread::sleep(Duration::from_millis(300));
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("QEMU supervisor still running after SIGKILL to QEMU")
    }

    pub fn stop(&self) {
        let _ = self.boot_sh(&["stop", &self.run.to_string_lossy()]);
    }

    /// Every serial line so far (all power-ons), with host times.
    pub fn lines(&self) -> Vec<Line> {
        let mut text = std::fs::read(self.run.join("serial.before.log")).unwrap_or_default();
        text.extend(std::fs::read(self.run.join("serial.ts.log")).unwrap_or_default());
        String::from_utf8_lossy(&text)
            .lines()
            .filter_map(|l| {
                let (t, rest) = l.split_once(' ')?;
                Some((t.parse().ok()?, rest.replace('\r', "")))
            })
            .collect()
    }

    /// The `nth` (1-based) serial line containing `pat`, waiting up to `timeout`.
    pub fn wait(&self, pat: &str, nth: usize, timeout: Duration) -> anyhow::Result<Line> {
        self.wait_any(&[pat], nth, timeout)
    }

    pub fn wait_any(&self, pats: &[&str], nth: usize, timeout: Duration) -> anyhow::Result<Line> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(l) = self
                .lines()
                .into_iter()
                .filter(|(_, l)| pats.iter().any(|p| l.contains(p)))
                .nth(nth - 1)
            {
                return Ok(l);
            }
            if Instant::now() > end {
                bail!("no serial line with {pats:?} (#{nth}) within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Run a shell command on the serial console (root autologin) and return its output.
    pub fn console(&mut self, cmd: &str, timeout: Duration) -> anyhow::Result<String> {
        self.console_seq += 1;
        let (begin, end) = (
            format!("HIL-CMD-BEGIN-{}", self.console_seq),
            format!("HIL-CMD-END-{}", self.console_seq),
        );
        let mut s = std::os::unix::net::UnixStream::connect(self.run.join("serial.sock"))
            .context("serial console")?;
        // Markers built from two halves so that the shell's echo of the command never matches.
        let line = format!(
            "\necho HIL-CMD-BEGIN-''{n}; {cmd} 2>&1; echo; echo HIL-CMD-END-''{n}\n",
            n = self.console_seq
        );
        // Read the output from the connection itself, not from serial.log: while a client is
        // connected QEMU's logfile doubles a character now and then ("RAUC_SLOT_PARENNT_1"; 25
        // runs of one command gave 25 identical outputs on the socket and dozens of doubled
        // characters in the log). Reading all the time also keeps the socket drained: an unread
        // socket stalls the guest's output after a few hundred bytes.
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        s.write_all(line.as_bytes())?;
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let text = loop {
            let text = String::from_utf8_lossy(&got);
            if let Some(to) = text.rfind(&end) {
                break text[..to].to_string();
            }
            ensure!(
                Instant::now() < deadline,
                "console command {cmd:?}: no end marker within {timeout:?}"
            );
            match s.read(&mut buf) {
                Ok(0) => bail!("console command {cmd:?}: the serial console closed"),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e).context("serial console"),
            }
        };
        let _ = s.shutdown(std::net::Shutdown::Both);
        let from = text.rfind(&begin).context("no begin marker")? + begin.len();
        let out = text[from..].replace('\r', "");
        // Drop the terminal's mode escapes (bracketed paste on/off) around the output.
        Ok(out.replace("\x1b[?2004l", "").replace("\x1b[?2004h", ""))
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}
