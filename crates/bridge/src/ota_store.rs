//! The OTA side of the registry: software modules (one uploaded RAUC bundle each), actions
//! (a module assigned to a device), every feedback a device sent, and its `configData`.
//! Same database and lock as the device registry in `store.rs`.

use crate::store::Store;
use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};

pub const SCHEMA: &str = "
     CREATE TABLE IF NOT EXISTS ota_modules (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        filename TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        sha1 TEXT NOT NULL,
        md5 TEXT NOT NULL,
        created_at TEXT NOT NULL
     );
     CREATE TABLE IF NOT EXISTS ota_actions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        device_id TEXT NOT NULL,
        module_id INTEGER NOT NULL REFERENCES ota_modules(id),
        kind TEXT NOT NULL,
        window_start INTEGER,
        window_duration INTEGER,
        status TEXT NOT NULL,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
     );
     CREATE INDEX IF NOT EXISTS ota_actions_device ON ota_actions(device_id, status);
     CREATE TABLE IF NOT EXISTS ota_feedback (
        action_id INTEGER NOT NULL,
        at TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        body TEXT NOT NULL
     );
     CREATE TABLE IF NOT EXISTS ota_target_tokens (
        device_id TEXT PRIMARY KEY,
        token_sha256 TEXT NOT NULL
     );
     CREATE TABLE IF NOT EXISTS ota_config_data (
        device_id TEXT PRIMARY KEY,
        data TEXT NOT NULL,
        updated_at TEXT NOT NULL
     );
     CREATE TABLE IF NOT EXISTS ota_auto_confirm (
        device_id TEXT PRIMARY KEY,
        initiator TEXT,
        remark TEXT,
        activated_at INTEGER NOT NULL
     );
     CREATE TABLE IF NOT EXISTS ota_ddi_targets (
        device_id TEXT PRIMARY KEY,
        registered_at TEXT NOT NULL,
        last_poll TEXT NOT NULL
     );";

/// Controllers a gateway-token poll may register before the bridge refuses more (hawkBit has
/// no such cap; a leaked gateway token must not fill the disk).
pub const MAX_DDI_TARGETS: i64 = 10_000;

/// A device's auto-confirmation (hawkBit's `AutoConfirmationStatus`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AutoConfirm {
    pub initiator: Option<String>,
    pub remark: Option<String>,
    /// Unix milliseconds, as hawkBit's `activatedAt`.
    pub activated_at: i64,
}

/// A controller the DDI server registered on its first gateway-token poll (not enrolled: no
/// certificate, no tunnel address).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DdiTarget {
    pub device_id: String,
    pub registered_at: String,
    pub last_poll: String,
}

/// What registering on a poll did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    New,
    Known,
    /// [`MAX_DDI_TARGETS`] reached: not registered.
    Full,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Module {
    pub id: i64,
    pub name: String,
    pub version: String,
    pub filename: String,
    pub size: u64,
    pub sha256: String,
    pub sha1: String,
    pub md5: String,
    pub created_at: String,
}

/// How an assignment is to be carried out (hawkBit's action types).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ActionKind {
    /// download and update: forced.
    Forced,
    /// download and update: attempt.
    Soft,
    /// download forced, update skip: closed once the device reports `downloaded`.
    Downloadonly,
}

impl ActionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::Forced => "forced",
            ActionKind::Soft => "soft",
            ActionKind::Downloadonly => "downloadonly",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "forced" => ActionKind::Forced,
            "soft" => ActionKind::Soft,
            "downloadonly" => ActionKind::Downloadonly,
            _ => return None,
        })
    }
}

/// An action's life: (`confirming` → device confirms →) `running` → `closed`/`failed`
/// (device's final feedback); `running` → `canceling` (operator) → `canceled` (device
/// confirmed) or back to `running` (rejected).
pub mod status {
    /// Waiting for the device's consent (hawkBit's user-consent flow).
    pub const CONFIRMING: &str = "confirming";
    pub const RUNNING: &str = "running";
    pub const CANCELING: &str = "canceling";
    pub const CANCELED: &str = "canceled";
    pub const CLOSED: &str = "closed";
    pub const FAILED: &str = "failed";
    pub fn is_open(s: &str) -> bool {
        s == RUNNING || s == CANCELING || s == CONFIRMING
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Action {
    pub id: i64,
    pub device_id: String,
    pub module_id: i64,
    pub kind: ActionKind,
    /// Maintenance window: unix seconds and length; none means "any time".
    pub window_start: Option<i64>,
    pub window_duration: Option<i64>,
    pub status: String,
    pub created_at: String,
    pub updated_at: String,
}

impl Action {
    /// `None` without a window; else whether `now` (unix seconds) is inside it.
    pub fn window_open(&self, now: i64) -> Option<bool> {
        let start = self.window_start?;
        let len = self.window_duration.unwrap_or(i64::MAX / 4);
        Some(now >= start && now < start.saturating_add(len))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FeedbackEntry {
    pub at: String,
    /// `deploymentBase`, `cancelAction` or `installedBase`.
    pub endpoint: String,
    pub body: serde_json::Value,
}

fn token_sha256(token: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn row_to_action(r: &rusqlite::Row<'_>) -> rusqlite::Result<Action> {
    let kind: String = r.get(3)?;
    Ok(Action {
        id: r.get(0)?,
        device_id: r.get(1)?,
        module_id: r.get(2)?,
        kind: ActionKind::parse(&kind).unwrap_or(ActionKind::Forced),
        window_start: r.get(4)?,
        window_duration: r.get(5)?,
        status: r.get(6)?,
        created_at: r.get(7)?,
        updated_at: r.get(8)?,
    })
}

const ACTION_COLS: &str =
    "id, device_id, module_id, kind, window_start, window_duration, status, created_at, updated_at";

fn row_to_module(r: &rusqlite::Row<'_>) -> rusqlite::Result<Module> {
    Ok(Module {
        id: r.get(0)?,
        name: r.get(1)?,
        version: r.get(2)?,
        filename: r.get(3)?,
        size: r.get::<_, i64>(4)? as u64,
        sha256: r.get(5)?,
        sha1: r.get(6)?,
        md5: r.get(7)?,
        created_at: r.get(8)?,
    })
}

const MODULE_COLS: &str = "id, name, version, filename, size, sha256, sha1, md5, created_at";

impl Store {
    #[allow(clippy::too_many_arguments)]
    pub fn add_module(
        &self,
        name: &str,
        version: &str,
        filename: &str,
        size: u64,
        sha256: &str,
        sha1: &str,
        md5: &str,
    ) -> anyhow::Result<Module> {
        let c = self.conn();
        c.execute(
            "INSERT INTO ota_modules (name, version, filename, size, sha256, sha1, md5, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                name,
                version,
                filename,
                size as i64,
                sha256,
                sha1,
                md5,
                now()
            ],
        )?;
        let id = c.last_insert_rowid();
        Ok(c.query_row(
            &format!("SELECT {MODULE_COLS} FROM ota_modules WHERE id = ?1"),
            params![id],
            row_to_module,
        )?)
    }

    pub fn module(&self, id: i64) -> anyhow::Result<Option<Module>> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {MODULE_COLS} FROM ota_modules WHERE id = ?1"),
                params![id],
                row_to_module,
            )
            .optional()?)
    }

    pub fn modules(&self) -> anyhow::Result<Vec<Module>> {
        let c = self.conn();
        let mut stmt = c.prepare(&format!(
            "SELECT {MODULE_COLS} FROM ota_modules ORDER BY id"
        ))?;
        let rows = stmt.query_map([], row_to_module)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Assign a module to a device. An open action of the device is superseded (canceled on
    /// the server, as hawkBit does when a new assignment replaces a running one).
    pub fn assign(
        &self,
        device_id: &str,
        module_id: i64,
        kind: ActionKind,
        window: Option<(i64, i64)>,
        confirm: bool,
    ) -> anyhow::Result<Action> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        let t = now();
        tx.execute(
            "UPDATE ota_actions SET status = ?2, updated_at = ?3
              WHERE device_id = ?1 AND status IN ('running', 'canceling', 'confirming')",
            params![device_id, status::CANCELED, t],
        )?;
        // hawkBit: while auto-confirmation is active, a new action is confirmed on creation.
        let auto = auto_confirm_in(&tx, device_id)?;
        let confirm = confirm && auto.is_none();
        tx.execute(
            "INSERT INTO ota_actions (device_id, module_id, kind, window_start, window_duration,
                                      status, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
            params![
                device_id,
                module_id,
                kind.as_str(),
                window.map(|w| w.0),
                window.map(|w| w.1),
                if confirm {
                    status::CONFIRMING
                } else {
                    status::RUNNING
                },
                t
            ],
        )?;
        let id = tx.last_insert_rowid();
        if let Some(auto) = &auto {
            add_server_status(&tx, id, &auto_confirmed_message(auto))?;
        }
        let a = action_in(&tx, id)?;
        tx.commit()?;
        Ok(a)
    }

    /// The device's auto-confirmation, if active.
    pub fn auto_confirm(&self, device_id: &str) -> anyhow::Result<Option<AutoConfirm>> {
        auto_confirm_in(&self.conn(), device_id)
    }

    /// Activate auto-confirmation; the action waiting for consent, if any, is confirmed now
    /// (hawkBit's `activateAutoConfirmation`). `Ok(false)`: it was active already (hawkBit: 409).
    pub fn activate_auto_confirm(
        &self,
        device_id: &str,
        initiator: Option<&str>,
        remark: Option<&str>,
        now_ms: i64,
    ) -> anyhow::Result<bool> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        let n = tx.execute(
            "INSERT INTO ota_auto_confirm (device_id, initiator, remark, activated_at)
             VALUES (?1, ?2, ?3, ?4) ON CONFLICT(device_id) DO NOTHING",
            params![device_id, initiator, remark, now_ms],
        )?;
        if n == 0 {
            return Ok(false);
        }
        let waiting: Option<i64> = tx
            .query_row(
                "SELECT id FROM ota_actions WHERE device_id = ?1 AND status = 'confirming'",
                params![device_id],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(id) = waiting {
            tx.execute(
                "UPDATE ota_actions SET status = 'running', updated_at = ?2 WHERE id = ?1",
                params![id, now()],
            )?;
            let auto = AutoConfirm {
                initiator: initiator.map(String::from),
                remark: remark.map(String::from),
                activated_at: now_ms,
            };
            add_server_status(&tx, id, &auto_confirmed_message(&auto))?;
        }
        tx.commit()?;
        Ok(true)
    }

    /// Deactivate auto-confirmation: future actions wait for consent again, running ones stay.
    pub fn deactivate_auto_confirm(&self, device_id: &str) -> anyhow::Result<()> {
        self.conn().execute(
            "DELETE FROM ota_auto_confirm WHERE device_id = ?1",
            params![device_id],
        )?;
        Ok(())
    }

    /// The device declares what it runs (hawkBit's `PUT installedBase`, an offline
    /// assignment): `Ok(Some(action))` when that is news, recorded as a finished action of the
    /// module; `Ok(None)` when nothing changes: it runs that already, or it has an open action
    /// (hawkBit's offline assignment leaves pending targets alone).
    pub fn record_offline_install(
        &self,
        device_id: &str,
        module_id: i64,
    ) -> anyhow::Result<Option<Action>> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        let open: i64 = tx.query_row(
            "SELECT COUNT(*) FROM ota_actions WHERE device_id = ?1
               AND status IN ('running', 'canceling', 'confirming')",
            params![device_id],
            |r| r.get(0),
        )?;
        let installed: Option<i64> = tx
            .query_row(
                "SELECT module_id FROM ota_actions WHERE device_id = ?1 AND status = 'closed'
                  ORDER BY id DESC LIMIT 1",
                params![device_id],
                |r| r.get(0),
            )
            .optional()?;
        if open > 0 || installed == Some(module_id) {
            return Ok(None);
        }
        let t = now();
        tx.execute(
            "INSERT INTO ota_actions (device_id, module_id, kind, window_start, window_duration,
                                      status, created_at, updated_at)
             VALUES (?1, ?2, 'forced', NULL, NULL, 'closed', ?3, ?3)",
            params![device_id, module_id, t],
        )?;
        let id = tx.last_insert_rowid();
        add_server_status(&tx, id, "Action reported as offline deployment")?;
        let a = action_in(&tx, id)?;
        tx.commit()?;
        Ok(Some(a))
    }

    /// The newest module called `name` at `version`.
    pub fn module_named(&self, name: &str, version: &str) -> anyhow::Result<Option<Module>> {
        Ok(self
            .conn()
            .query_row(
                &format!(
                    "SELECT {MODULE_COLS} FROM ota_modules WHERE name = ?1 AND version = ?2
                      ORDER BY id DESC LIMIT 1"
                ),
                params![name, version],
                row_to_module,
            )
            .optional()?)
    }

    /// Register a controller on a gateway-token poll (hawkBit's
    /// `findOrRegisterTargetIfItDoesNotExist`), or note that it polled again.
    pub fn register_ddi_target(&self, device_id: &str) -> anyhow::Result<Registered> {
        let mut c = self.conn();
        let tx = c.transaction()?;
        let t = now();
        let n = tx.execute(
            "UPDATE ota_ddi_targets SET last_poll = ?2 WHERE device_id = ?1",
            params![device_id, t],
        )?;
        if n > 0 {
            tx.commit()?;
            return Ok(Registered::Known);
        }
        let count: i64 = tx.query_row("SELECT COUNT(*) FROM ota_ddi_targets", [], |r| r.get(0))?;
        if count >= MAX_DDI_TARGETS {
            return Ok(Registered::Full);
        }
        tx.execute(
            "INSERT INTO ota_ddi_targets (device_id, registered_at, last_poll) VALUES (?1, ?2, ?2)",
            params![device_id, t],
        )?;
        tx.commit()?;
        Ok(Registered::New)
    }

    pub fn ddi_target(&self, device_id: &str) -> anyhow::Result<Option<DdiTarget>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT device_id, registered_at, last_poll FROM ota_ddi_targets WHERE device_id = ?1",
                params![device_id],
                row_to_ddi_target,
            )
            .optional()?)
    }

    pub fn ddi_targets(&self) -> anyhow::Result<Vec<DdiTarget>> {
        let c = self.conn();
        let mut stmt = c.prepare(
            "SELECT device_id, registered_at, last_poll FROM ota_ddi_targets ORDER BY device_id",
        )?;
        let rows = stmt.query_map([], row_to_ddi_target)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn action(&self, id: i64) -> anyhow::Result<Option<Action>> {
        action_opt(&self.conn(), id)
    }

    /// The device's open action (at most one), if any.
    pub fn open_action(&self, device_id: &str) -> anyhow::Result<Option<Action>> {
        Ok(self
            .conn()
            .query_row(
                &format!(
                    "SELECT {ACTION_COLS} FROM ota_actions
                      WHERE device_id = ?1 AND status IN ('running', 'canceling', 'confirming')
                      ORDER BY id DESC LIMIT 1"
                ),
                params![device_id],
                row_to_action,
            )
            .optional()?)
    }

    /// The device's last successfully closed action (hawkBit's `installedBase`).
    pub fn installed_action(&self, device_id: &str) -> anyhow::Result<Option<Action>> {
        Ok(self
            .conn()
            .query_row(
                &format!(
                    "SELECT {ACTION_COLS} FROM ota_actions
                      WHERE device_id = ?1 AND status = 'closed' ORDER BY id DESC LIMIT 1"
                ),
                params![device_id],
                row_to_action,
            )
            .optional()?)
    }

    pub fn actions(&self, device_id: Option<&str>) -> anyhow::Result<Vec<Action>> {
        let c = self.conn();
        let mut stmt = c.prepare(&format!(
            "SELECT {ACTION_COLS} FROM ota_actions
              WHERE ?1 IS NULL OR device_id = ?1 ORDER BY id"
        ))?;
        let rows = stmt.query_map(params![device_id], row_to_action)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Move an action from one of `from` to `to`; false when it was in none of them.
    pub fn set_action_status(&self, id: i64, from: &[&str], to: &str) -> anyhow::Result<bool> {
        let c = self.conn();
        let current: Option<String> = c
            .query_row(
                "SELECT status FROM ota_actions WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()?;
        match current {
            Some(s) if from.contains(&s.as_str()) => {
                c.execute(
                    "UPDATE ota_actions SET status = ?2, updated_at = ?3 WHERE id = ?1",
                    params![id, to, now()],
                )?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    pub fn add_feedback(
        &self,
        action_id: i64,
        endpoint: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<()> {
        self.conn().execute(
            "INSERT INTO ota_feedback (action_id, at, endpoint, body) VALUES (?1, ?2, ?3, ?4)",
            params![action_id, now(), endpoint, body.to_string()],
        )?;
        Ok(())
    }

    /// How many feedback statuses action `action_id` holds (hawkBit's quota counts these).
    pub fn feedback_count(&self, action_id: i64) -> anyhow::Result<usize> {
        let n: i64 = self.conn().query_row(
            "SELECT COUNT(*) FROM ota_feedback WHERE action_id = ?1",
            params![action_id],
            |r| r.get(0),
        )?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    /// The newest `limit` feedback entries, newest last (as [`Store::feedback`]).
    pub fn feedback_newest(
        &self,
        action_id: i64,
        limit: usize,
    ) -> anyhow::Result<Vec<FeedbackEntry>> {
        let c = self.conn();
        let mut stmt = c.prepare(
            "SELECT at, endpoint, body FROM (SELECT rowid AS r, at, endpoint, body FROM ota_feedback
              WHERE action_id = ?1 ORDER BY rowid DESC LIMIT ?2) ORDER BY r",
        )?;
        let rows = stmt.query_map(params![action_id, limit as i64], feedback_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn feedback(&self, action_id: i64) -> anyhow::Result<Vec<FeedbackEntry>> {
        let c = self.conn();
        let mut stmt = c.prepare(
            "SELECT at, endpoint, body FROM ota_feedback WHERE action_id = ?1 ORDER BY rowid",
        )?;
        let rows = stmt.query_map(params![action_id], feedback_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Set the device's DDI TargetToken (replacing the old one); only its hash is kept.
    pub fn set_target_token(&self, device_id: &str, token: &str) -> anyhow::Result<()> {
        self.conn().execute(
            "INSERT INTO ota_target_tokens (device_id, token_sha256) VALUES (?1, ?2)
             ON CONFLICT(device_id) DO UPDATE SET token_sha256 = excluded.token_sha256",
            params![device_id, token_sha256(token)],
        )?;
        Ok(())
    }

    pub fn target_token_valid(&self, device_id: &str, token: &str) -> anyhow::Result<bool> {
        let n: i64 = self.conn().query_row(
            "SELECT COUNT(*) FROM ota_target_tokens WHERE device_id = ?1 AND token_sha256 = ?2",
            params![device_id, token_sha256(token)],
            |r| r.get(0),
        )?;
        Ok(n > 0)
    }

    pub fn put_config_data(
        &self,
        device_id: &str,
        data: &std::collections::BTreeMap<String, String>,
    ) -> anyhow::Result<()> {
        self.conn().execute(
            "INSERT INTO ota_config_data (device_id, data, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(device_id) DO UPDATE SET data = excluded.data, updated_at = excluded.updated_at",
            params![device_id, serde_json::to_string(data)?, now()],
        )?;
        Ok(())
    }

    pub fn config_data(
        &self,
        device_id: &str,
    ) -> anyhow::Result<Option<std::collections::BTreeMap<String, String>>> {
        let text: Option<String> = self
            .conn()
            .query_row(
                "SELECT data FROM ota_config_data WHERE device_id = ?1",
                params![device_id],
                |r| r.get(0),
            )
            .optional()?;
        Ok(match text {
            Some(t) => Some(serde_json::from_str(&t)?),
            None => None,
        })
    }
}

/// Action `id` (present: just written in this transaction).
fn action_in(c: &rusqlite::Connection, id: i64) -> anyhow::Result<Action> {
    action_opt(c, id)?.ok_or_else(|| anyhow::anyhow!("action {id} vanished"))
}

fn action_opt(c: &rusqlite::Connection, id: i64) -> anyhow::Result<Option<Action>> {
    Ok(c.query_row(
        &format!("SELECT {ACTION_COLS} FROM ota_actions WHERE id = ?1"),
        params![id],
        row_to_action,
    )
    .optional()?)
}

fn row_to_ddi_target(r: &rusqlite::Row<'_>) -> rusqlite::Result<DdiTarget> {
    Ok(DdiTarget {
        device_id: r.get(0)?,
        registered_at: r.get(1)?,
        last_poll: r.get(2)?,
    })
}

fn auto_confirm_in(
    c: &rusqlite::Connection,
    device_id: &str,
) -> anyhow::Result<Option<AutoConfirm>> {
    Ok(c.query_row(
        "SELECT initiator, remark, activated_at FROM ota_auto_confirm WHERE device_id = ?1",
        params![device_id],
        |r| {
            Ok(AutoConfirm {
                initiator: r.get(0)?,
                remark: r.get(1)?,
                activated_at: r.get(2)?,
            })
        },
    )
    .optional()?)
}

fn auto_confirmed_message(a: &AutoConfirm) -> String {
    format!(
        "Assignment confirmed automatically (auto-confirmation by {}{})",
        a.initiator.as_deref().unwrap_or("the device"),
        a.remark
            .as_deref()
            .map(|r| format!(", remark: {r}"))
            .unwrap_or_default()
    )
}

/// A status the server itself adds to an action's history (hawkBit prefixes these
/// "Update Server: "), stored beside the device's feedback under endpoint `server`.
fn add_server_status(
    c: &rusqlite::Connection,
    action_id: i64,
    message: &str,
) -> anyhow::Result<()> {
    let body = serde_json::json!({
        "status": { "execution": "server", "details": [format!("Update Server: {message}")] }
    });
    c.execute(
        "INSERT INTO ota_feedback (action_id, at, endpoint, body) VALUES (?1, ?2, 'server', ?3)",
        params![action_id, now(), body.to_string()],
    )?;
    Ok(())
}

/// One `ota_feedback` row (`at, endpoint, body`); a body that is no longer JSON reads as null.
fn feedback_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<FeedbackEntry> {
    let body: String = r.get(2)?;
    Ok(FeedbackEntry {
        at: r.get(0)?,
        endpoint: r.get(1)?,
        body: serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn store_with_module() -> (tempfile::TempDir, Store, Module) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db")).unwrap();
        let m = s
            .add_module("os", "2.0", "os.raucb", 10, "aa", "bb", "cc")
            .unwrap();
        (dir, s, m)
    }

    #[test]
    fn auto_confirmation_confirms_the_waiting_action_and_later_ones_until_deactivated() {
        let (_d, s, m) = store_with_module();
        let waiting = s.assign("d", m.id, ActionKind::Forced, None, true).unwrap();
        assert_eq!(waiting.status, status::CONFIRMING);
        assert!(s.activate_auto_confirm("d", Some("ops"), None, 5).unwrap());
        assert!(
            !s.activate_auto_confirm("d", None, None, 6).unwrap(),
            "twice"
        );
        assert_eq!(s.auto_confirm("d").unwrap().unwrap().activated_at, 5);
        assert_eq!(
            s.action(waiting.id).unwrap().unwrap().status,
            status::RUNNING
        );
        assert!(
            s.feedback(waiting.id).unwrap()[0]
                .body
                .to_string()
                .contains("ops")
        );
        let next = s.assign("d", m.id, ActionKind::Forced, None, true).unwrap();
        assert_eq!(next.status, status::RUNNING);
        s.deactivate_auto_confirm("d").unwrap();
        assert_eq!(s.action(next.id).unwrap().unwrap().status, status::RUNNING);
        let later = s.assign("d", m.id, ActionKind::Forced, None, true).unwrap();
        assert_eq!(later.status, status::CONFIRMING);
        // Another device is not affected.
        assert!(s.auto_confirm("e").unwrap().is_none());
    }

    #[test]
    fn an_offline_install_is_news_once_and_never_while_an_action_is_open() {
        let (_d, s, m) = store_with_module();
        let a = s.record_offline_install("d", m.id).unwrap().unwrap();
        assert_eq!(a.status, status::CLOSED);
        assert_eq!(s.installed_action("d").unwrap().unwrap().id, a.id);
        assert!(s.record_offline_install("d", m.id).unwrap().is_none());
        let m2 = s
            .add_module("os", "3.0", "os.raucb", 10, "dd", "ee", "ff")
            .unwrap();
        assert_eq!(s.module_named("os", "3.0").unwrap().unwrap().id, m2.id);
        assert!(s.module_named("os", "9").unwrap().is_none());
        let open = s
            .assign("d", m2.id, ActionKind::Forced, None, false)
            .unwrap();
        assert!(s.record_offline_install("d", m2.id).unwrap().is_none());
        assert_eq!(s.action(open.id).unwrap().unwrap().status, status::RUNNING);
    }

    #[test]
    fn ddi_targets_register_once_and_stop_at_the_cap() {
        let (_d, s, _m) = store_with_module();
        assert_eq!(s.register_ddi_target("t1").unwrap(), Registered::New);
        assert_eq!(s.register_ddi_target("t1").unwrap(), Registered::Known);
        // Fill up to the cap directly (10,000 inserts through the API would be slow).
        s.conn()
            .execute_batch(&format!(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {})
                 INSERT INTO ota_ddi_targets SELECT 'x' || i, 't', 't' FROM n",
                MAX_DDI_TARGETS - 1
            ))
            .unwrap();
        assert_eq!(s.register_ddi_target("one-more").unwrap(), Registered::Full);
        assert!(s.ddi_target("one-more").unwrap().is_none());
        assert_eq!(s.register_ddi_target("t1").unwrap(), Registered::Known);
    }

    #[test]
    fn a_new_assignment_supersedes_the_open_one_and_status_moves_only_from_expected_states() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db")).unwrap();
        let m = s
            .add_module("os", "2.0", "os.raucb", 10, "aa", "bb", "cc")
            .unwrap();
        let a1 = s
            .assign("dev1", m.id, ActionKind::Forced, None, false)
            .unwrap();
        let a2 = s
            .assign("dev1", m.id, ActionKind::Soft, Some((100, 50)), false)
            .unwrap();
        assert_eq!(s.action(a1.id).unwrap().unwrap().status, status::CANCELED);
        assert_eq!(s.open_action("dev1").unwrap().unwrap().id, a2.id);
        assert_eq!(a2.window_open(120), Some(true));
        assert_eq!(a2.window_open(150), Some(false));
        assert!(
            !s.set_action_status(a1.id, &[status::RUNNING], status::CLOSED)
                .unwrap()
        );
        assert!(
            s.set_action_status(a2.id, &[status::RUNNING], status::CLOSED)
                .unwrap()
        );
        assert_eq!(s.installed_action("dev1").unwrap().unwrap().id, a2.id);
        assert!(s.open_action("dev1").unwrap().is_none());
    }
}
