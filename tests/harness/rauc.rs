//! The project's copy of the RAUC sandbox (`tests/rauc/rauc-sandbox.sh`): Debian's rauc 1.8 as
//! a real `rauc service` on a private dbus-daemon, file-backed A/B slots, a custom bootloader
//! backend whose state survives a simulated reboot, and real signed bundles. Stopped on drop
//! (only the processes the script started).

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct RaucSandbox {
    pub dir: PathBuf,
    script: PathBuf,
    /// `DBUS_SYSTEM_BUS_ADDRESS` for the agent.
    pub bus: String,
}

impl RaucSandbox {
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("rauc/rauc-sandbox.sh");
        let mut sb = Self {
            dir: dir.to_path_buf(),
            script,
            bus: String::new(),
        };
        let exports = sb.run(&["start"])?;
        sb.bus = exports
            .lines()
            .find_map(|l| l.strip_prefix("export DBUS_SYSTEM_BUS_ADDRESS="))
            .ok_or_else(|| anyhow::anyhow!("no bus address in {exports}"))?
            .trim_matches(|c| c == '"' || c == '\'')
            .to_string();
        Ok(sb)
    }

    pub fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(&self.script)
            .arg("--dir")
            .arg(&self.dir)
            .args(args)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "rauc-sandbox {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A signed bundle: `extra` takes the script's options (`--compatible`, `--signer
    /// untrusted`, `--size-mib`).
    pub fn bundle(&self, name: &str, version: &str, extra: &[&str]) -> anyhow::Result<PathBuf> {
        let mut args = vec!["bundle", name, "--version", version];
        args.extend_from_slice(extra);
        Ok(PathBuf::from(self.run(&args)?.trim()))
    }

    /// Restart RAUC booted from the primary slot (the bootloader falls back from a bad one).
    pub fn reboot(&self) -> anyhow::Result<()> {
        self.run(&["reboot"]).map(|_| ())
    }

    /// The custom bootloader backend's state file (`PRIMARY=`, `STATE_A=`, …).
    pub fn boot_state(&self) -> String {
        std::fs::read_to_string(self.dir.join("boot/state")).unwrap_or_default()
    }

    /// Backend calls so far (`set-state B bad`, `set-primary B`, …).
    pub fn boot_calls(&self) -> String {
        std::fs::read_to_string(self.dir.join("boot/calls.log")).unwrap_or_default()
    }
}

impl Drop for RaucSandbox {
    fn drop(&mut self) {
        let _ = Command::new(&self.script)
            .arg("--dir")
            .arg(&self.dir)
            .arg("stop")
            .output();
    }
}
