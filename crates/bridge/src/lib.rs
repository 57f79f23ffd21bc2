//! thingsly-bridge: the slim server side. It owns the enrollment CA, the device registry
//! (SQLite by default) with each device's WireGuard address, and the HTTPS API devices and
//! operators use, and a hawkBit-compatible DDI server with its OTA management API. It never
//! holds a device's private keys.

pub mod api;
pub mod auth;
pub mod authz;
pub mod ca;
pub mod config;
pub mod connect_webhook;
pub mod ddi_server;
pub mod error;
pub mod hawkbit;
pub mod hub;
pub mod operator_auth;
pub mod ota_store;
pub mod provision_store;
pub mod quota;
pub mod signer;
pub mod state;
pub mod step_ca;
pub mod store;
pub mod terminal_page;
pub mod terminal_proxy;
pub mod ticket_key;
pub mod tls_server;
pub mod tls_stream;

pub use config::BridgeConfig;
