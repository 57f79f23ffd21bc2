//! The DDI client: hawkBit's device API over HTTPS (rustls, verified against the configured
//! or enrolled CA), authenticated by the enrolled certificate or a token.

use serde::de::DeserializeOwned;
use std::time::Duration;
use thingsly_proto::ddi::{ActionFeedback, ConfigData, ControllerBase};

#[derive(Debug)]
pub enum DdiError {
    /// Connection, TLS or timeout: try again later.
    Transport(String),
    /// The server answered with an error status (4xx are final for the request).
    Status(u16, String),
    /// 429 or 503: the server is busy (hawkBit limits reads per client address); try again
    /// later, not before its `Retry-After`.
    Throttled {
        status: u16,
        retry_after: Option<std::time::Duration>,
        message: String,
    },
    /// A 2xx body that is not what DDI promises.
    Malformed(String),
}

impl DdiError {
    /// What this failure means for the next poll ([`PollSchedule`]).
    ///
    /// [`PollSchedule`]: thingsly_core::poll_schedule::PollSchedule
    pub fn poll_outcome(&self) -> thingsly_core::poll_schedule::PollOutcome {
        use thingsly_core::poll_schedule::PollOutcome;
        match self {
            DdiError::Transport(_) | DdiError::Malformed(_) => PollOutcome::Failed,
            DdiError::Throttled { retry_after, .. } => PollOutcome::Throttled(*retry_after),
            DdiError::Status(408, _) => PollOutcome::Failed,
            DdiError::Status(s, _) if *s >= 500 => PollOutcome::Failed,
            DdiError::Status(..) => PollOutcome::Refused,
        }
    }
}

impl std::fmt::Display for DdiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DdiError::Transport(m) => write!(f, "DDI server unreachable: {m}"),
            DdiError::Status(s, m) => write!(f, "DDI server answered HTTP {s}: {m}"),
            DdiError::Throttled {
                status,
                retry_after,
                message,
            } => match retry_after {
                Some(d) => write!(
                    f,
                    "DDI server busy (HTTP {status}, Retry-After {}s): {message}",
                    d.as_secs()
                ),
                None => write!(f, "DDI server busy (HTTP {status}): {message}"),
            },
            DdiError::Malformed(m) => write!(f, "malformed DDI reply: {m}"),
        }
    }
}

#[derive(Clone)]
pub enum Auth {
    Certificate,
    Header(String),
}

#[derive(Clone)]
pub struct DdiClient {
    pub http: reqwest::Client,
    /// `https://host:port/{tenant}/controller/v1/{controllerId}`.
    pub base: String,
    auth: Option<String>,
    proxies: thingsly_core::proxy::Proxies,
}

/// The root poll's answer.
pub enum Poll {
    Changed(ControllerBase, Option<String>),
    NotModified,
}

impl DdiClient {
    pub fn new(
        server: &str,
        tenant: &str,
        controller_id: &str,
        tls: rustls::ClientConfig,
        auth: Auth,
        proxies: &thingsly_core::proxy::Proxies,
    ) -> Result<Self, String> {
        let http = proxies
            .configure(reqwest::Client::builder())
            .use_preconfigured_tls(tls)
            .https_only(true)
            .connect_timeout(Duration::from_secs(15))
            // Idle reads, not whole requests: a bundle download takes as long as it takes.
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("thingsly-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            http,
            base: format!(
                "{}/{tenant}/controller/v1/{controller_id}",
                server.trim_end_matches('/')
            ),
            auth: match auth {
                Auth::Certificate => None,
                Auth::Header(h) => Some(h),
            },
            proxies: proxies.clone(),
        })
    }

    /// The error with its source chain (the top level only says "error sending request", the
    /// chain says why: TLS, refused, timeout) and the proxy that carried it, if one did.
    pub fn error_text(&self, e: &reqwest::Error) -> String {
        self.proxies.error_text(e)
    }

    fn transport(&self, e: reqwest::Error) -> DdiError {
        DdiError::Transport(self.error_text(&e))
    }

    /// `TargetToken …`/`GatewayToken …`, or `None` with certificate authentication.
    pub fn auth_header(&self) -> Option<&str> {
        self.auth.as_deref()
    }

    pub fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, url).header(
            reqwest::header::ACCEPT,
            "application/hal+json, application/json",
        );
        match &self.auth {
            Some(h) => r.header(reqwest::header::AUTHORIZATION, h),
            None => r,
        }
    }

    async fn check(resp: reqwest::Response) -> Result<reqwest::Response, DdiError> {
        let status = resp.status();
        if status.is_success() || status == reqwest::StatusCode::NOT_MODIFIED {
            return Ok(resp);
        }
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                thingsly_core::poll_schedule::parse_retry_after(v, std::time::SystemTime::now())
            });
        let body = resp.text().await.unwrap_or_default();
        let msg = serde_json::from_str::<thingsly_proto::ddi::ExceptionInfo>(&body)
            .map(|e| format!("{} {}", e.error_code, e.message).trim().to_string())
            .unwrap_or_else(|_| body.chars().take(200).collect());
        match status.as_u16() {
            s @ (429 | 503) => Err(DdiError::Throttled {
                status: s,
                retry_after,
                message: msg,
            }),
            s => Err(DdiError::Status(s, msg)),
        }
    }

    async fn json<T: DeserializeOwned>(&self, resp: reqwest::Response) -> Result<T, DdiError> {
        let bytes = resp.bytes().await.map_err(|e| self.transport(e))?;
        serde_json::from_slice(&bytes).map_err(|e| DdiError::Malformed(e.to_string()))
    }

    /// The root resource, conditional on the last ETag.
    pub async fn poll(&self, etag: Option<&str>) -> Result<Poll, DdiError> {
        let mut r = self.request(reqwest::Method::GET, &self.base);
        if let Some(t) = etag {
            r = r.header(reqwest::header::IF_NONE_MATCH, t);
        }
        let resp = Self::check(r.send().await.map_err(|e| self.transport(e))?).await?;
        if resp.status() == reqwest::StatusCode::NOT_MODIFIED {
            return Ok(Poll::NotModified);
        }
        let etag = resp
            .headers()
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        Ok(Poll::Changed(self.json(resp).await?, etag))
    }

    pub async fn get<T: DeserializeOwned>(&self, href: &str) -> Result<T, DdiError> {
        let r = self.request(reqwest::Method::GET, href);
        self.json(Self::check(r.send().await.map_err(|e| self.transport(e))?).await?)
            .await
    }

    /// POST a feedback to `{href}/feedback` (`href` without query).
    pub async fn feedback(&self, href: &str, fb: &ActionFeedback) -> Result<(), DdiError> {
        let base = href.split('?').next().unwrap_or(href);
        let r = self
            .request(reqwest::Method::POST, &format!("{base}/feedback"))
            .json(fb);
        Self::check(r.send().await.map_err(|e| self.transport(e))?).await?;
        Ok(())
    }

    pub async fn put_config_data(&self, data: &ConfigData) -> Result<(), DdiError> {
        let r = self
            .request(reqwest::Method::PUT, &format!("{}/configData", self.base))
            .json(data);
        Self::check(r.send().await.map_err(|e| self.transport(e))?).await?;
        Ok(())
    }

    /// hawkBit's `PUT installedBase` (`DdiAssignedVersion`): what the device runs now without
    /// an action of the server's (a local install).
    pub async fn put_installed_base(
        &self,
        v: &crate::state::InstalledBase,
    ) -> Result<(), DdiError> {
        let r = self
            .request(
                reqwest::Method::PUT,
                &format!("{}/installedBase", self.base),
            )
            .json(v);
        Self::check(r.send().await.map_err(|e| self.transport(e))?).await?;
        Ok(())
    }

    /// The action's `deploymentBase` or `cancelAction` href on this server.
    pub fn action_href(&self, kind: &str, action_id: &str) -> String {
        format!("{}/{kind}/{action_id}", self.base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thingsly_core::poll_schedule::PollOutcome;

    #[test]
    fn failures_map_to_what_the_next_poll_does() {
        let busy = |status, secs: Option<u64>| DdiError::Throttled {
            status,
            retry_after: secs.map(std::time::Duration::from_secs),
            message: String::new(),
        };
        assert_eq!(
            busy(429, Some(7)).poll_outcome(),
            PollOutcome::Throttled(Some(std::time::Duration::from_secs(7)))
        );
        assert_eq!(busy(503, None).poll_outcome(), PollOutcome::Throttled(None));
        assert_eq!(
            DdiError::Transport("x".into()).poll_outcome(),
            PollOutcome::Failed
        );
        assert_eq!(
            DdiError::Status(502, String::new()).poll_outcome(),
            PollOutcome::Failed
        );
        assert_eq!(
            DdiError::Status(408, String::new()).poll_outcome(),
            PollOutcome::Failed
        );
        // A target hawkBit does not know yet: polled at the interval, not backed off.
        assert_eq!(
            DdiError::Status(401, String::new()).poll_outcome(),
            PollOutcome::Refused
        );
        assert!(busy(429, Some(7)).to_string().contains("Retry-After 7s"));
    }
}
