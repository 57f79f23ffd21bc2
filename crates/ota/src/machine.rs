//! The update engine's decisions, without I/O.
//!
//! The driver ([`crate::engine`]) reads what the decision needs (the persisted [`Deployment`],
//! the boot id, RAUC's slots, the server's answer, the time), calls one function here and does
//! what it returns: persist, call RAUC, reboot, report. Everything that must never be wrong is
//! decided here and table-tested:
//!
//! - an install is started at most [`MAX_INSTALL_ATTEMPTS`] times, and never again once RAUC
//!   completed the slot ([`install_resume`]);
//! - a reboot that did not happen is retried after [`REBOOT_GRACE_SECS`], a bounded number of
//!   times ([`after_reboot`], [`after_rollback`]);
//! - the bootloader falling back to the old slot is a failure, reported as a rollback;
//! - a cancel is accepted only before the install started ([`on_cancel`]);
//! - a final report is dropped only when the server refuses it for good ([`after_report`]).
//!
//! Times are Unix seconds passed in; nothing here reads a clock or a file.

use crate::ddi_client::DdiError;
use crate::rauc::Slot;
use crate::state::{Deployment, Phase};

/// `InstallBundle` calls for one action when power cuts keep interrupting them.
pub const MAX_INSTALL_ATTEMPTS: u32 = 3;
/// How long a reboot command may take to bring the system down before it is run again.
pub const REBOOT_GRACE_SECS: i64 = 120;
/// Reboot commands run for one action before the agent says the command does not work.
pub const MAX_REBOOTS: u32 = 3;
/// Reboots, counting the one into the new slot, before a rollback is declared stuck.
pub const MAX_ROLLBACK_REBOOTS: u32 = 6;

/// The OTA status the engine shows (`ota_status` in the device state and its telemetry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtaStatus {
    Idle,
    Downloading,
    Installing,
    Rebooting,
    Verifying,
    Failed,
    Success,
}

impl OtaStatus {
    /// The wire name (device state, telemetry attribute `ota_status`).
    pub fn as_str(self) -> &'static str {
        match self {
            OtaStatus::Idle => "idle",
            OtaStatus::Downloading => "downloading",
            OtaStatus::Installing => "installing",
            OtaStatus::Rebooting => "rebooting",
            OtaStatus::Verifying => "verifying",
            OtaStatus::Failed => "failed",
            OtaStatus::Success => "success",
        }
    }
}

/// The running system at one moment: which boot, which slot, what time.
#[derive(Debug, Clone, Copy)]
pub struct Now<'a> {
    /// The kernel's boot id: it changes with every boot, power cut included.
    pub boot_id: &'a str,
    /// The boot name of the slot RAUC says is booted.
    pub booted: &'a str,
    /// Unix seconds.
    pub unix: i64,
}

/// A deployment the server offers, against what is here.
#[derive(Debug, PartialEq, Eq)]
pub enum OnDeployment {
    /// New: check its shape, persist it, accept it.
    Start,
    /// Reported final already (the server did not get it): send that report again.
    ResendLast,
    /// The action in flight: only its maintenance window may have changed (refresh its link
    /// while it waits for the window).
    Same { refresh_window: bool },
    /// Another action while one is in flight: finish the current one first.
    FinishCurrent,
}

/// `last_reported`: the action whose final report was last sent (`ota/last.json`).
pub fn on_deployment(
    current: Option<&Deployment>,
    last_reported: Option<&str>,
    offered: &str,
) -> OnDeployment {
    match current {
        Some(d) if d.action_id == offered => OnDeployment::Same {
            refresh_window: d.phase == Phase::Downloaded,
        },
        Some(_) => OnDeployment::FinishCurrent,
        None if last_reported == Some(offered) => OnDeployment::ResendLast,
        None => OnDeployment::Start,
    }
}

/// The server's `cancelAction` for `stop_id`.
#[derive(Debug, PartialEq, Eq)]
pub enum OnCancel {
    /// Close it as canceled; `discard` the local action and its bundle when it is the one here.
    Accept { discard: bool },
    /// Refuse: RAUC may already be writing the slot, or the new slot is booting.
    Reject { phase: Phase },
}

pub fn on_cancel(current: Option<&Deployment>, stop_id: &str) -> OnCancel {
    match current {
        Some(d) if d.action_id == stop_id => match d.phase {
            Phase::Downloading | Phase::Downloaded => OnCancel::Accept { discard: true },
            phase => OnCancel::Reject { phase },
        },
        // Nothing of it here (never started, or already over): nothing to stop.
        _ => OnCancel::Accept { discard: false },
    }
}

/// What the server says about the maintenance window, asked again after the download.
#[derive(Debug)]
pub enum Window {
    /// `maintenanceWindow: unavailable`: install later.
    Closed,
    /// Install now.
    Open,
    /// `update: skip` with the window open: the action was download-only all along.
    DownloadOnly,
    /// 404 or 410: the action is gone on the server.
    Vanished(String),
    /// Not known (transport error, server busy).
    Unknown(String),
}

#[derive(Debug, PartialEq, Eq)]
pub enum AfterDownload {
    /// Ask the server about the window, then decide again with its answer.
    AskWindow,
    /// Tell the server the device waits for the window; ask again at the next poll.
    WaitForWindow,
    /// Report `downloaded`, success: the action ends here.
    DownloadOnly,
    /// Ask again at the next poll.
    Retry(String),
    Fail(String),
    /// Persist `Installing` (with the time), then install.
    Install,
}

/// `window`: the server's answer, `None` before it was asked.
pub fn after_download(d: &Deployment, window: Option<Window>) -> AfterDownload {
    if d.download_only {
        return AfterDownload::DownloadOnly;
    }
    // A local install has no server, hence no window: the user asked for it now.
    if d.local {
        return AfterDownload::Install;
    }
    match window {
        None => AfterDownload::AskWindow,
        Some(Window::Closed) => AfterDownload::WaitForWindow,
        Some(Window::Open) => AfterDownload::Install,
        Some(Window::DownloadOnly) => AfterDownload::DownloadOnly,
        Some(Window::Vanished(m)) => {
            AfterDownload::Fail(format!("action vanished on the server: {m}"))
        }
        Some(Window::Unknown(e)) => AfterDownload::Retry(e),
    }
}

/// What RAUC shows when an action in `Installing` is taken up again.
#[derive(Debug, Clone, Copy)]
pub struct InstallFacts<'a> {
    /// The install marker names this action: an earlier run called (or was about to call)
    /// `InstallBundle` for it.
    pub called: bool,
    /// RAUC's slots; `None` when they could not be read.
    pub slots: Option<&'a [Slot]>,
    /// The slot RAUC made primary, when it says.
    pub primary: Option<&'a str>,
    /// RAUC's `LastError`, for the report when the install is given up.
    pub last_error: &'a str,
}

#[derive(Debug, PartialEq, Eq)]
pub enum InstallResume {
    /// Count an attempt, persist it with the boot id, then call `InstallBundle`. `cause`: why
    /// an earlier attempt is repeated (for the log), `None` for the first.
    Install {
        cause: Option<&'static str>,
    },
    /// The earlier attempt completed: the slot with this boot name is the target.
    Completed {
        target: String,
    },
    /// Ask RAUC again at the next poll (its slots could not be read).
    Wait(String),
    Fail(String),
}

/// `Installing` after a restart (or for the first time): install, or take the outcome of the
/// install an earlier run started. Never a second `InstallBundle` for a slot RAUC completed,
/// never one without counting it.
pub fn install_resume(d: &Deployment, facts: &InstallFacts<'_>, now: &Now<'_>) -> InstallResume {
    if !facts.called {
        return InstallResume::Install { cause: None };
    }
    let Some(slots) = facts.slots else {
        return InstallResume::Wait(
            "cannot read RAUC's slot status to learn whether the earlier install completed".into(),
        );
    };
    // Completed by the earlier run: not booted, made primary, good, and written after the
    // install started.
    let fresh = slots.iter().find(|s| {
        s.bootname != now.booted
            && Some(s.name.as_str()) == facts.primary
            && s.status == "ok"
            && timestamp_after(&s.installed_timestamp, d.install_started_at)
    });
    if let Some(s) = fresh {
        return InstallResume::Completed {
            target: s.bootname.clone(),
        };
    }
    if d.install_attempts < MAX_INSTALL_ATTEMPTS {
        // RAUC is idle and no slot was completed: either a power cut took RAUC down with the
        // install, or the agent died between counting the attempt and calling InstallBundle.
        // Either way the bundle on disk is complete and verified and the half-written slot was
        // never activated: install again (bounded).
        let cause = if d.install_boot_id != now.boot_id {
            "cut short by a reboot or power cut"
        } else {
            "cut short by an agent restart"
        };
        return InstallResume::Install { cause: Some(cause) };
    }
    let why = if facts.last_error.is_empty() {
        String::new()
    } else {
        format!(": RAUC says {}", facts.last_error)
    };
    InstallResume::Fail(format!(
        "installation did not complete in {} attempts (each cut short by a restart or power cut){why}; the new slot is not complete, the device stays on its current slot",
        d.install_attempts
    ))
}

#[derive(Debug, PartialEq, Eq)]
pub enum AfterReboot {
    /// The reboot may still be under way: ask again at the next poll.
    Wait,
    /// The device did not reboot: run the reboot command again.
    RebootAgain,
    /// Running the new slot: persist `Verifying`, then the health checks.
    Verify,
    /// The bootloader booted the old slot: take the new one out of the boot order, report.
    FellBack(String),
    Fail(String),
}

/// `Rebooting`: did the device come up on the new slot? `reboot_command`: for the report.
pub fn after_reboot(d: &Deployment, now: &Now<'_>, reboot_command: &str) -> AfterReboot {
    let rebooted = now.boot_id != d.boot_id || now.booted != d.previous_slot;
    if !rebooted {
        if now.unix - d.reboot_at < REBOOT_GRACE_SECS {
            return AfterReboot::Wait;
        }
        if d.reboots >= MAX_REBOOTS {
            return AfterReboot::Fail(format!(
                "the reboot command ({reboot_command}) did not reboot the device ({} tries)",
                d.reboots
            ));
        }
        return AfterReboot::RebootAgain;
    }
    if now.booted == d.target_slot || (d.target_slot.is_empty() && now.booted != d.previous_slot) {
        return AfterReboot::Verify;
    }
    AfterReboot::FellBack(format!(
        "rolled back: booted slot {} again instead of {} (the new slot failed to boot); still running {}",
        now.booted, d.target_slot, d.previous_version
    ))
}

#[derive(Debug, PartialEq, Eq)]
pub enum Health {
    /// Mark the slot good, then report success.
    Good,
    /// Check again shortly.
    Pending,
    /// The deadline passed: mark the slot bad, reboot into the previous one.
    Failed,
}

/// The health checks' verdict at `now` against the deadline of the verification.
pub fn health(passed: bool, now: i64, deadline: i64) -> Health {
    match (passed, now >= deadline) {
        (true, _) => Health::Good,
        (false, false) => Health::Pending,
        (false, true) => Health::Failed,
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum AfterRollback {
    Wait,
    RebootAgain,
    /// Back on the previous slot: mark it good again, report the failure (`detail`).
    Back(String),
    Fail(String),
}

/// `RollingBack`: the health checks failed and the device reboots into the previous slot.
pub fn after_rollback(d: &Deployment, now: &Now<'_>) -> AfterRollback {
    let detail = d.report.as_ref().and_then(|r| r.details.first().cloned());
    if now.booted == d.previous_slot {
        return AfterRollback::Back(
            detail.unwrap_or_else(|| "health checks failed; rolled back".into()),
        );
    }
    if now.boot_id == d.boot_id && now.unix - d.reboot_at < REBOOT_GRACE_SECS {
        return AfterRollback::Wait;
    }
    if d.reboots >= MAX_ROLLBACK_REBOOTS {
        return AfterRollback::Fail(format!(
            "{}; the device did not get back to slot {} ({} reboots)",
            detail.unwrap_or_default(),
            d.previous_slot,
            d.reboots
        ));
    }
    AfterRollback::RebootAgain
}

#[derive(Debug, PartialEq, Eq)]
pub enum AfterReport {
    /// The server has it: remember it, clear the action.
    Sent,
    /// Refused for good (4xx other than 410): drop it, say so.
    Refused,
    /// Send it again at the next poll.
    Retry,
}

/// The final report's fate. 410: the server already has a final state for the action (this
/// report, or its own cancel).
pub fn after_report(result: Result<(), &DdiError>) -> AfterReport {
    match result {
        Ok(()) | Err(DdiError::Status(410, _)) => AfterReport::Sent,
        Err(DdiError::Status(s, _)) if (400..500).contains(s) => AfterReport::Refused,
        Err(_) => AfterReport::Retry,
    }
}

/// Mark the booted slot good at start (`ota.mark_good_on_boot`), once per boot: bootloaders
/// driven by RAUC count every boot of a slot as an attempt until it is marked good. Not while
/// an update waits for its verdict (then the engine decides: good after the health checks, or
/// bad and back).
pub fn mark_good_on_boot(marked_boot: Option<&str>, boot_id: &str, phase: Option<Phase>) -> bool {
    if marked_boot == Some(boot_id) {
        return false;
    }
    !matches!(
        phase,
        Some(Phase::Rebooting | Phase::Verifying | Phase::RollingBack)
    )
}

/// RAUC's `installed.timestamp` (ISO 8601 UTC) at or after `unix` (one second of slack: RAUC
/// writes whole seconds).
pub fn timestamp_after(ts: &str, unix: i64) -> bool {
    time::OffsetDateTime::parse(ts, &time::format_description::well_known::Iso8601::DEFAULT)
        .map(|t| t.unix_timestamp() >= unix - 1)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Report;
    use thingsly_proto::ddi::{Execution, Finished};

    /// An action at `phase`, from slot A (1.0.0) to slot B, installing since T.
    const T: i64 = 1_795_428_000; // 2026-11-23T10:00:00Z
    fn action(phase: Phase) -> Deployment {
        Deployment {
            href: "https://ddi/deploymentBase/7".into(),
            target_slot: "B".into(),
            install_started_at: T,
            install_attempts: 1,
            install_boot_id: "boot-1".into(),
            boot_id: "boot-1".into(),
            reboots: 1,
            reboot_at: T + 60,
            ..Deployment::sample(phase, "https://ddi/os.raucb", "/data/ota/os.raucb")
        }
    }
    fn now<'a>(boot_id: &'a str, booted: &'a str, unix: i64) -> Now<'a> {
        Now {
            boot_id,
            booted,
            unix,
        }
    }
    fn slot(name: &str, bootname: &str, status: &str, installed: &str) -> Slot {
        Slot {
            name: name.into(),
            bootname: bootname.into(),
            status: status.into(),
            installed_timestamp: installed.into(),
            ..Slot::default()
        }
    }

    #[test]
    fn ota_status_wire_names() {
        use OtaStatus::*;
        let names: Vec<_> = [
            Idle,
            Downloading,
            Installing,
            Rebooting,
            Verifying,
            Failed,
            Success,
        ]
        .map(OtaStatus::as_str)
        .into();
        assert_eq!(
            names,
            [
                "idle",
                "downloading",
                "installing",
                "rebooting",
                "verifying",
                "failed",
                "success"
            ]
        );
    }

    #[test]
    fn an_offered_deployment_against_what_is_here() {
        let downloading = action(Phase::Downloading);
        let downloaded = action(Phase::Downloaded);
        let cases: &[(Option<&Deployment>, Option<&str>, &str, OnDeployment)] = &[
            (None, None, "7", OnDeployment::Start),
            (None, Some("6"), "7", OnDeployment::Start),
            (None, Some("7"), "7", OnDeployment::ResendLast),
            (
                Some(&downloading),
                None,
                "7",
                OnDeployment::Same {
                    refresh_window: false,
                },
            ),
            (
                Some(&downloaded),
                Some("7"),
                "7",
                OnDeployment::Same {
                    refresh_window: true,
                },
            ),
            (Some(&downloading), None, "8", OnDeployment::FinishCurrent),
        ];
        for (current, last, offered, want) in cases {
            assert_eq!(
                &on_deployment(*current, *last, offered),
                want,
                "{offered} with {:?}",
                current.map(|d| d.phase)
            );
        }
    }

    #[test]
    fn cancel_in_each_phase() {
        use Phase::*;
        for phase in [Downloading, Downloaded] {
            assert_eq!(
                on_cancel(Some(&action(phase)), "7"),
                OnCancel::Accept { discard: true },
                "{phase:?}"
            );
        }
        for phase in [
            Installing,
            Installed,
            Rebooting,
            Verifying,
            RollingBack,
            Reporting,
        ] {
            assert_eq!(
                on_cancel(Some(&action(phase)), "7"),
                OnCancel::Reject { phase },
                "{phase:?}"
            );
        }
        // Another action's cancel, or none here: accepted, nothing local touched.
        assert_eq!(
            on_cancel(Some(&action(Installing)), "6"),
            OnCancel::Accept { discard: false }
        );
        assert_eq!(on_cancel(None, "6"), OnCancel::Accept { discard: false });
    }

    #[test]
    fn after_the_download_the_window_decides() {
        let d = action(Phase::Downloaded);
        assert_eq!(after_download(&d, None), AfterDownload::AskWindow);
        assert_eq!(
            after_download(&d, Some(Window::Closed)),
            AfterDownload::WaitForWindow
        );
        assert_eq!(
            after_download(&d, Some(Window::Open)),
            AfterDownload::Install
        );
        assert_eq!(
            after_download(&d, Some(Window::DownloadOnly)),
            AfterDownload::DownloadOnly
        );
        assert_eq!(
            after_download(&d, Some(Window::Vanished("410 gone".into()))),
            AfterDownload::Fail("action vanished on the server: 410 gone".into())
        );
        assert_eq!(
            after_download(&d, Some(Window::Unknown("timeout".into()))),
            AfterDownload::Retry("timeout".into())
        );
    }

    #[test]
    fn a_local_install_asks_no_server_for_a_window() {
        let mut d = action(Phase::Downloaded);
        d.local = true;
        assert_eq!(after_download(&d, None), AfterDownload::Install);
    }

    #[test]
    fn a_download_only_action_ends_without_asking_for_the_window() {
        let mut d = action(Phase::Downloaded);
        d.download_only = true;
        assert_eq!(after_download(&d, None), AfterDownload::DownloadOnly);
        assert_eq!(
            after_download(&d, Some(Window::Open)),
            AfterDownload::DownloadOnly
        );
    }

    #[test]
    fn installing_taken_up_after_a_kill_or_power_cut() {
        let b_done = [
            slot("rootfs.0", "A", "ok", "2026-11-20T10:00:00Z"),
            slot("rootfs.1", "B", "ok", "2026-11-23T10:05:00Z"),
        ];
        let b_old = [
            slot("rootfs.0", "A", "ok", "2026-11-20T10:00:00Z"),
            slot("rootfs.1", "B", "ok", "2026-11-01T10:00:00Z"),
        ];
        fn facts<'a>(
            called: bool,
            slots: Option<&'a [Slot]>,
            primary: Option<&'a str>,
        ) -> InstallFacts<'a> {
            InstallFacts {
                called,
                slots,
                primary,
                last_error: "",
            }
        }
        let (done, old) = (&b_done[..], &b_old[..]);
        let d = action(Phase::Installing);
        let same_boot = now("boot-1", "A", T + 30);
        let new_boot = now("boot-2", "A", T + 30);
        let cases: &[(&str, InstallFacts<'_>, Now<'_>, InstallResume)] = &[
            (
                "killed before InstallBundle was marked: the first install",
                facts(false, Some(done), Some("rootfs.1")),
                same_boot,
                InstallResume::Install { cause: None },
            ),
            (
                "the earlier install completed (B primary, ok, written after the start)",
                facts(true, Some(done), Some("rootfs.1")),
                new_boot,
                InstallResume::Completed { target: "B".into() },
            ),
            (
                "B complete but not primary: not this install's",
                facts(true, Some(done), Some("rootfs.0")),
                same_boot,
                InstallResume::Install {
                    cause: Some("cut short by an agent restart"),
                },
            ),
            (
                "B written before this install started: a power cut cut it short",
                facts(true, Some(old), Some("rootfs.1")),
                new_boot,
                InstallResume::Install {
                    cause: Some("cut short by a reboot or power cut"),
                },
            ),
            (
                "RAUC's slots unreadable: wait, never install uncounted",
                facts(true, None, Some("rootfs.1")),
                same_boot,
                InstallResume::Wait(
                    "cannot read RAUC's slot status to learn whether the earlier install completed"
                        .into(),
                ),
            ),
        ];
        for (what, f, n, want) in cases {
            assert_eq!(&install_resume(&d, f, n), want, "{what}");
        }
    }

    #[test]
    fn installs_cut_short_are_repeated_a_bounded_number_of_times() {
        let mut d = action(Phase::Installing);
        d.install_attempts = MAX_INSTALL_ATTEMPTS;
        let f = InstallFacts {
            called: true,
            slots: Some(&[]),
            primary: None,
            last_error: "Failed mounting bundle",
        };
        assert_eq!(
            install_resume(&d, &f, &now("boot-4", "A", T)),
            InstallResume::Fail(
                "installation did not complete in 3 attempts (each cut short by a restart or power cut): RAUC says Failed mounting bundle; the new slot is not complete, the device stays on its current slot".into()
            )
        );
        // Even at the bound, a completed slot is taken, not failed.
        let done = [slot("rootfs.1", "B", "ok", "2026-11-23T10:05:00Z")];
        let f = InstallFacts {
            slots: Some(&done),
            primary: Some("rootfs.1"),
            ..f
        };
        assert_eq!(
            install_resume(&d, &f, &now("boot-4", "A", T)),
            InstallResume::Completed { target: "B".into() }
        );
    }

    #[test]
    fn after_the_reboot_command() {
        let d = action(Phase::Rebooting); // reboot command ran at T+60 in boot-1, once
        let cmd = r#"["systemctl", "reboot"]"#;
        let cases: &[(&str, Now<'_>, AfterReboot)] = &[
            (
                "killed right after the command, same boot, within the grace",
                now("boot-1", "A", T + 100),
                AfterReboot::Wait,
            ),
            (
                "no reboot after the grace: run the command again",
                now("boot-1", "A", T + 60 + REBOOT_GRACE_SECS),
                AfterReboot::RebootAgain,
            ),
            (
                "booted B",
                now("boot-2", "B", T + 200),
                AfterReboot::Verify,
            ),
            (
                "bootloader fallback: a new boot, still A",
                now("boot-2", "A", T + 200),
                AfterReboot::FellBack(
                    "rolled back: booted slot A again instead of B (the new slot failed to boot); still running 1.0.0"
                        .into(),
                ),
            ),
        ];
        for (what, n, want) in cases {
            assert_eq!(&after_reboot(&d, n, cmd), want, "{what}");
        }
        // The target slot's name lost (installed, but GetPrimary failed): any other slot is it.
        let mut unknown = d.clone();
        unknown.target_slot.clear();
        assert_eq!(
            after_reboot(&unknown, &now("boot-2", "B", T + 200), cmd),
            AfterReboot::Verify
        );
        assert_eq!(
            after_reboot(&unknown, &now("boot-1", "A", T + 100), cmd),
            AfterReboot::Wait
        );
        // A command that never reboots fails the action after MAX_REBOOTS tries.
        let mut stuck = d.clone();
        stuck.reboots = MAX_REBOOTS;
        assert_eq!(
            after_reboot(&stuck, &now("boot-1", "A", T + 1000), cmd),
            AfterReboot::Fail(
                r#"the reboot command (["systemctl", "reboot"]) did not reboot the device (3 tries)"#
                    .into()
            )
        );
    }

    #[test]
    fn health_checks_against_their_deadline() {
        assert_eq!(health(true, T, T + 300), Health::Good);
        assert_eq!(health(true, T + 400, T + 300), Health::Good);
        assert_eq!(health(false, T, T + 300), Health::Pending);
        assert_eq!(health(false, T + 300, T + 300), Health::Failed);
    }

    #[test]
    fn after_a_failed_health_check_the_device_gets_back() {
        let mut d = action(Phase::RollingBack);
        d.report = Some(Report {
            execution: Execution::Closed,
            finished: Finished::Failure,
            details: vec!["health checks failed on slot B".into()],
        });
        d.boot_id = "boot-2".into(); // the rollback's reboot ran in boot-2 (on B) at T+60
        d.reboots = 2;
        let cases: &[(&str, Now<'_>, AfterRollback)] = &[
            (
                "back on A",
                now("boot-3", "A", T + 200),
                AfterRollback::Back("health checks failed on slot B".into()),
            ),
            (
                "still B, same boot, within the grace",
                now("boot-2", "B", T + 100),
                AfterRollback::Wait,
            ),
            (
                "still B after the grace",
                now("boot-2", "B", T + 60 + REBOOT_GRACE_SECS),
                AfterRollback::RebootAgain,
            ),
            (
                "B again on a new boot (the bootloader kept it)",
                now("boot-3", "B", T + 100),
                AfterRollback::RebootAgain,
            ),
        ];
        for (what, n, want) in cases {
            assert_eq!(&after_rollback(&d, n), want, "{what}");
        }
        d.reboots = MAX_ROLLBACK_REBOOTS;
        assert_eq!(
            after_rollback(&d, &now("boot-9", "B", T + 900)),
            AfterRollback::Fail(
                "health checks failed on slot B; the device did not get back to slot A (6 reboots)"
                    .into()
            )
        );
        // The detail lost: still a failure, said plainly.
        d.report = None;
        assert_eq!(
            after_rollback(&d, &now("boot-9", "A", T + 900)),
            AfterRollback::Back("health checks failed; rolled back".into())
        );
    }

    #[test]
    fn the_final_report_is_dropped_only_when_refused_for_good() {
        let cases: &[(Result<(), DdiError>, AfterReport)] = &[
            (Ok(()), AfterReport::Sent),
            (Err(DdiError::Status(410, "gone".into())), AfterReport::Sent),
            (
                Err(DdiError::Status(404, "no such action".into())),
                AfterReport::Refused,
            ),
            (
                Err(DdiError::Status(400, "bad".into())),
                AfterReport::Refused,
            ),
            (
                Err(DdiError::Status(500, "oops".into())),
                AfterReport::Retry,
            ),
            (
                Err(DdiError::Throttled {
                    status: 429,
                    retry_after: None,
                    message: "busy".into(),
                }),
                AfterReport::Retry,
            ),
            (Err(DdiError::Transport("reset".into())), AfterReport::Retry),
            (Err(DdiError::Malformed("?".into())), AfterReport::Retry),
        ];
        for (result, want) in cases {
            assert_eq!(
                &after_report(result.as_ref().map(|_| ())),
                want,
                "{result:?}"
            );
        }
    }

    #[test]
    fn the_booted_slot_is_marked_good_once_per_boot_and_not_during_a_verdict() {
        use Phase::*;
        assert!(mark_good_on_boot(None, "boot-1", None));
        assert!(mark_good_on_boot(Some("boot-0"), "boot-1", None));
        assert!(!mark_good_on_boot(Some("boot-1"), "boot-1", None));
        for phase in [Downloading, Downloaded, Installing, Installed, Reporting] {
            assert!(mark_good_on_boot(None, "boot-1", Some(phase)), "{phase:?}");
        }
        for phase in [Rebooting, Verifying, RollingBack] {
            assert!(!mark_good_on_boot(None, "boot-1", Some(phase)), "{phase:?}");
        }
    }

    #[test]
    fn rauc_timestamps_compare_to_the_install_start() {
        assert!(timestamp_after("2026-11-23T10:00:05Z", T));
        assert!(
            timestamp_after("2026-11-23T09:59:59Z", T),
            "one second of slack"
        );
        assert!(!timestamp_after("2026-11-23T09:00:00Z", T));
        assert!(!timestamp_after("", 0));
    }
}
