//! Streams a bundle to the data partition, hashing while it writes; resumes with `Range`
//! after a cut (the partial file survives a power cut); verifies sha256 (or sha1/md5 when that
//! is all the server gives) before the file is renamed into place.

use crate::ddi_client::{DdiClient, DdiError};
use crate::rate_limit::TokenBucket;
use crate::state::ArtifactRef;
use sha2::Digest;
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;

#[derive(Debug)]
pub enum DownloadError {
    /// Worth another attempt (cut, timeout, 5xx).
    Retry(String),
    /// Final: 4xx, hash mismatch, no space, bad link.
    Fatal(String),
}

impl std::fmt::Display for DownloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DownloadError::Retry(m) | DownloadError::Fatal(m) => f.write_str(m),
        }
    }
}

/// The hash to verify: the strongest the server gave.
enum Expected {
    Sha256(String),
    Sha1(String),
    Md5(String),
}

fn expected(a: &ArtifactRef) -> Option<Expected> {
    let norm = |s: &String| s.trim().to_ascii_lowercase();
    a.sha256
        .as_ref()
        .map(|s| Expected::Sha256(norm(s)))
        .or_else(|| a.sha1.as_ref().map(|s| Expected::Sha1(norm(s))))
        .or_else(|| a.md5.as_ref().map(|s| Expected::Md5(norm(s))))
}

enum Hasher {
    Sha256(sha2::Sha256),
    Sha1(sha1::Sha1),
    Md5(md5::Md5),
}

impl Hasher {
    fn for_expected(e: &Expected) -> Self {
        match e {
            Expected::Sha256(_) => Hasher::Sha256(sha2::Sha256::new()),
            Expected::Sha1(_) => Hasher::Sha1(sha1::Sha1::new()),
            Expected::Md5(_) => Hasher::Md5(md5::Md5::new()),
        }
    }
    fn update(&mut self, d: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(d),
            Hasher::Sha1(h) => h.update(d),
            Hasher::Md5(h) => h.update(d),
        }
    }
    fn finish(self) -> String {
        match self {
            Hasher::Sha256(h) => hex::encode(h.finalize()),
            Hasher::Sha1(h) => hex::encode(h.finalize()),
            Hasher::Md5(h) => hex::encode(h.finalize()),
        }
    }
}

pub fn part_path(bundle: &Path) -> PathBuf {
    let mut p = bundle.as_os_str().to_owned();
    p.push(".part");
    PathBuf::from(p)
}

/// Bytes free for an unprivileged writer on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Download `a` to `dest` (via `dest.part`), calling `progress(done, total)` as data arrives.
/// An existing `.part` is continued with `Range`; its bytes are hashed first. `rate_limit()`:
/// the cap in bytes per second (0: none), asked after every chunk, so a change applies at once.
pub async fn fetch(
    ddi: &DdiClient,
    a: &ArtifactRef,
    dest: &Path,
    rate_limit: impl Fn() -> u64,
    mut progress: impl FnMut(u64, Option<u64>),
) -> Result<(), DownloadError> {
    let exp = expected(a).ok_or_else(|| {
        DownloadError::Fatal(format!(
            "artifact {} has no sha256, sha1 or md5: refusing to install unverified data",
            a.filename
        ))
    })?;
    let part = part_path(dest);
    let mut hasher = Hasher::for_expected(&exp);
    // Hash what a previous attempt already wrote.
    let mut have = 0u64;
    if let Ok(mut f) = tokio::fs::File::open(&part).await {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 128 * 1024];
        loop {
            let n = f
                .read(&mut buf)
                .await
                .map_err(|e| DownloadError::Retry(format!("reading {}: {e}", part.display())))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            have += n as u64;
        }
    }
    if let Some(size) = a.size {
        if have > size {
            // Not ours to continue: start over.
            have = 0;
            hasher = Hasher::for_expected(&exp);
            let _ = tokio::fs::remove_file(&part).await;
        }
        let dir = dest.parent().unwrap_or(Path::new("."));
        let free =
            free_bytes(dir).map_err(|e| DownloadError::Fatal(format!("{}: {e}", dir.display())))?;
        let need = size - have;
        if free < need + 1024 * 1024 {
            return Err(DownloadError::Fatal(format!(
                "not enough space in {}: the bundle needs {need} more bytes, {free} are free",
                dir.display()
            )));
        }
    }
    if Some(have) != a.size || have == 0 {
        let mut req = ddi.request(reqwest::Method::GET, &a.url);
        if have > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
        }
        let resp = req
            .send()
            .await
            .map_err(|e| DownloadError::Retry(ddi.error_text(&e)))?;
        let status = resp.status();
        if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
            // Our partial file does not match the server's: start over next attempt.
            let _ = tokio::fs::remove_file(&part).await;
            return Err(DownloadError::Retry(
                "server refused to resume (416); restarting".into(),
            ));
        }
        if status.is_client_error() {
            return Err(DownloadError::Fatal(format!(
                "download of {} refused: HTTP {status}",
                a.filename
            )));
        }
        if !status.is_success() {
            return Err(DownloadError::Retry(format!("download: HTTP {status}")));
        }
        let resumed = status == reqwest::StatusCode::PARTIAL_CONTENT;
        if have > 0 && !resumed {
            // The server ignored Range: the body is the whole file.
            have = 0;
            hasher = Hasher::for_expected(&exp);
        }
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(resumed)
            .truncate(!resumed)
            .open(&part)
            .await
            .map_err(|e| DownloadError::Fatal(format!("{}: {e}", part.display())))?;
        let total = a.size;
        let mut stream = resp.bytes_stream();
        use futures_util::StreamExt;
        let mut since_sync = 0u64;
        let mut bucket = TokenBucket::new(rate_limit(), std::time::Instant::now());
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                DownloadError::Retry(format!(
                    "connection lost after {have} bytes: {}",
                    ddi.error_text(&e)
                ))
            })?;
            hasher.update(&chunk);
            file.write_all(&chunk)
                .await
                .map_err(|e| DownloadError::Fatal(format!("{}: {e}", part.display())))?;
            have += chunk.len() as u64;
            since_sync += chunk.len() as u64;
            let now = std::time::Instant::now();
            bucket.set_rate(rate_limit(), now);
            let pause = bucket.take(chunk.len(), now);
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            // Bound what a power cut can take back to 8 MiB.
            if since_sync >= 8 * 1024 * 1024 {
                file.sync_data()
                    .await
                    .map_err(|e| DownloadError::Retry(e.to_string()))?;
                since_sync = 0;
            }
            if total.is_some_and(|t| have > t) {
                return Err(DownloadError::Fatal(format!(
                    "server sent more than the announced {} bytes",
                    total.unwrap_or_default()
                )));
            }
            progress(have, total);
        }
        file.sync_all()
            .await
            .map_err(|e| DownloadError::Retry(e.to_string()))?;
        if let Some(t) = total
            && have < t
        {
            return Err(DownloadError::Retry(format!(
                "connection closed after {have} of {t} bytes"
            )));
        }
    }
    let got = hasher.finish();
    let (kind, want) = match &exp {
        Expected::Sha256(w) => ("sha256", w),
        Expected::Sha1(w) => ("sha1", w),
        Expected::Md5(w) => ("md5", w),
    };
    if &got != want {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(DownloadError::Fatal(format!(
            "{kind} mismatch for {}: expected {want}, got {got}; download discarded",
            a.filename
        )));
    }
    tokio::fs::rename(&part, dest)
        .await
        .map_err(|e| DownloadError::Fatal(format!("{}: {e}", dest.display())))?;
    if let Some(dir) = dest.parent() {
        let _ = thingsly_core::state_dir::fsync_dir(dir);
    }
    Ok(())
}

impl From<DdiError> for DownloadError {
    fn from(e: DdiError) -> Self {
        match e {
            // 429 is Throttled, not here: a busy server is retried, not a failed download.
            DdiError::Status(s, _) if (400..500).contains(&s) => {
                DownloadError::Fatal(e.to_string())
            }
            _ => DownloadError::Retry(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn art(sha256: Option<&str>, sha1: Option<&str>, md5: Option<&str>) -> ArtifactRef {
        ArtifactRef {
            filename: "b.raucb".into(),
            url: String::new(),
            size: None,
            sha256: sha256.map(String::from),
            sha1: sha1.map(String::from),
            md5: md5.map(String::from),
        }
    }

    fn digest_of(a: &ArtifactRef, data: &[u8]) -> Option<(String, String)> {
        let e = expected(a)?;
        let mut h = Hasher::for_expected(&e);
        h.update(data);
        let want = match e {
            Expected::Sha256(w) | Expected::Sha1(w) | Expected::Md5(w) => w,
        };
        Some((h.finish(), want))
    }

    #[test]
    fn the_strongest_hash_given_is_checked() {
        // "abc": sha256 ba78…, sha1 a999…, md5 9001…
        let sha256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let sha1 = "a9993e364706816aba3e25717850c26c9cd0d89d";
        let md5 = "900150983cd24fb0d6963f7d28e17f72";
        let (got, want) = digest_of(&art(Some(sha256), Some("x"), Some("y")), b"abc").unwrap();
        assert_eq!(got, want);
        // Only sha1/md5 from the server: still verified, case-insensitively.
        let (got, want) =
            digest_of(&art(None, Some(&sha1.to_uppercase()), Some("y")), b"abc").unwrap();
        assert_eq!(got, want);
        let (got, want) = digest_of(&art(None, None, Some(md5)), b"abc").unwrap();
        assert_eq!(got, want);
        assert!(digest_of(&art(None, None, None), b"abc").is_none());
    }
}
