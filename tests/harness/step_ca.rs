//! A step-ca stand-in for the tests (step-ca does not run here: no Go toolchain, no Debian
//! package). It serves what the bridge uses, `POST /1.0/sign` with a JWK provisioner, over
//! real TLS, and applies step-ca's rules as smallstep/certificates @ 1c44aec writes them
//! (`https://github.com/smallstep/certificates/blob/1c44aec/<file>#L<line>`):
//!
//! - `api/sign.go` L16-22 (body `csr`, `ott`, `notAfter`, `notBefore`), L26-37 (a missing
//!   CSR, a CSR whose signature fails or a missing ott: 400), L75-78 (authorization errors
//!   answer 401), L81-84 (sign option errors answer 403), L86-97 (201 with `crt`, `ca`,
//!   `certChain`, leaf first).
//! - `authority/authorize.go` L48-73: the token parses, its claims name a provisioner by
//!   audience and `iss:kid` (`authority/provisioner/collection.go` L87-107, the audience
//!   compared with the port stripped, `authorize.go` L468-492); L87-91: a token issued before
//!   the CA started is refused; L201-226: `jti` is used once ("token already used").
//! - `authority/provisioner/jwk.go` L117-148: the signature verifies with the provisioner's
//!   key; `nbf`, `exp` and `iat` hold with one minute of leeway (go-jose's
//!   `ValidateWithLeeway`, which requires none of them to be present); `iss` is the
//!   provisioner's name; `aud` is one of the sign audiences; `sub` is not empty.
//! - `jwk.go` L159-213 (AuthorizeSign): an empty `sans` becomes `[sub]`; the CSR's CN must be
//!   `sub` or a SAN (`sign_options.go` L156-168, an empty CN passes); each kind of SAN in the
//!   CSR (DNS, IP, email, URI, split as x509util.SplitSANs does) must equal the token's as a
//!   set, a kind the CSR does not have passing (`sign_options.go` L175-191, L308-320); the
//!   lifetime, from `notAfter` or the provisioner's default, lies between its minimum and its
//!   maximum plus the backdate (`sign_options.go` L331-350, L413-439; backdate 1 min,
//!   `authority/config/config.go` L28-30).
//! - The certificate is step's default leaf template: subject CN = `sub`, SANs = the token's
//!   `sans`, digitalSignature, serverAuth + clientAuth, signed by the intermediate.
//!
//! Errors are step's JSON (`errs/error.go` L84-85: `{"status", "message"}`). The PKI is a root,
//! an intermediate it signs and a sub-CA that signs devices, as in the seed platform: device
//! chains have four certificates.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use thingsly_bridge::step_ca::ProvisionerKey;

/// step-ca's default claims are 5 min ..= 24 h, default 24 h (`authority/config/config.go`);
/// tests set their own, as an operator would on the provisioner.
#[derive(Clone, Copy)]
pub struct Claims {
    pub min: Duration,
    pub max: Duration,
    pub default: Duration,
}

impl Default for Claims {
    fn default() -> Self {
        Self {
            min: Duration::from_secs(300),
            max: Duration::from_secs(24 * 3600),
            default: Duration::from_secs(24 * 3600),
        }
    }
}

const BACKDATE: Duration = Duration::from_secs(60);
const LEEWAY: u64 = 60;

struct Provisioner {
    name: String,
    kid: String,
    key: jsonwebtoken::DecodingKey,
    claims: Claims,
}

/// What a test can see and change while it runs.
#[derive(Default)]
pub struct Observed {
    /// Every sign request's outcome: (status, message or the leaf's CN).
    pub outcomes: Vec<(u16, String)>,
    /// Answer every request with 503 (an outage) while set.
    pub down: bool,
}

struct Inner {
    provisioners: Vec<Provisioner>,
    /// The DNS names and addresses of the CA (its sign audiences).
    names: Vec<String>,
    started: u64,
    used: Mutex<HashSet<String>>,
    sub_ca: Issuer<'static, KeyPair>,
    root_pem: String,
    /// Sub-CA then intermediate, PEM (step-ca's `intermediate_ca.crt` with two certificates).
    intermediates: Vec<String>,
    observed: Arc<Mutex<Observed>>,
}

pub struct StepCa {
    pub port: u16,
    pub dir: PathBuf,
    /// Root (PEM file), what `[signer] root` points at and Mosquitto's `cafile`.
    pub root: PathBuf,
    pub root_pem: String,
    pub observed: Arc<Mutex<Observed>>,
    inner: Arc<Inner>,
    _task: tokio::task::JoinHandle<()>,
}

fn ca_params(cn: &str, path_len: u8) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.use_authority_key_identifier_extension = true;
    p
}

/// A provisioner key as `step crypto jwk create --no-password --insecure` makes it: a private
/// P-256 JWK whose `kid` is its RFC 7638 thumbprint (`encrypt_jwe` gives the encrypted form).
pub fn provisioner_jwk() -> serde_json::Value {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let sk = p256::SecretKey::random(&mut rand_core::OsRng);
    let pt = p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&sk.public_key(), false);
    let (x, y) = (b64(pt.x().unwrap()), b64(pt.y().unwrap()));
    let kid = thingsly_bridge::step_ca::thumbprint(&x, &y);
    serde_json::json!({"use": "sig", "kty": "EC", "kid": kid, "crv": "P-256", "alg": "ES256",
        "x": x, "y": y, "d": b64(&sk.to_bytes())})
}

impl StepCa {
    /// A CA on a free loopback port with one JWK provisioner `name` whose key is `jwk`.
    pub async fn start(dir: &Path, name: &str, jwk: &serde_json::Value, claims: Claims) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let root_kp = KeyPair::generate().unwrap();
        let root_params = ca_params("Thingsly Test Root CA (step)", 2);
        let root_cert = root_params.self_signed(&root_kp).unwrap();
        let root = Issuer::new(root_params, root_kp);
        let ica_kp = KeyPair::generate().unwrap();
        let ica_params = ca_params("Thingsly Test Intermediate CA (step)", 1);
        let ica_cert = ica_params.signed_by(&ica_kp, &root).unwrap();
        let ica = Issuer::new(ica_params, ica_kp);
        let sub_kp = KeyPair::generate().unwrap();
        let sub_params = ca_params("Thingsly Test Device Sub-CA (step)", 0);
        let sub_cert = sub_params.signed_by(&sub_kp, &ica).unwrap();
        let sub_ca = Issuer::new(sub_params, sub_kp);
        let root_pem = root_cert.pem();
        let root_path = dir.join("root_ca.crt");
        std::fs::write(&root_path, &root_pem).unwrap();
        // step-ca's own TLS certificate comes from its intermediate, as `step ca init` does.
        let names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
        let tls_kp = KeyPair::generate().unwrap();
        let mut tls_params = CertificateParams::new(names.clone()).unwrap();
        tls_params.subject_alt_names = vec![
            SanType::IpAddress("127.0.0.1".parse().unwrap()),
            SanType::DnsName("localhost".try_into().unwrap()),
        ];
        tls_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let tls_cert = tls_params.signed_by(&tls_kp, &sub_ca).unwrap();
        let chain: Vec<CertificateDer<'static>> =
            [&tls_cert.pem(), &sub_cert.pem(), &ica_cert.pem()]
                .iter()
                .map(|p| CertificateDer::from_pem_slice(p.as_bytes()).unwrap())
                .collect();
        let key = PrivateKeyDer::from_pem_slice(tls_kp.serialize_pem().as_bytes()).unwrap();
        let tls = crate::https::server_config(chain, key);
        let jwk_pub: jsonwebtoken::jwk::Jwk = serde_json::from_value(serde_json::json!({
            "kty": "EC", "crv": "P-256", "x": jwk["x"], "y": jwk["y"], "kid": jwk["kid"],
            "alg": "ES256", "use": "sig"}))
        .unwrap();
        let observed: Arc<Mutex<Observed>> = Arc::default();
        let inner = Arc::new(Inner {
            provisioners: vec![Provisioner {
                name: name.into(),
                kid: jwk["kid"].as_str().unwrap().into(),
                key: jsonwebtoken::DecodingKey::from_jwk(&jwk_pub).unwrap(),
                claims,
            }],
            names,
            started: unix_now(),
            used: Mutex::default(),
            sub_ca,
            root_pem: root_pem.clone(),
            intermediates: vec![sub_cert.pem(), ica_cert.pem()],
            observed: observed.clone(),
        });
        let app = axum::Router::new()
            .route("/1.0/sign", axum::routing::post(sign))
            .route("/sign", axum::routing::post(sign))
            .route(
                "/health",
                axum::routing::get(|| async { Json(serde_json::json!({"status": "ok"})) }),
            )
            .route("/1.0/root/{sha}", axum::routing::get(root_by_fingerprint))
            .with_state(inner.clone());
        let (port, task) = crate::https::serve(app, tls).await;
        Self {
            port,
            dir: dir.to_path_buf(),
            root: root_path,
            root_pem,
            observed,
            inner,
            _task: task,
        }
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// A client certificate straight from the sub-CA (the MQTT observer's), with its chain:
    /// (cert + intermediates PEM file, key file).
    pub fn client_cert(&self, cn: &str) -> (PathBuf, PathBuf) {
        let kp = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let c = p.signed_by(&kp, &self.inner.sub_ca).unwrap();
        let crt = self.dir.join(format!("{cn}.crt"));
        let key = self.dir.join(format!("{cn}.key"));
        std::fs::write(
            &crt,
            format!("{}{}", c.pem(), self.inner.intermediates.concat()),
        )
        .unwrap();
        std::fs::write(&key, kp.serialize_pem()).unwrap();
        (crt, key)
    }

    /// `[signer]` for bridge.toml with this CA and the key in `key_file`.
    pub fn signer_section(
        &self,
        name: &str,
        key_file: &Path,
        password_file: Option<&Path>,
    ) -> String {
        format!(
            "[signer]\nbackend = \"step-ca\"\nurl = \"{}\"\nroot = \"{}\"\nprovisioner = \"{name}\"\nprovisioner_key = \"{}\"\n{}",
            self.url(),
            self.root.display(),
            key_file.display(),
            password_file
                .map(|p| format!("provisioner_password_file = \"{}\"\n", p.display()))
                .unwrap_or_default()
        )
    }

    /// The sign requests so far, (status, message or CN).
    pub fn outcomes(&self) -> Vec<(u16, String)> {
        self.observed.lock().unwrap().outcomes.clone()
    }

    pub fn set_down(&self, down: bool) {
        self.observed.lock().unwrap().down = down;
    }

    /// A token for this CA signed by `key` (tests of the server's own rules).
    pub fn token(&self, key: &ProvisionerKey, claims: &serde_json::Value) -> String {
        key.sign_jwt(claims).unwrap()
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `GET <url>/1.0/root/<sha>` (api/api.go L379-390, mounted under `/1.0` too by ca/ca.go
/// L242-244): the root with that SHA-256, `{"ca": PEM}`, or 404.
async fn root_by_fingerprint(
    State(ca): State<Arc<Inner>>,
    axum::extract::Path(sha): axum::extract::Path<String>,
) -> Response {
    let sum = sha.replace('-', "").to_ascii_lowercase();
    if thingsly_bridge::step_ca::pem_fingerprint(&ca.root_pem).as_deref() == Some(sum.as_str()) {
        Json(serde_json::json!({"ca": ca.root_pem})).into_response()
    } else {
        step_error(
            StatusCode::NOT_FOUND,
            format!("root certificate with fingerprint {sum:?} was not found"),
        )
    }
}

/// step's error body (`errs/error.go`).
fn step_error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(serde_json::json!({"status": status.as_u16(), "message": message.into()})),
    )
        .into_response()
}

/// `stripPort` (`authority/authorize.go` L485-492): the URL with its host's port removed.
fn strip_port(u: &str) -> String {
    let Some((scheme, rest)) = u.split_once("://") else {
        return u.to_string();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let host = if let Some(end) = authority.strip_prefix('[').and_then(|a| a.find(']')) {
        &authority[1..=end]
    } else {
        authority.split(':').next().unwrap_or(authority)
    };
    format!("{scheme}://{host}{path}")
}

fn matches_audience(token_aud: &[String], audiences: &[String]) -> bool {
    audiences.iter().any(|b| {
        token_aud
            .iter()
            .any(|a| a == b || strip_port(a) == strip_port(b))
    })
}

#[derive(serde::Deserialize)]
struct SignRequest {
    csr: Option<String>,
    ott: Option<String>,
    #[serde(rename = "notAfter")]
    not_after: Option<String>,
    #[serde(rename = "notBefore")]
    not_before: Option<String>,
}

/// `aud` is a string or a list (RFC 7519 §4.1.3, go-jose's Audience).
fn audiences(v: &serde_json::Value) -> Vec<String> {
    match v {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    }
}

/// `TimeDuration` (authority/provisioner/timeduration.go): an RFC 3339 time or a Go duration
/// relative to now; only the forms `<n>s`, `<n>m`, `<n>h` and RFC 3339 are read here.
fn time_duration(s: &str, now: u64) -> Result<u64, String> {
    if let Ok(t) = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339) {
        return Ok(t.unix_timestamp() as u64);
    }
    let (num, unit) = s.split_at(s.len().saturating_sub(1));
    let n: u64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("invalid duration {s:?}")),
    };
    Ok(now + secs)
}

/// x509util.SplitSANs: IPs, then URIs (a scheme), then emails (an @), else DNS names.
fn split_sans(sans: &[String]) -> [HashSet<String>; 4] {
    let mut out: [HashSet<String>; 4] = Default::default();
    for s in sans {
        let i = if s.parse::<std::net::IpAddr>().is_ok() {
            1
        } else if s.contains("://") {
            3
        } else if s.contains('@') {
            2
        } else {
            0
        };
        out[i].insert(s.clone());
    }
    out
}

async fn sign(State(ca): State<Arc<Inner>>, body: Bytes) -> Response {
    let r = sign_inner(&ca, &body);
    let (status, what) = match &r {
        Ok((_, cn)) => (201, cn.clone()),
        Err((s, m)) => (s.as_u16(), m.clone()),
    };
    ca.observed.lock().unwrap().outcomes.push((status, what));
    match r {
        Ok((body, _)) => (StatusCode::CREATED, Json(body)).into_response(),
        Err((s, m)) => step_error(s, m),
    }
}

type Refusal = (StatusCode, String);

fn sign_inner(ca: &Inner, body: &[u8]) -> Result<(serde_json::Value, String), Refusal> {
    let unauthorized = |m: &str| (StatusCode::UNAUTHORIZED, m.to_string());
    let forbidden = |m: String| (StatusCode::FORBIDDEN, m);
    let bad = |m: String| (StatusCode::BAD_REQUEST, m);
    if ca.observed.lock().unwrap().down {
        return Err((StatusCode::SERVICE_UNAVAILABLE, "down for the test".into()));
    }
    let req: SignRequest = serde_json::from_slice(body)
        .map_err(|e| bad(format!("error reading request body: {e}")))?;
    // api/sign.go L26-37
    let csr_pem = req.csr.ok_or_else(|| bad("missing csr".into()))?;
    let csr = rcgen::CertificateSigningRequestParams::from_pem(&csr_pem)
        .map_err(|e| bad(format!("invalid csr: {e}")))?;
    let (_, parsed) = x509_parser::pem::parse_x509_pem(csr_pem.as_bytes())
        .map_err(|e| bad(format!("invalid csr: {e}")))?;
    let (_, req_info) =
        <x509_parser::certification_request::X509CertificationRequest as x509_parser::prelude::FromDer<_>>::from_der(&parsed.contents)
            .map_err(|e| bad(format!("invalid csr: {e}")))?;
    req_info
        .verify_signature()
        .map_err(|_| bad("invalid csr: signature".into()))?;
    let ott = req
        .ott
        .filter(|t| !t.is_empty())
        .ok_or_else(|| bad("missing ott".into()))?;

    // authorize.go L48-73 / collection.go L87-107: the provisioner by audience and iss:kid.
    let header = jsonwebtoken::decode_header(&ott)
        .map_err(|e| unauthorized(&format!("error parsing token: {e}")))?;
    let unverified: serde_json::Value = {
        use base64::Engine;
        let payload = ott.split('.').nth(1).unwrap_or_default();
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| unauthorized("error unmarshaling token"))?;
        serde_json::from_slice(&raw).map_err(|_| unauthorized("error unmarshaling token"))?
    };
    let sign_audiences: Vec<String> = ca
        .names
        .iter()
        .flat_map(|n| [format!("https://{n}/1.0/sign"), format!("https://{n}/sign")])
        .collect();
    let aud = audiences(&unverified["aud"]);
    let iss = unverified["iss"].as_str().unwrap_or_default();
    let kid = header.kid.unwrap_or_default();
    let prov = ca
        .provisioners
        .iter()
        .find(|p| matches_audience(&aud, &sign_audiences) && p.name == iss && p.kid == kid)
        .ok_or_else(|| {
            unauthorized(&format!(
                "provisioner not found or invalid audience ({})",
                aud.join(", ")
            ))
        })?;
    // jwk.go L124: the signature, with the provisioner's key.
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.required_spec_claims.clear();
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    let claims = jsonwebtoken::decode::<serde_json::Value>(&ott, &prov.key, &v)
        .map_err(|e| {
            unauthorized(&format!(
                "jwk.authorizeToken; error parsing jwk claims: {e}"
            ))
        })?
        .claims;
    // jwk.go L130-135: go-jose's ValidateWithLeeway, a minute either way.
    let now = unix_now();
    let num = |k: &str| claims[k].as_u64();
    if claims["iss"] != prov.name.as_str() {
        return Err(unauthorized(
            "jwk.authorizeToken; invalid jwk claims: invalid issuer claim (iss)",
        ));
    }
    if num("nbf").is_some_and(|nbf| now + LEEWAY < nbf) {
        return Err(unauthorized(
            "jwk.authorizeToken; invalid jwk claims: token not valid yet (nbf)",
        ));
    }
    if num("exp").is_some_and(|exp| now > exp + LEEWAY) {
        return Err(unauthorized(
            "jwk.authorizeToken; invalid jwk claims: token is expired (exp)",
        ));
    }
    if num("iat").is_some_and(|iat| now + LEEWAY < iat) {
        return Err(unauthorized(
            "jwk.authorizeToken; invalid jwk claims: token issued in the future (iat)",
        ));
    }
    // jwk.go L137-145
    if !matches_audience(&audiences(&claims["aud"]), &sign_audiences) {
        return Err(unauthorized(
            "jwk.authorizeToken; invalid jwk token audience claim (aud)",
        ));
    }
    let sub = claims["sub"].as_str().unwrap_or_default().to_string();
    if sub.is_empty() {
        return Err(unauthorized(
            "jwk.authorizeToken; jwk token subject cannot be empty",
        ));
    }
    // authorize.go L87-91, then L201-226 (the reuse key is the jti, or the token's hash).
    if num("iat").is_some_and(|iat| iat < ca.started) {
        return Err(unauthorized(
            "token issued before the bootstrap of certificate authority",
        ));
    }
    let reuse_key = match claims["jti"].as_str() {
        Some(j) if !j.is_empty() => j.to_string(),
        _ => {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(ott.as_bytes()))
        }
    };
    if !ca.used.lock().unwrap().insert(reuse_key) {
        return Err(unauthorized("token already used"));
    }

    // jwk.go L168-170
    let mut sans: Vec<String> = claims["sans"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if sans.is_empty() {
        sans = vec![sub.clone()];
    }
    // sign_options.go L156-168
    let info = &req_info.certification_request_info;
    let cn = info
        .subject
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .unwrap_or_default()
        .to_string();
    if !cn.is_empty() && cn != sub && !sans.contains(&cn) {
        return Err(forbidden(format!(
            "certificate request does not contain the valid common name - got {cn}, want {:?}",
            [vec![sub.clone()], sans.clone()].concat()
        )));
    }
    // sign_options.go L175-191 and L308-320, per kind of SAN.
    let mut got: [HashSet<String>; 4] = Default::default();
    for ext in req_info.requested_extensions().into_iter().flatten() {
        if let x509_parser::extensions::ParsedExtension::SubjectAlternativeName(s) = ext {
            for g in &s.general_names {
                use x509_parser::extensions::GeneralName as G;
                match g {
                    G::DNSName(d) => got[0].insert(d.to_string()),
                    G::IPAddress(b) => got[1].insert(match b.len() {
                        4 => std::net::IpAddr::from(<[u8; 4]>::try_from(*b).unwrap()).to_string(),
                        16 => std::net::IpAddr::from(<[u8; 16]>::try_from(*b).unwrap()).to_string(),
                        _ => hex::encode(b),
                    }),
                    G::RFC822Name(e) => got[2].insert(e.to_string()),
                    G::URI(u) => got[3].insert(u.to_string()),
                    _ => false,
                };
            }
        }
    }
    let want = split_sans(&sans);
    for (kind, (g, w)) in ["DNS names", "IP addresses", "email addresses", "URIs"]
        .iter()
        .zip(got.iter().zip(want.iter()))
    {
        if !g.is_empty() && g != w {
            return Err(forbidden(format!(
                "certificate request does not contain the valid {kind} - got {g:?}, want {w:?}"
            )));
        }
    }
    // sign_options.go L331-350 and L413-439
    let (nb, backdate) = match &req.not_before {
        Some(s) => (time_duration(s, now).map_err(bad)?, 0),
        None => (now, BACKDATE.as_secs()),
    };
    let na = match &req.not_after {
        Some(s) => time_duration(s, nb).map_err(bad)?,
        None => nb + prov.claims.default.as_secs(),
    };
    let nb = nb - backdate;
    if na < now {
        return Err(bad(format!("notAfter cannot be in the past; na={na}")));
    }
    if na < nb {
        return Err(bad("notAfter cannot be before notBefore".into()));
    }
    let d = na - nb;
    if d < prov.claims.min.as_secs() {
        return Err(forbidden(format!(
            "requested duration of {d}s is less than the authorized minimum certificate duration of {}s",
            prov.claims.min.as_secs()
        )));
    }
    if d > prov.claims.max.as_secs() + BACKDATE.as_secs() {
        return Err(forbidden(format!(
            "requested duration of {d}s is more than the authorized maximum certificate duration of {}s",
            prov.claims.max.as_secs() + BACKDATE.as_secs()
        )));
    }

    // The default leaf template.
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, sub.clone());
    p.subject_alt_names = sans
        .iter()
        .map(|s| match s.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) if s.contains('@') => SanType::Rfc822Name(s.clone().try_into().unwrap()),
            Err(_) if s.contains("://") => SanType::URI(s.clone().try_into().unwrap()),
            Err(_) => SanType::DnsName(s.clone().try_into().unwrap()),
        })
        .collect();
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    p.not_before = time::OffsetDateTime::from_unix_timestamp(nb as i64).unwrap();
    p.not_after = time::OffsetDateTime::from_unix_timestamp(na as i64).unwrap();
    let mut serial = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut serial);
    serial[0] = (serial[0] & 0x7f) | 1;
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let csr = rcgen::CertificateSigningRequestParams {
        params: p,
        public_key: csr.public_key,
    };
    let leaf = csr
        .signed_by(&ca.sub_ca)
        .map_err(|e| forbidden(format!("error signing certificate: {e}")))?
        .pem();
    let mut chain = vec![leaf.clone()];
    chain.extend(ca.intermediates.iter().cloned());
    Ok((
        serde_json::json!({"crt": leaf, "ca": ca.intermediates[0], "certChain": chain}),
        sub,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_stripped_as_step_does() {
        assert_eq!(
            strip_port("https://ca:9000/1.0/sign"),
            "https://ca/1.0/sign"
        );
        // Go's URL.Hostname() drops an IPv6 literal's brackets, and String() writes the host
        // as it is: step-ca compares "https://::1/sign".
        assert_eq!(strip_port("https://[::1]:9000/sign"), "https://::1/sign");
        assert!(matches_audience(
            &["https://127.0.0.1:4443/1.0/sign".into()],
            &["https://127.0.0.1/1.0/sign".into()]
        ));
        assert!(!matches_audience(
            &["https://127.0.0.1:4443/1.0/revoke".into()],
            &["https://127.0.0.1/1.0/sign".into()]
        ));
    }
}
