//! What an operator may do: a Casbin policy (roles, device groups, actions), checked by the
//! terminal proxy before it opens any connection to a device.
//!
//! The request is `(subject, device, action)`. Subjects tried, in order: the operator's name
//! and each role from their token as `role:<name>`; any allow wins (the model is allow-only, so
//! trying subjects one by one is the same as asking once for all of them). Devices match a
//! policy's object directly, through a `g2` device-group line, or by `keyMatch` pattern.
//!
//! Actions: `terminal` (a shell), `terminal-readonly` (watch only; the device drops input).

use casbin::prelude::*;
use std::path::{Path, PathBuf};
use tokio::sync::RwLock;

/// The platform's model, used unless `terminal.policy_model` names another file.
pub const DEFAULT_MODEL: &str = include_str!("../casbin/model.conf");

pub const ACTION_TERMINAL: &str = "terminal";
pub const ACTION_TERMINAL_READONLY: &str = "terminal-readonly";

/// What an operator may do on one device's terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TerminalGrant {
    Full,
    ReadOnly,
    Denied,
}

pub struct Authz {
    model: Option<PathBuf>,
    policy: PathBuf,
    enforcer: RwLock<Enforcer>,
}

impl Authz {
    /// Load `policy` (CSV lines `p, …`, `g, …`, `g2, …`) under `model` (None: [`DEFAULT_MODEL`]).
    pub async fn load(model: Option<&Path>, policy: &Path) -> anyhow::Result<Self> {
        let enforcer = build(model, policy).await?;
        Ok(Self {
            model: model.map(Path::to_path_buf),
            policy: policy.to_path_buf(),
            enforcer: RwLock::new(enforcer),
        })
    }

    /// Reread model and policy (SIGHUP). On error the old policy stays in force.
    pub async fn reload(&self) -> anyhow::Result<()> {
        let fresh = build(self.model.as_deref(), &self.policy).await?;
        *self.enforcer.write().await = fresh;
        Ok(())
    }

    pub async fn terminal(&self, operator: &str, roles: &[String], device: &str) -> TerminalGrant {
        // User names and `role:`/`group:` subjects share one namespace in the policy: a user
        // called `role:admin` would get the admin role's grants. Such names are refused.
        if operator.contains(':') {
            tracing::warn!(
                operator,
                "operator name with ':' refused (it could name a role or group)"
            );
            return TerminalGrant::Denied;
        }
        let e = self.enforcer.read().await;
        let subjects = std::iter::once(operator.to_string())
            .chain(roles.iter().map(|r| format!("role:{r}")))
            .collect::<Vec<_>>();
        let allowed = |action: &str| {
            subjects.iter().any(|s| {
                e.enforce((s.as_str(), device, action))
                    .unwrap_or_else(|err| {
                        tracing::error!(error = %err, "policy evaluation failed; denying");
                        false
                    })
            })
        };
        if allowed(ACTION_TERMINAL) {
            TerminalGrant::Full
        } else if allowed(ACTION_TERMINAL_READONLY) {
            TerminalGrant::ReadOnly
        } else {
            TerminalGrant::Denied
        }
    }
}

/// Policy lines that would not mean what they say. keyMatch compares only what comes before
/// the first `*` (`dev-9*-lab` also matches `dev-9-prod`), so `*` must be an object's last
/// character; subjects must be a user name without `:`, or `role:`/`group:` names.
fn check_policy(text: &str) -> std::result::Result<(), String> {
    for (n, line) in text.lines().enumerate() {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.first() != Some(&"p") {
            continue;
        }
        if let Some(obj) = fields.get(2)
            && obj.find('*').is_some_and(|i| i + 1 != obj.len())
        {
            return Err(format!(
                "line {}: object {obj:?}: keyMatch ignores what follows `*` (it would match more than it says); put `*` last",
                n + 1
            ));
        }
        if let Some(sub) = fields.get(1)
            && let Some((ns, _)) = sub.split_once(':')
            && ns != "role"
        {
            return Err(format!(
                "line {}: subject {sub:?}: only `role:` subjects may contain ':'",
                n + 1
            ));
        }
    }
    Ok(())
}

async fn build(model: Option<&Path>, policy: &Path) -> anyhow::Result<Enforcer> {
    // Casbin's file adapter treats a missing file as an empty policy; a typo in the path
    // should not silently deny everyone, so check first.
    let text = std::fs::read_to_string(policy)
        .map_err(|e| anyhow::anyhow!("terminal.policy {}: {e}", policy.display()))?;
    check_policy(&text)
        .map_err(|e| anyhow::anyhow!("terminal.policy {}: {e}", policy.display()))?;
    let m = match model {
        Some(p) => DefaultModel::from_file(p)
            .await
            .map_err(|e| anyhow::anyhow!("terminal.policy_model {}: {e}", p.display()))?,
        None => DefaultModel::from_str(DEFAULT_MODEL).await?,
    };
    let adapter = FileAdapter::new(policy.to_path_buf());
    Enforcer::new(m, adapter)
        .await
        .map_err(|e| anyhow::anyhow!("terminal.policy {}: {e}", policy.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const POLICY: &str = "\
p, role:operator, group:line-3, terminal
p, role:auditor, *, terminal-readonly
p, root, *, terminal
p, carol, dev-9*, terminal
g, dave, role:operator
g2, dev-0042, group:line-3
";

    async fn authz(policy: &str) -> (tempfile::TempDir, Authz) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("policy.csv");
        std::fs::write(&p, policy).unwrap();
        let a = Authz::load(None, &p).await.unwrap();
        (d, a)
    }

    #[test]
    fn policies_that_would_not_mean_what_they_say_are_refused() {
        assert!(check_policy(POLICY).is_ok());
        let e = check_policy("p, carol, dev-9*-lab, terminal\n").unwrap_err();
        assert!(e.contains("line 1") && e.contains("put `*` last"), "{e}");
        let e = check_policy("g2, a, group:x\np, user:bob, *, terminal\n").unwrap_err();
        assert!(e.contains("line 2"), "{e}");
    }

    #[tokio::test]
    async fn a_user_named_like_a_role_gets_nothing() {
        let (_d, a) = authz("p, role:admin, *, terminal\n").await;
        assert_eq!(
            a.terminal("role:admin", &[], "dev-1").await,
            TerminalGrant::Denied
        );
        assert_eq!(
            a.terminal("alice", &roles(&["admin"]), "dev-1").await,
            TerminalGrant::Full
        );
    }

    fn roles(r: &[&str]) -> Vec<String> {
        r.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn roles_groups_and_patterns() {
        let (_d, a) = authz(POLICY).await;
        use TerminalGrant::*;
        // token role, device in the group
        assert_eq!(
            a.terminal("alice", &roles(&["operator"]), "dev-0042").await,
            Full
        );
        // token role, device outside the group
        assert_eq!(
            a.terminal("alice", &roles(&["operator"]), "dev-0043").await,
            Denied
        );
        // role given by the policy (g), not the token
        assert_eq!(a.terminal("dave", &[], "dev-0042").await, Full);
        assert_eq!(a.terminal("dave", &[], "dev-0043").await, Denied);
        // watch-only role
        assert_eq!(
            a.terminal("eve", &roles(&["auditor"]), "dev-0043").await,
            ReadOnly
        );
        // full beats read-only
        assert_eq!(
            a.terminal("alice", &roles(&["auditor", "operator"]), "dev-0042")
                .await,
            Full
        );
        // keyMatch pattern on the device id
        assert_eq!(a.terminal("carol", &[], "dev-901").await, Full);
        assert_eq!(a.terminal("carol", &[], "dev-801").await, Denied);
        assert_eq!(a.terminal("root", &[], "anything").await, Full);
        // a user named like a role does not get the role
        assert_eq!(a.terminal("operator", &[], "dev-0042").await, Denied);
        // nobody
        assert_eq!(
            a.terminal("mallory", &roles(&["guest"]), "dev-0042").await,
            Denied
        );
    }

    #[tokio::test]
    async fn reload_picks_up_changes_and_keeps_old_policy_on_error() {
        let (d, a) = authz(POLICY).await;
        let p = d.path().join("policy.csv");
        std::fs::write(&p, "p, mallory, *, terminal\n").unwrap();
        a.reload().await.unwrap();
        assert_eq!(a.terminal("mallory", &[], "x").await, TerminalGrant::Full);
        assert_eq!(a.terminal("root", &[], "x").await, TerminalGrant::Denied);
        std::fs::remove_file(&p).unwrap();
        let err = a.reload().await.unwrap_err().to_string();
        assert!(err.contains("terminal.policy"), "{err}");
        assert_eq!(a.terminal("mallory", &[], "x").await, TerminalGrant::Full);
    }

    #[tokio::test]
    async fn missing_policy_file_is_an_error_naming_the_key() {
        let err = Authz::load(None, Path::new("/nonexistent/policy.csv"))
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("terminal.policy /nonexistent/policy.csv"),
            "{err}"
        );
    }
}
