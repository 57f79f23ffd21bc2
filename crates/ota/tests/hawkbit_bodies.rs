#![allow(clippy::unwrap_used)]
//! The agent's reading of hawkBit's own example deployments (`thingsly-proto`'s fixtures, copied
//! from hawkBit's docs and model tests): what it would do with each.

use std::path::Path;
use thingsly_ota::engine::the_bundle;
use thingsly_proto::ddi::{Deployment, DeploymentBase, HandlingType, MaintenanceWindow};

fn fixture(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../proto/tests/fixtures/ddi")
            .join(name),
    )
    .unwrap()
}

#[test]
fn the_documented_three_chunk_deployment_is_refused_with_a_reason() {
    let d: DeploymentBase = serde_json::from_str(&fixture(
        "deploymentBase_GET_200_forced-forced-maintenanceWindow-available_3-chunks.json",
    ))
    .unwrap();
    let why = the_bundle(&d.deployment).unwrap_err();
    assert_eq!(
        why,
        "expected one RAUC bundle (one chunk with one artifact), got 3 chunks with 6 artifacts"
    );
}

#[test]
fn an_empty_deployment_is_refused_and_a_single_bundle_is_taken_with_its_https_link() {
    let d: DeploymentBase = serde_json::from_str(&fixture(
        "deploymentBase_object_forced-attempt_actionHistory_unknown-prop.json",
    ))
    .unwrap();
    assert!(
        the_bundle(&d.deployment)
            .unwrap_err()
            .contains("got 0 chunks")
    );
    assert_eq!(d.deployment.update, Some(HandlingType::Attempt));

    // hawkBit's chunk and artifact examples, put together as one deployment.
    let chunk: serde_json::Value =
        serde_json::from_str(&fixture("chunk_object_unknown-prop.json")).unwrap();
    let artifact: serde_json::Value = serde_json::from_str(&fixture(
        "softwaremodules-artifacts_GET_200_single-artifact-object.json",
    ))
    .unwrap();
    let mut chunk = chunk;
    chunk["artifacts"] = serde_json::json!([artifact]);
    let dep: Deployment = serde_json::from_value(serde_json::json!({
        "download": "forced", "update": "forced", "maintenanceWindow": "unavailable",
        "chunks": [chunk]
    }))
    .unwrap();
    let (_, a, url) = the_bundle(&dep).unwrap();
    assert!(url.starts_with("https://"), "{url}");
    assert_eq!(a.hashes.sha256.as_deref().map(str::len), Some(64));
    assert_eq!(dep.maintenance_window, Some(MaintenanceWindow::Unavailable));
}
