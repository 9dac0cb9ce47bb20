//! Ports through a real hub and agent: port events on SSE (and the snapshot after a
//! reconnect), the preview proxy (bearer, browser redirect with a preview cookie, sharing,
//! WebSocket, streaming both ways, bad input), `wsh forward`, and OpenSSH through
//! `wsh proxy`.

use futures_util::{SinkExt, StreamExt};
use harness::{HubOptions, Reaped, TestHub, free_port};
use serde_json::{Value, json};
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::sync::mpsc;

fn wsh(hub: &TestHub) -> Command {
    hub.wsh().unwrap()
}

fn test_server(port: u16) -> Vec<String> {
    harness::test_server(&[&port.to_string()])
}

/// The workspace's SSE events as (event, data).
async fn events(hub: &TestHub, id: &str) -> mpsc::UnboundedReceiver<(String, Value)> {
    let mut events = harness::sse::Events::open(hub, id).await;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if tx.send(event).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for a `port` event whose detail matches.
async fn port_event(
    rx: &mut mpsc::UnboundedReceiver<(String, Value)>,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let (event, data) = rx.recv().await.expect("event stream ended");
            if event == "port" && pred(&data["detail"]) {
                return data["detail"].clone();
            }
        }
    })
    .await
    .expect("port event in time")
}

fn lists(detail: &Value, port: u16) -> bool {
    detail["state"] == "all"
        && detail["ports"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|p| p["port"] == port))
}

#[tokio::test]
async fn ports_open_and_close_as_events_and_come_back_after_a_reconnect() {
    let mut hub = TestHub::start().await.unwrap();
    let id = hub.ready_workspace().await.unwrap();
    let mut rx = events(&hub, &id).await;
    assert_eq!(rx.recv().await.unwrap().0, "status");
    let (event, first) = rx.recv().await.unwrap();
    assert_eq!(
        (event.as_str(), &first["detail"]["state"]),
        ("port", &json!("all"))
    );

    // A server of the test process itself is on this machine but not in the workspace.
    let outsider = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let outsider_port = outsider.local_addr().unwrap().port();
    let port = free_port();
    let _server = hub.run_in_workspace(&id, &test_server(port)).unwrap();

    let opened = port_event(&mut rx, |d| {
        d["state"] == "opened" && d["port"]["port"] == port
    })
    .await;
    let info = &opened["port"];
    assert_eq!(info["process"], "test-server");
    assert!(
        info["command"].as_str().unwrap().contains("test-server"),
        "{info}"
    );
    assert_eq!(info["addresses"], json!(["127.0.0.1"]));
    assert_eq!(info["loopback_only"], true);
    let pid = info["pid"].as_u64().expect("pid") as i32;
    // The HTTP probe's answer follows.
    let probed = port_event(&mut rx, |d| {
        d["port"]["port"] == port && !d["port"]["http"].is_null()
    })
    .await;
    assert_eq!(probed["state"], "updated");
    assert_eq!(probed["port"]["http"], true);

    let (status, ports) = hub
        .api("GET", &format!("/workspaces/{id}/ports"), None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(ports["source"], "sock_diag");
    assert_eq!(ports["ports"][port.to_string()]["http"], true, "{ports}");
    assert!(
        ports["ports"].get(outsider_port.to_string()).is_none(),
        "another process's port: {ports}"
    );

    // The hub restarts: the agent reconnects and reports its ports again.
    hub.kill();
    hub.start_again().await.unwrap();
    hub.wait_for(&id, Duration::from_secs(20), |w| !w["agent"].is_null())
        .await
        .unwrap();
    let mut rx = events(&hub, &id).await;
    port_event(&mut rx, |d| lists(d, port)).await;

    // The server exits: its port closes.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let closed = port_event(&mut rx, |d| d["state"] == "closed").await;
    assert_eq!(closed["port"]["port"], port);
    drop(outsider);
}

/// A hub with a short preview timeout, a READY workspace with the test server in it.
async fn preview_setup() -> (TestHub, String, u16, Reaped) {
    let hub = TestHub::start_with(HubOptions {
        config: "preview_timeout = \"1s\"\nadmins = [\"root\"]\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let id = hub.ready_workspace().await.unwrap();
    let port = free_port();
    let server = hub.run_in_workspace(&id, &test_server(port)).unwrap();
    let url = hub.url(&format!("/workspaces/{id}/ports"));
    for _ in 0..200 {
        let ports: Value = hub
            .http
            .get(&url)
            .bearer_auth(&hub.token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if ports["ports"].get(port.to_string()).is_some() {
            return (hub, id, port, server);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("test server never listened");
}

/// An HTTP client that resolves the preview host names (`*.localhost`) to the hub.
fn browser(hub: &TestHub, id: &str, port: u16) -> reqwest::Client {
    let host = format!("{port}-{id}.localhost");
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .resolve(&host, hub.listening.http)
        .build()
        .unwrap()
}

fn set_cookie(res: &reqwest::Response, name: &str) -> Option<String> {
    res.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(|v| v.split(';').next().unwrap().to_owned())
}

/// Follows the hub's redirect to the preview origin and its `/__wsh/auth` step; returns the
/// preview cookie.
async fn enter(client: &reqwest::Client, first: reqwest::Response) -> String {
    assert_eq!(first.status(), 303, "{:?}", first.text().await);
    let to = first.headers()["location"].to_str().unwrap().to_owned();
    assert!(
        to.contains(".localhost:") && to.contains("/__wsh/auth?ticket="),
        "{to}"
    );
    let res = client.get(&to).send().await.unwrap();
    assert_eq!(res.status(), 303);
    set_cookie(&res, "wsh_preview").expect("preview cookie")
}

#[tokio::test]
async fn previews_proxy_http_streams_and_websockets_for_the_owner_only() {
    let (hub, id, port, _server) = preview_setup().await;
    let base = hub.url(&format!("/preview/{id}/{port}"));

    // API clients: bearer token, proxied on the hub's origin.
    let res = hub
        .http
        .get(format!("{base}/echo?x=1"))
        .bearer_auth(&hub.token)
        .header("cookie", "wsh_session=secret; app=1")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let echo: Value = res.json().await.unwrap();
    assert_eq!(echo["uri"], "/echo?x=1");
    let headers = &echo["headers"];
    assert_eq!(headers["host"], format!("localhost:{port}"));
    assert_eq!(
        headers["x-forwarded-prefix"],
        format!("/preview/{id}/{port}")
    );
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    assert!(
        headers.get("authorization").is_none(),
        "the hub token reached the workspace"
    );
    assert_eq!(
        headers["cookie"], "app=1",
        "hub cookies reached the workspace"
    );

    // A large body streamed up, for longer than the preview timeout (1 s here) but never
    // silent that long: the timeout counts silence. A response streamed down in chunks.
    let big = vec![7u8; 8 << 20];
    let chunks =
        futures_util::stream::iter(big.chunks(1 << 20).map(<[u8]>::to_vec).collect::<Vec<_>>())
            .then(|chunk| async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok::<_, std::io::Error>(chunk)
            });
    let res = hub
        .http
        .post(format!("{base}/count"))
        .bearer_auth(&hub.token)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    let status = res.status();
    let counted = res.json::<Value>().await.unwrap();
    assert_eq!(counted["bytes"], 8 << 20, "{status}: {counted}");
    let res = hub
        .http
        .get(format!("{base}/stream"))
        .bearer_auth(&hub.token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut body = res.bytes_stream();
    let mut got = String::new();
    let mut pieces = 0;
    while let Some(chunk) = body.next().await {
        got.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        pieces += 1;
    }
    assert_eq!(
        got,
        (0..5)
            .map(|i| format!("data: tick {i}\n\n"))
            .collect::<String>()
    );
    assert!(pieces >= 2, "the stream arrived in one piece: not streamed");

    // WebSocket through the proxy (dev-server hot reload).
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://{}/preview/{id}/{port}/ws", hub.listening.http),
    )
    .unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", hub.token).parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws.send(tokio_tungstenite::tungstenite::Message::text("hi"))
        .await
        .unwrap();
    let reply = ws.next().await.unwrap().unwrap();
    assert_eq!(reply.into_text().unwrap().as_str(), "echo: hi");
    drop(ws);

    // HTTP/2 from the client's side (h2c, as a TLS-terminating load balancer sends it).
    let tcp = tokio::net::TcpStream::connect(hub.listening.http)
        .await
        .unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get(format!(
        "http://{}/preview/{id}/{port}/echo?h2=1",
        hub.listening.http
    ))
    .header("authorization", format!("Bearer {}", hub.token))
    .body(axum::body::Body::empty())
    .unwrap();
    let res = h2.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let body = axum::body::to_bytes(axum::body::Body::new(res.into_body()), 1 << 20)
        .await
        .unwrap();
    let echo: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["uri"], "/echo?h2=1");
    assert_eq!(echo["headers"]["host"], format!("localhost:{port}"));

    // Browsers: the hub sends them to the preview's own origin with a ticket.
    let session = sign_in_cookie(&hub, "dev").await;
    let client = browser(&hub, &id, port);
    let first = client
        .get(format!("{base}/echo?y=2"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    let cookie = enter(&client, first).await;
    let origin = format!("http://{port}-{id}.localhost:{}", hub.listening.http.port());
    let res = client
        .get(format!("{origin}/echo?y=2"))
        .header("cookie", format!("{cookie}; app=2"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let echo: Value = res.json().await.unwrap();
    assert_eq!(
        echo["headers"]["cookie"], "app=2",
        "the preview cookie reached the workspace"
    );
    // WebSocket on the preview origin with the preview cookie.
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://127.0.0.1:{}/ws", hub.listening.http.port()),
    )
    .unwrap();
    req.headers_mut().insert(
        "host",
        format!("{port}-{id}.localhost:{}", hub.listening.http.port())
            .parse()
            .unwrap(),
    );
    req.headers_mut().insert("cookie", cookie.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    ws.send(tokio_tungstenite::tungstenite::Message::text("again"))
        .await
        .unwrap();
    assert_eq!(
        ws.next()
            .await
            .unwrap()
            .unwrap()
            .into_text()
            .unwrap()
            .as_str(),
        "echo: again"
    );
    drop(ws);

    // Nobody else: another member's session, no session, no preview cookie.
    let member = sign_in_cookie(&hub, "member").await;
    let res = client
        .get(format!("{base}/"))
        .header("cookie", &member)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let res = client.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    let member_token = hub.mint_token("member").unwrap();
    let res = hub
        .http
        .get(format!("{base}/"))
        .bearer_auth(&member_token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let res = client.get(format!("{origin}/")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    let res = client
        .get(format!("{origin}/"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        303,
        "a browser is sent through the hub to sign in"
    );
    // An admin may look.
    let admin = sign_in_cookie(&hub, "root").await;
    let first = client
        .get(format!("{base}/"))
        .header("cookie", &admin)
        .send()
        .await
        .unwrap();
    enter(&client, first).await;

    // By name: an API client's own workspace of that name; a browser is sent on to the id,
    // from the path form and from a name's host alike.
    let (_, ws) = hub
        .api("GET", &format!("/workspaces/{id}"), None)
        .await
        .unwrap();
    let name = ws["name"].as_str().unwrap().to_owned();
    let res = hub
        .http
        .get(hub.url(&format!("/preview/{name}/{port}/echo?n=1")))
        .bearer_auth(&hub.token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let echo: Value = res.json().await.unwrap();
    assert_eq!(echo["uri"], "/echo?n=1");
    assert_eq!(
        echo["headers"]["x-forwarded-prefix"],
        format!("/preview/{name}/{port}")
    );
    let res = hub
        .http
        .get(hub.url(&format!("/preview/{name}/{port}/echo")))
        .bearer_auth(&member_token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404, "a name is its owner's alone");
    let res = client
        .get(hub.url(&format!("/preview/{name}/{port}/echo?n=2")))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303);
    assert_eq!(
        res.headers()["location"],
        format!("/preview/{id}/{port}/echo?n=2")
    );
    for cookie in [&member, ""] {
        let res = client
            .get(hub.url(&format!("/preview/{name}/{port}/")))
            .header("cookie", cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), if cookie.is_empty() { 401 } else { 404 });
    }
    let named = format!("{port}-{name}.localhost");
    let by_host = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .resolve(&named, hub.listening.http)
        .build()
        .unwrap();
    let host_url = format!("http://{named}:{}/app?z=1", hub.listening.http.port());
    let res = by_host.get(&host_url).send().await.unwrap();
    assert_eq!(res.status(), 303);
    assert_eq!(
        res.headers()["location"],
        hub.url(&format!("/preview/{name}/{port}/app?z=1"))
    );
    let res = by_host.post(&host_url).send().await.unwrap();
    assert_eq!(res.status(), 404);
    let err: Value = res.json().await.unwrap();
    assert_eq!(err["error"]["code"], "use_the_id");

    // Bad input and broken backends: clear errors.
    let closer = free_port();
    let _closer = hub
        .run_in_workspace(&id, &{
            let mut c = test_server(0);
            c.truncate(1);
            c.extend(["blast".into(), closer.to_string(), "0".into()]);
            c
        })
        .unwrap();
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", closer))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for (path, want, code) in [
        (format!("/preview/{id}/{closer}/"), 502, "bad_response"),
        (format!("/preview/{id}/0/"), 400, "invalid_request"),
        (format!("/preview/{id}/70000/"), 400, "invalid_request"),
        (
            format!("/preview/{id}/{}/", free_port()),
            502,
            "port_unreachable",
        ),
        (format!("/preview/{id}/{port}/hang"), 504, "preview_timeout"),
        (format!("/preview/not-a-uuid/{port}/"), 404, "not_found"),
    ] {
        let res = hub
            .http
            .get(hub.url(&path))
            .bearer_auth(&hub.token)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), want, "{path}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{path}: {body}");
    }

    // Nothing leaks: every forward stream the agent opened is closed again once the hub's
    // pool of idle preview connections lets go of them (the agent counts open forwards as
    // attached clients in its activity reports).
    let mut attached = Value::Null;
    for _ in 0..400 {
        let (_, ws) = hub
            .api("GET", &format!("/workspaces/{id}"), None)
            .await
            .unwrap();
        attached = ws["agent"]["attached_clients"].clone();
        if attached == 2 {
            break; // the `wsh attach` sessions running the two servers
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(attached, 2, "forward streams left open");
}

/// A browser session cookie for `owner` (a token is a session: same store, same checks).
async fn sign_in_cookie(hub: &TestHub, owner: &str) -> String {
    format!("wsh_session={}", hub.mint_token(owner).unwrap())
}

#[tokio::test]
async fn ports_can_be_shared_publicly_signed_in_or_by_an_expiring_revocable_link() {
    let (hub, id, port, _server) = preview_setup().await;
    let base = hub.url(&format!("/preview/{id}/{port}"));
    let origin = format!("http://{port}-{id}.localhost:{}", hub.listening.http.port());
    let client = browser(&hub, &id, port);
    let sharing = format!("/workspaces/{id}/ports/{port}/sharing");

    let (status, view) = hub.api("GET", &sharing, None).await.unwrap();
    assert_eq!(
        (status, view["visibility"].as_str()),
        (200, Some("private"))
    );
    assert_eq!(view["url"], format!("{origin}/"));

    // Signed-in users: any member may open it, anonymous may not.
    hub.api(
        "PUT",
        &sharing,
        Some(json!({"visibility": "authenticated"})),
    )
    .await
    .unwrap();
    let member = sign_in_cookie(&hub, "member").await;
    let first = client
        .get(format!("{base}/"))
        .header("cookie", &member)
        .send()
        .await
        .unwrap();
    let member_cookie = enter(&client, first).await;
    let res = client
        .get(format!("{origin}/"))
        .header("cookie", &member_cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        client
            .get(format!("{base}/"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );

    // Back to private: the member's preview cookie stops working at once.
    hub.api("PUT", &sharing, Some(json!({"visibility": "private"})))
        .await
        .unwrap();
    let res = client
        .get(format!("{origin}/"))
        .header("cookie", &member_cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    // Public: anyone, no cookie at all.
    hub.api("PUT", &sharing, Some(json!({"visibility": "public"})))
        .await
        .unwrap();
    let res = client.get(format!("{origin}/")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "hello from test-server\n");
    hub.api("PUT", &sharing, Some(json!({"visibility": "private"})))
        .await
        .unwrap();

    // A share link works without signing in, until it is revoked.
    let (status, link) = hub
        .api(
            "POST",
            &format!("/workspaces/{id}/ports/{port}/links"),
            Some(json!({"expires_in_secs": 3600})),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{link}");
    let url = link["url"].as_str().unwrap().to_owned();
    let first = client.get(&url).send().await.unwrap();
    let link_cookie = enter(&client, first).await;
    let res = client
        .get(format!("{origin}/"))
        .header("cookie", &link_cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let (_, view) = hub.api("GET", &sharing, None).await.unwrap();
    assert_eq!(view["links"].as_array().unwrap().len(), 1);
    assert!(
        !view.to_string().contains("wsl_"),
        "the link's secret is shown again: {view}"
    );
    let (status, _) = hub
        .api(
            "DELETE",
            &format!(
                "/workspaces/{id}/ports/{port}/links/{}",
                link["id"].as_str().unwrap()
            ),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 204);
    assert_eq!(client.get(&url).send().await.unwrap().status(), 401);
    let res = client
        .get(format!("{origin}/"))
        .header("cookie", &link_cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401, "a revoked link's cookie still works");

    // An expired link is refused (written with a past expiry straight into the store).
    let store = hub::store::sqlite::SqliteStore::open(&hub.state_dir.join("hub.sqlite3")).unwrap();
    hub::store::Store::update_sharing(
        &store,
        uuid::Uuid::parse_str(&id).unwrap(),
        hub::base::workspace::SharingChange::AddLink(hub::base::workspace::ShareLink {
            id: "old".into(),
            port,
            secret_hash: hub::domain::auth::token_hash("wsl_expired"),
            expires_at: hub::base::workspace::now_ms() - 1,
        }),
        0,
    )
    .await
    .unwrap();
    let res = client
        .get(format!("{base}/?share=wsl_expired"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);

    // Only the owner manages sharing.
    let member_token = hub.mint_token("member").unwrap();
    let (status, _) = hub
        .api_as(
            &member_token,
            "PUT",
            &sharing,
            Some(json!({"visibility": "public"})),
        )
        .await
        .unwrap();
    assert_eq!(status, 404);
    let (status, _) = hub
        .api(
            "PUT",
            &format!("/workspaces/{id}/ports/0/sharing"),
            Some(json!({"visibility": "public"})),
        )
        .await
        .unwrap();
    assert_eq!(status, 400);
}

#[tokio::test]
async fn wsh_forward_and_openssh_through_wsh_proxy() {
    let hub = TestHub::start().await.unwrap();
    let id = hub.ready_workspace().await.unwrap();
    let port = free_port();
    let _server = hub.run_in_workspace(&id, &test_server(port)).unwrap();
    let ssh = harness::sshd::Ssh::prepare().unwrap();
    let _sshd = hub.run_in_workspace(&id, &ssh.sshd_command()).unwrap();
    let url = hub.url(&format!("/workspaces/{id}/ports"));
    for _ in 0..200 {
        let ports: Value = hub
            .http
            .get(&url)
            .bearer_auth(&hub.token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if ports["ports"].get(port.to_string()).is_some()
            && ports["ports"].get(ssh.port.to_string()).is_some()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // wsh forward: two ports at once, -L style.
    let (local, closed_local, closed_remote) = (free_port(), free_port(), free_port());
    let mut forward = wsh(&hub)
        .args([
            "forward",
            &id,
            &format!("{local}:{port}"),
            &format!("127.0.0.1:{closed_local}:{closed_remote}"),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut body = None;
    for _ in 0..100 {
        if let Ok(res) = reqwest::get(format!("http://127.0.0.1:{local}/")).await {
            body = Some(res.text().await.unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(body.as_deref(), Some("hello from test-server\n"));
    // A forward to a closed port: the local connection is closed, the forward keeps going.
    use tokio::io::AsyncReadExt;
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", closed_local))
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    let res = reqwest::get(format!("http://127.0.0.1:{local}/"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let _ = forward.kill();
    let out = forward.wait_with_output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("port {closed_remote}")),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // OpenSSH with wsh proxy as ProxyCommand: a command, then scp both ways.
    let proxy = format!(
        "ProxyCommand={} proxy {id} {}",
        harness::binary("wsh").unwrap().display(),
        ssh.port
    );
    let ssh_to = |program: &str| {
        let mut cmd = Command::new(program);
        cmd.args(ssh.client_options())
            .args(["-o", &proxy])
            .env("WSH_HUB", hub.url(""))
            .env("WSH_TOKEN", &hub.token);
        cmd
    };
    let out = ssh_to("ssh")
        .args([
            &format!("{}@workspace", harness::sshd::user()),
            "echo",
            "over-ssh-$((40+2))",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "over-ssh-42");
    let dir = tempfile::tempdir().unwrap();
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(dir.path().join("up.bin"), &payload).unwrap();
    let remote = dir.path().join("remote.bin");
    let out = ssh_to("scp")
        .arg(dir.path().join("up.bin"))
        .arg(format!(
            "{}@workspace:{}",
            harness::sshd::user(),
            remote.display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&remote).unwrap(), payload);
}
