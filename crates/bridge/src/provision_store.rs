//! Connects reported by ThingsBoard and the hawkBit provisioning they queue: same database
//! and lock as the registry (`store.rs`). The queue is a row per device, so a storm of
//! connects of one device is one job, and a job survives a restart of the bridge.

use crate::store::Store;
use rusqlite::{OptionalExtension, params};

pub const SCHEMA: &str = "
     CREATE TABLE IF NOT EXISTS device_connects (
        device_id TEXT PRIMARY KEY,
        first_connect_at TEXT NOT NULL,
        last_connect_at TEXT NOT NULL,
        connects INTEGER NOT NULL,
        metadata TEXT NOT NULL
     );
     -- One row per device provisioned in hawkBit. `token` is the target's securityToken
     -- (hawkBit needs it in clear, and the device was sent it; NULL with certificate auth).
     -- `gen` grows with every queued connect, so a sync that raced a newer connect leaves
     -- the job pending.
     CREATE TABLE IF NOT EXISTS hawkbit_targets (
        device_id TEXT PRIMARY KEY,
        token TEXT,
        pending INTEGER NOT NULL DEFAULT 0,
        gen INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        synced_token TEXT,
        synced_at INTEGER
     );
     CREATE INDEX IF NOT EXISTS hawkbit_targets_due ON hawkbit_targets(pending, next_attempt_at);";

/// What `GET /devices/{id}` shows of a device's connects and its hawkBit target.
#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct ConnectInfo {
    pub first_connect_at: String,
    pub last_connect_at: String,
    pub connects: i64,
    /// What ThingsBoard sent with the last connect (its message data and device type).
    pub metadata: serde_json::Value,
}

#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct HawkbitState {
    /// A create/update in hawkBit waits (first try, or a retry after `last_error`).
    pub pending: bool,
    pub attempts: i64,
    pub last_error: Option<String>,
    /// Unix seconds of the last successful create/update.
    pub synced_at: Option<i64>,
}

/// A queued provisioning job.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetJob {
    pub device_id: String,
    pub token: Option<String>,
    pub generation: i64,
    pub attempts: i64,
}

impl Store {
    /// The device's hawkBit target token, made on first use (`create`).
    pub fn hawkbit_token(&self, device_id: &str, create: bool) -> anyhow::Result<Option<String>> {
        let c = self.conn();
        if create {
            c.execute(
                "INSERT INTO hawkbit_targets (device_id, token) VALUES (?1, ?2)
                 ON CONFLICT(device_id) DO UPDATE SET token = COALESCE(token, excluded.token)",
                params![device_id, crate::api::random_token()],
            )?;
        }
        Ok(c.query_row(
            "SELECT token FROM hawkbit_targets WHERE device_id = ?1",
            params![device_id],
            |r| r.get(0),
        )
        .optional()?
        .flatten())
    }

    /// Record a connect at `now` (unix seconds) and, with `provision`, queue the device's
    /// hawkBit create/update unless it was done with the same token less than
    /// `resync_after_secs` ago. True when a job is (now or still) queued.
    pub fn record_connect(
        &self,
        device_id: &str,
        metadata: &serde_json::Value,
        now: i64,
        provision: bool,
        resync_after_secs: i64,
    ) -> anyhow::Result<bool> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        let at = time::OffsetDateTime::from_unix_timestamp(now)?
            .format(&time::format_description::well_known::Rfc3339)?;
        tx.execute(
            "INSERT INTO device_connects (device_id, first_connect_at, last_connect_at, connects, metadata)
             VALUES (?1, ?2, ?2, 1, ?3)
             ON CONFLICT(device_id) DO UPDATE SET last_connect_at = excluded.last_connect_at,
                connects = connects + 1, metadata = excluded.metadata",
            params![device_id, at, metadata.to_string()],
        )?;
        let mut queued = false;
        if provision {
            tx.execute(
                "INSERT INTO hawkbit_targets (device_id) VALUES (?1) ON CONFLICT(device_id) DO NOTHING",
                params![device_id],
            )?;
            let fresh: bool = tx.query_row(
                "SELECT pending = 0 AND synced_at IS NOT NULL AND synced_token IS token
                        AND synced_at > ?2
                   FROM hawkbit_targets WHERE device_id = ?1",
                params![device_id, now - resync_after_secs],
                |r| r.get(0),
            )?;
            if !fresh {
                // A job already waiting keeps its backoff: a reconnect storm must not turn
                // into a retry storm against a hawkBit that is down.
                tx.execute(
                    "UPDATE hawkbit_targets SET gen = gen + 1,
                        next_attempt_at = CASE WHEN pending = 1 THEN next_attempt_at ELSE ?2 END,
                        attempts = CASE WHEN pending = 1 THEN attempts ELSE 0 END,
                        pending = 1
                      WHERE device_id = ?1",
                    params![device_id, now],
                )?;
                queued = true;
            }
        }
        tx.commit()?;
        Ok(queued)
    }

    /// Jobs due at `now`, oldest first.
    pub fn due_targets(&self, now: i64, limit: usize) -> anyhow::Result<Vec<TargetJob>> {
        let c = self.conn();
        let mut stmt = c.prepare(
            "SELECT device_id, token, gen, attempts FROM hawkbit_targets
              WHERE pending = 1 AND next_attempt_at <= ?1
              ORDER BY next_attempt_at, device_id LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![now, limit as i64], |r| {
            Ok(TargetJob {
                device_id: r.get(0)?,
                token: r.get(1)?,
                generation: r.get(2)?,
                attempts: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// When the next job is due (unix seconds), if any waits.
    pub fn next_target_due(&self) -> anyhow::Result<Option<i64>> {
        Ok(self.conn().query_row(
            "SELECT MIN(next_attempt_at) FROM hawkbit_targets WHERE pending = 1",
            [],
            |r| r.get(0),
        )?)
    }

    /// hawkBit has the target with `job.token`. A connect queued meanwhile stays pending.
    pub fn target_synced(&self, job: &TargetJob, now: i64) -> anyhow::Result<()> {
        self.conn().execute(
            "UPDATE hawkbit_targets SET synced_token = ?2, synced_at = ?3, last_error = NULL,
                pending = CASE WHEN gen = ?4 THEN 0 ELSE pending END,
                attempts = CASE WHEN gen = ?4 THEN 0 ELSE attempts END
              WHERE device_id = ?1",
            params![job.device_id, job.token, now, job.generation],
        )?;
        Ok(())
    }

    /// The device is no longer enrolled (revoked since the connect): the job is dropped.
    pub fn target_abandoned(&self, device_id: &str, why: &str) -> anyhow::Result<()> {
        self.conn().execute(
            "UPDATE hawkbit_targets SET pending = 0, last_error = ?2 WHERE device_id = ?1",
            params![device_id, why],
        )?;
        Ok(())
    }

    /// The job failed; it runs again at `next_at`.
    pub fn target_failed(&self, device_id: &str, error: &str, next_at: i64) -> anyhow::Result<()> {
        self.conn().execute(
            "UPDATE hawkbit_targets SET attempts = attempts + 1, last_error = ?2, next_attempt_at = ?3
              WHERE device_id = ?1",
            params![device_id, error, next_at],
        )?;
        Ok(())
    }

    pub fn connect_info(&self, device_id: &str) -> anyhow::Result<Option<ConnectInfo>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT first_connect_at, last_connect_at, connects, metadata FROM device_connects
                  WHERE device_id = ?1",
                params![device_id],
                |r| {
                    let meta: String = r.get(3)?;
                    Ok(ConnectInfo {
                        first_connect_at: r.get(0)?,
                        last_connect_at: r.get(1)?,
                        connects: r.get(2)?,
                        metadata: serde_json::from_str(&meta).unwrap_or_default(),
                    })
                },
            )
            .optional()?)
    }

    pub fn hawkbit_state(&self, device_id: &str) -> anyhow::Result<Option<HawkbitState>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT pending, attempts, last_error, synced_at FROM hawkbit_targets
                  WHERE device_id = ?1",
                params![device_id],
                |r| {
                    Ok(HawkbitState {
                        pending: r.get::<_, i64>(0)? == 1,
                        attempts: r.get(1)?,
                        last_error: r.get(2)?,
                        synced_at: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let t = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let s = Store::open(&t.path().join("db.sqlite")).unwrap_or_else(|e| panic!("{e}"));
        (t, s)
    }

    #[test]
    fn a_connect_storm_is_one_job_and_keeps_its_backoff() -> anyhow::Result<()> {
        let (_t, s) = store();
        let meta = serde_json::json!({"deviceType": "gw"});
        let token = s.hawkbit_token("d1", true)?;
        assert_eq!(s.hawkbit_token("d1", true)?, token, "made once");
        assert!(s.record_connect("d1", &meta, 1000, true, 3600)?);
        assert!(s.record_connect("d1", &meta, 1001, true, 3600)?);
        let jobs = s.due_targets(1001, 10)?;
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].token, token);
        // hawkBit down: the retry waits, and more connects do not bring it forward.
        s.target_failed("d1", "503", 1100)?;
        assert!(s.record_connect("d1", &meta, 1002, true, 3600)?);
        assert!(s.due_targets(1050, 10)?.is_empty());
        assert_eq!(s.next_target_due()?, Some(1100));
        let job = s.due_targets(1100, 10)?.remove(0);
        assert_eq!(job.attempts, 1);
        s.target_synced(&job, 1100)?;
        assert_eq!(s.next_target_due()?, None);
        // Within resync_after and with the same token: recorded, not queued.
        assert!(!s.record_connect("d1", &meta, 1200, true, 3600)?);
        assert!(s.record_connect("d1", &meta, 5000, true, 3600)?);
        let info = s.connect_info("d1")?.unwrap_or_else(|| panic!("info"));
        assert_eq!(info.connects, 5);
        assert_eq!(info.metadata, meta);
        assert!(info.first_connect_at < info.last_connect_at);
        Ok(())
    }

    #[test]
    fn a_connect_during_a_sync_keeps_the_job_pending() -> anyhow::Result<()> {
        let (_t, s) = store();
        s.hawkbit_token("d1", true)?;
        s.record_connect("d1", &serde_json::json!({}), 1000, true, 3600)?;
        let job = s.due_targets(1000, 10)?.remove(0);
        s.record_connect("d1", &serde_json::json!({}), 1001, true, 3600)?;
        s.target_synced(&job, 1002)?;
        assert_eq!(
            s.due_targets(1002, 10)?.len(),
            1,
            "the newer connect is still owed"
        );
        // Connects without provisioning ([hawkbit] absent) are only recorded.
        assert!(!s.record_connect("d2", &serde_json::json!({}), 1000, false, 3600)?);
        assert!(s.hawkbit_state("d2")?.is_none());
        Ok(())
    }
}
