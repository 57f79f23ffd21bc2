//! Outgoing HTTP proxies: one decision for every TCP connection the agent makes to a server
//! (enrollment and renewal, DDI polls and bundle downloads, InfluxDB writes, MQTT).
//!
//! - **Where the proxy comes from.** `[proxy] url` in the config wins. While it is empty (and
//!   `from_environment` is on, the default) the curl variables are read once at start, in
//!   reqwest's order: `HTTPS_PROXY`/`https_proxy` for TLS destinations, `HTTP_PROXY`/
//!   `http_proxy` for plain ones, `ALL_PROXY`/`all_proxy` for both, `NO_PROXY`/`no_proxy`.
//!   A unit's `Environment=` therefore works as it does for curl, and a config file works where
//!   the environment cannot be set.
//! - **What a proxy is.** An `http://host:port` proxy: TLS destinations go through a CONNECT
//!   tunnel, so the agent still verifies the server's certificate end to end and presents its
//!   own; only plain-http destinations (an InfluxDB on `http://`) are forwarded in the clear.
//!   `https://` and SOCKS proxies are refused with a clear error rather than half supported.
//!   The port must be written: proxies have no standard port (curl guesses 1080, reqwest 80).
//! - **MQTT** goes through the TLS destinations' proxy (it is TLS, tunnelled the same way).
//!   The WireGuard tunnel is UDP and cannot cross an HTTP proxy: it needs its own path.
//! - **`NO_PROXY`** is matched by hyper-util's curl-compatible matcher (the one reqwest uses),
//!   so MQTT and HTTP bypass the same hosts: `*`, domains with their subdomains, IPs, CIDRs.
//! - **Credentials.** In the config they live in `credentials_file` (`user:password`, one
//!   line, mode 0600), never in `proxy.url`, which is refused with userinfo: a config file is
//!   readable by more than the agent. From the environment, `http://user:pass@host:port` is
//!   accepted (percent-decoded) as curl accepts it. They are never logged: [`Proxies`]'s
//!   `Display` and `Debug` show host and port only.

use hyper_util::client::proxy::matcher::Matcher;
use serde::Deserialize;
use std::fmt;
use std::path::PathBuf;

/// `[proxy]` in `agent.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySection {
    /// `http://host:port`; empty: the environment decides (see the module doc).
    pub url: String,
    /// Hosts reached directly, curl's `NO_PROXY` syntax; used with `url`.
    pub no_proxy: String,
    /// `user:password` for a proxy that asks (407), used with `url`.
    pub credentials_file: Option<PathBuf>,
    /// Read `HTTPS_PROXY` and friends while `url` is empty.
    pub from_environment: bool,
}

impl Default for ProxySection {
    fn default() -> Self {
        Self {
            url: String::new(),
            no_proxy: String::new(),
            credentials_file: None,
            from_environment: true,
        }
    }
}

impl ProxySection {
    /// The config-time checks of `url` (key `proxy.url`); the file is read at start.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.url.is_empty() {
            if self.credentials_file.is_some() {
                return Err((
                    "proxy.credentials_file",
                    "is set but proxy.url is empty (environment proxies carry their own credentials)".into(),
                ));
            }
            return Ok(());
        }
        let server = parse_proxy_url(&self.url).map_err(|m| ("proxy.url", m))?;
        if server.credentials.is_some() {
            return Err((
                "proxy.url",
                "must not carry user:password (anyone who can read the config would see them); put `user:password` into proxy.credentials_file (mode 0600)".into(),
            ));
        }
        Ok(())
    }
}

/// A username and password for the proxy's Basic authentication. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({:?}, ***)", self.username)
    }
}

/// One proxy server: where it listens, how to log in, and where the setting came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyServer {
    pub host: String,
    pub port: u16,
    pub credentials: Option<Credentials>,
    /// `proxy.url` or the environment variable it was read from (for the log and errors).
    pub origin: &'static str,
}

impl ProxyServer {
    /// `http://host:port` without credentials (IPv6 hosts in brackets).
    pub fn url(&self) -> String {
        if self.host.contains(':') {
            format!("http://[{}]:{}", self.host, self.port)
        } else {
            format!("http://{}:{}", self.host, self.port)
        }
    }
}

/// A proxy setting that cannot be used, named by where it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct ProxyError {
    /// `proxy.url`, `proxy.credentials_file`, `HTTPS_PROXY`, ...
    pub origin: String,
    pub message: String,
}

/// The proxies in force for this process, resolved once at start.
#[derive(Clone)]
pub struct Proxies {
    http: Option<ProxyServer>,
    https: Option<ProxyServer>,
    no_proxy: String,
    /// `no_proxy`, compiled by hyper-util (a matcher that always proxies, except these).
    bypass: Option<std::sync::Arc<Matcher>>,
}

impl fmt::Debug for Proxies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// `https via proxy.corp:3128 (HTTPS_PROXY), http direct, no_proxy "localhost"`: no secrets.
impl fmt::Display for Proxies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let one = |p: &Option<ProxyServer>| match p {
            Some(p) => format!(
                "via {}:{} ({}{})",
                p.host,
                p.port,
                p.origin,
                if p.credentials.is_some() {
                    ", with credentials"
                } else {
                    ""
                }
            ),
            None => "direct".to_string(),
        };
        write!(f, "https {}, http {}", one(&self.https), one(&self.http))?;
        if !self.no_proxy.is_empty() {
            write!(f, ", no_proxy {:?}", self.no_proxy)?;
        }
        Ok(())
    }
}

/// Environment variables in the order reqwest and curl read them (upper case first).
const HTTPS_VARS: [&str; 2] = ["HTTPS_PROXY", "https_proxy"];
const HTTP_VARS: [&str; 2] = ["HTTP_PROXY", "http_proxy"];
const ALL_VARS: [&str; 2] = ["ALL_PROXY", "all_proxy"];
const NO_VARS: [&str; 2] = ["NO_PROXY", "no_proxy"];

/// No proxy at all, for clients that are never proxied (tests, tools).
pub static DIRECT: Proxies = Proxies::none();

impl Proxies {
    /// No proxy at all: every connection direct (and the environment ignored).
    pub const fn none() -> Self {
        Self {
            http: None,
            https: None,
            no_proxy: String::new(),
            bypass: None,
        }
    }

    /// From the config section and the environment (`env` is `std::env::var` in the agent),
    /// reading `credentials_file` when one is configured.
    pub fn resolve(
        section: &ProxySection,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ProxyError> {
        if !section.url.is_empty() {
            let mut server = parse_proxy_url(&section.url).map_err(|message| ProxyError {
                origin: "proxy.url".into(),
                message,
            })?;
            server.origin = "proxy.url";
            if let Some(path) = &section.credentials_file {
                let text = std::fs::read_to_string(path).map_err(|e| ProxyError {
                    origin: "proxy.credentials_file".into(),
                    message: format!("{}: {e}", path.display()),
                })?;
                server.credentials =
                    Some(parse_credentials(&text).map_err(|message| ProxyError {
                        origin: "proxy.credentials_file".into(),
                        message: format!("{}: {message}", path.display()),
                    })?);
            }
            return Ok(Self::new(
                Some(server.clone()),
                Some(server),
                &section.no_proxy,
            ));
        }
        if !section.from_environment {
            return Ok(Self::none());
        }
        let first = |names: [&'static str; 2]| {
            names.into_iter().find_map(|n| {
                env(n)
                    .map(|v| v.trim().to_string())
                    .filter(|v| !v.is_empty())
                    .map(|v| (n, v))
            })
        };
        let from_env = |names| -> Result<Option<ProxyServer>, ProxyError> {
            match first(names).or_else(|| first(ALL_VARS)) {
                None => Ok(None),
                Some((name, value)) => {
                    let mut s = parse_proxy_url(&value).map_err(|message| ProxyError {
                        origin: name.into(),
                        message,
                    })?;
                    s.origin = name;
                    Ok(Some(s))
                }
            }
        };
        let https = from_env(HTTPS_VARS)?;
        let http = from_env(HTTP_VARS)?;
        let no = first(NO_VARS).map(|(_, v)| v).unwrap_or_default();
        Ok(Self::new(http, https, &no))
    }

    fn new(http: Option<ProxyServer>, https: Option<ProxyServer>, no_proxy: &str) -> Self {
        let no_proxy = no_proxy.trim().to_string();
        let bypass = (!no_proxy.is_empty()).then(|| {
            std::sync::Arc::new(
                Matcher::builder()
                    .all("http://bypass-check.invalid:1")
                    .no(no_proxy.as_str())
                    .build(),
            )
        });
        Self {
            http,
            https,
            no_proxy,
            bypass,
        }
    }

    /// Whether any destination goes through a proxy.
    pub fn any(&self) -> bool {
        self.http.is_some() || self.https.is_some()
    }

    /// The proxy for a connection to `host` (a name or an IP, IPv6 without brackets), TLS
    /// (`secure`) or not; `None`: connect directly.
    pub fn for_destination(&self, secure: bool, host: &str) -> Option<&ProxyServer> {
        let server = if secure { &self.https } else { &self.http }.as_ref()?;
        if self.bypasses(host) {
            return None;
        }
        Some(server)
    }

    /// `host` is in `NO_PROXY` / `proxy.no_proxy`.
    fn bypasses(&self, host: &str) -> bool {
        let Some(m) = &self.bypass else {
            return false;
        };
        let authority = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        match format!("http://{authority}/").parse::<http::Uri>() {
            Ok(uri) => m.intercept(&uri).is_none(),
            // Not a host a URI can carry: nothing sane to match, so no exception either.
            Err(_) => false,
        }
    }

    /// A request error's text with its causes and, where a proxy carried it, which proxy:
    /// hyper-util reports a refused CONNECT only as "tunnel error: unsuccessful", without the
    /// proxy's status, so the agent says what the operator has to look at.
    pub fn error_text(&self, e: &reqwest::Error) -> String {
        let detail = crate::error_chain(e);
        match e.url() {
            Some(url) => self.annotate(url, detail),
            None => detail,
        }
    }

    fn annotate(&self, url: &reqwest::Url, detail: String) -> String {
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_string(),
            Some(url::Host::Ipv4(a)) => a.to_string(),
            Some(url::Host::Ipv6(a)) => a.to_string(),
            None => return detail,
        };
        let Some(p) = self.for_destination(url.scheme() == "https", &host) else {
            return detail;
        };
        if detail.contains("tunnel error") && !detail.contains("authorization required") {
            format!(
                "{detail} (the HTTP proxy {}:{} from {} refused the CONNECT: check its credentials, the ports it allows and its own route to the server)",
                p.host, p.port, p.origin
            )
        } else {
            format!(
                "{detail} (via the HTTP proxy {}:{} from {})",
                p.host, p.port, p.origin
            )
        }
    }

    /// A reqwest client that uses exactly these proxies: nothing read from the environment
    /// behind this decision's back, `NO_PROXY` applied by reqwest's own matcher.
    pub fn configure(&self, builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
        let mut builder = builder.no_proxy();
        let no = reqwest::NoProxy::from_string(&self.no_proxy);
        for (server, secure) in [(&self.https, true), (&self.http, false)] {
            let Some(s) = server else { continue };
            let made = if secure {
                reqwest::Proxy::https(s.url())
            } else {
                reqwest::Proxy::http(s.url())
            };
            // A URL we built from a parsed host and port always parses.
            let Ok(mut p) = made else { continue };
            if let Some(c) = &s.credentials {
                p = p.basic_auth(&c.username, &c.password);
            }
            builder = builder.proxy(p.no_proxy(no.clone()));
        }
        builder
    }
}

/// `http://[user:pass@]host:port[/]` (the scheme may be left out, as curl allows).
pub fn parse_proxy_url(text: &str) -> Result<ProxyServer, String> {
    let text = text.trim();
    let with_scheme = if text.contains("://") {
        text.to_string()
    } else {
        format!("http://{text}")
    };
    let url = reqwest::Url::parse(&with_scheme).map_err(|e| format!("{text:?}: {e}"))?;
    match url.scheme() {
        "http" => {}
        "https" => {
            return Err(format!(
                "{text:?}: a TLS connection to the proxy itself is not supported; use http://host:port (server connections stay TLS end to end through CONNECT)"
            ));
        }
        other => {
            return Err(format!(
                "{text:?}: {other}:// proxies are not supported, only http://host:port"
            ));
        }
    }
    let host = match url.host() {
        Some(url::Host::Domain(d)) => d.to_string(),
        Some(url::Host::Ipv4(a)) => a.to_string(),
        Some(url::Host::Ipv6(a)) => a.to_string(),
        None => return Err(format!("{text:?}: no host")),
    };
    // `Url::port` is None for the scheme's default (80) as well as for no port at all.
    let port = match url.port() {
        Some(p) => p,
        None if authority_has_port(&with_scheme) => 80,
        None => {
            return Err(format!(
                "{text:?}: write the proxy's port (e.g. :3128); proxies have no standard port"
            ));
        }
    };
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "{text:?}: a proxy URL is http://host:port, no path"
        ));
    }
    let credentials = if url.username().is_empty() && url.password().is_none() {
        None
    } else {
        let dec = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| format!("{text:?}: credentials are not UTF-8"))
        };
        Some(Credentials {
            username: dec(url.username())?,
            password: dec(url.password().unwrap_or_default())?,
        })
    };
    Ok(ProxyServer {
        host,
        port,
        credentials,
        origin: "",
    })
}

/// Whether `scheme://[userinfo@]host:port...` writes a port (`Url` hides an explicit `:80`).
fn authority_has_port(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    match host_port.rsplit_once(':') {
        Some((h, p)) => !p.is_empty() && (!h.starts_with('[') || h.ends_with(']')),
        None => false,
    }
}

/// The credentials file: `user:password` on its first line (the password may hold ':').
pub fn parse_credentials(text: &str) -> Result<Credentials, String> {
    let line = text
        .lines()
        .next()
        .unwrap_or_default()
        .trim_end_matches('\r');
    match line.split_once(':') {
        Some((u, p)) if !u.is_empty() => Ok(Credentials {
            username: u.to_string(),
            password: p.to_string(),
        }),
        _ => Err("must hold `user:password` on its first line".into()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    fn section(url: &str, no: &str) -> ProxySection {
        ProxySection {
            url: url.into(),
            no_proxy: no.into(),
            ..Default::default()
        }
    }

    #[test]
    fn proxy_urls_parse_or_say_what_is_wrong() {
        let ok = |t: &str| parse_proxy_url(t).unwrap();
        let p = ok("http://proxy.corp:3128");
        assert_eq!(
            (p.host.as_str(), p.port, p.credentials),
            ("proxy.corp", 3128, None)
        );
        assert_eq!(
            ok("proxy.corp:8080/").port,
            8080,
            "scheme optional, trailing / allowed"
        );
        assert_eq!(ok("http://proxy:80").port, 80, "an explicit :80 is kept");
        let v6 = ok("http://[::1]:3128");
        assert_eq!(
            (v6.host.as_str(), v6.url()),
            ("::1", "http://[::1]:3128".to_string())
        );
        let c = ok("http://us%40er:p%3Ass@10.0.0.1:3128")
            .credentials
            .unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("us@er", "p:ss")
        );
        for (bad, says) in [
            ("http://proxy.corp", "write the proxy's port"),
            ("https://proxy.corp:443", "TLS connection to the proxy"),
            (
                "socks5://proxy.corp:1080",
                "socks5:// proxies are not supported",
            ),
            ("http://proxy.corp:3128/path", "no path"),
            ("http://:3128", ""),
        ] {
            let e = parse_proxy_url(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn the_config_wins_over_the_environment() {
        let p = Proxies::resolve(
            &section("http://cfg:3128", ""),
            env(&[("HTTPS_PROXY", "http://envproxy:1"), ("NO_PROXY", "*")]),
        )
        .unwrap();
        let s = p.for_destination(true, "bridge.example").unwrap();
        assert_eq!((s.host.as_str(), s.origin), ("cfg", "proxy.url"));
        assert_eq!(p.for_destination(false, "influx").unwrap().host, "cfg");
    }

    #[test]
    fn the_environment_is_read_like_curl_and_reqwest() {
        let e = env(&[
            ("https_proxy", "http://lower:1"),
            ("HTTPS_PROXY", "http://upper:2"),
            ("ALL_PROXY", "http://all:3"),
        ]);
        let p = Proxies::resolve(&ProxySection::default(), e).unwrap();
        let s = p.for_destination(true, "x").unwrap();
        assert_eq!((s.host.as_str(), s.origin), ("upper", "HTTPS_PROXY"));
        let h = p.for_destination(false, "x").unwrap();
        assert_eq!(
            (h.host.as_str(), h.origin),
            ("all", "ALL_PROXY"),
            "ALL_PROXY fills in"
        );
        let only_http = Proxies::resolve(
            &ProxySection::default(),
            env(&[("http_proxy", "http://h:1")]),
        )
        .unwrap();
        assert!(only_http.for_destination(true, "x").is_none());
        assert!(only_http.for_destination(false, "x").is_some());
        let blank = Proxies::resolve(&ProxySection::default(), env(&[("HTTPS_PROXY", " ")]));
        assert!(!blank.unwrap().any(), "an empty variable is unset");
        let off = ProxySection {
            from_environment: false,
            ..Default::default()
        };
        assert!(
            !Proxies::resolve(&off, env(&[("HTTPS_PROXY", "http://p:1")]))
                .unwrap()
                .any()
        );
    }

    #[test]
    fn a_broken_environment_variable_is_named() {
        let e = Proxies::resolve(
            &ProxySection::default(),
            env(&[("https_proxy", "socks5://p:1")]),
        )
        .unwrap_err();
        assert_eq!(e.origin, "https_proxy");
        assert!(e.to_string().starts_with("https_proxy: "), "{e}");
    }

    #[test]
    fn no_proxy_follows_curl_rules_for_every_destination() {
        let p = Proxies::resolve(
            &section("http://p:3128", "localhost, .corp.example, 10.0.0.0/8, ::1"),
            env(&[]),
        )
        .unwrap();
        for direct in [
            "localhost",
            "corp.example",
            "a.corp.example",
            "10.1.2.3",
            "::1",
        ] {
            assert!(p.for_destination(true, direct).is_none(), "{direct}");
        }
        for proxied in [
            "bridge.example",
            "notcorp.example",
            "11.0.0.1",
            "::2",
            "127.0.0.1",
        ] {
            assert!(p.for_destination(true, proxied).is_some(), "{proxied}");
        }
        let star = Proxies::resolve(&section("http://p:3128", "*"), env(&[])).unwrap();
        assert!(star.for_destination(false, "anything").is_none());
    }

    #[test]
    fn credentials_come_from_their_file_and_never_show() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("cred");
        std::fs::write(&f, "agent:s3cr:et\n").unwrap();
        let s = ProxySection {
            credentials_file: Some(f.clone()),
            ..section("http://p:3128", "")
        };
        let p = Proxies::resolve(&s, env(&[])).unwrap();
        let c = p
            .for_destination(true, "x")
            .unwrap()
            .credentials
            .clone()
            .unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("agent", "s3cr:et")
        );
        for shown in [format!("{p}"), format!("{p:?}"), format!("{c:?}")] {
            assert!(!shown.contains("s3cr"), "{shown}");
        }
        assert!(format!("{p}").contains("with credentials"));
        std::fs::write(&f, "no colon\n").unwrap();
        let e = Proxies::resolve(&s, env(&[])).unwrap_err();
        assert_eq!(e.origin, "proxy.credentials_file");
        let missing = ProxySection {
            credentials_file: Some(dir.path().join("absent")),
            ..section("http://p:3128", "")
        };
        assert!(
            Proxies::resolve(&missing, env(&[]))
                .unwrap_err()
                .message
                .contains("absent")
        );
    }

    #[test]
    fn errors_say_which_proxy_carried_the_request() {
        let p = Proxies::resolve(&section("http://p:3128", "direct.example"), env(&[])).unwrap();
        let url = |u: &str| reqwest::Url::parse(u).unwrap();
        let refused = p.annotate(
            &url("https://bridge:8443/x"),
            "tunnel error: unsuccessful".into(),
        );
        assert!(
            refused.contains("the HTTP proxy p:3128 from proxy.url refused the CONNECT"),
            "{refused}"
        );
        let other = p.annotate(
            &url("http://influx:8086/write"),
            "connection refused".into(),
        );
        assert!(
            other.ends_with("(via the HTTP proxy p:3128 from proxy.url)"),
            "{other}"
        );
        let direct = p.annotate(&url("https://direct.example/"), "connection refused".into());
        assert_eq!(direct, "connection refused");
        let none = Proxies::none().annotate(&url("https://bridge/"), "x".into());
        assert_eq!(none, "x");
    }

    #[test]
    fn the_config_refuses_credentials_in_the_url() {
        let (key, why) = section("http://u:pw@p:3128", "").validate().unwrap_err();
        assert_eq!(key, "proxy.url");
        assert!(why.contains("credentials_file"), "{why}");
        let lone = ProxySection {
            credentials_file: Some("/x".into()),
            ..Default::default()
        };
        assert_eq!(lone.validate().unwrap_err().0, "proxy.credentials_file");
        assert!(section("", "").validate().is_ok());
    }
}
