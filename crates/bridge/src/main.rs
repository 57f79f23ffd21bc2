//! `thingsly-bridge`: init the PKI, serve the API, manage tokens.

use anyhow::Context;
use base64::Engine;
use clap::{Parser, Subcommand};
use rand_core::OsRng;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use thingsly_bridge::api::random_token;
use thingsly_bridge::api::{AppState, router};
use thingsly_bridge::ca::{self, Ca, CaPaths, InitOptions, write_file};
use thingsly_bridge::store::Store;
use thingsly_bridge::{BridgeConfig, tls_server};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "thingsly-bridge",
    version,
    about = "Thingsly Edge server side: enrollment CA, device registry"
)]
struct Cli {
    /// Config file; all defaults when it does not exist.
    #[arg(
        long,
        global = true,
        env = "THINGSLY_BRIDGE_CONFIG",
        default_value = "/etc/thingsly/bridge.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the root and issuing CA (or import PEMs), the server certificate, the WireGuard
    /// hub key and the fleet and admin tokens.
    Init {
        /// The root CA certificate to import. With `--import-issuing-*` the root key may stay
        /// offline (omit `--import-root-key`): the bridge signs with the issuing key only.
        #[arg(long)]
        import_root_cert: Option<PathBuf>,
        #[arg(long, requires = "import_root_cert")]
        import_root_key: Option<PathBuf>,
        #[arg(long, requires = "import_issuing_key")]
        import_issuing_cert: Option<PathBuf>,
        #[arg(long)]
        import_issuing_key: Option<PathBuf>,
        /// Replace an existing PKI (devices enrolled under it stop being trusted).
        #[arg(long)]
        force: bool,
    },
    /// Serve the HTTPS API.
    Serve,
    /// Create a one-time enrollment token for one device and print it.
    Token {
        #[arg(long)]
        device: String,
        /// Validity.
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Issue a TLS server certificate from the issuing CA (e.g. for the MQTT broker).
    IssueServerCert {
        /// DNS names or IP addresses; the first is also the CN.
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        #[arg(long)]
        out_cert: PathBuf,
        #[arg(long)]
        out_key: PathBuf,
    },
    /// Issue a client certificate and key from the issuing CA (an observer or a test client;
    /// devices enroll instead).
    IssueClientCert {
        #[arg(long)]
        cn: String,
        #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
        valid_for: Duration,
        #[arg(long)]
        out_cert: PathBuf,
        #[arg(long)]
        out_key: PathBuf,
    },
    /// List enrolled devices as JSON.
    Devices,
    /// Revoke a device: forget it (address back to the pool, renewal refused), list its
    /// certificate in the CRL (`<data_dir>/crl.pem`), refuse its id at enrollment until
    /// `admit`; a running bridge drops its tunnel peer within seconds. Same as
    /// `DELETE /devices/{id}`.
    Revoke {
        #[arg(long)]
        device: String,
    },
    /// Put a device in an OTA group (`ota assign --group`), or take it out with `--clear`.
    /// Same as `PUT /devices/{id}/group`. Devices cannot choose their group.
    Group {
        #[arg(long)]
        device: String,
        #[arg(long, required_unless_present = "clear")]
        group: Option<String>,
        #[arg(long)]
        clear: bool,
    },
    /// Let a revoked id enroll again (with a bootstrap token, like a new device). Same as
    /// `POST /devices/{id}/admit`.
    Admit {
        #[arg(long)]
        device: String,
    },
    /// OTA rollouts on the bridge's DDI server (same as the `/ota/...` management API).
    #[command(subcommand)]
    Ota(OtaCmd),
}

#[derive(Subcommand)]
enum OtaCmd {
    /// Upload a RAUC bundle as a software module; prints the module as JSON.
    Upload {
        file: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
    },
    /// Assign a module to devices (and/or every device of a metadata `group`); prints actions.
    Assign {
        #[arg(long)]
        module: i64,
        #[arg(long = "device")]
        devices: Vec<String>,
        #[arg(long)]
        group: Option<String>,
        /// forced, soft or downloadonly.
        #[arg(long = "type", default_value = "forced")]
        kind: String,
        /// Maintenance window start: RFC 3339, or `+<duration>` from now.
        #[arg(long, requires = "window_duration")]
        window_start: Option<String>,
        #[arg(long, value_parser = humantime::parse_duration)]
        window_duration: Option<Duration>,
        /// The device must confirm the action before it starts (hawkBit's user consent).
        #[arg(long)]
        confirm: bool,
    },
    /// Ask the device to cancel a running action.
    Cancel { action: i64 },
    /// An action and every feedback the device sent for it, as JSON.
    Show { action: i64 },
    /// Modules and actions, as JSON.
    List,
    /// A device's configData (as its DDI client sent it) and actions, as JSON.
    Device {
        #[arg(long)]
        device: String,
    },
    /// Create (or replace) a device's DDI TargetToken and print it.
    TargetToken {
        #[arg(long)]
        device: String,
    },
    /// Controllers the DDI server registered on their first gateway-token poll (not
    /// enrolled: no certificate, no tunnel), as JSON. Assignable like enrolled devices.
    Targets,
}

fn parse_window_start(s: &str) -> anyhow::Result<i64> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if let Some(rel) = s.strip_prefix('+') {
        return Ok(now + humantime::parse_duration(rel)?.as_secs() as i64);
    }
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .with_context(|| format!("--window-start {s:?}: RFC 3339 or +<duration>"))?;
    Ok(t.unix_timestamp())
}

fn ota(cfg: &BridgeConfig, cmd: OtaCmd) -> anyhow::Result<()> {
    use thingsly_bridge::ddi_server::{self, AssignRequest, Window};
    use thingsly_bridge::ota_store::{ActionKind, status};
    let store = Store::open(&cfg.data_dir.join("bridge.sqlite"))?;
    match cmd {
        OtaCmd::Upload {
            file,
            name,
            version,
        } => {
            let filename = file
                .file_name()
                .map(|f| f.to_string_lossy().to_string())
                .unwrap_or_default();
            let rt = tokio::runtime::Builder::new_current_thread().build()?;
            let s = rt
                .block_on(ddi_server::store_file(&cfg.artifacts_dir(), &file))
                .with_context(|| file.display().to_string())?;
            let m = store.add_module(
                &name, &version, &filename, s.size, &s.sha256, &s.sha1, &s.md5,
            )?;
            print(&m);
        }
        OtaCmd::Assign {
            module,
            devices,
            group,
            kind,
            window_start,
            window_duration,
            confirm,
        } => {
            let kind = ActionKind::parse(&kind)
                .ok_or_else(|| anyhow::anyhow!("--type {kind:?}: forced, soft or downloadonly"))?;
            let maintenance_window = match (window_start, window_duration) {
                (Some(s), Some(d)) => Some(Window {
                    start: parse_window_start(&s)?,
                    duration: d.as_secs() as i64,
                }),
                _ => None,
            };
            let req = AssignRequest {
                module,
                devices,
                group,
                kind,
                maintenance_window,
                confirm,
            };
            let actions = ddi_server::assign_to(&store, &req).map_err(|e| anyhow::anyhow!(e))?;
            print(&actions);
        }
        OtaCmd::Cancel { action } => {
            anyhow::ensure!(
                store.set_action_status(
                    action,
                    &[status::RUNNING, status::CONFIRMING],
                    status::CANCELING
                )?,
                "action {action} is not running"
            );
            println!("cancel requested for action {action}; the device confirms at its next poll");
        }
        OtaCmd::Show { action } => {
            let a = store
                .action(action)?
                .ok_or_else(|| anyhow::anyhow!("no action {action}"))?;
            print(&ddi_server::ActionDetail {
                feedback: store.feedback(action)?,
                action: a,
            });
        }
        OtaCmd::List => {
            print(
                &serde_json::json!({ "modules": store.modules()?, "actions": store.actions(None)? }),
            );
        }
        OtaCmd::Device { device } => print(&ddi_server::device_ota(&store, &device)?),
        OtaCmd::Targets => print(&store.ddi_targets()?),
        OtaCmd::TargetToken { device } => {
            anyhow::ensure!(
                ddi_server::is_ota_target(&store, &device)?,
                "no device {device:?} (neither enrolled nor registered by a DDI poll)"
            );
            let t = random_token();
            store.set_target_token(&device, &t)?;
            println!("{t}");
        }
    }
    Ok(())
}

/// Pretty JSON for whatever the OTA commands print.
fn print<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e).with_context(|| path.display().to_string()),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .fmt_fields(thingsly_core::log_fields::EscapedFields)
        .with_ansi(false);
    if journald {
        builder.without_time().init();
    } else {
        builder.init();
    }
    let cfg = BridgeConfig::load(&cli.config)?;
    match cli.cmd {
        Cmd::Init {
            import_root_cert,
            import_root_key,
            import_issuing_cert,
            import_issuing_key,
            force,
        } => {
            let opts = InitOptions {
                import_root: import_root_cert.map(|c| (c, import_root_key)),
                import_issuing: import_issuing_cert.zip(import_issuing_key),
                force,
            };
            ca::init(&cfg.data_dir, &cfg.server_names, &opts)?;
            let wg_key = cfg.data_dir.join("wireguard.key");
            if force || !wg_key.exists() {
                let secret = x25519_dalek::StaticSecret::random_from_rng(OsRng);
                let k = base64::engine::general_purpose::STANDARD.encode(secret.to_bytes());
                write_file(&wg_key, format!("{k}\n").as_bytes(), 0o600)?;
            }
            for p in [cfg.fleet_token_path(), cfg.admin_token_path()] {
                if force || !p.exists() {
                    write_file(&p, format!("{}\n", random_token()).as_bytes(), 0o600)?;
                }
            }
            Store::open(&cfg.data_dir.join("bridge.sqlite"))?;
            let paths = CaPaths::new(&cfg.data_dir);
            println!("PKI ready in {}", paths.dir.display());
            if paths.root_key().exists() {
                println!(
                    "  root CA key: {} (serve does not need it: move it off this machine)",
                    paths.root_key().display()
                );
            }
            println!("  CA bundle for devices: {}", paths.chain().display());
            println!(
                "  fleet token:           {}",
                cfg.fleet_token_path().display()
            );
            println!(
                "  admin token:           {}",
                cfg.admin_token_path().display()
            );
            Ok(())
        }
        Cmd::Serve => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(serve(cfg, &cli.config))
        }
        Cmd::Token { device, ttl } => {
            anyhow::ensure!(
                thingsly_proto::enroll::is_valid_device_id(&device),
                "--device must be 1-64 of A-Z a-z 0-9 . _ -"
            );
            let store = Store::open(&cfg.data_dir.join("bridge.sqlite"))?;
            let token = random_token();
            let expires = time::OffsetDateTime::now_utc().unix_timestamp() + ttl.as_secs() as i64;
            store.add_device_token(&device, &token, expires)?;
            println!("{token}");
            Ok(())
        }
        Cmd::IssueServerCert {
            names,
            out_cert,
            out_key,
        } => {
            let ca = Ca::load(&cfg.data_dir)?;
            let (crt, key) = ca.issue_server(&names, Duration::from_secs(825 * 24 * 3600))?;
            write_file(
                &out_cert,
                format!("{crt}{}", ca.chain_pem).as_bytes(),
                0o644,
            )?;
            write_file(&out_key, key.as_bytes(), 0o600)?;
            Ok(())
        }
        Cmd::IssueClientCert {
            cn,
            valid_for,
            out_cert,
            out_key,
        } => {
            let ca = Ca::load(&cfg.data_dir)?;
            let kp = rcgen::KeyPair::generate()?;
            let issued = ca.sign_device(
                &cn,
                &rcgen::PublicKeyData::subject_public_key_info(&kp),
                valid_for,
            )?;
            write_file(
                &out_cert,
                format!("{}{}", issued.pem, ca.chain_pem).as_bytes(),
                0o644,
            )?;
            write_file(&out_key, kp.serialize_pem().as_bytes(), 0o600)?;
            Ok(())
        }
        Cmd::Revoke { device } => {
            let store = Store::open(&cfg.data_dir.join("bridge.sqlite"))?;
            anyhow::ensure!(store.delete(&device)?, "no device {device:?}");
            let ca = Ca::load(&cfg.data_dir)?;
            thingsly_bridge::api::write_crl(&store, &ca, &cfg.data_dir.join("crl.pem"))?;
            println!("revoked {device}");
            Ok(())
        }
        Cmd::Group {
            device,
            group,
            clear,
        } => {
            let store = Store::open(&cfg.data_dir.join("bridge.sqlite"))?;
            let group = if clear { None } else { group };
            if let Some(g) = &group {
                Store::check_group_name(g).map_err(|m| anyhow::anyhow!("--{m}"))?;
            }
            anyhow::ensure!(
                store.set_group(&device, group.as_deref())?,
                "no device {device:?}"
            );
            println!("{device}: group {}", group.as_deref().unwrap_or("(none)"));
            Ok(())
        }
        Cmd::Admit { device } => {
            let store = Store::open(&cfg.data_dir.join("bridge.sqlite"))?;
            anyhow::ensure!(store.admit(&device)?, "{device:?} is not revoked");
            println!("admitted {device}");
            Ok(())
        }
        Cmd::Ota(cmd) => ota(&cfg, cmd),
        Cmd::Devices => {
            let store = Store::open(&cfg.data_dir.join("bridge.sqlite"))?;
            println!("{}", serde_json::to_string_pretty(&store.list()?)?);
            Ok(())
        }
    }
}

async fn serve(cfg: BridgeConfig, config_path: &std::path::Path) -> anyhow::Result<()> {
    let ca = Ca::load(&cfg.data_dir)?;
    let paths = CaPaths::new(&cfg.data_dir);
    let signer = thingsly_bridge::signer::Signer::from_config(&cfg.signer, &cfg.data_dir)
        .await
        .with_context(|| format!("{}: [signer]", config_path.display()))?;
    // Client certificates chain to the issuing CA or to the root: the issuing CA is a trust
    // anchor too, so a device that sends only its leaf (how many DDI clients are configured) is
    // accepted like one that sends leaf + issuing CA; with step-ca, its root as well.
    let tls = tls_server::server_config(
        &paths.server_crt(),
        &paths.server_key(),
        Some(signer.client_roots_pem(&ca).as_bytes()),
    )?;
    let wg_private = read_token(&cfg.data_dir.join("wireguard.key"))?;
    let wg_public = {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&wg_private)
            .context("wireguard.key")?;
        let bytes: [u8; 32] = raw
            .try_into()
            .map_err(|_| anyhow::anyhow!("wireguard.key is not 32 bytes"))?;
        let secret = x25519_dalek::StaticSecret::from(bytes);
        (
            bytes,
            base64::engine::general_purpose::STANDARD
                .encode(x25519_dalek::PublicKey::from(&secret).as_bytes()),
        )
    };
    let (wg_private_bytes, wg_public) = wg_public;
    let ticket_key = thingsly_bridge::ticket_key::load_or_create(&cfg.data_dir)?;
    let terminal = match &cfg.terminal {
        Some(t) => Some(
            thingsly_bridge::terminal_proxy::TerminalProxy::from_config(t, &ticket_key.private_pem)
                .await
                .with_context(|| format!("{}: [terminal]", config_path.display()))?,
        ),
        None => None,
    };
    tracing::info!(signer = signer.name(), "device certificates signed by");
    let state = Arc::new(AppState {
        ca,
        signer,
        store: Store::open(&cfg.data_dir.join("bridge.sqlite"))?,
        fleet_token: read_token(&cfg.fleet_token_path())?,
        admin_token: read_token(&cfg.admin_token_path())?,
        device_cert_lifetime: cfg.device_cert_lifetime,
        pool: cfg.wireguard.pool.parse()?,
        wg_endpoint: cfg.wireguard.endpoint.clone(),
        wg_keepalive: cfg.wireguard.persistent_keepalive,
        wg_public_key: wg_public,
        ticket_public_pem: ticket_key.public_pem,
        terminal,
        hub: thingsly_bridge::hub::Hub::start(
            &cfg.wireguard,
            wg_private_bytes,
            &cfg.data_dir.join("wireguard.key"),
        )
        .with_context(|| format!("{}: [wireguard]", config_path.display()))?
        .map(Arc::new),
        ddi: if cfg.ddi.enabled {
            Some(thingsly_bridge::ddi_server::DdiSettings {
                tenant: cfg.ddi.tenant.clone(),
                polling_sleep: cfg.ddi.polling_sleep,
                gateway_token: match &cfg.ddi.gateway_token_file {
                    Some(p) => read_token(p)?,
                    None => String::new(),
                },
                artifacts_dir: cfg.artifacts_dir(),
            })
        } else {
            None
        },
        fleet_rate: thingsly_bridge::quota::RateWindow::new(
            cfg.enrollment.fleet_enrollments_per_minute as usize,
            Duration::from_secs(60),
        ),
        hawkbit: match &cfg.hawkbit {
            Some(h) => Some(Arc::new(
                thingsly_bridge::hawkbit::Hawkbit::from_config(h)
                    .with_context(|| format!("{}: [hawkbit]", config_path.display()))?,
            )),
            None => None,
        },
        webhook_secret: match &cfg.thingsboard {
            Some(t) => {
                let s = read_token(&t.webhook_secret_file).with_context(|| {
                    format!("{}: thingsboard.webhook_secret_file", config_path.display())
                })?;
                anyhow::ensure!(
                    s.len() >= 32,
                    "{}: thingsboard.webhook_secret_file {}: the secret must be at least 32 characters",
                    config_path.display(),
                    t.webhook_secret_file.display()
                );
                s
            }
            None => String::new(),
        },
        enrollment: cfg.enrollment.clone(),
        external_url: cfg.external_url.clone(),
        crl_path: cfg.data_dir.join("crl.pem"),
    });
    // The broker's crlfile must exist before it starts, and be fresh: write it now and daily.
    thingsly_bridge::api::publish_crl(&state);
    {
        let st = state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(24 * 3600));
            tick.tick().await;
            loop {
                tick.tick().await;
                thingsly_bridge::api::publish_crl(&st);
            }
        });
    }
    let nofile = tls_server::nofile_limit().unwrap_or(1024);
    let listeners = if cfg
        .terminal
        .as_ref()
        .and_then(|t| t.listen.as_ref())
        .is_some()
    {
        2
    } else {
        1
    };
    let mut limits: tls_server::Limits = (&cfg.limits).into();
    limits.max_connections =
        tls_server::effective_cap(cfg.limits.max_connections, nofile, listeners, 256);
    if limits.max_connections < cfg.limits.max_connections {
        tracing::warn!(
            configured = cfg.limits.max_connections,
            nofile,
            effective = limits.max_connections,
            "limits.max_connections lowered to fit the nofile limit (LimitNOFILE= in the unit)"
        );
    }
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    tracing::info!(listen = %listener.local_addr()?, "thingsly-bridge serving");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    let reload = state.clone();
    tokio::spawn(async move {
        // SIGHUP rereads the operator policy; a broken file keeps the old one in force.
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hup.recv().await.is_some() {
            if let Some(t) = &reload.terminal {
                match t.policy().reload().await {
                    Ok(()) => tracing::info!("terminal policy reloaded"),
                    Err(e) => {
                        tracing::error!(error = %e, "terminal policy reload failed; old policy kept")
                    }
                }
            }
        }
    });
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => return,
            };
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        tracing::info!("shutting down");
        s.cancel();
    });
    if let Some(hub) = &state.hub {
        tokio::spawn(hub.clone().run(state.clone(), shutdown.clone()));
    }
    if let Some(h) = &state.hawkbit {
        tokio::spawn(h.clone().run(state.clone(), shutdown.clone()));
    }
    let app = router(state);
    // The operator port: same API, TLS without a client-certificate request (browsers).
    let operator_port = match cfg.terminal.as_ref().and_then(|t| t.listen.as_ref()) {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding terminal.listen {addr}"))?;
            tracing::info!(listen = %l.local_addr()?, "terminal proxy serving (operator port)");
            let tls = tls_server::server_config(&paths.server_crt(), &paths.server_key(), None)?;
            Some(tokio::spawn(tls_server::serve(
                "operator",
                l,
                tls,
                app.clone(),
                limits.clone(),
                shutdown.clone(),
            )))
        }
        None => None,
    };
    tls_server::serve("device", listener, tls, app, limits, shutdown).await?;
    if let Some(task) = operator_port {
        task.await??;
    }
    Ok(())
}
