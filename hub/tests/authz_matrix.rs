//! The authorization matrix: every route of the OpenAPI document (so a new route cannot
//! escape it), called as anonymous, with a revoked token, with an expired token, as another
//! member, as the owner and as an admin; then the same for the terminal WebSocket and the
//! CLI's QUIC sessions. A non-owner gets 404 and never the workspace's data.

use harness::oidc::TestIssuer;
use harness::{HubOptions, TestHub};
use hub::edge::caller::route_scope;
use hub::store::{ApiToken, Scope, Store};
use serde_json::{Value, json};
use std::process::Command;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Access {
    /// Anyone (health, version, sign-in steps).
    Public,
    /// Any signed-in caller; acts on the caller's own things.
    Caller,
    /// The owner of the workspace (or token) in the path, or an admin.
    Owner,
    /// Only its owner, even in team mode (API tokens are personal).
    Personal,
    /// Only the scheduler's secret or OIDC token.
    Scheduler,
    /// Admins (and the metrics token).
    Admin,
}

fn access(method: &str, path: &str) -> Access {
    use Access::*;
    match (method, path) {
        ("get", "/healthz" | "/version" | "/login" | "/login/callback" | "/login/once") => Public,
        ("get", "/" | "/assets/{file}" | "/ca.pem" | "/openapi.json") => Public,
        // A static page: the terminal ticket it needs comes in the fragment.
        ("get", "/embed/terminal/{id}") => Public,
        ("post", "/login/device" | "/login/device/token") => Public,
        ("post", "/cleanup") => Scheduler,
        ("get", "/metrics" | "/audit") => Admin,
        ("get" | "post", "/workspaces" | "/tokens")
        | ("get", "/events")
        | ("get", "/session")
        | ("post", "/logout" | "/login/device/approve") => Caller,
        ("get" | "post", "/ssh-keys") | ("get" | "put" | "delete", "/dotfiles") => Caller,
        ("delete", "/tokens/{id}" | "/ssh-keys/{id}") => Personal,
        (_, p) if p.starts_with("/workspaces/{id}") => Owner,
        // Aliases of the terminal and of the events, and previews (a private port).
        (_, "/terminal/{id}" | "/preview/{id}") => Owner,
        (_, p) if p.starts_with("/preview/{id}/{port}") => Owner,
        other => panic!("{other:?} is not in the authorization matrix: add it to `access`"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Who {
    Anonymous,
    Revoked,
    Expired,
    Member,
    Owner,
    Admin,
    /// A service token with every scope, acting for the owner (`dev`).
    Service,
    /// A service token with the `workspaces` scope alone, acting for the owner.
    ServiceNarrow,
    /// A service token with every scope, acting for another owner id.
    ServiceStranger,
    /// A browser token for the workspace in the path, with the route's purpose (or
    /// `terminal` where the route has none).
    Ticket,
    /// A browser token with the route's purpose, for another of the owner's workspaces.
    ForeignTicket,
}

struct Callers {
    revoked: String,
    expired: String,
    member: String,
    admin: String,
    service: String,
    narrow: String,
}

impl Callers {
    fn token<'a>(&'a self, hub: &'a TestHub, who: Who) -> Option<&'a str> {
        match who {
            Who::Anonymous | Who::Ticket | Who::ForeignTicket => None,
            Who::Revoked => Some(&self.revoked),
            Who::Expired => Some(&self.expired),
            Who::Member => Some(&self.member),
            Who::Owner => Some(&hub.token),
            Who::Admin => Some(&self.admin),
            Who::Service | Who::ServiceStranger => Some(&self.service),
            Who::ServiceNarrow => Some(&self.narrow),
        }
    }

    /// The owner id a service token names.
    fn acting_for(who: Who) -> Option<&'static str> {
        match who {
            Who::Service | Who::ServiceNarrow => Some("dev"),
            Who::ServiceStranger => Some("dev-stranger"),
            _ => None,
        }
    }
}

const EVERYONE: [Who; 11] = [
    Who::Anonymous,
    Who::Revoked,
    Who::Expired,
    Who::Member,
    Who::Owner,
    Who::Admin,
    Who::Service,
    Who::ServiceNarrow,
    Who::ServiceStranger,
    Who::Ticket,
    Who::ForeignTicket,
];

/// The purpose of a browser token that reaches routes of `scope`, if any does.
fn purpose(scope: Option<Scope>) -> Option<&'static str> {
    match scope? {
        Scope::Terminal => Some("terminal"),
        Scope::Preview => Some("preview"),
        Scope::Exec => Some("exec"),
        Scope::Files => Some("files"),
        Scope::Workspaces | Scope::Tickets => None,
    }
}

/// A browser token for `purpose` on workspace `id`, minted by the owner.
async fn ticket(hub: &TestHub, id: &str, purpose: &str) -> String {
    let (status, body) = hub
        .api(
            "POST",
            &format!("/workspaces/{id}/tickets"),
            Some(json!({"purpose": purpose, "expires_in_secs": 600})),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    body["ticket"].as_str().unwrap().to_owned()
}

async fn setup(provider: &str) -> (TestIssuer, TestHub, Callers) {
    let issuer = TestIssuer::start("matrix", "matrix-secret").await.unwrap();
    let hub = TestHub::start_with(HubOptions {
        provider: provider.into(),
        config: format!(
            "admins = [\"root\"]\nauth_failures_per_minute = 100000\n\
             cleanup_token = \"a-cleanup-secret-of-some-length\"\n\
             [quotas]\nmax_workspaces = 10000\nmax_running = 10000\n\
             [oidc]\nissuer = \"{}\"\nclient_id = \"matrix\"\nclient_secret = \"matrix-secret\"\n",
            issuer.url
        ),
        ..Default::default()
    })
    .await
    .unwrap();
    let (_, created) = hub
        .api("POST", "/tokens", Some(json!({"name": "to revoke"})))
        .await
        .unwrap();
    let revoked = created["token"].as_str().unwrap().to_owned();
    let (status, _) = hub
        .api(
            "DELETE",
            &format!("/tokens/{}", created["id"].as_str().unwrap()),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 204);
    // An expired token, written into the hub's own store (the API never mints one).
    let expired = "wsh_expired0123456789abcdef0123456789abcdef01".to_owned();
    let store = hub::store::sqlite::SqliteStore::open(&hub.state_dir.join("hub.sqlite3")).unwrap();
    store
        .insert_api_token(
            &hub::domain::auth::token_hash(&expired),
            &ApiToken {
                owner_id: "dev".into(),
                name: "old".into(),
                expires_at: Some(hub::base::workspace::now_ms() - 1_000),
                email: None,
                service: None,
            },
        )
        .await
        .unwrap();
    let admin = hub.mint_token("root").unwrap();
    let service = |scopes: Value| {
        let hub = &hub;
        let admin = admin.clone();
        async move {
            let (status, body) = hub
                .api_as(
                    &admin,
                    "POST",
                    "/tokens",
                    Some(json!({"name": "host app", "service": {"owner_prefix": "dev", "scopes": scopes}})),
                )
                .await
                .unwrap();
            assert_eq!(status, 201, "{body}");
            body["token"].as_str().unwrap().to_owned()
        }
    };
    let callers = Callers {
        revoked,
        expired,
        member: hub.mint_token("member").unwrap(),
        service: service(json!([
            "workspaces",
            "terminal",
            "preview",
            "exec",
            "files",
            "tickets"
        ]))
        .await,
        narrow: service(json!(["workspaces"])).await,
        admin,
    };
    (issuer, hub, callers)
}

/// A request body that is valid for the route, so only authorization can refuse it.
async fn body_for(hub: &TestHub, method: &str, path: &str) -> Option<Value> {
    match (method, path) {
        ("post", "/workspaces") => Some(json!({})),
        ("post", "/tokens") => Some(json!({"name": "matrix"})),
        ("post", "/ssh-keys") => Some(json!({"key": new_key()})),
        ("put", "/dotfiles") => Some(json!({"repo": "https://example.com/dotfiles.git"})),
        ("post", "/workspaces/{id}/tickets") => Some(json!({"purpose": "terminal"})),
        ("post", "/workspaces/{id}/keep-awake") => Some(json!({"seconds": 60})),
        ("post", "/workspaces/{id}/exec") => Some(json!({"argv": ["true"]})),
        ("post", "/workspaces/{id}/files" | "/workspaces/{id}/files/{path}") => {
            Some(json!({"action": "mkdir"}))
        }
        ("put", "/workspaces/{id}/ports/{port}/sharing") => Some(json!({"visibility": "public"})),
        ("post", "/workspaces/{id}/ports/{port}/links") => Some(json!({})),
        ("post", "/login/device/token") => Some(json!({"device_code": "unknown"})),
        ("post", "/login/device/approve") => {
            let (_, code) = hub.api("POST", "/login/device", None).await.unwrap();
            Some(json!({"user_code": code["user_code"]}))
        }
        (_, _) => None,
    }
}

/// A public key no one has added yet (an ed25519 key's shape, random bytes).
fn new_key() -> String {
    use base64::Engine;
    let mut blob = vec![0, 0, 0, 11];
    blob.extend(b"ssh-ed25519");
    blob.extend([0, 0, 0, 32]);
    blob.extend(uuid::Uuid::new_v4().as_bytes());
    blob.extend(uuid::Uuid::new_v4().as_bytes());
    format!(
        "ssh-ed25519 {} matrix",
        base64::engine::general_purpose::STANDARD.encode(blob)
    )
}

#[tokio::test]
async fn every_route_answers_each_kind_of_caller_as_the_matrix_says() {
    let (_issuer, hub, callers) = setup("manual").await;
    let (_, doc) = hub.api("GET", "/openapi.json", None).await.unwrap();
    let paths = doc["paths"].as_object().unwrap();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut checked = 0;
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            let access = access(method, path);
            for who in EVERYONE {
                // A fresh target each time: the owner's workspace and API token.
                let ws = hub.create_workspace().await.unwrap();
                let ws_id = ws["id"].as_str().unwrap().to_owned();
                let (_, tok) = hub
                    .api("POST", "/tokens", Some(json!({"name": "target"})))
                    .await
                    .unwrap();
                let target = if path.starts_with("/tokens/") {
                    tok["id"].as_str().unwrap().to_owned()
                } else if path.starts_with("/ssh-keys/") {
                    // One of the owner's keys, percent-encoded.
                    let (status, key) = hub
                        .api("POST", "/ssh-keys", Some(json!({"key": new_key()})))
                        .await
                        .unwrap();
                    assert_eq!(status, 201, "{key}");
                    key["id"]
                        .as_str()
                        .unwrap()
                        .replace('/', "%2F")
                        .replace('+', "%2B")
                } else {
                    ws_id.clone()
                };
                let mut concrete = path
                    .replace("{id}", &target)
                    .replace("{port}", "3000")
                    .replace("{path}", "index.html")
                    .replace("{file}", "xterm.css");
                if path.contains("{link}") {
                    let (_, link) = hub
                        .api(
                            "POST",
                            &format!("/workspaces/{ws_id}/ports/3000/links"),
                            Some(json!({})),
                        )
                        .await
                        .unwrap();
                    concrete = concrete.replace("{link}", link["id"].as_str().unwrap());
                }
                let url = hub.url(&concrete);
                let mut req = http.request(method.to_uppercase().parse().unwrap(), &url);
                if let Some(token) = callers.token(&hub, who) {
                    req = req.bearer_auth(token);
                }
                if let Some(owner) = Callers::acting_for(who) {
                    req = req.header("x-wsh-owner", owner);
                }
                let scope = route_scope(&path.replace("{path}", "{*rest}"));
                if matches!(who, Who::Ticket | Who::ForeignTicket) {
                    let on = if who == Who::Ticket {
                        ws_id.clone()
                    } else {
                        let other = hub.create_workspace().await.unwrap();
                        other["id"].as_str().unwrap().to_owned()
                    };
                    let purpose = purpose(scope).unwrap_or("terminal");
                    req = req.bearer_auth(ticket(&hub, &on, purpose).await);
                }
                if let Some(body) = body_for(&hub, method, path).await {
                    req = req.json(&body);
                }
                let res = req.send().await.unwrap();
                let status = res.status().as_u16();
                let streaming = res
                    .headers()
                    .get("content-type")
                    .is_some_and(|v| v.to_str().unwrap_or("").starts_with("text/event-stream"));
                let body = if streaming {
                    String::new()
                } else {
                    res.text().await.unwrap()
                };
                let case = format!(
                    "{} {path} as {who:?}: {status} {body}",
                    method.to_uppercase()
                );
                assert!(status < 500, "{case}");
                let anonymous = matches!(who, Who::Anonymous | Who::Revoked | Who::Expired);
                let allowed = |status: u16| ![401, 403, 404].contains(&status);
                match (access, who) {
                    (Access::Public, _) => assert_ne!(status, 401, "{case}"),
                    (Access::Scheduler, _) => assert_eq!(status, 401, "{case}"),
                    // Service and browser tokens reach the routes of their scopes, no more.
                    (_, Who::Service) if scope.is_some() => assert!(allowed(status), "{case}"),
                    (_, Who::ServiceNarrow) if scope == Some(Scope::Workspaces) => {
                        assert!(allowed(status), "{case}")
                    }
                    (Access::Owner, Who::ServiceStranger) if scope.is_some() => {
                        assert_eq!(status, 404, "{case}");
                        assert!(!body.contains(&ws_id), "{case}");
                    }
                    (_, Who::ServiceStranger) if scope.is_some() => {
                        assert!(allowed(status), "{case}")
                    }
                    (_, Who::Ticket) if purpose(scope).is_some() => {
                        assert!(allowed(status), "{case}")
                    }
                    (_, Who::ForeignTicket) if purpose(scope).is_some() => {
                        assert_eq!(status, 401, "{case}")
                    }
                    (
                        _,
                        Who::Service
                        | Who::ServiceNarrow
                        | Who::ServiceStranger
                        | Who::Ticket
                        | Who::ForeignTicket,
                    ) => {
                        assert_eq!(status, 403, "{case}");
                        assert!(method == "head" || body.contains("\"scope\""), "{case}");
                    }
                    (_, _) if anonymous => {
                        assert_eq!(status, 401, "{case}");
                        assert!(
                            method == "head" || body.contains("\"unauthorized\""),
                            "{case}"
                        );
                    }
                    (Access::Admin, Who::Member | Who::Owner) => {
                        assert_eq!(status, 403, "{case}");
                        assert!(body.contains("admin_only"), "{case}");
                    }
                    (Access::Owner, Who::Member) | (Access::Personal, Who::Member | Who::Admin) => {
                        assert_eq!(status, 404, "{case}");
                        assert!(!body.contains(&ws_id), "{case}");
                    }
                    _ => assert!(allowed(status), "{case}"),
                }
                // A member's list is their own; an admin's has everyone's.
                if (method.as_str(), path.as_str()) == ("get", "/workspaces") {
                    assert_eq!(
                        body.contains(&ws_id),
                        matches!(
                            who,
                            Who::Owner | Who::Admin | Who::Service | Who::ServiceNarrow
                        ),
                        "{case}"
                    );
                }
                checked += 1;
            }
        }
    }
    assert!(
        checked >= 11 * 20,
        "only {checked} cases: did the OpenAPI document shrink?"
    );
}

#[tokio::test]
async fn terminals_events_and_cli_sessions_admit_only_owner_and_admin() {
    let (_issuer, hub, callers) = setup("process").await;
    let id = hub.ready_workspace().await.unwrap();
    let terminal = format!("ws://{}/workspaces/{id}/terminal", hub.listening.http);
    // Service and browser tokens on these are covered by the matrix and tests/embed.rs.
    for who in EVERYONE.into_iter().take(6) {
        // The terminal WebSocket with a bearer header (the CLI and scripts).
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                terminal.as_str(),
            )
            .unwrap();
        if let Some(token) = callers.token(&hub, who) {
            req.headers_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        let got = match tokio_tungstenite::connect_async(req).await {
            Ok(_) => 101,
            Err(tokio_tungstenite::tungstenite::Error::Http(res)) => res.status().as_u16(),
            Err(e) => panic!("{who:?}: {e}"),
        };
        let want = match who {
            Who::Anonymous | Who::Revoked | Who::Expired => 401,
            Who::Member => 404,
            Who::Owner | Who::Admin => 101,
            other => unreachable!("{other:?} is not among the people here"),
        };
        assert_eq!(got, want, "terminal as {who:?}");

        // The browser way: a ticket first (only for owner and admin), then the socket.
        if let Some(token) = callers.token(&hub, who) {
            let (status, ticket) = hub
                .api_as(
                    token,
                    "POST",
                    &format!("/workspaces/{id}/tickets"),
                    Some(json!({"purpose": "terminal"})),
                )
                .await
                .unwrap();
            if matches!(who, Who::Owner | Who::Admin) {
                assert_eq!(status, 201, "{who:?}");
                let url = format!("{terminal}?ticket={}", ticket["ticket"].as_str().unwrap());
                assert!(
                    tokio_tungstenite::connect_async(url).await.is_ok(),
                    "{who:?}"
                );
            } else {
                assert_eq!(
                    status,
                    if who == Who::Member { 404 } else { 401 },
                    "{who:?}"
                );
            }
        }

        // The exec WebSocket, likewise.
        let exec = format!("ws://{}/workspaces/{id}/exec", hub.listening.http);
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                exec.as_str(),
            )
            .unwrap();
        if let Some(token) = callers.token(&hub, who) {
            req.headers_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        let got = match tokio_tungstenite::connect_async(req).await {
            Ok(_) => 101,
            Err(tokio_tungstenite::tungstenite::Error::Http(res)) => res.status().as_u16(),
            Err(e) => panic!("{who:?}: {e}"),
        };
        assert_eq!(got, want, "exec socket as {who:?}");

        // The CLI's QUIC sessions: a terminal listing and a command.
        for args in [&["sessions", &id][..], &["exec", &id, "-n", "--", "true"]] {
            let mut cmd = Command::new(harness::binary("wsh").unwrap());
            cmd.args(args)
                .env("WSH_HUB", hub.url(""))
                .env("XDG_CONFIG_HOME", hub.state_dir.join("no-config"))
                .env_remove("WSH_TOKEN");
            if let Some(token) = callers.token(&hub, who) {
                cmd.env("WSH_TOKEN", token);
            }
            let out = cmd.output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.success(),
                matches!(who, Who::Owner | Who::Admin),
                "wsh {args:?} as {who:?}: {err}"
            );
            if who == Who::Member {
                assert!(err.contains("not found"), "{err}");
                assert!(!err.contains("dev"), "the owner leaks: {err}");
            }
        }
    }
    // A ticket for one workspace opens no other.
    let (_, other) = hub
        .api("POST", "/workspaces", Some(json!({})))
        .await
        .unwrap();
    let url = hub.terminal_url(&id, "").await.unwrap();
    let ticket = url.split("ticket=").nth(1).unwrap().trim_end_matches('&');
    let foreign = format!(
        "ws://{}/workspaces/{}/terminal?ticket={ticket}",
        hub.listening.http,
        other["id"].as_str().unwrap()
    );
    match tokio_tungstenite::connect_async(foreign).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => assert_eq!(res.status(), 401),
        other => panic!("foreign ticket: {:?}", other.map(|_| ())),
    }
}
