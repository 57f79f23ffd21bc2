//! The update state machine. One action at a time; its phase is persisted before every
//! irreversible step (see [`crate::state`]). Success is reported only after the new slot
//! booted, passed its health checks and was marked good.

use crate::MODULE;
use crate::ddi_client::{Auth, DdiClient, DdiError, Poll};
use crate::download::{self, DownloadError};
use crate::rauc::Rauc;
use crate::state::{ArtifactRef, DEPLOYMENT, Deployment, LAST, Last, MARKED_GOOD, Phase, Report};
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

struct Engine {
    cfg: OtaConfig,
    ddi: DdiClient,
    rauc: Rauc,
    state: StateHandle,
    dir: StateDir,
    shutdown: CancellationToken,
    download_dir: PathBuf,
    sleep: Duration,
    etag: Option<String>,
    config_sent: Option<ConfigData>,
    /// The installedBase version last warned about.
    installed_mismatch: Option<String>,
}

/// `InstallBundle` calls for one action when power cuts keep interrupting them.
const MAX_INSTALL_ATTEMPTS: u32 = 3;

/// How long a reboot command may take to bring the system down before it is run again.
const REBOOT_GRACE_SECS: i64 = 120;

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
    DdiClient::new(&a.server_url, &a.tenant, &cfg.device_id, tls, auth)
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
async fn mark_good_on_boot(cfg: &OtaConfig, rauc: &Rauc, dir: &StateDir) {
    let boot = read_boot_id(&cfg.section.boot_id_path);
    if std::fs::read_to_string(dir.path(MARKED_GOOD)).is_ok_and(|b| b.trim() == boot) {
        return;
    }
    if let Ok(Some(d)) = dir.read_json::<Deployment>(DEPLOYMENT)
        && matches!(
            d.phase,
            Phase::Rebooting | Phase::Verifying | Phase::RollingBack
        )
    {
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

impl Engine {
    fn set_status(&self, ota_status: &str, detail: impl Into<String>) {
        let detail = detail.into();
        self.state.update(|s| {
            s.ota_status = ota_status.to_string();
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
        self.set_status("idle", "polling");
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
            match current {
                Some(mut d) if d.action_id == base.id => {
                    // Same action: only the maintenance window may have changed.
                    if d.phase == Phase::Downloaded {
                        d.href = href.to_string();
                        self.save(&d).map_err(DdiError::Transport)?;
                    }
                }
                Some(d) => {
                    tracing::info!(current = %d.action_id, new = %base.id, "new action while one is in flight; finishing the current one first");
                }
                None => self.start(href, base).await,
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
                "idle",
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
        let cancelable = match current {
            Some(d) if d.action_id == stop => {
                matches!(d.phase, Phase::Downloading | Phase::Downloaded)
            }
            // Nothing of it here (never started, or already over): nothing to stop.
            _ => true,
        };
        if cancelable {
            if let Some(d) = current.filter(|d| d.action_id == stop) {
                let _ = std::fs::remove_file(download::part_path(&d.bundle_path));
                let _ = std::fs::remove_file(&d.bundle_path);
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
            self.set_status("idle", format!("action {stop} canceled"));
        } else {
            let phase = current.map(|d| d.phase);
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
        Ok(())
    }

    /// A new action: check its shape, persist it, then drive it.
    async fn start(&mut self, href: &str, base: DeploymentBase) {
        let id = base.id.clone();
        // A final report the server did not get (we crashed after sending, or it was lost).
        if let Ok(Some(last)) = self.dir.read_json::<Last>(LAST)
            && last.action_id == id
        {
            let f = ActionFeedback::new(
                last.report.execution,
                last.report.finished,
                last.report.details,
            );
            match self.ddi.feedback(href, &f).await {
                Ok(()) | Err(DdiError::Status(410, _)) => {}
                Err(e) => tracing::warn!(error = %e, "final report resend failed"),
            }
            return;
        }
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
                self.set_status("failed", why);
                return;
            }
        };
        let s = self.state.get();
        let name = artifact
            .hashes
            .sha256
            .clone()
            .unwrap_or_else(|| format!("action-{id}"));
        let d = Deployment {
            action_id: id.clone(),
            href: href.to_string(),
            name: chunk.name.clone(),
            version: chunk.version.clone(),
            artifact: ArtifactRef {
                filename: artifact.filename.clone(),
                url,
                size: artifact.size,
                sha256: artifact.hashes.sha256.clone(),
                sha1: artifact.hashes.sha1.clone(),
                md5: artifact.hashes.md5.clone(),
            },
            download_only: is_download_only(dep),
            phase: Phase::Downloading,
            bundle_path: self.download_dir.join(format!("{name}.raucb")),
            previous_slot: s.rauc_slot.clone(),
            previous_version: s.sw_version.clone(),
            target_slot: String::new(),
            install_started_at: 0,
            install_attempts: 0,
            install_boot_id: String::new(),
            boot_id: String::new(),
            reboots: 0,
            reboot_at: 0,
            by_url: false,
            report: None,
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
            self.set_status("failed", detail);
        } else {
            tracing::info!(action = %d.action_id, %detail, "OTA action succeeded");
            self.state.update(|s| s.ota_error.clear());
            self.set_status("success", detail);
        }
        self.persist(d)
    }

    async fn feedback(&self, d: &Deployment, f: ActionFeedback) {
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
                return self.persist(d);
            }
            tracing::warn!(
                "ota.rauc_url_install: this RAUC (before 1.9) cannot pass TLS options when it \
                 downloads; the agent downloads the bundle instead"
            );
        }
        self.set_status(
            "downloading",
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
            let fetch = download::fetch(ddi, &d.artifact, &d.bundle_path, move |done, total| {
                if let Some(t) = total.filter(|t| *t > 0) {
                    let pct = done * 10 / t;
                    if last_pct != Some(pct) {
                        last_pct = Some(pct);
                        // pct is 0..=10 (done <= total), so the cast cannot truncate.
                        let _ = tx.try_send((pct.min(10) as i32 * 10, 100));
                    }
                }
            });
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

    /// `InstallBundle` arguments for RAUC fetching the bundle: our trust anchors and credentials.
    fn url_install_args(
        &self,
    ) -> std::collections::HashMap<&'static str, zbus::zvariant::Value<'static>> {
        use thingsly_enroll::paths;
        let mut args = std::collections::HashMap::new();
        let path = |p: &str| self.dir.path(p).display().to_string();
        let ca = match &self.cfg.section.ca_bundle {
            Some(p) => p.display().to_string(),
            None => path(paths::CA_CHAIN),
        };
        args.insert("tls-ca", zbus::zvariant::Value::from(ca));
        match self.ddi.auth_header() {
            Some(h) => {
                args.insert(
                    "http-headers",
                    zbus::zvariant::Value::from(vec![format!("Authorization: {h}")]),
                );
            }
            None => {
                args.insert(
                    "tls-cert",
                    zbus::zvariant::Value::from(path(paths::DEVICE_CERT)),
                );
                args.insert(
                    "tls-key",
                    zbus::zvariant::Value::from(path(paths::DEVICE_KEY)),
                );
            }
        }
        args
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
        self.set_status("idle", detail);
        self.persist(d)
    }

    async fn after_download(&mut self, d: &mut Deployment) -> Step {
        if d.download_only {
            return self.conclude_download_only(d);
        }
        // Ask again: the window may have opened (or closed) since the action arrived.
        match self.ddi.get::<DeploymentBase>(&d.href).await {
            Ok(b) if b.deployment.maintenance_window == Some(MaintenanceWindow::Unavailable) => {
                self.set_status(
                    "downloading",
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
                return Step::Wait;
            }
            // The window is open now, and the action was download-only all along (hawkBit says
            // `skip` both for that and for a closed window).
            Ok(b) if is_download_only(&b.deployment) => return self.conclude_download_only(d),
            Ok(_) => {}
            Err(DdiError::Status(404 | 410, m)) => {
                return self.conclude(
                    d,
                    Finished::Failure,
                    format!("action vanished on the server: {m}"),
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot check the maintenance window; retrying at the next poll");
                return Step::Wait;
            }
        }
        d.phase = Phase::Installing;
        d.install_started_at = now_unix();
        self.persist(d)
    }

    async fn install(&mut self, d: &mut Deployment) -> Step {
        // After a restart: RAUC may still be busy with the install we started.
        if self.rauc.operation().await.as_deref() == Ok("installing") {
            self.set_status(
                "installing",
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
        self.set_status("installing", format!("installing {} {}", d.name, d.version));
        self.feedback(d, fb(Execution::Proceeding, Finished::None, "installing"))
            .await;
        let (source, args) = if d.by_url {
            (d.artifact.url.clone(), self.url_install_args())
        } else {
            (d.bundle_path.display().to_string(), Default::default())
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(i32, String)>(16);
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
                if pct / 10 != last / 10 {
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
                d.target_slot = primary;
                d.phase = Phase::Installed;
                let _ = std::fs::remove_file(&d.bundle_path);
                self.persist(d)
            }
            Err(why) => {
                let _ = std::fs::remove_file(&d.bundle_path);
                self.conclude(d, Finished::Failure, format!("installation failed: {why}"))
            }
        }
    }

    /// When `Installing` was persisted by an earlier run: did that install complete?
    /// `None`: no earlier attempt (install now).
    async fn install_outcome_after_restart(&self, d: &mut Deployment) -> Option<Step> {
        let marker = self.dir.path("ota/install-called");
        let called = std::fs::read_to_string(&marker)
            .ok()
            .is_some_and(|s| s.trim() == d.action_id);
        if !called {
            return self.install_attempt(d, &marker);
        }
        let slots = self.rauc.slots().await.ok()?;
        let primary = self.rauc.primary().await.ok();
        let booted = self.rauc.boot_slot().await.unwrap_or_default();
        let fresh = slots.iter().find(|s| {
            s.bootname != booted
                && Some(&s.name) == primary.as_ref()
                && s.status == "ok"
                && timestamp_after(&s.installed_timestamp, d.install_started_at)
        });
        if fresh.is_none() && d.install_attempts < MAX_INSTALL_ATTEMPTS {
            // RAUC is idle and no slot was completed: either a power cut took RAUC down with
            // the install, or the agent died between marking the attempt and calling
            // InstallBundle. Either way the bundle on disk is complete and verified and the
            // half-written slot was never activated: install again (bounded).
            let cause = if d.install_boot_id != self.boot_id() {
                "cut short by a reboot or power cut"
            } else {
                "cut short by an agent restart"
            };
            tracing::warn!(action = %d.action_id, attempt = d.install_attempts + 1, "the install was {cause}; installing again");
            return self.install_attempt(d, &marker);
        }
        let _ = std::fs::remove_file(&marker);
        let why = match self.rauc.last_error().await {
            Ok(e) if !e.is_empty() => format!(": RAUC says {e}"),
            _ => String::new(),
        };
        Some(match fresh {
            Some(s) => {
                tracing::info!(action = %d.action_id, slot = %s.name, "the install started before the restart completed");
                d.target_slot = s.bootname.clone();
                d.phase = Phase::Installed;
                let _ = std::fs::remove_file(&d.bundle_path);
                self.persist(d)
            }
            None => self.conclude(
                d,
                Finished::Failure,
                format!("installation did not complete in {} attempts (each cut short by a restart or power cut){why}; the new slot is not complete, the device stays on its current slot", d.install_attempts),
            ),
        })
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
        self.set_status("rebooting", why.to_string());
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
        let rebooted = self.boot_id() != d.boot_id || booted != d.previous_slot;
        if !rebooted {
            // The system may be going down right now: give the command time before retrying.
            if now_unix() - d.reboot_at < REBOOT_GRACE_SECS {
                return Step::Wait;
            }
            if d.reboots >= 3 {
                return self.conclude(
                    d,
                    Finished::Failure,
                    format!(
                        "the reboot command ({:?}) did not reboot the device ({} tries)",
                        self.cfg.reboot, d.reboots
                    ),
                );
            }
            return self
                .reboot(
                    d,
                    "the device did not reboot; running the reboot command again",
                )
                .await;
        }
        if booted == d.target_slot || (d.target_slot.is_empty() && booted != d.previous_slot) {
            d.phase = Phase::Verifying;
            self.set_status("verifying", format!("running slot {booted}; health checks"));
            return self.persist(d);
        }
        // The bootloader chose the old slot: the new one did not come up. Take it out of the
        // boot order for good and keep the running slot first (and marked good).
        self.mark_back_on(&booted).await;
        self.conclude(
            d,
            Finished::Failure,
            format!(
                "rolled back: booted slot {booted} again instead of {} (the new slot failed to boot); still running {}",
                d.target_slot, d.previous_version
            ),
        )
    }

    async fn verify(&mut self, d: &mut Deployment) -> Step {
        let deadline = tokio::time::Instant::now() + self.cfg.section.health_deadline;
        let mut last_failure = String::new();
        loop {
            match self.health().await {
                Ok(()) => break,
                Err(why) => {
                    if why != last_failure {
                        self.set_status("verifying", format!("health check pending: {why}"));
                        last_failure = why;
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return self.fail_health(d, last_failure).await;
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
        if booted != d.previous_slot {
            let same_boot = self.boot_id() == d.boot_id;
            if same_boot && now_unix() - d.reboot_at < REBOOT_GRACE_SECS {
                return Step::Wait;
            }
            if d.reboots >= 6 {
                let detail = d
                    .report
                    .as_ref()
                    .and_then(|r| r.details.first().cloned())
                    .unwrap_or_default();
                return self.conclude(
                    d,
                    Finished::Failure,
                    format!(
                        "{detail}; the device did not get back to slot {} ({} reboots)",
                        d.previous_slot, d.reboots
                    ),
                );
            }
            return self
                .reboot(d, "health checks failed; rebooting into the previous slot")
                .await;
        }
        // GRUB counted this boot of the old slot as a try: it must be marked good again.
        if let Err(e) = self.rauc.mark("good", "booted").await {
            tracing::warn!(error = %e, "cannot mark the slot rolled back to good");
        }
        let detail = d
            .report
            .as_ref()
            .and_then(|r| r.details.first().cloned())
            .unwrap_or_else(|| "health checks failed; rolled back".into());
        self.conclude(d, Finished::Failure, detail)
    }

    async fn report(&mut self, d: &mut Deployment) -> Step {
        let Some(r) = d.report.clone() else {
            return self.conclude(d, Finished::Failure, "outcome lost".into());
        };
        let f = ActionFeedback::new(r.execution, r.finished, r.details.clone());
        match self.ddi.feedback(&d.href, &f).await {
            // 410: the server already has a final state (ours, or a cancel) for this action.
            Ok(()) | Err(DdiError::Status(410, _)) => {
                self.remember(&d.action_id, &f);
                if let Err(e) = self.dir.remove(DEPLOYMENT) {
                    tracing::error!(error = %e, "cannot clear the OTA state");
                    return Step::Wait;
                }
                let _ = std::fs::remove_file(&d.bundle_path);
                let _ = std::fs::remove_file(download::part_path(&d.bundle_path));
                tracing::info!(action = %d.action_id, finished = ?r.finished, "final OTA report sent");
                self.etag = None;
                Step::Done
            }
            Err(DdiError::Status(s, m)) if (400..500).contains(&s) => {
                tracing::error!(status = s, message = %m, "final OTA report refused; dropping it");
                let _ = self.dir.remove(DEPLOYMENT);
                Step::Done
            }
            Err(e) => {
                tracing::warn!(error = %e, "final OTA report not sent; retried at the next poll");
                Step::Wait
            }
        }
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

/// RAUC's `installed.timestamp` (ISO 8601 UTC) at or after `unix`.
fn timestamp_after(ts: &str, unix: i64) -> bool {
    time::OffsetDateTime::parse(ts, &time::format_description::well_known::Iso8601::DEFAULT)
        .map(|t| t.unix_timestamp() >= unix - 1)
        .unwrap_or(false)
}

/// A download-only action, told apart from an install waiting for its window: hawkBit sends
/// `update: skip` for both (its `calculateUpdateType`), and `maintenanceWindow: unavailable`
/// only for the second. While the window is closed the agent downloads and waits; once it
/// opens, `skip` means download-only.
fn is_download_only(dep: &thingsly_proto::ddi::Deployment) -> bool {
    dep.update == Some(HandlingType::Skip)
        && dep.maintenance_window != Some(MaintenanceWindow::Unavailable)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn rauc_timestamps_compare_to_the_install_start() {
        assert!(timestamp_after("2026-11-23T10:00:05Z", 1_795_428_000));
        assert!(!timestamp_after("2026-11-23T09:00:00Z", 1_795_428_000));
        assert!(!timestamp_after("", 0));
    }
}
