//! step-ca as the signer of device certificates (`[signer] backend = "step-ca"`). For every
//! enrollment and renewal the bridge mints a one-time token (OTT) with step-ca's JWK
//! provisioner key and has step-ca sign the device's CSR (`POST /1.0/sign`).
//!
//! What step-ca checks, read in smallstep/certificates @ 1c44aec (cited in
//! `tests/harness/step_ca.rs`, which applies the same rules): the token's `kid` and `iss`
//! select the provisioner (`collection.go` LoadByToken), its ES256 signature, `nbf`/`exp`/`iat`
//! with a minute of leeway, `aud` one of `https://HOST/1.0/sign` with the port ignored, a
//! non-empty `sub` (`jwk.go` authorizeToken), `jti` used once (`authorize.go` UseToken); then
//! the CSR's CN must be `sub` or one of `sans`, and each kind of SAN in the CSR must equal the
//! token's `sans` as a set (`sign_options.go`), an empty `sans` standing for `[sub]`
//! (`jwk.go` AuthorizeSign). The token here names the device id as `sub` and as its one SAN,
//! which is what the agent's CSR carries.

use anyhow::Context;
use base64::Engine;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

use crate::ca::Issued;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// How long a token is good for: what `step ca token` gives its tokens.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(300);
/// step-ca's answer is a few certificates; anything much larger is not one.
const MAX_ANSWER: usize = 256 * 1024;
/// PBKDF2 rounds accepted in an encrypted key (step writes 100,000 or 600,000): bounds the
/// work a crafted file can cause at start.
const MAX_P2C: u32 = 10_000_000;

/// Why step-ca did not give a certificate. Each reaches the device as its own error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignFailure {
    /// step-ca refused the bridge's token (401): provisioner name, key, clock or audience.
    TokenRefused(String),
    /// step-ca refused the certificate (400/403): SANs, lifetime, name policy.
    PolicyRefused(String),
    /// step-ca unreachable, timing out, overloaded or failing (transport error, 429, 5xx).
    Unavailable(String),
    /// A 2xx answer that is not a certificate for this device's key from step-ca's root.
    BadAnswer(String),
}

impl std::fmt::Display for SignFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TokenRefused(m) => write!(f, "step-ca refused the bridge's token: {m}"),
            Self::PolicyRefused(m) => write!(f, "step-ca refused the certificate: {m}"),
            Self::Unavailable(m) => write!(f, "step-ca unavailable: {m}"),
            Self::BadAnswer(m) => write!(f, "step-ca's answer is not usable: {m}"),
        }
    }
}

/// A non-2xx answer of step-ca (`{"status": N, "message": "..."}`, errs/error.go) as a
/// [`SignFailure`]. The message is step-ca's, cut to printable ASCII and 300 bytes.
pub fn refusal(status: u16, body: &[u8]) -> SignFailure {
    #[derive(serde::Deserialize)]
    struct StepError {
        message: String,
    }
    let raw = serde_json::from_slice::<StepError>(body)
        .map(|e| e.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned());
    let mut msg: String = raw
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(300)
        .collect();
    if msg.is_empty() {
        msg = "(no message)".into();
    }
    let msg = format!("HTTP {status}: {msg}");
    match status {
        401 => SignFailure::TokenRefused(msg),
        400 | 403 | 404 | 409 | 412 | 422 => SignFailure::PolicyRefused(msg),
        _ => SignFailure::Unavailable(msg),
    }
}

/// The provisioner's private key (P-256) and its id, the token's `kid`.
pub struct ProvisionerKey {
    kid: String,
    pair: EcdsaKeyPair,
}

#[derive(serde::Deserialize)]
struct Jwk {
    kty: String,
    crv: String,
    x: String,
    y: String,
    d: Option<String>,
    kid: Option<String>,
    alg: Option<String>,
}

impl ProvisionerKey {
    /// `src`: the private JWK (JSON, as `step crypto jwk create --insecure --no-password`
    /// writes it) or its encrypted form (JWE, compact as in ca.json's `encryptedKey` or JSON
    /// as `step crypto jwk create` writes it), which needs `password`.
    pub fn parse(src: &str, password: Option<&[u8]>) -> Result<Self, String> {
        let src = src.trim();
        let is_jwe = src.split('.').count() == 5 || src.contains("\"ciphertext\"");
        let plain = if is_jwe {
            let pw = password.ok_or(
                "the key is encrypted; set signer.provisioner_password_file to its password file",
            )?;
            decrypt_jwe(src, pw)?
        } else {
            src.as_bytes().to_vec()
        };
        let jwk: Jwk = serde_json::from_slice(&plain)
            .map_err(|e| format!("not a JWK (JSON with kty, crv, x, y, d): {e}"))?;
        if jwk.kty != "EC" || jwk.crv != "P-256" {
            return Err(format!(
                "the key is {} {}; the bridge signs with EC P-256 (ES256) provisioner keys",
                jwk.kty, jwk.crv
            ));
        }
        if let Some(a) = &jwk.alg
            && a != "ES256"
        {
            return Err(format!("the key's alg is {a}, not ES256"));
        }
        let d = B64
            .decode(jwk.d.as_deref().ok_or("the JWK has no private part (d)")?)
            .map_err(|_| "d is not base64url")?;
        let (x, y) = (
            B64.decode(&jwk.x).map_err(|_| "x is not base64url")?,
            B64.decode(&jwk.y).map_err(|_| "y is not base64url")?,
        );
        let mut point = vec![4u8];
        point.extend_from_slice(&x);
        point.extend_from_slice(&y);
        let pair = EcdsaKeyPair::from_private_key_and_public_key(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &d,
            &point,
            &ring::rand::SystemRandom::new(),
        )
        .map_err(|_| "d, x and y are not one P-256 key pair")?;
        let kid = jwk.kid.unwrap_or_else(|| thumbprint(&jwk.x, &jwk.y));
        Ok(Self { kid, pair })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public half as step-ca's ca.json lists it under the provisioner's `key`.
    pub fn public_jwk(&self) -> serde_json::Value {
        let p = self.pair.public_key().as_ref();
        serde_json::json!({"use": "sig", "kty": "EC", "kid": self.kid, "crv": "P-256",
            "alg": "ES256", "x": B64.encode(&p[1..33]), "y": B64.encode(&p[33..65])})
    }

    /// A compact JWS (ES256) of `claims`, with this key's `kid`.
    pub fn sign_jwt(&self, claims: &serde_json::Value) -> Result<String, String> {
        let header = serde_json::json!({"alg": "ES256", "kid": self.kid, "typ": "JWT"});
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let sig = self
            .pair
            .sign(&ring::rand::SystemRandom::new(), input.as_bytes())
            .map_err(|_| "ECDSA signing failed")?;
        Ok(format!("{input}.{}", B64.encode(sig.as_ref())))
    }
}

/// RFC 7638 thumbprint of a P-256 public key: what `step` uses as a key's id.
pub fn thumbprint(x: &str, y: &str) -> String {
    let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    B64.encode(Sha256::digest(canonical.as_bytes()))
}

/// SHA-256 of a certificate (hex): how step names its root (`step certificate fingerprint`).
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// [`fingerprint`] of the first certificate in `pem`, if it holds one.
pub fn pem_fingerprint(pem: &str) -> Option<String> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .ok()
        .map(|d| fingerprint(d.as_ref()))
}

/// The five parts of a JWE, from either serialization.
struct JweParts {
    protected: String,
    encrypted_key: Vec<u8>,
    iv: Vec<u8>,
    ciphertext: Vec<u8>,
    tag: Vec<u8>,
}

fn jwe_parts(src: &str) -> Result<JweParts, String> {
    let d = |s: &str, what: &str| {
        B64.decode(s)
            .map_err(|_| format!("JWE {what} is not base64url"))
    };
    if src.starts_with('{') {
        #[derive(serde::Deserialize)]
        struct Json {
            protected: String,
            encrypted_key: String,
            iv: String,
            ciphertext: String,
            tag: String,
        }
        let j: Json = serde_json::from_str(src).map_err(|e| format!("JWE JSON: {e}"))?;
        return Ok(JweParts {
            encrypted_key: d(&j.encrypted_key, "encrypted_key")?,
            iv: d(&j.iv, "iv")?,
            ciphertext: d(&j.ciphertext, "ciphertext")?,
            tag: d(&j.tag, "tag")?,
            protected: j.protected,
        });
    }
    let p: Vec<&str> = src.split('.').collect();
    let [protected, ek, iv, ct, tag] = p.as_slice() else {
        return Err("a compact JWE has five parts".into());
    };
    Ok(JweParts {
        protected: protected.to_string(),
        encrypted_key: d(ek, "encrypted_key")?,
        iv: d(iv, "iv")?,
        ciphertext: d(ct, "ciphertext")?,
        tag: d(tag, "tag")?,
    })
}

#[derive(serde::Deserialize, serde::Serialize)]
struct JweHeader {
    alg: String,
    enc: String,
    p2s: String,
    p2c: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    zip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cty: Option<String>,
}

const PBES2_ALG: &str = "PBES2-HS256+A128KW";

/// The key encryption key of PBES2-HS256+A128KW (RFC 7518 §4.8): PBKDF2-SHA256 over the
/// password, salted with the algorithm's name, a zero byte and `p2s`.
fn pbes2_kek(password: &[u8], p2s: &[u8], p2c: u32) -> Result<[u8; 16], String> {
    let rounds = std::num::NonZeroU32::new(p2c).ok_or("p2c is 0")?;
    if p2c > MAX_P2C {
        return Err(format!("p2c {p2c} is over {MAX_P2C}"));
    }
    let mut salt = PBES2_ALG.as_bytes().to_vec();
    salt.push(0);
    salt.extend_from_slice(p2s);
    let mut kek = [0u8; 16];
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        rounds,
        &salt,
        password,
        &mut kek,
    );
    Ok(kek)
}

/// Decrypt step's encrypted JWK: PBES2-HS256+A128KW key wrapping, A256GCM content.
pub fn decrypt_jwe(src: &str, password: &[u8]) -> Result<Vec<u8>, String> {
    let parts = jwe_parts(src)?;
    let header: JweHeader = serde_json::from_slice(
        &B64.decode(&parts.protected)
            .map_err(|_| "JWE header is not base64url")?,
    )
    .map_err(|e| format!("JWE header: {e}"))?;
    if header.alg != PBES2_ALG || header.enc != "A256GCM" {
        return Err(format!(
            "JWE {} / {}: only {PBES2_ALG} / A256GCM (what step writes) is read",
            header.alg, header.enc
        ));
    }
    if header.zip.is_some() {
        return Err("compressed JWE payloads are not read".into());
    }
    let salt = B64
        .decode(&header.p2s)
        .map_err(|_| "p2s is not base64url")?;
    let kek = aes_kw::KekAes128::from(pbes2_kek(password, &salt, header.p2c)?);
    let mut cek = [0u8; 32];
    if parts.encrypted_key.len() != 40 {
        return Err("the wrapped content key must be 40 bytes (A256GCM)".into());
    }
    kek.unwrap(&parts.encrypted_key, &mut cek)
        .map_err(|_| "wrong password (the content key does not unwrap)")?;
    let key = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &cek).map_err(|_| "bad key")?,
    );
    let nonce = ring::aead::Nonce::try_assume_unique_for_key(&parts.iv)
        .map_err(|_| "the JWE iv must be 12 bytes")?;
    let mut buf = parts.ciphertext;
    buf.extend_from_slice(&parts.tag);
    let plain = key
        .open_in_place(
            nonce,
            ring::aead::Aad::from(parts.protected.as_bytes()),
            &mut buf,
        )
        .map_err(|_| "the JWE does not decrypt (corrupt file)")?;
    Ok(plain.to_vec())
}

/// The inverse of [`decrypt_jwe`] (compact serialization): for tests, and for operators who
/// make a provisioner key without the step CLI.
pub fn encrypt_jwe(plain: &[u8], password: &[u8], p2c: u32) -> Result<String, String> {
    use rand_core::RngCore;
    let mut salt = [0u8; 16];
    let mut cek = [0u8; 32];
    let mut iv = [0u8; 12];
    for b in [&mut salt[..], &mut cek, &mut iv] {
        rand_core::OsRng.fill_bytes(b);
    }
    let header = JweHeader {
        alg: PBES2_ALG.into(),
        enc: "A256GCM".into(),
        p2s: B64.encode(salt),
        p2c,
        zip: None,
        cty: Some("jwk+json".into()),
    };
    let protected = B64.encode(serde_json::to_vec(&header).map_err(|e| e.to_string())?);
    let kek = aes_kw::KekAes128::from(pbes2_kek(password, &salt, p2c)?);
    let mut wrapped = [0u8; 40];
    kek.wrap(&cek, &mut wrapped)
        .map_err(|_| "key wrap failed")?;
    let key = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &cek).map_err(|_| "bad key")?,
    );
    let mut buf = plain.to_vec();
    let tag = key
        .seal_in_place_separate_tag(
            ring::aead::Nonce::assume_unique_for_key(iv),
            ring::aead::Aad::from(protected.as_bytes()),
            &mut buf,
        )
        .map_err(|_| "encryption failed")?;
    Ok(format!(
        "{protected}.{}.{}.{}.{}",
        B64.encode(wrapped),
        B64.encode(iv),
        B64.encode(&buf),
        B64.encode(tag.as_ref())
    ))
}

/// The claims of the one-time token for `device_id`, as `step ca token` makes them for a JWK
/// provisioner: `sans` is exactly the device id (the agent's CSR carries it as its SAN).
pub fn token_claims(
    provisioner: &str,
    audience: &str,
    device_id: &str,
    root_fingerprint: &str,
    now_unix: u64,
    jti: &str,
) -> serde_json::Value {
    serde_json::json!({
        "iss": provisioner,
        "sub": device_id,
        "aud": audience,
        "sans": [device_id],
        "nbf": now_unix,
        "iat": now_unix,
        "exp": now_unix + TOKEN_LIFETIME.as_secs(),
        "jti": jti,
        "sha": root_fingerprint,
    })
}

/// A certificate step-ca signed for the device, checked: the leaf certifies `spki_der` for
/// `device_id`, and leaf + intermediates chain to step-ca's root.
pub struct StepCaCert {
    pub issued: Issued,
    /// The intermediates step-ca sent after the leaf, then its root (PEM).
    pub chain_pem: String,
}

#[derive(serde::Deserialize)]
struct SignResponse {
    crt: String,
    #[serde(default)]
    ca: Option<String>,
    #[serde(default, rename = "certChain")]
    cert_chain: Vec<String>,
}

/// Check step-ca's `{"crt","ca","certChain"}` answer (api/sign.go SignResponse) before a
/// device gets it or the registry records it.
pub fn check_answer(
    body: &[u8],
    device_id: &str,
    spki_der: &[u8],
    root_pem: &str,
    verifier: &dyn ClientCertVerifier,
    now: UnixTime,
) -> Result<StepCaCert, SignFailure> {
    let bad = |m: String| SignFailure::BadAnswer(m);
    let r: SignResponse =
        serde_json::from_slice(body).map_err(|e| bad(format!("not a sign response: {e}")))?;
    // certChain is leaf first; old step-ca versions only had crt and ca.
    let pems = if r.cert_chain.is_empty() {
        std::iter::once(r.crt.clone()).chain(r.ca.clone()).collect()
    } else {
        r.cert_chain
    };
    let ders = pems
        .iter()
        .map(|p| {
            CertificateDer::from_pem_slice(p.as_bytes())
                .map_err(|e| bad(format!("certChain holds a bad PEM: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let crt = CertificateDer::from_pem_slice(r.crt.as_bytes())
        .map_err(|e| bad(format!("crt is not a PEM certificate: {e}")))?;
    let (leaf, intermediates) = ders
        .split_first()
        .ok_or_else(|| bad("no certificate".into()))?;
    if leaf.as_ref() != crt.as_ref() {
        return Err(bad("certChain does not start with crt".into()));
    }
    verifier
        .verify_client_cert(leaf, intermediates, now)
        .map_err(|e| {
            bad(format!(
                "the certificate does not chain to signer.root: {e}"
            ))
        })?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| bad(format!("crt does not parse: {e}")))?;
    let cns: Vec<&str> = cert
        .subject()
        .iter_common_name()
        .filter_map(|c| c.as_str().ok())
        .collect();
    if cns != [device_id] {
        return Err(bad(format!(
            "the certificate is for CN {cns:?}, not {device_id:?}"
        )));
    }
    if cert.public_key().raw != spki_der {
        return Err(bad("the certificate is not for the CSR's key".into()));
    }
    let not_after = OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp())
        .map_err(|e| bad(format!("notAfter: {e}")))?;
    let mut chain_pem: String = pems[1..].iter().map(|p| ensure_nl(p)).collect();
    chain_pem.push_str(&ensure_nl(root_pem));
    Ok(StepCaCert {
        issued: Issued {
            pem: ensure_nl(&pems[0]),
            serial_hex: hex::encode(cert.raw_serial()),
            not_after,
        },
        chain_pem,
    })
}

fn ensure_nl(p: &str) -> String {
    let p = p.trim_end();
    format!("{p}\n")
}

/// A server certificate verifier for the one bootstrap request of [`bootstrap_root`]: it
/// takes any certificate (the handshake signature is still checked), because the answer is
/// authenticated by its SHA-256 instead, as `step ca bootstrap --fingerprint` does.
#[derive(Debug)]
struct FingerprintBootstrap(rustls::crypto::WebPkiSupportedAlgorithms);

impl rustls::client::danger::ServerCertVerifier for FingerprintBootstrap {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// The root whose SHA-256 is `fingerprint`, from step-ca's `GET <url>/1.0/root/<sha>` (api/api.go
/// Root: `{"ca": PEM}`). Nothing of the answer is trusted until its hash matches.
pub async fn bootstrap_root(
    url: &str,
    fingerprint: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    let provider = rustls::crypto::ring::default_provider();
    let algs = provider.signature_verification_algorithms;
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(FingerprintBootstrap(algs)))
        .with_no_client_auth();
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .https_only(true)
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let fp = fingerprint.to_ascii_lowercase();
    let resp = http
        .get(format!("{}/1.0/root/{fp}", url.trim_end_matches('/')))
        .send()
        .await
        .with_context(|| format!("fetching the root from {url}"))?;
    anyhow::ensure!(
        resp.status().is_success(),
        "{url} has no root with fingerprint {fp} (HTTP {})",
        resp.status()
    );
    let body = resp.bytes().await?;
    anyhow::ensure!(body.len() <= MAX_ANSWER, "the root answer is too large");
    #[derive(serde::Deserialize)]
    struct RootResponse {
        ca: String,
    }
    let r: RootResponse = serde_json::from_slice(&body).context("the root answer")?;
    let der = CertificateDer::from_pem_slice(r.ca.as_bytes()).context("the root answer's PEM")?;
    let got = self::fingerprint(der.as_ref());
    anyhow::ensure!(
        got == fp,
        "{url} answered a root with fingerprint {got}, not {fp}: refused"
    );
    Ok(ensure_nl(&r.ca))
}

/// `[signer]` with `backend = "step-ca"`, resolved: the key read, the root loaded.
pub struct StepCa {
    sign_url: String,
    provisioner: String,
    key: ProvisionerKey,
    root_pem: String,
    root_fingerprint: String,
    verifier: Arc<dyn ClientCertVerifier>,
    http: reqwest::Client,
}

impl StepCa {
    /// `root_pem`: step-ca's root (the trust anchor of its TLS and of what it signs).
    pub fn new(
        url: &str,
        provisioner: &str,
        key: ProvisionerKey,
        root_pem: &str,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let root = CertificateDer::from_pem_slice(root_pem.as_bytes())
            .context("signer.root: not a PEM certificate")?;
        let root_fingerprint = fingerprint(root.as_ref());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root).context("signer.root")?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .context("signer.root")?;
        let tls = thingsly_enroll::client_config(root_pem.as_bytes(), None)
            .map_err(anyhow::Error::msg)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .https_only(true)
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("thingsly-bridge/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            sign_url: format!("{}/1.0/sign", url.trim_end_matches('/')),
            provisioner: provisioner.to_string(),
            key,
            root_pem: ensure_nl(root_pem),
            root_fingerprint,
            verifier,
            http,
        })
    }

    /// The root's PEM: a trust anchor for devices' client certificates.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// SHA-256 of the root (what `step ca bootstrap --fingerprint` pins).
    pub fn root_fingerprint(&self) -> &str {
        &self.root_fingerprint
    }

    /// One sign request with a fresh token; no retry (the device retries, with backoff).
    pub async fn sign(
        &self,
        device_id: &str,
        csr_pem: &str,
        spki_der: &[u8],
        lifetime: Duration,
    ) -> Result<StepCaCert, SignFailure> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| SignFailure::Unavailable(format!("clock: {e}")))?
            .as_secs();
        let jti = {
            use rand_core::RngCore;
            let mut b = [0u8; 32];
            rand_core::OsRng.fill_bytes(&mut b);
            hex::encode(b)
        };
        let claims = token_claims(
            &self.provisioner,
            &self.sign_url,
            device_id,
            &self.root_fingerprint,
            now,
            &jti,
        );
        let ott = self
            .key
            .sign_jwt(&claims)
            .map_err(SignFailure::Unavailable)?;
        let body = serde_json::json!({
            "csr": csr_pem,
            "ott": ott,
            "notAfter": format!("{}s", lifetime.as_secs()),
        });
        let unavailable =
            |e: reqwest::Error| SignFailure::Unavailable(thingsly_core::error_chain(&e));
        let mut resp = self
            .http
            .post(&self.sign_url)
            .json(&body)
            .send()
            .await
            .map_err(unavailable)?;
        let status = resp.status();
        let mut bytes = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(unavailable)? {
            bytes.extend_from_slice(&chunk);
            if bytes.len() > MAX_ANSWER {
                return Err(SignFailure::BadAnswer(format!(
                    "the answer is over {MAX_ANSWER} bytes"
                )));
            }
        }
        if !status.is_success() {
            return Err(refusal(status.as_u16(), &bytes));
        }
        check_answer(
            &bytes,
            device_id,
            spki_der,
            &self.root_pem,
            self.verifier.as_ref(),
            UnixTime::now(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwk() -> (String, serde_json::Value) {
        let sk = p256::SecretKey::random(&mut rand_core::OsRng);
        let pt =
            p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&sk.public_key(), false);
        let (x, y) = (
            B64.encode(pt.x().expect("x")),
            B64.encode(pt.y().expect("y")),
        );
        let v = serde_json::json!({"kty": "EC", "crv": "P-256", "x": x, "y": y,
            "d": B64.encode(sk.to_bytes())});
        (v.to_string(), v)
    }

    #[test]
    fn plain_and_encrypted_keys_give_the_same_key_and_kid() {
        let (src, v) = jwk();
        let plain = ProvisionerKey::parse(&src, None).expect("plain");
        // No kid in the file: the RFC 7638 thumbprint, as step names keys.
        assert_eq!(
            plain.kid(),
            thumbprint(v["x"].as_str().expect("x"), v["y"].as_str().expect("y"))
        );
        let jwe = encrypt_jwe(src.as_bytes(), b"s3cret", 1000).expect("encrypt");
        let enc = ProvisionerKey::parse(&jwe, Some(b"s3cret")).expect("encrypted");
        assert_eq!(enc.public_jwk(), plain.public_jwk());
        let e = ProvisionerKey::parse(&jwe, Some(b"wrong"))
            .err()
            .expect("wrong pw");
        assert!(e.contains("wrong password"), "{e}");
        let e = ProvisionerKey::parse(&jwe, None).err().expect("no pw");
        assert!(e.contains("provisioner_password_file"), "{e}");
        // The JSON serialization `step crypto jwk create` writes.
        let p: Vec<&str> = jwe.split('.').collect();
        let json = serde_json::json!({"protected": p[0], "encrypted_key": p[1], "iv": p[2],
            "ciphertext": p[3], "tag": p[4]})
        .to_string();
        let j = ProvisionerKey::parse(&json, Some(b"s3cret")).expect("json jwe");
        assert_eq!(j.kid(), plain.kid());
        // A flipped ciphertext byte is caught by GCM, not read as a key.
        let mut ct = B64.decode(p[3]).expect("b64");
        ct[0] ^= 1;
        let tampered = format!("{}.{}.{}.{}.{}", p[0], p[1], p[2], B64.encode(ct), p[4]);
        assert!(ProvisionerKey::parse(&tampered, Some(b"s3cret")).is_err());
    }

    #[test]
    fn keys_that_are_not_p256_private_keys_are_refused() {
        let (_, mut v) = jwk();
        v["crv"] = "P-384".into();
        assert!(
            ProvisionerKey::parse(&v.to_string(), None)
                .err()
                .expect("p384")
                .contains("P-256")
        );
        let (_, mut v) = jwk();
        v.as_object_mut().expect("obj").remove("d");
        assert!(
            ProvisionerKey::parse(&v.to_string(), None)
                .err()
                .expect("public only")
                .contains("private")
        );
        let (_, mut v) = jwk();
        let (_, other) = jwk();
        v["x"] = other["x"].clone();
        assert!(ProvisionerKey::parse(&v.to_string(), None).is_err());
    }

    #[test]
    fn token_verifies_with_the_public_jwk_and_carries_steps_claims() {
        let (src, _) = jwk();
        let key = ProvisionerKey::parse(&src, None).expect("key");
        let claims = token_claims(
            "bridge",
            "https://ca:9000/1.0/sign",
            "dev-1",
            "ab",
            100,
            "j1",
        );
        let t = key.sign_jwt(&claims).expect("sign");
        let jwk: jsonwebtoken::jwk::Jwk =
            serde_json::from_value(key.public_jwk()).expect("jwk parses");
        let dk = jsonwebtoken::DecodingKey::from_jwk(&jwk).expect("decoding key");
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        v.validate_exp = false;
        v.set_audience(&["https://ca:9000/1.0/sign"]);
        let got = jsonwebtoken::decode::<serde_json::Value>(&t, &dk, &v).expect("verifies");
        assert_eq!(got.header.kid.as_deref(), Some(key.kid()));
        assert_eq!(got.claims["sans"], serde_json::json!(["dev-1"]));
        assert_eq!(got.claims["sub"], "dev-1");
        assert_eq!(got.claims["iss"], "bridge");
        assert_eq!(got.claims["exp"], 400);
    }

    #[test]
    fn step_cas_errors_map_to_distinct_failures() {
        let body = br#"{"status":401,"message":"token already used"}"#;
        assert_eq!(
            refusal(401, body),
            SignFailure::TokenRefused("HTTP 401: token already used".into())
        );
        assert!(matches!(
            refusal(403, br#"{"status":403,"message":"x"}"#),
            SignFailure::PolicyRefused(_)
        ));
        assert!(matches!(
            refusal(503, b"<html>"),
            SignFailure::Unavailable(_)
        ));
        // Control characters from the CA never reach a log line or a device.
        let SignFailure::PolicyRefused(m) = refusal(400, b"{\"message\":\"a\\nb\\u001b[31m\"}")
        else {
            panic!("400")
        };
        assert_eq!(m, "HTTP 400: ab[31m");
    }
}
