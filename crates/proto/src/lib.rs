//! Wire types shared by `thingsly-agent` and `thingsly-bridge`: the enrollment API and the
//! MQTT topic layouts of ThingsBoard and the Thingsly platform, and hawkBit's DDI bodies.
//! Pure data: no I/O, no TLS, no clocks — both sides and the tests depend on it cheaply.

pub mod ddi;
pub mod enroll;
pub mod http_range;
pub mod topics;
