//! hawkBit's DDI behaviour, endpoint by endpoint, against a real `thingsly-bridge serve`; and
//! SWUpdate's suricatta (Debian's `swupdate`, a third-party DDI client used unchanged) through a
//! maintenance window.
//!
//! Each case cites where hawkBit says what it does: its DDI resource
//! (`hawkbit-ddi/hawkbit-ddi-resource/.../DdiRootController.java`), its management layer
//! (`hawkbit-repository-jpa/.../JpaControllerManagement.java`, `JpaConfirmationManagement.java`,
//! `OfflineDsAssignmentStrategy.java`), its error codes (`hawkbit-core/.../SpServerError.java`)
//! or its OpenAPI spec (docs/rest-api/ddi.html, v1). The request bodies come from hawkBit's own
//! tests (`crates/proto/tests/fixtures/ddi`, see its README for each file's origin).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use thingsly_e2e::*;

const GATEWAY: &str = "gw-secret-0123456789abcdef";

enum Auth<'a> {
    Gateway,
    Target(&'a str),
    None,
}

struct Resp {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    /// hawkBit's `ExceptionInfo` error code.
    fn error_code(&self) -> String {
        self.json()["errorCode"].as_str().unwrap_or("").to_string()
    }
    fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    }
}

struct Ddi {
    _t: tempfile::TempDir,
    dir: PathBuf,
    bridge: Bridge,
    http: reqwest::Client,
}

impl Ddi {
    fn start() -> Self {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().to_path_buf();
        let gw = dir.join("gateway-token");
        std::fs::write(&gw, GATEWAY).unwrap();
        let mut bridge = Bridge::init_with(
            &dir.join("bridge"),
            &format!(
                "[ddi]\npolling_sleep = \"1s\"\ngateway_token_file = \"{}\"\n",
                gw.display()
            ),
        )
        .unwrap();
        bridge.start().unwrap();
        let http = bridge.http().unwrap();
        Ddi {
            _t: t,
            dir,
            bridge,
            http,
        }
    }

    fn url(&self, cid: &str, rest: &str) -> String {
        format!("{}/DEFAULT/controller/v1/{cid}{rest}", self.bridge.url())
    }

    async fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        auth: &Auth<'_>,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Resp {
        let mut r = self.http.request(method, url);
        r = match auth {
            Auth::Gateway => r.header("Authorization", format!("GatewayToken {GATEWAY}")),
            Auth::Target(t) => r.header("Authorization", format!("TargetToken {t}")),
            Auth::None => r,
        };
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        if let Some(b) = body {
            r = r
                .header("Content-Type", "application/json")
                .body(b.to_vec());
        }
        let resp = r.send().await.unwrap();
        Resp {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: resp.bytes().await.unwrap().to_vec(),
        }
    }

    async fn get(&self, cid: &str, rest: &str, auth: &Auth<'_>) -> Resp {
        self.send(reqwest::Method::GET, &self.url(cid, rest), auth, &[], None)
            .await
    }

    async fn post(&self, cid: &str, rest: &str, body: &[u8]) -> Resp {
        self.send(
            reqwest::Method::POST,
            &self.url(cid, rest),
            &Auth::Gateway,
            &[],
            Some(body),
        )
        .await
    }

    async fn put(&self, cid: &str, rest: &str, body: &[u8]) -> Resp {
        self.send(
            reqwest::Method::PUT,
            &self.url(cid, rest),
            &Auth::Gateway,
            &[],
            Some(body),
        )
        .await
    }

    /// A module with a small artifact; returns its id.
    fn module(&self, name: &str, version: &str) -> i64 {
        let f = self.dir.join(format!("{name}-{version}.bin"));
        std::fs::write(&f, format!("payload of {name} {version}\n").repeat(100)).unwrap();
        self.bridge.ota_upload(&f, name, version).unwrap()["id"]
            .as_i64()
            .unwrap()
    }

    fn assign(&self, module: i64, device: &str, extra: &[&str]) -> i64 {
        let mut args = vec!["--device", device];
        args.extend_from_slice(extra);
        self.bridge.ota_assign(module, &args).unwrap()[0]["id"]
            .as_i64()
            .unwrap()
    }

    fn action(&self, id: i64) -> serde_json::Value {
        serde_json::from_str(&self.bridge.cli(&["ota", "show", &id.to_string()]).unwrap()).unwrap()
    }
}

fn fixture(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../crates/proto/tests/fixtures/ddi")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn link(root: &serde_json::Value, rel: &str) -> Option<String> {
    root["_links"][rel]["href"].as_str().map(String::from)
}

/// `findOrRegisterTargetIfItDoesNotExist` (JpaControllerManagement, called by
/// DdiRootController.getControllerBase): an unknown controller polling with the gateway token is
/// registered, then operators see it, can assign to it and give it a TargetToken. It is not
/// an enrolled device (no certificate), and nothing without authentication registers anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_controller_registers_on_its_first_gateway_poll() {
    let d = Ddi::start();
    // No credentials: 401, and nothing registered.
    assert_eq!(d.get("gw-1", "", &Auth::None).await.status, 401);
    assert_eq!(d.bridge.cli(&["ota", "targets"]).unwrap().trim(), "[]");

    let r = d.get("gw-1", "", &Auth::Gateway).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let targets: serde_json::Value =
        serde_json::from_str(&d.bridge.cli(&["ota", "targets"]).unwrap()).unwrap();
    assert_eq!(targets[0]["device_id"], "gw-1", "{targets}");
    let dev: serde_json::Value = serde_json::from_str(
        &d.bridge
            .cli(&["ota", "device", "--device", "gw-1"])
            .unwrap(),
    )
    .unwrap();
    assert_eq!(dev["registration"], "ddi", "{dev}");
    // Not an enrolled device: the registry of certificates does not list it.
    assert!(!d.bridge.cli(&["devices"]).unwrap().contains("gw-1"));

    // Assignable, and its poll then shows the deployment.
    let m = d.module("app", "1.0");
    let a = d.assign(m, "gw-1", &[]);
    let root = d.get("gw-1", "", &Auth::Gateway).await.json();
    assert!(
        link(&root, "deploymentBase")
            .unwrap()
            .contains(&format!("/deploymentBase/{a}")),
        "{root}"
    );
    // A TargetToken for it works; a wrong one does not.
    let token = d
        .bridge
        .cli(&["ota", "target-token", "--device", "gw-1"])
        .unwrap();
    assert_eq!(
        d.get("gw-1", "", &Auth::Target(token.trim())).await.status,
        200
    );
    assert_eq!(d.get("gw-1", "", &Auth::Target("nope")).await.status, 401);
    // An id the registry cannot hold: refused with hawkBit's JSON error body.
    let r = d.get("bad%20id", "", &Auth::Gateway).await;
    assert_eq!(r.status, 400);
    assert!(!r.error_code().is_empty());
    // An id that was never registered cannot be assigned.
    assert!(
        d.bridge
            .ota_assign(m, &["--device", "never-polled"])
            .is_err()
    );
}

/// `PUT installedBase` (DdiRootController.setAssignedOfflineVersion ->
/// JpaControllerManagement.updateOfflineAssignedVersion): 201 when the target's installed set
/// changed, 200 when it runs that already, 404 for a set the server does not have
/// (`findByNameAndVersion`), 400 for a body without the required name and version
/// (`DdiAssignedVersion`). OfflineDsAssignmentStrategy leaves a target with a pending action
/// alone, records a finished action otherwise, which the root then links as `installedBase`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installed_base_is_declared_by_the_device() {
    let d = Ddi::start();
    d.get("dev-ib", "", &Auth::Gateway).await;
    let m1 = d.module("app", "1.0");
    let body = br#"{"name":"app","version":"1.0"}"#;
    assert_eq!(d.put("dev-ib", "/installedBase", body).await.status, 201);
    assert_eq!(d.put("dev-ib", "/installedBase", body).await.status, 200);
    let r = d
        .put(
            "dev-ib",
            "/installedBase",
            br#"{"name":"app","version":"9.9"}"#,
        )
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code(), "hawkbit.server.error.repo.entityNotFound");
    let r = d
        .put("dev-ib", "/installedBase", br#"{"name":"app"}"#)
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.error_code(), "hawkbit.server.error.rest.body.notReadable");

    let root = d.get("dev-ib", "", &Auth::Gateway).await.json();
    let installed = link(&root, "installedBase").expect("installedBase link");
    let ib = d
        .send(reqwest::Method::GET, &installed, &Auth::Gateway, &[], None)
        .await;
    assert_eq!(ib.status, 200);
    assert_eq!(ib.json()["deployment"]["chunks"][0]["version"], "1.0");
    let id: i64 = installed.rsplit('/').next().unwrap().parse().unwrap();
    let a = d.action(id);
    assert_eq!(a["action"]["module_id"], m1);
    assert!(
        a["feedback"].to_string().contains("offline deployment"),
        "{a}"
    );

    // A pending action: the declaration changes nothing (200), the action stays open.
    let m2 = d.module("app", "2.0");
    let pending = d.assign(m2, "dev-ib", &[]);
    let two = br#"{"name":"app","version":"2.0"}"#;
    assert_eq!(d.put("dev-ib", "/installedBase", two).await.status, 200);
    assert_eq!(d.action(pending)["action"]["status"], "running");
    // installedBase/{id} of an action still running: 404 (getControllerInstalledAction).
    assert_eq!(
        d.get(
            "dev-ib",
            &format!("/installedBase/{pending}"),
            &Auth::Gateway
        )
        .await
        .status,
        404
    );
}

/// Auto-confirmation (DdiRootController.getConfirmationBase / activateAutoConfirmation /
/// deactivateAutoConfirmation, JpaConfirmationManagement, DataConversionHelper
/// .createConfirmationBase): the state with initiator, remark and activatedAt; the link that
/// switches it; activating confirms the waiting action and every later one; activating twice
/// is 409 `autoConfAlreadyActive`; deactivating leaves running actions alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_confirmation_is_kept_and_shown() {
    let d = Ddi::start();
    let cb = d.get("dev-ac", "/confirmationBase", &Auth::Gateway).await;
    assert_eq!(cb.status, 200);
    let cb = cb.json();
    assert_eq!(cb["autoConfirm"]["active"], false, "{cb}");
    assert!(link(&cb, "activateAutoConfirm").is_some(), "{cb}");
    assert!(link(&cb, "deactivateAutoConfirm").is_none(), "{cb}");

    let m = d.module("app", "1.0");
    let waiting = d.assign(m, "dev-ac", &["--confirm"]);
    let cb = d
        .get("dev-ac", "/confirmationBase", &Auth::Gateway)
        .await
        .json();
    assert!(
        link(&cb, "confirmationBase")
            .unwrap()
            .contains(&format!("/confirmationBase/{waiting}")),
        "{cb}"
    );

    let r = d
        .post(
            "dev-ac",
            "/confirmationBase/activateAutoConfirm",
            br#"{"initiator":"ops-team","remark":"field trial"}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(d.action(waiting)["action"]["status"], "running");
    let cb = d
        .get("dev-ac", "/confirmationBase", &Auth::Gateway)
        .await
        .json();
    assert_eq!(cb["autoConfirm"]["active"], true, "{cb}");
    assert_eq!(cb["autoConfirm"]["initiator"], "ops-team");
    assert_eq!(cb["autoConfirm"]["remark"], "field trial");
    assert!(cb["autoConfirm"]["activatedAt"].as_i64().unwrap() > 1_700_000_000_000);
    assert!(link(&cb, "deactivateAutoConfirm").is_some(), "{cb}");

    let again = d
        .post("dev-ac", "/confirmationBase/activateAutoConfirm", b"")
        .await;
    assert_eq!(again.status, 409);
    assert_eq!(
        again.error_code(),
        "hawkbit.server.error.repo.autoConfAlreadyActive"
    );
    // While active, a new action needing consent is confirmed on creation.
    let auto = d.assign(m, "dev-ac", &["--confirm"]);
    assert_eq!(d.action(auto)["action"]["status"], "running");
    assert!(
        d.action(auto)["feedback"].to_string().contains("ops-team"),
        "the history says who confirmed"
    );

    let r = d
        .post("dev-ac", "/confirmationBase/deactivateAutoConfirm", b"")
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(d.action(auto)["action"]["status"], "running");
    let cb = d
        .get("dev-ac", "/confirmationBase", &Auth::Gateway)
        .await
        .json();
    assert_eq!(cb["autoConfirm"]["active"], false);
    let later = d.assign(m, "dev-ac", &["--confirm"]);
    assert_eq!(d.action(later)["action"]["status"], "confirming");
}

/// Feedback bodies from hawkBit's own tests: what they require rejected gets 400 with the JSON
/// error body (`SP_REST_BODY_NOT_READABLE`), what they require tolerated (unknown properties,
/// no timestamp) gets 200 (DdiActionFeedbackTest, DdiStatusTest, DdiProgressTest,
/// DdiConfigDataTest; DdiDeploymentBaseTest.invalidIdInFeedbackReturnsBadRequest,
/// DdiCancelActionTest). Progress is `Integer` (DdiProgress): negative values are int32 too,
/// beyond int32 is not. configData `mode` is an enum: `null` is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hawkbits_own_bodies_get_hawkbits_answers() {
    let d = Ddi::start();
    d.get("dev-fb", "", &Auth::Gateway).await;
    let m = d.module("app", "1.0");
    let a = d.assign(m, "dev-fb", &[]);
    let fb = format!("/deploymentBase/{a}/feedback");
    for bad in [
        "deploymentBase-feedback_POST_request_INVALID_id-not-numeric_broken-details.json",
        "deploymentBase-feedback_POST_request_INVALID_wrong-types.json",
        "cancelAction-feedback_POST_request_INVALID_unknown-execution.json",
        "cancelAction-feedback_POST_request_INVALID_id-not-numeric.json",
    ] {
        let r = d.post("dev-fb", &fb, &fixture(bad)).await;
        assert_eq!(r.status, 400, "{bad}");
        assert_eq!(
            r.error_code(),
            "hawkbit.server.error.rest.body.notReadable",
            "{bad}"
        );
    }
    let ok = d
        .post(
            "dev-fb",
            &fb,
            &fixture("deploymentBase-feedback_POST_request_download_no-timestamp.json"),
        )
        .await;
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
    let status_with = |s: &str| format!(r#"{{"status":{s}}}"#);
    for (status, want) in [
        (
            String::from_utf8(fixture(
                "feedback-status_object_proceeding_progress-30-of-100_unknown-prop.json",
            ))
            .unwrap(),
            200,
        ),
        (
            r#"{"execution":"proceeding","result":{"finished":"none","progress":{"cnt":-1,"of":-1}}}"#.into(),
            200,
        ),
        (
            r#"{"execution":"proceeding","result":{"finished":"none","progress":{"cnt":2147483648,"of":1}}}"#.into(),
            400,
        ),
        (
            String::from_utf8(fixture("feedback-status_object_INVALID_execution-array.json"))
                .unwrap(),
            400,
        ),
    ] {
        let r = d.post("dev-fb", &fb, status_with(&status).as_bytes()).await;
        assert_eq!(r.status, want, "{status}: {}", String::from_utf8_lossy(&r.body));
    }

    for (body, want) in [
        (fixture("configData_PUT_request_mode-merge.json"), 200),
        (
            fixture("configData_PUT_request_mode-replace_unknown-prop.json"),
            200,
        ),
        (
            fixture("configData_PUT_request_legacy-id-time-status-fields.json"),
            200,
        ),
        (
            fixture("configData_PUT_request_INVALID_mode-array.json"),
            400,
        ),
        (br#"{"data":{"a":"1"},"mode":null}"#.to_vec(), 400),
    ] {
        let r = d.put("dev-fb", "/configData", &body).await;
        assert_eq!(
            r.status,
            want,
            "{}: {}",
            String::from_utf8_lossy(&body),
            String::from_utf8_lossy(&r.body)
        );
        if want == 400 {
            assert_eq!(r.error_code(), "hawkbit.server.error.rest.body.notReadable");
        }
    }
}

/// Artifacts (DdiRootController.downloadArtifact, FileStreamingUtil, writeMD5FileResponse) and
/// the errors the framework raises before a handler (hawkBit's ResponseExceptionHandler answers
/// them with `ExceptionInfo` JSON): the ETag is the artifact's SHA-1, a wrong `If-Match` is
/// 412, `.MD5SUM` is "<md5>  <filename>" without a newline, a HEAD is not a download; a bad
/// query parameter or a wrong method gets the JSON error body, not plain text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_and_framework_errors_answer_as_hawkbit() {
    let d = Ddi::start();
    d.get("dev-ar", "", &Auth::Gateway).await;
    let m = d.module("app", "1.0");
    let a = d.assign(m, "dev-ar", &[]);
    let dep = d
        .get("dev-ar", &format!("/deploymentBase/{a}"), &Auth::Gateway)
        .await
        .json();
    let art = &dep["deployment"]["chunks"][0]["artifacts"][0];
    let url = art["_links"]["download"]["href"]
        .as_str()
        .unwrap()
        .to_string();
    let sha1 = art["hashes"]["sha1"].as_str().unwrap().to_string();
    let md5 = art["hashes"]["md5"].as_str().unwrap().to_string();
    let filename = art["filename"].as_str().unwrap().to_string();

    let head = d
        .send(reqwest::Method::HEAD, &url, &Auth::Gateway, &[], None)
        .await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("etag"), format!("\"{sha1}\""));
    let log = || {
        std::fs::read_dir(d.dir.join("bridge"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect::<String>()
    };
    assert!(
        !log().contains("artifact download"),
        "a HEAD was logged as a download"
    );

    let wrong = d
        .send(
            reqwest::Method::GET,
            &url,
            &Auth::Gateway,
            &[("If-Match", "\"0000\"")],
            None,
        )
        .await;
    assert_eq!(wrong.status, 412);
    let etag = format!("\"{sha1}\"");
    let right = d
        .send(
            reqwest::Method::GET,
            &url,
            &Auth::Gateway,
            &[("If-Match", etag.as_str())],
            None,
        )
        .await;
    assert_eq!(right.status, 200);
    assert_eq!(right.body.len() as u64, art["size"].as_u64().unwrap());
    wait_for("the download logged", Duration::from_secs(5), || {
        log().contains("artifact download")
    });

    let md5sum = d
        .send(
            reqwest::Method::GET,
            &format!("{url}.MD5SUM"),
            &Auth::Gateway,
            &[],
            None,
        )
        .await;
    assert_eq!(md5sum.status, 200);
    assert_eq!(
        String::from_utf8(md5sum.body).unwrap(),
        format!("{md5}  {filename}")
    );

    // Errors before any handler: hawkBit's JSON body, not plain text.
    let r = d
        .get(
            "dev-ar",
            &format!("/deploymentBase/{a}?actionHistory=many"),
            &Auth::Gateway,
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(
        r.header("content-type").contains("json"),
        "{}",
        r.header("content-type")
    );
    assert!(!r.error_code().is_empty());
    let r = d
        .send(
            reqwest::Method::DELETE,
            &d.url("dev-ar", ""),
            &Auth::Gateway,
            &[],
            None,
        )
        .await;
    assert_eq!(r.status, 405);
    assert!(!r.error_code().is_empty());
}

/// The maintenance window as DdiRootController computes it (calculateUpdateType,
/// calculateMaintenanceWindow) on the real binary: while closed `update` is `skip` with
/// `maintenanceWindow: unavailable`; open, `forced` with `available`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_window_says_skip() {
    let d = Ddi::start();
    d.get("dev-mw", "", &Auth::Gateway).await;
    let m = d.module("app", "1.0");
    let closed = d.assign(
        m,
        "dev-mw",
        &["--window-start", "+1h", "--window-duration", "1h"],
    );
    let dep = d
        .get(
            "dev-mw",
            &format!("/deploymentBase/{closed}"),
            &Auth::Gateway,
        )
        .await
        .json();
    assert_eq!(dep["deployment"]["download"], "forced", "{dep}");
    assert_eq!(dep["deployment"]["update"], "skip", "{dep}");
    assert_eq!(
        dep["deployment"]["maintenanceWindow"], "unavailable",
        "{dep}"
    );
    let open = d.assign(
        m,
        "dev-mw",
        &["--window-start", "+0s", "--window-duration", "1h"],
    );
    let dep = d
        .get("dev-mw", &format!("/deploymentBase/{open}"), &Auth::Gateway)
        .await
        .json();
    assert_eq!(dep["deployment"]["update"], "forced", "{dep}");
    assert_eq!(dep["deployment"]["maintenanceWindow"], "available", "{dep}");
}

/// `issue-server-cert` with bare file names writes them into the current directory.
#[test]
fn issue_server_cert_takes_relative_paths() {
    let t = tempfile::tempdir().unwrap();
    let b = Bridge::init(&t.path().join("b")).unwrap();
    let out = Command::new(bin("thingsly-bridge"))
        .current_dir(t.path())
        .arg("--config")
        .arg(&b.config)
        .args([
            "issue-server-cert",
            "--name",
            "broker.local",
            "--out-cert",
            "server.pem",
            "--out-key",
            "server.key",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(t.path().join("server.pem").exists());
    assert!(t.path().join("server.key").exists());
}

// ----------------------------------------------------------------------------- SWUpdate

/// A signed SWUpdate image (CMS, as Debian's swupdate is built) holding `payload`, written by
/// the raw handler to `target`.
fn build_swu(dir: &Path, payload: &[u8], target: &Path) -> (PathBuf, PathBuf) {
    use sha2::Digest;
    std::fs::create_dir_all(dir).unwrap();
    let run = |cmd: &mut Command| {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let cert = dir.join("signer.crt");
    run(Command::new("openssl").current_dir(dir).args([
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "signer.key",
        "-out",
        "signer.crt",
        "-days",
        "2",
        "-subj",
        "/CN=swu-signer",
        "-addext",
        "extendedKeyUsage=emailProtection",
    ]));
    std::fs::write(dir.join("payload.img"), payload).unwrap();
    let sha = hex::encode(sha2::Sha256::digest(payload));
    std::fs::write(
        dir.join("sw-description"),
        format!(
            "software =\n{{\n\tversion = \"2.0.0\";\n\thardware-compatibility = [ \"1.0\" ];\n\timages: (\n\t\t{{\n\t\t\tfilename = \"payload.img\";\n\t\t\tdevice = \"{}\";\n\t\t\ttype = \"raw\";\n\t\t\tsha256 = \"{sha}\";\n\t\t}}\n\t);\n}}\n",
            target.display()
        ),
    )
    .unwrap();
    run(Command::new("openssl").current_dir(dir).args([
        "cms",
        "-sign",
        "-in",
        "sw-description",
        "-out",
        "sw-description.sig",
        "-signer",
        "signer.crt",
        "-inkey",
        "signer.key",
        "-outform",
        "DER",
        "-nosmimecap",
        "-binary",
    ]));
    // sw-description first, its signature second: SWUpdate reads the archive as a stream.
    let swu = dir.join("update.swu");
    let out = Command::new("sh")
        .current_dir(dir)
        .arg("-c")
        .arg(format!(
            "printf 'sw-description\\nsw-description.sig\\npayload.img\\n' | cpio -o -H crc --quiet > {}",
            swu.display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cpio: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (swu, cert)
}

/// `swupdate -u` (suricatta, hawkBit mode) in its own process group, killed with it.
struct Swupdate {
    child: std::process::Child,
    log: PathBuf,
}

impl Swupdate {
    fn start(dir: &Path, name: &str, cfg: &Path, cert: &Path, confirm: Option<u8>) -> Self {
        use std::os::unix::process::CommandExt;
        let run = dir.join("run");
        std::fs::create_dir_all(&run).unwrap();
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let suricatta = match confirm {
            Some(c) => format!("-t DEFAULT -c {c}"),
            None => "-t DEFAULT".to_string(),
        };
        let child = Command::new("swupdate")
            .args(["-v", "-f"])
            .arg(cfg)
            .arg("-k")
            .arg(cert)
            .args(["-H", "board:1.0", "-u", &suricatta])
            // Its IPC sockets go to $TMPDIR: private to this test.
            .env("TMPDIR", &run)
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0)
            .spawn()
            .expect("swupdate (Debian package swupdate)");
        Swupdate { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Swupdate {
    fn drop(&mut self) {
        // SAFETY-free: signals our own child's process group (suricatta forks helpers).
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// SWUpdate's suricatta decides on `update` alone (server_hawkbit.c: `skip` is reported as
/// closed "Skipped Update." without downloading; `forced`/`attempt` install). Against the
/// bridge: outside the window it installs nothing, inside it downloads, checks the SHA-1,
/// installs and reports; restarted as after the reboot with `-c 2` (what its bootloader state
/// would say), it reports the action closed with success.
#[test]
fn swupdate_installs_only_inside_the_maintenance_window() {
    let d = Ddi::start();
    let swu_dir = d.dir.join("swu");
    let target = d.dir.join("target.img");
    std::fs::write(&target, b"").unwrap();
    let payload: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    let (swu, cert) = build_swu(&swu_dir, &payload, &target);
    // An enrolled-looking device is not needed: the gateway poll registers it, the
    // TargetToken is what a SWUpdate device is configured with.
    assert_eq!(
        futures_block(d.get("swu-dev", "", &Auth::Gateway)).status,
        200
    );
    let token = d
        .bridge
        .cli(&["ota", "target-token", "--device", "swu-dev"])
        .unwrap();
    let cfg = d.dir.join("swupdate.cfg");
    std::fs::write(
        &cfg,
        format!(
            "globals :\n{{\n\tverbose = true;\n\tloglevel = 6;\n}};\nsuricatta :\n{{\n\ttenant = \"DEFAULT\";\n\tid = \"swu-dev\";\n\turl = \"{}\";\n\ttargettoken = \"{}\";\n\tcafile = \"{}\";\n\tpolldelay = 1;\n}};\n",
            d.bridge.url(),
            token.trim(),
            d.bridge.ca_chain().display()
        ),
    )
    .unwrap();
    let m = d.bridge.ota_upload(&swu, "app", "2.0.0").unwrap()["id"]
        .as_i64()
        .unwrap();

    // Window closed: SWUpdate skips (its own report closes the action), nothing installed.
    let closed = d.assign(
        m,
        "swu-dev",
        &["--window-start", "+1h", "--window-duration", "1h"],
    );
    {
        let swu = Swupdate::start(&d.dir, "swupdate-closed", &cfg, &cert, None);
        // Whichever comes first: its skip report, or an install (the bug this guards).
        wait_for("SWUpdate's skip report", Duration::from_secs(30), || {
            !std::fs::read(&target).unwrap_or_default().is_empty()
                || d.action(closed)["feedback"]
                    .to_string()
                    .contains("Skipped Update.")
        });
        assert_eq!(
            std::fs::read(&target).unwrap(),
            b"",
            "installed outside the window: {}",
            swu.log()
        );
        assert!(
            swu.log().contains("Update classified as 'skip'") || swu.log().contains("Skipped"),
            "{}",
            swu.log()
        );
    }

    // Window open: downloaded, verified, installed, reported.
    let open = d.assign(
        m,
        "swu-dev",
        &["--window-start", "+0s", "--window-duration", "1h"],
    );
    {
        let swu = Swupdate::start(&d.dir, "swupdate-open", &cfg, &cert, None);
        wait_for("SWUpdate installed", Duration::from_secs(60), || {
            d.action(open)["feedback"]
                .to_string()
                .contains("All Chunks Installed.")
        });
        assert_eq!(std::fs::read(&target).unwrap(), payload, "{}", swu.log());
        // Dropped here: the "reboot" (without a bootloader environment SWUpdate would
        // otherwise install again on its next poll).
    }
    // After the reboot: -c 2 (SUCCESS), as SWUpdate's persisted state would say.
    let _after = Swupdate::start(&d.dir, "swupdate-after-reboot", &cfg, &cert, Some(2));
    let done = {
        wait_for("the action closed", Duration::from_secs(30), || {
            d.action(open)["action"]["status"] == "closed"
        });
        d.action(open)
    };
    assert!(
        done["feedback"].to_string().contains("Update Installed."),
        "{done:#}"
    );
}

/// Run one request future to completion from a plain #[test].
fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}
