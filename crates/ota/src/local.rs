//! `thingsly-agent install BUNDLE`: an update without a server action (a USB stick, a
//! service laptop). It is handed to the running agent as a local action in
//! `ota/deployment.json`, so it goes through the same persisted state machine as a server's:
//! install, reboot, health checks, mark good, or back to the old slot. The server learns what
//! the device runs at the next poll (`PUT installedBase`, and configData's `sw_version`).
//!
//! - Refused while another action is in flight: the file is created only if absent (a hard link
//!   of a complete temporary file), so a server action that arrives at the same moment and
//!   this one cannot overwrite each other.
//! - The file belongs to the state directory's owner (the agent runs as `thingsly`; this
//!   command usually as root).
//! - The running agent is woken with SIGUSR1; without one, the agent takes it up when it starts.

use crate::rauc::{Installer, Rauc};
use crate::state::{ArtifactRef, DEPLOYMENT, Deployment, Phase};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What the command asks for; `name` and `version` default to the bundle's RAUC compatible
/// and version.
pub struct LocalInstall {
    pub bundle: PathBuf,
    pub name: Option<String>,
    pub version: Option<String>,
}

/// Hands the install to the agent; returns what to tell the user.
pub async fn hand_over(
    req: &LocalInstall,
    state_dir: &Path,
    runtime_dir: &Path,
) -> Result<String, String> {
    let bundle =
        std::fs::canonicalize(&req.bundle).map_err(|e| format!("{}: {e}", req.bundle.display()))?;
    let meta = std::fs::metadata(&bundle).map_err(|e| format!("{}: {e}", bundle.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a file", bundle.display()));
    }
    let rauc = Rauc::connect().await?;
    // RAUC checks the signature when it installs; its compatible is checked here already, so a
    // bundle for another board is refused before anything is persisted.
    let (compatible, bundle_version) = rauc.info(&bundle.display().to_string()).await?;
    let system = rauc.compatible().await?;
    if compatible != system {
        return Err(format!(
            "{} is for {compatible:?}, this system is {system:?}",
            bundle.display()
        ));
    }
    let booted = rauc.boot_slot().await?;
    let daemon = Daemon::read(runtime_dir);
    let unix = time::OffsetDateTime::now_utc().unix_timestamp();
    let artifact = ArtifactRef {
        filename: bundle
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
        url: bundle.display().to_string(),
        size: Some(meta.len()),
        sha256: None,
        sha1: None,
        md5: None,
    };
    let d = Deployment {
        previous_slot: booted,
        previous_version: daemon
            .as_ref()
            .map(|d| d.sw_version.clone())
            .unwrap_or_default(),
        local: true,
        ..Deployment::new(
            format!("local-{unix}"),
            req.name.clone().unwrap_or(compatible),
            req.version.clone().unwrap_or(bundle_version),
            artifact,
            bundle.clone(),
            Phase::Downloaded,
        )
    };
    create_exclusive(state_dir, &d)?;
    let what = format!("{} {} ({})", d.name, d.version, bundle.display());
    Ok(match daemon {
        Some(daemon) => {
            rustix::process::kill_process(daemon.pid, rustix::process::Signal::USR1).map_err(
                |e| format!("handed over {what}, but the agent (pid {}) could not be woken: {e}; it installs at its next poll", daemon.pid.as_raw_nonzero()),
            )?;
            format!(
                "handed {what} to the agent (pid {}); `thingsly-agent status` follows it",
                daemon.pid.as_raw_nonzero()
            )
        }
        None => format!("the agent is not running: it installs {what} when it starts"),
    })
}

/// Writes `d` as `ota/deployment.json` only if there is none, owned like the state directory.
///
/// This runs as root in a directory the agent's user owns, so nothing here follows a path that
/// user could swap for a symlink between two calls: the directory is opened once (no symlink),
/// and the file is created, owned, linked and removed relative to that descriptor.
fn create_exclusive(state_dir: &Path, d: &Deployment) -> Result<(), String> {
    use rustix::fs::{AtFlags, Mode, OFlags};
    let io = |what: &Path, e: rustix::io::Errno| format!("{}: {e}", what.display());
    let owner =
        std::fs::metadata(state_dir).map_err(|e| format!("{}: {e}", state_dir.display()))?;
    let uid = Some(rustix::fs::Uid::from_raw(owner.uid()));
    let gid = Some(rustix::fs::Gid::from_raw(owner.gid()));
    let dest = state_dir.join(DEPLOYMENT);
    let dir = dest.parent().unwrap_or(state_dir);
    let name = dest.file_name().unwrap_or_default();
    let created = match std::fs::create_dir(dir) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    };
    let dfd = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io(dir, e))?;
    if created {
        rustix::fs::fchown(&dfd, uid, gid).map_err(|e| io(dir, e))?;
        rustix::fs::fchmod(&dfd, Mode::from_raw_mode(0o700)).map_err(|e| io(dir, e))?;
    }
    if let Some(current) = read_current(&dest) {
        return Err(current);
    }
    let tmp = format!(".local-install.{}", std::process::id());
    let body = serde_json::to_vec_pretty(d).map_err(|e| e.to_string())?;
    let write = || -> Result<(), rustix::io::Errno> {
        let fd = rustix::fs::openat(
            &dfd,
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        let mut f = std::fs::File::from(fd);
        use std::io::Write;
        f.write_all(&body)
            .map_err(|e| rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO))?;
        rustix::fs::fsync(&f)?;
        rustix::fs::fchown(&f, uid, gid)?;
        rustix::fs::linkat(&dfd, tmp.as_str(), &dfd, name, AtFlags::empty())
    };
    let result = write();
    let _ = rustix::fs::unlinkat(&dfd, tmp.as_str(), AtFlags::empty());
    match result {
        Ok(()) => {
            // The new directory entry survives a power cut.
            let _ = rustix::fs::fsync(&dfd);
            Ok(())
        }
        Err(rustix::io::Errno::EXIST) => {
            Err(read_current(&dest).unwrap_or_else(|| "another action is in flight".into()))
        }
        Err(e) => Err(io(&dest, e)),
    }
}

/// Why a new action cannot start: the one in flight, if any.
fn read_current(dest: &Path) -> Option<String> {
    let data = std::fs::read(dest).ok()?;
    let d: Deployment = serde_json::from_slice(&data).ok()?;
    Some(format!(
        "an update is in flight (action {}, {} {}, phase {:?}): wait until it is over",
        d.action_id, d.name, d.version, d.phase
    ))
}

/// The running agent, from its `status.json`: its pid (checked to be alive and to be the
/// agent) and the version it runs.
struct Daemon {
    pid: rustix::process::Pid,
    sw_version: String,
}

impl Daemon {
    fn read(runtime_dir: &Path) -> Option<Self> {
        let v = thingsly_core::device_state::daemon_status(runtime_dir)?;
        let raw = i32::try_from(v["pid"].as_u64()?).ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{raw}/comm")).ok()?;
        // A stale status.json whose pid now belongs to something else is not signalled.
        if !comm.trim().starts_with("thingsly-agent") {
            return None;
        }
        Some(Self {
            pid: rustix::process::Pid::from_raw(raw)?,
            sw_version: v["state"]["sw_version"].as_str().unwrap_or_default().into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(id: &str) -> Deployment {
        Deployment {
            action_id: id.into(),
            local: true,
            ..Deployment::sample(
                Phase::Downloaded,
                "/media/usb/os.raucb",
                "/media/usb/os.raucb",
            )
        }
    }

    #[test]
    fn a_local_action_is_created_only_when_none_is_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        create_exclusive(dir.path(), &local("local-1")).unwrap();
        let err = create_exclusive(dir.path(), &local("local-2")).unwrap_err();
        assert!(err.contains("action local-1"), "{err}");
        let kept: Deployment =
            serde_json::from_slice(&std::fs::read(dir.path().join(DEPLOYMENT)).unwrap()).unwrap();
        assert_eq!(kept.action_id, "local-1", "the first one is untouched");
        let mode = std::fs::metadata(dir.path().join(DEPLOYMENT))
            .unwrap()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("ota"))
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left: {leftovers:?}");
    }

    #[test]
    fn a_symlink_in_the_agents_directory_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "root's file").unwrap();
        // The agent's user plants the temporary name, and the directory itself as a link.
        std::fs::create_dir(dir.path().join("ota")).unwrap();
        let tmp = dir
            .path()
            .join(format!("ota/.local-install.{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        assert!(create_exclusive(dir.path(), &local("local-1")).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "root's file");
        assert!(!dir.path().join(DEPLOYMENT).exists());

        let other = tempfile::tempdir().unwrap();
        std::fs::create_dir(other.path().join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(other.path().join("elsewhere"), other.path().join("ota"))
            .unwrap();
        let err = create_exclusive(other.path(), &local("local-1")).unwrap_err();
        assert!(err.contains("ota"), "{err}");
        assert!(!other.path().join("elsewhere/deployment.json").exists());
    }

    #[test]
    fn a_stale_status_file_signals_nobody() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("status.json"),
            format!(
                r#"{{"pid": {}, "state": {{"sw_version": "1.0.0"}}}}"#,
                std::process::id()
            ),
        )
        .unwrap();
        // This test process is not thingsly-agent.
        assert!(Daemon::read(dir.path()).is_none());
        assert!(Daemon::read(&dir.path().join("missing")).is_none());
    }
}
