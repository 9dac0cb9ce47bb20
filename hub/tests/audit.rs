//! The audit log: lifecycle changes, sign-ins, tokens, share links and admin actions are
//! recorded with actor, target, time and outcome (refusals too), and `GET /audit` gives them
//! to admins only, filtered and a page at a time. (The store side, on SQLite and the
//! Firestore emulator, is in the store conformance suite.)

use harness::{HubOptions, TestHub};
use serde_json::{Value, json};

const CLEANUP_TOKEN: &str = "cleanup-secret-for-audit-tests";

/// Every entry `query` selects, following the pages (`limit` per page).
async fn read_all(hub: &TestHub, token: &str, query: &str, limit: usize) -> Vec<Value> {
    let mut all = Vec::new();
    let mut cursor = String::new();
    loop {
        let path = format!("/audit?limit={limit}{query}{cursor}");
        let (status, page) = hub.api_as(token, "GET", &path, None).await.unwrap();
        assert_eq!(status, 200, "{path}: {page}");
        let entries = page["entries"].as_array().unwrap();
        assert!(entries.len() <= limit);
        all.extend(entries.iter().cloned());
        match page["next"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => return all,
        }
    }
}

fn find<'a>(entries: &'a [Value], action: &str, actor: &str) -> Vec<&'a Value> {
    entries
        .iter()
        .filter(|e| e["action"] == action && e["actor"] == actor)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn actions_are_recorded_with_their_outcome_and_only_admins_read_them() {
    let hub = TestHub::start_with(HubOptions {
        config: format!(
            "admins = [\"root\"]\ncleanup_token = \"{CLEANUP_TOKEN}\"\nreconcile_interval = \"1h\"\n[idle]\nstop_after = \"0s\"\n"
        ),
        ..Default::default()
    })
    .await
    .unwrap();
    let root = hub.mint_token("root").unwrap();
    let bob = hub.mint_token("bob").unwrap();

    // The dev user creates a named workspace and stops it (by name, with a request id of
    // their own); a second stop is refused; bob, not the owner, is refused too.
    let (status, ws) = hub
        .api("POST", "/workspaces", Some(json!({"name": "audited"})))
        .await
        .unwrap();
    assert_eq!(status, 201, "{ws}");
    let id = ws["id"].as_str().unwrap().to_owned();
    hub.wait_for(&id, std::time::Duration::from_secs(30), |w| {
        !w["agent"].is_null() && w["status"] == "READY"
    })
    .await
    .unwrap();
    let res = hub
        .http
        .post(hub.url("/workspaces/audited/stop"))
        .bearer_auth(&hub.token)
        .header("x-request-id", "audit-test-stop")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    let (status, _) = hub
        .api("POST", "/workspaces/audited/stop", None)
        .await
        .unwrap();
    assert_eq!(status, 409);
    let (status, _) = hub
        .api_as(&bob, "POST", &format!("/workspaces/{id}/stop"), None)
        .await
        .unwrap();
    assert_eq!(status, 404);
    hub.wait_for(&id, std::time::Duration::from_secs(30), |w| {
        w["status"] == "SUSPENDED"
    })
    .await
    .unwrap();
    let (status, body) = hub
        .api("POST", &format!("/workspaces/{id}/start"), None)
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    hub.wait_for(&id, std::time::Duration::from_secs(30), |w| {
        !w["agent"].is_null() && w["status"] == "READY"
    })
    .await
    .unwrap();

    // Tokens: created and revoked; a create without credentials is denied.
    let (status, token) = hub
        .api("POST", "/tokens", Some(json!({"name": "ci"})))
        .await
        .unwrap();
    assert_eq!(status, 201, "{token}");
    let token_id = token["id"].as_str().unwrap().to_owned();
    let (status, _) = hub
        .api("DELETE", &format!("/tokens/{token_id}"), None)
        .await
        .unwrap();
    assert_eq!(status, 204);
    let res = hub
        .http
        .post(hub.url("/tokens"))
        .json(&json!({"name": "sneaky"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    // A share link for a port.
    let (status, link) = hub
        .api(
            "POST",
            &format!("/workspaces/{id}/ports/8080/links"),
            Some(json!({"expires_in_secs": 3600})),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{link}");

    // A sign-in with the one-time link the dev hub printed, and the same link again.
    let link = hub
        .sign_in_link()
        .expect("the sign-in link the dev hub printed");
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    for expected in [303, 401] {
        let res = no_redirects.get(hub.url(&link)).send().await.unwrap();
        assert_eq!(res.status().as_u16(), expected);
    }

    // The scheduler's clean-up: the idle sweep stops the idle workspace, as the hub.
    let res = hub
        .http
        .post(hub.url("/cleanup"))
        .bearer_auth(CLEANUP_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    // Only admins read the log.
    let (status, body) = hub.api("GET", "/audit", None).await.unwrap();
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "admin_only");
    let (status, _) = hub.api_as("nope", "GET", "/audit", None).await.unwrap();
    assert_eq!(status, 401);

    // The workspace's history, newest first, read two at a time.
    let about = read_all(&hub, &root, &format!("&workspace={id}"), 2).await;
    let actions: Vec<(&str, &str, &str)> = about
        .iter()
        .rev()
        .map(|e| {
            (
                e["action"].as_str().unwrap(),
                e["actor"].as_str().unwrap(),
                e["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        actions,
        [
            ("workspace.create", "dev", "ok"),
            ("workspace.stop", "dev", "ok"),
            ("workspace.stop", "dev", "refused"),
            ("workspace.stop", "bob", "refused"),
            ("workspace.start", "dev", "ok"),
            ("share_link.create", "dev", "ok"),
            ("workspace.stop", "system", "ok"),
        ],
        "{about:#?}"
    );
    let stop = &about[5];
    assert_eq!(stop["request_id"], "audit-test-stop");
    assert_eq!(stop["target"], "id=audited");
    assert_eq!(stop["via"], "user");
    assert_eq!(stop["status"], 202);
    assert_eq!(stop["ip"], "127.0.0.1");
    let refused = &about[4];
    assert_eq!(
        (refused["status"].as_u64(), refused["code"].as_str()),
        (Some(409), Some("conflict"))
    );
    let idle = &about[0];
    assert_eq!(idle["via"], "idle");

    // The rest: tokens, sign-ins, the clean-up, the denied create.
    let everything = read_all(&hub, &root, "", 1000).await;
    let created = find(&everything, "token.create", "dev");
    assert_eq!(created.len(), 1, "{everything:#?}");
    assert_eq!(created[0]["status"], 201);
    let revoked = find(&everything, "token.revoke", "dev");
    assert_eq!(revoked[0]["target"], format!("id={token_id}"));
    let denied = find(&everything, "token.create", "anonymous");
    assert_eq!(denied[0]["outcome"], "denied");
    assert_eq!(denied[0]["code"], "unauthorized");
    let sign_ins = find(&everything, "sign_in", "dev");
    assert_eq!(sign_ins.len(), 1);
    assert_eq!(
        (sign_ins[0]["via"].as_str(), sign_ins[0]["status"].as_u64()),
        (Some("link"), Some(303))
    );
    let reused = find(&everything, "sign_in", "anonymous");
    assert_eq!(reused[0]["outcome"], "denied");
    let cleanup = find(&everything, "admin.cleanup", "system");
    assert_eq!(cleanup[0]["via"], "scheduler");
    // The operator's `workspace-hub token create` for root and bob.
    assert_eq!(find(&everything, "token.create", "system").len(), 2);
    // Nothing the log holds is a secret.
    let text = serde_json::to_string(&everything).unwrap();
    for secret in [
        hub.token.as_str(),
        &root,
        &bob,
        link.split('=').nth(1).unwrap(),
        token["token"].as_str().unwrap(),
    ] {
        assert!(!text.contains(secret));
    }

    // Filters: an actor, a time window, both with a workspace.
    let of_bob = read_all(&hub, &root, "&actor=bob", 10).await;
    assert_eq!(of_bob.len(), 1, "{of_bob:#?}");
    assert_eq!(of_bob[0]["workspace_id"], id);
    let created_at = about.last().unwrap()["at"].as_i64().unwrap();
    let first = read_all(
        &hub,
        &root,
        &format!(
            "&workspace={id}&since={created_at}&until={}",
            created_at + 1
        ),
        10,
    )
    .await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0]["action"], "workspace.create");

    // Bad filters are refused, with a code.
    for bad in [
        "limit=0",
        "limit=1001",
        "cursor=zz",
        "workspace=audited",
        "since=-1",
        "colour=red",
    ] {
        let (status, body) = hub
            .api_as(&root, "GET", &format!("/audit?{bad}"), None)
            .await
            .unwrap();
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"]["code"], "invalid_request", "{bad}");
    }
}
