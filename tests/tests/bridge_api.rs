//! The bridge's enrollment API against a real `thingsly-bridge serve`: every refusal has its own
//! status and code, renewal needs the current certificate, addresses are kept.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;
use thingsly_e2e::*;
use thingsly_proto::enroll::EnrollRequest;

/// A fresh WireGuard key every time: the bridge refuses one that another device holds.
fn body(csr_pem: String) -> serde_json::Value {
    serde_json::json!({"csr_pem": csr_pem, "wireguard_public_key": wg_public_key()})
}

struct Api {
    http: reqwest::Client,
    url: String,
}

impl Api {
    fn new(bridge: &Bridge) -> Self {
        Self {
            http: bridge.http().unwrap(),
            url: bridge.url(),
        }
    }

    async fn enroll(
        &self,
        id: &str,
        token: &str,
        body: &serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let r = self
            .http
            .post(format!("{}/devices/{id}/enroll", self.url))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .unwrap();
        let st = r.status().as_u16();
        (st, r.json().await.unwrap_or_default())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_have_distinct_status_and_code() {
    let t = tempfile::tempdir().unwrap();
    // A /30 pool: .1 is the hub, .2 the only device address.
    let mut bridge =
        Bridge::init_with(&t.path().join("b"), "[wireguard]\npool = \"10.9.0.0/30\"\n").unwrap();
    bridge.start().unwrap();
    let api = Api::new(&bridge);
    let fleet = bridge.fleet_token();
    let k1 = rcgen::KeyPair::generate().unwrap();

    let (st, e) = api
        .enroll("dev-a", "wrong", &body(csr_pem("dev-a", &k1)))
        .await;
    assert_eq!((st, e["error"].as_str().unwrap()), (401, "bad_token"));
    let (st, e) = api
        .enroll(
            "dev-a",
            &fleet,
            &body(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
                    .into(),
            ),
        )
        .await;
    assert_eq!((st, e["error"].as_str().unwrap()), (400, "bad_csr"));
    // A CSR whose signature does not verify (one byte of the signature flipped).
    let good = csr_pem("dev-a", &k1);
    let (_, p) = x509_parser_pem(&good);
    let mut der = p.clone();
    let last = der.len() - 2;
    der[last] ^= 0x01;
    let tampered = pem_encode("CERTIFICATE REQUEST", &der);
    let (st, e) = api.enroll("dev-a", &fleet, &body(tampered)).await;
    assert_eq!((st, e["error"].as_str().unwrap()), (400, "bad_csr"), "{e}");
    let (st, e) = api
        .enroll("dev-a", &fleet, &body(csr_pem("dev-b", &k1)))
        .await;
    assert_eq!((st, e["error"].as_str().unwrap()), (403, "cn_mismatch"));
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let (st, e) = api
        .enroll("dev-a", &fleet, &body(csr_pem("dev-a", &ed)))
        .await;
    assert_eq!((st, e["error"].as_str().unwrap()), (422, "unsupported_key"));
    let (st, e) = api
        .enroll("dev a", &fleet, &body(csr_pem("dev a", &k1)))
        .await;
    assert_eq!((st, e["error"].as_str().unwrap()), (400, "bad_device_id"));
    let (st, e) = api
        .enroll("dev-a", &fleet, &serde_json::json!({"csr": 1}))
        .await;
    assert_eq!((st, e["error"].as_str().unwrap()), (400, "bad_request"));

    // Success; the issued certificate is the bridge's profile, not what was asked.
    let (st, ok) = api
        .enroll("dev-a", &fleet, &body(csr_pem("dev-a", &k1)))
        .await;
    assert_eq!(st, 200, "{ok}");
    assert_eq!(ok["wireguard"]["address"], "10.9.0.2/32");
    assert!(ok["wireguard"]["private_key"].is_null());
    let pem = ok["certificate_pem"].as_str().unwrap();
    let info = thingsly_enroll::cert_info(pem.as_bytes()).unwrap();
    assert_eq!(info.subject_cn, "dev-a");
    // Repeating with the same key is idempotent and keeps the address.
    let (st, again) = api
        .enroll("dev-a", &fleet, &body(csr_pem("dev-a", &k1)))
        .await;
    assert_eq!(
        (st, &again["wireguard"]["address"]),
        (200, &ok["wireguard"]["address"])
    );

    // Another key with the fleet token: refused; with a one-time token for the device: accepted,
    // address kept, token used up.
    let k2 = rcgen::KeyPair::generate().unwrap();
    let (st, e) = api
        .enroll("dev-a", &fleet, &body(csr_pem("dev-a", &k2)))
        .await;
    assert_eq!((st, e["error"].as_str().unwrap()), (409, "key_conflict"));
    let token = bridge
        .cli(&["token", "--device", "dev-a"])
        .unwrap()
        .trim()
        .to_string();
    let (st, e) = api
        .enroll("dev-b", &token, &body(csr_pem("dev-b", &k2)))
        .await;
    assert_eq!(
        (st, e["error"].as_str().unwrap()),
        (401, "bad_token"),
        "token is for dev-a only"
    );
    let (st, re) = api
        .enroll("dev-a", &token, &body(csr_pem("dev-a", &k2)))
        .await;
    assert_eq!(st, 200, "{re}");
    assert_eq!(re["wireguard"]["address"], "10.9.0.2/32");
    let (st, _) = api
        .enroll("dev-a", &token, &body(csr_pem("dev-a", &k2)))
        .await;
    assert_eq!(st, 401, "one-time token reused");

    // Pool exhausted.
    let k3 = rcgen::KeyPair::generate().unwrap();
    let (st, e) = api
        .enroll("dev-c", &fleet, &body(csr_pem("dev-c", &k3)))
        .await;
    assert_eq!((st, e["error"].as_str().unwrap()), (503, "pool_exhausted"));

    // Registry endpoints need the admin token.
    let r = api
        .http
        .get(format!("{}/devices", api.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let list: serde_json::Value = api
        .http
        .get(format!("{}/devices", api.url))
        .bearer_auth(bridge.admin_token())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
}

fn x509_parser_pem(pem: &str) -> ((), Vec<u8>) {
    use rustls_pki_types::pem::PemObject;
    let der =
        rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).unwrap();
    ((), der.as_ref().to_vec())
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for chunk in b.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(chunk).unwrap());
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

/// A device enrolled through the library, as the agent does it.
async fn enrolled(
    bridge: &Bridge,
    ca: &[u8],
    dir: &std::path::Path,
    id: &str,
) -> (
    thingsly_core::state_dir::StateDir,
    thingsly_enroll::Identity,
    thingsly_enroll::Credentials,
) {
    let state = thingsly_core::state_dir::StateDir::open(dir).unwrap();
    let identity = thingsly_enroll::Identity::load_or_create(&state, id).unwrap();
    let creds = thingsly_enroll::ensure_enrolled(
        &state,
        &identity,
        &thingsly_enroll::BridgeEndpoint::direct(&bridge.url(), ca, Duration::from_secs(5)),
        &bridge.fleet_token(),
        Default::default(),
    )
    .await
    .unwrap();
    (state, identity, creds)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_needs_the_current_certificate() {
    let t = tempfile::tempdir().unwrap();
    let mut bridge = Bridge::init(&t.path().join("b")).unwrap();
    bridge.start().unwrap();
    let ca = std::fs::read(bridge.ca_chain()).unwrap();
    let (sa, ia, first) = enrolled(&bridge, &ca, &t.path().join("dev-r"), "dev-r").await;
    let req = EnrollRequest {
        csr_pem: ia.csr_pem().unwrap(),
        wireguard_public_key: None,
        metadata: Default::default(),
    };
    // No client certificate.
    let plain = thingsly_enroll::EnrollClient::new(
        &thingsly_enroll::BridgeEndpoint::direct(&bridge.url(), &ca, Duration::from_secs(5)),
        None,
    )
    .unwrap();
    let e = plain.renew("dev-r", &req).await.unwrap_err().to_string();
    assert!(e.contains("401"), "{e}");
    // With it: a new certificate for the same key; the address stays.
    let second = thingsly_enroll::renew(
        &sa,
        &ia,
        &first,
        &thingsly_enroll::BridgeEndpoint::direct(&bridge.url(), &ca, Duration::from_secs(5)),
    )
    .await
    .unwrap();
    assert_ne!(second.info.serial_hex, first.info.serial_hex);
    assert!(ia.matches(&second.info));
    // The replaced certificate can no longer renew.
    let e = thingsly_enroll::renew(
        &sa,
        &ia,
        &first,
        &thingsly_enroll::BridgeEndpoint::direct(&bridge.url(), &ca, Duration::from_secs(5)),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("cert_not_current"), "{e}");
    // Another device's certificate cannot renew this one.
    let (_, _, other) = enrolled(&bridge, &ca, &t.path().join("dev-s"), "dev-s").await;
    let chain = other.full_chain_pem();
    let c = thingsly_enroll::EnrollClient::new(
        &thingsly_enroll::BridgeEndpoint::direct(&bridge.url(), &ca, Duration::from_secs(5)),
        Some((chain.as_bytes(), other.key_pem.as_bytes())),
    )
    .unwrap();
    let e = c.renew("dev-r", &req).await.unwrap_err().to_string();
    assert!(e.contains("cn_mismatch"), "{e}");
}

#[test]
fn init_imports_an_existing_root() {
    let t = tempfile::tempdir().unwrap();
    let a = Bridge::init(&t.path().join("a")).unwrap();
    let b = Bridge::init_with(&t.path().join("b"), "").err();
    assert!(b.is_none());
    let c_dir = t.path().join("c");
    std::fs::create_dir_all(&c_dir).unwrap();
    std::fs::write(
        c_dir.join("bridge.toml"),
        format!("data_dir = \"{}\"\n", c_dir.join("data").display()),
    )
    .unwrap();
    let out = std::process::Command::new(bin("thingsly-bridge"))
        .args([
            "--config",
            c_dir.join("bridge.toml").to_str().unwrap(),
            "init",
            "--import-root-cert",
        ])
        .arg(a.data().join("ca/root.crt"))
        .arg("--import-root-key")
        .arg(a.data().join("ca/root.key"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(a.data().join("ca/root.crt")).unwrap(),
        std::fs::read(c_dir.join("data/ca/root.crt")).unwrap()
    );
    // A second init refuses to replace the PKI.
    let again = std::process::Command::new(bin("thingsly-bridge"))
        .args([
            "--config",
            c_dir.join("bridge.toml").to_str().unwrap(),
            "init",
        ])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to replace"));
}

/// Issue 18: many DDI clients are configured with the device's leaf certificate only. The bridge
/// accepts it as it accepts leaf + issuing CA (curl, a real client, both ways), and keeps refusing
/// certificates the fleet CA did not issue: a self-signed one and another bridge's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_certificate_is_accepted_without_its_chain() {
    let t = tempfile::tempdir().unwrap();
    let mut bridge = Bridge::init(&t.path().join("b")).unwrap();
    bridge.start().unwrap();
    let api = Api::new(&bridge);
    let key = rcgen::KeyPair::generate().unwrap();
    let (st, ok) = api
        .enroll(
            "leaf-1",
            &bridge.fleet_token(),
            &body(csr_pem("leaf-1", &key)),
        )
        .await;
    assert_eq!(st, 200, "{ok}");
    let dir = t.path();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let key_file = write("leaf.key", &key.serialize_pem());
    let leaf = write("leaf.crt", ok["certificate_pem"].as_str().unwrap());
    let chain = std::fs::read_to_string(bridge.ca_chain()).unwrap();
    let leaf_and_chain = write(
        "leaf-chain.crt",
        &format!("{}{chain}", ok["certificate_pem"].as_str().unwrap()),
    );
    let self_signed = {
        let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "leaf-1");
        write("self.crt", &p.self_signed(&key).unwrap().pem())
    };
    let other = Bridge::init(&t.path().join("other")).unwrap();
    let (other_crt, other_key) = other.client_cert("leaf-1").unwrap();

    // The root alone as curl's trust store: with the issuing CA in it, OpenSSL would complete
    // the client's chain by itself and send the intermediate anyway.
    let root = bridge.data().join("ca/root.crt");
    let url = format!("{}/DEFAULT/controller/v1/leaf-1", bridge.url());
    let curl = |crt: &std::path::Path, key: &std::path::Path| {
        let out = std::process::Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .arg("--cacert")
            .arg(&root)
            .arg("--cert")
            .arg(crt)
            .arg("--key")
            .arg(key)
            .arg(&url)
            .output()
            .unwrap();
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(curl(&leaf, &key_file).0, "200", "leaf only");
    assert_eq!(curl(&leaf_and_chain, &key_file).0, "200", "leaf + chain");
    for (what, crt, k) in [
        ("self-signed", &self_signed, &key_file),
        ("another CA's", &other_crt, &other_key),
    ] {
        let (code, err) = curl(crt, k);
        assert_ne!(code, "200", "{what} accepted");
        assert!(
            code == "000" && !err.is_empty(),
            "{what}: refused in the handshake, got HTTP {code} {err}"
        );
    }
}
