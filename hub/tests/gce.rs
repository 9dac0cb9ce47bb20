//! The Compute Engine provider against a local HTTP server that speaks the Compute REST
//! shapes (instances insert/get/list/suspend/resume/start/delete, zone operations wait),
//! with slow and failed operations, 403, 404 and 429 included.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use hub::domain::lifecycle::provider_error;
use hub::provider::gce::{GceConfig, GceProvider};
use hub::provider::{InstanceSpec, Observed, Provider, ProviderError, Target};
use protocol::bootstrap::AgentBootstrap;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

const PROJECT: &str = "test-project";
const ZONE: &str = "us-test1-a";

/// Faults the fake server injects.
#[derive(Debug, Default, Clone)]
struct Faults {
    /// `wait` calls an operation needs before it is DONE.
    op_polls: u32,
    /// The operation ends with this error: (code, message, HTTP status).
    op_error: Option<(String, String, i32)>,
    /// Operations never finish.
    never_done: bool,
    /// The next N requests get 429.
    rate_limited: u32,
    /// Inserts are refused at once with this HTTP status.
    insert_status: Option<u16>,
}

#[derive(Debug)]
struct Op {
    zone: String,
    polls_left: u32,
    error: Option<(String, String, i32)>,
    effect: Option<(String, Option<Value>)>,
}

#[derive(Debug, Default)]
struct Fake {
    faults: Faults,
    instances: HashMap<String, Value>,
    ops: HashMap<String, Op>,
    /// (method, path without the project/zone prefix, body)
    requests: Vec<(String, String, Value)>,
    next_op: u32,
}

type Shared = Arc<Mutex<Fake>>;

fn error(status: u16, api_status: &str, message: &str) -> Response {
    let body = json!({"error": {"code": status, "message": message, "status": api_status,
        "errors": [{"message": message, "domain": "global", "reason": api_status.to_lowercase()}]}});
    (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response()
}

fn op_json(name: &str, op: &Op) -> Value {
    let mut v = json!({
        "kind": "compute#operation",
        "name": name,
        "zone": format!("https://www.googleapis.com/compute/v1/projects/{PROJECT}/zones/{}", op.zone),
        "status": if op.polls_left == 0 { "DONE" } else { "RUNNING" },
    });
    if op.polls_left == 0
        && let Some((code, message, http)) = &op.error
    {
        v["error"] = json!({"errors": [{"code": code, "message": message}]});
        v["httpErrorStatusCode"] = json!(http);
    }
    v
}

impl Fake {
    /// Starts an operation whose `effect` (instance name, new body or None to delete) is
    /// applied when it completes without error.
    fn start_op(&mut self, zone: &str, effect: (String, Option<Value>)) -> Value {
        self.next_op += 1;
        let name = format!("operation-{}", self.next_op);
        let op = Op {
            zone: zone.to_owned(),
            polls_left: if self.faults.never_done {
                u32::MAX
            } else {
                self.faults.op_polls
            },
            error: self.faults.op_error.clone(),
            effect: Some(effect),
        };
        let json = op_json(&name, &op);
        self.ops.insert(name.clone(), op);
        self.finish_if_done(&name);
        json
    }

    fn finish_if_done(&mut self, name: &str) {
        let Some(op) = self.ops.get_mut(name) else {
            return;
        };
        if op.polls_left > 0 || op.error.is_some() {
            return;
        }
        if let Some((instance, body)) = op.effect.take() {
            match body {
                Some(body) => {
                    self.instances.insert(instance, body);
                }
                None => {
                    self.instances.remove(&instance);
                }
            }
        }
    }
}

async fn handle(State(fake): State<Shared>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    let body: Bytes = axum::body::to_bytes(req.into_body(), 1 << 20)
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let prefix = format!("/compute/v1/projects/{PROJECT}/zones/");
    let Some(rest) = path.strip_prefix(&prefix) else {
        return error(404, "NOT_FOUND", &format!("unknown path {path}"));
    };
    let mut parts = rest.split('/');
    let zone = parts.next().unwrap_or_default().to_owned();
    let tail: Vec<&str> = parts.collect();
    let mut f = fake.lock().unwrap();
    f.requests
        .push((method.to_string(), tail.join("/"), body.clone()));
    if f.faults.rate_limited > 0 {
        f.faults.rate_limited -= 1;
        return error(429, "RESOURCE_EXHAUSTED", "Rate Limit Exceeded");
    }
    let instance_missing = |name: &str| {
        error(
            404,
            "NOT_FOUND",
            &format!(
                "The resource 'projects/{PROJECT}/zones/{zone}/instances/{name}' was not found"
            ),
        )
    };
    match (method, tail.as_slice()) {
        (Method::POST, ["instances"]) => {
            if let Some(status) = f.faults.insert_status {
                return match status {
                    403 => error(
                        403,
                        "PERMISSION_DENIED",
                        "Required 'compute.instances.create' permission for 'projects/test-project'",
                    ),
                    s => error(s, "INTERNAL", "insert refused"),
                };
            }
            let name = body["name"].as_str().unwrap_or_default().to_owned();
            if f.instances.contains_key(&name) {
                return error(409, "ALREADY_EXISTS", "instance exists");
            }
            let mut stored = body.clone();
            stored["status"] = json!("RUNNING");
            axum::Json(f.start_op(&zone, (name, Some(stored)))).into_response()
        }
        (Method::GET, ["instances"]) => {
            // Only the label filter the provider sends is understood.
            let items: Vec<Value> = f
                .instances
                .values()
                .filter(|i| {
                    let label = i["labels"]["workspace-hub"].as_str().unwrap_or_default();
                    query.contains(&format!("%22{label}%22"))
                        || query.contains(&format!("\"{label}\""))
                })
                .cloned()
                .collect();
            axum::Json(json!({"kind": "compute#instanceList", "items": items})).into_response()
        }
        (Method::GET, ["instances", name]) => match f.instances.get(*name) {
            Some(i) => axum::Json(i.clone()).into_response(),
            None => instance_missing(name),
        },
        (Method::DELETE, ["instances", name]) => {
            if !f.instances.contains_key(*name) {
                return instance_missing(name);
            }
            axum::Json(f.start_op(&zone, (name.to_string(), None))).into_response()
        }
        (Method::POST, ["instances", name, action]) => {
            let Some(current) = f.instances.get(*name).cloned() else {
                return instance_missing(name);
            };
            let status = match *action {
                "suspend" => "SUSPENDED",
                "resume" | "start" => "RUNNING",
                "stop" => "TERMINATED",
                _ => return error(400, "INVALID_ARGUMENT", "unknown action"),
            };
            let mut next = current;
            next["status"] = json!(status);
            axum::Json(f.start_op(&zone, (name.to_string(), Some(next)))).into_response()
        }
        (Method::POST, ["operations", name, "wait"]) | (Method::GET, ["operations", name]) => {
            let name = name.to_string();
            let Some(op) = f.ops.get_mut(&name) else {
                return error(404, "NOT_FOUND", "no such operation");
            };
            op.polls_left = op.polls_left.saturating_sub(1);
            let json = op_json(&name, op);
            f.finish_if_done(&name);
            axum::Json(json).into_response()
        }
        _ => error(404, "NOT_FOUND", &format!("unknown route {path}")),
    }
}

async fn fake_compute(faults: Faults) -> (Shared, String) {
    let fake: Shared = Arc::new(Mutex::new(Fake {
        faults,
        ..Fake::default()
    }));
    let app = Router::new().fallback(handle).with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (fake, format!("http://{addr}"))
}

async fn provider(endpoint: &str, operation_timeout: Duration) -> GceProvider {
    link::install_crypto_provider();
    GceProvider::new(GceConfig {
        project: PROJECT.into(),
        zones: vec![ZONE.into()],
        label: "test-hub".into(),
        endpoint: Some(endpoint.to_owned()),
        anonymous: true,
        operation_timeout,
        retry_delay: Duration::from_millis(5),
        ..GceConfig::default()
    })
    .await
    .unwrap()
}

fn spec() -> InstanceSpec {
    let id = Uuid::new_v4();
    InstanceSpec {
        workspace_id: id,
        owner_id: "Alice@Example.com".into(),
        instance_name: hub::base::workspace::instance_name(id),
        zone: ZONE.into(),
        machine_type: "e2-standard-4".into(),
        image_tag: "2026-11".into(),
        bootstrap: AgentBootstrap {
            hub_addr: "hub.example.com:7443".into(),
            server_name: "hub.example.com".into(),
            ca_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
            enrollment_token: Some("wse_secret_enrollment_token".into()),
            state_dir: "/var/lib/workspace-agent".into(),
            user: Some("dev".into()),
            detached_session_ttl_secs: Some(3600),
            terminal_ring_bytes: Some(4 << 20),
            ports: None,
        },
    }
}

fn target(spec: &InstanceSpec) -> Target {
    Target {
        workspace_id: spec.workspace_id,
        instance_name: spec.instance_name.clone(),
        zone: spec.zone.clone(),
    }
}

#[tokio::test]
async fn create_sends_the_instance_and_waits_for_its_operation() {
    let (fake, endpoint) = fake_compute(Faults {
        op_polls: 3,
        ..Faults::default()
    })
    .await;
    let gce = provider(&endpoint, Duration::from_secs(10)).await;
    let spec = spec();
    gce.create(&spec).await.unwrap();
    {
        let f = fake.lock().unwrap();
        let (method, path, body) = &f.requests[0];
        assert_eq!((method.as_str(), path.as_str()), ("POST", "instances"));
        assert_eq!(body["name"], spec.instance_name.as_str());
        assert_eq!(
            body["machineType"],
            format!("zones/{ZONE}/machineTypes/e2-standard-4")
        );
        assert_eq!(body["labels"]["workspace-hub"], "test-hub");
        assert_eq!(
            body["labels"]["workspace-id"],
            spec.workspace_id.to_string()
        );
        assert_eq!(body["labels"]["owner"], "alice-example-com");
        let disk = &body["disks"][0]["initializeParams"]["sourceImage"];
        assert!(
            disk.as_str().unwrap().ends_with("workspace-2026-11"),
            "{disk}"
        );
        let item = &body["metadata"]["items"][0];
        assert_eq!(item["key"], "user-data");
        let user_data = item["value"].as_str().unwrap();
        assert!(user_data.starts_with("#cloud-config\n"), "{user_data}");
        assert!(user_data.contains("wse_secret_enrollment_token"));
        assert!(user_data.contains("hub.example.com:7443"));
        assert!(user_data.contains(hub::provider::cloudinit::CONFIG_PATH));
        // The operation was waited on until DONE: three wait calls.
        let waits = f
            .requests
            .iter()
            .filter(|(_, p, _)| p.ends_with("/wait"))
            .count();
        assert_eq!(waits, 3);
    }
    let t = target(&spec);
    assert_eq!(gce.observe(&t).await.unwrap(), Observed::Running);
    let listed = gce.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].target, t);

    gce.stop(&t).await.unwrap();
    assert_eq!(gce.observe(&t).await.unwrap(), Observed::Suspended);
    gce.start(&t).await.unwrap();
    assert_eq!(gce.observe(&t).await.unwrap(), Observed::Running);
    let actions: Vec<String> = fake
        .lock()
        .unwrap()
        .requests
        .iter()
        .filter(|(m, _, _)| m == "POST")
        .map(|(_, p, _)| p.rsplit('/').next().unwrap().to_owned())
        .filter(|a| a != "wait")
        .collect();
    assert_eq!(actions, ["instances", "suspend", "resume"]);
    gce.delete(&t).await.unwrap();
    assert_eq!(gce.observe(&t).await.unwrap(), Observed::Missing);
    assert!(gce.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn compute_errors_become_clear_api_errors() {
    // A quota failure reported by the operation.
    let (_, endpoint) = fake_compute(Faults {
        op_polls: 1,
        op_error: Some((
            "QUOTA_EXCEEDED".into(),
            "Quota 'CPUS' exceeded. Limit: 24.0 in region us-test1.".into(),
            403,
        )),
        ..Faults::default()
    })
    .await;
    let gce = provider(&endpoint, Duration::from_secs(10)).await;
    let err = gce.create(&spec()).await.unwrap_err();
    assert!(
        matches!(&err, ProviderError::QuotaExceeded(m) if m.contains("CPUS")),
        "{err:?}"
    );
    let api = provider_error(err);
    assert!(api.message().contains("CPUS"));
    assert_eq!(api.code(), "provider_quota_exceeded");

    // Permission denied on the call itself.
    let (_, endpoint) = fake_compute(Faults {
        insert_status: Some(403),
        ..Faults::default()
    })
    .await;
    let gce = provider(&endpoint, Duration::from_secs(10)).await;
    let err = gce.create(&spec()).await.unwrap_err();
    assert!(
        matches!(&err, ProviderError::PermissionDenied(m) if m.contains("compute.instances.create")),
        "{err:?}"
    );
    assert_eq!(provider_error(err).code(), "provider_permission_denied");

    // Not found: observing says Missing, acting on it is NotFound.
    let missing = target(&spec());
    assert_eq!(gce.observe(&missing).await.unwrap(), Observed::Missing);
    let err = gce.stop(&missing).await.unwrap_err();
    assert!(matches!(err, ProviderError::NotFound), "{err:?}");
    assert_eq!(provider_error(err).code(), "instance_not_found");
}

#[tokio::test]
async fn rate_limits_are_retried_and_slow_operations_time_out() {
    let (fake, endpoint) = fake_compute(Faults {
        rate_limited: 2,
        ..Faults::default()
    })
    .await;
    let gce = provider(&endpoint, Duration::from_secs(10)).await;
    let first = spec();
    gce.create(&first).await.unwrap();
    let inserts = fake
        .lock()
        .unwrap()
        .requests
        .iter()
        .filter(|(m, p, _)| m == "POST" && p == "instances")
        .count();
    assert_eq!(inserts, 3, "two 429s, then the insert went through");
    assert_eq!(
        gce.observe(&target(&first)).await.unwrap(),
        Observed::Running
    );

    // Rate limited for good: a clear error after the retries.
    fake.lock().unwrap().faults.rate_limited = 100;
    let err = gce.observe(&target(&first)).await.unwrap_err();
    assert!(
        matches!(&err, ProviderError::Failed(m) if m.contains("rate limited")),
        "{err:?}"
    );

    // An operation that never finishes is given up after the timeout.
    let (_, endpoint) = fake_compute(Faults {
        never_done: true,
        ..Faults::default()
    })
    .await;
    let gce = provider(&endpoint, Duration::from_millis(300)).await;
    let err = gce.create(&spec()).await.unwrap_err();
    assert!(
        matches!(&err, ProviderError::Failed(m) if m.contains("still running")),
        "{err:?}"
    );
}
