//! `GET /metrics`: who may read it, and figures that move as the hub works (requests,
//! agents, enrollments, relayed streams and bytes, store and provider calls).

use harness::{HubOptions, TestHub};

const METRICS_TOKEN: &str = "metrics-secret-for-tests";

/// The value of one series (`name{labels}`, exactly as rendered), 0 when absent.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

async fn scrape(hub: &TestHub, token: Option<&str>) -> (u16, String, String) {
    let mut req = hub.http.get(hub.url("/metrics"));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    let kind = res
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, kind, res.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_for_admins_and_the_scraper_and_move_as_the_hub_works() {
    let hub = TestHub::start_with(HubOptions {
        config: format!("admins = [\"root\"]\nmetrics_token = \"{METRICS_TOKEN}\"\n"),
        ..Default::default()
    })
    .await
    .unwrap();

    // Who may read it.
    let (status, kind, before) = scrape(&hub, Some(METRICS_TOKEN)).await;
    assert_eq!(status, 200, "{before}");
    assert!(kind.starts_with("application/openmetrics-text"), "{kind}");
    assert!(before.ends_with("# EOF\n"));
    assert_eq!(scrape(&hub, None).await.0, 401);
    assert_eq!(scrape(&hub, Some("not-the-metrics-token")).await.0, 401);
    let (status, _, body) = scrape(&hub, Some(&hub.token)).await;
    assert_eq!(status, 403, "not an admin: {body}");
    assert!(body.contains("admin_only"), "{body}");
    let root = hub.mint_token("root").unwrap();
    assert_eq!(scrape(&hub, Some(&root)).await.0, 200);

    // Work: a workspace whose agent enrolls and connects, a command relayed through the hub.
    let id = hub.ready_workspace().await.unwrap();
    let out = hub
        .wsh()
        .unwrap()
        .args(["--path", "relay", "exec", &id, "--", "echo", "counted"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "counted");
    let (code, _) = hub.api("GET", "/no/such/route", None).await.unwrap();
    assert_eq!(code, 404);
    // The same kinds of stream opened over HTTP count too: exec and files through the API,
    // a browser terminal, a port's preview.
    let (code, out) = hub
        .api(
            "POST",
            &format!("/workspaces/{id}/exec"),
            Some(serde_json::json!({"argv": ["echo", "over-http"]})),
        )
        .await
        .unwrap();
    assert_eq!(code, 200, "{out}");
    let file = hub.url(&format!("/workspaces/{id}/files/counted.txt"));
    let res = hub
        .http
        .put(&file)
        .bearer_auth(&hub.token)
        .body("sixteen bytes..\n")
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    let res = hub
        .http
        .get(&file)
        .bearer_auth(&hub.token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.text().await.unwrap(), "sixteen bytes..\n");
    hub.terminal_echo(&id, "echo typed-$((40+2))\n", "typed-42")
        .await
        .unwrap();
    let port = harness::free_port();
    let _server = hub
        .run_in_workspace(&id, &harness::test_server(&[&port.to_string()]))
        .unwrap();
    let (status, body) = hub.preview_when_listed(&id, port).await.unwrap();
    assert_eq!(status, 200, "{body}");

    let (_, _, after) = scrape(&hub, Some(METRICS_TOKEN)).await;
    let grew = |series: &str| value(&after, series) - value(&before, series);
    assert_eq!(
        grew(r#"wsh_hub_http_requests_total{route="/workspaces",method="POST",status="201"}"#),
        1.0,
        "{after}"
    );
    assert!(
        grew(r#"wsh_hub_http_requests_total{route="unmatched",method="GET",status="404"}"#) >= 1.0
    );
    assert!(
        grew(r#"wsh_hub_http_request_seconds_count{route="/workspaces",method="POST"}"#) >= 1.0
    );
    assert_eq!(value(&after, "wsh_hub_agents_connected"), 1.0, "{after}");
    assert_eq!(grew("wsh_hub_agent_connections_total"), 1.0, "{after}");
    assert_eq!(grew(r#"wsh_hub_enrollments_total{kind="issued"}"#), 1.0);
    assert_eq!(
        grew(r#"wsh_hub_provider_calls_total{op="create",outcome="ok"}"#),
        1.0
    );
    assert!(grew(r#"wsh_hub_store_calls_total{op="get_workspace",outcome="ok"}"#) >= 1.0);
    assert!(grew(r#"wsh_hub_store_call_seconds_count{op="insert_workspace",outcome="ok"}"#) >= 1.0);
    // One by the CLI (relayed through the hub's QUIC side), one over HTTP.
    assert_eq!(
        grew(r#"wsh_hub_streams_total{kind="exec"}"#),
        2.0,
        "{after}"
    );
    assert!(grew(r#"wsh_hub_relayed_bytes_total{kind="exec"}"#) > 0.0);
    assert_eq!(grew(r#"wsh_hub_streams_total{kind="files"}"#), 2.0);
    assert!(grew(r#"wsh_hub_relayed_bytes_total{kind="files"}"#) >= 32.0);
    // The terminal attached by `wsh attach` for the test server, and the browser's.
    assert!(grew(r#"wsh_hub_streams_total{kind="terminal"}"#) >= 2.0);
    assert!(grew(r#"wsh_hub_relayed_bytes_total{kind="terminal"}"#) > 0.0);
    assert!(grew(r#"wsh_hub_streams_total{kind="preview"}"#) >= 1.0);
    assert!(grew(r#"wsh_hub_relayed_bytes_total{kind="preview"}"#) > 0.0);
    // The hub's side of a stream ends just after the client's; the browser terminal's when
    // its socket closes (a preview's connection stays open in the pool). The CLI closes its
    // connection as it exits: the 5 s waited here are well under the hub's idle timeout
    // (three heartbeat timeouts, 15 s), which would otherwise end its exec stream.
    let mut open = 1.0;
    for _ in 0..100 {
        let (_, _, now) = scrape(&hub, Some(METRICS_TOKEN)).await;
        open = ["exec", "files"]
            .iter()
            .map(|kind| value(&now, &format!(r#"wsh_hub_streams_open{{kind="{kind}"}}"#)))
            .sum();
        if open == 0.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(open, 0.0, "a finished stream still counted as open");

    // The agent reports its own figures: in its workspace's `agent.stats`, and added up.
    let mut reported = false;
    for _ in 0..100 {
        let (_, _, now) = scrape(&hub, Some(METRICS_TOKEN)).await;
        if value(&now, r#"wsh_hub_agents{kind="reporting"}"#) == 1.0 {
            assert!(
                value(&now, r#"wsh_hub_agents{kind="rss_bytes"}"#) > 1e6,
                "{now}"
            );
            assert!(value(&now, r#"wsh_hub_agents{kind="rss_bytes_max"}"#) > 1e6);
            reported = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(reported, "no agent figures");
    let (_, ws) = hub
        .api("GET", &format!("/workspaces/{id}"), None)
        .await
        .unwrap();
    let stats = &ws["agent"]["stats"];
    assert!(stats["rss_bytes"].as_u64() > Some(1_000_000), "{ws}");
    assert!(stats["cpu_ms"].as_u64().is_some(), "{ws}");
    assert!(stats["sessions"].as_u64().is_some(), "{ws}");

    // A delete shows too: the agent goes, the provider call is counted.
    let (code, _) = hub
        .api("DELETE", &format!("/workspaces/{id}"), None)
        .await
        .unwrap();
    assert_eq!(code, 202);
    for _ in 0..100 {
        let (_, _, now) = scrape(&hub, Some(METRICS_TOKEN)).await;
        if value(&now, "wsh_hub_agents_connected") == 0.0
            && value(
                &now,
                r#"wsh_hub_provider_calls_total{op="delete",outcome="ok"}"#,
            ) == 1.0
        {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("the delete never showed in the metrics");
}

/// The JSON log line of `message` about `op` in the span of request `id`, once it is written.
async fn logged(hub: &TestHub, id: &str, message: &str, op: &str) -> Option<serde_json::Value> {
    for _ in 0..100 {
        let found = hub.log().lines().find_map(|l| {
            let l: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            (l["span"]["id"] == id && l["fields"]["message"] == message && l["fields"]["op"] == op)
                .then_some(l)
        });
        if found.is_some() {
            return found;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    None
}

/// `--log-format json`: one JSON object a line; an HTTP request's id (the client's, or a
/// new one) comes back in `X-Request-Id` and is on the log lines of its store calls.
#[tokio::test(flavor = "multi_thread")]
async fn json_logs_carry_the_request_id_into_store_calls() {
    let hub = TestHub::start_with(HubOptions {
        provider: "manual".into(),
        env: vec![
            ("WSH_LOG_FORMAT".into(), "json".into()),
            (
                "RUST_LOG".into(),
                "info,quinn=warn,hub::store::metered=debug,hub::provider::metered=debug".into(),
            ),
        ],
        ..Default::default()
    })
    .await
    .unwrap();
    let res = hub
        .http
        .get(hub.url("/workspaces"))
        .bearer_auth(&hub.token)
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-request-id"], "trace-me-42");
    // A bad one is replaced, not echoed.
    let res = hub
        .http
        .get(hub.url("/workspaces"))
        .bearer_auth(&hub.token)
        .header("x-request-id", "no spaces allowed")
        .send()
        .await
        .unwrap();
    let fresh = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(
        fresh.len() == 16 && fresh.bytes().all(|b| b.is_ascii_hexdigit()),
        "{fresh}"
    );

    // A delete answers at once and calls the provider afterwards: that call still logs
    // with the request's id.
    let ws = hub.create_workspace().await.unwrap();
    let res = hub
        .http
        .delete(hub.url(&format!("/workspaces/{}", ws["id"].as_str().unwrap())))
        .bearer_auth(&hub.token)
        .header("x-request-id", "trace-delete-7")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 202);

    let line = logged(&hub, "trace-me-42", "store call", "list_workspaces")
        .await
        .expect("the request's store call logged with its id");
    assert_eq!(line["fields"]["ok"], true, "{line}");
    let line = logged(&hub, "trace-delete-7", "provider call", "delete")
        .await
        .expect("the provider call after the answer logged with the request's id");
    assert_eq!(line["fields"]["ok"], true, "{line}");
    assert!(!hub.log().contains(&hub.token), "a token in the log");
}
