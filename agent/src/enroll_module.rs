//! The enrollment module: make sure the device has a certificate, hand it to the modules
//! that need it, and renew it at the configured fraction of its lifetime.

use crate::supervisor::Ctx;
use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;
use thingsly_core::backoff::Backoff;
use thingsly_enroll::{Credentials, EnrollError, Identity};

pub const MODULE: &str = "enroll";

fn metadata(ctx: &Ctx) -> serde_json::Map<String, serde_json::Value> {
    let s = ctx.state.get();
    let mut m = serde_json::Map::new();
    m.insert("hardware".into(), s.hardware.into());
    m.insert("sw_version".into(), s.sw_version.into());
    m.insert("rauc_compatible".into(), s.rauc_compatible.into());
    m.insert("agent_version".into(), s.agent_version.into());
    m
}

fn publish(ctx: &Ctx, creds: Credentials) {
    let not_after = creds
        .info
        .not_after
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let tunnel_address = ctx
        .dir
        .read_json::<thingsly_proto::enroll::WireguardConfig>(
            thingsly_enroll::paths::WIREGUARD_CONFIG,
        )
        .ok()
        .flatten()
        .map(|w| w.address);
    ctx.state.update(|s| {
        s.enrolled = true;
        if tunnel_address.is_some() {
            s.tunnel_address = tunnel_address.clone();
        }
        s.credentials_generation += 1;
        s.certificate_not_after = Some(not_after.clone());
    });
    ctx.state.set_module(
        MODULE,
        "running",
        format!("enrolled, certificate valid until {not_after}"),
    );
    ctx.creds_tx.send_replace(Some(Arc::new(creds)));
}

/// The CA that verifies the bridge: the configured bundle, or the chain we got at enrollment.
fn bridge_ca(ctx: &Ctx, creds: Option<&Credentials>) -> anyhow::Result<Vec<u8>> {
    match std::fs::read(&ctx.cfg.enroll.ca_bundle) {
        Ok(b) => Ok(b),
        Err(e) => match creds {
            Some(c) => Ok(c.ca_chain_pem.clone().into_bytes()),
            None => Err(e).with_context(|| {
                format!("enroll.ca_bundle {}", ctx.cfg.enroll.ca_bundle.display())
            }),
        },
    }
}

/// The bridge as this agent reaches it (config URL and timeout, `ca`, the agent's proxies).
fn bridge<'a>(ctx: &'a Ctx, ca: &'a [u8]) -> thingsly_enroll::BridgeEndpoint<'a> {
    thingsly_enroll::BridgeEndpoint {
        url: &ctx.cfg.enroll.server_url,
        ca_pem: ca,
        timeout: ctx.cfg.enroll.timeout,
        proxies: &ctx.proxies,
    }
}

/// One enrollment attempt sequence until success; used by the module and by `enroll`.
pub async fn enroll_until_done(
    ctx: &Ctx,
    identity: &Identity,
    once: bool,
) -> anyhow::Result<Credentials> {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
    loop {
        let existing = identity.credentials(&ctx.dir)?;
        if let Some(c) = existing {
            return Ok(c);
        }
        let token = ctx.cfg.bootstrap_token().map_err(anyhow::Error::msg)?;
        let result = async {
            let ca = bridge_ca(ctx, None).map_err(|e| EnrollError::Config(format!("{e:#}")))?;
            thingsly_enroll::ensure_enrolled(
                &ctx.dir,
                identity,
                &bridge(ctx, &ca),
                &token,
                metadata(ctx),
            )
            .await
        }
        .await;
        match result {
            Ok(credentials) => return Ok(credentials),
            Err(e) if e.is_retryable() && !once => {
                // The bridge's Retry-After (a quota, step-ca down) is a floor, spread by the
                // jitter of the backoff on top.
                let delay = backoff.next_delay() + e.retry_after().unwrap_or_default();
                tracing::warn!(error = %e, retry_in = ?delay, "enrollment failed, will retry");
                ctx.state.set_module(
                    MODULE,
                    "waiting",
                    format!("{e}; retry in {}s", delay.as_secs()),
                );
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => anyhow::bail!("shutting down"),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

pub async fn run(ctx: Ctx) -> anyhow::Result<()> {
    ctx.state.set_module(MODULE, "starting", "");
    let identity = Identity::load_or_create(&ctx.dir, &ctx.cfg.device.id)?;
    let mut creds = enroll_until_done(&ctx, &identity, false).await?;
    publish(&ctx, creds.clone());
    let mut backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(3600));
    loop {
        let due = creds.info.renew_at(ctx.cfg.enroll.renew_fraction);
        let wait = (due - time::OffsetDateTime::now_utc()).max(time::Duration::ZERO);
        // Never renew in a tight loop, whatever the certificate says (clock skew, tiny lifetimes).
        let wait = Duration::try_from(wait)
            .unwrap_or_default()
            .max(Duration::from_secs(5));
        tracing::info!(renew_in = ?wait, "next certificate renewal");
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
        }
        let ca = bridge_ca(&ctx, Some(&creds))?;
        match thingsly_enroll::renew(&ctx.dir, &identity, &creds, &bridge(&ctx, &ca)).await {
            Ok(new) => {
                backoff.reset();
                creds = new;
                publish(&ctx, creds.clone());
            }
            Err(e) => {
                let delay = backoff.next_delay() + e.retry_after().unwrap_or_default();
                tracing::warn!(error = %e, retry_in = ?delay, "renewal failed");
                ctx.state.set_module(
                    MODULE,
                    "running",
                    format!("renewal failed: {e}; retry in {}s", delay.as_secs()),
                );
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}
