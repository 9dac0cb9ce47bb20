//! The HTTP API of a real hub process, with real agents from the process provider.

use harness::TestHub;
use serde_json::{Value, json};
use std::time::Duration;

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<none>")
}

/// POST /workspaces -> process provider starts an agent -> enrollment -> mTLS -> READY.
#[tokio::test]
async fn created_workspace_turns_ready_through_a_real_agent() {
    let hub = TestHub::start().await.unwrap();
    let ws = hub.create_workspace().await.unwrap();
    assert_eq!(ws["status"], "PROVISIONING");
    assert_eq!(ws["owner_id"], "dev");
    assert!(
        ws.get("agent_config").is_none(),
        "process provider hands out no config"
    );
    let id = ws["id"].as_str().unwrap().to_owned();

    let ready = hub
        .wait_for(&id, Duration::from_secs(20), |w| w["status"] == "READY")
        .await
        .unwrap();
    assert_eq!(
        ready["agent"]["protocol_version"],
        protocol::PROTOCOL_VERSION
    );
    assert!(ready["last_connected_at"].is_string());

    // The agent holds a key and a certificate, both private to it.
    let agent_dir = hub.workspace_dir(&id).join("agent");
    for file in ["agent.key.der", "agent.crt.der"] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(agent_dir.join(file))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
    let config_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(hub.workspace_dir(&id).join("agent.toml"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(config_mode & 0o777, 0o600);
    let ca_key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(hub.state_dir.join("ca.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(ca_key_mode & 0o777, 0o600);

    let (status, list) = hub.api("GET", "/workspaces", None).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(list.as_array().unwrap().len(), 1);

    // Tokens never reach the logs.
    let token = std::fs::read_to_string(hub.workspace_dir(&id).join("agent.toml")).unwrap();
    let enrollment = token
        .lines()
        .find_map(|l| l.strip_prefix("enrollment_token = "))
        .unwrap()
        .trim_matches('"')
        .to_owned();
    assert!(enrollment.starts_with("wse_"));
    for log in [hub.log(), hub.agent_log(&id)] {
        assert!(
            !log.contains(&enrollment),
            "enrollment token leaked to a log"
        );
        assert!(!log.contains(&hub.token), "API token leaked to a log");
    }
}

#[tokio::test]
async fn health_version_and_ui() {
    let hub = TestHub::start().await.unwrap();
    let (status, body) = hub.api("GET", "/healthz", None).await.unwrap();
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    let (status, body) = hub.api("GET", "/version", None).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["protocol_version"], protocol::PROTOCOL_VERSION);
    assert_eq!(body["provider"], "process");
    let page = hub.http.get(hub.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("Workspace Hub"));
}

#[tokio::test]
async fn the_openapi_document_covers_every_route() {
    let hub = TestHub::start_manual().await.unwrap();
    let (status, doc) = hub.api("GET", "/openapi.json", None).await.unwrap();
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    // Every route of the router (read from its source, so a new one cannot be missed) is
    // documented with each of its methods, and the document has nothing else.
    let source = include_str!("../src/edge/api.rs");
    let router = &source[source.find("pub fn app(").unwrap()..];
    let router = &router[..router.find(".fallback(").unwrap()];
    let mut routes = std::collections::BTreeMap::<String, Vec<&str>>::new();
    for call in router.split(".route(").skip(1) {
        let path = call.split('"').nth(1).unwrap();
        // axum's `{*rest}`, and the bare trailing slash, are the document's `{path}`.
        let path = match path.strip_suffix("{*rest}") {
            Some(prefix) => format!("{prefix}{{path}}"),
            None if path.len() > 1 && path.ends_with('/') => format!("{path}{{path}}"),
            None => path.to_owned(),
        };
        let methods = routes.entry(path).or_default();
        for (i, _) in call.match_indices('(') {
            let name = call[..i]
                .rsplit(|c: char| !c.is_ascii_alphabetic())
                .next()
                .unwrap();
            match name {
                "get" | "post" | "put" | "delete" => methods.push(name),
                // Every method a preview passes on (`edge::api::passthrough`).
                "passthrough" => {
                    methods.extend(["get", "put", "post", "delete", "patch", "head", "options"])
                }
                _ => {}
            }
        }
    }
    assert!(routes.len() > 30, "{routes:?}");
    for (path, methods) in &routes {
        assert!(
            !methods.is_empty(),
            "{path}: no method found in the router source"
        );
        for method in methods {
            assert!(
                paths.get(path).is_some_and(|p| p[method].is_object()),
                "{} {path} is served but not documented",
                method.to_uppercase()
            );
        }
    }
    for (path, ops) in paths {
        let served = routes.get(path).map(Vec::as_slice).unwrap_or_default();
        for method in ops.as_object().unwrap().keys() {
            assert!(
                served.contains(&method.as_str()),
                "{} {path} is documented but not served",
                method.to_uppercase()
            );
        }
    }
    let status_enum = &doc["components"]["schemas"]["Status"]["enum"];
    assert!(
        status_enum
            .as_array()
            .unwrap()
            .contains(&"SUSPENDED".into()),
        "{status_enum}"
    );
}

#[tokio::test]
async fn a_non_owner_learns_nothing() {
    let hub = TestHub::start_manual().await.unwrap();
    let ws = hub.create_workspace().await.unwrap();
    let id = ws["id"].as_str().unwrap();
    let other = hub.mint_token("mallory").unwrap();

    let (status, body) = hub
        .api_as(&other, "GET", &format!("/workspaces/{id}"), None)
        .await
        .unwrap();
    let (status_missing, body_missing) = hub
        .api_as(
            &other,
            "GET",
            "/workspaces/00000000-0000-4000-8000-000000000000",
            None,
        )
        .await
        .unwrap();
    assert_eq!((status, error_code(&body)), (404, "not_found"));
    assert_eq!(
        (status, &body),
        (status_missing, &body_missing),
        "same answer as for a missing workspace"
    );
    let (status, list) = hub
        .api_as(&other, "GET", "/workspaces", None)
        .await
        .unwrap();
    assert_eq!((status, list), (200, json!([])));
}

#[tokio::test]
async fn bad_requests_get_json_errors_and_the_hub_keeps_serving() {
    let hub = TestHub::start_manual().await.unwrap();

    // Authentication.
    let (status, body) = hub
        .api_as("nope", "GET", "/workspaces", None)
        .await
        .unwrap();
    assert_eq!((status, error_code(&body)), (401, "unauthorized"));
    let res = hub.http.get(hub.url("/workspaces")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    let body: Value = res.json().await.unwrap();
    assert_eq!(error_code(&body), "unauthorized");

    // Validation of every field.
    for bad in [
        json!({"zone": "Not A Zone"}),
        json!({"zone": ""}),
        json!({"machine_type": "x".repeat(64)}),
        json!({"image_tag": "../../etc"}),
        json!({"metadata": {"repo": "r".repeat(3000)}}),
        json!({"metadata": {"branch": "a\nb"}}),
        json!({"metadata": {"unknown": 1}}),
        json!({"surprise": true}),
        json!({"zone": 5}),
        json!([1, 2, 3]),
    ] {
        let (status, body) = hub
            .api("POST", "/workspaces", Some(bad.clone()))
            .await
            .unwrap();
        assert_eq!(
            (status, error_code(&body)),
            (400, "invalid_request"),
            "{bad}: {body}"
        );
    }

    // Malformed JSON, wrong content type, oversized body.
    let res = hub
        .http
        .post(hub.url("/workspaces"))
        .bearer_auth(&hub.token)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let res = hub
        .http
        .post(hub.url("/workspaces"))
        .bearer_auth(&hub.token)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 415);
    // (Its own client: the hub closes a connection whose body it refused to read.)
    let res = reqwest::Client::new()
        .post(hub.url("/workspaces"))
        .bearer_auth(&hub.token)
        .header("content-type", "application/json")
        .body(format!("{{\"zone\": \"{}\"}}", "a".repeat(200_000)))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 413);
    let body: Value = res.json().await.unwrap();
    assert_eq!(error_code(&body), "body_too_large");

    // Bad ids and unknown routes.
    let (status, body) = hub
        .api("GET", "/workspaces/not-a-uuid", None)
        .await
        .unwrap();
    assert_eq!((status, error_code(&body)), (404, "not_found"));
    let (status, body) = hub.api("GET", "/no/such/route", None).await.unwrap();
    assert_eq!((status, error_code(&body)), (404, "not_found"));

    // What axum answers by itself is JSON too: a method a route lacks (with `Allow`), a
    // query that does not parse; and a malformed X-Wsh-Owner is refused whoever sends it.
    let res = hub
        .http
        .patch(hub.url("/workspaces"))
        .bearer_auth(&hub.token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 405);
    let allow = res.headers()["allow"].to_str().unwrap().to_owned();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
    let body: Value = res.json().await.unwrap();
    assert_eq!(error_code(&body), "method_not_allowed");
    let res = hub.http.get(hub.url("/login/once")).send().await.unwrap();
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert_eq!(error_code(&body), "invalid_request", "{body}");
    for owner in ["", "a b", &"x".repeat(129)] {
        let res = hub
            .http
            .get(hub.url("/workspaces"))
            .bearer_auth(&hub.token)
            .header("x-wsh-owner", owner)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 400, "{owner:?}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(error_code(&body), "bad_owner");
    }

    // Nothing half-written: no workspace exists, and a good request still works.
    let (_, list) = hub.api("GET", "/workspaces", None).await.unwrap();
    assert_eq!(list, json!([]));
    let ws = hub
        .api(
            "POST",
            "/workspaces",
            Some(json!({"zone": "europe-west1-b", "machine_type": "e2-standard-4", "image_tag": "v1.2_3", "metadata": {"repo": "https://example.com/r.git", "branch": "main"}})),
        )
        .await
        .unwrap();
    assert_eq!(ws.0, 201, "{}", ws.1);
    assert_eq!(ws.1["zone"], "europe-west1-b");
    assert_eq!(ws.1["metadata"]["branch"], "main");
}

#[tokio::test]
async fn the_terminal_and_previews_answer_json_and_tell_a_stranger_nothing() {
    let hub = TestHub::start_manual().await.unwrap();
    let ws = hub.create_workspace().await.unwrap();
    let id = ws["id"].as_str().unwrap();
    let missing = uuid::Uuid::new_v4();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let call = |path: String, token: Option<&str>| {
        let mut req = http.get(hub.url(&path));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        async move {
            let res = req.send().await.unwrap();
            let status = res.status().as_u16();
            let body: Value = res.json().await.unwrap();
            (
                status,
                body["error"]["code"].as_str().unwrap_or("").to_owned(),
            )
        }
    };
    // The terminal is a WebSocket: a plain GET by its owner is told so, in JSON, and so is
    // a bad query; a stranger gets the same 404 as for a workspace that does not exist.
    let terminal = format!("/workspaces/{id}/terminal");
    assert_eq!(
        call(terminal.clone(), Some(&hub.token)).await,
        (426, "upgrade_required".into())
    );
    assert_eq!(
        call(format!("{terminal}?cols=wide"), Some(&hub.token)).await,
        (400, "invalid_request".into())
    );
    let mallory = hub.mint_token("mallory").unwrap();
    assert_eq!(
        call(terminal.clone(), Some(&mallory)).await,
        (404, "not_found".into())
    );
    assert_eq!(
        call(format!("/workspaces/{missing}/terminal"), Some(&mallory)).await,
        (404, "not_found".into())
    );
    assert_eq!(call(terminal, None).await, (401, "unauthorized".into()));
    // A browser without a session: a private port and a workspace that does not exist
    // look alike.
    assert_eq!(
        call(format!("/preview/{id}/3000/"), None).await,
        (401, "unauthorized".into())
    );
    assert_eq!(
        call(format!("/preview/{missing}/3000/"), None).await,
        (401, "unauthorized".into())
    );
}
