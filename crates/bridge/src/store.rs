//! The device registry (the OTA tables: `ota_store.rs`). SQLite is the embedded default; every query lives in this file behind
//! plain methods so a PostgreSQL backend can implement the same surface later.

use anyhow::Context;
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Mutex;
use thingsly_proto::enroll::DeviceRecord;

pub struct Store {
    conn: Mutex<Connection>,
}

/// A device row, including what operators do not see (the certified key).
#[derive(Debug, Clone)]
pub struct Device {
    pub record: DeviceRecord,
    /// Hex of the device's certified public key (SubjectPublicKeyInfo DER).
    pub public_key_hex: String,
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl Store {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=FULL;
             PRAGMA busy_timeout=5000;
             CREATE TABLE IF NOT EXISTS devices (
                device_id TEXT PRIMARY KEY,
                public_key TEXT NOT NULL,
                cert_serial TEXT NOT NULL,
                cert_not_after TEXT NOT NULL,
                wg_public_key TEXT,
                wg_address TEXT NOT NULL UNIQUE,
                metadata TEXT NOT NULL,
                enrolled_at TEXT NOT NULL,
                updated_at TEXT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS device_tokens (
                token_sha256 TEXT PRIMARY KEY,
                device_id TEXT NOT NULL,
                expires_at INTEGER NOT NULL,
                used_at INTEGER
             );
             -- An id an operator revoked stays refused until re-admitted.
             CREATE TABLE IF NOT EXISTS revoked_ids (
                device_id TEXT PRIMARY KEY,
                revoked_at TEXT NOT NULL
             );
             -- Every certificate that must no longer be accepted (revoked, or superseded by
             -- a renewal or re-enrollment), until it expires: the CRL's content.
             CREATE TABLE IF NOT EXISTS revoked_certs (
                cert_serial TEXT PRIMARY KEY,
                device_id TEXT NOT NULL,
                revoked_at INTEGER NOT NULL,
                not_after TEXT NOT NULL
             );
             -- OTA groups, set by operators only (a device's metadata is its own claim).
             CREATE TABLE IF NOT EXISTS device_groups (
                device_id TEXT PRIMARY KEY,
                grp TEXT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS crl_state (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                crl_number INTEGER NOT NULL
             );",
        )?;
        // Added after the first release: which credential created the device.
        let has_via: bool = conn
            .prepare("SELECT 1 FROM pragma_table_info('devices') WHERE name = 'enrolled_via'")?
            .exists([])?;
        if !has_via {
            conn.execute_batch(
                "ALTER TABLE devices ADD COLUMN enrolled_via TEXT NOT NULL DEFAULT 'fleet'",
            )?;
        }
        conn.execute_batch(crate::ota_store::SCHEMA)?;
        conn.execute_batch(crate::provision_store::SCHEMA)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    pub(crate) fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent; keep serving.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, device_id: &str) -> anyhow::Result<Option<Device>> {
        let c = self.conn();
        let row = c
            .query_row(
                "SELECT d.device_id, public_key, cert_serial, cert_not_after, wg_public_key, wg_address,
                        metadata, enrolled_at, updated_at, g.grp
                   FROM devices d LEFT JOIN device_groups g ON g.device_id = d.device_id
                  WHERE d.device_id = ?1",
                params![device_id],
                row_to_device,
            )
            .optional()?;
        Ok(row)
    }

    pub fn list(&self) -> anyhow::Result<Vec<DeviceRecord>> {
        let c = self.conn();
        let mut stmt = c.prepare(
            "SELECT d.device_id, public_key, cert_serial, cert_not_after, wg_public_key, wg_address,
                    metadata, enrolled_at, updated_at, g.grp
               FROM devices d LEFT JOIN device_groups g ON g.device_id = d.device_id
              ORDER BY d.device_id",
        )?;
        let rows = stmt.query_map([], row_to_device)?;
        Ok(rows
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .map(|d| d.record)
            .collect())
    }

    /// The device's address, or the lowest free one in `pool` (the first host is the hub's).
    /// Only a hint for an early refusal: [`Store::record`] allocates for real.
    pub fn address_for(
        &self,
        device_id: &str,
        pool: ipnet::Ipv4Net,
    ) -> anyhow::Result<Option<Ipv4Addr>> {
        address_in(&self.conn(), device_id, pool)
    }

    /// Record a device after a successful enroll/renew and return its address: the one it
    /// had, or the lowest free one, chosen under the same lock as the write so that
    /// concurrent enrollments never pick the same address. `None`: the pool is exhausted.
    /// `via` is the credential that created it (`fleet` or `device-token`); the certificate it
    /// replaces goes on the revocation list.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        device_id: &str,
        public_key_hex: &str,
        serial_hex: &str,
        not_after: &str,
        wg_public_key: Option<&str>,
        pool: ipnet::Ipv4Net,
        metadata: &serde_json::Map<String, serde_json::Value>,
        via: &str,
    ) -> anyhow::Result<Option<String>> {
        let now = now_rfc3339();
        let meta = serde_json::to_string(metadata)?;
        let mut c = self.conn();
        let tx = c.transaction()?;
        let Some(addr) = address_in(&tx, device_id, pool)? else {
            return Ok(None);
        };
        let wg_address = format!("{addr}/32");
        tx.execute(
            "INSERT OR IGNORE INTO revoked_certs (cert_serial, device_id, revoked_at, not_after)
             SELECT cert_serial, device_id, ?2, cert_not_after FROM devices
              WHERE device_id = ?1 AND cert_serial != ?3",
            params![device_id, unix_now(), serial_hex],
        )?;
        tx.execute(
            "INSERT INTO devices (device_id, public_key, cert_serial, cert_not_after, wg_public_key,
                                  wg_address, metadata, enrolled_at, updated_at, enrolled_via)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9)
             ON CONFLICT(device_id) DO UPDATE SET
                public_key = excluded.public_key, cert_serial = excluded.cert_serial,
                cert_not_after = excluded.cert_not_after,
                wg_public_key = COALESCE(excluded.wg_public_key, devices.wg_public_key),
                metadata = CASE WHEN excluded.metadata = '{}' THEN devices.metadata ELSE excluded.metadata END,
                updated_at = excluded.updated_at",
            params![device_id, public_key_hex, serial_hex, not_after, wg_public_key, wg_address, meta, now, via],
        )?;
        tx.commit()?;
        Ok(Some(wg_address))
    }

    /// Revoke a device: its row goes (tunnel peer removed at the next reconcile, address back
    /// to the pool, renewal refused), its certificate goes on the revocation list, and its id
    /// is refused by enrollment until [`Store::admit`]. True if it existed.
    pub fn delete(&self, device_id: &str) -> anyhow::Result<bool> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        tx.execute(
            "INSERT OR IGNORE INTO revoked_certs (cert_serial, device_id, revoked_at, not_after)
             SELECT cert_serial, device_id, ?2, cert_not_after FROM devices WHERE device_id = ?1",
            params![device_id, unix_now()],
        )?;
        let n = tx.execute(
            "DELETE FROM devices WHERE device_id = ?1",
            params![device_id],
        )?;
        tx.execute(
            "DELETE FROM device_groups WHERE device_id = ?1",
            params![device_id],
        )?;
        if n > 0 {
            tx.execute(
                "INSERT OR REPLACE INTO revoked_ids (device_id, revoked_at) VALUES (?1, ?2)",
                params![device_id, now_rfc3339()],
            )?;
        }
        tx.commit()?;
        Ok(n > 0)
    }

    /// Put an enrolled device in OTA group `group` (None: in none). False if not enrolled.
    pub fn set_group(&self, device_id: &str, group: Option<&str>) -> anyhow::Result<bool> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        let known: bool = tx
            .prepare("SELECT 1 FROM devices WHERE device_id = ?1")?
            .exists(params![device_id])?;
        if known {
            match group {
                Some(g) => tx.execute(
                    "INSERT INTO device_groups (device_id, grp) VALUES (?1, ?2)
                     ON CONFLICT(device_id) DO UPDATE SET grp = excluded.grp",
                    params![device_id, g],
                )?,
                None => tx.execute(
                    "DELETE FROM device_groups WHERE device_id = ?1",
                    params![device_id],
                )?,
            };
        }
        tx.commit()?;
        Ok(known)
    }

    /// Whether `group` may name an OTA group (the device-id rule: it appears in URLs and logs).
    /// The API and the CLI both refuse with this message.
    pub fn check_group_name(group: &str) -> Result<(), String> {
        if thingsly_proto::enroll::is_valid_device_id(group) {
            Ok(())
        } else {
            Err("group must be 1-64 of A-Z a-z 0-9 . _ -".into())
        }
    }

    /// The enrolled members of OTA group `group`.
    pub fn group_members(&self, group: &str) -> anyhow::Result<Vec<String>> {
        let c = self.conn();
        let mut stmt = c.prepare(
            "SELECT g.device_id FROM device_groups g JOIN devices d ON d.device_id = g.device_id
              WHERE g.grp = ?1 ORDER BY g.device_id",
        )?;
        let rows = stmt.query_map(params![group], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// When `device_id` was revoked, if it is still refused.
    pub fn revoked_at(&self, device_id: &str) -> anyhow::Result<Option<String>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT revoked_at FROM revoked_ids WHERE device_id = ?1",
                params![device_id],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// An operator lets a revoked id enroll again (its old certificates stay revoked).
    /// True if it was revoked.
    pub fn admit(&self, device_id: &str) -> anyhow::Result<bool> {
        let n = self.conn().execute(
            "DELETE FROM revoked_ids WHERE device_id = ?1",
            params![device_id],
        )?;
        Ok(n > 0)
    }

    /// The certificates to list in the CRL (serial hex, revocation time), expired ones
    /// dropped, and the next CRL number.
    pub fn crl_entries(&self) -> anyhow::Result<(Vec<(String, time::OffsetDateTime)>, u64)> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        tx.execute(
            "DELETE FROM revoked_certs WHERE not_after < ?1",
            params![now_rfc3339()],
        )?;
        let rows = {
            let mut stmt = tx
                .prepare("SELECT cert_serial, revoked_at FROM revoked_certs ORDER BY revoked_at")?;
            stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
                .collect::<Result<Vec<_>, _>>()?
        };
        tx.execute(
            "INSERT INTO crl_state (id, crl_number) VALUES (1, 1)
             ON CONFLICT(id) DO UPDATE SET crl_number = crl_number + 1",
            [],
        )?;
        let n: i64 = tx.query_row("SELECT crl_number FROM crl_state WHERE id = 1", [], |r| {
            r.get(0)
        })?;
        tx.commit()?;
        let entries = rows
            .into_iter()
            .map(|(s, t)| {
                Ok((
                    s,
                    time::OffsetDateTime::from_unix_timestamp(t)
                        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
                ))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok((entries, u64::try_from(n).unwrap_or(0)))
    }

    /// Devices the fleet token created that are still enrolled (its share of the pool).
    pub fn fleet_devices(&self) -> anyhow::Result<usize> {
        let n: i64 = self.conn().query_row(
            "SELECT COUNT(*) FROM devices WHERE enrolled_via = 'fleet'",
            [],
            |r| r.get(0),
        )?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    /// The device (other than `except`) that holds WireGuard key `key`, if any.
    pub fn wg_key_holder(&self, key: &str, except: &str) -> anyhow::Result<Option<String>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT device_id FROM devices WHERE wg_public_key = ?1 AND device_id != ?2",
                params![key, except],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Store a one-time enrollment token for one device; only its hash is kept.
    pub fn add_device_token(
        &self,
        device_id: &str,
        token: &str,
        expires_at: i64,
    ) -> anyhow::Result<()> {
        self.conn().execute(
            "INSERT INTO device_tokens (token_sha256, device_id, expires_at) VALUES (?1, ?2, ?3)",
            params![token_hash(token), device_id, expires_at],
        )?;
        Ok(())
    }

    /// True when `token` is an unused, unexpired one-time token for `device_id`.
    pub fn device_token_valid(&self, device_id: &str, token: &str) -> anyhow::Result<bool> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let n: i64 = self.conn().query_row(
            "SELECT COUNT(*) FROM device_tokens WHERE token_sha256 = ?1 AND device_id = ?2
               AND used_at IS NULL AND expires_at > ?3",
            params![token_hash(token), device_id, now],
            |r| r.get(0),
        )?;
        Ok(n > 0)
    }

    /// Mark `token` used if it still is unused and unexpired; true for exactly one of any
    /// number of concurrent callers (one conditional UPDATE, atomic in SQLite).
    pub fn claim_device_token(&self, device_id: &str, token: &str) -> anyhow::Result<bool> {
        let now = unix_now();
        let n = self.conn().execute(
            "UPDATE device_tokens SET used_at = ?3 WHERE token_sha256 = ?1 AND device_id = ?2
               AND used_at IS NULL AND expires_at > ?3",
            params![token_hash(token), device_id, now],
        )?;
        Ok(n == 1)
    }

    /// Give a claimed token back when the enrollment it was claimed for failed on our side.
    pub fn release_device_token(&self, token: &str) -> anyhow::Result<()> {
        self.conn().execute(
            "UPDATE device_tokens SET used_at = NULL WHERE token_sha256 = ?1",
            params![token_hash(token)],
        )?;
        Ok(())
    }
}

fn address_in(
    c: &Connection,
    device_id: &str,
    pool: ipnet::Ipv4Net,
) -> anyhow::Result<Option<Ipv4Addr>> {
    if let Some(a) = c
        .query_row(
            "SELECT wg_address FROM devices WHERE device_id = ?1",
            params![device_id],
            |r| r.get::<_, String>(0),
        )
        .optional()?
    {
        return Ok(a.split('/').next().and_then(|s| s.parse().ok()));
    }
    let mut stmt = c.prepare("SELECT wg_address FROM devices")?;
    let used: std::collections::HashSet<Ipv4Addr> = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .filter_map(|r| r.ok())
        .filter_map(|a| a.split('/').next().and_then(|s| s.parse().ok()))
        .collect();
    Ok(pool.hosts().skip(1).find(|a| !used.contains(a)))
}

fn row_to_device(r: &rusqlite::Row<'_>) -> rusqlite::Result<Device> {
    let meta: String = r.get(6)?;
    Ok(Device {
        public_key_hex: r.get(1)?,
        record: DeviceRecord {
            device_id: r.get(0)?,
            certificate_serial: r.get(2)?,
            certificate_not_after: r.get(3)?,
            wireguard_public_key: r.get(4)?,
            wireguard_address: r.get(5)?,
            metadata: serde_json::from_str(&meta).unwrap_or_default(),
            enrolled_at: r.get(7)?,
            updated_at: r.get(8)?,
            group: r.get(9)?,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Store::record` as the tests need it: fleet enrollment, key "k", no WireGuard key.
    fn rec_as(
        s: &Store,
        id: &str,
        serial: &str,
        not_after: &str,
        pool: ipnet::Ipv4Net,
    ) -> Option<String> {
        s.record(
            id,
            "k",
            serial,
            not_after,
            None,
            pool,
            &Default::default(),
            "fleet",
        )
        .unwrap()
    }

    #[test]
    fn addresses_are_allocated_lowest_first_and_kept() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(&t.path().join("db.sqlite")).unwrap();
        let pool: ipnet::Ipv4Net = "10.8.0.0/29".parse().unwrap();
        let rec = |id: &str| rec_as(&s, id, "01", "t", pool);
        assert_eq!(rec("a").as_deref(), Some("10.8.0.2/32"));
        assert_eq!(
            rec("a").as_deref(),
            Some("10.8.0.2/32"),
            "kept on re-enroll"
        );
        for (i, id) in ["b", "c", "d", "e"].iter().enumerate() {
            assert_eq!(rec(id), Some(format!("10.8.0.{}/32", 3 + i)));
        }
        // /29: hosts .1-.6, .1 is the hub, .2-.6 taken
        assert_eq!(s.address_for("f", pool).unwrap(), None);
        assert_eq!(rec("f"), None);
    }

    #[test]
    fn concurrent_enrollments_get_distinct_addresses() {
        let t = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(Store::open(&t.path().join("db.sqlite")).unwrap());
        let pool: ipnet::Ipv4Net = "10.8.0.0/24".parse().unwrap();
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let s = s.clone();
                std::thread::spawn(move || {
                    (0..10)
                        .map(|j| rec_as(&s, &format!("d{i}-{j}"), "01", "t", pool).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<String> = threads
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 80);
    }

    #[test]
    fn one_time_tokens_are_single_use() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(&t.path().join("db.sqlite")).unwrap();
        s.add_device_token("d1", "secret", i64::MAX).unwrap();
        assert!(s.device_token_valid("d1", "secret").unwrap());
        assert!(!s.device_token_valid("d2", "secret").unwrap());
        assert!(
            !s.claim_device_token("d2", "secret").unwrap(),
            "bound to d1"
        );
        assert!(s.claim_device_token("d1", "secret").unwrap());
        assert!(!s.claim_device_token("d1", "secret").unwrap(), "once");
        assert!(!s.device_token_valid("d1", "secret").unwrap());
        s.release_device_token("secret").unwrap();
        assert!(s.claim_device_token("d1", "secret").unwrap(), "given back");
    }

    #[test]
    fn revocation_sticks_and_lists_revoked_and_superseded_certificates() {
        let t = tempfile::tempdir().unwrap();
        let s = Store::open(&t.path().join("db.sqlite")).unwrap();
        let pool: ipnet::Ipv4Net = "10.8.0.0/24".parse().unwrap();
        let far = "2999-01-01T00:00:00Z";
        let rec = |serial: &str| rec_as(&s, "d", serial, far, pool).unwrap();
        rec("0a");
        rec("0a"); // the same certificate again (a repeated answer): nothing superseded
        assert!(s.crl_entries().unwrap().0.is_empty());
        rec("0b"); // renewed: 0a superseded
        let (list, n1) = s.crl_entries().unwrap();
        assert_eq!(
            list.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(),
            ["0a"]
        );
        assert!(s.delete("d").unwrap());
        assert!(s.revoked_at("d").unwrap().is_some());
        let (list, n2) = s.crl_entries().unwrap();
        assert_eq!(list.len(), 2);
        assert!(n2 > n1, "CRL numbers grow");
        assert!(s.admit("d").unwrap());
        assert!(s.revoked_at("d").unwrap().is_none());
        assert_eq!(
            s.crl_entries().unwrap().0.len(),
            2,
            "admitting revokes nothing back"
        );
    }
}
