//! The production signer: the bridge has step-ca sign (through a JWK provisioner) what its
//! own CA signs by default. step-ca does not run here; `harness/step_ca.rs` applies its rules,
//! cited line by line from smallstep/certificates. A real agent, a real bridge and a real
//! Mosquitto do the rest.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;
use std::time::Duration;
use thingsly_e2e::step_ca::{Claims, StepCa, provisioner_jwk, unix_now};
use thingsly_e2e::*;

const PROVISIONER: &str = "thingsly-bridge";

/// The provisioner key as step-ca stores it: encrypted (JWE) with a password file.
fn encrypted_key(dir: &Path, jwk: &serde_json::Value) -> (std::path::PathBuf, std::path::PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let key = dir.join("provisioner.jwe");
    let pw = dir.join("provisioner.pass");
    std::fs::write(&pw, "correct horse battery staple\n").unwrap();
    let jwe = thingsly_bridge::step_ca::encrypt_jwe(
        jwk.to_string().as_bytes(),
        b"correct horse battery staple",
        100_000,
    )
    .unwrap();
    std::fs::write(&key, jwe).unwrap();
    (key, pw)
}

fn short_claims() -> Claims {
    Claims {
        min: Duration::from_secs(60),
        ..Claims::default()
    }
}

fn pem_count(pem: &str) -> usize {
    pem.matches("-----BEGIN CERTIFICATE-----").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_enrolls_through_step_ca_publishes_with_the_four_certificate_chain_and_renews() {
    let t = tempfile::tempdir().unwrap();
    let jwk = provisioner_jwk();
    let step = StepCa::start(&t.path().join("step"), PROVISIONER, &jwk, short_claims()).await;
    let (key, pw) = encrypted_key(&t.path().join("keys"), &jwk);
    // 60 s certificates (the provisioner allows 1 min ..= 24 h); the agent renews at half.
    let mut bridge = Bridge::init_with(
        &t.path().join("bridge"),
        &format!(
            "device_cert_lifetime = \"60s\"\n{}",
            step.signer_section(PROVISIONER, &key, Some(&pw))
        ),
    )
    .unwrap();
    bridge.start().unwrap();
    // Mosquitto trusts step-ca's root alone: a device must send its sub-CA and intermediate.
    let mut broker = Broker::new(&bridge, &t.path().join("broker")).unwrap();
    std::fs::write(broker.ca(), &step.root_pem).unwrap();
    broker.start().unwrap();
    let (ocrt, okey) = step.client_cert("observer-step");
    let mut obs = Observer::start(
        broker.port,
        mqtt_tls(&bridge.ca_chain(), &ocrt, &okey).unwrap(),
        "observer-step",
        "v1/devices/me/#",
    );
    obs.wait_ready().await;

    let o = AgentOpts {
        device_id: "dev-step".into(),
        enroll_extra: "renew_fraction = 0.5".into(),
        server_url: bridge.url(),
        token: bridge.fleet_token(),
        ca_bundle: bridge.ca_chain(),
        mqtt_port: broker.port,
        ..Default::default()
    };
    let mut agent = Agent::new(&t.path().join("agent"), &o).unwrap();
    agent.start().unwrap();
    obs.next_where(Duration::from_secs(30), |t, v| {
        t == "v1/devices/me/attributes" && v["device_id"] == "dev-step"
    })
    .await;
    obs.next_where(Duration::from_secs(10), |t, _| {
        t == "v1/devices/me/telemetry"
    })
    .await;

    // What the device holds: a leaf from step-ca's sub-CA, with SAN = its id, and a chain of
    // sub-CA, intermediate, root (then the bridge's own two, for verifying the bridge).
    let leaf = std::fs::read_to_string(agent.state().join("identity/device.crt")).unwrap();
    let chain = std::fs::read_to_string(agent.state().join("identity/ca-chain.pem")).unwrap();
    let (_, p) = x509_parser::pem::parse_x509_pem(leaf.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&p.contents).unwrap();
    assert!(
        cert.issuer().to_string().contains("Device Sub-CA (step)"),
        "{}",
        cert.issuer()
    );
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        format!("{:?}", san.value.general_names),
        "[DNSName(\"dev-step\")]"
    );
    assert_eq!(
        pem_count(&chain),
        5,
        "sub-CA, intermediate, root, bridge issuing, bridge root"
    );
    assert!(chain.contains(step.root_pem.trim()));
    // Mosquitto (cafile = step-ca's root only, use_identity_as_username) passed the device's
    // telemetry above: it built leaf -> sub-CA -> intermediate -> root from what the agent sent.
    assert_eq!(step.outcomes(), [(201, "dev-step".to_string())]);

    // Renewal over mTLS with the step-ca certificate, signed by step-ca again (a new token).
    let first = agent.status()["identity"]["certificate"]["serial"].clone();
    wait_for("renewed certificate", Duration::from_secs(90), || {
        let s = agent.status();
        s["identity"]["certificate"]["serial"] != first
            && s["state"]["credentials_generation"]
                .as_u64()
                .is_some_and(|g| g >= 2)
    });
    // step-ca backdates by a minute, so a 60 s certificate is due at once: the agent renews
    // every few seconds here, each time through step-ca.
    let outcomes = step.outcomes();
    assert!(outcomes.len() >= 2, "{outcomes:?}");
    assert!(
        outcomes.iter().all(|o| *o == (201, "dev-step".to_string())),
        "{outcomes:?}"
    );
    obs.next_where(Duration::from_secs(20), |t, v| {
        t == "v1/devices/me/attributes" && v["device_id"] == "dev-step"
    })
    .await;
    obs.next_where(Duration::from_secs(10), |t, _| {
        t == "v1/devices/me/telemetry"
    })
    .await;
    let serial = agent.status()["identity"]["certificate"]["serial"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(bridge.cli(&["devices"]).unwrap().contains(&serial));
}

/// POST /devices/{id}/enroll with the fleet token: (status, body).
async fn enroll(bridge: &Bridge, id: &str, csr: &str) -> (u16, serde_json::Value) {
    let r = bridge
        .http()
        .unwrap()
        .post(format!("{}/devices/{id}/enroll", bridge.url()))
        .bearer_auth(bridge.fleet_token())
        .json(&serde_json::json!({"csr_pem": csr}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or_default())
}

async fn registered(bridge: &Bridge, id: &str) -> bool {
    bridge
        .http()
        .unwrap()
        .get(format!("{}/devices/{id}", bridge.url()))
        .bearer_auth(bridge.admin_token())
        .send()
        .await
        .unwrap()
        .status()
        == 200
}

fn csr_with_san(cn: &str, san: &str) -> String {
    let kp = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec![san.to_string()]).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.serialize_request(&kp).unwrap().pem().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_ca_refusals_reach_the_device_as_distinct_errors_and_record_nothing() {
    let t = tempfile::tempdir().unwrap();
    let jwk = provisioner_jwk();
    let step = StepCa::start(&t.path().join("step"), PROVISIONER, &jwk, short_claims()).await;
    let (key, pw) = encrypted_key(&t.path().join("keys"), &jwk);
    let bridge_with = |name: &str, extra: String| {
        let mut b = Bridge::init_with(&t.path().join(name), &extra).unwrap();
        b.start().unwrap();
        b
    };
    let good = bridge_with(
        "good",
        format!(
            "device_cert_lifetime = \"1h\"\n{}",
            step.signer_section(PROVISIONER, &key, Some(&pw))
        ),
    );
    // A CSR without SANs is signed (step-ca's SAN check passes a kind the CSR lacks), and the
    // certificate gets the token's SAN, the id.
    let kp = rcgen::KeyPair::generate().unwrap();
    let (s, body) = enroll(&good, "dev-ok", &csr_pem("dev-ok", &kp)).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(pem_count(body["ca_chain_pem"].as_str().unwrap()), 5);

    // A SAN that is not the id: step-ca's policy (403), nothing recorded.
    let (s, body) = enroll(&good, "dev-san", &csr_with_san("dev-san", "other.example")).await;
    assert_eq!(
        (s, body["error"].as_str()),
        (403, Some("signer_policy")),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("DNS names"),
        "{body}"
    );
    assert!(!registered(&good, "dev-san").await);

    // step-ca down (503): the device is told to come back later; nothing recorded.
    step.set_down(true);
    let (s, body) = enroll(&good, "dev-down", &csr_pem("dev-down", &kp)).await;
    assert_eq!(
        (s, body["error"].as_str()),
        (503, Some("signer_unavailable")),
        "{body}"
    );
    assert!(!registered(&good, "dev-down").await);
    step.set_down(false);
    let kp = rcgen::KeyPair::generate().unwrap();
    let (s, _) = enroll(&good, "dev-down", &csr_pem("dev-down", &kp)).await;
    assert_eq!(s, 200, "the same request goes through once step-ca is back");

    // A provisioner key step-ca does not know (another kid): the token is refused (502).
    let other = provisioner_jwk();
    let other_key = t.path().join("keys/other.jwk");
    std::fs::write(&other_key, other.to_string()).unwrap();
    let wrong_key = bridge_with(
        "wrong-key",
        format!(
            "device_cert_lifetime = \"1h\"\n{}",
            step.signer_section(PROVISIONER, &other_key, None)
        ),
    );
    let (s, body) = enroll(&wrong_key, "dev-kid", &csr_pem("dev-kid", &kp)).await;
    assert_eq!(
        (s, body["error"].as_str()),
        (502, Some("signer_refused")),
        "{body}"
    );
    assert!(!registered(&wrong_key, "dev-kid").await);

    // The bridge's default lifetime (90 days) is over the provisioner's 24 h maximum.
    let long = bridge_with("long", step.signer_section(PROVISIONER, &key, Some(&pw)));
    let (s, body) = enroll(&long, "dev-long", &csr_pem("dev-long", &kp)).await;
    assert_eq!(
        (s, body["error"].as_str()),
        (403, Some("signer_policy")),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("maximum"),
        "{body}"
    );

    // Nothing listening where step-ca should be: unavailable, within the signer's timeout.
    let closed = free_port();
    let section = step
        .signer_section(PROVISIONER, &key, Some(&pw))
        .replace(&format!(":{}\"", step.port), &format!(":{closed}\""));
    let gone = bridge_with("gone", format!("device_cert_lifetime = \"1h\"\n{section}"));
    let (s, body) = enroll(&gone, "dev-gone", &csr_pem("dev-gone", &kp)).await;
    assert_eq!(
        (s, body["error"].as_str()),
        (503, Some("signer_unavailable")),
        "{body}"
    );
    assert!(!registered(&gone, "dev-gone").await);

    // Every refusal was step-ca's own (or no request at all for the closed port).
    let codes: Vec<u16> = step.outcomes().iter().map(|o| o.0).collect();
    assert_eq!(codes, [201, 403, 503, 201, 401, 403]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_step_ca_stand_in_refuses_what_step_ca_refuses() {
    let t = tempfile::tempdir().unwrap();
    let jwk = provisioner_jwk();
    let step = StepCa::start(&t.path().join("step"), PROVISIONER, &jwk, short_claims()).await;
    let key = thingsly_bridge::step_ca::ProvisionerKey::parse(&jwk.to_string(), None).unwrap();
    let tls = thingsly_enroll::client_config(step.root_pem.as_bytes(), None).unwrap();
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .unwrap();
    let kp = rcgen::KeyPair::generate().unwrap();
    let csr = csr_with_san("dev-1", "dev-1");
    let now = unix_now();
    let aud = format!("{}/1.0/sign", step.url());
    let claims = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = thingsly_bridge::step_ca::token_claims(PROVISIONER, &aud, "dev-1", "", now, "");
        c["jti"] = format!(
            "jti-{}",
            rand_core::RngCore::next_u64(&mut rand_core::OsRng)
        )
        .into();
        f(&mut c);
        c
    };
    let sign = |ott: String, csr: String| {
        let http = http.clone();
        let url = aud.clone();
        async move {
            let r = http
                .post(url)
                .json(&serde_json::json!({"csr": csr, "ott": ott, "notAfter": "1h"}))
                .send()
                .await
                .unwrap();
            let s = r.status().as_u16();
            let b: serde_json::Value = r.json().await.unwrap();
            (s, b["message"].as_str().unwrap_or_default().to_string(), b)
        }
    };
    // The good case first, so that each refusal below is for its one change.
    let ok = claims(&|_| {});
    let good = step.token(&key, &ok);
    let (s, _, body) = sign(good.clone(), csr.clone()).await;
    assert_eq!(s, 201, "{body}");
    assert_eq!(
        body["certChain"].as_array().unwrap().len(),
        3,
        "leaf, sub-CA, intermediate"
    );
    assert_eq!(body["ca"], body["certChain"][1]);

    let cases: Vec<(&str, String, String, u16, &str)> = vec![
        ("reused jti", good, csr.clone(), 401, "token already used"),
        (
            "unknown kid",
            thingsly_bridge::step_ca::ProvisionerKey::parse(&provisioner_jwk().to_string(), None)
                .unwrap()
                .sign_jwt(&claims(&|_| {}))
                .unwrap(),
            csr.clone(),
            401,
            "provisioner not found",
        ),
        (
            "wrong audience",
            step.token(
                &key,
                &claims(&|c| c["aud"] = format!("{}/1.0/revoke", step.url()).into()),
            ),
            csr.clone(),
            401,
            "provisioner not found or invalid audience",
        ),
        (
            "expired",
            step.token(
                &key,
                &claims(&|c| {
                    c["nbf"] = (now - 900).into();
                    c["exp"] = (now - 120).into();
                }),
            ),
            csr.clone(),
            401,
            "expired",
        ),
        (
            "not yet valid",
            step.token(&key, &claims(&|c| c["nbf"] = (now + 600).into())),
            csr.clone(),
            401,
            "not valid yet",
        ),
        (
            "issued before the CA started",
            step.token(&key, &claims(&|c| c["iat"] = (now - 3600).into())),
            csr.clone(),
            401,
            "before the bootstrap",
        ),
        (
            "wrong issuer",
            step.token(&key, &claims(&|c| c["iss"] = "someone-else".into())),
            csr.clone(),
            401,
            "provisioner not found",
        ),
        (
            "empty subject",
            step.token(&key, &claims(&|c| c["sub"] = "".into())),
            csr.clone(),
            401,
            "subject cannot be empty",
        ),
        (
            "SAN mismatch",
            step.token(&key, &claims(&|_| {})),
            csr_with_san("dev-1", "dev-2"),
            403,
            "valid DNS names",
        ),
        (
            "CN not in the token",
            step.token(&key, &claims(&|_| {})),
            csr_pem("dev-9", &kp),
            403,
            "valid common name",
        ),
        (
            "no SANs in the token: [sub] stands in",
            step.token(&key, &claims(&|c| c["sans"] = serde_json::json!([]))),
            csr_with_san("dev-1", "dev-1"),
            201,
            "",
        ),
        ("no token", String::new(), csr.clone(), 400, "missing ott"),
        (
            "a tampered signature",
            {
                // A character inside the signature (the last one also holds padding bits).
                let t = step.token(&key, &claims(&|_| {}));
                let i = t.len() - 10;
                let c = if &t[i..=i] == "A" { "B" } else { "A" };
                format!("{}{c}{}", &t[..i], &t[i + 1..])
            },
            csr.clone(),
            401,
            "error parsing jwk claims",
        ),
    ];
    for (what, ott, csr, status, message) in cases {
        let (s, m, body) = sign(ott, csr).await;
        assert_eq!(s, status, "{what}: {body}");
        assert!(
            m.contains(message),
            "{what}: {m:?} should contain {message:?}"
        );
    }
    // Lifetime outside the provisioner's limits (1 min ..= 24 h, plus the backdate, which is
    // applied only when the request names no notBefore).
    let nb = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    for (not_before, not_after, status) in [
        (Some(nb.as_str()), "30s", 403),
        (None, "30s", 201),
        (None, "25h", 403),
        (None, "24h", 201),
    ] {
        let mut req = serde_json::json!({"csr": csr, "ott": step.token(&key, &claims(&|_| {})),
            "notAfter": not_after});
        if let Some(nb) = not_before {
            req["notBefore"] = nb.into();
        }
        let r = http.post(&aud).json(&req).send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{not_before:?} {not_after}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_given_by_fingerprint_is_fetched_checked_and_pinned() {
    let t = tempfile::tempdir().unwrap();
    let jwk = provisioner_jwk();
    let step = StepCa::start(&t.path().join("step"), PROVISIONER, &jwk, short_claims()).await;
    let key = t.path().join("provisioner.json");
    std::fs::write(&key, jwk.to_string()).unwrap();
    let der = thingsly_bridge::step_ca::pem_fingerprint(&step.root_pem).unwrap();
    let by_fingerprint = |fp: &str| {
        step.signer_section(PROVISIONER, &key, None).replace(
            &format!("root = \"{}\"\n", step.root.display()),
            &format!("root_fingerprint = \"{fp}\"\n"),
        )
    };
    // Another fingerprint: step-ca has no such root; the bridge does not start.
    let wrong = "ab".repeat(32);
    let bad = Bridge::init_with(
        &t.path().join("bad"),
        &format!("device_cert_lifetime = \"1h\"\n{}", by_fingerprint(&wrong)),
    )
    .unwrap();
    let out = tokio::process::Command::new(bin("thingsly-bridge"))
        .arg("--config")
        .arg(&bad.config)
        .arg("serve")
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), out)
        .await
        .unwrap()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("signer.root_fingerprint") && err.contains("no root with fingerprint"),
        "{err}"
    );
    assert!(!bad.data().join("step-ca-root.crt").exists());

    let mut bridge = Bridge::init_with(
        &t.path().join("bridge"),
        &format!("device_cert_lifetime = \"1h\"\n{}", by_fingerprint(&der)),
    )
    .unwrap();
    bridge.start().unwrap();
    let pinned = bridge.data().join("step-ca-root.crt");
    assert_eq!(
        std::fs::read_to_string(&pinned).unwrap().trim(),
        step.root_pem.trim()
    );
    let kp = rcgen::KeyPair::generate().unwrap();
    let (s, body) = enroll(&bridge, "dev-fp", &csr_pem("dev-fp", &kp)).await;
    assert_eq!(s, 200, "{body}");
    // A pinned root that no longer matches is fetched again (and checked) at the next start.
    bridge.proc.as_mut().unwrap().kill();
    std::fs::write(&pinned, "garbage").unwrap();
    bridge.start().unwrap();
    assert_eq!(
        std::fs::read_to_string(&pinned).unwrap().trim(),
        step.root_pem.trim()
    );
}
