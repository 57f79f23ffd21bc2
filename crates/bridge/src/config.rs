//! `bridge.toml`. Unknown keys are rejected with their line, like the agent's config.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// CA, server certificate, tokens, database. 0700.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default = "default_listen")]
    pub listen: String,
    /// DNS names and IP addresses put in the bridge's server certificate at `init`.
    #[serde(default = "default_server_names")]
    pub server_names: Vec<String>,
    /// Lifetime of device certificates.
    #[serde(default = "default_cert_lifetime", with = "humantime_serde")]
    pub device_cert_lifetime: Duration,
    /// Fleet bootstrap token file (created by `init`); empty file disables fleet enrollment.
    #[serde(default)]
    pub fleet_token_file: Option<PathBuf>,
    /// Operator token for the device list (created by `init`).
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    #[serde(default)]
    pub wireguard: WireguardSection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireguardSection {
    /// Pool of device addresses; the first host address is the hub's own.
    #[serde(default = "default_pool")]
    pub pool: String,
    /// `host:port` devices dial.
    #[serde(default = "default_endpoint")]
    pub endpoint: String,
    #[serde(default = "default_keepalive")]
    pub persistent_keepalive: u16,
}

impl Default for WireguardSection {
    fn default() -> Self {
        Self {
            pool: default_pool(),
            endpoint: default_endpoint(),
            persistent_keepalive: default_keepalive(),
        }
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/thingsly-bridge")
}
fn default_listen() -> String {
    "127.0.0.1:8443".into()
}
fn default_server_names() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into()]
}
fn default_cert_lifetime() -> Duration {
    Duration::from_secs(90 * 24 * 3600)
}
fn default_pool() -> String {
    "10.8.0.0/24".into()
}
fn default_endpoint() -> String {
    "localhost:51820".into()
}
fn default_keepalive() -> u16 {
    25
}

impl BridgeConfig {
    /// Load `path`; a missing file means all defaults (handy for `init` on a dev machine).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let src = match std::fs::read_to_string(path) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => anyhow::bail!("{}: {e}", path.display()),
        };
        let cfg: Self = toml::from_str(&src).map_err(|e| {
            let line = e
                .span()
                .map(|s| src[..s.start].matches('\n').count() + 1)
                .unwrap_or(0);
            anyhow::anyhow!("{}:{line}: {}", path.display(), e.message())
        })?;
        cfg.wireguard
            .pool
            .parse::<ipnet::Ipv4Net>()
            .map_err(|e| anyhow::anyhow!("{}: key `wireguard.pool`: {e}", path.display()))?;
        if cfg.device_cert_lifetime < Duration::from_secs(60) {
            anyhow::bail!(
                "{}: key `device_cert_lifetime`: must be at least 60s",
                path.display()
            );
        }
        Ok(cfg)
    }

    pub fn fleet_token_path(&self) -> PathBuf {
        self.fleet_token_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("fleet-token"))
    }

    pub fn admin_token_path(&self) -> PathBuf {
        self.admin_token_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("admin-token"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The file the Yocto recipe installs as /etc/thingsly/bridge.toml.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn example_config_in_repo_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("bridge.example.toml");
        let cfg = BridgeConfig::load(&path).unwrap();
        assert_eq!(cfg.data_dir, PathBuf::from("/var/lib/thingsly-bridge"));
    }
}
