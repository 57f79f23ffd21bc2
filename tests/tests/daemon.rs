//! The daemon under a systemd-like supervisor (a real NOTIFY_SOCKET), and its device facts
//! from a real `rauc service` on a private D-Bus.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};
use thingsly_e2e::*;

#[test]
fn notifies_ready_watchdog_status_and_stopping() {
    let t = tempfile::tempdir().unwrap();
    let sock_path = t.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // No bridge at all: READY must not wait for any server.
    let mut agent = Agent::new(&t.path().join("agent"), &AgentOpts::default()).unwrap();
    agent.env = vec![
        ("NOTIFY_SOCKET".into(), sock_path.display().to_string()),
        ("WATCHDOG_USEC".into(), "400000".into()),
    ];
    agent.start().unwrap();
    let mut got: Vec<String> = Vec::new();
    let end = Instant::now() + Duration::from_secs(3);
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    assert!(got.iter().any(|m| m.contains("READY=1")), "{got:?}");
    let pings = got.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(
        pings >= 5,
        "watchdog pings every 200 ms expected, got {pings}: {got:?}"
    );
    assert!(
        got.iter()
            .any(|m| m.starts_with("STATUS=") && m.contains("enroll")),
        "{got:?}"
    );
    let (code, took) = agent.proc.as_mut().unwrap().terminate();
    assert!(code.is_some_and(|c| c.success()), "{code:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let mut stopping = false;
    while let Ok(n) = sock.recv(&mut buf) {
        stopping |= String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1");
    }
    assert!(stopping, "STOPPING=1 expected on SIGTERM");
}

/// Starts the project's copy of the RAUC sandbox (Debian's rauc 1.8, a private dbus-daemon,
/// file-backed A/B slots), installs a v2.3.4 bundle into B and "reboots" into it.
#[test]
fn slot_and_version_come_from_rauc_over_dbus() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("rauc");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("rauc/rauc-sandbox.sh");
    let sb = |args: &[&str]| {
        let out = std::process::Command::new(&script)
            .arg("--dir")
            .arg(&dir)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rauc-sandbox {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    struct Stop<F: FnMut()>(F);
    impl<F: FnMut()> Drop for Stop<F> {
        fn drop(&mut self) {
            (self.0)()
        }
    }
    let exports = sb(&["start"]);
    let _stop = Stop(|| {
        let _ = std::process::Command::new(&script)
            .arg("--dir")
            .arg(&dir)
            .args(["stop"])
            .output();
    });
    let bus = exports
        .lines()
        .find_map(|l| l.strip_prefix("export DBUS_SYSTEM_BUS_ADDRESS="))
        .unwrap()
        .trim_matches(|c| c == '"' || c == '\'')
        .to_string();
    let bundle = sb(&[
        "bundle",
        "v234.raucb",
        "--version",
        "2.3.4",
        "--size-mib",
        "1",
    ]);
    sb(&["install", bundle.trim()]);
    sb(&["reboot"]);

    let mut agent = Agent::new(
        &t.path().join("agent"),
        &AgentOpts {
            rauc_enabled: true,
            ..Default::default()
        },
    )
    .unwrap();
    agent.env = vec![("DBUS_SYSTEM_BUS_ADDRESS".into(), bus)];
    agent.start().unwrap();
    wait_for("status from RAUC", Duration::from_secs(15), || {
        let s = agent.status();
        s["state"]["rauc_slot"] == "B" && s["state"]["sw_version"] == "2.3.4"
    });
    let s = agent.status();
    assert_eq!(s["state"]["rauc_compatible"], "rauc-sandbox-board");
}
