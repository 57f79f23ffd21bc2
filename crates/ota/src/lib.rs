//! OTA: turns a hawkBit deployment into an installed, booted, verified RAUC slot, and tells
//! hawkBit and MQTT the truth about it.
//!
//! - [`ddi_client`]: hawkBit's DDI API (poll, deploymentBase, feedback, configData, cancel).
//! - [`download`]: resumable, verified bundle download.
//! - [`rate_limit`]: the download rate cap (a token bucket, time passed in).
//! - [`rauc`]: RAUC's installer over D-Bus.
//! - [`state`]: `ota/deployment.json`, the persisted phase of the action in flight.
//! - [`local`]: `thingsly-agent install BUNDLE`, an update handed over without a server.
//! - [`machine`]: the engine's decisions without I/O (phase + facts -> next step), table-tested.
//! - [`engine`]: the driver: does the I/O those decisions ask for, one action from poll to
//!   final report.

pub mod ddi_client;
pub mod download;
pub mod engine;
pub mod local;
pub mod machine;
pub mod rate_limit;
pub mod rauc;
pub mod relay;
pub mod state;

pub use engine::{OtaConfig, run};

pub const MODULE: &str = "ota";
