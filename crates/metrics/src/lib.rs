//! Telegraf's job on the device: system metrics every interval, in Telegraf's schema, written
//! to InfluxDB in batches, kept in a bounded disk buffer while InfluxDB is away.

pub mod collect;
pub mod lineproto;
mod module;
pub mod writer;

pub use module::{Counters, MODULE, MetricsConfig, MetricsError, agent_point, gather, once, run};
