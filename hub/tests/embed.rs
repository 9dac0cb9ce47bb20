//! Embedding in a host app: service tokens acting for owners they name (scopes, owner
//! prefix, quotas), browser tokens bound to one workspace and one purpose (and their
//! expiry), CORS for the allowed origins on exec and files only, and the embeddable
//! terminal page's framing rules. The host app in Chromium is `tests/browser/embed.test.js`.

use harness::{HubOptions, TestHub};
use serde_json::{Value, json};
use std::time::Duration;

const HOST_APP: &str = "http://127.0.0.1:4173";

async fn start() -> TestHub {
    TestHub::start_with(HubOptions {
        config: format!(
            "admins = [\"dev\"]\n[quotas]\nmax_workspaces = 1\nmax_running = 1\n\
             [embed]\nallowed_origins = [\"{HOST_APP}\"]\n"
        ),
        ..Default::default()
    })
    .await
    .unwrap()
}

/// Calls the API with a service token acting for `owner`.
async fn as_service(
    hub: &TestHub,
    token: &str,
    owner: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .request(method.parse().unwrap(), hub.url(path))
        .bearer_auth(token);
    if let Some(owner) = owner {
        req = req.header("x-wsh-owner", owner);
    }
    if let Some(body) = body {
        req = req.json(&body);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let text = res.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn service_token(hub: &TestHub, scopes: Value) -> String {
    let (status, body) = hub
        .api(
            "POST",
            "/tokens",
            Some(
                json!({"name": "host app", "service": {"owner_prefix": "user-", "scopes": scopes}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["service"]["owner_prefix"], "user-");
    body["token"].as_str().unwrap().to_owned()
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn service_tokens_act_for_the_owners_they_name_within_scopes_and_quotas() {
    let hub = start().await;
    // Only an admin creates one, and it needs a sane prefix and at least one scope.
    let member = hub.mint_token("member").unwrap();
    let ask = json!({"name": "x", "service": {"owner_prefix": "user-", "scopes": ["exec"]}});
    let (status, body) = hub
        .api_as(&member, "POST", "/tokens", Some(ask))
        .await
        .unwrap();
    assert_eq!((status, code(&body)), (403, "admin_only"), "{body}");
    for bad in [
        json!({"owner_prefix": "", "scopes": ["exec"]}),
        json!({"owner_prefix": "user/", "scopes": ["exec"]}),
        json!({"owner_prefix": "user-", "scopes": []}),
        json!({"owner_prefix": "user-", "scopes": ["root"]}),
    ] {
        let (status, body) = hub
            .api(
                "POST",
                "/tokens",
                Some(json!({"name": "x", "service": bad})),
            )
            .await
            .unwrap();
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let svc = service_token(&hub, json!(["workspaces", "exec", "tickets"])).await;
    assert!(svc.starts_with("wsh_svc_"));

    // It names its owner, one with its prefix and sane characters.
    let (status, body) = as_service(&hub, &svc, None, "GET", "/workspaces", None).await;
    assert_eq!((status, code(&body)), (400, "owner_required"), "{body}");
    let (status, body) = as_service(&hub, &svc, Some("dev"), "GET", "/workspaces", None).await;
    assert_eq!((status, code(&body)), (403, "owner_not_allowed"), "{body}");
    let (status, body) =
        as_service(&hub, &svc, Some("user-7/../x"), "GET", "/workspaces", None).await;
    assert_eq!((status, code(&body)), (400, "bad_owner"), "{body}");

    // A workspace for user-7, theirs; the quota (one each) is user-7's, not the app's.
    let (status, ws) = as_service(
        &hub,
        &svc,
        Some("user-7"),
        "POST",
        "/workspaces",
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 201, "{ws}");
    assert_eq!(ws["owner_id"], "user-7");
    let id = ws["id"].as_str().unwrap().to_owned();
    let (status, body) = as_service(
        &hub,
        &svc,
        Some("user-7"),
        "POST",
        "/workspaces",
        Some(json!({})),
    )
    .await;
    assert_eq!((status, code(&body)), (403, "quota_exceeded"), "{body}");
    let (status, other) = as_service(
        &hub,
        &svc,
        Some("user-8"),
        "POST",
        "/workspaces",
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 201, "{other}");
    // user-8 does not see user-7's workspace; the dev user (an admin) does.
    let (_, list) = as_service(&hub, &svc, Some("user-8"), "GET", "/workspaces", None).await;
    assert!(!list.to_string().contains(&id), "{list}");
    let (status, _) = as_service(
        &hub,
        &svc,
        Some("user-8"),
        "GET",
        &format!("/workspaces/{id}"),
        None,
    )
    .await;
    assert_eq!(status, 404);
    hub.wait_for(&id, Duration::from_secs(30), |w| {
        !w["agent"].is_null() && w["status"] == "READY"
    })
    .await
    .unwrap();

    // Exec as user-7 works; files are not in its scopes; neither are API tokens.
    let (status, body) = as_service(
        &hub,
        &svc,
        Some("user-7"),
        "POST",
        &format!("/workspaces/{id}/exec"),
        Some(json!({"argv": ["sh", "-c", "echo hi-from-$((3+4))"]})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.as_str().unwrap().contains("\"type\":\"exit\""),
        "{body}"
    );
    let (status, body) = as_service(
        &hub,
        &svc,
        Some("user-7"),
        "GET",
        &format!("/workspaces/{id}/files"),
        None,
    )
    .await;
    assert_eq!((status, code(&body)), (403, "scope"), "{body}");
    let (status, body) = as_service(
        &hub,
        &svc,
        Some("user-7"),
        "POST",
        "/tokens",
        Some(json!({"name": "escape"})),
    )
    .await;
    assert_eq!((status, code(&body)), (403, "scope"), "{body}");
    // Nor does it mint a browser token for a purpose it lacks.
    let (status, body) = as_service(
        &hub,
        &svc,
        Some("user-7"),
        "POST",
        &format!("/workspaces/{id}/tickets"),
        Some(json!({"purpose": "files"})),
    )
    .await;
    assert_eq!((status, code(&body)), (403, "scope"), "{body}");
    // The CLI's QUIC sessions take no service token.
    let out = hub
        .wsh()
        .unwrap()
        .env("WSH_TOKEN", &svc)
        .args(["exec", &id, "--", "true"])
        .output()
        .unwrap();
    assert!(!out.status.success());

    // Revoked, it opens nothing.
    let (_, tokens) = hub.api("GET", "/tokens", None).await.unwrap();
    let listed = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["service"].is_object())
        .unwrap();
    let (status, _) = hub
        .api(
            "DELETE",
            &format!("/tokens/{}", listed["id"].as_str().unwrap()),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 204);
    let (status, _) = as_service(&hub, &svc, Some("user-7"), "GET", "/workspaces", None).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn browser_tokens_open_one_purpose_on_one_workspace_until_they_expire() {
    let hub = start().await;
    let svc = service_token(
        &hub,
        json!([
            "workspaces",
            "exec",
            "files",
            "terminal",
            "preview",
            "tickets"
        ]),
    )
    .await;
    let mint = |id: String, purpose: &'static str, secs: u64| {
        let hub = &hub;
        let svc = svc.clone();
        async move {
            let (status, body) = as_service(
                hub,
                &svc,
                Some("user-7"),
                "POST",
                &format!("/workspaces/{id}/tickets"),
                Some(json!({"purpose": purpose, "expires_in_secs": secs})),
            )
            .await;
            assert_eq!(status, 201, "{body}");
            body["ticket"].as_str().unwrap().to_owned()
        }
    };
    let (_, ws) = as_service(
        &hub,
        &svc,
        Some("user-7"),
        "POST",
        "/workspaces",
        Some(json!({})),
    )
    .await;
    let id = ws["id"].as_str().unwrap().to_owned();
    let (_, ws) = hub
        .api("POST", "/workspaces", Some(json!({})))
        .await
        .unwrap();
    let foreign = ws["id"].as_str().unwrap().to_owned();
    hub.wait_for(&id, Duration::from_secs(30), |w| {
        !w["agent"].is_null() && w["status"] == "READY"
    })
    .await
    .unwrap();
    let (status, body) = as_service(
        &hub,
        &svc,
        Some("user-7"),
        "POST",
        &format!("/workspaces/{id}/tickets"),
        Some(json!({"purpose": "exec", "expires_in_secs": 7200})),
    )
    .await;
    assert_eq!(status, 400, "{body}");

    let exec = mint(id.clone(), "exec", 600).await;
    let files = mint(id.clone(), "files", 600).await;
    let http = reqwest::Client::new();
    let run = |token: String, ws: String| {
        let http = http.clone();
        let url = hub.url(&format!("/workspaces/{ws}/exec"));
        async move {
            let res = http
                .post(url)
                .bearer_auth(token)
                .json(&json!({"argv": ["sh", "-c", "echo ok-$((40+2))"]}))
                .send()
                .await
                .unwrap();
            (res.status().as_u16(), res.text().await.unwrap())
        }
    };
    let (status, body) = run(exec.clone(), id.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"type\":\"exit\""), "{body}");
    // Another workspace's exec, or this one's through a files token: refused.
    assert_eq!(run(exec.clone(), foreign.clone()).await.0, 401);
    assert_eq!(run(files.clone(), id.clone()).await.0, 401);
    // A files token writes and reads files, as a bearer token or `?ticket=` on a GET.
    let res = http
        .put(hub.url(&format!("/workspaces/{id}/files/note.txt")))
        .bearer_auth(&files)
        .body("embedded\n")
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    let url = hub.url(&format!("/workspaces/{id}/files/note.txt?ticket={files}"));
    let res = http.get(&url).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "embedded\n");
    // `?ticket=` is for GETs only.
    let res = http
        .delete(hub.url(&format!("/workspaces/{id}/files/note.txt?ticket={files}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    // Nothing else opens: the workspace itself, its list, its stop, tokens, another
    // workspace's files.
    for (method, path) in [
        ("GET", format!("/workspaces/{id}")),
        ("GET", "/workspaces".to_owned()),
        ("POST", format!("/workspaces/{id}/stop")),
        ("GET", "/tokens".to_owned()),
        ("POST", format!("/workspaces/{id}/tickets")),
        ("GET", format!("/workspaces/{foreign}/files")),
        ("GET", format!("/workspaces/{id}/terminal")),
    ] {
        let (status, body) = hub
            .api_as(&files, method, &path, Some(json!({"purpose": "files"})))
            .await
            .unwrap();
        assert!(
            [401, 403].contains(&status),
            "{method} {path}: {status} {body}"
        );
        assert!(!body.to_string().contains("user-7"), "{body}");
    }
    // A preview token is traded for the preview's own entry and cookie, which lasts no
    // longer than the token did.
    let preview = mint(id.clone(), "preview", 2).await;
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .resolve(&format!("3000-{id}.localhost"), hub.listening.http)
        .build()
        .unwrap();
    let res = plain
        .get(hub.url(&format!("/preview/{id}/3000/?ticket={preview}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303);
    let to = res.headers()["location"].to_str().unwrap().to_owned();
    assert!(to.contains("/__wsh/auth?ticket="), "{to}");
    assert!(
        !to.contains(&preview),
        "the browser token is not passed on: {to}"
    );
    let res = plain.get(&to).send().await.unwrap();
    assert_eq!(res.status(), 303);
    let cookie = res.headers()["set-cookie"].to_str().unwrap();
    let cookie = cookie.split(';').next().unwrap().to_owned();
    let origin = to.split("/__wsh/").next().unwrap().to_owned();
    let open = || {
        plain
            .get(format!("{origin}/"))
            .header("cookie", &cookie)
            .send()
    };
    // Nothing listens on the port: the hub let the request through to it.
    assert_eq!(open().await.unwrap().status(), 502);
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    assert_eq!(open().await.unwrap().status(), 401);

    // An expired one opens nothing.
    let short = mint(id.clone(), "exec", 1).await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let (status, body) = run(short, id.clone()).await;
    assert_eq!(status, 401, "{body}");
    // A forged one neither.
    let forged = exec.replacen(&id, &foreign, 1);
    assert_eq!(run(forged, foreign.clone()).await.0, 401);
}

#[tokio::test]
async fn only_allowed_origins_get_cors_and_only_on_exec_and_files() {
    let hub = start().await;
    let http = reqwest::Client::new();
    let (_, ws) = hub
        .api("POST", "/workspaces", Some(json!({})))
        .await
        .unwrap();
    let id = ws["id"].as_str().unwrap();
    let preflight = |path: String, origin: &'static str| {
        let http = http.clone();
        let url = hub.url(&path);
        async move {
            http.request(reqwest::Method::OPTIONS, url)
                .header("origin", origin)
                .header("access-control-request-method", "POST")
                .header(
                    "access-control-request-headers",
                    "authorization, content-type",
                )
                .send()
                .await
                .unwrap()
        }
    };
    for path in [
        format!("/workspaces/{id}/exec"),
        format!("/workspaces/{id}/files/a/b.txt"),
    ] {
        let res = preflight(path.clone(), HOST_APP).await;
        assert_eq!(res.status(), 204, "{path}");
        assert_eq!(res.headers()["access-control-allow-origin"], HOST_APP);
        assert!(
            res.headers()
                .get("access-control-allow-credentials")
                .is_none()
        );
        let allowed = res.headers()["access-control-allow-headers"]
            .to_str()
            .unwrap();
        assert!(allowed.contains("authorization"), "{allowed}");
        let res = preflight(path.clone(), "http://evil.example").await;
        assert!(
            res.headers().get("access-control-allow-origin").is_none(),
            "{path}"
        );
    }
    for path in [
        "/workspaces".to_owned(),
        format!("/workspaces/{id}"),
        format!("/workspaces/{id}/tickets"),
        "/tokens".to_owned(),
        "/session".to_owned(),
    ] {
        let res = preflight(path.clone(), HOST_APP).await;
        assert!(
            res.headers().get("access-control-allow-origin").is_none(),
            "{path}"
        );
    }
    // A real request from the host app's origin gets the header; others do not.
    let res = http
        .get(hub.url(&format!("/workspaces/{id}/files")))
        .header("origin", HOST_APP)
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["access-control-allow-origin"], HOST_APP);
    assert_eq!(res.status(), 401);

    // The embeddable page may be framed by the host app; the web UI by no one.
    let res = http
        .get(hub.url(&format!("/embed/terminal/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let csp = res.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(csp, format!("frame-ancestors 'self' {HOST_APP}"));
    assert!(res.text().await.unwrap().contains("wshTerminal"));
    let res = http.get(hub.url("/")).send().await.unwrap();
    assert_eq!(
        res.headers()["content-security-policy"],
        "frame-ancestors 'none'"
    );
    let res = http
        .get(hub.url("/embed/terminal/not-a-uuid"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
}
