//! Foundations every agent module stands on: the validated config, the state directory with
//! atomic writes, the bounded disk spool, backoff, and the shared [`DeviceState`].
//! It owns no network protocol and starts no task of its own.

pub mod backoff;
pub mod config;
pub mod device_state;
pub mod log_fields;
pub mod poll_schedule;
pub mod proxy;
pub mod spool;
pub mod state_dir;

pub use device_state::{DeviceState, ModuleState, StateHandle};

/// An error with its sources, one line: what reqwest and friends hide behind "error sending
/// request" (connection refused, certificate unknown …).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
