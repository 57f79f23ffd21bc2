//! One task: produce telemetry into the spool on a timer, keep one MQTT connection, drain the
//! spool in order with a bounded window of unacknowledged QoS 1 publishes, answer the server.

use crate::RemoteSettings;
use crate::attributes::AttributeTracker;
use crate::dialect::{self, Inbound};
use crate::sample::Sampler;
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration, Transport,
};
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use thingsly_core::backoff::Backoff;
use thingsly_core::device_state::attribute_view;
use thingsly_core::spool::{Spool, SpoolLimits};
use thingsly_core::state_dir::{MODE_PUBLIC, StateDir, StateError};
use thingsly_core::{DeviceState, StateHandle};
use thingsly_enroll::Credentials;
use thingsly_proto::topics::Dialect;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const MODULE: &str = "telemetry";
const SETTINGS_FILE: &str = "telemetry/settings.json";

#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    pub device_id: String,
    pub host: String,
    pub port: u16,
    pub dialect: Dialect,
    pub interval: Duration,
    pub keepalive: Duration,
    /// Broker CA bundle file; the enrolled CA chain when `None`.
    pub ca_bundle: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub spool: SpoolLimits,
    pub max_inflight: usize,
    /// argv of the `reboot` RPC.
    pub reboot_command: Vec<String>,
    /// The broker is reached through the TLS destinations' proxy, if any (CONNECT).
    pub proxies: thingsly_core::proxy::Proxies,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("spool: {0}")]
    Spool(#[from] StateError),
    #[error("broker CA bundle {path}: {detail}")]
    Ca { path: PathBuf, detail: String },
}

/// A live connection and what is in flight on it.
struct Conn {
    client: AsyncClient,
    events: EventLoop,
    connected: bool,
    /// Every QoS 1 publish handed to the client, in order: `Some(seq)` for spooled telemetry.
    /// The event loop reports packet ids in the same order, which is how acks find their seq.
    handed: VecDeque<Option<u64>>,
    /// Spool sequences handed over and not yet acknowledged, oldest first.
    inflight: VecDeque<u64>,
    pkid_to_seq: HashMap<u16, u64>,
}

struct Counters {
    produced: u64,
    sent: u64,
    rpc: u64,
    reconnects: u64,
}

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

pub async fn run(
    cfg: TelemetryConfig,
    state: StateHandle,
    state_dir: StateDir,
    mut creds_rx: watch::Receiver<Option<Arc<Credentials>>>,
    shutdown: CancellationToken,
) -> Result<(), TelemetryError> {
    let mut spool = Spool::open(state_dir.subdir("spool/telemetry")?, cfg.spool)?;
    let mut settings: RemoteSettings = match state_dir.read_json(SETTINGS_FILE) {
        Ok(s) => s.unwrap_or_default(),
        Err(e) => {
            tracing::error!(error = %e, "telemetry settings unreadable, using config defaults");
            RemoteSettings::default()
        }
    };
    publish_settings(&settings, &state);
    let mut interval = new_interval(&cfg, &settings);
    let mut sampler = Sampler::new();
    let mut counters = Counters {
        produced: 0,
        sent: 0,
        rpc: 0,
        reconnects: 0,
    };
    let mut state_rx = state.subscribe();
    let mut attrs = AttributeTracker::new(attribute_view(&state_rx.borrow_and_update()));
    let mut conn: Option<Conn> = None;
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
    // When to try connecting next; immediately at start.
    let mut next_connect = tokio::time::Instant::now();
    let mut msg_id: u64 = 0;
    state.set_module(MODULE, "waiting", "waiting for credentials");
    report(&state, &spool, &counters, false);

    loop {
        let have_creds = creds_rx.borrow().is_some();
        tokio::select! {
            _ = shutdown.cancelled() => {
                if let Some(c) = conn.take() {
                    // Best effort: a clean DISCONNECT; unacked messages stay in the spool.
                    let _ = c.client.try_disconnect();
                    let mut events = c.events;
                    let _ = tokio::time::timeout(Duration::from_millis(500), async {
                        while events.poll().await.is_ok() {}
                    }).await;
                }
                state.set_module(MODULE, "stopped", "");
                return Ok(());
            }
            _ = interval.tick() => {
                let values = sample_values(&mut sampler, &state.get());
                let body = dialect::telemetry_payload(cfg.dialect, now_ms(), values);
                match spool.push(body.to_string().as_bytes()) {
                    Ok(_) => counters.produced += 1,
                    Err(e) => tracing::error!(error = %e, "cannot spool telemetry"),
                }
                if let Some(c) = conn.as_mut() { pump(c, &mut spool, &cfg); }
                if attrs.due(tokio::time::Instant::now())
                    && let Some(c) = conn.as_mut().filter(|c| c.connected)
                {
                    msg_id += 1;
                    attrs.published(publish_attributes(c, &cfg, &state.get(), &settings, msg_id));
                }
                report(&state, &spool, &counters, conn.as_ref().is_some_and(|c| c.connected));
            }
            changed = state_rx.changed() => {
                if changed.is_err() { continue; }
                let view = attribute_view(&state_rx.borrow_and_update());
                if attrs.changed(&view, tokio::time::Instant::now()) {
                    // Registration data changed (new slot, OTA status …): tell the server now.
                    // Offline, the next connection publishes them anyway.
                    attrs.published(view);
                    if let Some(c) = conn.as_mut().filter(|c| c.connected) {
                        msg_id += 1;
                        attrs.published(publish_attributes(c, &cfg, &state.get(), &settings, msg_id));
                    }
                    let values = sample_values(&mut sampler, &state.get());
                    let body = dialect::telemetry_payload(cfg.dialect, now_ms(), values);
                    if spool.push(body.to_string().as_bytes()).is_ok() { counters.produced += 1; }
                    if let Some(c) = conn.as_mut() { pump(c, &mut spool, &cfg); }
                }
            }
            changed = creds_rx.changed() => {
                if changed.is_err() {
                    // The sender is gone: the agent is shutting down.
                    shutdown.cancelled().await;
                    continue;
                }
                // New certificate (renewal): reconnect with it.
                if conn.take().is_some() {
                    tracing::info!("credentials changed, reconnecting");
                }
                next_connect = tokio::time::Instant::now();
            }
            _ = tokio::time::sleep_until(next_connect), if conn.is_none() && have_creds => {
                let creds = creds_rx.borrow().clone();
                if let Some(creds) = creds {
                    match connect(&cfg, &creds) {
                        Ok(c) => {
                            conn = Some(c);
                            state.set_module(MODULE, "connecting", format!("{}:{}", cfg.host, cfg.port));
                        }
                        Err(e) => {
                            state.set_module(MODULE, "failed", e.to_string());
                            next_connect = tokio::time::Instant::now() + backoff.next_delay();
                        }
                    }
                }
            }
            ev = poll(&mut conn) => {
                let Some(c) = conn.as_mut() else { continue };
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        c.connected = true;
                        backoff.reset();
                        tracing::info!(broker = %format!("{}:{}", cfg.host, cfg.port), "MQTT connected");
                        state.set_module(MODULE, "running", format!("connected to {}:{}", cfg.host, cfg.port));
                        for t in dialect::subscriptions(cfg.dialect, &cfg.device_id) {
                            let _ = c.client.try_subscribe(t, QoS::AtLeastOnce);
                        }
                        msg_id += 1;
                        attrs.published(publish_attributes(c, &cfg, &state.get(), &settings, msg_id));
                        msg_id += 1;
                        if let Some((topic, body)) = dialect::attribute_request(cfg.dialect, msg_id) {
                            publish_other(c, topic, body);
                        }
                        pump(c, &mut spool, &cfg);
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        if let Some(Some(seq)) = c.handed.pop_front() {
                            c.pkid_to_seq.insert(pkid, seq);
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(seq) = c.pkid_to_seq.remove(&ack.pkid) {
                            c.inflight.retain(|s| *s != seq);
                            if let Err(e) = spool.remove(seq) {
                                tracing::error!(error = %e, "cannot remove acknowledged message from spool");
                            }
                            counters.sent += 1;
                        }
                        pump(c, &mut spool, &cfg);
                        report(&state, &spool, &counters, true);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let inbound = dialect::classify(cfg.dialect, &cfg.device_id, &p.topic, &p.payload);
                        let reply = handle_inbound(inbound, &cfg, &state, &state_dir, &mut settings, &mut counters);
                        for (topic, body) in reply.publish {
                            publish_other(c, topic, body);
                        }
                        if reply.interval_changed {
                            interval = new_interval(&cfg, &settings);
                            msg_id += 1;
                            attrs.published(publish_attributes(c, &cfg, &state.get(), &settings, msg_id));
                        }
                        if reply.attributes_requested {
                            msg_id += 1;
                            attrs.published(publish_attributes(c, &cfg, &state.get(), &settings, msg_id));
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let was_connected = c.connected;
                        let delay = backoff.next_delay();
                        tracing::warn!(error = %e, retry_in = ?delay, spooled = spool.len(), "MQTT connection lost");
                        state.set_module(MODULE, "waiting", format!("broker: {e}"));
                        if was_connected { counters.reconnects += 1; }
                        // Drop the whole client: unacked messages are still in the spool and
                        // are sent again, in order, on the next connection.
                        conn = None;
                        next_connect = tokio::time::Instant::now() + delay;
                        report(&state, &spool, &counters, false);
                    }
                }
            }
        }
    }
}

async fn poll(conn: &mut Option<Conn>) -> Result<Event, rumqttc::ConnectionError> {
    match conn {
        Some(c) => c.events.poll().await,
        None => std::future::pending().await,
    }
}

fn new_interval(cfg: &TelemetryConfig, settings: &RemoteSettings) -> tokio::time::Interval {
    let period = settings
        .telemetry_interval
        .map(Duration::from_secs_f64)
        .unwrap_or(cfg.interval);
    let mut i = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    i
}

fn connect(cfg: &TelemetryConfig, creds: &Credentials) -> Result<Conn, TelemetryError> {
    let ca_pem = match &cfg.ca_bundle {
        Some(p) => std::fs::read(p).map_err(|e| TelemetryError::Ca {
            path: p.clone(),
            detail: e.to_string(),
        })?,
        None => creds.ca_chain_pem.clone().into_bytes(),
    };
    let chain = creds.full_chain_pem();
    let tls =
        thingsly_enroll::client_config(&ca_pem, Some((chain.as_bytes(), creds.key_pem.as_bytes())))
            .map_err(|detail| TelemetryError::Ca {
                path: cfg.ca_bundle.clone().unwrap_or_default(),
                detail,
            })?;
    let mut opts = MqttOptions::new(cfg.device_id.clone(), cfg.host.clone(), cfg.port);
    opts.set_keep_alive(cfg.keepalive);
    opts.set_clean_session(true);
    opts.set_max_packet_size(64 * 1024, 64 * 1024);
    opts.set_inflight(cfg.max_inflight as u16 + 8);
    if let Some(u) = &cfg.username {
        opts.set_credentials(u.clone(), cfg.password.clone().unwrap_or_default());
    }
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(tls),
    )));
    if let Some(p) = cfg.proxies.for_destination(true, &cfg.host) {
        // A CONNECT tunnel to the broker: TLS (and the client certificate) stay end to end.
        opts.set_proxy(rumqttc::Proxy {
            ty: rumqttc::ProxyType::Http,
            auth: match &p.credentials {
                Some(c) => rumqttc::ProxyAuth::Basic {
                    username: c.username.clone(),
                    password: c.password.clone(),
                },
                None => rumqttc::ProxyAuth::None,
            },
            addr: p.host.clone(),
            port: p.port,
        });
    }
    let (client, events) = AsyncClient::new(opts, cfg.max_inflight + 16);
    Ok(Conn {
        client,
        events,
        connected: false,
        handed: VecDeque::new(),
        inflight: VecDeque::new(),
        pkid_to_seq: HashMap::new(),
    })
}

/// Hand spooled messages to the client until the window is full.
fn pump(c: &mut Conn, spool: &mut Spool, cfg: &TelemetryConfig) {
    if !c.connected {
        return;
    }
    while c.inflight.len() < cfg.max_inflight {
        let after = c.inflight.back().copied();
        let Some((seq, data)) = spool.peek(after, 1).pop() else {
            return;
        };
        match c.client.try_publish(
            dialect::telemetry_topic(cfg.dialect),
            QoS::AtLeastOnce,
            false,
            data,
        ) {
            Ok(()) => {
                c.inflight.push_back(seq);
                c.handed.push_back(Some(seq));
            }
            Err(_) => return, // request channel full; the next ack pumps again
        }
    }
}

fn publish_other(c: &mut Conn, topic: String, body: serde_json::Value) {
    if c.client
        .try_publish(topic.clone(), QoS::AtLeastOnce, false, body.to_string())
        .is_ok()
    {
        c.handed.push_back(None);
    } else {
        tracing::warn!(%topic, "MQTT request queue full, message not sent");
    }
}

fn publish_attributes(
    c: &mut Conn,
    cfg: &TelemetryConfig,
    s: &DeviceState,
    settings: &RemoteSettings,
    msg_id: u64,
) -> serde_json::Value {
    let view = attribute_view(s);
    let mut attrs = view.clone();
    if let Some(o) = attrs.as_object_mut() {
        let secs = settings
            .telemetry_interval
            .unwrap_or(cfg.interval.as_secs_f64());
        o.insert("telemetry_interval_s".into(), serde_json::json!(secs));
        o.insert(
            "mqtt_dialect".into(),
            serde_json::json!(format!("{:?}", cfg.dialect).to_lowercase()),
        );
    }
    publish_other(c, dialect::attributes_topic(cfg.dialect, msg_id), attrs);
    // What the broker now has, for the tracker (without the settings added above).
    view
}

fn sample_values(sampler: &mut Sampler, s: &DeviceState) -> serde_json::Value {
    let mut v = serde_json::json!({
        "cpu_usage": sampler.cpu_usage().unwrap_or(0.0),
        "mem_free_mb": sampler.mem_free_mb().unwrap_or(0),
        "sw_version": s.sw_version,
        "rauc_slot": s.rauc_slot,
        "ota_status": s.ota_status,
    });
    // Byte counters are a time series; only agents that run the tunnel send them.
    if !s.tunnel_state.is_empty()
        && let Some(o) = v.as_object_mut()
    {
        o.insert("tunnel_rx_bytes".into(), s.tunnel_rx_bytes.into());
        o.insert("tunnel_tx_bytes".into(), s.tunnel_tx_bytes.into());
    }
    v
}

fn report(state: &StateHandle, spool: &Spool, c: &Counters, connected: bool) {
    state.update(|s| {
        let m = s.modules.entry(MODULE.to_string()).or_default();
        for (k, v) in [
            ("produced", c.produced),
            ("sent", c.sent),
            ("spooled", spool.len() as u64),
            ("spool_bytes", spool.bytes()),
            ("dropped", spool.dropped_total()),
            ("corrupt", spool.corrupt_total()),
            ("rpc", c.rpc),
            ("reconnects", c.reconnects),
            ("connected", u64::from(connected)),
        ] {
            m.counters.insert(k.to_string(), v);
        }
    });
}

#[derive(Default)]
struct Reply {
    publish: Vec<(String, serde_json::Value)>,
    interval_changed: bool,
    attributes_requested: bool,
}

/// Applies the shared attributes we understand; returns whether the telemetry interval changed.
fn apply_settings(
    attrs: &serde_json::Map<String, serde_json::Value>,
    settings: &mut RemoteSettings,
    state_dir: &StateDir,
    state: &StateHandle,
) -> Result<bool, String> {
    let interval_before = settings.telemetry_interval;
    let changed = settings.apply(attrs)?;
    if changed {
        state_dir
            .write_json(SETTINGS_FILE, settings, MODE_PUBLIC)
            .map_err(|e| e.to_string())?;
        tracing::info!(?settings, "applied settings from shared attributes");
        publish_settings(settings, state);
    }
    Ok(settings.telemetry_interval != interval_before)
}

/// The settings other modules act on, into the device state (the download cap, for OTA).
fn publish_settings(settings: &RemoteSettings, state: &StateHandle) {
    // `update` wakes the state's readers only when the value really changed.
    state.update(|s| s.download_rate_limit = settings.ota_download_rate_limit);
}

fn handle_inbound(
    inbound: Inbound,
    cfg: &TelemetryConfig,
    state: &StateHandle,
    state_dir: &StateDir,
    settings: &mut RemoteSettings,
    counters: &mut Counters,
) -> Reply {
    let mut reply = Reply::default();
    match inbound {
        Inbound::SharedAttributes(attrs) => {
            match apply_settings(&attrs, settings, state_dir, state) {
                Ok(changed) => reply.interval_changed = changed,
                Err(e) => tracing::warn!(error = %e, "shared attributes refused"),
            }
        }
        Inbound::SetAttributes { attrs, reply_to } => {
            let result = apply_settings(&attrs, settings, state_dir, state);
            reply.interval_changed = matches!(result, Ok(true));
            let body = match result {
                Ok(_) => {
                    serde_json::json!({"result": 0, "message": "success", "ts": now_ms() / 1000})
                }
                Err(e) => serde_json::json!({"result": 1, "message": e, "ts": now_ms() / 1000}),
            };
            reply.publish.push((reply_to, body));
        }
        Inbound::GetAttributes => reply.attributes_requested = true,
        Inbound::Rpc {
            method,
            params,
            reply_to,
        } => {
            counters.rpc += 1;
            let result = rpc(&method, &params, cfg, state);
            tracing::info!(%method, ok = result.is_ok(), "RPC");
            reply.publish.push((
                reply_to,
                dialect::rpc_reply(cfg.dialect, &method, result, now_ms()),
            ));
        }
        Inbound::Ignored(why) => tracing::debug!(%why, "inbound message ignored"),
    }
    reply
}

fn rpc(
    method: &str,
    params: &serde_json::Value,
    cfg: &TelemetryConfig,
    state: &StateHandle,
) -> Result<serde_json::Value, String> {
    match method {
        "ping" => Ok(serde_json::json!({"pong": true, "ts": now_ms(), "params": params})),
        "status" => {
            let s = state.get();
            let mut v = attribute_view(&s);
            if let Some(o) = v.as_object_mut() {
                o.insert(
                    "modules".into(),
                    serde_json::to_value(&s.modules).unwrap_or_default(),
                );
            }
            Ok(v)
        }
        "reboot" => {
            let argv = cfg.reboot_command.clone();
            tracing::warn!(command = ?argv, "reboot requested over RPC");
            // Answer first; the reboot starts a moment later so the reply can leave.
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let Some((prog, args)) = argv.split_first() else {
                    return;
                };
                match tokio::process::Command::new(prog).args(args).status().await {
                    Ok(st) if st.success() => {}
                    Ok(st) => tracing::error!(%st, "reboot command failed"),
                    Err(e) => tracing::error!(error = %e, "reboot command could not start"),
                }
            });
            Ok(serde_json::json!({"rebooting": true}))
        }
        "" => Err(format!("malformed request: {params}")),
        other => Err(format!("unknown method: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_counters_are_telemetry_only_with_a_tunnel() {
        let mut sampler = Sampler::new();
        let mut s = DeviceState::default();
        let v = sample_values(&mut sampler, &s);
        assert!(v.get("tunnel_rx_bytes").is_none());
        s.tunnel_state = "up".into();
        s.tunnel_rx_bytes = 1234;
        s.tunnel_tx_bytes = 99;
        s.tunnel_last_handshake = Some(1_795_000_000);
        let v = sample_values(&mut sampler, &s);
        assert_eq!(v["tunnel_rx_bytes"], 1234);
        assert_eq!(v["tunnel_tx_bytes"], 99);
        // State and last handshake are attributes; the byte counters are not (they would
        // republish the attributes every few seconds).
        let a = attribute_view(&s);
        assert_eq!(a["tunnel_state"], "up");
        assert_eq!(a["tunnel_last_handshake"], 1_795_000_000);
        assert!(a.get("tunnel_rx_bytes").is_none());
    }
}
