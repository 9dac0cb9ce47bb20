//! The hub's identity from configured secret sources: files, environment variables and
//! Secret Manager (a local server speaking its REST shapes); `serve` without one; CA rotation.

use axum::extract::{Path as UrlPath, State};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use harness::{HubOptions, TestHub};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// `workspace-hub identity init --out dir`, as an operator runs it.
fn identity_init(dir: &Path) {
    let out = std::process::Command::new(harness::binary("workspace-hub").unwrap())
        .args(["identity", "init", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An `[identity]` section reading every piece from files in `dir`.
fn file_identity(dir: &Path, previous: Option<&Path>) -> String {
    let mut toml = format!(
        "[identity]\nca_cert = \"file:{d}/ca.pem\"\nca_key = \"file:{d}/ca.key\"\n\
         ticket_key = \"file:{d}/ticket.key\"\nreset_key = \"file:{d}/reset.key\"\n",
        d = dir.display()
    );
    if let Some(p) = previous {
        toml += &format!(
            "previous_ca_cert = \"file:{p}/ca.pem\"\nprevious_ca_key = \"file:{p}/ca.key\"\n",
            p = p.display()
        );
    }
    toml
}

fn certs(pem: &str) -> Vec<Vec<u8>> {
    link::parse_ca_bundle(pem).unwrap()
}

/// The issuer of a DER certificate, as text.
fn issuer(der: &[u8]) -> String {
    x509_parser::parse_x509_certificate(der)
        .unwrap()
        .1
        .issuer()
        .to_string()
}

fn subject(pem_file: &Path) -> String {
    let der = &certs(&std::fs::read_to_string(pem_file).unwrap())[0];
    x509_parser::parse_x509_certificate(der)
        .unwrap()
        .1
        .subject()
        .to_string()
}

/// Runs `workspace-hub serve` on a config of `extra` lines; it must fail: its stderr.
fn serve_fails(dir: &Path, extra: &str) -> String {
    let config = dir.join("hub.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\nhttp_addr = \"127.0.0.1:0\"\nquic_addr = \"127.0.0.1:0\"\n{extra}",
            dir.join("state").display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(harness::binary("workspace-hub").unwrap())
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn serve_without_an_identity_refuses_to_start_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let stderr = serve_fails(dir.path(), "");
    assert!(stderr.contains("has no [identity]"), "{stderr}");
    assert!(stderr.contains("workspace-hub identity init"), "{stderr}");
    assert!(
        !dir.path().join("state/ca.key").exists(),
        "serve invented a CA"
    );

    // A source that names nothing is refused at start, by name.
    let stderr = serve_fails(
        dir.path(),
        &file_identity(&dir.path().join("nothing-here"), None),
    );
    assert!(stderr.contains("identity.ca_cert"), "{stderr}");
}

/// Secret versions by resource name, and the names asked for.
#[derive(Clone, Default)]
struct FakeSecretManager {
    versions: Arc<Mutex<std::collections::HashMap<String, Vec<u8>>>>,
    asked: Arc<Mutex<Vec<String>>>,
}

async fn access(State(sm): State<FakeSecretManager>, UrlPath(path): UrlPath<String>) -> Response {
    let Some(name) = path.strip_suffix(":access") else {
        return (axum::http::StatusCode::NOT_FOUND, "no such method").into_response();
    };
    sm.asked.lock().unwrap().push(name.to_owned());
    let found = sm.versions.lock().unwrap().get(name).cloned();
    match found {
        Some(data) => axum::Json(serde_json::json!({
            "name": name,
            "payload": {"data": base64::engine::general_purpose::STANDARD.encode(data)},
        }))
        .into_response(),
        None => (
            axum::http::StatusCode::NOT_FOUND,
            axum::Json(serde_json::json!({"error": {
                "code": 404, "status": "NOT_FOUND",
                "message": format!("Secret Version [{name}] not found."),
            }})),
        )
            .into_response(),
    }
}

async fn start_secret_manager(sm: FakeSecretManager) -> std::net::SocketAddr {
    let app = axum::Router::new()
        .route("/v1/{*path}", axum::routing::get(access))
        .with_state(sm);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::test]
async fn a_hub_takes_its_identity_from_files_the_environment_and_secret_manager() {
    let secrets = tempfile::tempdir().unwrap();
    identity_init(secrets.path());
    let sm = FakeSecretManager::default();
    let ca_key_name = "projects/hub-test/secrets/hub-ca-key/versions/latest";
    sm.versions.lock().unwrap().insert(
        ca_key_name.into(),
        std::fs::read(secrets.path().join("ca.key")).unwrap(),
    );
    let sm_addr = start_secret_manager(sm.clone()).await;
    let ticket_key = std::fs::read_to_string(secrets.path().join("ticket.key")).unwrap();
    let mut hub = TestHub::start_with(HubOptions {
        config: format!(
            "[identity]\nca_cert = \"file:{d}/ca.pem\"\nca_key = \"gcp:{ca_key_name}\"\n\
             ticket_key = \"env:WSH_TEST_TICKET_KEY\"\nreset_key = \"file:{d}/reset.key\"\n\
             secret_manager_endpoint = \"http://{sm_addr}\"\nsecret_manager_anonymous = true\n",
            d = secrets.path().display()
        ),
        env: vec![("WSH_TEST_TICKET_KEY".into(), ticket_key)],
        ..Default::default()
    })
    .await
    .unwrap();
    let asked = sm.asked.lock().unwrap().clone();
    assert!(
        !asked.is_empty() && asked.iter().all(|n| n == ca_key_name),
        "{asked:?}"
    );

    // Agents and CLIs pin the configured CA, and an agent enrolls under it.
    let (status, _) = hub.api("GET", "/version", None).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        harness::raw_agent::hub_cas(&hub).await,
        certs(&std::fs::read_to_string(secrets.path().join("ca.pem")).unwrap())
    );
    let id = hub.ready_workspace().await.unwrap();
    let cert = std::fs::read(hub.workspace_dir(&id).join("agent/agent.crt.der")).unwrap();
    assert_eq!(issuer(&cert), subject(&secrets.path().join("ca.pem")));

    // Nothing of the identity lives in the instance.
    for name in ["ca.pem", "ca.key", "ticket.key", "reset.key"] {
        assert!(
            !hub.state_dir.join(name).exists(),
            "{name} in the state folder"
        );
    }

    // A replacement instance (same sources) is the same hub to the agent: it reconnects
    // with the certificate it has.
    let before = hub
        .wait_for(&id, WAIT, |w| !w["agent"].is_null())
        .await
        .unwrap();
    hub.start_again().await.unwrap();
    hub.wait_for(&id, WAIT, |w| {
        !w["agent"].is_null() && w["agent"]["connected_since"] != before["agent"]["connected_since"]
    })
    .await
    .unwrap();
    assert_eq!(
        hub.agent_log(&id)
            .matches("enrolled: certificate stored")
            .count(),
        1
    );
    assert!(
        !hub.log().contains(
            &std::fs::read_to_string(secrets.path().join("ticket.key"))
                .unwrap()
                .trim()
                .to_owned()
        )
    );

    // A secret version Secret Manager does not have stops the start, naming it.
    hub.kill();
    hub.options.config = hub.options.config.replace("hub-ca-key", "no-such-secret");
    let err = hub.start_again().await.unwrap_err().to_string();
    assert!(err.contains("identity.ca_key"), "{err}");
    assert!(err.contains("no-such-secret"), "{err}");
}

#[tokio::test]
async fn a_ca_rotation_keeps_old_agents_and_enrolls_new_ones_under_the_new_ca() {
    let old = tempfile::tempdir().unwrap();
    let new = tempfile::tempdir().unwrap();
    identity_init(old.path());
    identity_init(new.path());
    let mut hub = TestHub::start_with(HubOptions {
        config: file_identity(old.path(), None),
        ..Default::default()
    })
    .await
    .unwrap();
    let early = hub.ready_workspace().await.unwrap();
    let early_cert = hub.workspace_dir(&early).join("agent/agent.crt.der");
    assert_eq!(
        issuer(&std::fs::read(&early_cert).unwrap()),
        subject(&old.path().join("ca.pem"))
    );

    // Phase 1: the new CA signs, the old one still serves; both are trusted.
    let connected = |w: &serde_json::Value| w["agent"]["connected_since"].clone();
    let before = hub
        .wait_for(&early, WAIT, |w| !w["agent"].is_null())
        .await
        .unwrap();
    hub.options.config = file_identity(new.path(), Some(old.path()));
    hub.start_again().await.unwrap();
    hub.wait_for(&early, WAIT, |w| {
        !w["agent"].is_null() && connected(w) != connected(&before)
    })
    .await
    .unwrap();
    let late = hub.ready_workspace().await.unwrap();
    assert_eq!(
        issuer(&std::fs::read(hub.workspace_dir(&late).join("agent/agent.crt.der")).unwrap()),
        subject(&new.path().join("ca.pem")),
        "new enrollments get the new CA"
    );
    assert_eq!(
        harness::raw_agent::hub_cas(&hub).await.len(),
        2,
        "both CAs pinned by new clients"
    );
    let late_config = std::fs::read_to_string(hub.workspace_dir(&late).join("agent.toml")).unwrap();
    assert_eq!(
        late_config.matches("BEGIN CERTIFICATE").count(),
        2,
        "the new agent pins both: {late_config}"
    );
    assert!(
        hub.log().contains("agent on the previous CA connected"),
        "{}",
        hub.log()
    );

    // Phase 2: the previous CA is gone. Agents enrolled during the rotation carry on; one
    // still on the old CA is refused (that is why the rotation waits for them to go).
    let before_late = hub
        .wait_for(&late, WAIT, |w| !w["agent"].is_null())
        .await
        .unwrap();
    hub.options.config = file_identity(new.path(), None);
    hub.start_again().await.unwrap();
    hub.wait_for(&late, WAIT, |w| {
        !w["agent"].is_null() && connected(w) != connected(&before_late)
    })
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < deadline {
        let (_, w) = hub
            .api("GET", &format!("/workspaces/{early}"), None)
            .await
            .unwrap();
        assert!(
            w["agent"].is_null(),
            "an agent on the retired CA connected: {w}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
