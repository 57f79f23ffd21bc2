//! `ota/deployment.json`: the action in flight. The phase is written *before* every step that
//! cannot be undone (install, reboot, mark), so after a crash or power cut the agent knows
//! where it was: it resumes, or reports what happened, and never installs or reports twice.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use thingsly_proto::ddi::{Execution, Finished};

pub const DEPLOYMENT: &str = "ota/deployment.json";
/// The last action reported final, to answer a server that did not get the report.
pub const LAST: &str = "ota/last.json";
/// Boot id of the boot whose slot was last marked good at start (`ota.mark_good_on_boot`).
pub const MARKED_GOOD: &str = "ota/marked-good-boot";
/// What a local install (`thingsly-agent install`) put on the device, until the server was
/// told (`PUT installedBase` at the next poll).
pub const INSTALLED_BASE: &str = "ota/installed-base.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Fetching the bundle (resumable).
    Downloading,
    /// Bundle complete and verified; waiting for the maintenance window (or download-only).
    Downloaded,
    /// `InstallBundle` was (or is about to be) called.
    Installing,
    /// RAUC reported success; the new slot is primary.
    Installed,
    /// The reboot command was run (or is about to be).
    Rebooting,
    /// Running on the new slot, health checks pending.
    Verifying,
    /// Health checks failed: the slot was marked bad, rebooting back.
    RollingBack,
    /// The outcome is known and only the final feedback is left to send.
    Reporting,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactRef {
    pub filename: String,
    pub url: String,
    pub size: Option<u64>,
    pub sha256: Option<String>,
    pub sha1: Option<String>,
    pub md5: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub execution: Execution,
    pub finished: Finished,
    pub details: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    pub action_id: String,
    /// `deploymentBase/{id}` link, to refresh the maintenance window.
    pub href: String,
    pub name: String,
    pub version: String,
    pub artifact: ArtifactRef,
    pub download_only: bool,
    pub phase: Phase,
    pub bundle_path: PathBuf,
    /// Boot name of the slot running when the action arrived, and its version.
    pub previous_slot: String,
    pub previous_version: String,
    /// Boot name RAUC made primary.
    #[serde(default)]
    pub target_slot: String,
    /// Unix seconds when `InstallBundle` was called.
    #[serde(default)]
    pub install_started_at: i64,
    /// `InstallBundle` calls made for this action, and the boot id of the last one: an install
    /// cut short by a power cut is started again (RAUC lost it too), a few times at most.
    #[serde(default)]
    pub install_attempts: u32,
    #[serde(default)]
    pub install_boot_id: String,
    /// Boot id when the reboot command was run.
    #[serde(default)]
    pub boot_id: String,
    #[serde(default)]
    pub reboots: u32,
    /// Unix seconds when the reboot command last ran.
    #[serde(default)]
    pub reboot_at: i64,
    /// Unix seconds when the new slot was first found running: the health deadline runs from
    /// here, across agent restarts. 0: not verifying yet (or persisted by an older agent).
    #[serde(default)]
    pub verifying_since: i64,
    /// RAUC installs from the artifact URL itself (`ota.rauc_url_install` on a RAUC that can).
    #[serde(default)]
    pub by_url: bool,
    /// Set together with `phase = Reporting` (and kept while rolling back).
    #[serde(default)]
    pub report: Option<Report>,
    /// RAUC installs by streaming through the agent's relay (`ota.streaming`): no download.
    #[serde(default)]
    pub stream: bool,
    /// A streaming install failed for a reason of RAUC's: this action downloads instead.
    #[serde(default)]
    pub stream_refused: bool,
    /// A local install (`thingsly-agent install BUNDLE`, e.g. from a USB stick): no server
    /// action behind it, so no feedback and no window; `bundle_path` is the user's file, never
    /// deleted; the outcome goes to the server as `installedBase` ([`InstalledBase`]).
    #[serde(default)]
    pub local: bool,
}

impl Deployment {
    /// A new action at `phase`, nothing of it done yet (no target slot, no install, no reboot,
    /// no report), from a server unless the caller says otherwise.
    pub fn new(
        action_id: String,
        name: String,
        version: String,
        artifact: ArtifactRef,
        bundle_path: PathBuf,
        phase: Phase,
    ) -> Self {
        Self {
            action_id,
            href: String::new(),
            name,
            version,
            artifact,
            download_only: false,
            phase,
            bundle_path,
            previous_slot: String::new(),
            previous_version: String::new(),
            target_slot: String::new(),
            install_started_at: 0,
            install_attempts: 0,
            install_boot_id: String::new(),
            boot_id: String::new(),
            reboots: 0,
            reboot_at: 0,
            verifying_since: 0,
            by_url: false,
            stream: false,
            stream_refused: false,
            report: None,
            local: false,
        }
    }

    /// Tests: action 7, os 2.0.0 from `url`, at `phase`, from slot A running 1.0.0.
    #[cfg(test)]
    pub(crate) fn sample(phase: Phase, url: &str, bundle_path: impl Into<PathBuf>) -> Self {
        let artifact = ArtifactRef {
            filename: "os.raucb".into(),
            url: url.into(),
            size: Some(1),
            sha256: None,
            sha1: None,
            md5: None,
        };
        Self {
            previous_slot: "A".into(),
            previous_version: "1.0.0".into(),
            ..Self::new(
                "7".into(),
                "os".into(),
                "2.0.0".into(),
                artifact,
                bundle_path.into(),
                phase,
            )
        }
    }
}

/// The distribution set a local install put on the device, as hawkBit's `PUT installedBase`
/// takes it (`DdiAssignedVersion`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstalledBase {
    pub name: String,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Last {
    pub action_id: String,
    pub report: Report,
}
