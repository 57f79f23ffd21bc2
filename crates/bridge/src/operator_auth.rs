//! Who an operator is: their identity provider's JWT (Keycloak-style OIDC access token),
//! checked against the provider's JWKS. The first piece of the terminal proxy (issue 5): the
//! proxy calls `verify` before any policy check or connection to a device.
//!
//! RS256 and ES256 only; keys cached and refetched when a token names an unknown `kid` (at most
//! once per `min_refresh`, so a flood of bogus kids cannot hammer the provider); `exp`, `nbf`,
//! `iss` and `aud` always checked.

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, RwLock};

#[derive(Debug, Clone)]
pub struct OperatorAuthConfig {
    pub jwks_url: String,
    pub issuer: String,
    pub audience: String,
    pub min_refresh: Duration,
    pub leeway: Duration,
}

/// A verified operator.
#[derive(Debug, Clone, PartialEq)]
pub struct Operator {
    /// `preferred_username` when present (what policies name), else `sub`.
    pub name: String,
    /// Keycloak realm roles and the roles of the audience client.
    pub roles: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AuthError {
    #[error("no token")]
    Missing,
    #[error("token malformed: {0}")]
    Malformed(String),
    #[error("algorithm {0:?} not accepted (RS256, ES256)")]
    Algorithm(Algorithm),
    #[error("unknown signing key {0:?}")]
    UnknownKey(String),
    #[error("token signature invalid")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet")]
    NotYetValid,
    #[error("token issuer is not {0}")]
    Issuer(String),
    #[error("token audience does not include {0}")]
    Audience(String),
    #[error("identity provider keys unavailable: {0}")]
    Jwks(String),
}

pub struct OperatorAuth {
    cfg: OperatorAuthConfig,
    /// `None` in tests that hand the keys over directly.
    http: Option<reqwest::Client>,
    keys: RwLock<JwkSet>,
    last_fetch: Mutex<Option<Instant>>,
}

impl OperatorAuth {
    /// `ca_pem`: trust anchors for the JWKS URL (https only).
    pub fn new(cfg: OperatorAuthConfig, ca_pem: &[u8]) -> anyhow::Result<Self> {
        anyhow::ensure!(
            cfg.jwks_url.starts_with("https://"),
            "terminal.jwks_url must be https"
        );
        let tls = thingsly_enroll::client_config(ca_pem, None).map_err(anyhow::Error::msg)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .https_only(true)
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Self {
            cfg,
            http: Some(http),
            keys: RwLock::new(JwkSet { keys: Vec::new() }),
            last_fetch: Mutex::new(None),
        })
    }

    /// With a fixed key set and no provider to ask (tests, offline setups).
    pub fn with_keys(cfg: OperatorAuthConfig, keys: JwkSet) -> Self {
        Self {
            cfg,
            http: None,
            keys: RwLock::new(keys),
            last_fetch: Mutex::new(None),
        }
    }

    pub async fn verify(&self, token: &str) -> Result<Operator, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Malformed(e.to_string()))?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(AuthError::Algorithm(header.alg));
        }
        let kid = header.kid.unwrap_or_default();
        let key = match self.key(&kid).await {
            Some(k) => k,
            None => {
                self.refresh().await?;
                self.key(&kid)
                    .await
                    .ok_or_else(|| AuthError::UnknownKey(kid.clone()))?
            }
        };
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[&self.cfg.issuer]);
        v.set_audience(&[&self.cfg.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.validate_nbf = true;
        v.leeway = self.cfg.leeway.as_secs();
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::InvalidSignature | K::InvalidEcdsaKey | K::InvalidRsaKey(_) => {
                    AuthError::BadSignature
                }
                K::ExpiredSignature => AuthError::Expired,
                K::ImmatureSignature => AuthError::NotYetValid,
                K::InvalidIssuer => AuthError::Issuer(self.cfg.issuer.clone()),
                K::InvalidAudience => AuthError::Audience(self.cfg.audience.clone()),
                _ => AuthError::Malformed(e.to_string()),
            }
        })?;
        let c = data.claims;
        let name = c["preferred_username"]
            .as_str()
            .or_else(|| c["sub"].as_str())
            .unwrap_or_default()
            .to_string();
        let mut roles: Vec<String> = Vec::new();
        for list in [
            &c["realm_access"]["roles"],
            &c["resource_access"][&self.cfg.audience]["roles"],
        ] {
            roles.extend(
                list.as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|r| r.as_str().map(String::from)),
            );
        }
        Ok(Operator { name, roles })
    }

    async fn key(&self, kid: &str) -> Option<DecodingKey> {
        let keys = self.keys.read().await;
        let jwk = if kid.is_empty() && keys.keys.len() == 1 {
            keys.keys.first()
        } else {
            keys.find(kid)
        }?;
        DecodingKey::from_jwk(jwk).ok()
    }

    async fn refresh(&self) -> Result<(), AuthError> {
        let Some(http) = &self.http else {
            return Ok(());
        };
        let mut last = self.last_fetch.lock().await;
        if last.is_some_and(|t| t.elapsed() < self.cfg.min_refresh) {
            return Ok(());
        }
        *last = Some(Instant::now());
        let set: JwkSet = http
            .get(&self.cfg.jwks_url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| AuthError::Jwks(thingsly_core::error_chain(&e)))?
            .json()
            .await
            .map_err(|e| AuthError::Jwks(e.to_string()))?;
        tracing::info!(keys = set.keys.len(), url = %self.cfg.jwks_url, "operator keys refreshed");
        *self.keys.write().await = set;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use base64::Engine;
    use jsonwebtoken::{EncodingKey, Header};
    use p256::pkcs8::{EncodePrivateKey, LineEnding};

    fn cfg() -> OperatorAuthConfig {
        OperatorAuthConfig {
            jwks_url: String::new(),
            issuer: "https://id.example/realms/ops".into(),
            audience: "thingsly".into(),
            min_refresh: Duration::from_secs(30),
            leeway: Duration::from_secs(5),
        }
    }

    struct Idp {
        key: EncodingKey,
        jwk: serde_json::Value,
    }

    fn idp(kid: &str) -> Idp {
        let sk = p256::SecretKey::random(&mut rand_core::OsRng);
        let point =
            p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&sk.public_key(), false);
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        Idp {
            key: EncodingKey::from_ec_pem(sk.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes())
                .unwrap(),
            jwk: serde_json::json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
                "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap())}),
        }
    }

    fn token(idp: &Idp, kid: &str, claims: serde_json::Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(&h, &claims, &idp.key).unwrap()
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn claims(extra: serde_json::Value) -> serde_json::Value {
        let mut c = serde_json::json!({"sub": "u-1", "preferred_username": "alice",
            "iss": "https://id.example/realms/ops", "aud": ["thingsly", "account"],
            "exp": now() + 60, "iat": now(), "realm_access": {"roles": ["operator"]},
            "resource_access": {"thingsly": {"roles": ["terminal"]}}});
        if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                c.insert(k.clone(), v.clone());
            }
        }
        c
    }

    #[tokio::test]
    async fn keycloak_style_tokens() {
        let a = idp("k1");
        let keys: JwkSet = serde_json::from_value(serde_json::json!({"keys": [a.jwk]})).unwrap();
        let auth = OperatorAuth::with_keys(cfg(), keys);
        let op = auth
            .verify(&token(&a, "k1", claims(serde_json::json!({}))))
            .await
            .unwrap();
        assert_eq!(
            op,
            Operator {
                name: "alice".into(),
                roles: vec!["operator".into(), "terminal".into()]
            }
        );
        let cases = [
            (
                claims(serde_json::json!({"exp": now() - 600})),
                AuthError::Expired,
            ),
            (
                claims(serde_json::json!({"nbf": now() + 600})),
                AuthError::NotYetValid,
            ),
            (
                claims(serde_json::json!({"iss": "https://evil.example"})),
                AuthError::Issuer(cfg().issuer),
            ),
            (
                claims(serde_json::json!({"aud": "other"})),
                AuthError::Audience("thingsly".into()),
            ),
        ];
        for (c, want) in cases {
            assert_eq!(auth.verify(&token(&a, "k1", c)).await.unwrap_err(), want);
        }
        let b = idp("k2");
        assert_eq!(
            auth.verify(&token(&b, "k2", claims(serde_json::json!({}))))
                .await
                .unwrap_err(),
            AuthError::UnknownKey("k2".into())
        );
        // Right kid, wrong key: the signature does not verify.
        assert_eq!(
            auth.verify(&token(&b, "k1", claims(serde_json::json!({}))))
                .await
                .unwrap_err(),
            AuthError::BadSignature
        );
        let hs = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims(serde_json::json!({})),
            &EncodingKey::from_secret(b"guessable"),
        )
        .unwrap();
        assert_eq!(
            auth.verify(&hs).await.unwrap_err(),
            AuthError::Algorithm(Algorithm::HS256)
        );
        assert_eq!(auth.verify("").await.unwrap_err(), AuthError::Missing);
    }
}
