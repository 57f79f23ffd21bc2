//! `thingsly-agent`: the device daemon and its one-shot commands.

mod enroll_module;
mod platform;
mod status;
mod supervisor;
#[cfg(feature = "terminal")]
mod terminal_module;
#[cfg(feature = "tunnel")]
mod tunnel_module;

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use supervisor::{Ctx, ModuleFn, ModuleFuture};
use thingsly_core::StateHandle;
use thingsly_core::config::{AgentConfig, DEFAULT_PATH};
use thingsly_core::state_dir::StateDir;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "thingsly-agent", version, about = "Thingsly Edge device agent")]
struct Cli {
    #[arg(long, short, global = true, env = "THINGSLY_AGENT_CONFIG", default_value = DEFAULT_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon.
    Run,
    /// Enroll once (no retries) and exit; does nothing when already enrolled.
    Enroll,
    /// Show identity, enrollment and each module's state.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Validate the config file and exit (0 when valid).
    CheckConfig,
    /// Install a RAUC bundle from a local file (a USB stick, a service laptop) through the
    /// running agent: the same persisted update as a server's (install, reboot, health checks,
    /// mark good or back); the server learns the new version at the next poll.
    #[cfg(feature = "ota")]
    Install {
        /// The bundle (.raucb); it stays where it is.
        bundle: PathBuf,
        /// The software name the server is told (default: the bundle's RAUC compatible).
        #[arg(long)]
        name: Option<String>,
        /// The version the server is told (default: the bundle's version).
        #[arg(long)]
        version: Option<String>,
    },
    /// Print the metrics line protocol exactly as it would be written to InfluxDB.
    #[cfg(feature = "metrics")]
    Metrics {
        /// Collect twice, one interval apart, print the second collection and exit.
        #[arg(long, required = true)]
        once: bool,
        /// Time between the two collections (default: metrics.interval).
        #[arg(long, value_parser = humantime::parse_duration)]
        interval: Option<std::time::Duration>,
    },
}

fn init_logging(level: &str) {
    // Under journald: no timestamps (journald adds them) and no colours.
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let b = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(std::io::stderr)
        .fmt_fields(thingsly_core::log_fields::EscapedFields)
        .with_ansi(false);
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = log_filter(std::env::var("RUST_LOG").ok().as_deref(), level);
    if journald {
        b.without_time()
            .with_target(false)
            .finish()
            .with(filter)
            .init();
    } else {
        b.finish().with(filter).init();
    }
}

/// `RUST_LOG` if set and valid, else the configured level, else `info`. `target=level` lists
/// as in `RUST_LOG`, without env-filter's span and field matching (and its regex engine).
fn log_filter(rust_log: Option<&str>, level: &str) -> tracing_subscriber::filter::Targets {
    use tracing_subscriber::filter::Targets;
    // An empty list parses, and would silence everything.
    let parse = |v: &str| {
        Some(v.trim())
            .filter(|v| !v.is_empty())
            .and_then(|v| v.parse::<Targets>().ok())
    };
    rust_log
        .and_then(parse)
        .or_else(|| parse(level))
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO))
}

fn load(path: &std::path::Path) -> anyhow::Result<AgentConfig> {
    AgentConfig::load(path).map_err(|e| anyhow::anyhow!("{e}"))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match &cli.cmd {
        Cmd::CheckConfig => load(&cli.config).map(|c| {
            println!("{}: ok (device {})", cli.config.display(), c.device.id);
        }),
        Cmd::Status { json } => load(&cli.config).and_then(|c| status::print(&c, *json)),
        #[cfg(feature = "metrics")]
        Cmd::Metrics { interval, .. } => load(&cli.config).and_then(|c| metrics_once(c, *interval)),
        #[cfg(feature = "ota")]
        Cmd::Install {
            bundle,
            name,
            version,
        } => load(&cli.config).and_then(|c| {
            let req = thingsly_ota::local::LocalInstall {
                bundle: bundle.clone(),
                name: name.clone(),
                version: version.clone(),
            };
            local_install(&c, &req)
        }),
        Cmd::Run | Cmd::Enroll => (|| {
            let cfg = load(&cli.config)?;
            init_logging(&cfg.log.level);
            // One runtime, one thread: the agent's work is I/O bound and small.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                match cli.cmd {
                    Cmd::Enroll => enroll_once(cfg).await,
                    _ => run(cfg).await,
                }
            })
        })(),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("thingsly-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn context(cfg: AgentConfig) -> anyhow::Result<Ctx> {
    let dir = StateDir::open(&cfg.device.state_dir)
        .with_context(|| format!("state directory {}", cfg.device.state_dir.display()))?;
    let initial = platform::initial_state(&cfg).await;
    tracing::info!(sw_version = %initial.sw_version, rauc_slot = %initial.rauc_slot, hardware = %initial.hardware, "device");
    let proxies = proxies(&cfg)?;
    let (creds_tx, _) = tokio::sync::watch::channel(None);
    Ok(Ctx {
        proxies,
        cfg: Arc::new(cfg),
        state: StateHandle::new(initial),
        dir,
        creds_tx: Arc::new(creds_tx),
        shutdown: CancellationToken::new(),
    })
}

/// `[proxy]` and the environment's proxy variables, decided once; logged without secrets.
fn proxies(cfg: &AgentConfig) -> anyhow::Result<thingsly_core::proxy::Proxies> {
    let p = thingsly_core::proxy::Proxies::resolve(&cfg.proxy, |k| std::env::var(k).ok())
        .map_err(|e| anyhow::anyhow!("proxy settings: {e}"))?;
    if p.any() {
        tracing::info!(proxies = %p, "server connections through an HTTP proxy");
    }
    Ok(p)
}

async fn enroll_once(cfg: AgentConfig) -> anyhow::Result<()> {
    let ctx = context(cfg).await?;
    let identity = thingsly_enroll::Identity::load_or_create(&ctx.dir, &ctx.cfg.device.id)?;
    let creds = enroll_module::enroll_until_done(&ctx, &identity, true).await?;
    println!(
        "enrolled as {} (certificate serial {}, valid until {})",
        creds.info.subject_cn, creds.info.serial_hex, creds.info.not_after
    );
    Ok(())
}

#[cfg(feature = "metrics")]
fn metrics_config(
    cfg: &AgentConfig,
    proxies: thingsly_core::proxy::Proxies,
) -> thingsly_metrics::MetricsConfig {
    thingsly_metrics::MetricsConfig {
        device_id: cfg.device.id.clone(),
        section: cfg.metrics.clone(),
        fallback_ca: Some(cfg.device.state_dir.join(thingsly_enroll::paths::CA_CHAIN)),
        proxies,
    }
}

#[cfg(feature = "metrics")]
fn metrics_once(cfg: AgentConfig, interval: Option<std::time::Duration>) -> anyhow::Result<()> {
    init_logging("warn");
    let interval = interval.unwrap_or(cfg.metrics.interval);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let state = StateHandle::new(thingsly_core::DeviceState {
        device_id: cfg.device.id.clone(),
        ..Default::default()
    });
    let text = rt.block_on(thingsly_metrics::once(
        &metrics_config(&cfg, proxies(&cfg)?),
        &state,
        interval,
    ));
    use std::io::Write;
    std::io::stdout().write_all(text.as_bytes())?;
    Ok(())
}

#[cfg(feature = "metrics")]
fn metrics_module(ctx: Ctx) -> ModuleFuture {
    let cfg = metrics_config(&ctx.cfg, ctx.proxies.clone());
    Box::pin(async move {
        thingsly_metrics::run(
            cfg,
            ctx.state.clone(),
            ctx.dir.clone(),
            ctx.shutdown.clone(),
        )
        .await
        .map_err(anyhow::Error::from)
    })
}

#[cfg(feature = "terminal")]
fn terminal_module(ctx: Ctx) -> ModuleFuture {
    Box::pin(terminal_module::run(ctx))
}

#[cfg(feature = "tunnel")]
fn tunnel_module(ctx: Ctx) -> ModuleFuture {
    Box::pin(tunnel_module::run(ctx))
}

#[cfg(feature = "ota")]
fn ota_module(ctx: Ctx) -> ModuleFuture {
    let c = &ctx.cfg;
    let cfg = thingsly_ota::OtaConfig {
        section: c.ota.clone(),
        device_id: c.device.id.clone(),
        server_url: if c.ota.server_url.is_empty() {
            c.enroll.server_url.clone()
        } else {
            c.ota.server_url.clone()
        },
        reboot: c.commands.reboot.clone(),
        telemetry_enabled: cfg!(feature = "telemetry") && c.telemetry.enabled,
        proxies: ctx.proxies.clone(),
    };
    Box::pin(async move {
        thingsly_ota::run(
            cfg,
            ctx.state.clone(),
            ctx.dir.clone(),
            ctx.creds_tx.subscribe(),
            ctx.shutdown.clone(),
        )
        .await
        .map_err(anyhow::Error::from)
    })
}

fn enroll_module(ctx: Ctx) -> ModuleFuture {
    Box::pin(enroll_module::run(ctx))
}

#[cfg(feature = "telemetry")]
fn telemetry_module(ctx: Ctx) -> ModuleFuture {
    use thingsly_core::spool::SpoolLimits;
    use thingsly_proto::topics::Dialect;
    let t = &ctx.cfg.telemetry;
    let cfg = thingsly_telemetry::TelemetryConfig {
        device_id: ctx.cfg.device.id.clone(),
        host: t.host.clone(),
        port: t.port,
        dialect: match t.dialect {
            thingsly_core::config::DialectName::Thingsboard => Dialect::ThingsBoard,
            thingsly_core::config::DialectName::Thingsly => Dialect::Thingsly,
        },
        interval: t.interval,
        keepalive: t.keepalive,
        ca_bundle: t.ca_bundle.clone(),
        username: t.username.clone(),
        password: t.password.clone(),
        spool: SpoolLimits {
            max_messages: t.spool_max_messages,
            max_bytes: t.spool_max_bytes,
        },
        max_inflight: t.max_inflight,
        reboot_command: ctx.cfg.commands.reboot.clone(),
        proxies: ctx.proxies.clone(),
    };
    Box::pin(async move {
        thingsly_telemetry::run(
            cfg,
            ctx.state.clone(),
            ctx.dir.clone(),
            ctx.creds_tx.subscribe(),
            ctx.shutdown.clone(),
        )
        .await
        .map_err(anyhow::Error::from)
    })
}

/// `thingsly-agent install`: hands the bundle to the agent (see `thingsly_ota::local`).
#[cfg(feature = "ota")]
fn local_install(cfg: &AgentConfig, req: &thingsly_ota::local::LocalInstall) -> anyhow::Result<()> {
    if !cfg.ota.enabled {
        anyhow::bail!("ota.enabled = false in the config: the agent would never install it");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let said = rt
        .block_on(thingsly_ota::local::hand_over(
            req,
            &cfg.device.state_dir,
            &cfg.device.runtime_dir,
        ))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("{said}");
    Ok(())
}

async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    // `thingsly-agent install` wakes the OTA module with SIGUSR1, whose default action ends the
    // process: hooked before anything could send it (tokio keeps the handler for good).
    #[cfg(feature = "ota")]
    let _ = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1());
    let ctx = context(cfg).await?;
    #[cfg_attr(
        not(any(
            feature = "telemetry",
            feature = "metrics",
            feature = "terminal",
            feature = "tunnel",
            feature = "ota"
        )),
        allow(unused_mut)
    )]
    let mut modules: Vec<(&'static str, ModuleFn)> = vec![(enroll_module::MODULE, enroll_module)];
    #[cfg(feature = "telemetry")]
    if ctx.cfg.telemetry.enabled {
        modules.push(("telemetry", telemetry_module));
    } else {
        ctx.state
            .set_module("telemetry", "disabled", "telemetry.enabled = false");
    }
    #[cfg(feature = "metrics")]
    if !ctx.cfg.metrics.enabled {
        ctx.state.set_module(
            thingsly_metrics::MODULE,
            "disabled",
            "metrics.enabled = false",
        );
    } else if ctx.cfg.metrics.influxdb.url.is_empty() {
        ctx.state.set_module(
            thingsly_metrics::MODULE,
            "disabled",
            "metrics.influxdb.url is empty",
        );
    } else {
        modules.push((thingsly_metrics::MODULE, metrics_module));
    }
    #[cfg(feature = "tunnel")]
    if ctx.cfg.tunnel.enabled {
        modules.push((tunnel_module::MODULE, tunnel_module));
    } else {
        ctx.state
            .set_module(tunnel_module::MODULE, "disabled", "tunnel.enabled = false");
    }
    #[cfg(feature = "terminal")]
    if ctx.cfg.terminal.enabled {
        modules.push((terminal_module::MODULE, terminal_module));
    } else {
        ctx.state.set_module(
            terminal_module::MODULE,
            "disabled",
            "terminal.enabled = false",
        );
    }
    #[cfg(feature = "ota")]
    if !ctx.cfg.ota.enabled {
        ctx.state
            .set_module(thingsly_ota::MODULE, "disabled", "ota.enabled = false");
    } else if !ctx.cfg.rauc.enabled {
        ctx.state
            .set_module(thingsly_ota::MODULE, "disabled", "rauc.enabled = false");
    } else {
        modules.push((thingsly_ota::MODULE, ota_module));
    }
    supervisor::run(ctx, modules).await
}

#[cfg(test)]
mod tests {
    use super::log_filter;
    use tracing::Level;

    #[test]
    fn rust_log_then_the_configured_level_then_info() {
        let f = log_filter(None, "debug");
        assert!(f.would_enable("thingsly_ota", &Level::DEBUG));
        let f = log_filter(Some("warn,thingsly_tunnel=trace"), "debug");
        assert!(!f.would_enable("thingsly_ota", &Level::INFO));
        assert!(f.would_enable("thingsly_tunnel::node", &Level::TRACE));
        // Not a filter: the configured level.
        let f = log_filter(Some("thingsly=loud"), "error");
        assert!(!f.would_enable("thingsly_ota", &Level::WARN));
        let f = log_filter(Some(""), " ");
        assert!(f.would_enable("x", &Level::INFO));
        assert!(!f.would_enable("x", &Level::DEBUG));
    }
}
