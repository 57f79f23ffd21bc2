//! Runs each module as a task on the one runtime, restarts a failed one with backoff and
//! jitter, talks to systemd (READY, WATCHDOG, STATUS, STOPPING), keeps `status.json` current,
//! and shuts everything down on SIGTERM/SIGINT within the deadline.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use thingsly_core::backoff::Backoff;
use thingsly_core::config::AgentConfig;
use thingsly_core::state_dir::{MODE_PUBLIC, StateDir, write_atomic};
use thingsly_core::{DeviceState, StateHandle};
use thingsly_enroll::Credentials;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What every module gets.
#[derive(Clone)]
pub struct Ctx {
    pub cfg: Arc<AgentConfig>,
    pub state: StateHandle,
    pub dir: StateDir,
    pub creds_tx: Arc<watch::Sender<Option<Arc<Credentials>>>>,
    pub shutdown: CancellationToken,
    /// The HTTP proxies every module's server connections use, resolved once at start.
    pub proxies: thingsly_core::proxy::Proxies,
}

// Only modules that wait for something before they can start use it.
#[cfg(any(feature = "terminal", feature = "tunnel"))]
impl Ctx {
    /// Retry `step` until it yields what a module needs to start (enrollment, an address, an
    /// interface), showing why it waits as the module's state (logged once per new reason, by
    /// `log`). Looks again every `every`, whenever a certificate arrives and whenever another
    /// module changes state. `None`: shutdown.
    pub async fn wait_ready<T, E, F>(
        &self,
        module: &str,
        every: Duration,
        mut step: impl FnMut() -> F,
        log: impl Fn(&E, &str),
    ) -> Option<T>
    where
        E: std::fmt::Display,
        F: Future<Output = Result<T, E>>,
    {
        let mut waiting_for = String::new();
        let mut creds = self.creds_tx.subscribe();
        // What a module waits for is usually another module coming up (the terminal waits for
        // the tunnel's interface): look again as soon as one changes state, not up to `every`
        // later. Only the states: details and counters change all the time.
        let others = |s: &DeviceState| -> Vec<(String, String)> {
            s.modules
                .iter()
                .filter(|(name, _)| name.as_str() != module)
                .map(|(name, m)| (name.clone(), m.state.clone()))
                .collect()
        };
        let mut states = self.state.subscribe();
        let mut seen = others(&states.borrow_and_update());
        loop {
            match step().await {
                Ok(ready) => return Some(ready),
                Err(e) => {
                    let why = e.to_string();
                    if why != waiting_for {
                        log(&e, &why);
                        self.state.set_module(module, "waiting", why.clone());
                        waiting_for = why;
                    }
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(every) => {}
                        _ = creds.changed() => {}
                        _ = async {
                            while states.changed().await.is_ok() {
                                let now = others(&states.borrow_and_update());
                                if now != seen {
                                    seen = now;
                                    return;
                                }
                            }
                            std::future::pending::<()>().await
                        } => {}
                    }
                }
            }
        }
    }
}

pub type ModuleFuture = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;
pub type ModuleFn = fn(Ctx) -> ModuleFuture;

/// Total time allowed for modules to stop after a signal (systemd's default stop timeout is
/// far longer; the issue asks for 5 s end to end).
const SHUTDOWN_GRACE: Duration = Duration::from_millis(4000);

async fn supervise(name: &'static str, f: ModuleFn, ctx: Ctx) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
    let mut restarts = 0u32;
    loop {
        let started = tokio::time::Instant::now();
        // A separate task, so that where the build unwinds (cargo's default profiles, and the
        // bridge) a panic is caught here instead of taking the agent down. The Yocto recipe
        // builds the agent with panic = "abort" (0.85 MB smaller): there a panic ends the
        // process and systemd restarts it (Restart=on-failure) from its persisted state.
        let result = tokio::spawn(f(ctx.clone())).await;
        if ctx.shutdown.is_cancelled() {
            return;
        }
        let why = match result {
            Ok(Ok(())) => "module returned".to_string(),
            Ok(Err(e)) => format!("{e:#}"),
            Err(e) => format!("panicked: {e}"),
        };
        // A module that ran a good while before failing starts again quickly.
        if started.elapsed() > Duration::from_secs(600) {
            backoff.reset();
        }
        restarts += 1;
        let delay = backoff.next_delay();
        tracing::error!(module = name, error = %why, restart_in = ?delay, restarts, "module failed");
        ctx.state.update(|s| {
            let m = s.modules.entry(name.to_string()).or_default();
            m.state = "failed".into();
            m.detail = format!("{why}; restart in {}s", delay.as_secs());
            m.restarts = restarts;
        });
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

fn systemd_status(s: &DeviceState) -> String {
    let mods: Vec<String> = s
        .modules
        .iter()
        .map(|(k, v)| format!("{k}: {}", v.state))
        .collect();
    format!("{} {}", s.device_id, mods.join(", "))
}

#[derive(serde::Serialize)]
struct StatusFile<'a> {
    pid: u32,
    updated_at: String,
    state: &'a DeviceState,
}

fn write_status(path: &std::path::Path, s: &DeviceState) {
    let file = StatusFile {
        pid: std::process::id(),
        updated_at: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        state: s,
    };
    if let Ok(data) = serde_json::to_vec_pretty(&file)
        && let Err(e) = write_atomic(path, &data, MODE_PUBLIC)
    {
        tracing::warn!(error = %e, "cannot write status file");
    }
}

/// WATCHDOG_USEC when the watchdog is meant for us. Like libsystemd's sd_watchdog_enabled (and
/// unlike the sd-notify crate), an absent WATCHDOG_PID means "this process".
fn watchdog_usec() -> Option<u64> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    match std::env::var("WATCHDOG_PID") {
        Ok(pid) if pid.parse::<u32>().ok() != Some(std::process::id()) => None,
        _ => (usec > 0).then_some(usec),
    }
}

pub async fn run(ctx: Ctx, modules: Vec<(&'static str, ModuleFn)>) -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;

    let status_path = ctx
        .cfg
        .device
        .runtime_dir
        .join(thingsly_core::device_state::STATUS_FILE);
    if let Err(e) = std::fs::create_dir_all(&ctx.cfg.device.runtime_dir) {
        tracing::warn!(dir = %ctx.cfg.device.runtime_dir.display(), error = %e, "runtime directory unusable; `status` will show less");
    }
    for (name, _) in &modules {
        ctx.state.set_module(name, "starting", "");
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (name, f) in modules {
        tasks.spawn(supervise(name, f, ctx.clone()));
    }
    // Local initialisation is done: config loaded, state directory usable, modules started.
    // Servers being unreachable must not look like a failed start (it would block rollback).
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    tracing::info!(device = %ctx.cfg.device.id, "thingsly-agent running");

    let watchdog_usec = watchdog_usec();
    let watchdog = watchdog_usec.is_some();
    let wd_period = Duration::from_micros(watchdog_usec.unwrap_or(7_200_000_000) / 2);
    let mut wd = tokio::time::interval(wd_period);
    let mut state_rx = ctx.state.subscribe();
    let mut last_status = String::new();
    let mut status_dirty = true;
    let mut status_tick = tokio::time::interval(Duration::from_millis(250));

    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            // The watchdog is fed from this loop: if the runtime is stuck, systemd notices.
            _ = wd.tick(), if watchdog => {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            }
            r = state_rx.changed() => {
                if r.is_err() { break; }
                status_dirty = true;
            }
            // Coalesce state changes into at most four status writes per second (tmpfs).
            _ = status_tick.tick(), if status_dirty => {
                status_dirty = false;
                let s = state_rx.borrow_and_update().clone();
                let line = systemd_status(&s);
                if line != last_status {
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status(&line)]);
                    last_status = line;
                }
                write_status(&status_path, &s);
            }
        }
    }
    tracing::info!("shutting down");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    ctx.shutdown.cancel();
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("modules did not stop in time; exiting anyway (spools are durable)");
    }
    let _ = std::fs::remove_file(&status_path);
    Ok(())
}
