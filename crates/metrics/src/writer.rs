//! InfluxDB's write API, v1 (`/write`, Basic auth) and v2 (`/api/v2/write`, Token), with the
//! response classes Telegraf's outputs use, except that 401/403 keep the batch (a wrong
//! password must not lose data) and a v1 "database not found" creates the database once.

use crate::lineproto::Precision;
use std::io::Write;
use std::time::Duration;
use thingsly_core::config::{InfluxApi, InfluxSection};

/// What became of one write request.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Written,
    /// Keep the batch and try again later (network, 5xx, 429, 401/403, missing database).
    Retry {
        reason: String,
        /// The server's `Retry-After`, when it sent one.
        after: Option<Duration>,
    },
    /// InfluxDB refused the batch for good (parse error, type conflict, beyond retention …):
    /// drop it. With a partial write the valid points of it are stored.
    Rejected {
        reason: String,
    },
    /// 413: send fewer points per request.
    TooLarge,
}

pub struct Writer {
    http: reqwest::Client,
    write_url: reqwest::Url,
    query_url: Option<reqwest::Url>,
    database: String,
    auth: Option<String>,
    gzip: bool,
    proxies: thingsly_core::proxy::Proxies,
}

impl Writer {
    /// `ca_pem`: trust anchors for an https URL (the configured bundle or enrollment's chain).
    pub fn new(
        cfg: &InfluxSection,
        secret: &str,
        precision: Precision,
        ca_pem: Option<&[u8]>,
        proxies: &thingsly_core::proxy::Proxies,
    ) -> Result<Self, String> {
        let base = reqwest::Url::parse(cfg.url.trim_end_matches('/'))
            .map_err(|e| format!("metrics.influxdb.url {:?}: {e}", cfg.url))?;
        let https = base.scheme() == "https";
        let tls = match (https, ca_pem) {
            (true, Some(pem)) => thingsly_enroll::client_config(pem, None)?,
            (true, None) => {
                return Err(
                    "metrics.influxdb.url is https but there is no CA: set metrics.influxdb.ca_bundle or enroll first"
                        .into(),
                );
            }
            // Plain http never uses TLS; the client still wants a configuration.
            (false, _) => rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
        };
        if !https && !base.host_str().is_some_and(is_loopback) {
            tracing::warn!(url = %base, "InfluxDB over plain http to a non-loopback host: credentials and metrics travel unencrypted");
        }
        let http = proxies
            .configure(reqwest::Client::builder())
            .use_preconfigured_tls(tls)
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout)
            .user_agent(concat!("thingsly-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())?;
        let path_base = base.as_str().trim_end_matches('/').to_string();
        let (write_url, query_url, auth) = match cfg.api {
            InfluxApi::V1 => {
                let mut u = reqwest::Url::parse(&format!("{path_base}/write"))
                    .map_err(|e| e.to_string())?;
                {
                    let mut q = u.query_pairs_mut();
                    q.append_pair("db", &cfg.database);
                    if !cfg.retention_policy.is_empty() {
                        q.append_pair("rp", &cfg.retention_policy);
                    }
                    q.append_pair("precision", precision.as_str());
                }
                let query = (!cfg.skip_database_creation)
                    .then(|| reqwest::Url::parse(&format!("{path_base}/query")))
                    .transpose()
                    .map_err(|e| e.to_string())?;
                let auth = (!cfg.username.is_empty()).then(|| {
                    use base64::Engine;
                    let raw = format!("{}:{secret}", cfg.username);
                    format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD.encode(raw)
                    )
                });
                (u, query, auth)
            }
            InfluxApi::V2 => {
                let mut u = reqwest::Url::parse(&format!("{path_base}/api/v2/write"))
                    .map_err(|e| e.to_string())?;
                u.query_pairs_mut()
                    .append_pair("org", &cfg.organization)
                    .append_pair("bucket", &cfg.bucket)
                    .append_pair("precision", precision.as_str());
                let auth = (!secret.is_empty()).then(|| format!("Token {secret}"));
                (u, None, auth)
            }
        };
        Ok(Self {
            http,
            write_url,
            query_url,
            database: cfg.database.clone(),
            auth,
            gzip: cfg.gzip,
            proxies: proxies.clone(),
        })
    }

    /// The body as it goes on the wire (gzip when enabled).
    pub fn wire_body(&self, lines: &[u8]) -> Vec<u8> {
        if !self.gzip {
            return lines.to_vec();
        }
        let mut gz = flate2::write::GzEncoder::new(
            Vec::with_capacity(lines.len() / 4),
            flate2::Compression::default(),
        );
        // Writing into a Vec cannot fail.
        let _ = gz.write_all(lines);
        gz.finish().unwrap_or_default()
    }

    /// One write request for `lines` (newline-terminated line protocol).
    pub async fn write(&mut self, lines: &[u8]) -> Outcome {
        let body = self.wire_body(lines);
        let first = self.post(&body).await;
        if let Some(reason) = first.database_missing() {
            if self.query_url.is_none() {
                return Outcome::Retry {
                    reason: format!(
                        "{reason} (skip_database_creation is set: create it on the server)"
                    ),
                    after: None,
                };
            }
            if let Err(e) = self.create_database().await {
                return Outcome::Retry {
                    reason: format!("{reason}; creating it failed: {e}"),
                    after: None,
                };
            }
            return self.post(&body).await.outcome();
        }
        first.outcome()
    }

    async fn post(&self, body: &[u8]) -> Response {
        let mut req = self
            .http
            .post(self.write_url.clone())
            .header("Content-Type", "text/plain; charset=utf-8")
            .body(body.to_vec());
        if self.gzip {
            req = req.header("Content-Encoding", "gzip");
        }
        if let Some(a) = &self.auth {
            req = req.header("Authorization", a);
        }
        match req.send().await {
            Err(e) => Response::Network(self.proxies.error_text(&e)),
            Ok(r) => {
                let status = r.status().as_u16();
                let retry_after = r
                    .headers()
                    .get("Retry-After")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let text = r.text().await.unwrap_or_default();
                Response::Status {
                    status,
                    message: influx_message(&text),
                    retry_after,
                }
            }
        }
    }

    async fn create_database(&self) -> Result<(), String> {
        let Some(url) = &self.query_url else {
            return Ok(());
        };
        let q = format!("CREATE DATABASE \"{}\"", self.database.replace('"', "\\\""));
        let mut req = self.http.post(url.clone()).form(&[("q", q)]);
        if let Some(a) = &self.auth {
            req = req.header("Authorization", a);
        }
        let r = req.send().await.map_err(|e| self.proxies.error_text(&e))?;
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        // /query answers 200 even for a failed statement; the error is in the body.
        let err = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| {
                v.get("error")
                    .or_else(|| v.pointer("/results/0/error"))
                    .and_then(|e| e.as_str())
                    .map(String::from)
            });
        match (status.is_success(), err) {
            (true, None) => {
                tracing::info!(database = %self.database, "InfluxDB database created");
                Ok(())
            }
            (_, Some(e)) => Err(e),
            (false, None) => Err(format!("HTTP {status}")),
        }
    }
}

enum Response {
    Network(String),
    Status {
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
}

impl Response {
    fn database_missing(&self) -> Option<String> {
        match self {
            Response::Status {
                status: 404,
                message,
                ..
            } if message.contains("database not found") => Some(message.clone()),
            _ => None,
        }
    }

    fn outcome(self) -> Outcome {
        match self {
            Response::Network(e) => Outcome::Retry {
                reason: format!("InfluxDB unreachable: {e}"),
                after: None,
            },
            Response::Status {
                status,
                message,
                retry_after,
            } => classify(status, &message, retry_after),
        }
    }
}

/// Response classes (Telegraf's `influxdb` and `influxdb_v2` outputs, plus: auth failures keep
/// the batch, since the fix is a config change and the data is still good).
pub fn classify(status: u16, message: &str, retry_after: Option<Duration>) -> Outcome {
    match status {
        200..=299 => Outcome::Written,
        401 | 403 => Outcome::Retry {
            reason: format!(
                "InfluxDB refused the credentials (HTTP {status}: {message}); check metrics.influxdb username/password/token"
            ),
            after: retry_after,
        },
        404 if message.contains("database not found") => Outcome::Retry {
            reason: format!("HTTP 404: {message}"),
            after: retry_after,
        },
        413 => Outcome::TooLarge,
        429 => Outcome::Retry {
            reason: format!("InfluxDB is throttling (HTTP 429: {message})"),
            after: retry_after,
        },
        400..=499 => Outcome::Rejected {
            reason: format!("HTTP {status}: {message}"),
        },
        // 1.x answers "retention policy not found" with a 500: retrying cannot fix it.
        500 if message.contains("retention policy not found") => Outcome::Rejected {
            reason: format!("HTTP {status}: {message}"),
        },
        _ => Outcome::Retry {
            reason: format!("InfluxDB failed (HTTP {status}: {message})"),
            after: retry_after,
        },
    }
}

/// InfluxDB's `{"error":"…"}` (1.x and 2.x `message`) or the raw body, shortened.
fn influx_message(body: &str) -> String {
    let parsed = serde_json::from_str::<serde_json::Value>(body).ok();
    let msg = parsed
        .as_ref()
        .and_then(|v| v.get("error").or_else(|| v.get("message")))
        .and_then(|e| e.as_str())
        .map(String::from)
        .unwrap_or_else(|| body.trim().to_string());
    let mut msg: String = msg.chars().take(300).collect();
    if msg.is_empty() {
        msg = "(no message)".into();
    }
    msg
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_classes() {
        assert_eq!(classify(204, "", None), Outcome::Written);
        assert!(
            matches!(classify(401, "authorization failed", None), Outcome::Retry { reason, .. } if reason.contains("authorization failed"))
        );
        assert!(matches!(
            classify(400, "partial write: field type conflict", None),
            Outcome::Rejected { .. }
        ));
        assert_eq!(classify(413, "", None), Outcome::TooLarge);
        assert!(matches!(
            classify(429, "", Some(Duration::from_secs(7))),
            Outcome::Retry { after: Some(d), .. } if d == Duration::from_secs(7)
        ));
        assert!(matches!(classify(503, "", None), Outcome::Retry { .. }));
        assert!(matches!(
            classify(500, "retention policy not found: x", None),
            Outcome::Rejected { .. }
        ));
    }

    #[test]
    fn influx_error_body_is_extracted() {
        assert_eq!(
            influx_message("{\"error\":\"authorization failed\"}\n"),
            "authorization failed"
        );
        assert_eq!(influx_message("404 page not found\n"), "404 page not found");
        assert_eq!(influx_message(""), "(no message)");
    }

    #[test]
    fn v1_and_v2_urls_and_auth() {
        let mut c = InfluxSection {
            url: "http://127.0.0.1:8086/".into(),
            username: "agent".into(),
            retention_policy: "week".into(),
            ..Default::default()
        };
        let w = Writer::new(&c, "pw", Precision::S, None, &thingsly_core::proxy::DIRECT).unwrap();
        assert_eq!(
            w.write_url.as_str(),
            "http://127.0.0.1:8086/write?db=telegraf&rp=week&precision=s"
        );
        assert_eq!(w.auth.as_deref(), Some("Basic YWdlbnQ6cHc="));
        c.api = InfluxApi::V2;
        c.organization = "acme co".into();
        c.bucket = "edge".into();
        let w = Writer::new(
            &c,
            "tok",
            Precision::Ms,
            None,
            &thingsly_core::proxy::DIRECT,
        )
        .unwrap();
        assert_eq!(
            w.write_url.as_str(),
            "http://127.0.0.1:8086/api/v2/write?org=acme+co&bucket=edge&precision=ms"
        );
        assert_eq!(w.auth.as_deref(), Some("Token tok"));
        c.url = "https://influx.example".into();
        let Err(e) = Writer::new(&c, "", Precision::S, None, &thingsly_core::proxy::DIRECT) else {
            panic!("https without a CA must be refused");
        };
        assert!(e.contains("no CA"), "{e}");
    }
}
