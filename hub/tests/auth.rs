//! Who may do what: API tokens (create, list, revoke, expiry), team mode admins, and the
//! rate limit on failed authentication.

use harness::{HubOptions, TestHub};
use serde_json::json;

#[tokio::test]
async fn tokens_are_created_listed_and_revoked() {
    let hub = TestHub::start_manual().await.unwrap();
    let (code, created) = hub
        .api(
            "POST",
            "/tokens",
            Some(json!({"name": "laptop", "expires_in_secs": 3600})),
        )
        .await
        .unwrap();
    assert_eq!(code, 201, "{created}");
    let token = created["token"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(created["expires_at"].is_string());

    // The new token works; listing never shows a secret.
    let (code, list) = hub.api_as(&token, "GET", "/tokens", None).await.unwrap();
    assert_eq!(code, 200);
    let list = list.as_array().unwrap();
    assert!(
        list.iter()
            .any(|t| t["id"] == id.as_str() && t["name"] == "laptop")
    );
    assert!(list.iter().all(|t| t.get("token").is_none()), "{list:?}");
    assert!(!serde_json::to_string(list).unwrap().contains(&token));

    // Another owner cannot revoke it, or learn that it exists.
    let mallory = hub.mint_token("mallory").unwrap();
    let (code, _) = hub
        .api_as(&mallory, "DELETE", &format!("/tokens/{id}"), None)
        .await
        .unwrap();
    assert_eq!(code, 404);

    let (code, _) = hub
        .api("DELETE", &format!("/tokens/{id}"), None)
        .await
        .unwrap();
    assert_eq!(code, 204);
    let (code, body) = hub
        .api_as(&token, "GET", "/workspaces", None)
        .await
        .unwrap();
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let (code, _) = hub
        .api("DELETE", &format!("/tokens/{id}"), None)
        .await
        .unwrap();
    assert_eq!(code, 404);

    for bad in [
        json!({"name": ""}),
        json!({"name": "x".repeat(65)}),
        json!({"name": "ok", "expires_in_secs": 1}),
        json!({"name": "ok", "expires_in_secs": 400 * 24 * 3600}),
    ] {
        let (code, body) = hub.api("POST", "/tokens", Some(bad.clone())).await.unwrap();
        assert_eq!(
            (code, body["error"]["code"].as_str()),
            (400, Some("invalid_request")),
            "{bad}"
        );
    }
}

#[tokio::test]
async fn admins_see_and_act_on_every_workspace_members_only_their_own() {
    let hub = TestHub::start_with(HubOptions {
        provider: "manual".into(),
        config: "admins = [\"boss\"]\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let alice = hub.mint_token("alice").unwrap();
    let bob = hub.mint_token("bob").unwrap();
    let boss = hub.mint_token("boss").unwrap();
    let (_, ws) = hub
        .api_as(&alice, "POST", "/workspaces", Some(json!({})))
        .await
        .unwrap();
    let id = ws["id"].as_str().unwrap();
    hub.api_as(&bob, "POST", "/workspaces", Some(json!({})))
        .await
        .unwrap();

    let (_, all) = hub.api_as(&boss, "GET", "/workspaces", None).await.unwrap();
    assert_eq!(all.as_array().unwrap().len(), 2);
    let (_, mine) = hub.api_as(&bob, "GET", "/workspaces", None).await.unwrap();
    assert_eq!(mine.as_array().unwrap().len(), 1);

    let (code, _) = hub
        .api_as(&boss, "GET", &format!("/workspaces/{id}"), None)
        .await
        .unwrap();
    assert_eq!(code, 200);
    let (code, _) = hub
        .api_as(&bob, "GET", &format!("/workspaces/{id}"), None)
        .await
        .unwrap();
    assert_eq!(code, 404);
    let (code, body) = hub
        .api_as(&boss, "DELETE", &format!("/workspaces/{id}"), None)
        .await
        .unwrap();
    assert_eq!(code, 202, "{body}");
}

#[tokio::test]
async fn failed_authentication_is_rate_limited_per_address() {
    let hub = TestHub::start_manual().await.unwrap();
    // The default limit: 20 a minute.
    for i in 0..20 {
        let (code, _) = hub
            .api_as(&format!("wsh_wrong{i}"), "GET", "/workspaces", None)
            .await
            .unwrap();
        assert_eq!(code, 401);
    }
    let (code, body) = hub
        .api_as("wsh_wrong", "GET", "/workspaces", None)
        .await
        .unwrap();
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (429, Some("too_many_failures"))
    );
    // Even a good token waits out the window from that address; the hub keeps serving.
    let (code, _) = hub.api("GET", "/workspaces", None).await.unwrap();
    assert_eq!(code, 429);
    let (code, _) = hub.api("GET", "/healthz", None).await.unwrap();
    assert_eq!(code, 200);
    // Tokens never show up in the log.
    assert!(!hub.log().contains("wsh_wrong"));
    assert!(!hub.log().contains(&hub.token));
}

#[tokio::test]
async fn huge_and_malformed_credentials_get_a_clear_401_and_the_hub_keeps_serving() {
    let hub = TestHub::start_manual().await.unwrap();
    let http = reqwest::Client::new();
    for (what, token) in [
        ("100 KB bearer", "x".repeat(100_000)),
        ("JWT-looking bearer", "eyJhbGciOiJub25lIn0.e30.".to_owned()),
        ("not a token", "wsh_\u{1}".replace('\u{1}', "%00")),
    ] {
        let res = http
            .get(hub.url("/workspaces"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 401, "{what}");
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(body["error"]["code"], "unauthorized", "{what}");
        assert!(!hub.log().contains(&token), "{what} logged");
    }
    // A cookie session that is garbage is no better than none.
    let res = http
        .get(hub.url("/session"))
        .header("cookie", "wsh_session=garbage; other=1")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    // Headers beyond what the server reads are refused at the HTTP layer.
    let res = http
        .get(hub.url("/workspaces"))
        .header("x-padding", "p".repeat(2 << 20))
        .send()
        .await;
    assert!(res.map(|r| r.status().as_u16() == 431).unwrap_or(true));
    let (code, _) = hub.api("GET", "/workspaces", None).await.unwrap();
    assert_eq!(code, 200);
}
