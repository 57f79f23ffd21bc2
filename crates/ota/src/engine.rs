//! The update state machine. One action at a time; its phase is persisted before every
//! irreversible step (see [`crate::state`]). Success is reported only after the new slot
//! booted, passed its health checks and was marked good.

use crate::MODULE;
use crate::ddi_client::{Auth, DdiClient, DdiError, Poll};
use crate::download::{self, DownloadError};
use crate::machine::{
    self, AfterDownload, AfterReboot, AfterReport, AfterRollback, Health, InstallFacts,
    InstallResume, Now, OnCancel, OnDeployment, OtaStatus, Window,
};
use crate::rauc::{InstallArgs, Installer, Rauc};
use crate::state::{
    ArtifactRef, DEPLOYMENT, Deployment, INSTALLED_BASE, InstalledBase, LAST, Last, MARKED_GOOD,
    Phase, Report,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use thingsly_core::StateHandle;
use thingsly_core::config::{DdiAuth, OtaSection};
use thingsly_core::poll_schedule::{PollOutcome, PollSchedule};
use thingsly_core::state_dir::{MODE_SECRET, StateDir};
use thingsly_enroll::Credentials;
use thingsly_proto::ddi::{
    self, ActionFeedback, ConfigData, DeploymentBase, Execution, Finished, HandlingType,
    MaintenanceWindow,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub struct OtaConfig {
    pub section: OtaSection,
    pub device_id: String,
    /// `ota.server_url`, or the enrollment server when that is empty.
    pub server_url: String,
    /// argv of the reboot command.
    pub reboot: Vec<String>,
    /// Whether the MQTT health check applies (telemetry compiled in and enabled).
    pub telemetry_enabled: bool,
    /// Polls and downloads go through these (see `thingsly_core::proxy`).
    pub proxies: thingsly_core::proxy::Proxies,
}

/// Why the module is not running yet, or stopped.
#[derive(Debug)]
pub struct OtaError(pub String);

impl std::fmt::Display for OtaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for OtaError {}

/// What driving an action led to.
enum Step {
    /// Go on with the next phase now.
    Next,
    /// Nothing to do until the next poll (maintenance window, reboot pending, server down).
    Wait,
    /// The action is over (reported, or canceled).
    Done,
}

struct Engine<R: Installer> {
    cfg: OtaConfig,
    ddi: DdiClient,
    rauc: R,
    state: StateHandle,
    dir: StateDir,
    shutdown: CancellationToken,
    download_dir: PathBuf,
    sleep: Duration,
    etag: Option<String>,
    config_sent: Option<ConfigData>,
    /// The installedBase version last warned about.
    installed_mismatch: Option<String>,
    /// SIGUSR1: `thingsly-agent install` wrote a local action.
    wake: Option<tokio::signal::unix::Signal>,
}

/// Resolves at the next SIGUSR1; never, when the signal could not be hooked.
async fn wake_up(sig: &mut Option<tokio::signal::unix::Signal>) {
    match sig {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn fb(execution: Execution, finished: Finished, detail: impl Into<String>) -> ActionFeedback {
    ActionFeedback::new(execution, finished, vec![detail.into()])
}

/// Wait for what the DDI client needs: the enrolled certificate (mTLS) or at least the CA.
async fn client(
    cfg: &OtaConfig,
    creds: &mut watch::Receiver<Option<Arc<Credentials>>>,
    state: &StateHandle,
    shutdown: &CancellationToken,
) -> Option<DdiClient> {
    let mut said = String::new();
    loop {
        let c = creds.borrow_and_update().clone();
        let attempt = (|| -> Result<DdiClient, String> {
            // `ota.server_url` in the config wins; else the hawkBit the bridge provisioned
            // the device in (its enrollment answer); else the bridge itself.
            let assigned = c
                .as_ref()
                .and_then(|c| c.ddi.as_ref())
                .filter(|_| cfg.section.server_url.is_empty());
            if let Some(a) = assigned {
                return assigned_client(cfg, c.as_deref(), a);
            }
            if cfg.server_url.is_empty() {
                return Err("no DDI server: set ota.server_url or enroll.server_url".into());
            }
            let ca = match &cfg.section.ca_bundle {
                Some(p) => {
                    std::fs::read(p).map_err(|e| format!("ota.ca_bundle {}: {e}", p.display()))?
                }
                None => c
                    .as_ref()
                    .map(|c| c.ca_chain_pem.clone().into_bytes())
                    .ok_or("waiting for enrollment (CA chain)")?,
            };
            let token = || -> Result<String, String> {
                match &cfg.section.token_file {
                    Some(p) => std::fs::read_to_string(p)
                        .map(|t| t.trim().to_string())
                        .map_err(|e| format!("ota.token_file {}: {e}", p.display())),
                    None => Ok(cfg.section.token.clone()),
                }
            };
            let (tls, auth) = match cfg.section.auth {
                DdiAuth::Certificate => {
                    let c = c.as_ref().ok_or("waiting for enrollment (certificate)")?;
                    let chain = c.full_chain_pem();
                    let tls = thingsly_enroll::client_config(
                        &ca,
                        Some((chain.as_bytes(), c.key_pem.as_bytes())),
                    )?;
                    (tls, Auth::Certificate)
                }
                DdiAuth::TargetToken => (
                    thingsly_enroll::client_config(&ca, None)?,
                    Auth::Header(format!("TargetToken {}", token()?)),
                ),
                DdiAuth::GatewayToken => (
                    thingsly_enroll::client_config(&ca, None)?,
                    Auth::Header(format!("GatewayToken {}", token()?)),
                ),
            };
            DdiClient::new(
                &cfg.server_url,
                &cfg.section.tenant,
                &cfg.device_id,
                tls,
                auth,
                &cfg.proxies,
            )
        })();
        match attempt {
            Ok(c) => return Some(c),
            Err(why) => {
                if why != said {
                    tracing::info!(reason = %why, "OTA waiting");
                    state.set_module(MODULE, "waiting", why.clone());
                    said = why;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = creds.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(30)) => {}
                }
            }
        }
    }
}

/// The DDI client for a server the bridge assigned (enrollment answer): its URL, tenant and
/// auth; the CA is `ota.ca_bundle` or the enrolled chain.
fn assigned_client(
    cfg: &OtaConfig,
    c: Option<&Credentials>,
    a: &thingsly_proto::enroll::DdiAssignment,
) -> Result<DdiClient, String> {
    use thingsly_proto::enroll::DdiAssignedAuth;
    let c = c.ok_or("waiting for enrollment")?;
    let ca = match &cfg.section.ca_bundle {
        Some(p) => std::fs::read(p).map_err(|e| format!("ota.ca_bundle {}: {e}", p.display()))?,
        None => c.ca_chain_pem.clone().into_bytes(),
    };
    let (tls, auth) = match (a.auth, &a.target_token) {
        (DdiAssignedAuth::TargetToken, Some(t)) => (
            thingsly_enroll::client_config(&ca, None)?,
            Auth::Header(format!("TargetToken {t}")),
        ),
        (DdiAssignedAuth::TargetToken, None) => {
            return Err("the bridge assigned TargetToken auth without a token".into());
        }
        (DdiAssignedAuth::Certificate, _) => {
            let chain = c.full_chain_pem();
            (
                thingsly_enroll::client_config(
                    &ca,
                    Some((chain.as_bytes(), c.key_pem.as_bytes())),
                )?,
                Auth::Certificate,
            )
        }
    };
    DdiClient::new(
        &a.server_url,
        &a.tenant,
        &cfg.device_id,
        tls,
        auth,
        &cfg.proxies,
    )
}

/// The module: wait for credentials and RAUC, finish any action in flight, then poll.
pub async fn run(
    cfg: OtaConfig,
    state: StateHandle,
    dir: StateDir,
    mut creds: watch::Receiver<Option<Arc<Credentials>>>,
    shutdown: CancellationToken,
) -> Result<(), OtaError> {
    // Before anything that needs the network: a slot that boots must be marked good even
    // when the server is out of reach, or the bootloader skips it next time.
    if cfg.section.mark_good_on_boot
        && let Ok(r) = Rauc::connect().await
    {
        mark_good_on_boot(&cfg, &r, &dir).await;
    }
    let Some(ddi) = client(&cfg, &mut creds, &state, &shutdown).await else {
        return Ok(());
    };
    let rauc = loop {
        match Rauc::connect().await {
            Ok(r) if r.boot_slot().await.is_ok() => break r,
            Ok(_) => state.set_module(
                MODULE,
                "waiting",
                "RAUC service not answering on the system bus",
            ),
            Err(e) => state.set_module(MODULE, "waiting", format!("RAUC: {e}")),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
    };
    if cfg.section.mark_good_on_boot {
        mark_good_on_boot(&cfg, &rauc, &dir).await;
    }
    let download_dir = cfg
        .section
        .download_dir
        .clone()
        .unwrap_or_else(|| dir.path("ota"));
    std::fs::create_dir_all(&download_dir)
        .map_err(|e| OtaError(format!("{}: {e}", download_dir.display())))?;
    dir.subdir("ota").map_err(|e| OtaError(e.to_string()))?;
    let sleep = cfg.section.poll_interval;
    let mut e = Engine {
        cfg,
        ddi,
        rauc,
        state,
        dir,
        shutdown,
        download_dir,
        sleep,
        etag: None,
        config_sent: None,
        installed_mismatch: None,
        wake: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
            .map_err(|e| tracing::warn!(error = %e, "SIGUSR1 not hooked: a local install waits for the next poll"))
            .ok(),
    };
    e.run().await;
    Ok(())
}

fn read_boot_id(path: &std::path::Path) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Mark the booted slot good, once per boot: bootloaders driven by RAUC (GRUB's grubenv, U-Boot's
/// BOOT_x_LEFT) count every boot of a slot as an attempt until it is marked good. Not while an
/// update waits for its verdict: then the engine decides (good after the health checks, or
/// bad and back).
async fn mark_good_on_boot(cfg: &OtaConfig, rauc: &impl Installer, dir: &StateDir) {
    let boot = read_boot_id(&cfg.section.boot_id_path);
    let marked = std::fs::read_to_string(dir.path(MARKED_GOOD)).ok();
    let phase = dir
        .read_json::<Deployment>(DEPLOYMENT)
        .ok()
        .flatten()
        .map(|d| d.phase);
    if !machine::mark_good_on_boot(marked.as_deref().map(str::trim), &boot, phase) {
        return;
    }
    let Ok(slot) = rauc.boot_slot().await else {
        return;
    };
    match rauc.mark("good", "booted").await {
        Ok(()) => {
            tracing::info!(%slot, "booted slot marked good");
            let _ = dir.subdir("ota");
            let _ = thingsly_core::state_dir::write_atomic(
                &dir.path(MARKED_GOOD),
                boot.as_bytes(),
                0o600,
            );
        }
        Err(e) => tracing::warn!(%slot, error = %e, "cannot mark the booted slot good"),
    }
}

impl<R: Installer> Engine<R> {
    fn set_status(&self, ota_status: OtaStatus, detail: impl Into<String>) {
        let detail = detail.into();
        self.state.update(|s| {
            s.ota_status = ota_status.as_str().to_string();
            let m = s.modules.entry(MODULE.to_string()).or_default();
            m.state = "running".into();
            m.detail = detail;
        });
    }

    fn load(&self) -> Option<Deployment> {
        match self.dir.read_json::<Deployment>(DEPLOYMENT) {
            Ok(d) => d,
            Err(e) => {
                // Moved aside by read_json; nothing to resume. Said loudly: it should not happen.
                tracing::error!(error = %e, "OTA state unreadable; starting without an action in flight");
                None
            }
        }
    }

    fn save(&self, d: &Deployment) -> Result<(), String> {
        self.dir
            .write_json(DEPLOYMENT, d, MODE_SECRET)
            .map_err(|e| format!("cannot persist OTA state: {e}"))
    }

    async fn run(&mut self) {
        self.set_status(OtaStatus::Idle, "polling");
        // An action in flight goes first: it may be mid-reboot.
        self.resume().await;
        // A fleet powered up together spreads its first polls (PollSchedule::first).
        let first = PollSchedule::first(self.sleep, fastrand::f64());
        tokio::select! {
            _ = self.shutdown.cancelled() => return,
            _ = tokio::time::sleep(first) => {}
        }
        let mut schedule = PollSchedule::new(
            self.cfg
                .section
                .max_poll_interval
                .min(Duration::from_secs(600)),
        );
        loop {
            let d = self.load();
            let outcome = match self.poll_once(d).await {
                Ok(()) => PollOutcome::Answered,
                Err(e) => {
                    let outcome = e.poll_outcome();
                    let wait = schedule.clone().next(outcome, self.sleep, 0.5);
                    tracing::warn!(error = %e, "DDI poll failed");
                    self.state.set_module(
                        MODULE,
                        "waiting",
                        format!("{e}; retry in about {}s", wait.as_secs()),
                    );
                    outcome
                }
            };
            if let Some(d) = self.load() {
                self.drive(d).await;
            }
            let wait = schedule.next(outcome, self.sleep, fastrand::f64());
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                // `thingsly-agent install` handed over a local action: take it up now.
                _ = wake_up(&mut self.wake) => tracing::info!("woken up (SIGUSR1): looking for a local install"),
            }
        }
    }

    async fn resume(&mut self) {
        if let Some(d) = self.load() {
            tracing::info!(action = %d.action_id, phase = ?d.phase, "resuming OTA action");
            self.drive(d).await;
        }
    }

    /// One root poll: configData, cancel, new deployment.
    async fn poll_once(&mut self, current: Option<Deployment>) -> Result<(), DdiError> {
        let root = match self.ddi.poll(self.etag.as_deref()).await? {
            Poll::NotModified => return Ok(()),
            Poll::Changed(root, etag) => {
                self.etag = etag;
                root
            }
        };
        if let Some(s) = root.sleep() {
            self.sleep = s.clamp(Duration::from_secs(1), self.cfg.section.max_poll_interval);
        }
        self.send_config_data(root.href("configData").is_some())
            .await;
        self.report_installed_base().await;
        if current.is_none()
            && let Some(href) = root.href("installedBase")
        {
            self.check_installed_base(href).await;
        }
        if let Some(href) = root.href("cancelAction") {
            self.handle_cancel(href, current.as_ref()).await?;
            // The next poll shows what comes after the cancel.
            self.etag = None;
            return Ok(());
        }
        if let Some(href) = root.href("confirmationBase") {
            self.confirm(href).await?;
            self.etag = None;
            return Ok(());
        }
        if let Some(href) = root.href("deploymentBase") {
            let base: DeploymentBase = self.ddi.get(href).await?;
            let last = match current {
                None => self.dir.read_json::<Last>(LAST).ok().flatten(),
                Some(_) => None,
            };
            let last_id = last.as_ref().map(|l| l.action_id.as_str());
            match machine::on_deployment(current.as_ref(), last_id, &base.id) {
                OnDeployment::Same { refresh_window } => {
                    if let Some(mut d) = current.filter(|_| refresh_window) {
                        d.href = href.to_string();
                        self.save(&d).map_err(DdiError::Transport)?;
                    }
                }
                OnDeployment::FinishCurrent => {
                    let current = current.map(|d| d.action_id).unwrap_or_default();
                    tracing::info!(%current, new = %base.id, "new action while one is in flight; finishing the current one first");
                }
                OnDeployment::ResendLast => {
                    // A final report the server did not get (a crash after sending, or lost).
                    if let Some(last) = last {
                        let r = last.report;
                        let f = ActionFeedback::new(r.execution, r.finished, r.details);
                        match self.ddi.feedback(href, &f).await {
                            Ok(()) | Err(DdiError::Status(410, _)) => {}
                            Err(e) => tracing::warn!(error = %e, "final report resend failed"),
                        }
                    }
                }
                OnDeployment::Start => self.start(href, base).await,
            }
        }
        Ok(())
    }

    /// hawkBit's `installedBase`: what the server believes this device runs. A difference
    /// (a manual install, a bootloader fallback the server never heard of) is shown, not acted on.
    async fn check_installed_base(&mut self, href: &str) {
        let Ok(base) = self.ddi.get::<DeploymentBase>(href).await else {
            return;
        };
        let Some(chunk) = base.deployment.chunks.first() else {
            return;
        };
        let running = self.state.get().sw_version;
        if chunk.version != running && self.installed_mismatch.as_deref() != Some(&chunk.version) {
            tracing::warn!(server = %chunk.version, running = %running, action = %base.id, "the DDI server believes another version is installed");
            self.installed_mismatch = Some(chunk.version.clone());
        }
    }

    /// hawkBit's user consent: the action waits until the device confirms it.
    async fn confirm(&mut self, href: &str) -> Result<(), DdiError> {
        let action: ddi::ConfirmationBaseAction = self.ddi.get(href).await?;
        if !self.cfg.section.auto_confirm {
            self.set_status(
                OtaStatus::Idle,
                format!(
                    "action {} waits for confirmation (ota.auto_confirm = false)",
                    action.id
                ),
            );
            return Ok(());
        }
        let chunk = action.confirmation.chunks.first();
        let what = chunk.map_or(String::new(), |c| format!(" {} {}", c.name, c.version));
        let fb = ddi::ConfirmationFeedback {
            confirmation: ddi::Confirmation::Confirmed,
            code: None,
            details: vec![format!(
                "confirmed by the device agent (ota.auto_confirm){what}"
            )],
        };
        let base = href.split('?').next().unwrap_or(href);
        let r = self
            .ddi
            .request(reqwest::Method::POST, &format!("{base}/feedback"))
            .json(&fb)
            .send()
            .await
            .map_err(|e| DdiError::Transport(e.to_string()))?;
        if !r.status().is_success() {
            return Err(DdiError::Status(
                r.status().as_u16(),
                "confirmation refused".into(),
            ));
        }
        tracing::info!(action = %action.id, "OTA action confirmed");
        Ok(())
    }

    async fn send_config_data(&mut self, requested: bool) {
        let s = self.state.get();
        let mut data = std::collections::BTreeMap::new();
        data.insert("compatible".into(), s.rauc_compatible.clone());
        data.insert("sw_version".into(), s.sw_version.clone());
        data.insert("slot".into(), s.rauc_slot.clone());
        data.insert("hardware".into(), s.hardware.clone());
        data.insert("agent_version".into(), s.agent_version.clone());
        let cd = ConfigData {
            data,
            mode: Some(ddi::ConfigDataMode::Merge),
        };
        if !requested && self.config_sent.as_ref() == Some(&cd) {
            return;
        }
        match self.ddi.put_config_data(&cd).await {
            Ok(()) => self.config_sent = Some(cd),
            Err(e) => tracing::warn!(error = %e, "configData not sent; retried at the next poll"),
        }
    }

    async fn handle_cancel(
        &mut self,
        href: &str,
        current: Option<&Deployment>,
    ) -> Result<(), DdiError> {
        let cancel: ddi::Cancel = self.ddi.get(href).await?;
        let stop = cancel.cancel_action.stop_id;
        match machine::on_cancel(current, &stop) {
            OnCancel::Accept { discard } => {
                if let Some(d) = current.filter(|_| discard) {
                    remove_bundle(d);
                    self.dir
                        .remove(DEPLOYMENT)
                        .map_err(|e| DdiError::Transport(e.to_string()))?;
                }
                self.ddi
                    .feedback(
                        href,
                        &fb(
                            Execution::Closed,
                            Finished::Success,
                            "canceled before installation",
                        ),
                    )
                    .await?;
                tracing::info!(action = %stop, "OTA action canceled");
                self.set_status(OtaStatus::Idle, format!("action {stop} canceled"));
            }
            OnCancel::Reject { phase } => {
                self.ddi
                    .feedback(
                        href,
                        &fb(
                            Execution::Rejected,
                            Finished::None,
                            format!("cannot cancel: installation already started ({phase:?})"),
                        ),
                    )
                    .await?;
                tracing::info!(action = %stop, ?phase, "OTA cancel rejected: installation already started");
            }
        }
        Ok(())
    }

    /// A new action: check its shape, persist it, then drive it.
    async fn start(&mut self, href: &str, base: DeploymentBase) {
        let id = base.id.clone();
        let dep = &base.deployment;
        let shape = the_bundle(dep);
        let (chunk, artifact, url) = match shape {
            Ok(s) => s,
            Err(why) => {
                tracing::error!(action = %id, reason = %why, "OTA action refused");
                let f = fb(Execution::Closed, Finished::Failure, why.clone());
                if self.ddi.feedback(href, &f).await.is_ok() {
                    self.remember(&id, &f);
                }
                self.set_status(OtaStatus::Failed, why);
                return;
            }
        };
        let s = self.state.get();
        let name = artifact
            .hashes
            .sha256
            .clone()
            .unwrap_or_else(|| format!("action-{id}"));
        let artifact = ArtifactRef {
            filename: artifact.filename.clone(),
            url,
            size: artifact.size,
            sha256: artifact.hashes.sha256.clone(),
            sha1: artifact.hashes.sha1.clone(),
            md5: artifact.hashes.md5.clone(),
        };
        let d = Deployment {
            href: href.to_string(),
            download_only: is_download_only(dep),
            previous_slot: s.rauc_slot.clone(),
            previous_version: s.sw_version.clone(),
            ..Deployment::new(
                id.clone(),
                chunk.name.clone(),
                chunk.version.clone(),
                artifact,
                self.download_dir.join(format!("{name}.raucb")),
                Phase::Downloading,
            )
        };
        tracing::info!(action = %id, name = %d.name, version = %d.version, size = ?d.artifact.size, download_only = d.download_only, "OTA action received");
        if let Err(e) = self.save(&d) {
            tracing::error!(error = %e, "cannot start the OTA action");
            return;
        }
        let _ = self
            .ddi
            .feedback(
                href,
                &fb(
                    Execution::Proceeding,
                    Finished::None,
                    format!("accepted {} {}", d.name, d.version),
                ),
            )
            .await;
    }

    fn remember(&self, action_id: &str, f: &ActionFeedback) {
        let last = Last {
            action_id: action_id.to_string(),
            report: Report {
                execution: f.status.execution,
                finished: f.status.result.finished,
                details: f.status.details.clone(),
            },
        };
        if let Err(e) = self.dir.write_json(LAST, &last, MODE_SECRET) {
            tracing::warn!(error = %e, "cannot remember the last report");
        }
    }

    /// Drive the action until it waits or is done.
    async fn drive(&mut self, mut d: Deployment) {
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            let step = match d.phase {
                Phase::Downloading => self.download(&mut d).await,
                Phase::Downloaded => self.after_download(&mut d).await,
                Phase::Installing => self.install(&mut d).await,
                Phase::Installed => self.reboot(&mut d, "rebooting into the new slot").await,
                Phase::Rebooting => self.after_reboot(&mut d).await,
                Phase::Verifying => self.verify(&mut d).await,
                Phase::RollingBack => self.after_rollback(&mut d).await,
                Phase::Reporting => self.report(&mut d).await,
            };
            match step {
                Step::Next => continue,
                Step::Wait => return,
                Step::Done => return,
            }
        }
    }

    /// Record the outcome (persisted first), then report it.
    fn conclude(&self, d: &mut Deployment, finished: Finished, detail: String) -> Step {
        let execution = Execution::Closed;
        d.report = Some(Report {
            execution,
            finished,
            details: vec![detail.clone()],
        });
        d.phase = Phase::Reporting;
        if finished == Finished::Failure {
            tracing::error!(action = %d.action_id, reason = %detail, "OTA action failed");
            self.state.update(|s| s.ota_error = detail.clone());
            self.set_status(OtaStatus::Failed, detail);
        } else {
            tracing::info!(action = %d.action_id, %detail, "OTA action succeeded");
            self.state.update(|s| s.ota_error.clear());
            self.set_status(OtaStatus::Success, detail);
        }
        self.persist(d)
    }

    async fn feedback(&self, d: &Deployment, f: ActionFeedback) {
        if d.local {
            return; // no server action to tell
        }
        if let Err(e) = self.ddi.feedback(&d.href, &f).await {
            tracing::debug!(error = %e, "progress feedback not sent");
        }
    }

    async fn download(&mut self, d: &mut Deployment) -> Step {
        if self.cfg.section.rauc_url_install && !d.by_url {
            if self.rauc.streams_with_tls_options().await {
                // RAUC fetches the bundle itself, straight into the slot.
                d.by_url = true;
                d.phase = Phase::Downloaded;
                tracing::info!(action = %d.action_id, "RAUC installs from the URL (ota.rauc_url_install)");
                let cap = self
                    .state
                    .get()
                    .download_rate_limit
                    .unwrap_or(self.cfg.section.download_rate_limit);
                if cap > 0 {
                    tracing::warn!(
                        cap,
                        "RAUC fetches this bundle itself: the download rate limit does not apply to it"
                    );
                }
                return self.persist(d);
            }
            tracing::warn!(
                "ota.rauc_url_install: this RAUC (before 1.9) cannot pass TLS options when it \
                 downloads; the agent downloads the bundle instead"
            );
        }
        if self.streams(d).await {
            d.stream = true;
            d.phase = Phase::Downloaded;
            tracing::info!(action = %d.action_id, "RAUC streams the bundle through the agent's relay (ota.streaming = auto)");
            self.feedback(
                d,
                fb(
                    Execution::Proceeding,
                    Finished::None,
                    "streaming: RAUC reads the bundle through the agent while it installs (no download first)",
                ),
            )
            .await;
            return self.persist(d);
        }
        self.set_status(
            OtaStatus::Downloading,
            format!("downloading {} {}", d.name, d.version),
        );
        if tokio::fs::metadata(&d.bundle_path).await.is_ok() {
            // Already here (a download-only action earlier, or a crash after the rename).
            d.phase = Phase::Downloaded;
            return self.persist(d);
        }
        let mut attempt = 0u32;
        let mut backoff =
            thingsly_core::backoff::Backoff::new(Duration::from_secs(2), Duration::from_secs(60));
        loop {
            attempt += 1;
            let mut last_pct = None;
            let ddi = &self.ddi;
            let href = d.href.clone();
            let (tx, mut rx) = tokio::sync::mpsc::channel::<(i32, i32)>(4);
            let state = self.state.subscribe();
            let configured = self.cfg.section.download_rate_limit;
            let rate_limit = move || state.borrow().download_rate_limit.unwrap_or(configured);
            let fetch = download::fetch(
                ddi,
                &d.artifact,
                &d.bundle_path,
                rate_limit,
                move |done, total| {
                    if let Some(t) = total.filter(|t| *t > 0) {
                        let pct = done * 10 / t;
                        if last_pct != Some(pct) {
                            last_pct = Some(pct);
                            // pct is 0..=10 (done <= total), so the cast cannot truncate.
                            let _ = tx.try_send((pct.min(10) as i32 * 10, 100));
                        }
                    }
                },
            );
            let progress = async {
                while let Some((cnt, of)) = rx.recv().await {
                    let f = fb(
                        Execution::Proceeding,
                        Finished::None,
                        format!("downloading: {cnt}%"),
                    )
                    .progress(cnt, of);
                    let _ = ddi.feedback(&href, &f).await;
                }
            };
            let cancel_watch = self.watch_cancel(&d.action_id);
            let result = tokio::select! {
                // The progress sender lives in `fetch`'s callback: both end together.
                (r, ()) = async { tokio::join!(fetch, progress) } => r,
                _ = cancel_watch => {
                    tracing::info!(action = %d.action_id, "cancel requested during download");
                    return Step::Wait; // handled by the next poll
                }
                _ = self.shutdown.cancelled() => return Step::Wait,
            };
            match result {
                Ok(()) => {
                    tracing::info!(action = %d.action_id, file = %d.bundle_path.display(), "bundle downloaded and verified");
                    d.phase = Phase::Downloaded;
                    let done = self.persist(d);
                    // Not final even for download-only: that report comes from `Reporting`,
                    // persisted first, so it is sent exactly once.
                    self.feedback(
                        d,
                        fb(
                            Execution::Downloaded,
                            Finished::None,
                            "download complete, hash verified",
                        ),
                    )
                    .await;
                    return done;
                }
                Err(DownloadError::Fatal(why)) => return self.conclude(d, Finished::Failure, why),
                Err(DownloadError::Retry(why)) if attempt >= self.cfg.section.download_attempts => {
                    return self.conclude(
                        d,
                        Finished::Failure,
                        format!("download failed {attempt} times, last: {why}"),
                    );
                }
                Err(DownloadError::Retry(why)) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(attempt, reason = %why, retry_in = ?delay, "download interrupted; resuming");
                    self.feedback(
                        d,
                        fb(
                            Execution::Proceeding,
                            Finished::None,
                            format!("download interrupted ({why}); resuming"),
                        ),
                    )
                    .await;
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return Step::Wait,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Resolves when the server asks to cancel `action_id` (polled at the poll interval).
    async fn watch_cancel(&self, action_id: &str) {
        loop {
            tokio::time::sleep(self.sleep).await;
            if let Ok(Poll::Changed(root, _)) = self.ddi.poll(None).await
                && let Some(href) = root.href("cancelAction")
                && let Ok(c) = self.ddi.get::<ddi::Cancel>(href).await
                && c.cancel_action.stop_id == action_id
            {
                return;
            }
        }
    }

    fn persist(&self, d: &Deployment) -> Step {
        match self.save(d) {
            Ok(()) => Step::Next,
            Err(e) => {
                tracing::error!(error = %e, "OTA state not saved; retrying at the next poll");
                Step::Wait
            }
        }
    }

    /// Whether this action installs by streaming (see `ota.streaming`): not for local or
    /// download-only actions, not after RAUC refused to stream it, and only where RAUC is new
    /// enough (≥ 1.9, probed over D-Bus) and the bundle's size is known (the relay answers
    /// RAUC's first request with it).
    async fn streams(&self, d: &Deployment) -> bool {
        use thingsly_core::config::StreamingMode;
        self.cfg.section.streaming == StreamingMode::Auto
            && !self.cfg.section.rauc_url_install
            && !d.local
            && !d.download_only
            && !d.stream_refused
            && d.artifact.size.is_some_and(|n| n > 0)
            && self.rauc.streams_with_tls_options().await
    }

    /// The relay RAUC streams this action's bundle from.
    async fn start_relay(&self, d: &Deployment) -> Result<crate::relay::Relay, String> {
        let state = self.state.clone();
        let configured = self.cfg.section.download_rate_limit;
        let source = crate::relay::RelaySource {
            ddi: self.ddi.clone(),
            url: d.artifact.url.clone(),
            size: d.artifact.size.unwrap_or_default(),
        };
        let limits = crate::relay::RelayLimits {
            hold: self.cfg.section.stream_hold,
            // The server's shared attribute wins over the config, as for downloads.
            rate: std::sync::Arc::new(move || {
                state.get().download_rate_limit.unwrap_or(configured)
            }),
        };
        crate::relay::Relay::start(source, limits)
            .await
            .map_err(|e| format!("cannot start the bundle relay on 127.0.0.1: {e}"))
    }

    /// `InstallBundle` arguments for RAUC fetching the bundle: our trust anchors and credentials.
    fn url_install_args(&self) -> InstallArgs {
        use thingsly_enroll::paths;
        let path = |p: &str| self.dir.path(p).display().to_string();
        let tls_ca = Some(match &self.cfg.section.ca_bundle {
            Some(p) => p.display().to_string(),
            None => path(paths::CA_CHAIN),
        });
        match self.ddi.auth_header() {
            Some(h) => InstallArgs {
                tls_ca,
                http_headers: vec![format!("Authorization: {h}")],
                ..InstallArgs::default()
            },
            None => InstallArgs {
                tls_ca,
                tls_cert: Some(path(paths::DEVICE_CERT)),
                tls_key: Some(path(paths::DEVICE_KEY)),
                http_headers: Vec::new(),
            },
        }
    }

    /// A download-only action ends with the bundle downloaded: report `downloaded`, success.
    fn conclude_download_only(&mut self, d: &mut Deployment) -> Step {
        d.download_only = true;
        let detail = format!("{} {} downloaded (download only)", d.name, d.version);
        d.report = Some(Report {
            execution: Execution::Downloaded,
            finished: Finished::Success,
            details: vec![detail.clone()],
        });
        d.phase = Phase::Reporting;
        self.set_status(OtaStatus::Idle, detail);
        self.persist(d)
    }

    async fn after_download(&mut self, d: &mut Deployment) -> Step {
        let mut decision = machine::after_download(d, None);
        if decision == AfterDownload::AskWindow {
            // Ask again: the window may have opened (or closed) since the action arrived.
            let window = match self.ddi.get::<DeploymentBase>(&d.href).await {
                Ok(b)
                    if b.deployment.maintenance_window == Some(MaintenanceWindow::Unavailable) =>
                {
                    Window::Closed
                }
                // hawkBit says `skip` both for download-only and for a closed window.
                Ok(b) if is_download_only(&b.deployment) => Window::DownloadOnly,
                Ok(_) => Window::Open,
                Err(DdiError::Status(404 | 410, m)) => Window::Vanished(m),
                Err(e) => Window::Unknown(e.to_string()),
            };
            decision = machine::after_download(d, Some(window));
        }
        match decision {
            AfterDownload::DownloadOnly => self.conclude_download_only(d),
            AfterDownload::WaitForWindow => {
                self.set_status(
                    OtaStatus::Downloading,
                    "downloaded; waiting for the maintenance window",
                );
                self.feedback(
                    d,
                    fb(
                        Execution::Scheduled,
                        Finished::None,
                        "waiting for the maintenance window",
                    ),
                )
                .await;
                Step::Wait
            }
            AfterDownload::Fail(why) => self.conclude(d, Finished::Failure, why),
            AfterDownload::AskWindow | AfterDownload::Retry(_) => {
                tracing::warn!(reason = ?decision, "cannot check the maintenance window; retrying at the next poll");
                Step::Wait
            }
            AfterDownload::Install => {
                d.phase = Phase::Installing;
                d.install_started_at = now_unix();
                self.persist(d)
            }
        }
    }

    async fn install(&mut self, d: &mut Deployment) -> Step {
        // After a restart: RAUC may still be busy with the install we started.
        if self.rauc.operation().await.as_deref() == Ok("installing") {
            self.set_status(
                OtaStatus::Installing,
                "waiting for RAUC to finish the install in progress",
            );
            if let Err(e) = self.rauc.wait_idle(Duration::from_secs(3600)).await {
                tracing::warn!(error = %e, "RAUC busy");
                return Step::Wait;
            }
        }
        if let Some(done) = self.install_outcome_after_restart(d).await {
            return done;
        }
        self.set_status(
            OtaStatus::Installing,
            format!("installing {} {}", d.name, d.version),
        );
        self.feedback(d, fb(Execution::Proceeding, Finished::None, "installing"))
            .await;
        let relay = if d.stream {
            match self.start_relay(d).await {
                Ok(r) => Some(r),
                Err(why) => return self.stream_refused(d, why).await,
            }
        } else {
            None
        };
        // Which images RAUC may fetch adaptively: to say afterwards whether it did.
        let adaptive = match &relay {
            Some(r) => self
                .rauc
                .adaptive_images(r.url())
                .await
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "cannot tell whether the streamed bundle is adaptive");
                    Vec::new()
                }),
            None => Vec::new(),
        };
        let (source, args) = if let Some(r) = &relay {
            (r.url().to_string(), Default::default())
        } else if d.by_url {
            (d.artifact.url.clone(), self.url_install_args())
        } else {
            (d.bundle_path.display().to_string(), Default::default())
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(i32, String)>(16);
        let local = d.local;
        let rauc = &self.rauc;
        let install = rauc.install(&source, args, move |pct, text| {
            let _ = tx.try_send((pct, text.to_string()));
        });
        let ddi = &self.ddi;
        let href = d.href.clone();
        let state = self.state.clone();
        let progress = async {
            let mut last = -1;
            while let Some((pct, text)) = rx.recv().await {
                state.update(|s| {
                    let m = s.modules.entry(MODULE.to_string()).or_default();
                    m.detail = format!("installing: {pct}% {text}");
                });
                // Whole steps of ten: enough for hawkBit, no flood.
                if pct / 10 != last / 10 && !local {
                    last = pct;
                    let f = fb(
                        Execution::Proceeding,
                        Finished::None,
                        format!("installing: {pct}% {text}"),
                    )
                    .progress(pct.clamp(0, 100), 100);
                    let _ = ddi.feedback(&href, &f).await;
                }
            }
        };
        // The progress sender lives in `install`'s callback: both end together.
        let (result, ()) = tokio::join!(install, progress);
        let _ = std::fs::remove_file(self.dir.path("ota/install-called"));
        match result {
            Ok(()) => {
                let primary = match self.rauc.primary().await {
                    Ok(p) => self.rauc.bootname_of(&p).await.unwrap_or(p),
                    Err(e) => {
                        tracing::warn!(error = %e, "installed, but GetPrimary failed");
                        String::new()
                    }
                };
                tracing::info!(action = %d.action_id, target = %primary, "bundle installed");
                if let Some(r) = &relay {
                    self.count_streamed(r.stats());
                    let (said, fell_back) =
                        streamed_summary(r.stats(), d.artifact.size.unwrap_or_default(), &adaptive);
                    if fell_back {
                        tracing::warn!(action = %d.action_id, "{said}");
                    } else {
                        tracing::info!(action = %d.action_id, "{said}");
                    }
                    self.feedback(d, fb(Execution::Proceeding, Finished::None, said))
                        .await;
                }
                d.target_slot = primary;
                d.phase = Phase::Installed;
                remove_bundle(d);
                self.persist(d)
            }
            Err(why) => {
                if let Some(r) = &relay {
                    // The link, not RAUC: a download would meet the same dead link.
                    if let Some(link) = r.stats().failure() {
                        return self.conclude(
                            d,
                            Finished::Failure,
                            format!("streaming install failed: {link} (RAUC: {why})"),
                        );
                    }
                    return self.stream_refused(d, format!("RAUC: {why}")).await;
                }
                remove_bundle(d);
                self.conclude(d, Finished::Failure, format!("installation failed: {why}"))
            }
        }
    }

    /// `status`: what the last streamed install cost the link (`stream_fetched_bytes`, what
    /// came from the server; `stream_reads`; `stream_refetches` after cuts).
    fn count_streamed(&self, stats: &crate::relay::RelayStats) {
        use std::sync::atomic::Ordering;
        self.state.update(|s| {
            let m = s.modules.entry(MODULE.to_string()).or_default();
            for (k, v) in [
                ("stream_fetched_bytes", &stats.fetched),
                ("stream_reads", &stats.requests),
                ("stream_refetches", &stats.retries),
            ] {
                m.counters.insert(k.to_string(), v.load(Ordering::Relaxed));
            }
        });
    }

    /// RAUC would not stream this bundle (no NBD, a plain bundle, an old build): download it
    /// and install from the file instead, and say so.
    async fn stream_refused(&mut self, d: &mut Deployment, why: String) -> Step {
        let said =
            format!("streaming install not possible ({why}); downloading the bundle instead");
        tracing::warn!(action = %d.action_id, "{said}");
        self.feedback(d, fb(Execution::Proceeding, Finished::None, said))
            .await;
        d.stream = false;
        d.stream_refused = true;
        d.phase = Phase::Downloading;
        self.persist(d)
    }

    /// When `Installing` was persisted by an earlier run: did that install complete?
    /// `None`: no earlier attempt (install now).
    async fn install_outcome_after_restart(&self, d: &mut Deployment) -> Option<Step> {
        let marker = self.dir.path("ota/install-called");
        let called = std::fs::read_to_string(&marker)
            .ok()
            .is_some_and(|s| s.trim() == d.action_id);
        let (slots, primary, booted, last_error) = if called {
            (
                self.rauc.slots().await.ok(),
                self.rauc.primary().await.ok(),
                self.rauc.boot_slot().await.unwrap_or_default(),
                self.rauc.last_error().await.unwrap_or_default(),
            )
        } else {
            Default::default()
        };
        let facts = InstallFacts {
            called,
            slots: slots.as_deref(),
            primary: primary.as_deref(),
            last_error: &last_error,
        };
        let boot_id = self.boot_id();
        let now = Now {
            boot_id: &boot_id,
            booted: &booted,
            unix: now_unix(),
        };
        match machine::install_resume(d, &facts, &now) {
            InstallResume::Install { cause } => {
                if let Some(cause) = cause {
                    tracing::warn!(action = %d.action_id, attempt = d.install_attempts + 1, "the install was {cause}; installing again");
                }
                self.install_attempt(d, &marker)
            }
            InstallResume::Wait(why) => {
                tracing::warn!(action = %d.action_id, reason = %why, "install outcome unknown; asking RAUC again at the next poll");
                Some(Step::Wait)
            }
            InstallResume::Completed { target } => {
                let _ = std::fs::remove_file(&marker);
                tracing::info!(action = %d.action_id, slot = %target, "the install started before the restart completed");
                d.target_slot = target;
                d.phase = Phase::Installed;
                remove_bundle(d);
                Some(self.persist(d))
            }
            InstallResume::Fail(why) => {
                let _ = std::fs::remove_file(&marker);
                Some(self.conclude(d, Finished::Failure, why))
            }
        }
    }

    /// Persist that `InstallBundle` is about to be called (attempt count, boot id, marker), so
    /// that a later run never calls it twice for one attempt. `None`: go on and install.
    fn install_attempt(&self, d: &mut Deployment, marker: &std::path::Path) -> Option<Step> {
        d.install_attempts += 1;
        d.install_boot_id = self.boot_id();
        if let Step::Wait = self.persist(d) {
            return Some(Step::Wait);
        }
        let _ = thingsly_core::state_dir::write_atomic(marker, d.action_id.as_bytes(), 0o600);
        None
    }

    fn boot_id(&self) -> String {
        read_boot_id(&self.cfg.section.boot_id_path)
    }

    async fn reboot(&mut self, d: &mut Deployment, why: &str) -> Step {
        if d.phase == Phase::Installed {
            d.phase = Phase::Rebooting;
        }
        d.boot_id = self.boot_id();
        d.reboots += 1;
        d.reboot_at = now_unix();
        if let Step::Wait = self.persist(d) {
            return Step::Wait;
        }
        self.set_status(OtaStatus::Rebooting, why.to_string());
        self.feedback(
            d,
            fb(Execution::Proceeding, Finished::None, why.to_string()),
        )
        .await;
        tracing::warn!(action = %d.action_id, command = ?self.cfg.reboot, "{why}");
        let Some((prog, args)) = self.cfg.reboot.split_first() else {
            return Step::Wait;
        };
        match tokio::process::Command::new(prog).args(args).status().await {
            Ok(s) if s.success() => {}
            Ok(s) => tracing::error!(status = %s, "reboot command failed"),
            Err(e) => tracing::error!(error = %e, "reboot command failed to start"),
        }
        // The system goes down now; if it does not, the next start (or poll) checks again.
        Step::Wait
    }

    async fn after_reboot(&mut self, d: &mut Deployment) -> Step {
        let booted = match self.rauc.boot_slot().await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the booted slot");
                return Step::Wait;
            }
        };
        let boot_id = self.boot_id();
        let now = Now {
            boot_id: &boot_id,
            booted: &booted,
            unix: now_unix(),
        };
        let command = format!("{:?}", self.cfg.reboot);
        match machine::after_reboot(d, &now, &command) {
            // The system may be going down right now: the command gets time before a retry.
            AfterReboot::Wait => Step::Wait,
            AfterReboot::RebootAgain => {
                self.reboot(
                    d,
                    "the device did not reboot; running the reboot command again",
                )
                .await
            }
            AfterReboot::Fail(why) => self.conclude(d, Finished::Failure, why),
            AfterReboot::Verify => {
                d.phase = Phase::Verifying;
                d.verifying_since = now.unix;
                self.set_status(
                    OtaStatus::Verifying,
                    format!("running slot {booted}; health checks"),
                );
                self.persist(d)
            }
            AfterReboot::FellBack(why) => {
                // The new slot did not come up: take it out of the boot order for good and
                // keep the running slot first (and marked good).
                self.mark_back_on(&booted).await;
                self.conclude(d, Finished::Failure, why)
            }
        }
    }

    async fn verify(&mut self, d: &mut Deployment) -> Step {
        // The deadline runs from when the new slot was first found running, across agent
        // restarts (an action persisted before `verifying_since` existed starts it now).
        if d.verifying_since == 0 {
            d.verifying_since = now_unix();
            if let Step::Wait = self.persist(d) {
                return Step::Wait;
            }
        }
        let deadline = d.verifying_since
            + i64::try_from(self.cfg.section.health_deadline.as_secs()).unwrap_or(i64::MAX / 2);
        let mut last_failure = String::new();
        loop {
            let result = self.health().await;
            let passed = result.is_ok();
            if let Err(why) = result
                && why != last_failure
            {
                self.set_status(OtaStatus::Verifying, format!("health check pending: {why}"));
                last_failure = why;
            }
            match machine::health(passed, now_unix(), deadline) {
                Health::Good => break,
                Health::Failed => return self.fail_health(d, last_failure).await,
                Health::Pending => {}
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return Step::Wait,
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
        if let Err(e) = self.rauc.mark("good", "booted").await {
            tracing::error!(error = %e, "cannot mark the slot good");
            return Step::Wait;
        }
        let s = self.state.get();
        self.conclude(
            d,
            Finished::Success,
            format!(
                "{} {} running on slot {} (marked good)",
                d.name, d.version, s.rauc_slot
            ),
        )
    }

    async fn health(&mut self) -> Result<(), String> {
        let sec = &self.cfg.section;
        if sec.health_mqtt && self.cfg.telemetry_enabled {
            let s = self.state.get();
            let t = s
                .modules
                .get("telemetry")
                .map(|m| m.state.as_str())
                .unwrap_or("");
            if t != "running" {
                return Err(format!("MQTT not connected (telemetry {t})"));
            }
        }
        if sec.health_ddi {
            self.ddi.poll(None).await.map_err(|e| e.to_string())?;
        }
        if let Some((prog, args)) = sec.health_command.split_first() {
            let run = tokio::process::Command::new(prog)
                .args(args)
                .kill_on_drop(true)
                .output();
            match tokio::time::timeout(Duration::from_secs(60), run).await {
                Ok(Ok(o)) if o.status.success() => {}
                Ok(Ok(o)) => {
                    let err = String::from_utf8_lossy(&o.stderr);
                    return Err(format!(
                        "health command {prog} exited {}: {}",
                        o.status,
                        err.trim()
                    ));
                }
                Ok(Err(e)) => return Err(format!("health command {prog}: {e}")),
                Err(_) => return Err(format!("health command {prog} timed out")),
            }
        }
        Ok(())
    }

    /// After the bootloader fell back to `booted`: the other slot bad, `booted` active and good.
    async fn mark_back_on(&self, booted: &str) {
        for (state, slot) in [("bad", "other"), ("active", "booted"), ("good", "booted")] {
            if let Err(e) = self.rauc.mark(state, slot).await {
                tracing::warn!(error = %e, %booted, "cannot mark {slot} {state}");
            }
        }
    }

    async fn fail_health(&mut self, d: &mut Deployment, why: String) -> Step {
        let detail = format!(
            "health checks failed on slot {} within {:?}: {why}; rolled back to {}",
            d.target_slot, self.cfg.section.health_deadline, d.previous_slot
        );
        if let Err(e) = self.rauc.mark("bad", "booted").await {
            tracing::error!(error = %e, "cannot mark the failing slot bad");
        }
        // Make the old slot primary too: with bootloaders that keep trying the new one.
        if let Err(e) = self.rauc.mark("active", "other").await {
            tracing::warn!(error = %e, "cannot activate the previous slot");
        }
        d.report = Some(Report {
            execution: Execution::Closed,
            finished: Finished::Failure,
            details: vec![detail],
        });
        d.phase = Phase::RollingBack;
        d.boot_id = String::new();
        if let Step::Wait = self.persist(d) {
            return Step::Wait;
        }
        self.reboot(d, "health checks failed; rebooting into the previous slot")
            .await
    }

    async fn after_rollback(&mut self, d: &mut Deployment) -> Step {
        let booted = self.rauc.boot_slot().await.unwrap_or_default();
        let boot_id = self.boot_id();
        let now = Now {
            boot_id: &boot_id,
            booted: &booted,
            unix: now_unix(),
        };
        match machine::after_rollback(d, &now) {
            AfterRollback::Wait => Step::Wait,
            AfterRollback::RebootAgain => {
                self.reboot(d, "health checks failed; rebooting into the previous slot")
                    .await
            }
            AfterRollback::Fail(why) => self.conclude(d, Finished::Failure, why),
            AfterRollback::Back(detail) => {
                // GRUB counted this boot of the old slot as a try: it must be marked good again.
                if let Err(e) = self.rauc.mark("good", "booted").await {
                    tracing::warn!(error = %e, "cannot mark the slot rolled back to good");
                }
                self.conclude(d, Finished::Failure, detail)
            }
        }
    }

    /// A local install is over: on success the server is told what runs now (`installedBase`,
    /// kept until it was told, see [`Self::report_installed_base`]); either way the action is
    /// cleared. The bundle stays where the user had it.
    fn conclude_local(&mut self, d: &mut Deployment, r: &Report) -> Step {
        if r.finished == Finished::Success {
            let v = InstalledBase {
                name: d.name.clone(),
                version: d.version.clone(),
            };
            if let Err(e) = self.dir.write_json(INSTALLED_BASE, &v, MODE_SECRET) {
                tracing::error!(error = %e, "cannot keep the local install for the server; retrying");
                return Step::Wait;
            }
        }
        if let Err(e) = self.dir.remove(DEPLOYMENT) {
            tracing::error!(error = %e, "cannot clear the OTA state");
            return Step::Wait;
        }
        tracing::info!(action = %d.action_id, finished = ?r.finished, details = ?r.details, "local install over");
        Step::Done
    }

    /// After a local install: `PUT installedBase` until the server took it (200/201), or
    /// refused it for good (a 4xx: it does not know that name and version; said in the log).
    async fn report_installed_base(&mut self) {
        let Ok(Some(v)) = self.dir.read_json::<InstalledBase>(INSTALLED_BASE) else {
            return;
        };
        let result = self.ddi.put_installed_base(&v).await;
        match machine::after_report(result.as_ref().map(|_| ())) {
            AfterReport::Sent => {
                tracing::info!(name = %v.name, version = %v.version, "the server knows the local install");
                let _ = self.dir.remove(INSTALLED_BASE);
            }
            AfterReport::Refused => {
                let why = result.err().map(|e| e.to_string()).unwrap_or_default();
                tracing::warn!(name = %v.name, version = %v.version, error = %why, "the server refused the installed version (it has no such software); not retried");
                let _ = self.dir.remove(INSTALLED_BASE);
            }
            AfterReport::Retry => {}
        }
    }

    async fn report(&mut self, d: &mut Deployment) -> Step {
        let Some(r) = d.report.clone() else {
            return self.conclude(d, Finished::Failure, "outcome lost".into());
        };
        if d.local {
            return self.conclude_local(d, &r);
        }
        let f = ActionFeedback::new(r.execution, r.finished, r.details.clone());
        let sent = self.ddi.feedback(&d.href, &f).await;
        match machine::after_report(sent.as_ref().map(|_| ())) {
            AfterReport::Sent => {
                self.remember(&d.action_id, &f);
                if let Err(e) = self.dir.remove(DEPLOYMENT) {
                    tracing::error!(error = %e, "cannot clear the OTA state");
                    return Step::Wait;
                }
                remove_bundle(d);
                let _ = std::fs::remove_file(download::part_path(&d.bundle_path));
                tracing::info!(action = %d.action_id, finished = ?r.finished, "final OTA report sent");
                self.etag = None;
                Step::Done
            }
            AfterReport::Refused => {
                let why = sent.err().map(|e| e.to_string()).unwrap_or_default();
                tracing::error!(error = %why, "final OTA report refused; dropping it");
                let _ = self.dir.remove(DEPLOYMENT);
                Step::Done
            }
            AfterReport::Retry => {
                let why = sent.err().map(|e| e.to_string()).unwrap_or_default();
                tracing::warn!(error = %why, "final OTA report not sent; retried at the next poll");
                Step::Wait
            }
        }
    }
}

/// The downloaded bundle and its partial file; never the user's own file of a local install.
fn remove_bundle(d: &Deployment) {
    if !d.local {
        let _ = std::fs::remove_file(&d.bundle_path);
        let _ = std::fs::remove_file(download::part_path(&d.bundle_path));
    }
}

/// The one RAUC bundle of a deployment and its download link; any other shape is refused
/// with a reason the operator can act on.
pub fn the_bundle(dep: &ddi::Deployment) -> Result<(&ddi::Chunk, &ddi::Artifact, String), String> {
    let artifacts: Vec<(&ddi::Chunk, &ddi::Artifact)> = dep
        .chunks
        .iter()
        .flat_map(|c| c.artifacts.iter().map(move |a| (c, a)))
        .collect();
    match artifacts.as_slice() {
        [(chunk, a)] if dep.chunks.len() == 1 => match a.download_href() {
            Some(url) => Ok((*chunk, *a, url.to_string())),
            None => Err(format!("artifact {} has no download link", a.filename)),
        },
        _ => Err(format!(
            "expected one RAUC bundle (one chunk with one artifact), got {} chunks with {} artifacts",
            dep.chunks.len(),
            artifacts.len()
        )),
    }
}

/// A download-only action, told apart from an install waiting for its window: hawkBit sends
/// `update: skip` for both (its `calculateUpdateType`), and `maintenanceWindow: unavailable`
/// only for the second. While the window is closed the agent downloads and waits; once it
/// opens, `skip` means download-only.
fn is_download_only(dep: &thingsly_proto::ddi::Deployment) -> bool {
    dep.update == Some(HandlingType::Skip)
        && dep.maintenance_window != Some(MaintenanceWindow::Unavailable)
}

/// What a streaming install cost the link: the relay's counts against the bundle's size,
/// and whether an adaptive bundle was in fact fetched whole (RAUC falls back to a full copy
/// with only a line in its own log: no `data-directory`, no hash index of the target slot).
fn streamed_summary(
    stats: &crate::relay::RelayStats,
    size: u64,
    adaptive: &[crate::rauc::AdaptiveImage],
) -> (String, bool) {
    use std::sync::atomic::Ordering;
    let fetched = stats.fetched.load(Ordering::Relaxed);
    let retries = stats.retries.load(Ordering::Relaxed);
    let pct = |n: u64, of: u64| {
        if of > 0 {
            n as f64 * 100.0 / of as f64
        } else {
            0.0
        }
    };
    let mut said = format!(
        "streamed: {fetched} of the bundle's {size} bytes crossed the link ({:.1} %), {} reads, {retries} fetched again after a cut",
        pct(fetched, size),
        stats.requests.load(Ordering::Relaxed)
    );
    let images: u64 = adaptive.iter().map(|i| i.size).sum();
    // Besides the images RAUC reads the manifest and signature: a whole image fetched means
    // at least nine tenths of the adaptive images' bytes.
    let fell_back = images > 0 && fetched.saturating_mul(10) >= images.saturating_mul(9);
    if images > 0 {
        let methods = adaptive
            .iter()
            .flat_map(|i| i.methods.iter().map(String::as_str))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
            .join(", ");
        if fell_back {
            said.push_str(&format!(
                "; the bundle is adaptive ({methods}) but RAUC fetched the whole image: it fell back to a full copy (RAUC's log says why, e.g. no data-directory in system.conf or no hash index of the target slot)"
            ));
        } else {
            said.push_str(&format!(
                "; adaptive ({methods}): {:.1} % of the image fetched, the rest taken from the device's slots",
                pct(fetched, images)
            ));
        }
    }
    (said, fell_back)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rauc::{AdaptiveImage, Slot};
    use std::sync::Mutex;

    /// RAUC as the tests set it up; records every `InstallBundle` and `Mark`. At each
    /// `InstallBundle` it also records what was persisted at that moment (the attempt count in
    /// `ota/deployment.json` and whether the install marker exists), which is what a kill right
    /// then would leave behind.
    #[derive(Default)]
    struct FakeRauc {
        booted: String,
        slots: Option<Vec<Slot>>,
        primary: String,
        state_dir: PathBuf,
        installs: Mutex<Vec<(String, u32, bool)>>,
        marks: Mutex<Vec<(String, String)>>,
        /// Answers the streaming probe (RAUC ≥ 1.9).
        streams: bool,
        /// What `InstallBundle` of a URL fails with (a RAUC without NBD); `None`: it reads
        /// the first 4 bytes from the relay, as RAUC's NBD server does first, and succeeds.
        stream_error: Option<String>,
    }

    impl Installer for FakeRauc {
        async fn boot_slot(&self) -> Result<String, String> {
            Ok(self.booted.clone())
        }
        async fn operation(&self) -> Result<String, String> {
            Ok("idle".into())
        }
        async fn last_error(&self) -> Result<String, String> {
            Ok(String::new())
        }
        async fn slots(&self) -> Result<Vec<Slot>, String> {
            self.slots
                .clone()
                .ok_or_else(|| "RAUC GetSlotStatus: timeout".into())
        }
        async fn primary(&self) -> Result<String, String> {
            Ok(self.primary.clone())
        }
        async fn mark(&self, state: &str, slot: &str) -> Result<(), String> {
            self.marks.lock().unwrap().push((state.into(), slot.into()));
            Ok(())
        }
        async fn streams_with_tls_options(&self) -> bool {
            self.streams
        }
        async fn adaptive_images(&self, _bundle: &str) -> Result<Vec<AdaptiveImage>, String> {
            Ok(Vec::new())
        }
        async fn install(
            &self,
            bundle: &str,
            _args: InstallArgs,
            mut progress: impl FnMut(i32, &str) + Send,
        ) -> Result<(), String> {
            let persisted: Deployment =
                serde_json::from_slice(&std::fs::read(self.state_dir.join(DEPLOYMENT)).unwrap())
                    .unwrap();
            let marker = self.state_dir.join("ota/install-called").exists();
            self.installs
                .lock()
                .unwrap()
                .push((bundle.into(), persisted.install_attempts, marker));
            if bundle.starts_with("http://") {
                if let Some(e) = &self.stream_error {
                    return Err(e.clone());
                }
                // RAUC's first read, by hand (HTTP/1.1, one request); the DDI server here
                // refuses connections, so the relay fails it after `stream_hold`.
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let rest = bundle.trim_start_matches("http://");
                let (host, path) = rest.split_at(rest.find('/').unwrap());
                let mut c = tokio::net::TcpStream::connect(host)
                    .await
                    .map_err(|e| e.to_string())?;
                c.write_all(
                    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nRange: bytes=0-3\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await
                .map_err(|e| e.to_string())?;
                let mut answer = Vec::new();
                let _ = c.read_to_end(&mut answer).await;
                let answer = String::from_utf8_lossy(&answer);
                if !answer.ends_with("\r\n\r\n") && answer.len() < 4 {
                    return Err("nbd read failed".into());
                }
                let head_end = answer.find("\r\n\r\n").map_or(answer.len(), |i| i + 4);
                if answer.len() - head_end != 4 {
                    return Err(format!(
                        "nbd read failed: {} body bytes",
                        answer.len() - head_end
                    ));
                }
            }
            progress(100, "Installing done.");
            Ok(())
        }
    }

    const T: i64 = 1_795_428_000; // 2026-11-23T10:00:00Z

    /// An engine on a fresh state directory, with a DDI server that is not there (feedback
    /// fails fast and is only logged) and the boot id `boot`.
    fn engine(dir: &tempfile::TempDir, rauc: FakeRauc, boot: &str) -> Engine<FakeRauc> {
        let state_dir = StateDir::open(dir.path().join("state")).unwrap();
        state_dir.subdir("ota").unwrap();
        std::fs::write(dir.path().join("boot_id"), boot).unwrap();
        let section = OtaSection {
            boot_id_path: dir.path().join("boot_id"),
            ..OtaSection::default()
        };
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let ddi = DdiClient::new(
            "https://127.0.0.1:9",
            "DEFAULT",
            "dev1",
            tls,
            Auth::Certificate,
            &thingsly_core::proxy::DIRECT,
        )
        .unwrap();
        let rauc = FakeRauc {
            state_dir: state_dir.path(""),
            ..rauc
        };
        Engine {
            cfg: OtaConfig {
                section,
                device_id: "dev1".into(),
                server_url: "https://127.0.0.1:9".into(),
                reboot: vec!["true".into()],
                telemetry_enabled: false,
                proxies: thingsly_core::proxy::Proxies::none(),
            },
            ddi,
            rauc,
            state: StateHandle::new(Default::default()),
            download_dir: dir.path().join("state/ota"),
            dir: state_dir,
            shutdown: CancellationToken::new(),
            sleep: Duration::from_secs(60),
            etag: None,
            config_sent: None,
            installed_mismatch: None,
            wake: None,
        }
    }

    /// Action 7, from slot A (1.0.0) to 2.0.0, at `phase`.
    fn action(e: &Engine<FakeRauc>, phase: Phase) -> Deployment {
        let d = Deployment {
            href: "https://127.0.0.1:9/DEFAULT/controller/v1/dev1/deploymentBase/7".into(),
            install_started_at: T,
            ..Deployment::sample(
                phase,
                "https://127.0.0.1:9/os.raucb",
                e.download_dir.join("os.raucb"),
            )
        };
        e.save(&d).unwrap();
        d
    }

    /// What a kill during `installing` leaves: action 7 at `attempts` attempts, the last one
    /// started in `boot`, and the marker that InstallBundle was (about to be) called.
    fn killed_while_installing(e: &Engine<FakeRauc>, attempts: u32, boot: &str) -> Deployment {
        let d = Deployment {
            install_attempts: attempts,
            install_boot_id: boot.into(),
            ..action(e, Phase::Installing)
        };
        e.save(&d).unwrap();
        std::fs::write(e.dir.path("ota/install-called"), "7").unwrap();
        d
    }

    fn slots(b_installed: &str) -> Vec<Slot> {
        let slot = |name: &str, bootname: &str, installed: &str| Slot {
            name: name.into(),
            bootname: bootname.into(),
            status: "ok".into(),
            installed_timestamp: installed.into(),
            ..Slot::default()
        };
        vec![
            slot("rootfs.0", "A", "2026-11-01T10:00:00Z"),
            slot("rootfs.1", "B", b_installed),
        ]
    }

    fn b_primary(slots: Vec<Slot>) -> FakeRauc {
        FakeRauc {
            booted: "A".into(),
            slots: Some(slots),
            primary: "rootfs.1".into(),
            ..FakeRauc::default()
        }
    }

    #[test]
    fn a_silent_adaptive_fallback_is_said() {
        use std::sync::atomic::Ordering;
        let img = |size| AdaptiveImage {
            slot_class: "rootfs".into(),
            size,
            methods: vec!["block-hash-index".into()],
        };
        let stats = crate::relay::RelayStats::default();
        stats.fetched.store(950, Ordering::Relaxed);
        let (said, fell_back) = streamed_summary(&stats, 1100, &[img(1000)]);
        assert!(
            fell_back && said.contains("fell back to a full copy"),
            "{said}"
        );
        stats.fetched.store(80, Ordering::Relaxed);
        let (said, fell_back) = streamed_summary(&stats, 1100, &[img(1000)]);
        assert!(
            !fell_back && said.contains("8.0 % of the image fetched"),
            "{said}"
        );
        let (said, fell_back) = streamed_summary(&stats, 1100, &[]);
        assert!(!fell_back && !said.contains("adaptive"), "{said}");
        assert!(
            said.starts_with("streamed: 80 of the bundle's 1100 bytes"),
            "{said}"
        );
    }

    #[tokio::test]
    async fn a_stream_rauc_refuses_is_downloaded_instead_and_said() {
        let dir = tempfile::tempdir().unwrap();
        let rauc = FakeRauc {
            streams: true,
            stream_error: Some(
                "failed to resolve 'nbd' netlink family - BLK_DEV_NBD not enabled in kernel?"
                    .into(),
            ),
            ..b_primary(slots("2026-11-23T10:05:00Z"))
        };
        let mut e = engine(&dir, rauc, "boot-1");
        let mut d = action(&e, Phase::Downloading);
        // Streaming is chosen: no download, straight on to the install.
        assert!(matches!(e.download(&mut d).await, Step::Next));
        assert!(d.stream && d.phase == Phase::Downloaded);
        d.phase = Phase::Installing;
        e.save(&d).unwrap();
        assert!(matches!(e.install(&mut d).await, Step::Next));
        let installs = e.rauc.installs.lock().unwrap().clone();
        assert!(
            installs[0].0.starts_with("http://127.0.0.1:"),
            "{installs:?}"
        );
        // RAUC refused: this action downloads, persisted, and streams no more.
        assert_eq!(
            (d.phase, d.stream, d.stream_refused),
            (Phase::Downloading, false, true)
        );
        let persisted = e.load().unwrap();
        assert!(persisted.stream_refused && persisted.phase == Phase::Downloading);
        assert!(!e.streams(&d).await);
    }

    #[tokio::test]
    async fn a_stream_whose_link_never_returns_fails_the_action_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let rauc = FakeRauc {
            streams: true,
            ..b_primary(slots("2026-11-23T10:05:00Z"))
        };
        let mut e = engine(&dir, rauc, "boot-1");
        e.cfg.section.stream_hold = Duration::from_secs(1);
        let mut d = Deployment {
            stream: true,
            ..action(&e, Phase::Installing)
        };
        e.save(&d).unwrap();
        // The DDI server at 127.0.0.1:9 refuses every connection: the relay gives up after
        // `stream_hold` and the action fails with why, instead of downloading.
        let step = e.install(&mut d).await;
        assert!(matches!(step, Step::Next | Step::Done), "{d:?}");
        let r = d.report.clone().unwrap();
        assert!(
            r.details
                .iter()
                .any(|l| l.contains("streaming install failed: no data from the server for 1 s")),
            "{r:?}"
        );
        assert!(!d.stream_refused);
    }

    #[tokio::test]
    async fn an_install_is_counted_and_marked_before_installbundle_is_called() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(&dir, b_primary(slots("2026-11-23T10:05:00Z")), "boot-1");
        let mut d = action(&e, Phase::Installing);
        let mut e = e;
        assert!(matches!(e.install(&mut d).await, Step::Next));
        let installs = e.rauc.installs.lock().unwrap().clone();
        assert_eq!(
            installs,
            [(d.bundle_path.display().to_string(), 1, true)],
            "one InstallBundle, with attempt 1 and the marker already persisted"
        );
        assert_eq!((d.phase, d.target_slot.as_str()), (Phase::Installed, "B"));
        let persisted = e.load().unwrap();
        assert_eq!(
            (persisted.phase, persisted.install_boot_id.as_str()),
            (Phase::Installed, "boot-1")
        );
        assert!(!e.dir.path("ota/install-called").exists());
    }

    #[tokio::test]
    async fn an_install_rauc_completed_before_a_kill_is_not_installed_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = engine(&dir, b_primary(slots("2026-11-23T10:05:00Z")), "boot-2");
        let mut d = killed_while_installing(&e, 1, "boot-1");
        assert!(matches!(e.install(&mut d).await, Step::Next));
        assert!(
            e.rauc.installs.lock().unwrap().is_empty(),
            "no second InstallBundle"
        );
        assert_eq!((d.phase, d.target_slot.as_str()), (Phase::Installed, "B"));
        assert_eq!(e.load().unwrap().phase, Phase::Installed);
    }

    #[tokio::test]
    async fn rauc_unreadable_after_a_kill_installs_nothing_and_counts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let rauc = FakeRauc {
            slots: None,
            ..b_primary(vec![])
        };
        let mut e = engine(&dir, rauc, "boot-1");
        let mut d = killed_while_installing(&e, 1, "");
        assert!(matches!(e.install(&mut d).await, Step::Wait));
        assert!(e.rauc.installs.lock().unwrap().is_empty());
        let persisted = e.load().unwrap();
        assert_eq!(
            (persisted.phase, persisted.install_attempts),
            (Phase::Installing, 1)
        );
        assert!(
            e.dir.path("ota/install-called").exists(),
            "asked again next time"
        );
    }

    #[tokio::test]
    async fn an_install_cut_short_is_repeated_and_then_given_up() {
        let dir = tempfile::tempdir().unwrap();
        // B was last written before this action's install started: the install was cut short.
        let mut e = engine(&dir, b_primary(slots("2026-11-01T10:00:00Z")), "boot-2");
        let mut d = killed_while_installing(&e, 1, "boot-1");
        // The fake's InstallBundle "completes" but B still looks old: the engine takes RAUC's
        // answer (Completed) and asks GetPrimary, as after any install.
        assert!(matches!(e.install(&mut d).await, Step::Next));
        assert_eq!(e.rauc.installs.lock().unwrap().len(), 1);
        assert_eq!(
            e.rauc.installs.lock().unwrap()[0].1,
            2,
            "the second attempt, counted first"
        );

        let mut d = killed_while_installing(&e, machine::MAX_INSTALL_ATTEMPTS, "");
        assert!(matches!(e.install(&mut d).await, Step::Next));
        assert_eq!(
            e.rauc.installs.lock().unwrap().len(),
            1,
            "not a fourth time"
        );
        assert_eq!(d.phase, Phase::Reporting);
        let report = d.report.unwrap();
        assert_eq!(report.finished, Finished::Failure);
        assert!(report.details[0].starts_with("installation did not complete in 3 attempts"));
    }

    #[tokio::test]
    async fn a_bootloader_fallback_takes_the_new_slot_out_and_reports_a_rollback() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = engine(&dir, b_primary(slots("2026-11-23T10:05:00Z")), "boot-2");
        let mut d = action(&e, Phase::Rebooting);
        d.target_slot = "B".into();
        d.boot_id = "boot-1".into();
        d.reboots = 1;
        d.reboot_at = now_unix() - 30;
        e.save(&d).unwrap();
        assert!(matches!(e.after_reboot(&mut d).await, Step::Next));
        let marks = e.rauc.marks.lock().unwrap().clone();
        let marks: Vec<(&str, &str)> = marks
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        assert_eq!(
            marks,
            [("bad", "other"), ("active", "booted"), ("good", "booted")]
        );
        assert_eq!(d.phase, Phase::Reporting);
        assert_eq!(
            e.load().unwrap().report.unwrap().details,
            [
                "rolled back: booted slot A again instead of B (the new slot failed to boot); still running 1.0.0"
            ]
        );
    }

    #[tokio::test]
    async fn the_health_deadline_runs_from_the_first_verification_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let rauc = FakeRauc {
            booted: "B".into(),
            ..b_primary(slots("2026-11-23T10:05:00Z"))
        };
        let mut e = engine(&dir, rauc, "boot-2");
        e.cfg.section.health_deadline = Duration::from_secs(300);
        e.cfg.section.health_command = vec!["false".into()];
        e.cfg.section.health_ddi = false;
        // Verifying since 301 s ago (an earlier run of the agent): the deadline has passed,
        // the first failing check fails the update at once.
        let mut d = action(&e, Phase::Verifying);
        d.target_slot = "B".into();
        d.verifying_since = now_unix() - 301;
        e.save(&d).unwrap();
        let step = tokio::time::timeout(Duration::from_secs(20), e.verify(&mut d))
            .await
            .expect("no second deadline");
        assert!(matches!(step, Step::Wait | Step::Next));
        assert_eq!(d.phase, Phase::RollingBack);
        let marks = e.rauc.marks.lock().unwrap().clone();
        assert_eq!(marks[0], ("bad".to_string(), "booted".to_string()));
        assert!(d.report.unwrap().details[0].starts_with("health checks failed on slot B"));
    }

    #[tokio::test]
    async fn the_booted_slot_is_marked_good_once_per_boot() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(&dir, b_primary(vec![]), "boot-1");
        mark_good_on_boot(&e.cfg, &e.rauc, &e.dir).await;
        mark_good_on_boot(&e.cfg, &e.rauc, &e.dir).await;
        assert_eq!(e.rauc.marks.lock().unwrap().len(), 1);
        // A new boot in the middle of a verdict: the engine decides, not the start-up mark.
        std::fs::write(dir.path().join("boot_id"), "boot-2").unwrap();
        action(&e, Phase::Verifying);
        mark_good_on_boot(&e.cfg, &e.rauc, &e.dir).await;
        assert_eq!(e.rauc.marks.lock().unwrap().len(), 1);
    }

    #[test]
    fn skip_is_download_only_unless_the_window_is_closed() {
        use HandlingType::{Attempt, Forced, Skip};
        use MaintenanceWindow::{Available, Unavailable};
        let dep = |update, window| thingsly_proto::ddi::Deployment {
            download: Some(Forced),
            update: Some(update),
            maintenance_window: window,
            chunks: vec![],
        };
        assert!(is_download_only(&dep(Skip, None)));
        assert!(is_download_only(&dep(Skip, Some(Available))));
        assert!(
            !is_download_only(&dep(Skip, Some(Unavailable))),
            "waits for the window"
        );
        assert!(!is_download_only(&dep(Forced, Some(Available))));
        assert!(!is_download_only(&dep(Attempt, None)));
    }
}
