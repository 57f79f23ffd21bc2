//! Session tickets: short-lived ES256 JWTs the bridge signs for one device and one session.
//! Checked before any PTY exists; the public key is the one the device got at enrollment.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The `aud` every ticket carries.
pub const AUDIENCE: &str = "thingsly-terminal";
/// A ticket may not live longer than this (exp − iat), whatever the bridge says.
pub const MAX_LIFETIME: Duration = Duration::from_secs(300);
/// Clock skew tolerated on exp/iat.
const LEEWAY_SECS: u64 = 5;
/// Unexpired ticket ids remembered for replay detection; beyond it new tickets are refused
/// (fail closed) rather than forgetting one that could then be replayed.
const MAX_REMEMBERED: usize = 4096;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    /// The operator, for the audit log.
    pub sub: String,
    pub device: String,
    pub exp: u64,
    pub iat: u64,
    pub jti: String,
    /// The bridge may make a session read-only on top of the device's own setting.
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TicketError {
    #[error("no ticket (AuthToken is empty)")]
    Missing,
    #[error("ticket expired")]
    Expired,
    #[error("ticket is for device {0:?}")]
    WrongDevice(String),
    #[error("ticket already used")]
    Replayed,
    #[error("ticket lifetime over {}s", MAX_LIFETIME.as_secs())]
    TooLong,
    #[error("ticket signature invalid")]
    BadSignature,
    #[error("ticket malformed: {0}")]
    Malformed(String),
    #[error("too many tickets in flight")]
    Busy,
    #[error("ticket issued before this agent started; ask for a new one")]
    BeforeStart,
}

pub struct TicketVerifier {
    key: DecodingKey,
    device_id: String,
    /// jti → exp, for single use.
    seen: HashMap<String, u64>,
    /// When this verifier (the agent) started: tickets issued earlier are refused, because
    /// those used before a restart are not in `seen` any more.
    started: u64,
}

impl TicketVerifier {
    /// `public_key_pem`: the bridge's ticket key (SPKI PEM, P-256).
    pub fn new(public_key_pem: &[u8], device_id: &str) -> Result<Self, String> {
        let key = DecodingKey::from_ec_pem(public_key_pem)
            .map_err(|e| format!("ticket public key: {e}"))?;
        Ok(Self {
            key,
            device_id: device_id.to_string(),
            seen: HashMap::new(),
            started: unix_now(),
        })
    }

    /// Tickets issued before `t` (unix seconds) are refused (tests: a restart at `t`).
    pub fn started_at(mut self, t: u64) -> Self {
        self.started = t;
        self
    }

    /// Verify and consume a ticket.
    pub fn verify(&mut self, token: &str) -> Result<Claims, TicketError> {
        self.verify_at(token, unix_now())
    }

    pub fn verify_at(&mut self, token: &str, now: u64) -> Result<Claims, TicketError> {
        let c = self.check_at(token, now)?;
        self.consume(&c);
        Ok(c)
    }

    /// Everything [`TicketVerifier::verify`] checks, without using the ticket up.
    pub fn check(&mut self, token: &str) -> Result<Claims, TicketError> {
        self.check_at(token, unix_now())
    }

    /// Use up a ticket that [`TicketVerifier::check`] accepted.
    pub fn consume(&mut self, c: &Claims) {
        self.seen.insert(c.jti.clone(), c.exp);
    }

    pub fn check_at(&mut self, token: &str, now: u64) -> Result<Claims, TicketError> {
        if token.is_empty() {
            return Err(TicketError::Missing);
        }
        let mut v = Validation::new(Algorithm::ES256);
        v.set_audience(&[AUDIENCE]);
        v.set_required_spec_claims(&["exp", "aud"]);
        // exp is checked below against our own clock reading (testable, same leeway).
        v.validate_exp = false;
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::InvalidSignature | K::InvalidAlgorithm | K::InvalidEcdsaKey => {
                    TicketError::BadSignature
                }
                _ => TicketError::Malformed(e.to_string()),
            }
        })?;
        let c = data.claims;
        if c.exp + LEEWAY_SECS < now {
            return Err(TicketError::Expired);
        }
        if c.iat > now + LEEWAY_SECS || c.exp < c.iat || c.exp - c.iat > MAX_LIFETIME.as_secs() {
            return Err(TicketError::TooLong);
        }
        if c.device != self.device_id {
            return Err(TicketError::WrongDevice(c.device));
        }
        if c.iat < self.started {
            return Err(TicketError::BeforeStart);
        }
        self.seen.retain(|_, exp| *exp + LEEWAY_SECS >= now);
        if self.seen.contains_key(&c.jti) {
            return Err(TicketError::Replayed);
        }
        if self.seen.len() >= MAX_REMEMBERED {
            return Err(TicketError::Busy);
        }
        Ok(c)
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Claims {
    /// A ticket for `operator` on `device`, valid from now for `lifetime`; `jti` must be unique.
    pub fn new(operator: &str, device: &str, lifetime: Duration, jti: &str) -> Self {
        let now = unix_now();
        Self {
            sub: operator.into(),
            device: device.into(),
            iat: now,
            exp: now + lifetime.as_secs(),
            jti: jti.into(),
            read_only: false,
        }
    }
}

/// Signs tickets (the bridge; tests and benchmarks).
pub struct TicketSigner {
    key: EncodingKey,
}

impl TicketSigner {
    /// `private_pem`: PKCS#8 PEM of the P-256 ticket key.
    pub fn from_pem(private_pem: &[u8]) -> Result<Self, String> {
        EncodingKey::from_ec_pem(private_pem)
            .map(|key| Self { key })
            .map_err(|e| format!("ticket private key: {e}"))
    }

    pub fn sign(&self, claims: &Claims) -> Result<String, String> {
        #[derive(Serialize)]
        struct Signed<'a> {
            #[serde(flatten)]
            claims: &'a Claims,
            aud: &'static str,
        }
        let body = Signed {
            claims,
            aud: AUDIENCE,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::ES256), &body, &self.key)
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};

    /// A fresh key pair: (signer, public PEM).
    fn keys() -> (TicketSigner, String) {
        let sk = p256::SecretKey::random(&mut rand_core::OsRng);
        let pem = sk.to_pkcs8_pem(LineEnding::LF).unwrap();
        let public = sk.public_key().to_public_key_pem(LineEnding::LF).unwrap();
        (TicketSigner::from_pem(pem.as_bytes()).unwrap(), public)
    }

    fn ticket(s: &TicketSigner, device: &str, jti: &str, iat: u64, exp: u64) -> String {
        let mut c = Claims::new("alice@example.com", device, Duration::ZERO, jti);
        (c.iat, c.exp) = (iat, exp);
        s.sign(&c).unwrap()
    }

    #[test]
    fn accepts_once_and_refuses_the_rest() {
        let (s, public) = keys();
        let mut v = TicketVerifier::new(public.as_bytes(), "dev-1")
            .unwrap()
            .started_at(0);
        let now = 1_800_000_000;
        let t = ticket(&s, "dev-1", "a", now, now + 60);
        assert_eq!(v.verify_at(&t, now).unwrap().sub, "alice@example.com");
        assert_eq!(v.verify_at(&t, now + 1), Err(TicketError::Replayed));
        assert_eq!(v.verify_at("", now), Err(TicketError::Missing));
        let old = ticket(&s, "dev-1", "b", now - 200, now - 100);
        assert_eq!(v.verify_at(&old, now), Err(TicketError::Expired));
        let other = ticket(&s, "dev-2", "c", now, now + 60);
        assert_eq!(
            v.verify_at(&other, now),
            Err(TicketError::WrongDevice("dev-2".into()))
        );
        let long = ticket(&s, "dev-1", "d", now, now + 3600);
        assert_eq!(v.verify_at(&long, now), Err(TicketError::TooLong));
        let forged = ticket(&keys().0, "dev-1", "e", now, now + 60);
        assert_eq!(v.verify_at(&forged, now), Err(TicketError::BadSignature));
        // alg "none" / unsigned.
        let parts: Vec<&str> = t.split('.').collect();
        let unsigned = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.", parts[1]);
        assert!(v.verify_at(&unsigned, now).is_err());
        assert!(matches!(
            v.verify_at("garbage", now),
            Err(TicketError::Malformed(_))
        ));
    }

    #[test]
    fn tickets_from_before_a_restart_are_refused() {
        let (s, public) = keys();
        let now = 1_800_000_000;
        // Used once before the restart ...
        let t = ticket(&s, "dev-1", "a", now - 30, now + 30);
        let mut before = TicketVerifier::new(public.as_bytes(), "dev-1")
            .unwrap()
            .started_at(now - 60);
        assert!(before.verify_at(&t, now - 20).is_ok());
        // ... and replayed to the restarted agent, whose replay set is empty.
        let mut after = TicketVerifier::new(public.as_bytes(), "dev-1")
            .unwrap()
            .started_at(now - 10);
        assert_eq!(after.verify_at(&t, now), Err(TicketError::BeforeStart));
        let fresh = ticket(&s, "dev-1", "b", now, now + 30);
        assert!(after.verify_at(&fresh, now).is_ok());
    }

    #[test]
    fn a_checked_ticket_is_used_only_when_consumed() {
        let (s, public) = keys();
        let now = 1_800_000_000;
        let mut v = TicketVerifier::new(public.as_bytes(), "dev-1")
            .unwrap()
            .started_at(0);
        let t = ticket(&s, "dev-1", "a", now, now + 30);
        let c = v.check_at(&t, now).unwrap();
        assert!(
            v.check_at(&t, now).is_ok(),
            "still good: the device was full"
        );
        v.consume(&c);
        assert_eq!(v.check_at(&t, now), Err(TicketError::Replayed));
    }
}
