//! The device's MQTT session with ThingsBoard (or the Thingsly platform) over mutual TLS:
//! registration attributes, periodic telemetry, shared-attribute settings, server-side RPC.
//! Telemetry is written to a disk spool first and removed only when the broker acknowledged
//! it (QoS 1), so an outage, a restart or a power cut loses nothing within the spool's bound.
//! It reads `DeviceState` and credentials; it never enrolls, never touches RAUC.

mod attributes;
mod dialect;
mod sample;
mod session;

pub use session::{TelemetryConfig, TelemetryError, run};

/// Settings the server may change through shared attributes, persisted in the state directory.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RemoteSettings {
    /// Seconds between telemetry messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry_interval: Option<f64>,
    /// Bytes per second for bundle downloads (0: no cap), over `ota.download_rate_limit`;
    /// the attribute set to null gives the config its say back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ota_download_rate_limit: Option<u64>,
}

impl RemoteSettings {
    /// Apply the keys we understand from a shared-attribute object; returns whether anything
    /// changed. Unknown keys are left for other consumers and ignored here.
    pub fn apply(
        &mut self,
        attrs: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<bool, String> {
        // All or nothing: a refused key leaves every setting as it was.
        let mut next = self.clone();
        if let Some(v) = attrs.get("telemetry_interval") {
            let secs = v
                .as_f64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                .ok_or_else(|| format!("telemetry_interval {v} is not a number of seconds"))?;
            if !(0.1..=86_400.0).contains(&secs) {
                return Err(format!(
                    "telemetry_interval {secs} must be between 0.1 and 86400 seconds"
                ));
            }
            next.telemetry_interval = Some(secs);
        }
        if let Some(v) = attrs.get("ota_download_rate_limit") {
            next.ota_download_rate_limit = match v {
                serde_json::Value::Null => None,
                v => Some(
                    v.as_u64()
                        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
                        .ok_or_else(|| {
                            format!(
                                "ota_download_rate_limit {v} is not a whole number of bytes per second (0: no cap)"
                            )
                        })?,
                ),
            };
        }
        let changed = next != *self;
        *self = next;
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_apply_and_validate() {
        let mut s = RemoteSettings::default();
        let m = |v: serde_json::Value| v.as_object().cloned().unwrap();
        assert!(
            s.apply(&m(serde_json::json!({"telemetry_interval": 5})))
                .unwrap()
        );
        assert_eq!(s.telemetry_interval, Some(5.0));
        assert!(
            !s.apply(&m(serde_json::json!({"telemetry_interval": "5"})))
                .unwrap()
        );
        assert!(!s.apply(&m(serde_json::json!({"unrelated": 1}))).unwrap());
        assert!(
            s.apply(&m(serde_json::json!({"telemetry_interval": 0})))
                .is_err()
        );
        assert!(
            s.apply(&m(serde_json::json!({"telemetry_interval": "x"})))
                .is_err()
        );
    }

    #[test]
    fn the_download_cap_is_a_whole_number_or_null() {
        let mut s = RemoteSettings::default();
        let m = |v: serde_json::Value| v.as_object().cloned().unwrap();
        assert!(
            s.apply(&m(serde_json::json!({"ota_download_rate_limit": 262144})))
                .unwrap()
        );
        assert_eq!(s.ota_download_rate_limit, Some(262_144));
        assert!(
            !s.apply(&m(serde_json::json!({"ota_download_rate_limit": "262144"})))
                .unwrap()
        );
        assert!(
            s.apply(&m(serde_json::json!({"ota_download_rate_limit": 0})))
                .unwrap()
        );
        assert_eq!(
            s.ota_download_rate_limit,
            Some(0),
            "0: the server lifts the cap"
        );
        assert!(
            s.apply(&m(serde_json::json!({"ota_download_rate_limit": null})))
                .unwrap()
        );
        assert_eq!(
            s.ota_download_rate_limit, None,
            "null: the config's cap again"
        );
        for bad in [
            serde_json::json!(-1),
            serde_json::json!(1.5),
            serde_json::json!("fast"),
        ] {
            let before = s.clone();
            assert!(
                s.apply(&m(serde_json::json!({ "ota_download_rate_limit": bad })))
                    .is_err()
            );
            assert_eq!(s, before, "a refused value changes nothing");
        }
    }
}
