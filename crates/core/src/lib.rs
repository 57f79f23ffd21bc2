//! Foundations every agent module stands on: the validated config, the state directory with
//! atomic writes, the bounded disk spool, backoff, and the shared [`DeviceState`].
//! It owns no network protocol and starts no task of its own.

pub mod backoff;
pub mod config;
pub mod device_state;
pub mod spool;
pub mod state_dir;

pub use device_state::{DeviceState, ModuleState, StateHandle};
