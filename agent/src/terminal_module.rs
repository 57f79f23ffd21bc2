//! The `terminal` module: once enrolled (the ticket key arrived with the certificate) and once
//! its address exists (the tunnel is up), serve ttyd-compatible sessions on it.

use crate::supervisor::Ctx;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use thingsly_terminal::ticket::TicketVerifier;
use thingsly_terminal::{SessionConfig, TerminalConfig};

pub const MODULE: &str = "terminal";
/// How often to look again for the ticket key or the tunnel address.
const RETRY: Duration = Duration::from_secs(5);

pub async fn run(ctx: Ctx) -> anyhow::Result<()> {
    let t = ctx.cfg.terminal.clone();
    let step = || async {
        let key = ctx
            .dir
            .read(thingsly_enroll::paths::TICKET_KEY)?
            .ok_or("not enrolled yet (no ticket key from the bridge)".to_string())?;
        let ip: IpAddr = if t.listen == "tunnel" {
            let addr = ctx
                .state
                .get()
                .tunnel_address
                .ok_or("no tunnel address yet".to_string())?;
            let ip = addr.split('/').next().unwrap_or_default();
            ip.parse()
                .map_err(|_| format!("tunnel address {addr:?} is not an IP address"))?
        } else {
            t.listen.parse()?
        };
        let at = SocketAddr::new(ip, t.port);
        let listener = tokio::net::TcpListener::bind(at).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrNotAvailable {
                format!("{ip} is not up yet (tunnel down)")
            } else {
                format!("listen on {at}: {e}")
            }
        })?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((listener, key))
    };
    let log = |_: &_, why: &str| tracing::info!(reason = %why, "terminal waiting");
    let Some((listener, key)) = ctx.wait_ready(MODULE, RETRY, step, log).await else {
        return Ok(());
    };
    if !t.user.is_empty() && !t.allow_agent_user {
        match thingsly_terminal::is_own_user(&t.user) {
            Ok(true) => {
                let why = format!(
                    "terminal.user {:?} is the agent's own user (it could read the device key); name another or set terminal.allow_agent_user = true",
                    t.user
                );
                ctx.state.set_module(MODULE, "failed", why.clone());
                anyhow::bail!(why);
            }
            Ok(false) => {}
            // Sessions will say so; the module keeps listening (the user may come later).
            Err(e) => tracing::warn!(error = %e, "terminal sessions cannot start"),
        }
    }
    let verifier = TicketVerifier::new(&key, &ctx.cfg.device.id).map_err(anyhow::Error::msg)?;
    let cfg = TerminalConfig {
        session: SessionConfig {
            command: t.command.clone(),
            user: (!t.user.is_empty()).then(|| t.user.clone()),
            term: t.term.clone(),
            idle_timeout: t.idle_timeout,
            read_only: t.read_only,
            title: format!("{} ({})", ctx.cfg.device.id, t.command.join(" ")),
            ..SessionConfig::default()
        },
        max_sessions: t.max_sessions,
    };
    ctx.state.set_module(
        MODULE,
        "running",
        format!("listening on ws://{}/ws", listener.local_addr()?),
    );
    thingsly_terminal::serve(listener, cfg, verifier, ctx.shutdown.clone()).await?;
    Ok(())
}
