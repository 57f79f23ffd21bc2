//! What each platform expects on the wire: topics to subscribe, where telemetry and attributes
//! go, and how an incoming message maps to an action.

use thingsly_proto::topics::{Dialect, thingsboard as tb, thingsly};

/// An incoming message, decoded.
#[derive(Debug, PartialEq)]
pub enum Inbound {
    /// Shared attributes pushed or answered (`{key: value}`).
    SharedAttributes(serde_json::Map<String, serde_json::Value>),
    /// A command to run; `reply_to` is the topic for the answer.
    Rpc {
        method: String,
        params: serde_json::Value,
        reply_to: String,
    },
    /// Thingsly `attributes/set`: apply, then acknowledge on `reply_to`.
    SetAttributes {
        attrs: serde_json::Map<String, serde_json::Value>,
        reply_to: String,
    },
    /// Thingsly `attributes/get`: publish our attributes.
    GetAttributes,
    Ignored(String),
}

pub fn subscriptions(d: Dialect, device: &str) -> Vec<String> {
    match d {
        Dialect::ThingsBoard => vec![
            tb::ATTRIBUTES.to_string(),
            tb::ATTRIBUTES_RESPONSE_FILTER.to_string(),
            tb::RPC_REQUEST_FILTER.to_string(),
        ],
        Dialect::Thingsly => vec![
            thingsly::command_filter(device),
            thingsly::attributes_set_filter(device),
            thingsly::attributes_get(device),
        ],
    }
}

pub fn telemetry_topic(d: Dialect) -> &'static str {
    match d {
        Dialect::ThingsBoard => tb::TELEMETRY,
        Dialect::Thingsly => thingsly::TELEMETRY,
    }
}

pub fn attributes_topic(d: Dialect, msg_id: u64) -> String {
    match d {
        Dialect::ThingsBoard => tb::ATTRIBUTES.to_string(),
        Dialect::Thingsly => thingsly::attributes(&msg_id.to_string()),
    }
}

/// ThingsBoard only: ask for the shared attributes we understand after (re)connecting.
pub fn attribute_request(d: Dialect, req_id: u64) -> Option<(String, serde_json::Value)> {
    match d {
        Dialect::ThingsBoard => Some((
            format!("{}{req_id}", tb::ATTRIBUTES_REQUEST_PREFIX),
            serde_json::json!({"sharedKeys": "telemetry_interval"}),
        )),
        Dialect::Thingsly => None,
    }
}

/// Telemetry body. ThingsBoard gets the sample time (a spooled message sent late must keep
/// it); Thingsly's device API takes flat values only.
pub fn telemetry_payload(d: Dialect, ts_ms: i64, values: serde_json::Value) -> serde_json::Value {
    match d {
        Dialect::ThingsBoard => serde_json::json!({"ts": ts_ms, "values": values}),
        Dialect::Thingsly => values,
    }
}

/// An RPC answer on the platform's shape.
pub fn rpc_reply(
    d: Dialect,
    method: &str,
    result: Result<serde_json::Value, String>,
    ts_ms: i64,
) -> serde_json::Value {
    match (d, result) {
        (Dialect::ThingsBoard, Ok(v)) => v,
        (Dialect::ThingsBoard, Err(e)) => serde_json::json!({"error": e}),
        (Dialect::Thingsly, Ok(v)) => {
            serde_json::json!({"result": 0, "message": "success", "ts": ts_ms / 1000, "method": method, "data": v})
        }
        (Dialect::Thingsly, Err(e)) => {
            serde_json::json!({"result": 1, "message": e, "ts": ts_ms / 1000, "method": method})
        }
    }
}

fn json_object(payload: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    match serde_json::from_slice::<serde_json::Value>(payload) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(other) => Err(format!("expected a JSON object, got {other}")),
        Err(e) => Err(format!("invalid JSON: {e}")),
    }
}

fn rpc_from(payload: &[u8], reply_to: String) -> Inbound {
    match json_object(payload) {
        Ok(m) => Inbound::Rpc {
            method: m
                .get("method")
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string(),
            params: m.get("params").cloned().unwrap_or(serde_json::Value::Null),
            reply_to,
        },
        Err(e) => Inbound::Rpc {
            method: String::new(),
            params: serde_json::Value::String(e),
            reply_to,
        },
    }
}

pub fn classify(d: Dialect, device: &str, topic: &str, payload: &[u8]) -> Inbound {
    match d {
        Dialect::ThingsBoard => {
            if topic == tb::ATTRIBUTES {
                match json_object(payload) {
                    Ok(m) => Inbound::SharedAttributes(m),
                    Err(e) => Inbound::Ignored(e),
                }
            } else if topic.starts_with(tb::ATTRIBUTES_RESPONSE_PREFIX) {
                match json_object(payload) {
                    Ok(m) => Inbound::SharedAttributes(
                        m.get("shared")
                            .and_then(|s| s.as_object())
                            .cloned()
                            .unwrap_or_default(),
                    ),
                    Err(e) => Inbound::Ignored(e),
                }
            } else if let Some(id) = topic.strip_prefix(tb::RPC_REQUEST_PREFIX) {
                rpc_from(payload, format!("{}{id}", tb::RPC_RESPONSE_PREFIX))
            } else {
                Inbound::Ignored(format!("unexpected topic {topic}"))
            }
        }
        Dialect::Thingsly => {
            if let Some(id) = topic.strip_prefix(&thingsly::command_prefix(device)) {
                rpc_from(payload, thingsly::command_response(id))
            } else if let Some(id) = topic.strip_prefix(&thingsly::attributes_set_prefix(device)) {
                match json_object(payload) {
                    Ok(attrs) => Inbound::SetAttributes {
                        attrs,
                        reply_to: thingsly::attributes_set_response(id),
                    },
                    Err(e) => Inbound::Ignored(e),
                }
            } else if topic == thingsly::attributes_get(device) {
                Inbound::GetAttributes
            } else {
                Inbound::Ignored(format!("unexpected topic {topic}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thingsboard_rpc_and_attributes() {
        let d = Dialect::ThingsBoard;
        assert_eq!(
            classify(
                d,
                "x",
                "v1/devices/me/rpc/request/42",
                br#"{"method":"ping","params":{}}"#
            ),
            Inbound::Rpc {
                method: "ping".into(),
                params: serde_json::json!({}),
                reply_to: "v1/devices/me/rpc/response/42".into()
            }
        );
        let resp = classify(
            d,
            "x",
            "v1/devices/me/attributes/response/1",
            br#"{"shared":{"telemetry_interval":3}}"#,
        );
        assert!(matches!(resp, Inbound::SharedAttributes(m) if m["telemetry_interval"] == 3));
        assert!(matches!(
            classify(d, "x", "v1/devices/me/attributes", b"nope"),
            Inbound::Ignored(_)
        ));
    }

    #[test]
    fn thingsly_commands_and_attribute_set() {
        let d = Dialect::Thingsly;
        assert_eq!(
            classify(
                d,
                "dev1",
                "devices/command/dev1/m7",
                br#"{"method":"ReSet","params":{"a":1}}"#
            ),
            Inbound::Rpc {
                method: "ReSet".into(),
                params: serde_json::json!({"a":1}),
                reply_to: "devices/command/response/m7".into()
            }
        );
        assert!(matches!(
            classify(d, "dev1", "devices/attributes/set/dev1/m8", br#"{"telemetry_interval":2}"#),
            Inbound::SetAttributes { reply_to, .. } if reply_to == "devices/attributes/set/response/m8"
        ));
        assert_eq!(
            classify(d, "dev1", "devices/attributes/get/dev1", b"{}"),
            Inbound::GetAttributes
        );
        assert_eq!(subscriptions(d, "dev1")[0], "devices/command/dev1/+");
    }
}
