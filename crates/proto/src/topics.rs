//! MQTT topic layouts. ThingsBoard's device API and the Thingsly (ThingsPanel) device topics
//! carry the same agent features; [`Dialect`] picks one.

/// ThingsBoard device API, `me` is bound to the authenticated session.
pub mod thingsboard {
    pub const TELEMETRY: &str = "v1/devices/me/telemetry";
    pub const ATTRIBUTES: &str = "v1/devices/me/attributes";
    pub const ATTRIBUTES_REQUEST_PREFIX: &str = "v1/devices/me/attributes/request/";
    pub const ATTRIBUTES_RESPONSE_FILTER: &str = "v1/devices/me/attributes/response/+";
    pub const ATTRIBUTES_RESPONSE_PREFIX: &str = "v1/devices/me/attributes/response/";
    pub const RPC_REQUEST_FILTER: &str = "v1/devices/me/rpc/request/+";
    pub const RPC_REQUEST_PREFIX: &str = "v1/devices/me/rpc/request/";
    pub const RPC_RESPONSE_PREFIX: &str = "v1/devices/me/rpc/response/";
}

/// Thingsly platform (a ThingsPanel fork) device topics; `{device}` is the device number.
pub mod thingsly {
    pub const TELEMETRY: &str = "devices/telemetry";

    pub fn attributes(msg_id: &str) -> String {
        format!("devices/attributes/{msg_id}")
    }
    pub fn event(msg_id: &str) -> String {
        format!("devices/event/{msg_id}")
    }
    pub fn command_filter(device: &str) -> String {
        format!("devices/command/{device}/+")
    }
    pub fn command_prefix(device: &str) -> String {
        format!("devices/command/{device}/")
    }
    pub fn command_response(msg_id: &str) -> String {
        format!("devices/command/response/{msg_id}")
    }
    pub fn attributes_set_filter(device: &str) -> String {
        format!("devices/attributes/set/{device}/+")
    }
    pub fn attributes_set_prefix(device: &str) -> String {
        format!("devices/attributes/set/{device}/")
    }
    pub fn attributes_set_response(msg_id: &str) -> String {
        format!("devices/attributes/set/response/{msg_id}")
    }
    pub fn attributes_get(device: &str) -> String {
        format!("devices/attributes/get/{device}")
    }
}

/// Which platform's topics the telemetry session speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dialect {
    #[default]
    ThingsBoard,
    Thingsly,
}
