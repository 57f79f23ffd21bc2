//! The agent's state directory (default `/var/lib/thingsly-agent`, mode 0700).
//! Every write is atomic and durable: temp file in the same directory, fsync, rename, fsync the
//! directory. A file that fails to parse is moved aside (`NAME.corrupt-UNIXTIME`) and reported,
//! never silently replaced.

use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} could not be parsed ({reason}); moved aside to {moved_to}")]
    Corrupt {
        path: PathBuf,
        moved_to: PathBuf,
        reason: String,
    },
}

impl StateError {
    fn io(path: &Path, source: io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Out of space or quota: the caller should report it and retry later, not crash-loop.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.raw_os_error() == Some(28) || source.raw_os_error() == Some(122))
    }
}

#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

/// File mode for secrets.
pub const MODE_SECRET: u32 = 0o600;
/// File mode for public material (certificates, status).
pub const MODE_PUBLIC: u32 = 0o644;

impl StateDir {
    /// Open (creating if needed) the directory with mode 0700 and check it is writable.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StateError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(|e| StateError::io(&root, e))?;
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700))
            .map_err(|e| StateError::io(&root, e))?;
        let dir = Self { root };
        // A probe write proves the directory is usable before we say READY.
        dir.write_atomic(".probe", b"ok", MODE_PUBLIC)?;
        let _ = fs::remove_file(dir.root.join(".probe"));
        Ok(dir)
    }

    /// Use a directory without touching it (for read-only callers like `status`).
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Create a subdirectory (0700).
    pub fn subdir(&self, rel: &str) -> Result<PathBuf, StateError> {
        let p = self.root.join(rel);
        fs::create_dir_all(&p).map_err(|e| StateError::io(&p, e))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o700))
            .map_err(|e| StateError::io(&p, e))?;
        Ok(p)
    }

    pub fn exists(&self, rel: &str) -> bool {
        self.root.join(rel).exists()
    }

    /// Atomically replace `rel` with `data`, created with `mode` (never wider, whatever the umask).
    pub fn write_atomic(&self, rel: &str, data: &[u8], mode: u32) -> Result<(), StateError> {
        write_atomic(&self.root.join(rel), data, mode)
    }

    pub fn write_json<T: Serialize>(
        &self,
        rel: &str,
        value: &T,
        mode: u32,
    ) -> Result<(), StateError> {
        let mut data = serde_json::to_vec_pretty(value).map_err(|e| {
            StateError::io(
                &self.root.join(rel),
                io::Error::new(io::ErrorKind::InvalidData, e),
            )
        })?;
        data.push(b'\n');
        self.write_atomic(rel, &data, mode)
    }

    /// Read a file; `Ok(None)` when absent.
    pub fn read(&self, rel: &str) -> Result<Option<Vec<u8>>, StateError> {
        let p = self.root.join(rel);
        match fs::read(&p) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StateError::io(&p, e)),
        }
    }

    /// Read and parse with `parse`; on a parse failure the file is moved aside and
    /// [`StateError::Corrupt`] returned, so the caller reports it and starts from scratch.
    pub fn read_parsed<T>(
        &self,
        rel: &str,
        parse: impl FnOnce(&[u8]) -> Result<T, String>,
    ) -> Result<Option<T>, StateError> {
        let Some(data) = self.read(rel)? else {
            return Ok(None);
        };
        match parse(&data) {
            Ok(v) => Ok(Some(v)),
            Err(reason) => Err(self.move_aside(rel, reason)),
        }
    }

    pub fn read_json<T: DeserializeOwned>(&self, rel: &str) -> Result<Option<T>, StateError> {
        self.read_parsed(rel, |d| {
            serde_json::from_slice(d).map_err(|e| e.to_string())
        })
    }

    /// Move a bad file out of the way, keeping it for inspection.
    pub fn move_aside(&self, rel: &str, reason: String) -> StateError {
        let path = self.root.join(rel);
        let ts = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut moved_to = PathBuf::from(format!("{}.corrupt-{ts}", path.display()));
        let mut n = 1;
        while moved_to.exists() {
            moved_to = PathBuf::from(format!("{}.corrupt-{ts}-{n}", path.display()));
            n += 1;
        }
        if let Err(e) = fs::rename(&path, &moved_to) {
            return StateError::io(&path, e);
        }
        if let Some(parent) = path.parent() {
            let _ = fsync_dir(parent);
        }
        tracing::error!(file = %path.display(), moved_to = %moved_to.display(), %reason, "state file corrupt, moved aside");
        StateError::Corrupt {
            path,
            moved_to,
            reason,
        }
    }

    pub fn remove(&self, rel: &str) -> Result<(), StateError> {
        let p = self.root.join(rel);
        match fs::remove_file(&p) {
            Ok(()) => {
                if let Some(parent) = p.parent() {
                    fsync_dir(parent).map_err(|e| StateError::io(parent, e))?;
                }
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StateError::io(&p, e)),
        }
    }
}

/// Temp file, fsync, rename, fsync the directory. The temp file is removed on failure so a full
/// disk leaves only the previous, intact version.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), StateError> {
    // A bare file name ("server.pem") has the parent "", which is the current directory.
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !dir.exists() {
        fs::create_dir_all(dir).map_err(|e| StateError::io(dir, e))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| StateError::io(dir, e))?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // The mode given to open() is filtered by the umask; set it explicitly.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        fsync_dir(dir)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(StateError::io(path, e));
    }
    Ok(())
}

pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_sets_mode_and_replaces() {
        let t = tempfile::tempdir().unwrap();
        let d = StateDir::open(t.path().join("state")).unwrap();
        assert_eq!(
            fs::metadata(d.root()).unwrap().permissions().mode() & 0o777,
            0o700
        );
        d.write_atomic("identity/device.key", b"one", MODE_SECRET)
            .unwrap();
        d.write_atomic("identity/device.key", b"two", MODE_SECRET)
            .unwrap();
        let p = d.path("identity/device.key");
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // no temp files left behind
        let names: Vec<_> = fs::read_dir(d.path("identity")).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn corrupt_file_is_moved_aside_not_replaced() {
        let t = tempfile::tempdir().unwrap();
        let d = StateDir::open(t.path()).unwrap();
        d.write_atomic("x.json", b"{not json", MODE_PUBLIC).unwrap();
        let err = d.read_json::<serde_json::Value>("x.json").unwrap_err();
        match err {
            StateError::Corrupt { moved_to, .. } => {
                assert_eq!(fs::read(&moved_to).unwrap(), b"{not json");
            }
            other => panic!("unexpected {other}"),
        }
        assert!(!d.exists("x.json"));
        assert!(
            d.read_json::<serde_json::Value>("x.json")
                .unwrap()
                .is_none()
        );
    }
}
