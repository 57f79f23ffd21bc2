//! Streaming scenarios on the trixie image (`HIL_SUITE=trixie hil/build-image.sh`: RAUC 1.13
//! with NBD streaming, a kernel with `nbd`). The VM reaches the bridge only through the
//! runner's own [`TcpProxy`](thingsly_e2e::proxy::TcpProxy), which counts the bytes that cross
//! the link and cuts it: what each scenario reports is that count, not the agent's word.
//!
//! Each one updates A (1.0.0) to B (2.0.0) and checks the whole outcome: exactly one final
//! report, `closed/success`, B booted and marked good, and what crossed the link.

use super::{Rig, STREAM_CAP, has, now, wait_until};
use anyhow::{Context, ensure};
use std::time::Duration;

/// What one update cost.
struct Measured {
    /// Bytes from the bridge to the device between the assignment and the reboot.
    link: u64,
    bundle: u64,
    /// Seconds from the assignment to the agent's "rebooting into the new slot".
    secs: f64,
}

impl Measured {
    fn summary(&self) -> String {
        format!(
            "link {:.1} MiB for a {:.1} MiB bundle ({:.1} %), {:.1} s from assignment to reboot",
            mib(self.link),
            mib(self.bundle),
            self.link as f64 * 100.0 / self.bundle as f64,
            self.secs
        )
    }
}

fn mib(n: u64) -> f64 {
    n as f64 / (1024.0 * 1024.0)
}

fn link(r: &Rig) -> u64 {
    r.proxy.as_ref().map_or(0, |p| p.down_bytes())
}

/// Add `line` to slot A's `[ota]` and restart the agent, as a board's config would have it.
fn ota_config(r: &mut Rig, line: &str) -> anyhow::Result<()> {
    r.vm.console(
        &format!(
            "sed -i '/^\\[ota\\]/a {line}' /etc/thingsly/agent.toml && systemctl restart thingsly-agent"
        ),
        Duration::from_secs(60),
    )?;
    r.vm.wait(
        "HIL-AGENT-READY slot=A version=1.0.0",
        2,
        Duration::from_secs(120),
    )?;
    Ok(())
}

/// Assign `bundle` (2.0.0), run `during` once the update started, then see it through to
/// B marked good with one `closed/success`.
fn update(
    r: &mut Rig,
    bundle: &str,
    streamed: bool,
    during: impl FnOnce(&mut Rig, i64, u64) -> anyhow::Result<()>,
) -> anyhow::Result<(Measured, i64)> {
    let size = std::fs::metadata(r.out.join("bundles").join(bundle))?.len();
    let before = link(r);
    let id = r.upload_and_assign(bundle, "2.0.0")?;
    let t0 = now();
    if streamed {
        r.wait_feedback(
            id,
            "streaming: RAUC reads the bundle",
            Duration::from_secs(300),
        )?;
    } else {
        r.wait_feedback(id, "downloading", Duration::from_secs(300))?;
    }
    during(r, id, size)?;
    let t = r.wait_feedback(id, "rebooting into the new slot", Duration::from_secs(1200))?;
    let measured = Measured {
        link: link(r) - before,
        bundle: size,
        secs: t - t0,
    };
    r.mark("reboot", t);
    r.vm.wait(
        "HIL-AGENT-READY slot=B version=2.0.0",
        1,
        Duration::from_secs(600),
    )?;
    let (finished, detail) = r.wait_closed(id, Duration::from_secs(300))?;
    ensure!(finished == "success", "finished {finished}: {detail}");
    has(&detail, "marked good")?;
    r.grubenv_with(&["ORDER=B A", "B_OK=1", "B_TRY=0"])?;
    Ok((measured, id))
}

/// The agent's "streamed: …" feedback of an action.
fn streamed_feedback(r: &Rig, id: i64) -> anyhow::Result<String> {
    r.feedback(id)?
        .into_iter()
        .find(|f| f.3.starts_with("streamed: "))
        .map(|f| f.3)
        .context("no \"streamed:\" feedback")
}

/// Baseline: streaming off, the agent downloads the bundle to the data partition first.
pub fn download(r: &mut Rig) -> anyhow::Result<String> {
    r.first_boot()?;
    ota_config(r, "streaming = \"off\"")?;
    let (m, _) = update(r, "good.raucb", false, |_, _, _| Ok(()))?;
    ensure!(m.link >= m.bundle, "{}: less than the bundle", m.summary());
    Ok(format!("download then install: {}", m.summary()))
}

/// RAUC streams through the agent's relay: no copy of the bundle on the device.
pub fn stream(r: &mut Rig) -> anyhow::Result<String> {
    r.first_boot()?;
    let (m, id) = update(r, "good.raucb", true, |r, id, _| {
        r.wait_feedback(id, "installing", Duration::from_secs(300))?;
        // While RAUC installs: nothing of the bundle on the data partition.
        let found = r.vm.console(
            "find /data -name '*.raucb*' | wc -l",
            Duration::from_secs(60),
        )?;
        ensure!(
            found.trim().ends_with('0'),
            "bundle files on the device while streaming: {found}"
        );
        Ok(())
    })?;
    let said = streamed_feedback(r, id)?;
    // The image is read once: about the bundle, never twice it.
    ensure!(m.link < m.bundle * 3 / 2, "{}", m.summary());
    Ok(format!("{}; agent: \"{said}\"", m.summary()))
}

/// An adaptive bundle whose 2.0.0 differs from slot A's 1.0.0 in a few blocks.
pub fn adaptive(r: &mut Rig) -> anyhow::Result<String> {
    r.first_boot()?;
    let (m, id) = update(r, "adaptive.raucb", true, |_, _, _| Ok(()))?;
    let said = streamed_feedback(r, id)?;
    ensure!(
        !said.contains("fell back"),
        "RAUC fell back to a full copy: {said} ({})",
        m.summary()
    );
    has(&said, "adaptive (block-hash-index)")?;
    ensure!(
        m.link * 10 <= m.bundle,
        "more than 10 % of the bundle crossed the link: {}",
        m.summary()
    );
    Ok(format!("{}; agent: \"{said}\"", m.summary()))
}

/// The same adaptive bundle on a RAUC without `data-directory` (a careless system.conf): RAUC
/// ignores the adaptive method with only a line in its own log and copies the whole image;
/// the agent's feedback must say so.
pub fn adaptive_fallback(r: &mut Rig) -> anyhow::Result<String> {
    r.first_boot()?;
    r.vm.console(
        "sed -i '/^data-directory=/d' /etc/rauc/system.conf && systemctl restart rauc",
        Duration::from_secs(60),
    )?;
    let (m, id) = update(r, "adaptive.raucb", true, |_, _, _| Ok(()))?;
    let said = streamed_feedback(r, id)?;
    has(&said, "fell back to a full copy")?;
    ensure!(
        m.link * 2 > m.bundle,
        "a full copy that moved little: {}",
        m.summary()
    );
    Ok(format!("{}; agent: \"{said}\"", m.summary()))
}

/// 20 link cuts while RAUC streams: slower, not aborted.
pub fn cuts(r: &mut Rig) -> anyhow::Result<String> {
    const CUTS: u64 = 20;
    r.first_boot()?;
    // Slow enough that 20 cuts fall inside the install.
    r.proxy.as_ref().context("no proxy")?.throttle(8 << 20);
    let (m, id) = update(r, "good.raucb", true, |r, id, _| {
        r.wait_feedback(id, "installing", Duration::from_secs(300))?;
        let px = r.proxy.as_ref().context("no proxy")?;
        let start = px.cuts();
        // Each armed cut drops the next connection that passes 256 KiB.
        wait_until("20 link cuts", Duration::from_secs(600), || {
            if px.cuts() - start >= CUTS {
                return Ok(true);
            }
            if r.first_feedback(id, "rebooting into the new slot")?
                .is_some()
            {
                anyhow::bail!("the install ended after {} cuts", px.cuts() - start);
            }
            px.cut_once_after(256 * 1024);
            Ok(false)
        })?;
        px.throttle(0);
        Ok(())
    })?;
    let said = streamed_feedback(r, id)?;
    ensure!(
        !said.contains(" 0 fetched again"),
        "the agent saw no cut: {said}"
    );
    Ok(format!("{CUTS} cuts; {}; agent: \"{said}\"", m.summary()))
}

/// Power cut (QEMU SIGKILLed) with 40 % of the bundle streamed: the agent installs again.
pub fn powercut(r: &mut Rig) -> anyhow::Result<String> {
    r.first_boot()?;
    r.proxy.as_ref().context("no proxy")?.throttle(8 << 20);
    let (m, id) = update(r, "good.raucb", true, |r, id, size| {
        r.wait_feedback(id, "installing", Duration::from_secs(300))?;
        let from = link(r);
        wait_until(
            "40 % of the bundle streamed",
            Duration::from_secs(600),
            || Ok(link(r) - from > size * 2 / 5),
        )?;
        r.vm.kill_hard()?;
        r.mark("cut", now());
        r.proxy.as_ref().context("no proxy")?.throttle(0);
        r.vm.power_on(false)?;
        Ok(())
    })?;
    let serial: String = r.vm.lines().into_iter().map(|(_, l)| l + "\n").collect();
    has(&serial, "installing again")?;
    let completed = r
        .feedback(id)?
        .iter()
        .filter(|f| f.3.starts_with("streamed: "))
        .count();
    ensure!(completed == 1, "{completed} completed streaming installs");
    Ok(format!("cut at 40 %, installed again; {}", m.summary()))
}

/// `ota.download_rate_limit` applies to what RAUC streams: the rate on the link, measured by
/// the runner between 20 % and 80 % of the bundle, is within 5 % of the cap.
pub fn cap(r: &mut Rig) -> anyhow::Result<String> {
    r.first_boot()?;
    ota_config(r, &format!("download_rate_limit = {STREAM_CAP}"))?;
    let mut rate = 0.0;
    let (m, _) = update(r, "good.raucb", true, |r, id, size| {
        r.wait_feedback(id, "installing", Duration::from_secs(300))?;
        let from = link(r);
        let mut at20 = None;
        wait_until(
            "80 % of the bundle streamed",
            Duration::from_secs(900),
            || {
                let done = link(r) - from;
                if at20.is_none() && done > size / 5 {
                    at20 = Some((now(), done));
                }
                Ok(done > size * 4 / 5)
            },
        )?;
        let (t20, b20) = at20.context("never passed 20 %")?;
        rate = (link(r) - from - b20) as f64 / (now() - t20);
        Ok(())
    })?;
    let off = (rate - STREAM_CAP as f64) / STREAM_CAP as f64 * 100.0;
    ensure!(
        off.abs() <= 5.0,
        "{:.3} MiB/s under a {:.3} MiB/s cap ({off:+.1} %)",
        mib(rate as u64),
        mib(STREAM_CAP)
    );
    Ok(format!(
        "{:.3} MiB/s on the link under a {:.3} MiB/s cap ({off:+.1} %); {}",
        mib(rate as u64),
        mib(STREAM_CAP),
        m.summary()
    ))
}
