//! An operator identity provider for tests, Keycloak-shaped: an HTTPS JWKS endpoint (real TLS,
//! certificate from the bridge's CA) and signing keys, ES256 generated here and RS256 from
//! `openssl genpkey` (ring cannot generate RSA keys). Keys can be added while it runs (key
//! rotation); every JWKS fetch is counted.

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p256::pkcs8::{EncodePrivateKey, LineEnding};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const ISSUER: &str = "https://id.thingsly.test/realms/ops";
pub const AUDIENCE: &str = "thingsly";
pub const JWKS_PATH: &str = "/realms/ops/protocol/openid-connect/certs";

pub struct SigningKey {
    pub kid: String,
    pub alg: Algorithm,
    key: EncodingKey,
    jwk: serde_json::Value,
}

impl SigningKey {
    pub fn es256(kid: &str) -> Self {
        let sk = p256::SecretKey::random(&mut rand_core::OsRng);
        let point =
            p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&sk.public_key(), false);
        Self {
            kid: kid.into(),
            alg: Algorithm::ES256,
            key: EncodingKey::from_ec_pem(sk.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes())
                .unwrap(),
            jwk: serde_json::json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig",
                "alg": "ES256", "x": b64(point.x().unwrap()), "y": b64(point.y().unwrap())}),
        }
    }

    pub fn rs256(kid: &str, dir: &Path) -> Self {
        let pem = dir.join(format!("{kid}.pem"));
        openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            pem.to_str().unwrap(),
        ]);
        let modulus = openssl(&["rsa", "-in", pem.to_str().unwrap(), "-noout", "-modulus"]);
        let hex_n = modulus.trim().trim_start_matches("Modulus=");
        let n: Vec<u8> = (0..hex_n.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex_n[i..i + 2], 16).unwrap())
            .collect();
        Self {
            kid: kid.into(),
            alg: Algorithm::RS256,
            key: EncodingKey::from_rsa_pem(&std::fs::read(&pem).unwrap()).unwrap(),
            jwk: serde_json::json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
                "n": b64(&n), "e": "AQAB"}),
        }
    }

    /// An access token as Keycloak issues it: `preferred_username`, realm roles, `aud`.
    pub fn token(&self, user: &str, roles: &[&str]) -> String {
        self.token_with(serde_json::json!({
            "preferred_username": user,
            "realm_access": {"roles": roles},
        }))
    }

    /// `extra` is merged over valid defaults (iss, aud, sub, iat, exp in 5 min).
    pub fn token_with(&self, extra: serde_json::Value) -> String {
        let now = unix_now();
        let mut claims = serde_json::json!({
            "iss": ISSUER, "aud": AUDIENCE, "sub": "0b1c-user", "iat": now, "exp": now + 300,
        });
        for (k, v) in extra.as_object().unwrap() {
            claims[k] = v.clone();
        }
        let mut h = Header::new(self.alg);
        h.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&h, &claims, &self.key).unwrap()
    }
}

fn openssl(args: &[&str]) -> String {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// What [`Idp::for_bridge`] set up.
pub struct Operators {
    pub idp: Idp,
    /// Published in the provider's JWKS; signs operator tokens.
    pub signing: SigningKey,
    /// The bridge's operator port (`terminal.listen`).
    pub operator_port: u16,
}

pub struct Idp {
    pub port: u16,
    keys: Arc<Mutex<Vec<serde_json::Value>>>,
    fetches: Arc<AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

impl Idp {
    /// Serve on a free loopback port with `cert`/`key` (PEM; cert chain first).
    pub async fn start(cert: &Path, key: &Path) -> Self {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Self::start_on(l, cert, key).await
    }

    /// Serve on `listener` (bound by the caller, e.g. inside a network namespace).
    pub async fn start_on(listener: std::net::TcpListener, cert: &Path, key: &Path) -> Self {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let port = listener.local_addr().unwrap().port();
        let keys: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
        let fetches = Arc::new(AtomicUsize::new(0));
        let (k, f) = (keys.clone(), fetches.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, k, f) = (acceptor.clone(), k.clone(), f.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let line = String::from_utf8_lossy(&head);
                    let (status, body) = if line.starts_with(&format!("GET {JWKS_PATH} ")) {
                        f.fetch_add(1, Ordering::SeqCst);
                        let keys = k.lock().unwrap().clone();
                        ("200 OK", serde_json::json!({ "keys": keys }).to_string())
                    } else {
                        ("404 Not Found", "{}".to_string())
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.write_all(resp.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        Self {
            port,
            keys,
            fetches,
            _task: task,
        }
    }

    pub fn publish(&self, key: &SigningKey) {
        self.keys.lock().unwrap().push(key.jwk.clone());
    }

    pub fn jwks_url(&self) -> String {
        format!("https://127.0.0.1:{}{JWKS_PATH}", self.port)
    }

    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// The `[terminal]` section of bridge.toml for this provider.
    /// Everything `bridge`'s terminal proxy needs from the operator side, before `bridge.start()`:
    /// a provider on `listener` (certificate from the bridge's CA) with one ES256 key
    /// published, `policy` (Casbin CSV) written to `dir`, and `[terminal]` appended to
    /// bridge.toml with `device_port` and a free operator port.
    pub async fn for_bridge(
        bridge: &crate::Bridge,
        dir: &Path,
        listener: std::net::TcpListener,
        policy: &str,
        device_port: u16,
    ) -> anyhow::Result<Operators> {
        let (crt, key) = (dir.join("idp.crt"), dir.join("idp.key"));
        let path = |p: &Path| p.to_string_lossy().into_owned();
        bridge.cli(&[
            "issue-server-cert",
            "--name",
            "127.0.0.1",
            "--out-cert",
            &path(&crt),
            "--out-key",
            &path(&key),
        ])?;
        let idp = Self::start_on(listener, &crt, &key).await;
        let signing = SigningKey::es256("op-1");
        idp.publish(&signing);
        let policy_file = dir.join("policy.csv");
        std::fs::write(&policy_file, policy)?;
        let operator_port = crate::free_port();
        let mut cfg = std::fs::read_to_string(&bridge.config)?;
        cfg.push_str(&idp.bridge_section(
            &bridge.ca_chain(),
            &policy_file,
            device_port,
            operator_port,
        ));
        std::fs::write(&bridge.config, cfg)?;
        Ok(Operators {
            idp,
            signing,
            operator_port,
        })
    }

    /// `operator_port`: the bridge's `terminal.listen` port.
    pub fn bridge_section(
        &self,
        ca: &Path,
        policy: &Path,
        device_port: u16,
        operator_port: u16,
    ) -> String {
        format!(
            "[terminal]\nlisten = \"127.0.0.1:{operator_port}\"\njwks_url = \"{}\"\njwks_ca = \"{}\"\nissuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"\npolicy = \"{}\"\ndevice_port = {device_port}\njwks_min_refresh = \"{}s\"\n",
            self.jwks_url(),
            ca.display(),
            policy.display(),
            Duration::from_secs(1).as_secs(),
        )
    }
}
