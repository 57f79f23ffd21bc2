//! hawkBit's Direct Device Integration API v1 (DDI), as hawkBit serves it: the bodies of the
//! root poll, `deploymentBase`, `cancelAction`, `confirmationBase`, feedback and `configData`.
//!
//! Like hawkBit's own models (`@JsonIgnoreProperties(ignoreUnknown = true)`), unknown fields are
//! tolerated; a known field of the wrong type or an unknown enum value is an error, so the
//! bridge can answer 400 where hawkBit does and the agent never guesses.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// `_links`: relation name → link. hawkBit sends HAL objects (`{"href": …}`).
pub type Links = BTreeMap<String, Link>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Link {
    pub href: String,
}

pub fn link(href: impl Into<String>) -> Link {
    Link { href: href.into() }
}

/// GET `/{tenant}/controller/v1/{controllerId}`: what the server wants from the device now.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ControllerBase {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<Config>,
    #[serde(rename = "_links", default, skip_serializing_if = "BTreeMap::is_empty")]
    pub links: Links,
}

impl ControllerBase {
    pub fn href(&self, rel: &str) -> Option<&str> {
        self.links.get(rel).map(|l| l.href.as_str())
    }
    /// The polling interval the server asks for, when it gives one that parses.
    pub fn sleep(&self) -> Option<Duration> {
        parse_sleep(&self.config.as_ref()?.polling.as_ref()?.sleep)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Config {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub polling: Option<Polling>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Polling {
    /// `HH:MM:SS`.
    pub sleep: String,
}

/// hawkBit's `HH:MM:SS` polling time.
pub fn parse_sleep(s: &str) -> Option<Duration> {
    let mut parts = s.split(':');
    let (h, m, sec) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let n = |p: &str| p.parse::<u64>().ok();
    let (h, m, sec) = (n(h)?, n(m)?, n(sec)?);
    (m < 60 && sec < 60).then(|| Duration::from_secs(h * 3600 + m * 60 + sec))
}

pub fn format_sleep(d: Duration) -> String {
    let s = d.as_secs();
    format!("{:02}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

/// `deploymentBase/{actionId}` (and `installedBase/{actionId}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentBase {
    pub id: String,
    pub deployment: Deployment,
    #[serde(
        rename = "actionHistory",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub action_history: Option<ActionHistory>,
    #[serde(rename = "_links", default, skip_serializing_if = "BTreeMap::is_empty")]
    pub links: Links,
}

/// `confirmationBase/{actionId}`: the same deployment under the key `confirmation`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfirmationBaseAction {
    pub id: String,
    pub confirmation: Deployment,
    #[serde(
        rename = "actionHistory",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub action_history: Option<ActionHistory>,
    #[serde(rename = "_links", default, skip_serializing_if = "BTreeMap::is_empty")]
    pub links: Links,
}

/// `confirmationBase`: whether the device confirms actions itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfirmationBase {
    #[serde(rename = "autoConfirm")]
    pub auto_confirm: AutoConfirm,
    #[serde(rename = "_links", default, skip_serializing_if = "BTreeMap::is_empty")]
    pub links: Links,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoConfirm {
    pub active: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initiator: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remark: Option<String>,
    /// Unix milliseconds.
    #[serde(
        rename = "activatedAt",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub activated_at: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HandlingType {
    Skip,
    Attempt,
    Forced,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MaintenanceWindow {
    Available,
    Unavailable,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download: Option<HandlingType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<HandlingType>,
    #[serde(
        rename = "maintenanceWindow",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub maintenance_window: Option<MaintenanceWindow>,
    pub chunks: Vec<Chunk>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    pub part: String,
    pub version: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<bool>,
    #[serde(default)]
    pub artifacts: Vec<Artifact>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metadata: Vec<Metadata>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub key: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Artifact {
    pub filename: String,
    #[serde(default)]
    pub hashes: Hashes,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(rename = "_links", default, skip_serializing_if = "BTreeMap::is_empty")]
    pub links: Links,
}

impl Artifact {
    /// The download link: `download` (https) first, then `download-http`.
    pub fn download_href(&self) -> Option<&str> {
        ["download", "download-http"]
            .iter()
            .find_map(|rel| self.links.get(*rel))
            .map(|l| l.href.as_str())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Hashes {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha1: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub md5: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionHistory {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(default)]
    pub messages: Vec<String>,
}

/// `cancelAction/{actionId}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cancel {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "cancelAction")]
    pub cancel_action: CancelActionToStop,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelActionToStop {
    #[serde(rename = "stopId")]
    pub stop_id: String,
}

/// POST `confirmationBase/{actionId}/feedback`: the device's consent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfirmationFeedback {
    pub confirmation: Confirmation,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(default)]
    pub details: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Confirmation {
    Confirmed,
    Denied,
}

/// POST `…/feedback` (deploymentBase, cancelAction, installedBase).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActionFeedback {
    /// Milliseconds since the epoch; the server fills it in when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<i64>,
    pub status: Status,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub execution: Execution,
    pub result: ResultStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(default)]
    pub details: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Execution {
    Closed,
    Proceeding,
    Canceled,
    Scheduled,
    Rejected,
    Resumed,
    Downloaded,
    Download,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultStatus {
    pub finished: Finished,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "empty_object_is_none"
    )]
    pub progress: Option<Progress>,
}

/// `"progress": {}` (what pengutronix's rauc-hawkbit client sends without progress) means
/// none; any other value must be a well-typed `Progress`.
fn empty_object_is_none<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Progress>, D::Error> {
    let v = Option::<serde_json::Value>::deserialize(d)?;
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Object(m)) if m.is_empty() => Ok(None),
        Some(v) => serde_json::from_value(v)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Finished {
    Success,
    Failure,
    None,
}

/// hawkBit's `DdiProgress`: `Integer cnt` (required) and `Integer of`, so any int32, negative
/// included, and nothing beyond it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub cnt: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub of: Option<i32>,
}

impl ActionFeedback {
    pub fn new(execution: Execution, finished: Finished, details: Vec<String>) -> Self {
        ActionFeedback {
            timestamp: None,
            status: Status {
                execution,
                result: ResultStatus {
                    finished,
                    progress: None,
                },
                code: None,
                details,
            },
        }
    }
    pub fn progress(mut self, cnt: i32, of: i32) -> Self {
        self.status.result.progress = Some(Progress { cnt, of: Some(of) });
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConfigDataMode {
    Merge,
    Replace,
    Remove,
}

/// PUT `configData`: the device's attributes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigData {
    pub data: BTreeMap<String, String>,
    /// Absent means merge; `null` is refused (a mode that says nothing is a client bug).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_mode"
    )]
    pub mode: Option<ConfigDataMode>,
}

fn present_mode<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<ConfigDataMode>, D::Error> {
    ConfigDataMode::deserialize(d).map(Some)
}

/// hawkBit's error body (`ExceptionInfo`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExceptionInfo {
    #[serde(rename = "exceptionClass", default)]
    pub exception_class: String,
    #[serde(rename = "errorCode", default)]
    pub error_code: String,
    #[serde(default)]
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleep_round_trips_and_rejects_nonsense() {
        assert_eq!(parse_sleep("00:00:10"), Some(Duration::from_secs(10)));
        assert_eq!(parse_sleep("12:00:00"), Some(Duration::from_secs(43200)));
        assert_eq!(format_sleep(Duration::from_secs(3725)), "01:02:05");
        for bad in ["123", "", "1:2", "00:61:00", "a:b:c", "1:2:3:4"] {
            assert_eq!(parse_sleep(bad), None, "{bad}");
        }
    }

    #[test]
    fn an_empty_progress_is_none_and_a_bad_one_an_error() {
        let ok: ResultStatus = serde_json::from_str(r#"{"finished":"none","progress":{}}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ok.progress, None);
        assert!(
            serde_json::from_str::<ResultStatus>(r#"{"finished":"none","progress":{"cnt":[1]}}"#)
                .is_err()
        );
    }

    #[test]
    fn progress_is_int32_like_hawkbits_integer() {
        let neg: ResultStatus =
            serde_json::from_str(r#"{"finished":"none","progress":{"cnt":-5,"of":-1}}"#)
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            neg.progress,
            Some(Progress {
                cnt: -5,
                of: Some(-1)
            })
        );
        for big in [r#"{"cnt":2147483648}"#, r#"{"cnt":1,"of":4294967296}"#] {
            let body = format!(r#"{{"finished":"none","progress":{big}}}"#);
            assert!(
                serde_json::from_str::<ResultStatus>(&body).is_err(),
                "{big}"
            );
        }
    }

    #[test]
    fn config_data_mode_may_be_absent_but_not_null() {
        let absent: ConfigData = serde_json::from_str(r#"{"data":{"a":"1"}}"#).unwrap();
        assert_eq!(absent.mode, None);
        let replace: ConfigData = serde_json::from_str(r#"{"data":{},"mode":"replace"}"#).unwrap();
        assert_eq!(replace.mode, Some(ConfigDataMode::Replace));
        assert!(serde_json::from_str::<ConfigData>(r#"{"data":{},"mode":null}"#).is_err());
    }

    #[test]
    fn feedback_serialises_like_hawkbit_expects() {
        let f = ActionFeedback::new(Execution::Proceeding, Finished::None, vec!["x".into()])
            .progress(3, 10);
        assert_eq!(
            serde_json::to_string(&f).unwrap_or_default(),
            r#"{"status":{"execution":"proceeding","result":{"finished":"none","progress":{"cnt":3,"of":10}},"details":["x"]}}"#
        );
    }
}
