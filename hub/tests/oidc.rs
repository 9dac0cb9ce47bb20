//! Browser sign-in through a test OpenID Connect issuer (its own keys, discovery document
//! and JWKS on 127.0.0.1:0): the authorization-code flow with PKCE, the session cookie and
//! CSRF, key caching and rotation, bad ID tokens, admins by e-mail domain, and Cloud
//! Scheduler's OIDC tokens on `POST /cleanup`.

use harness::oidc::{Key, TestIssuer};
use harness::{HubOptions, TestHub};
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use serde_json::{Value, json};

const CLIENT: &str = "hub-client";
const SECRET: &str = "client-secret-1234";
const SCHEDULER: &str = "scheduler@project.iam.gserviceaccount.com";
const CLEANUP_AUD: &str = "https://hub.test/cleanup";

async fn start(admins: &str) -> (TestIssuer, TestHub) {
    let issuer = TestIssuer::start(CLIENT, SECRET).await.unwrap();
    let hub = TestHub::start_with(HubOptions {
        provider: "manual".into(),
        config: format!(
            "admins = [{admins}]\n\
             [oidc]\nissuer = \"{url}\"\nclient_id = \"{CLIENT}\"\nclient_secret = \"{SECRET}\"\n\
             [cleanup_oidc]\nissuer = \"{url}\"\naudience = \"{CLEANUP_AUD}\"\nservice_account = \"{SCHEDULER}\"\n",
            url = issuer.url
        ),
        ..Default::default()
    })
    .await
    .unwrap();
    (issuer, hub)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn set_cookie(res: &reqwest::Response, name: &str) -> Option<String> {
    res.headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(str::to_owned)
}

fn cookie_value(set_cookie: &str) -> String {
    let pair = set_cookie.split(';').next().unwrap();
    pair.split_once('=').unwrap().1.to_owned()
}

/// Runs the browser's part of a sign-in: `/login`, the issuer, back to the callback.
/// Returns the callback's response.
async fn sign_in(hub: &TestHub) -> reqwest::Response {
    let http = client();
    let login = http.get(hub.url("/login")).send().await.unwrap();
    assert_eq!(login.status(), 303);
    let bind = cookie_value(&set_cookie(&login, "wsh_login").expect("state cookie"));
    let to_issuer = login.headers()[LOCATION].to_str().unwrap().to_owned();
    assert!(
        to_issuer.contains("code_challenge_method=S256"),
        "{to_issuer}"
    );
    assert!(to_issuer.contains("nonce="), "{to_issuer}");
    let at_issuer = http.get(&to_issuer).send().await.unwrap();
    assert_eq!(at_issuer.status(), 302);
    let back = at_issuer.headers()[LOCATION].to_str().unwrap().to_owned();
    assert!(back.starts_with(&hub.url("/login/callback")), "{back}");
    http.get(&back)
        .header(COOKIE, format!("wsh_login={bind}"))
        .send()
        .await
        .unwrap()
}

async fn signed_in_session(hub: &TestHub) -> String {
    let res = sign_in(hub).await;
    assert_eq!(res.status(), 303, "{:?}", res.text().await);
    cookie_value(&set_cookie(&res, "wsh_session").unwrap())
}

async fn call(
    hub: &TestHub,
    session: &str,
    csrf: Option<&str>,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = client()
        .request(method, hub.url(path))
        .header(COOKIE, format!("wsh_session={session}"));
    if let Some(csrf) = csrf {
        req = req.header("X-CSRF-Token", csrf);
    }
    if let Some(body) = body {
        req = req.json(&body);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn sign_in_with_pkce_sets_a_session_cookie_guarded_by_csrf() {
    let (issuer, hub) = start("").await;
    let res = sign_in(&hub).await;
    assert_eq!(res.status(), 303);
    assert_eq!(res.headers()[LOCATION], "/");
    let cookie = set_cookie(&res, "wsh_session").unwrap();
    for attr in ["HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain http hub: {cookie}");
    let session = cookie_value(&cookie);

    let (status, me) = call(&hub, &session, None, reqwest::Method::GET, "/session", None).await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["owner_id"], "test-user", "the owner is the subject");
    assert_eq!(me["email"], "user@example.com");
    assert_eq!(me["admin"], false);
    let csrf = me["csrf_token"].as_str().unwrap().to_owned();

    // State-changing requests need the CSRF token; reads do not.
    let post = reqwest::Method::POST;
    let (status, body) = call(
        &hub,
        &session,
        None,
        post.clone(),
        "/workspaces",
        Some(json!({})),
    )
    .await;
    assert_eq!((status, code(&body)), (403, "csrf"));
    let (status, body) = call(
        &hub,
        &session,
        Some("forged"),
        post.clone(),
        "/workspaces",
        Some(json!({})),
    )
    .await;
    assert_eq!((status, code(&body)), (403, "csrf"));
    let (status, ws) = call(
        &hub,
        &session,
        Some(&csrf),
        post.clone(),
        "/workspaces",
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 201, "{ws}");
    assert_eq!(ws["owner_id"], "test-user");
    let (status, list) = call(
        &hub,
        &session,
        None,
        reqwest::Method::GET,
        "/workspaces",
        None,
    )
    .await;
    assert_eq!((status, list.as_array().unwrap().len()), (200, 1));
    // Another session's CSRF token does not fit this one.
    let other = signed_in_session(&hub).await;
    let (_, other_me) = call(&hub, &other, None, reqwest::Method::GET, "/session", None).await;
    let other_csrf = other_me["csrf_token"].as_str().unwrap();
    let (status, _) = call(
        &hub,
        &session,
        Some(other_csrf),
        post.clone(),
        "/workspaces",
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 403);
    // Two sign-ins, one JWKS fetch: the key set is cached.
    assert_eq!(issuer.jwks_fetches(), 1);

    // A callback replayed, or completed in a browser that did not start it, is refused.
    let http = client();
    let login = http.get(hub.url("/login")).send().await.unwrap();
    let bind = cookie_value(&set_cookie(&login, "wsh_login").unwrap());
    let at_issuer = http
        .get(login.headers()[LOCATION].to_str().unwrap())
        .send()
        .await
        .unwrap();
    let back = at_issuer.headers()[LOCATION].to_str().unwrap().to_owned();
    let res = http.get(&back).send().await.unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(code(&res.json().await.unwrap()), "login_state_mismatch");
    let ok = http
        .get(&back)
        .header(COOKIE, format!("wsh_login={bind}"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 303);
    let replay = http
        .get(&back)
        .header(COOKIE, format!("wsh_login={bind}"))
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), 400);
    assert_eq!(code(&replay.json().await.unwrap()), "login_expired");
    // The issuer ending the sign-in (user said no) is a clear refusal.
    let res = http
        .get(hub.url("/login/callback?error=access_denied&state=x"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(code(&res.json().await.unwrap()), "login_failed");

    // Sign-out revokes the session.
    let (status, _) = call(&hub, &session, Some(&csrf), post, "/logout", None).await;
    assert_eq!(status, 204);
    let (status, _) = call(&hub, &session, None, reqwest::Method::GET, "/session", None).await;
    assert_eq!(status, 401);

    // Sessions and the flow's secrets never reach the log.
    let log = hub.log();
    for secret in [session.as_str(), &csrf, &bind, SECRET] {
        assert!(!log.contains(secret), "secret in hub log");
    }
}

#[tokio::test]
async fn id_tokens_must_verify_and_keys_rotate() {
    let (issuer, hub) = start("").await;
    signed_in_session(&hub).await;
    assert_eq!(issuer.jwks_fetches(), 1);

    // The issuer rotates its key: a token under the new key makes the hub fetch the key set
    // again; a token under the key that left the set is refused.
    let old = issuer.rotate("key-2");
    // The hub fetches keys for an unknown `kid` at most once a second (a bound on what
    // random key ids can make it do).
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    signed_in_session(&hub).await;
    assert_eq!(issuer.jwks_fetches(), 2);

    let good = issuer.claims(CLIENT, "mallory", "m@example.com");
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": "key-2"});
    let stranger = Key::generate("key-2");
    let mut expired = good.clone();
    expired["exp"] = json!(1_000_000);
    let mut early = good.clone();
    early["nbf"] = json!(good["exp"].as_u64().unwrap() + 86_400);
    let mut wrong_aud = good.clone();
    wrong_aud["aud"] = json!("another-client");
    let mut wrong_iss = good.clone();
    wrong_iss["iss"] = json!("https://evil.example");
    let b64 = |v: &Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "rotated-out key",
            old.sign_raw(&json!({"alg": "RS256", "kid": old.kid}), &good),
            "does not publish",
        ),
        (
            "wrong signature",
            stranger.sign_raw(&header, &good),
            "signature",
        ),
        ("wrong audience", issuer.sign(&wrong_aud), "audience"),
        ("wrong issuer", issuer.sign(&wrong_iss), "issuer"),
        ("expired", issuer.sign(&expired), "expired"),
        ("not yet valid", issuer.sign(&early), "not yet valid"),
        (
            "alg none",
            format!("{}.{}.", b64(&json!({"alg": "none"})), b64(&good)),
            "algorithm",
        ),
        ("malformed", "not.a.jwt!".into(), "malformed"),
        ("no nonce", issuer.sign(&good), "nonce"),
    ];
    for (what, token, message) in cases {
        issuer.answer_next_with(token.clone());
        let res = sign_in(&hub).await;
        assert_eq!(res.status(), 401, "{what}");
        assert!(set_cookie(&res, "wsh_session").is_none(), "{what}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(code(&body), "invalid_token", "{what}: {body}");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(message), "{what}: {msg}");
        assert!(!msg.contains(&token), "{what}: token echoed");
        assert!(!hub.log().contains(&token), "{what}: token logged");
    }
    // Nobody was signed in as mallory.
    let (_, all) = hub.api("GET", "/workspaces", None).await.unwrap();
    assert!(!all.to_string().contains("mallory"));
}

#[tokio::test]
async fn admins_by_email_domain() {
    let (issuer, hub) = start("\"@admins.example\"").await;
    let (status, theirs) = hub
        .api("POST", "/workspaces", Some(json!({})))
        .await
        .unwrap();
    assert_eq!(status, 201);
    let id = theirs["id"].as_str().unwrap();

    // A member of another domain sees only their own.
    issuer.set_user("member-1", "someone@elsewhere.example");
    let member = signed_in_session(&hub).await;
    let (status, _) = call(
        &hub,
        &member,
        None,
        reqwest::Method::GET,
        &format!("/workspaces/{id}"),
        None,
    )
    .await;
    assert_eq!(status, 404);

    issuer.set_user("admin-1", "boss@admins.example");
    let admin = signed_in_session(&hub).await;
    let (_, me) = call(&hub, &admin, None, reqwest::Method::GET, "/session", None).await;
    assert_eq!(me["admin"], true, "{me}");
    let (status, ws) = call(
        &hub,
        &admin,
        None,
        reqwest::Method::GET,
        &format!("/workspaces/{id}"),
        None,
    )
    .await;
    assert_eq!((status, ws["owner_id"].as_str()), (200, Some("dev")));
}

#[tokio::test]
async fn cleanup_accepts_the_scheduler_service_accounts_oidc_token() {
    let (issuer, hub) = start("").await;
    let cleanup = |token: String| {
        let req = client().post(hub.url("/cleanup")).bearer_auth(token);
        async move {
            let res = req.send().await.unwrap();
            let status = res.status().as_u16();
            (status, res.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let good = issuer.claims(CLEANUP_AUD, "1234567890", SCHEDULER);
    let (status, body) = cleanup(issuer.sign(&good)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["reconciled"].is_object());

    let mut someone = good.clone();
    someone["email"] = json!("someone@project.iam.gserviceaccount.com");
    let mut unverified = good.clone();
    unverified["email_verified"] = json!(false);
    let mut other_aud = good.clone();
    other_aud["aud"] = json!(CLIENT);
    for (what, token) in [
        ("another account", issuer.sign(&someone)),
        ("unverified e-mail", issuer.sign(&unverified)),
        ("another audience", issuer.sign(&other_aud)),
        ("garbage", "a.b.c".into()),
        ("not a jwt", "plain-secret".into()),
        (
            "huge",
            format!("{}.{}.x", "a".repeat(40_000), "b".repeat(40_000)),
        ),
    ] {
        let (status, body) = cleanup(token.clone()).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert!(
            matches!(code(&body), "invalid_token" | "unauthorized"),
            "{what}: {body}"
        );
        assert!(!hub.log().contains(&token), "{what}: token logged");
    }
}
