//! The one shared picture of the device. Modules publish into it; telemetry and `status`
//! read it. Modules never call each other: they meet here.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tokio::sync::watch;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DeviceState {
    pub device_id: String,
    pub sw_version: String,
    /// RAUC boot name of the running slot ("A"/"B"), empty when unknown.
    pub rauc_slot: String,
    pub rauc_compatible: String,
    pub hardware: String,
    pub agent_version: String,
    /// idle, downloading, installing, rebooting, verifying, success, failed.
    pub ota_status: String,
    /// Why the last OTA action failed; empty after a success.
    pub ota_error: String,
    pub tunnel_address: Option<String>,
    /// "up" (a recent handshake with the hub), "down", or empty without a tunnel module.
    pub tunnel_state: String,
    /// Where the hub is reached (`ip:port`), empty until resolved.
    pub tunnel_endpoint: String,
    /// Unix time of the last completed handshake with the hub (rekeyed every 2 minutes).
    pub tunnel_last_handshake: Option<i64>,
    /// Inner bytes through the tunnel since the agent started (telemetry, not attributes).
    pub tunnel_rx_bytes: u64,
    pub tunnel_tx_bytes: u64,
    /// True once a certificate is stored; bumped generation tells users to reload credentials.
    pub enrolled: bool,
    pub credentials_generation: u64,
    pub certificate_not_after: Option<String>,
    pub modules: BTreeMap<String, ModuleState>,
    /// The server's cap on bundle downloads (shared attribute `ota_download_rate_limit`),
    /// bytes per second, 0 none; `None`: the config's `ota.download_rate_limit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download_rate_limit: Option<u64>,
}

/// What a module says about itself, shown by `status` and sent as telemetry attributes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ModuleState {
    /// "starting", "running", "waiting", "failed", "stopped", "disabled".
    pub state: String,
    /// One line on what it is doing or why it failed.
    pub detail: String,
    pub restarts: u32,
    /// Module-specific counters (messages sent, spool depth, drops …).
    pub counters: BTreeMap<String, u64>,
}

/// The running daemon's `status.json` in its runtime directory: its pid, `updated_at` and the
/// `DeviceState`, for `status` and `install`.
pub const STATUS_FILE: &str = "status.json";

/// The daemon's status file, when the pid in it is alive (a stale file after a crash is not
/// a daemon).
pub fn daemon_status(runtime_dir: &std::path::Path) -> Option<serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(runtime_dir.join(STATUS_FILE)).ok()?).ok()?;
    let pid = v["pid"].as_u64()?;
    std::path::Path::new(&format!("/proc/{pid}"))
        .exists()
        .then_some(v)
}

/// Cheap to clone; every module gets one.
#[derive(Clone)]
pub struct StateHandle {
    tx: watch::Sender<DeviceState>,
}

impl StateHandle {
    pub fn new(initial: DeviceState) -> Self {
        let (tx, _rx) = watch::channel(initial);
        Self { tx }
    }

    pub fn get(&self) -> DeviceState {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<DeviceState> {
        self.tx.subscribe()
    }

    /// Change the state; subscribers are woken only when something really changed.
    pub fn update(&self, f: impl FnOnce(&mut DeviceState)) {
        self.tx.send_if_modified(|s| {
            let before = s.clone();
            f(s);
            *s != before
        });
    }

    /// Set one module's state and detail, keeping its counters.
    pub fn set_module(&self, module: &str, state: &str, detail: impl Into<String>) {
        let detail = detail.into();
        self.update(|s| {
            let m = s.modules.entry(module.to_string()).or_default();
            m.state = state.to_string();
            m.detail = detail;
        });
    }
}

/// The part of the state that telemetry reports as client attributes; changes to counters or
/// module details must not cause an attribute publish each time.
pub fn attribute_view(s: &DeviceState) -> serde_json::Value {
    serde_json::json!({
        "device_id": s.device_id,
        "sw_version": s.sw_version,
        "rauc_slot": s.rauc_slot,
        "rauc_compatible": s.rauc_compatible,
        "hardware": s.hardware,
        "agent_version": s.agent_version,
        "tunnel_address": s.tunnel_address,
        "tunnel_state": s.tunnel_state,
        "tunnel_endpoint": s.tunnel_endpoint,
        "tunnel_last_handshake": s.tunnel_last_handshake,
        "ota_status": s.ota_status,
        "ota_error": s.ota_error,
        // ThingsBoard's OTA dashboard keys.
        "current_sw_version": s.sw_version,
        "sw_state": thingsboard_sw_state(&s.ota_status),
        "sw_error": s.ota_error,
    })
}

/// ThingsBoard's `sw_state` for our `ota_status` (`null` while idle).
pub fn thingsboard_sw_state(ota_status: &str) -> Option<&'static str> {
    Some(match ota_status {
        "downloading" => "DOWNLOADING",
        "installing" | "rebooting" => "UPDATING",
        "verifying" => "VERIFIED",
        "success" => "UPDATED",
        "failed" => "FAILED",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn update_wakes_only_on_change() {
        let h = StateHandle::new(DeviceState::default());
        let mut rx = h.subscribe();
        rx.borrow_and_update();
        h.update(|s| s.sw_version = "1.0.0".into());
        assert!(rx.has_changed().unwrap_or(false));
        rx.borrow_and_update();
        h.update(|s| s.sw_version = "1.0.0".into());
        assert!(!rx.has_changed().unwrap_or(true));
    }
}
