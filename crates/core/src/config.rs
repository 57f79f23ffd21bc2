//! `agent.toml`: typed, validated, with embedded defaults so a minimal file is a few lines.
//! Unknown keys are rejected; every error names the file, the line and the dotted key.

use serde::Deserialize;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_PATH: &str = "/etc/thingsly/agent.toml";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub device: DeviceSection,
    #[serde(default)]
    pub enroll: EnrollSection,
    #[serde(default)]
    pub telemetry: TelemetrySection,
    #[serde(default)]
    pub metrics: MetricsSection,
    #[serde(default)]
    pub terminal: TerminalSection,
    #[serde(default)]
    pub tunnel: TunnelSection,
    #[serde(default)]
    pub rauc: RaucSection,
    #[serde(default)]
    pub ota: OtaSection,
    #[serde(default)]
    pub commands: CommandsSection,
    #[serde(default)]
    pub log: LogSection,
    /// The HTTP proxy for every server connection (see [`crate::proxy`]).
    #[serde(default)]
    pub proxy: crate::proxy::ProxySection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSection {
    /// The device id: certificate CN, MQTT client id, `host` tag. `[A-Za-z0-9._-]{1,64}`.
    pub id: String,
    /// Board name reported at registration; detected from the device tree / DMI when empty.
    #[serde(default)]
    pub hardware: String,
    /// Used when no RAUC service answers; `/etc/os-release` VERSION_ID when empty.
    #[serde(default)]
    pub sw_version: String,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Volatile files (`status.json`); never on flash.
    #[serde(default = "default_runtime_dir")]
    pub runtime_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollSection {
    /// `https://host:port` of thingsly-bridge.
    #[serde(default)]
    pub server_url: String,
    /// PEM bundle that the bridge's server certificate must chain to.
    #[serde(default = "default_ca_bundle")]
    pub ca_bundle: PathBuf,
    /// Bootstrap token inline; prefer `bootstrap_token_file` (0600) on real devices.
    #[serde(default)]
    pub bootstrap_token: String,
    #[serde(default)]
    pub bootstrap_token_file: Option<PathBuf>,
    /// Renew once this fraction of the certificate's lifetime has passed.
    #[serde(default = "default_renew_fraction")]
    pub renew_fraction: f64,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for EnrollSection {
    fn default() -> Self {
        Self {
            server_url: String::new(),
            ca_bundle: default_ca_bundle(),
            bootstrap_token: String::new(),
            bootstrap_token_file: None,
            renew_fraction: default_renew_fraction(),
            timeout: default_timeout(),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DialectName {
    #[default]
    Thingsboard,
    Thingsly,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySection {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_broker_host")]
    pub host: String,
    #[serde(default = "default_broker_port")]
    pub port: u16,
    #[serde(default)]
    pub dialect: DialectName,
    /// Telemetry period; a shared attribute `telemetry_interval` (seconds) overrides it live.
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "default_keepalive", with = "humantime_serde")]
    pub keepalive: Duration,
    /// Broker CA bundle; the CA chain received at enrollment when empty.
    #[serde(default)]
    pub ca_bundle: Option<PathBuf>,
    /// MQTT username/password, for brokers that want them on top of the certificate
    /// (the Thingsly platform's device voucher).
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default = "default_spool_messages")]
    pub spool_max_messages: usize,
    #[serde(default = "default_spool_bytes")]
    pub spool_max_bytes: u64,
    /// QoS 1 publishes in flight before waiting for acknowledgements.
    #[serde(default = "default_inflight")]
    pub max_inflight: usize,
}

impl Default for TelemetrySection {
    fn default() -> Self {
        Self {
            enabled: true,
            host: default_broker_host(),
            port: default_broker_port(),
            dialect: DialectName::default(),
            interval: default_interval(),
            keepalive: default_keepalive(),
            ca_bundle: None,
            username: None,
            password: None,
            spool_max_messages: default_spool_messages(),
            spool_max_bytes: default_spool_bytes(),
            max_inflight: default_inflight(),
        }
    }
}

/// `[metrics]`: the Telegraf replacement. Key names and defaults follow Telegraf's agent and
/// `inputs.cpu/disk/net` options so an existing `telegraf.conf` translates line by line.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Collect on multiples of `interval` (:00, :10, …), as Telegraf's `round_interval`.
    #[serde(default = "yes")]
    pub round_interval: bool,
    /// Random sleep up to this long before each collection (spreads a fleet's writes).
    #[serde(default, with = "humantime_serde")]
    pub collection_jitter: Duration,
    /// Timestamp precision written: "ns", "us", "ms" or "s".
    #[serde(default)]
    pub precision: Precision,
    #[serde(default = "yes")]
    pub percpu: bool,
    #[serde(default = "yes")]
    pub totalcpu: bool,
    /// Only these mount points when not empty (`inputs.disk.mount_points`).
    #[serde(default)]
    pub mount_points: Vec<String>,
    #[serde(default = "default_ignore_fs")]
    pub ignore_fs: Vec<String>,
    /// Skip mounts carrying any of these options, e.g. "bind".
    #[serde(default)]
    pub ignore_mount_opts: Vec<String>,
    /// Only these interfaces when not empty (then loopback and down ones are reported too).
    #[serde(default)]
    pub interfaces: Vec<String>,
    /// Points per write request.
    #[serde(default = "default_batch_size")]
    pub metric_batch_size: usize,
    /// Points kept (on disk) while InfluxDB is unreachable; the oldest are dropped beyond it.
    #[serde(default = "default_buffer_limit")]
    pub metric_buffer_limit: usize,
    /// Extra tags on every point; `host` is the device id.
    #[serde(default)]
    pub tags: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub influxdb: InfluxSection,
}

impl Default for MetricsSection {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: default_interval(),
            round_interval: true,
            collection_jitter: Duration::ZERO,
            precision: Precision::default(),
            percpu: true,
            totalcpu: true,
            mount_points: Vec::new(),
            ignore_fs: default_ignore_fs(),
            ignore_mount_opts: Vec::new(),
            interfaces: Vec::new(),
            metric_batch_size: default_batch_size(),
            metric_buffer_limit: default_buffer_limit(),
            tags: Default::default(),
            influxdb: InfluxSection::default(),
        }
    }
}

/// Timestamp precision of written points (InfluxDB's `precision` parameter).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Ns,
    Us,
    Ms,
    #[default]
    S,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ns => "ns",
            Self::Us => "us",
            Self::Ms => "ms",
            Self::S => "s",
        }
    }

    pub fn unit(self) -> Duration {
        match self {
            Self::Ns => Duration::from_nanos(1),
            Self::Us => Duration::from_micros(1),
            Self::Ms => Duration::from_millis(1),
            Self::S => Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum InfluxApi {
    /// `POST /write?db=&rp=` with Basic auth (InfluxDB 1.x, and 2.x's compatibility API).
    #[default]
    V1,
    /// `POST /api/v2/write?org=&bucket=` with `Authorization: Token`.
    V2,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InfluxSection {
    /// `http(s)://host:port`; the metrics module stays off while empty (`metrics --once` works).
    #[serde(default)]
    pub url: String,
    #[serde(default)]
    pub api: InfluxApi,
    #[serde(default = "default_database")]
    pub database: String,
    #[serde(default)]
    pub retention_policy: String,
    #[serde(default)]
    pub username: String,
    /// Inline password; prefer `password_file` (0600).
    #[serde(default)]
    pub password: String,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub token: String,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    #[serde(default)]
    pub organization: String,
    #[serde(default)]
    pub bucket: String,
    #[serde(default = "yes")]
    pub gzip: bool,
    #[serde(default = "default_influx_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// CA bundle for https; the CA chain received at enrollment when unset.
    #[serde(default)]
    pub ca_bundle: Option<PathBuf>,
    /// Do not `CREATE DATABASE` when InfluxDB says it is missing (v1).
    #[serde(default)]
    pub skip_database_creation: bool,
}

impl Default for InfluxSection {
    fn default() -> Self {
        Self {
            url: String::new(),
            api: InfluxApi::V1,
            database: default_database(),
            retention_policy: String::new(),
            username: String::new(),
            password: String::new(),
            password_file: None,
            token: String::new(),
            token_file: None,
            organization: String::new(),
            bucket: String::new(),
            gzip: true,
            timeout: default_influx_timeout(),
            ca_bundle: None,
            skip_database_creation: false,
        }
    }
}

impl InfluxSection {
    /// The secret (v1 password or v2 token), from its file when one is configured.
    pub fn secret(&self) -> Result<String, String> {
        let (inline, file, key) = match self.api {
            InfluxApi::V1 => (&self.password, &self.password_file, "password_file"),
            InfluxApi::V2 => (&self.token, &self.token_file, "token_file"),
        };
        match file {
            Some(f) => std::fs::read_to_string(f)
                .map(|s| s.trim().to_string())
                .map_err(|e| format!("metrics.influxdb.{key} {}: {e}", f.display())),
            None => Ok(inline.clone()),
        }
    }
}

/// `[tunnel]`: the WireGuard tunnel to the bridge's hub, in userspace. Keys, address, hub key
/// and endpoint come from enrollment (`tunnel/wireguard.json`); these are the local choices.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelSection {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// TUN interface name (1-15 bytes).
    #[serde(default = "default_tunnel_interface")]
    pub interface: String,
    #[serde(default = "default_tunnel_mtu")]
    pub mtu: u16,
    /// UDP socket send/receive buffer; the kernel default overflows at a few hundred Mbit/s.
    #[serde(default = "default_tunnel_socket_buffer")]
    pub socket_buffer: usize,
    /// `host:port` overriding the endpoint from enrollment (a site's own DNS name, NAT).
    #[serde(default)]
    pub endpoint: String,
}

impl Default for TunnelSection {
    fn default() -> Self {
        Self {
            enabled: true,
            interface: default_tunnel_interface(),
            mtu: default_tunnel_mtu(),
            socket_buffer: default_tunnel_socket_buffer(),
            endpoint: String::new(),
        }
    }
}

/// `[terminal]`: the ttyd-compatible PTY bridge, reachable only through the tunnel.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TerminalSection {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// "tunnel" (the tunnel address, once the tunnel is up) or an IP address (loopback for
    /// tests). Never a wildcard: the terminal must not be reachable from the LAN.
    #[serde(default = "default_terminal_listen")]
    pub listen: String,
    #[serde(default = "default_terminal_port")]
    pub port: u16,
    /// argv of each session (default: a login shell).
    #[serde(default = "default_terminal_command")]
    pub command: Vec<String>,
    /// Run sessions as this unprivileged user (from /etc/passwd), never as the agent's own
    /// user (which can read the device's private key and bootstrap token) unless
    /// `allow_agent_user`. Empty: the agent's own user (needs `allow_agent_user`).
    #[serde(default = "default_terminal_user")]
    pub user: String,
    /// Let sessions run as the agent's own user (development machines, tests).
    #[serde(default)]
    pub allow_agent_user: bool,
    #[serde(default = "default_term")]
    pub term: String,
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    #[serde(default)]
    pub read_only: bool,
}

impl Default for TerminalSection {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: default_terminal_listen(),
            port: default_terminal_port(),
            command: default_terminal_command(),
            user: default_terminal_user(),
            allow_agent_user: false,
            term: default_term(),
            max_sessions: default_max_sessions(),
            idle_timeout: default_idle_timeout(),
            read_only: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaucSection {
    /// Ask RAUC on the system bus for slot and version when it is there.
    #[serde(default = "yes")]
    pub enabled: bool,
}

impl Default for RaucSection {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// How the OTA module authenticates to the DDI server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DdiAuth {
    /// mTLS with the enrolled device certificate (the bridge; hawkBit behind a TLS proxy).
    Certificate,
    /// `Authorization: TargetToken <ota.token>` (hawkBit's per-device token).
    TargetToken,
    /// `Authorization: GatewayToken <ota.token>` (hawkBit's tenant-wide token).
    GatewayToken,
}

/// `ota.streaming`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum StreamingMode {
    #[default]
    Auto,
    Off,
}

fn default_stream_hold() -> Duration {
    Duration::from_secs(40)
}

/// `[ota]`: updates from a hawkBit DDI server, installed through RAUC.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtaSection {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `https://host:port` of the DDI server; empty: `enroll.server_url` (the bridge).
    #[serde(default)]
    pub server_url: String,
    #[serde(default = "default_tenant")]
    pub tenant: String,
    #[serde(default = "default_ddi_auth")]
    pub auth: DdiAuth,
    /// TargetToken/GatewayToken inline; prefer `token_file` (0600).
    #[serde(default)]
    pub token: String,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Trust anchors for the DDI server and artifact downloads; empty: the enrolled CA chain.
    #[serde(default)]
    pub ca_bundle: Option<PathBuf>,
    /// Poll interval until the server sends its own (`config.polling.sleep`).
    #[serde(default = "default_ota_poll", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Upper bound for the server's polling time (a typo of 12:00:00 must not stall updates).
    #[serde(default = "default_ota_max_poll", with = "humantime_serde")]
    pub max_poll_interval: Duration,
    /// Where bundles are downloaded (the data partition); default `<state_dir>/ota`.
    #[serde(default)]
    pub download_dir: Option<PathBuf>,
    /// Download attempts after a cut or a 5xx before the action is reported failed.
    #[serde(default = "default_download_attempts")]
    pub download_attempts: u32,
    /// Bundle downloads at most this many bytes per second (0: no cap). The server's shared
    /// attribute `ota_download_rate_limit` (telemetry on) overrides it.
    #[serde(default)]
    pub download_rate_limit: u64,
    /// Confirm actions that ask for the device's consent (hawkBit's confirmationBase); off:
    /// they wait, shown in `status`, until confirmed elsewhere.
    #[serde(default = "yes")]
    pub auto_confirm: bool,
    /// Give the installed bundle's http(s) URL to RAUC instead of downloading it ourselves
    /// (RAUC streaming/download; needs a RAUC that can reach the server itself).
    #[serde(default)]
    pub rauc_url_install: bool,
    /// `auto`: where RAUC can stream (RAUC ≥ 1.9 over D-Bus), RAUC reads the bundle through
    /// the agent's loopback relay instead of the agent downloading it first, so no bundle copy
    /// lands on the data partition; a streaming install RAUC refuses (no NBD in the kernel, a
    /// plain bundle) falls back to download-then-install, said in feedback. `off`: always
    /// download first.
    #[serde(default)]
    pub streaming: StreamingMode,
    /// How long one of RAUC's streaming reads may wait for the server (link cut, restart)
    /// before it fails; RAUC retries a read 5 times and the kernel gives it 300 s in all.
    #[serde(default = "default_stream_hold", with = "humantime_serde")]
    pub stream_hold: Duration,
    /// After booting the new slot, health checks must pass within this time.
    #[serde(default = "default_health_deadline", with = "humantime_serde")]
    pub health_deadline: Duration,
    /// Health check: the MQTT session must be connected (only when telemetry is on).
    #[serde(default = "yes")]
    pub health_mqtt: bool,
    /// Health check: the DDI server must answer a poll.
    #[serde(default = "yes")]
    pub health_ddi: bool,
    /// Health check: this command must exit 0 (argv; empty: none).
    #[serde(default)]
    pub health_command: Vec<String>,
    /// Mark the running slot good on every boot once the agent runs (unless an update waits
    /// for its verdict). RAUC's grub and other counting backends treat a slot that is never
    /// marked good as failed and skip it on the next boot. Off: the board marks it itself.
    #[serde(default = "yes")]
    pub mark_good_on_boot: bool,
    /// Tells a reboot from an agent restart; tests point it at a file they change.
    #[serde(default = "default_boot_id_path")]
    pub boot_id_path: PathBuf,
}

impl Default for OtaSection {
    fn default() -> Self {
        Self {
            enabled: true,
            server_url: String::new(),
            tenant: default_tenant(),
            auth: default_ddi_auth(),
            token: String::new(),
            token_file: None,
            ca_bundle: None,
            poll_interval: default_ota_poll(),
            max_poll_interval: default_ota_max_poll(),
            download_dir: None,
            download_attempts: default_download_attempts(),
            download_rate_limit: 0,
            auto_confirm: true,
            rauc_url_install: false,
            streaming: StreamingMode::default(),
            stream_hold: default_stream_hold(),
            health_deadline: default_health_deadline(),
            health_mqtt: true,
            health_ddi: true,
            health_command: Vec::new(),
            mark_good_on_boot: true,
            boot_id_path: default_boot_id_path(),
        }
    }
}

fn default_tenant() -> String {
    "DEFAULT".into()
}
fn default_ddi_auth() -> DdiAuth {
    DdiAuth::Certificate
}
fn default_ota_poll() -> Duration {
    Duration::from_secs(300)
}
fn default_ota_max_poll() -> Duration {
    Duration::from_secs(3600)
}
fn default_download_attempts() -> u32 {
    8
}
fn default_health_deadline() -> Duration {
    Duration::from_secs(300)
}
fn default_boot_id_path() -> PathBuf {
    PathBuf::from("/proc/sys/kernel/random/boot_id")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandsSection {
    /// argv run for the `reboot` RPC (and later by OTA).
    #[serde(default = "default_reboot")]
    pub reboot: Vec<String>,
}

impl Default for CommandsSection {
    fn default() -> Self {
        Self {
            reboot: default_reboot(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// `tracing` filter, e.g. `info` or `info,thingsly_telemetry=debug`; RUST_LOG wins.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        Self {
            level: default_log_level(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/thingsly-agent")
}
fn default_runtime_dir() -> PathBuf {
    PathBuf::from("/run/thingsly-agent")
}
fn default_ca_bundle() -> PathBuf {
    PathBuf::from("/etc/thingsly/bridge-ca.pem")
}
fn default_renew_fraction() -> f64 {
    2.0 / 3.0
}
fn default_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_broker_host() -> String {
    "localhost".into()
}
fn default_broker_port() -> u16 {
    8883
}
fn default_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_keepalive() -> Duration {
    Duration::from_secs(30)
}
fn default_spool_messages() -> usize {
    10_000
}
fn default_spool_bytes() -> u64 {
    8 * 1024 * 1024
}
fn default_inflight() -> usize {
    16
}
fn default_reboot() -> Vec<String> {
    vec!["systemctl".into(), "reboot".into()]
}
fn default_ignore_fs() -> Vec<String> {
    // Telegraf's default, plus autofs (statfs on it would trigger the automount).
    [
        "tmpfs", "devtmpfs", "devfs", "iso9660", "overlay", "aufs", "squashfs", "autofs",
    ]
    .map(String::from)
    .to_vec()
}
fn default_batch_size() -> usize {
    1000
}
fn default_buffer_limit() -> usize {
    10_000
}
fn default_database() -> String {
    "telegraf".into()
}
fn default_influx_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_tunnel_interface() -> String {
    "thingsly0".into()
}
fn default_tunnel_mtu() -> u16 {
    1420
}
fn default_tunnel_socket_buffer() -> usize {
    4 << 20
}
fn default_terminal_listen() -> String {
    "tunnel".into()
}
fn default_terminal_port() -> u16 {
    7681
}
fn default_terminal_command() -> Vec<String> {
    vec!["/bin/sh".into(), "-l".into()]
}
fn default_terminal_user() -> String {
    "thingsly-terminal".into()
}
fn default_term() -> String {
    "xterm-256color".into()
}
fn default_max_sessions() -> usize {
    4
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(15 * 60)
}
fn default_log_level() -> String {
    "info".into()
}

/// A config problem, located.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub path: PathBuf,
    /// 1-based; `None` when the problem is not tied to a line (file missing).
    pub line: Option<usize>,
    /// Dotted key, e.g. `telemetry.interval`; empty for file-level problems.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": key `{}`", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let src = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_path_buf(),
            line: None,
            key: String::new(),
            message: format!("cannot read config: {e}"),
        })?;
        Self::parse(&src, path)
    }

    pub fn parse(src: &str, path: &Path) -> Result<Self, ConfigError> {
        let de = toml::Deserializer::new(src);
        let cfg: AgentConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let mut key = e.path().to_string();
            if key == "." {
                key.clear();
            }
            let inner = e.into_inner();
            let message = inner.message().to_string();
            // Unknown keys: name the offending key itself, not just its table.
            if let Some(unknown) = message
                .strip_prefix("unknown field `")
                .and_then(|r| r.split('`').next())
            {
                if key.is_empty() {
                    key = unknown.to_string();
                } else if key.rsplit('.').next() != Some(unknown) {
                    key = format!("{key}.{unknown}");
                }
            }
            let line = inner
                .span()
                .map(|s| line_of(src, s.start))
                .or_else(|| key_line(src, &key));
            ConfigError {
                path: path.to_path_buf(),
                line,
                key,
                message,
            }
        })?;
        cfg.validate().map_err(|(key, message)| ConfigError {
            path: path.to_path_buf(),
            line: key_line(src, key),
            key: key.to_string(),
            message,
        })?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        let id = &self.device.id;
        // The same rule the bridge applies, so a config that passes here enrolls there.
        if !thingsly_proto::enroll::is_valid_device_id(id) {
            return Err((
                "device.id",
                format!("{id:?} is not 1-64 characters of A-Z a-z 0-9 . _ -"),
            ));
        }
        if !self.enroll.server_url.is_empty() && !self.enroll.server_url.starts_with("https://") {
            return Err((
                "enroll.server_url",
                format!(
                    "{:?} must be an https:// URL (enrollment is never sent in clear text)",
                    self.enroll.server_url
                ),
            ));
        }
        if !(0.1..=0.95).contains(&self.enroll.renew_fraction) {
            return Err((
                "enroll.renew_fraction",
                format!(
                    "{} must be between 0.1 and 0.95",
                    self.enroll.renew_fraction
                ),
            ));
        }
        let t = &self.telemetry;
        if t.interval < Duration::from_millis(100) {
            return Err(("telemetry.interval", "must be at least 100ms".into()));
        }
        if t.keepalive < Duration::from_secs(5) {
            return Err(("telemetry.keepalive", "must be at least 5s".into()));
        }
        if t.spool_max_messages == 0 {
            return Err(("telemetry.spool_max_messages", "must be at least 1".into()));
        }
        if t.spool_max_bytes < 1024 {
            return Err(("telemetry.spool_max_bytes", "must be at least 1024".into()));
        }
        if t.max_inflight == 0 || t.max_inflight > 100 {
            return Err(("telemetry.max_inflight", "must be between 1 and 100".into()));
        }
        if t.host.is_empty() {
            return Err(("telemetry.host", "must not be empty".into()));
        }
        self.validate_metrics()?;
        self.validate_terminal()?;
        let w = &self.tunnel;
        if w.interface.is_empty() || w.interface.len() > 15 || w.interface.contains('/') {
            return Err(("tunnel.interface", "must be 1-15 bytes without '/'".into()));
        }
        if !(576..=9000).contains(&w.mtu) {
            return Err(("tunnel.mtu", "must be between 576 and 9000".into()));
        }
        if !w.endpoint.is_empty() && !w.endpoint.contains(':') {
            return Err(("tunnel.endpoint", "must be host:port".into()));
        }
        if self.commands.reboot.is_empty() {
            return Err(("commands.reboot", "must name a command".into()));
        }
        self.proxy.validate()?;
        self.validate_ota()
    }

    fn validate_ota(&self) -> Result<(), (&'static str, String)> {
        let o = &self.ota;
        if !o.server_url.is_empty() && !o.server_url.starts_with("https://") {
            return Err((
                "ota.server_url",
                format!("{:?} must be an https:// URL", o.server_url),
            ));
        }
        if o.tenant.is_empty() || o.tenant.contains('/') {
            return Err(("ota.tenant", "must be a non-empty path segment".into()));
        }
        if o.auth != DdiAuth::Certificate && o.token.is_empty() && o.token_file.is_none() {
            return Err((
                "ota.auth",
                "token authentication needs ota.token or ota.token_file".into(),
            ));
        }
        if o.poll_interval < Duration::from_secs(1) {
            return Err(("ota.poll_interval", "must be at least 1s".into()));
        }
        if o.max_poll_interval < o.poll_interval {
            return Err((
                "ota.max_poll_interval",
                "must not be below ota.poll_interval".into(),
            ));
        }
        if o.stream_hold < Duration::from_secs(5) || o.stream_hold > Duration::from_secs(45) {
            return Err((
                "ota.stream_hold",
                "must be between 5s and 45s (RAUC tries a read 6 times within the kernel's 300 s)"
                    .into(),
            ));
        }
        if o.download_attempts == 0 {
            return Err(("ota.download_attempts", "must be at least 1".into()));
        }
        Ok(())
    }

    fn validate_terminal(&self) -> Result<(), (&'static str, String)> {
        let t = &self.terminal;
        if t.enabled && t.user.is_empty() && !t.allow_agent_user {
            return Err((
                "terminal.user",
                "empty runs sessions as the agent's own user, which can read its private key and bootstrap token; name an unprivileged user (default thingsly-terminal) or set terminal.allow_agent_user = true".into(),
            ));
        }
        if t.listen != "tunnel" {
            match t.listen.parse::<std::net::IpAddr>() {
                Ok(ip) if ip.is_unspecified() => {
                    return Err((
                        "terminal.listen",
                        format!("{ip} would expose the terminal outside the tunnel"),
                    ));
                }
                Ok(_) => {}
                Err(_) => {
                    return Err((
                        "terminal.listen",
                        format!("{:?} is neither \"tunnel\" nor an IP address", t.listen),
                    ));
                }
            }
        }
        if t.port == 0 {
            return Err(("terminal.port", "must not be 0".into()));
        }
        if t.command.is_empty() || t.command[0].is_empty() {
            return Err(("terminal.command", "must name a program".into()));
        }
        if !(1..=64).contains(&t.max_sessions) {
            return Err(("terminal.max_sessions", "must be between 1 and 64".into()));
        }
        if t.idle_timeout < Duration::from_secs(1) {
            return Err(("terminal.idle_timeout", "must be at least 1s".into()));
        }
        Ok(())
    }

    fn validate_metrics(&self) -> Result<(), (&'static str, String)> {
        let m = &self.metrics;
        if m.interval < Duration::from_secs(1) {
            return Err(("metrics.interval", "must be at least 1s".into()));
        }
        if m.precision.unit() > m.interval {
            return Err((
                "metrics.precision",
                "is coarser than metrics.interval".into(),
            ));
        }
        if m.metric_batch_size == 0 {
            return Err(("metrics.metric_batch_size", "must be at least 1".into()));
        }
        if m.metric_buffer_limit < m.metric_batch_size {
            return Err((
                "metrics.metric_buffer_limit",
                "must be at least metrics.metric_batch_size".into(),
            ));
        }
        for (k, v) in &m.tags {
            if k.is_empty() || v.is_empty() || k == "host" {
                return Err((
                    "metrics.tags",
                    format!(
                        "tag {k:?} = {v:?}: keys and values must not be empty; `host` is the device id"
                    ),
                ));
            }
        }
        let i = &m.influxdb;
        if !i.url.is_empty() {
            if !(i.url.starts_with("http://") || i.url.starts_with("https://")) {
                return Err((
                    "metrics.influxdb.url",
                    format!("{:?} must start with http:// or https://", i.url),
                ));
            }
            if i.timeout < Duration::from_millis(100) {
                return Err(("metrics.influxdb.timeout", "must be at least 100ms".into()));
            }
            match i.api {
                InfluxApi::V1 if i.database.is_empty() => {
                    return Err(("metrics.influxdb.database", "must not be empty".into()));
                }
                InfluxApi::V2 if i.bucket.is_empty() => {
                    return Err((
                        "metrics.influxdb.bucket",
                        "must be set for api = \"v2\"".into(),
                    ));
                }
                InfluxApi::V2 if i.organization.is_empty() => {
                    return Err((
                        "metrics.influxdb.organization",
                        "must be set for api = \"v2\"".into(),
                    ));
                }
                _ => {}
            }
            if !i.password.is_empty() && i.password_file.is_some() {
                return Err((
                    "metrics.influxdb.password",
                    "set password or password_file, not both".into(),
                ));
            }
            if !i.token.is_empty() && i.token_file.is_some() {
                return Err((
                    "metrics.influxdb.token",
                    "set token or token_file, not both".into(),
                ));
            }
        }
        Ok(())
    }

    /// The bootstrap token, from the file when one is configured.
    pub fn bootstrap_token(&self) -> Result<String, String> {
        if let Some(f) = &self.enroll.bootstrap_token_file {
            return std::fs::read_to_string(f)
                .map(|s| s.trim().to_string())
                .map_err(|e| format!("enroll.bootstrap_token_file {}: {e}", f.display()));
        }
        Ok(self.enroll.bootstrap_token.trim().to_string())
    }
}

fn line_of(src: &str, offset: usize) -> usize {
    src[..offset.min(src.len())].matches('\n').count() + 1
}

/// The line where a dotted key (or its closest existing parent table) is written.
fn key_line(src: &str, dotted: &str) -> Option<usize> {
    let doc = toml_edit::ImDocument::parse(src.to_string()).ok()?;
    let mut table: &dyn toml_edit::TableLike = doc.as_table();
    let mut best = None;
    for part in dotted.split('.').filter(|p| !p.is_empty()) {
        let (k, item) = table.get_key_value(part)?;
        if let Some(span) = k.span() {
            best = Some(line_of(src, span.start));
        }
        match item.as_table_like() {
            Some(t) => table = t,
            None => break,
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(src: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(src, Path::new("agent.toml"))
    }

    #[test]
    fn minimal_config_gets_embedded_defaults() {
        let c = parse("[device]\nid = \"dev-1\"\n").unwrap();
        assert_eq!(c.telemetry.port, 8883);
        assert_eq!(c.telemetry.interval, Duration::from_secs(10));
        assert_eq!(c.device.state_dir, PathBuf::from("/var/lib/thingsly-agent"));
        assert!((c.enroll.renew_fraction - 2.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = parse("[device]\nid = \"d\"\n\n[telemetry]\nport = 1\ninterwal = \"5s\"\n")
            .unwrap_err();
        assert_eq!(e.key, "telemetry.interwal");
        assert_eq!(e.line, Some(6));
        assert!(e.message.contains("unknown field"), "{e}");
        assert_eq!(e.to_string().split(':').nth(1), Some("6"));
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let e = parse("[device]\nid = \"d\"\n[telemetry]\nport = \"eighty\"\n").unwrap_err();
        assert_eq!(e.key, "telemetry.port");
        assert_eq!(e.line, Some(4));
    }

    #[test]
    fn bad_duration_names_key_and_line() {
        let e = parse("[device]\nid = \"d\"\n[telemetry]\ninterval = \"ten\"\n").unwrap_err();
        assert_eq!(e.key, "telemetry.interval");
        assert_eq!(e.line, Some(4));
    }

    #[test]
    fn missing_required_key_is_named() {
        let e = parse("[device]\nhardware = \"x\"\n").unwrap_err();
        assert!(e.message.contains("missing field `id`"), "{e}");
        assert_eq!(e.key, "device");
        assert_eq!(e.line, Some(1));
    }

    #[test]
    fn validation_errors_point_at_the_key() {
        let e = parse("[device]\nid = \"d\"\n[enroll]\n\nserver_url = \"http://x\"\n").unwrap_err();
        assert_eq!(e.key, "enroll.server_url");
        assert_eq!(e.line, Some(5));
        let e = parse("[device]\nid = \"bad id\"\n").unwrap_err();
        assert_eq!(e.key, "device.id");
        assert_eq!(e.line, Some(2));
    }

    #[test]
    fn metrics_defaults_and_errors() {
        let c = parse("[device]\nid = \"d\"\n").unwrap();
        assert_eq!(c.metrics.metric_buffer_limit, 10_000);
        assert_eq!(c.metrics.influxdb.database, "telegraf");
        assert!(c.metrics.ignore_fs.iter().any(|f| f == "squashfs"));
        let e = parse("[device]\nid = \"d\"\n[metrics]\nprecision = \"m\"\n").unwrap_err();
        assert_eq!((e.key.as_str(), e.line), ("metrics.precision", Some(4)));
        let e = parse("[device]\nid = \"d\"\n[metrics.influxdb]\nurl = \"x\"\napi = \"v2\"\n")
            .unwrap_err();
        assert_eq!((e.key.as_str(), e.line), ("metrics.influxdb.url", Some(4)));
        let e =
            parse("[device]\nid = \"d\"\n[metrics.influxdb]\nurl = \"http://h\"\napi = \"v2\"\n")
                .unwrap_err();
        assert_eq!(e.key, "metrics.influxdb.bucket");
        let e = parse("[device]\nid = \"d\"\n[metrics.influxdb]\napi = \"v3\"\n").unwrap_err();
        assert_eq!((e.key.as_str(), e.line), ("metrics.influxdb.api", Some(4)));
    }

    #[test]
    fn terminal_never_listens_on_a_wildcard() {
        let c = parse("[device]\nid = \"d\"\n").unwrap();
        assert_eq!(
            (c.terminal.listen.as_str(), c.terminal.port),
            ("tunnel", 7681)
        );
        let e = parse("[device]\nid = \"d\"\n[terminal]\nlisten = \"0.0.0.0\"\n").unwrap_err();
        assert_eq!((e.key.as_str(), e.line), ("terminal.listen", Some(4)));
        assert!(parse("[device]\nid = \"d\"\n[terminal]\nlisten = \"127.0.0.1\"\n").is_ok());
    }

    #[test]
    fn terminal_sessions_never_run_as_the_agent_unless_allowed() {
        let c = parse("[device]\nid = \"d\"\n").unwrap();
        assert_eq!(c.terminal.user, "thingsly-terminal");
        let e = parse("[device]\nid = \"d\"\n[terminal]\nport = 7000\nuser = \"\"\n").unwrap_err();
        assert_eq!((e.key.as_str(), e.line), ("terminal.user", Some(5)));
        assert!(e.message.contains("allow_agent_user"), "{}", e.message);
        assert!(
            parse("[device]\nid = \"d\"\n[terminal]\nuser = \"\"\nallow_agent_user = true\n")
                .is_ok()
        );
        assert!(parse("[device]\nid = \"d\"\n[terminal]\nenabled = false\nuser = \"\"\n").is_ok());
    }

    #[test]
    fn ota_errors_name_the_key_and_line() {
        let e = parse("[device]\nid = \"d\"\n[ota]\nserver_url = \"http://x\"\n").unwrap_err();
        assert_eq!((e.key.as_str(), e.line), ("ota.server_url", Some(4)));
        let e = parse("[device]\nid = \"d\"\n[ota]\nauth = \"target_token\"\n").unwrap_err();
        assert_eq!((e.key.as_str(), e.line), ("ota.auth", Some(4)));
        let e = parse("[device]\nid = \"d\"\n[ota]\nauth = \"password\"\n").unwrap_err();
        assert_eq!(e.key, "ota.auth");
        assert!(
            parse("[device]\nid = \"d\"\n[ota]\nauth = \"gateway_token\"\ntoken = \"t\"\n").is_ok()
        );
    }

    #[test]
    fn proxy_errors_name_the_key_and_line() {
        let e =
            parse("[device]\nid = \"d\"\n[proxy]\nurl = \"http://u:p@proxy:3128\"\n").unwrap_err();
        assert_eq!((e.key.as_str(), e.line), ("proxy.url", Some(4)));
        let e = parse("[device]\nid = \"d\"\n[proxy]\nurl = \"proxy.corp\"\n").unwrap_err();
        assert!(e.message.contains("port"), "{}", e.message);
        let e = parse("[device]\nid = \"d\"\n[proxy]\n\ncredentials_file = \"/c\"\n").unwrap_err();
        assert_eq!(
            (e.key.as_str(), e.line),
            ("proxy.credentials_file", Some(5))
        );
        let c = parse("[device]\nid = \"d\"\n[proxy]\nurl = \"http://proxy:3128\"\n").unwrap();
        assert!(c.proxy.from_environment);
    }

    #[test]
    fn example_config_in_repo_is_valid() {
        let src = include_str!("../../../agent/agent.example.toml");
        parse(src).unwrap();
    }
}
