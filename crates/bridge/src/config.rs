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
    /// The terminal proxy; absent: `/terminal` answers 404.
    #[serde(default)]
    pub terminal: Option<TerminalSection>,
    #[serde(default)]
    pub ddi: DdiSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub enrollment: EnrollmentSection,
    /// Who signs device certificates: the bridge's own CA (default) or step-ca.
    #[serde(default)]
    pub signer: SignerSection,
    /// A hawkBit of the platform's, where the bridge provisions each device's target;
    /// absent: devices use the bridge's embedded DDI server.
    #[serde(default)]
    pub hawkbit: Option<HawkbitSection>,
    /// ThingsBoard's rule engine calling the bridge (the connect webhook); absent: 404.
    #[serde(default)]
    pub thingsboard: Option<ThingsboardSection>,
    /// The URL devices reach the bridge by (`https://bridge.example.com:8443`): DDI links are
    /// built from it. Unset: from the request's `Host` header (fine on one machine, but a
    /// client then chooses the links it is sent).
    #[serde(default)]
    pub external_url: Option<String>,
}

/// `[enrollment]`: what the fleet token (shared by every device of a production run, and so
/// as good as public once one device is opened) may do. One-time device tokens, minted by an
/// operator for one id, are not bound by the id rules.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnrollmentSection {
    /// Ids the fleet token may never claim (the names of service identities such as the MQTT
    /// observer or the broker).
    pub reserved_ids: Vec<String>,
    /// When not empty, the fleet token may claim only ids matching one of these patterns;
    /// `*` stands for any run of id characters, everything else is literal (`dev-*`).
    pub fleet_id_patterns: Vec<String>,
    /// Devices the fleet token may hold at once (its share of the address pool); 0: no cap
    /// but the pool.
    pub fleet_max_devices: usize,
    /// New identities the fleet token may create per minute (repeats and renewals do not
    /// count); 0: no limit.
    pub fleet_enrollments_per_minute: u32,
}

impl Default for EnrollmentSection {
    fn default() -> Self {
        Self {
            reserved_ids: ["observer", "broker", "bridge", "admin", "root", "localhost"]
                .map(String::from)
                .to_vec(),
            fleet_id_patterns: Vec::new(),
            fleet_max_devices: 0,
            fleet_enrollments_per_minute: 300,
        }
    }
}

impl EnrollmentSection {
    /// Why the fleet token may not claim `id`, if it may not.
    pub fn fleet_refuses(&self, id: &str) -> Option<String> {
        if self.reserved_ids.iter().any(|r| r.eq_ignore_ascii_case(id)) {
            return Some(format!("{id:?} is reserved (enrollment.reserved_ids)"));
        }
        if !self.fleet_id_patterns.is_empty()
            && !self.fleet_id_patterns.iter().any(|p| glob_match(p, id))
        {
            return Some(format!(
                "{id:?} matches none of enrollment.fleet_id_patterns"
            ));
        }
        None
    }
}

/// `*` = any run of characters (possibly empty); everything else literal; whole string.
fn glob_match(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let [first, middle @ .., last] = parts.as_slice() else {
        return pattern == s; // unreachable: split yields at least one part
    };
    if parts.len() == 1 {
        return pattern == s;
    }
    let Some(mut rest) = s.strip_prefix(first) else {
        return false;
    };
    for m in middle {
        match rest.find(m) {
            Some(i) => rest = &rest[i + m.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// `[signer]`: `backend = "builtin"` (the CA `init` made, default) or `"step-ca"`: every
/// enrollment and renewal is signed by a step-ca server through a JWK provisioner.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignerSection {
    #[serde(default)]
    pub backend: SignerBackend,
    /// step-ca's base URL (`https://ca.internal:9000`); the token's audience is
    /// `<url>/1.0/sign`.
    #[serde(default)]
    pub url: Option<String>,
    /// step-ca's root certificate (PEM): verifies step-ca's TLS and the chains it returns,
    /// and becomes a trust anchor for devices' client certificates.
    #[serde(default)]
    pub root: Option<PathBuf>,
    /// SHA-256 of the root (hex, what `step certificate fingerprint` prints). With `root`:
    /// the bridge refuses to start when the file is another certificate. Alone: the root is
    /// fetched from step-ca (`<url>/1.0/root/<fingerprint>`, checked against the hash) at the first
    /// start and kept as `<data_dir>/step-ca-root.crt`.
    #[serde(default)]
    pub root_fingerprint: Option<String>,
    /// The JWK provisioner's name (the token's `iss`).
    #[serde(default)]
    pub provisioner: Option<String>,
    /// Its private key: a JWK file, or the encrypted form step-ca stores (JWE).
    #[serde(default)]
    pub provisioner_key: Option<PathBuf>,
    /// The password of an encrypted `provisioner_key` (the file's first line).
    #[serde(default)]
    pub provisioner_password_file: Option<PathBuf>,
    /// One sign request, connection included.
    #[serde(default = "default_signer_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for SignerSection {
    fn default() -> Self {
        Self {
            backend: SignerBackend::Builtin,
            url: None,
            root: None,
            root_fingerprint: None,
            provisioner: None,
            provisioner_key: None,
            provisioner_password_file: None,
            timeout: default_signer_timeout(),
        }
    }
}

fn default_signer_timeout() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SignerBackend {
    #[default]
    Builtin,
    StepCa,
}

/// `[hawkbit]`: where targets are created (Management API) and what devices are told
/// (DDI API). Devices are provisioned when ThingsBoard reports their first connect.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HawkbitSection {
    /// Management API base, `https://hawkbit.internal:8080` (`/rest/v1/...` is appended).
    pub mgmt_url: String,
    /// Trust anchors (PEM) for `mgmt_url`.
    pub mgmt_ca: PathBuf,
    /// HTTP Basic user of the Management API (a hawkBit user with CREATE/UPDATE_TARGET).
    pub username: String,
    /// Its password (the file's first line).
    pub password_file: PathBuf,
    /// What devices poll: hawkBit's DDI API, or the TLS proxy in front of it.
    pub ddi_url: String,
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// How devices authenticate at `ddi_url`.
    #[serde(default = "default_device_auth")]
    pub device_auth: thingsly_proto::enroll::DdiAssignedAuth,
    /// The bridge's OTA group of a device becomes its target `tag` (created when missing),
    /// its target `type` (which must exist in hawkBit), or nothing (`none`).
    #[serde(default = "default_group_as")]
    pub group_as: GroupAs,
    /// One Management API request.
    #[serde(default = "default_signer_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// A connect of a device provisioned less than this ago (with the same token) is only
    /// recorded, not sent to hawkBit again: flaky links reconnect often.
    #[serde(default = "default_resync", with = "humantime_serde")]
    pub resync_after: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupAs {
    Tag,
    Type,
    None,
}

fn default_device_auth() -> thingsly_proto::enroll::DdiAssignedAuth {
    thingsly_proto::enroll::DdiAssignedAuth::TargetToken
}
fn default_group_as() -> GroupAs {
    GroupAs::Tag
}
fn default_resync() -> Duration {
    Duration::from_secs(3600)
}

/// `[thingsboard]`: the connect webhook its rule engine calls (REST API Call node).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThingsboardSection {
    /// The shared secret ThingsBoard sends in `X-Thingsly-Webhook-Secret` (the file's first
    /// line; at least 32 characters).
    pub webhook_secret_file: PathBuf,
}

fn check_hawkbit(h: &HawkbitSection, path: &Path, src: &str) -> anyhow::Result<()> {
    let at = |k: &str| key_at(path, src, "hawkbit", k);
    for (k, u) in [("mgmt_url", &h.mgmt_url), ("ddi_url", &h.ddi_url)] {
        if !u.starts_with("https://") || u.ends_with('/') || u.len() <= 8 {
            anyhow::bail!(
                "{}: must be https://host[:port] without a trailing /",
                at(k)
            );
        }
    }
    if h.username.is_empty() || h.username.contains(':') {
        anyhow::bail!(
            "{}: must be a non-empty user name without ':'",
            at("username")
        );
    }
    if h.tenant.is_empty()
        || !h
            .tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        anyhow::bail!("{}: must be letters, digits, _ or -", at("tenant"));
    }
    if !(Duration::from_secs(1)..=Duration::from_secs(120)).contains(&h.timeout) {
        anyhow::bail!("{}: must be between 1s and 2m", at("timeout"));
    }
    Ok(())
}

/// `path:line: key `section.key`` for a check after parsing: the line where `key` is set in
/// `[section]`, or the section's header when the key is missing (0 when neither is there).
fn key_at(path: &Path, src: &str, section: &str, key: &str) -> String {
    let mut in_section = false;
    let mut header_line = 0;
    for (i, line) in src.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            in_section = t.trim_matches(|c| c == '[' || c == ']').trim() == section;
            if in_section {
                header_line = i + 1;
            }
            continue;
        }
        if in_section
            && t.split_once('=')
                .is_some_and(|(k, _)| k.trim().trim_matches('"') == key)
        {
            return format!("{}:{}: key `{section}.{key}`", path.display(), i + 1);
        }
    }
    format!("{}:{header_line}: key `{section}.{key}`", path.display())
}

/// The `[signer]` rules `serde` cannot express.
fn check_signer(s: &SignerSection, path: &Path, src: &str) -> anyhow::Result<()> {
    let at = |k: &str| key_at(path, src, "signer", k);
    if s.backend == SignerBackend::Builtin {
        for (k, set) in [
            ("url", s.url.is_some()),
            ("root", s.root.is_some()),
            ("provisioner", s.provisioner.is_some()),
            ("provisioner_key", s.provisioner_key.is_some()),
        ] {
            if set {
                anyhow::bail!("{}: only read with backend = \"step-ca\"", at(k));
            }
        }
        return Ok(());
    }
    match &s.url {
        None => anyhow::bail!("{}: required with backend = \"step-ca\"", at("url")),
        Some(u) if !u.starts_with("https://") || u.trim_end_matches('/').len() <= 8 => {
            anyhow::bail!("{}: must be an https:// URL", at("url"))
        }
        _ => {}
    }
    for (k, set) in [
        ("root", s.root.is_some() || s.root_fingerprint.is_some()),
        (
            "provisioner",
            s.provisioner.as_deref().is_some_and(|p| !p.is_empty()),
        ),
        ("provisioner_key", s.provisioner_key.is_some()),
    ] {
        if !set {
            anyhow::bail!("{}: required with backend = \"step-ca\"", at(k));
        }
    }
    if let Some(fp) = &s.root_fingerprint
        && (fp.len() != 64 || !fp.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        anyhow::bail!(
            "{}: must be 64 hex digits (SHA-256)",
            at("root_fingerprint")
        );
    }
    if !(Duration::from_secs(1)..=Duration::from_secs(120)).contains(&s.timeout) {
        anyhow::bail!("{}: must be between 1s and 2m", at("timeout"));
    }
    Ok(())
}

/// `[limits]`: what one client may cost, per listener (the device port and the operator
/// port each have these). Sized for `LimitNOFILE=65536` in the shipped unit.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Open connections per listener; over it, new connections are closed at once (logged
    /// once per episode). Keep it below the process's `nofile` limit.
    pub max_connections: usize,
    /// TCP accepted → TLS handshake done.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Waiting for a request's headers, the first one and every keep-alive one.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// No byte read or written on a connection for this long closes it (a body that stalls,
    /// a download nobody reads). Upgraded connections (the terminal) have their own.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A request body must arrive within `body_timeout` plus one second per
    /// `body_min_rate` bytes received (Apache's mod_reqtimeout rule): a client dripping a
    /// byte now and then (which the idle timeout never sees) is cut off; a large upload at
    /// any real speed is not.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    pub body_min_rate: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            max_connections: 16_384,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(20),
            body_min_rate: 500,
        }
    }
}

/// `[ddi]`: the hawkBit-compatible DDI server (devices authenticate with their enrolled
/// certificate, a TargetToken, or the GatewayToken) and the OTA management API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DdiSection {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// hawkBit's tenant, the first path segment (`/{tenant}/controller/v1/{controllerId}`).
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// `config.polling.sleep` sent to devices.
    #[serde(default = "default_polling_sleep", with = "humantime_serde")]
    pub polling_sleep: Duration,
    /// File holding the GatewayToken; absent: GatewayToken authentication is off.
    #[serde(default)]
    pub gateway_token_file: Option<PathBuf>,
    /// Where uploaded bundles are kept; default `<data_dir>/artifacts`.
    #[serde(default)]
    pub artifacts_dir: Option<PathBuf>,
}

impl Default for DdiSection {
    fn default() -> Self {
        Self {
            enabled: true,
            tenant: default_tenant(),
            polling_sleep: default_polling_sleep(),
            gateway_token_file: None,
            artifacts_dir: None,
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_tenant() -> String {
    "DEFAULT".into()
}
fn default_polling_sleep() -> Duration {
    Duration::from_secs(300)
}

/// `[terminal]`: who may open a shell on which device, and how the proxy reaches it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TerminalSection {
    /// The operator port (TLS, no client-certificate request, so browsers connect without a
    /// prompt); `/terminal` is also served on the main `listen`. `""` disables it.
    #[serde(
        default = "default_terminal_listen",
        deserialize_with = "empty_is_none"
    )]
    pub listen: Option<String>,
    /// The identity provider's JWKS (Keycloak: `<realm>/protocol/openid-connect/certs`). https.
    pub jwks_url: String,
    /// Trust anchors (PEM) for `jwks_url`.
    pub jwks_ca: PathBuf,
    /// Expected `iss` of operator tokens.
    pub issuer: String,
    /// Expected `aud` (Keycloak: the client id); its client roles count as roles too.
    pub audience: String,
    /// Casbin policy (CSV). Reread on SIGHUP.
    pub policy: PathBuf,
    /// Casbin model; default: the platform's (`crates/bridge/casbin/model.conf`).
    #[serde(default)]
    pub policy_model: Option<PathBuf>,
    /// The device agent's terminal port on its tunnel address.
    #[serde(default = "default_device_port")]
    pub device_port: u16,
    /// Lifetime of the device tickets the proxy mints (10 s ..= 300 s).
    #[serde(default = "default_ticket_lifetime", with = "humantime_serde")]
    pub ticket_lifetime: Duration,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Proxied sessions at once, all operators together.
    #[serde(default = "default_proxy_sessions")]
    pub max_sessions: usize,
    /// Unknown `kid`s refetch the JWKS at most this often.
    #[serde(default = "default_jwks_refresh", with = "humantime_serde")]
    pub jwks_min_refresh: Duration,
    /// Clock skew allowed on `exp`/`nbf`.
    #[serde(default = "default_leeway", with = "humantime_serde")]
    pub leeway: Duration,
}

fn default_terminal_listen() -> Option<String> {
    Some("127.0.0.1:8444".into())
}
fn empty_is_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = String::deserialize(d)?;
    Ok((!s.is_empty()).then_some(s))
}
fn default_device_port() -> u16 {
    7681
}
fn default_ticket_lifetime() -> Duration {
    Duration::from_secs(60)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_proxy_sessions() -> usize {
    64
}
fn default_jwks_refresh() -> Duration {
    Duration::from_secs(30)
}
fn default_leeway() -> Duration {
    Duration::from_secs(10)
}

/// How the bridge runs the WireGuard hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HubMode {
    /// boringtun over a TUN interface the bridge creates (no kernel module).
    Userspace,
    /// An existing WireGuard interface (kernel or wireguard-go), configured with `wg(8)`.
    Wg,
    /// No hub (address book only; another process runs WireGuard).
    Off,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireguardSection {
    #[serde(default = "default_hub_mode")]
    pub mode: HubMode,
    /// The hub's interface: created (userspace) or existing (wg).
    #[serde(default = "default_hub_interface")]
    pub interface: String,
    /// UDP port the hub listens on (what `endpoint` points devices at).
    #[serde(default = "default_hub_port")]
    pub listen_port: u16,
    #[serde(default = "default_hub_mtu")]
    pub mtu: u16,
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
            mode: default_hub_mode(),
            interface: default_hub_interface(),
            listen_port: default_hub_port(),
            mtu: default_hub_mtu(),
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
fn default_hub_mode() -> HubMode {
    HubMode::Userspace
}
fn default_hub_interface() -> String {
    "thingsly-hub".into()
}
fn default_hub_port() -> u16 {
    51820
}
fn default_hub_mtu() -> u16 {
    1420
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
    pub fn artifacts_dir(&self) -> PathBuf {
        self.ddi
            .artifacts_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("artifacts"))
    }

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
        let wg = &cfg.wireguard;
        if wg.interface.is_empty() || wg.interface.len() > 15 {
            anyhow::bail!(
                "{}: key `wireguard.interface`: must be 1-15 bytes",
                path.display()
            );
        }
        if wg.mode == HubMode::Userspace && wg.listen_port == 0 {
            anyhow::bail!(
                "{}: key `wireguard.listen_port`: must not be 0",
                path.display()
            );
        }
        if cfg.device_cert_lifetime < Duration::from_secs(60) {
            anyhow::bail!(
                "{}: key `device_cert_lifetime`: must be at least 60s",
                path.display()
            );
        }
        let lim = &cfg.limits;
        let key = |k: &str| format!("{}: key `limits.{k}`", path.display());
        if lim.max_connections == 0 {
            anyhow::bail!("{}: must be at least 1", key("max_connections"));
        }
        for (k, v) in [
            ("handshake_timeout", lim.handshake_timeout),
            ("header_timeout", lim.header_timeout),
            ("idle_timeout", lim.idle_timeout),
            ("body_timeout", lim.body_timeout),
        ] {
            if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&v) {
                anyhow::bail!("{}: must be between 1s and 1h", key(k));
            }
        }
        if lim.body_min_rate == 0 {
            anyhow::bail!(
                "{}: must be at least 1 (bytes per second)",
                key("body_min_rate")
            );
        }
        if let Some(u) = &cfg.external_url
            && (!u.starts_with("https://") || u.ends_with('/'))
        {
            anyhow::bail!(
                "{}: key `external_url`: must be https://host[:port] without a trailing /",
                path.display()
            );
        }
        check_signer(&cfg.signer, path, &src)?;
        if let Some(h) = &cfg.hawkbit {
            check_hawkbit(h, path, &src)?;
        }
        if let Some(t) = &cfg.terminal {
            let key = |k: &str| format!("{}: key `terminal.{k}`", path.display());
            if !t.jwks_url.starts_with("https://") {
                anyhow::bail!("{}: must be an https:// URL", key("jwks_url"));
            }
            if !(Duration::from_secs(10)..=thingsly_terminal::ticket::MAX_LIFETIME)
                .contains(&t.ticket_lifetime)
            {
                anyhow::bail!("{}: must be between 10s and 5m", key("ticket_lifetime"));
            }
            if t.max_sessions == 0 {
                anyhow::bail!("{}: must be at least 1", key("max_sessions"));
            }
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

    #[test]
    fn fleet_id_rules() {
        assert!(glob_match("dev-*", "dev-1"));
        assert!(glob_match("dev-*", "dev-"));
        assert!(!glob_match("dev-*", "xdev-1"));
        assert!(glob_match("*-lab", "a-lab"));
        assert!(!glob_match("*-lab", "a-lab2"));
        assert!(glob_match("dev-*-lab", "dev-9-lab"));
        assert!(!glob_match("dev-*-lab", "dev-9-prod"));
        assert!(!glob_match("a*a", "a"), "the two literals may not overlap");
        assert!(glob_match("exact", "exact") && !glob_match("exact", "exact2"));
        let e = EnrollmentSection {
            fleet_id_patterns: vec!["dev-*".into()],
            ..Default::default()
        };
        assert!(e.fleet_refuses("dev-7").is_none());
        assert!(e.fleet_refuses("observer").unwrap().contains("reserved"));
        assert!(e.fleet_refuses("OBSERVER").unwrap().contains("reserved"));
        assert!(
            e.fleet_refuses("prod-1")
                .unwrap()
                .contains("fleet_id_patterns")
        );
    }

    /// The file the Yocto recipe installs as /etc/thingsly/bridge.toml.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn example_config_in_repo_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("bridge.example.toml");
        let cfg = BridgeConfig::load(&path).unwrap();
        assert_eq!(cfg.data_dir, PathBuf::from("/var/lib/thingsly-bridge"));
        assert!(cfg.terminal.is_none());
    }

    const TERMINAL: &str = "[terminal]\njwks_url = \"https://id/certs\"\njwks_ca = \"/ca.pem\"\nissuer = \"i\"\naudience = \"a\"\npolicy = \"/p.csv\"\n";

    #[allow(clippy::unwrap_used)]
    #[test]
    fn signer_and_hawkbit_errors_name_key_and_line() {
        let err = |src: &str| format!("{:#}", load_str(src).unwrap_err());
        let e = err("listen = \"x\"\n[signer]\nbackend = \"step-ca\"\nurl = \"http://ca\"\n");
        assert!(
            e.ends_with(":4: key `signer.url`: must be an https:// URL"),
            "{e}"
        );
        let e = err(
            "[signer]\nbackend = \"step-ca\"\nurl = \"https://ca:9000\"\nprovisioner = \"p\"\nprovisioner_key = \"/k\"\n",
        );
        assert!(
            e.ends_with(":1: key `signer.root`: required with backend = \"step-ca\""),
            "{e}"
        );
        let e = err("[signer]\nurl = \"https://ca\"\n");
        assert!(
            e.contains(":2: key `signer.url`: only read with backend"),
            "{e}"
        );
        let e = err("[signer]\nbackend = \"stepca\"\n");
        assert!(e.contains(":2:") && e.contains("unknown variant"), "{e}");
        let ok = format!(
            "[signer]\nbackend = \"step-ca\"\nurl = \"https://ca:9000\"\nroot_fingerprint = \"{}\"\nprovisioner = \"p\"\nprovisioner_key = \"/k\"\n",
            "a".repeat(64)
        );
        assert!(load_str(&ok).is_ok());
        let hb = "[hawkbit]\nmgmt_url = \"https://hb\"\nmgmt_ca = \"/ca\"\nusername = \"u\"\npassword_file = \"/p\"\nddi_url = \"https://hb/\"\n";
        let e = err(hb);
        assert!(
            e.contains(":6: key `hawkbit.ddi_url`: must be https://"),
            "{e}"
        );
        let e = err(&hb
            .replace("https://hb/", "https://hb")
            .replace("\"u\"", "\"a:b\""));
        assert!(e.contains(":4: key `hawkbit.username`"), "{e}");
        let e = err(&format!(
            "{}group_as = \"label\"\n",
            hb.replace("https://hb/", "https://hb")
        ));
        assert!(e.contains(":7:") && e.contains("unknown variant"), "{e}");
    }

    fn load_str(src: &str) -> anyhow::Result<BridgeConfig> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("bridge.toml");
        std::fs::write(&p, src).unwrap();
        BridgeConfig::load(&p)
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn terminal_section_defaults_and_errors_name_key_and_line() {
        let t = load_str(TERMINAL).unwrap().terminal.unwrap();
        assert_eq!(t.listen.as_deref(), Some("127.0.0.1:8444"));
        assert_eq!((t.device_port, t.max_sessions), (7681, 64));
        assert_eq!(t.ticket_lifetime, Duration::from_secs(60));
        let off = load_str(&format!("{TERMINAL}listen = \"\"\n")).unwrap();
        assert_eq!(off.terminal.unwrap().listen, None);

        let err = load_str(&format!("{TERMINAL}ticket_lifetime = \"1h\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("key `terminal.ticket_lifetime`"), "{err}");
        let err = load_str(&TERMINAL.replace("https://id", "http://id"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("key `terminal.jwks_url`"), "{err}");
        let err = load_str(&format!("{TERMINAL}device_prot = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(":7:") && err.contains("device_prot"), "{err}");
        let err = load_str("[terminal]\njwks_url = \"https://x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("jwks_ca"), "{err}");
    }
}
