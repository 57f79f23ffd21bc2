//! Bad config, bad token, malformed server JSON, bridge down, full disk: each a clear error,
//! no corrupted state.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use thingsly_e2e::*;

fn agent_for(
    dir: &std::path::Path,
    server_url: String,
    token: String,
    ca: std::path::PathBuf,
) -> Agent {
    Agent::new(
        dir,
        &AgentOpts {
            device_id: "dev-bad".into(),
            server_url,
            token,
            ca_bundle: ca,
            mqtt_port: free_port(),
            interval: "10s".into(),
            ..Default::default()
        },
    )
    .unwrap()
}

fn no_partial_files(dir: &std::path::Path) {
    for e in walk(dir) {
        let name = e.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !name.contains(".tmp-"),
            "temp file left behind: {}",
            e.display()
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn bad_config_names_key_and_line() {
    let t = tempfile::tempdir().unwrap();
    let cfg = t.path().join("agent.toml");
    std::fs::write(
        &cfg,
        "[device]\nid = \"d\"\n\n[telemetry]\nport = 8883\nintervall = \"5s\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin("thingsly-agent"))
        .args(["--config", cfg.to_str().unwrap(), "check-config"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("agent.toml:6"), "{err}");
    assert!(err.contains("telemetry.intervall"), "{err}");
    // `run` refuses the same file before touching any state.
    let out = std::process::Command::new(bin("thingsly-agent"))
        .args(["--config", cfg.to_str().unwrap(), "run"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    // The shipped example is valid.
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/agent.example.toml");
    let out = std::process::Command::new(bin("thingsly-agent"))
        .args(["--config", example.to_str().unwrap(), "check-config"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bad_token_and_bridge_down_are_clear_errors() {
    let t = tempfile::tempdir().unwrap();
    let mut bridge = Bridge::init(&t.path().join("bridge")).unwrap();
    bridge.start().unwrap();
    let agent = agent_for(
        &t.path().join("agent"),
        bridge.url(),
        "not-the-token".into(),
        bridge.ca_chain(),
    );
    let (ok, _, err) = agent.cmd(&["enroll"]);
    assert!(!ok);
    assert!(err.contains("401") && err.contains("bad_token"), "{err}");
    assert!(!agent.state().join("identity/device.crt").exists());
    assert!(
        agent.state().join("identity/device.key").exists(),
        "key is kept for the next try"
    );

    // Bridge down: connection refused, named as such.
    let port = free_port();
    let agent = agent_for(
        &t.path().join("agent2"),
        format!("https://127.0.0.1:{port}"),
        bridge.fleet_token(),
        bridge.ca_chain(),
    );
    let (ok, _, err) = agent.cmd(&["enroll"]);
    assert!(!ok);
    assert!(err.contains("unreachable"), "{err}");
    no_partial_files(&agent.state());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_server_json_is_refused_and_nothing_stored() {
    let t = tempfile::tempdir().unwrap();
    let bridge = Bridge::init(&t.path().join("bridge")).unwrap();
    // A TLS server with a certificate the agent trusts, answering garbage.
    let crt = t.path().join("srv.crt");
    let key = t.path().join("srv.key");
    bridge
        .cli(&[
            "issue-server-cert",
            "--name",
            "127.0.0.1",
            "--out-cert",
            crt.to_str().unwrap(),
            "--out-key",
            key.to_str().unwrap(),
        ])
        .unwrap();
    let tls = {
        use rustls_pki_types::pem::PemObject;
        let chain: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(&crt)
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
        let k = rustls_pki_types::PrivateKeyDer::from_pem_file(&key).unwrap();
        rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, k)
        .unwrap()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((tcp, _)) = listener.accept().await {
            if let Ok(mut s) = acceptor.accept(tcp).await {
                let mut buf = vec![0u8; 65536];
                let _ = s.read(&mut buf).await;
                let body = r#"{"certificate_pem": 12, "ca_chain_pem": "#;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            }
        }
    });
    let agent = agent_for(
        &t.path().join("agent"),
        format!("https://127.0.0.1:{port}"),
        "tok".into(),
        bridge.ca_chain(),
    );
    let out = tokio::task::spawn_blocking(move || {
        let r = agent.cmd(&["enroll"]);
        (r, agent)
    })
    .await
    .unwrap();
    let ((ok, _, err), agent) = out;
    assert!(!ok);
    assert!(err.contains("malformed answer"), "{err}");
    assert!(!agent.state().join("identity/device.crt").exists());
    assert!(!agent.state().join("identity/ca-chain.pem").exists());
    no_partial_files(&agent.state());
}

/// Needs root (mounts a tiny tmpfs as the state directory); CI runs as root.
#[test]
fn full_disk_for_state_directory_is_reported_and_keeps_state_intact() {
    let t = tempfile::tempdir().unwrap();
    let mut bridge = Bridge::init(&t.path().join("bridge")).unwrap();
    bridge.start().unwrap();
    let agent = agent_for(
        &t.path().join("agent"),
        bridge.url(),
        bridge.fleet_token(),
        bridge.ca_chain(),
    );
    let state = agent.state();
    std::fs::create_dir_all(&state).unwrap();
    let st = std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=64k",
            "tmpfs",
            state.to_str().unwrap(),
        ])
        .status()
        .expect("mount");
    assert!(st.success(), "this test needs root to mount a tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(state.clone());

    // Make the keys while there is room, then fill the disk.
    std::fs::create_dir_all(state.join("identity")).unwrap();
    let (ok, _, _) = agent.cmd(&["check-config"]);
    assert!(ok);
    // Fill: what is left goes to a filler file.
    let filler = state.join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 64 * 1024]);
    let (ok, _, err) = agent.cmd(&["enroll"]);
    assert!(!ok);
    assert!(err.contains("No space left on device"), "{err}");
    no_partial_files(&state);
    assert!(!state.join("identity/device.crt").exists());

    // Free the space: enrollment completes, with whatever key was made intact.
    std::fs::remove_file(&filler).unwrap();
    let (ok, out, err) = agent.cmd(&["enroll"]);
    assert!(ok, "{out}{err}");
    let key = std::fs::read_to_string(state.join("identity/device.key")).unwrap();
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
}
