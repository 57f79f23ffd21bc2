#![allow(clippy::unwrap_used)]
//! Every hawkBit DDI body in `fixtures/ddi` (copied from hawkBit's docs and model tests): the
//! valid ones parse (unknown fields tolerated), the `INVALID` ones are errors, never panics.

use serde::de::DeserializeOwned;
use std::path::Path;
use thingsly_proto::ddi::*;

fn check<T: DeserializeOwned + std::fmt::Debug>(text: &str) -> Result<(), String> {
    serde_json::from_str::<T>(text)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The DDI type a fixture's name says it holds (`<endpoint>_<METHOD|object>_…`).
fn parse_as(name: &str, text: &str) -> Option<Result<(), String>> {
    let prefix = |p: &str| name.starts_with(p);
    Some(if prefix("controllerBase") {
        check::<ControllerBase>(text)
    } else if prefix("deploymentBase-feedback") || prefix("cancelAction-feedback") {
        check::<ActionFeedback>(text)
    } else if prefix("deploymentBase") {
        check::<DeploymentBase>(text)
    } else if prefix("deployment_") {
        check::<Deployment>(text)
    } else if prefix("confirmationBase-action") {
        check::<ConfirmationBaseAction>(text)
    } else if prefix("confirmationBase_") {
        check::<ConfirmationBase>(text)
    } else if prefix("cancelAction-stop") {
        check::<CancelActionToStop>(text)
    } else if prefix("cancelAction_") {
        check::<Cancel>(text)
    } else if prefix("configData") {
        check::<ConfigData>(text)
    } else if prefix("config_") {
        check::<Config>(text)
    } else if prefix("polling") {
        check::<Polling>(text)
    } else if prefix("feedback-status") {
        check::<Status>(text)
    } else if prefix("feedback-result") {
        check::<ResultStatus>(text)
    } else if prefix("feedback-progress") {
        check::<Progress>(text)
    } else if prefix("actionHistory") {
        check::<ActionHistory>(text)
    } else if prefix("artifact-hashes") {
        check::<Hashes>(text)
    } else if prefix("artifact_") || prefix("softwaremodules-artifacts") {
        check::<Artifact>(text)
    } else if prefix("chunk-metadata") {
        check::<Metadata>(text)
    } else if prefix("chunk_") {
        check::<Chunk>(text)
    } else {
        return None;
    })
}

#[test]
fn every_hawkbit_body_parses_or_is_rejected_as_hawkbit_does() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ddi");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !name.ends_with(".json") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let outcome = parse_as(&name, &text).unwrap_or_else(|| panic!("no type for {name}"));
        if name.contains("INVALID") {
            assert!(outcome.is_err(), "{name} must be rejected");
        } else {
            assert!(outcome.is_ok(), "{name}: {outcome:?}");
        }
        checked += 1;
    }
    assert_eq!(checked, 47, "fixture count changed");
}

#[test]
fn the_documented_deployment_reads_as_hawkbit_means_it() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ddi");
    let text = std::fs::read_to_string(
        dir.join("deploymentBase_GET_200_forced-forced-maintenanceWindow-available_3-chunks.json"),
    )
    .unwrap();
    let d: DeploymentBase = serde_json::from_str(&text).unwrap();
    assert_eq!(d.id, "8");
    assert_eq!(d.deployment.update, Some(HandlingType::Forced));
    assert_eq!(
        d.deployment.maintenance_window,
        Some(MaintenanceWindow::Available)
    );
    assert_eq!(d.deployment.chunks.len(), 3);
    let a = &d.deployment.chunks[0].artifacts[0];
    assert_eq!(a.size, Some(13));
    assert!(a.download_href().unwrap().starts_with("https://"));
    let root: ControllerBase = serde_json::from_str(
        &std::fs::read_to_string(
            dir.join("controllerBase_GET_200_deploymentBase-installedBase-configData-links.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        root.sleep(),
        Some(std::time::Duration::from_secs(12 * 3600))
    );
    assert!(
        root.href("deploymentBase")
            .unwrap()
            .contains("/deploymentBase/5?c=")
    );
}
