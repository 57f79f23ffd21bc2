//! Where the device's identity facts come from: RAUC over D-Bus when its service answers,
//! otherwise the config and /etc/os-release; the board name from the device tree or DMI.

use thingsly_core::config::AgentConfig;

#[derive(Debug, Default, Clone, PartialEq)]
pub struct RaucInfo {
    pub boot_slot: String,
    pub compatible: String,
    /// `bundle.version` of the booted slot.
    pub booted_version: Option<String>,
}

/// How long the agent waits at start for a RAUC that is on the bus but not answering yet.
#[cfg(feature = "rauc")]
const RAUC_STARTUP_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

#[cfg(feature = "rauc")]
pub async fn rauc_info() -> Result<RaucInfo, String> {
    use std::collections::HashMap;
    use zbus::zvariant::OwnedValue;
    let fut = async {
        let conn = zbus::Connection::system()
            .await
            .map_err(|e| e.to_string())?;
        let proxy = zbus::Proxy::new(
            &conn,
            "de.pengutronix.rauc",
            "/",
            "de.pengutronix.rauc.Installer",
        )
        .await
        .map_err(|e| e.to_string())?;
        let boot_slot: String = proxy
            .get_property("BootSlot")
            .await
            .map_err(|e| e.to_string())?;
        let compatible: String = proxy
            .get_property("Compatible")
            .await
            .map_err(|e| e.to_string())?;
        let slots: Vec<(String, HashMap<String, OwnedValue>)> = proxy
            .call("GetSlotStatus", &())
            .await
            .map_err(|e| e.to_string())?;
        let text = |m: &HashMap<String, OwnedValue>, k: &str| {
            m.get(k).and_then(|v| String::try_from(v.clone()).ok())
        };
        let booted_version = slots
            .iter()
            .find(|(_, m)| text(m, "state").as_deref() == Some("booted"))
            .and_then(|(_, m)| text(m, "bundle.version"));
        Ok(RaucInfo {
            boot_slot,
            compatible,
            booted_version,
        })
    };
    // A RAUC that is not there fails at once (no system bus, or ServiceUnknown); only one that
    // is still starting is waited for. 3 s was too short on a slow board: under QEMU TCG the
    // agent came up before RAUC on the new slot and published an empty rauc_slot (HIL update).
    tokio::time::timeout(RAUC_STARTUP_WAIT, fut)
        .await
        .map_err(|_| {
            format!(
                "RAUC did not answer within {} s",
                RAUC_STARTUP_WAIT.as_secs()
            )
        })?
}

#[cfg(not(feature = "rauc"))]
pub async fn rauc_info() -> Result<RaucInfo, String> {
    Err("built without the rauc feature".into())
}

/// VERSION_ID (or VERSION) from os-release.
pub fn os_release_version() -> Option<String> {
    let text = std::fs::read_to_string("/etc/os-release")
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .ok()?;
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(|v| v.trim().trim_matches('"').to_string())
            .filter(|v| !v.is_empty())
    };
    get("VERSION_ID").or_else(|| get("VERSION"))
}

pub fn hardware_name() -> String {
    for p in [
        "/sys/firmware/devicetree/base/model",
        "/sys/class/dmi/id/product_name",
    ] {
        if let Ok(s) = std::fs::read_to_string(p) {
            let s = s.trim_matches(|c: char| c == '\0' || c.is_whitespace());
            if !s.is_empty() {
                return s.to_string();
            }
        }
    }
    std::env::consts::ARCH.to_string()
}

/// Fill in the identity facts of the initial DeviceState.
pub async fn initial_state(cfg: &AgentConfig) -> thingsly_core::DeviceState {
    let mut s = thingsly_core::DeviceState {
        device_id: cfg.device.id.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        ota_status: "idle".into(),
        hardware: if cfg.device.hardware.is_empty() {
            hardware_name()
        } else {
            cfg.device.hardware.clone()
        },
        ..Default::default()
    };
    let rauc = if cfg.rauc.enabled {
        match rauc_info().await {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::info!(reason = %e, "RAUC not available; slot and version from config/os-release");
                None
            }
        }
    } else {
        None
    };
    let fallback_version = || {
        if cfg.device.sw_version.is_empty() {
            os_release_version().unwrap_or_else(|| "unknown".into())
        } else {
            cfg.device.sw_version.clone()
        }
    };
    match rauc {
        Some(r) => {
            s.rauc_slot = r.boot_slot;
            s.rauc_compatible = r.compatible;
            s.sw_version = r.booted_version.unwrap_or_else(fallback_version);
        }
        None => s.sw_version = fallback_version(),
    }
    s
}
