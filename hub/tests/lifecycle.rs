//! The workspace lifecycle through a real hub with the process provider: stop, start and
//! delete with their SSE events, idempotent create, quotas, idle clean-up, and the
//! reconciler repairing a crash mid-create, an orphan and a vanished instance.

use futures_util::StreamExt;
use harness::sse::Events;
use harness::{HubOptions, TestHub};
use hub::base::workspace::Status;
use hub::store::Store;
use serde_json::{Value, json};
use std::time::Duration;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(30);
const CLEANUP_TOKEN: &str = "cleanup-secret-for-tests";

fn status_of(v: &Value) -> &str {
    v["status"].as_str().unwrap_or_default()
}

async fn wait_gone(hub: &TestHub, id: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while hub
        .api("GET", &format!("/workspaces/{id}"), None)
        .await
        .unwrap()
        .0
        != 404
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id} was not deleted"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn status(hub: &TestHub, id: &str) -> Value {
    let (code, body) = hub
        .api("GET", &format!("/workspaces/{id}/status"), None)
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    body
}

/// `GET /events`: everything that happens to the caller's workspaces, nothing of anyone
/// else's; an admin's stream carries everyone's.
#[tokio::test]
async fn owner_events_carry_the_owners_workspaces_and_no_one_elses() {
    let hub = TestHub::start_with(HubOptions {
        provider: "manual".into(),
        config: "admins = [\"root\"]\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mallory = hub.mint_token("mallory").unwrap();
    let root = hub.mint_token("root").unwrap();
    let mut mine = Events::open_owner(&hub, &hub.token).await;
    let mut hers = Events::open_owner(&hub, &mallory).await;
    let mut all = Events::open_owner(&hub, &root).await;

    let ws = hub.create_workspace().await.unwrap();
    let id = ws["id"].as_str().unwrap().to_owned();
    let (code, body) = hub
        .api("DELETE", &format!("/workspaces/{id}"), None)
        .await
        .unwrap();
    assert_eq!(code, 202, "{body}");
    for events in [&mut mine, &mut all] {
        let mut seen = Vec::new();
        loop {
            let (kind, data) = events.next().await;
            assert_eq!(data["workspace_id"], id.as_str(), "{kind} {data}");
            seen.push(match kind.as_str() {
                "status" => status_of(&data).to_owned(),
                other => other.to_owned(),
            });
            if kind == "deleted" {
                break;
            }
        }
        assert_eq!(seen, ["PROVISIONING", "DELETING", "deleted"]);
    }

    // Mallory's stream stayed silent about it: the first thing she hears of is her own.
    let (code, theirs) = hub
        .api_as(&mallory, "POST", "/workspaces", Some(json!({})))
        .await
        .unwrap();
    assert_eq!(code, 201, "{theirs}");
    let (kind, data) = hers.next().await;
    assert_eq!(
        (kind.as_str(), status_of(&data)),
        ("status", "PROVISIONING")
    );
    assert_eq!(data["workspace_id"], theirs["id"], "{data}");
    let (_, data) = all.next().await;
    assert_eq!(
        data["workspace_id"], theirs["id"],
        "the admin sees hers too"
    );

    // No credentials, no stream.
    let res = hub.http.get(hub.url("/events")).send().await.unwrap();
    assert_eq!(res.status(), 401);
}

#[tokio::test]
async fn stop_start_and_delete_with_events() {
    let hub = TestHub::start().await.unwrap();
    let id = hub.ready_workspace().await.unwrap();
    let mut events = Events::open(&hub, &id).await;
    assert_eq!(events.statuses_until("READY").await, ["READY"]);
    assert_eq!(status(&hub, &id).await["observed"], "RUNNING");

    let (code, body) = hub
        .api("POST", &format!("/workspaces/{id}/stop"), None)
        .await
        .unwrap();
    assert_eq!((code, status_of(&body)), (202, "STOPPING"), "{body}");
    assert_eq!(
        events.statuses_until("SUSPENDED").await,
        ["STOPPING", "SUSPENDED"]
    );
    let st = status(&hub, &id).await;
    assert_eq!(
        (status_of(&st), st["observed"].as_str()),
        ("SUSPENDED", Some("SUSPENDED"))
    );
    assert!(
        st["agent"].is_null(),
        "a stopped workspace has no agent: {st}"
    );

    // Stopping twice is refused with the current state.
    let (code, body) = hub
        .api("POST", &format!("/workspaces/{id}/stop"), None)
        .await
        .unwrap();
    assert_eq!(code, 409);
    assert_eq!(body["error"]["code"], "conflict");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("SUSPENDED")
    );

    let (code, body) = hub
        .api("POST", &format!("/workspaces/{id}/start"), None)
        .await
        .unwrap();
    assert_eq!((code, status_of(&body)), (202, "STARTING"), "{body}");
    assert_eq!(events.statuses_until("READY").await, ["STARTING", "READY"]);
    hub.wait_for(&id, WAIT, |w| !w["agent"].is_null())
        .await
        .unwrap();

    let dir = hub.workspace_dir(&id);
    assert!(dir.exists());
    let (code, body) = hub
        .api("DELETE", &format!("/workspaces/{id}"), None)
        .await
        .unwrap();
    assert_eq!((code, status_of(&body)), (202, "DELETING"), "{body}");
    assert_eq!(
        events.statuses_until("deleted").await,
        ["DELETING", "deleted"]
    );
    let (code, _) = hub
        .api("GET", &format!("/workspaces/{id}"), None)
        .await
        .unwrap();
    assert_eq!(code, 404);
    assert!(!dir.exists(), "the instance is gone with the record");

    // Unknown ids and other owners' workspaces read as not found for every verb.
    let other = hub.ready_workspace().await.unwrap();
    let mallory = hub.mint_token("mallory").unwrap();
    for (method, path) in [
        ("POST", format!("/workspaces/{other}/stop")),
        ("POST", format!("/workspaces/{other}/start")),
        ("DELETE", format!("/workspaces/{other}")),
        ("GET", format!("/workspaces/{other}/status")),
        ("GET", format!("/workspaces/{other}/events")),
        ("POST", format!("/workspaces/{}/stop", Uuid::new_v4())),
        ("POST", "/workspaces/not-a-uuid/start".to_owned()),
    ] {
        let (code, body) = hub.api_as(&mallory, method, &path, None).await.unwrap();
        assert_eq!(
            (code, body["error"]["code"].as_str()),
            (404, Some("not_found")),
            "{method} {path}"
        );
    }
}

#[tokio::test]
async fn a_retried_create_with_the_same_key_makes_one_workspace() {
    let hub = TestHub::start_manual().await.unwrap();
    let post = |key: &'static str| {
        let req = hub
            .http
            .post(hub.url("/workspaces"))
            .bearer_auth(&hub.token)
            .header("Idempotency-Key", key)
            .json(&json!({}));
        async move {
            let res = req.send().await.unwrap();
            (res.status().as_u16(), res.json::<Value>().await.unwrap())
        }
    };
    let (code, first) = post("retry-1").await;
    assert_eq!(code, 201);
    let (code, again) = post("retry-1").await;
    assert_eq!(code, 200);
    assert_eq!(first["id"], again["id"]);
    // Concurrent retries of another key: one workspace.
    let racers = futures_util::future::join_all((0..8).map(|_| post("retry-2"))).await;
    let ids: std::collections::HashSet<String> = racers
        .iter()
        .map(|(code, body)| {
            assert!(*code == 200 || *code == 201, "{code} {body}");
            body["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 1);
    let (_, list) = hub.api("GET", "/workspaces", None).await.unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    // The same key from another owner is another workspace.
    let other = hub.mint_token("other").unwrap();
    let res = hub
        .http
        .post(hub.url("/workspaces"))
        .bearer_auth(&other)
        .header("Idempotency-Key", "retry-1")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let theirs: Value = res.json().await.unwrap();
    assert_ne!(theirs["id"], first["id"]);
    // A key with control characters or too long is refused.
    let res = hub
        .http
        .post(hub.url("/workspaces"))
        .bearer_auth(&hub.token)
        .header("Idempotency-Key", "x".repeat(300))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
}

#[tokio::test]
async fn fifty_concurrent_creates_against_a_quota_of_ten_make_ten_workspaces() {
    let hub = std::sync::Arc::new(
        TestHub::start_with(HubOptions {
            provider: "manual".into(),
            config: "[quotas]\nmax_workspaces = 10\nmax_running = 10\n".into(),
            ..Default::default()
        })
        .await
        .unwrap(),
    );
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let hub = hub.clone();
        tasks.spawn(async move {
            hub.api("POST", "/workspaces", Some(json!({})))
                .await
                .unwrap()
        });
    }
    let mut codes = std::collections::BTreeMap::new();
    while let Some(done) = tasks.join_next().await {
        let (code, body) = done.unwrap();
        if code != 201 {
            assert_eq!(
                (code, body["error"]["code"].as_str()),
                (403, Some("quota_exceeded")),
                "{body}"
            );
        }
        *codes.entry(code).or_insert(0) += 1;
    }
    assert_eq!(codes, [(201, 10), (403, 40)].into_iter().collect());
    let (_, list) = hub.api("GET", "/workspaces", None).await.unwrap();
    assert_eq!(list.as_array().unwrap().len(), 10);
}

#[tokio::test]
async fn quotas_are_checked_at_create_and_start() {
    let hub = TestHub::start_with(HubOptions {
        provider: "manual".into(),
        config: "[quotas]\nmax_workspaces = 2\nmax_running = 1\nmachine_types = [\"local\", \"e2-small\"]\n"
            .into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let (code, body) = hub
        .api(
            "POST",
            "/workspaces",
            Some(json!({"machine_type": "n2-highmem-96"})),
        )
        .await
        .unwrap();
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (403, Some("machine_type_not_allowed"))
    );
    let first = hub.create_workspace().await.unwrap();
    let (code, body) = hub
        .api("POST", "/workspaces", Some(json!({})))
        .await
        .unwrap();
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (403, Some("quota_exceeded")),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("running")
    );
    assert_eq!(
        hub.api("GET", "/workspaces", None)
            .await
            .unwrap()
            .1
            .as_array()
            .unwrap()
            .len(),
        1,
        "a refused create leaves no record"
    );
    // The manual provider's agent never connects; it still counts as running.
    let id = first["id"].as_str().unwrap();
    let (code, _) = hub
        .api("DELETE", &format!("/workspaces/{id}"), None)
        .await
        .unwrap();
    assert_eq!(code, 202);
    wait_gone(&hub, id).await;
    let (code, _) = hub
        .api("POST", "/workspaces", Some(json!({})))
        .await
        .unwrap();
    assert_eq!(code, 201);
}

#[tokio::test]
async fn idle_clean_up_stops_idle_workspaces_only() {
    let hub = TestHub::start_with(HubOptions {
        config: format!(
            "cleanup_token = \"{CLEANUP_TOKEN}\"\nreconcile_interval = \"1h\"\n[idle]\nstop_after = \"0s\"\n"
        ),
        ..Default::default()
    })
    .await
    .unwrap();
    let idle = hub.ready_workspace().await.unwrap();
    let watched = hub.ready_workspace().await.unwrap();
    let leased = hub.ready_workspace().await.unwrap();

    // A browser terminal stays attached to one workspace.
    let url = hub.terminal_url(&watched, "").await.unwrap();
    let (mut terminal, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let reader = tokio::spawn(async move { while terminal.next().await.is_some() {} });
    // The agent reports the attached client; the status says so.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let st = status(&hub, &watched).await;
        if st["activity"]["active"] == true && st["agent"]["attached_clients"] == 1 {
            assert!(
                st["activity"]["reason"]
                    .as_str()
                    .unwrap()
                    .contains("1 terminal client"),
                "{st}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no activity report: {st}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Another takes a keep-awake lease.
    let (code, body) = hub
        .api(
            "POST",
            &format!("/workspaces/{leased}/keep-awake"),
            Some(json!({"seconds": 600})),
        )
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body["keep_awake_until"].is_string(), "{body}");
    assert_eq!(
        status(&hub, &leased).await["keep_awake_until"],
        body["keep_awake_until"]
    );
    let (code, _) = hub
        .api(
            "POST",
            &format!("/workspaces/{leased}/keep-awake"),
            Some(json!({"seconds": 10_000_000})),
        )
        .await
        .unwrap();
    assert_eq!(code, 400, "leases are bounded");

    let st = status(&hub, &idle).await;
    assert_eq!(st["activity"]["active"], false, "{st}");
    assert!(st["activity"]["stop_at"].is_string());

    // Clean-up needs the scheduler's secret: none at all is 401 too.
    let res = hub.http.post(hub.url("/cleanup")).send().await.unwrap();
    assert_eq!(res.status(), 401);
    let (code, body) = hub.api("POST", "/cleanup", None).await.unwrap();
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let (code, report) = hub
        .api_as(CLEANUP_TOKEN, "POST", "/cleanup", None)
        .await
        .unwrap();
    assert_eq!(code, 200, "{report}");
    assert_eq!(report["idle"]["stopped"], json!([idle]), "{report}");
    hub.wait_for(&idle, WAIT, |w| w["status"] == "SUSPENDED")
        .await
        .unwrap();
    for id in [&watched, &leased] {
        let (_, w) = hub
            .api("GET", &format!("/workspaces/{id}"), None)
            .await
            .unwrap();
        assert_eq!(status_of(&w), "READY", "{id} was in use");
    }
    reader.abort();
}

#[tokio::test]
async fn the_reconciler_resumes_a_create_cut_short_and_removes_orphans() {
    let mut hub = TestHub::start_with(HubOptions {
        config: format!("reconcile_grace = \"0s\"\nreconcile_interval = \"1h\"\ncleanup_token = \"{CLEANUP_TOKEN}\"\n"),
        env: vec![("WORKSPACE_HUB_CRASH_AT".into(), "after-record".into())],
        ..Default::default()
    })
    .await
    .unwrap();
    // The hub dies between writing the record and starting the instance.
    let res = hub
        .http
        .post(hub.url("/workspaces"))
        .bearer_auth(&hub.token)
        .json(&json!({}))
        .send()
        .await;
    assert!(res.is_err(), "the hub crashed mid-create");
    hub.options.env.clear();
    hub.start_again().await.unwrap();
    let (_, list) = hub.api("GET", "/workspaces", None).await.unwrap();
    let id = list[0]["id"].as_str().unwrap().to_owned();
    // Resumed at start-up: the agent enrolls and the workspace turns READY.
    let ws = hub
        .wait_for(&id, WAIT, |w| {
            w["status"] == "READY" && !w["agent"].is_null()
        })
        .await
        .unwrap();
    assert_eq!(status_of(&ws), "READY");

    // An orphan: an instance whose record is gone (written behind the hub's back).
    let orphan = hub.ready_workspace().await.unwrap();
    let orphan_dir = hub.workspace_dir(&orphan);
    let pid: i32 = std::fs::read_to_string(orphan_dir.join("agent.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    hub.kill();
    {
        let store =
            hub::store::sqlite::SqliteStore::open(&hub.state_dir.join("hub.sqlite3")).unwrap();
        let oid = Uuid::parse_str(&orphan).unwrap();
        store
            .transition(oid, &[Status::Ready], Status::Deleting, None)
            .await
            .unwrap();
        store.delete_workspace(oid).await.unwrap();
    }
    // A vanished instance: the record stays, the machine is gone.
    let vanished = id.clone();
    let vpid: i32 = std::fs::read_to_string(hub.workspace_dir(&vanished).join("agent.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _ = rustix::process::kill_process_group(
        rustix::process::Pid::from_raw(vpid).unwrap(),
        rustix::process::Signal::KILL,
    );
    std::fs::remove_dir_all(hub.workspace_dir(&vanished)).unwrap();

    hub.start_again().await.unwrap();
    let ws = hub
        .wait_for(&vanished, WAIT, |w| w["status"] == "ERROR")
        .await
        .unwrap();
    assert!(
        ws["status_reason"].as_str().unwrap().contains("vanished"),
        "{ws}"
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    while orphan_dir.exists() {
        assert!(tokio::time::Instant::now() < deadline, "orphan not removed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Its agent process is gone too (a zombie is reaped by nobody here, so look at its state).
    let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false);
    assert!(!alive, "the orphan's agent still runs");
    // A clean-up pass reports nothing left to repair.
    let (code, report) = hub
        .api_as(CLEANUP_TOKEN, "POST", "/cleanup", None)
        .await
        .unwrap();
    assert_eq!(code, 200);
    assert_eq!(report["reconciled"]["orphans_seen"], json!([]), "{report}");
}

#[tokio::test]
async fn the_whole_lifecycle_runs_on_firestore() {
    let emulator = harness::firestore::FirestoreEmulator::start().expect("Firestore emulator");
    let hub = TestHub::start_with(HubOptions {
        config: format!(
            "[store]\nkind = \"firestore\"\nproject = \"hub-{}\"\nemulator_host = \"{}\"\n",
            Uuid::new_v4().simple(),
            emulator.host
        ),
        ..Default::default()
    })
    .await
    .unwrap();
    let id = hub.ready_workspace().await.unwrap();
    let mut events = Events::open(&hub, &id).await;
    assert_eq!(events.statuses_until("READY").await, ["READY"]);
    let (code, _) = hub
        .api("POST", &format!("/workspaces/{id}/stop"), None)
        .await
        .unwrap();
    assert_eq!(code, 202);
    assert_eq!(
        events.statuses_until("SUSPENDED").await,
        ["STOPPING", "SUSPENDED"]
    );
    let (code, _) = hub
        .api("POST", &format!("/workspaces/{id}/start"), None)
        .await
        .unwrap();
    assert_eq!(code, 202);
    assert_eq!(events.statuses_until("READY").await, ["STARTING", "READY"]);
    let (code, _) = hub
        .api("DELETE", &format!("/workspaces/{id}"), None)
        .await
        .unwrap();
    assert_eq!(code, 202);
    assert_eq!(
        events.statuses_until("deleted").await,
        ["DELETING", "deleted"]
    );
    wait_gone(&hub, &id).await;
}

/// A local repository with a `main` and a `feature` branch.
fn git_repo(dir: &std::path::Path) -> String {
    let repo = dir.join("widgets.git");
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
            .args(args)
            .current_dir(&repo)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::create_dir_all(&repo).unwrap();
    git(&["init", "-q", "-b", "main"]);
    std::fs::write(repo.join("README"), "main\n").unwrap();
    git(&["add", "README"]);
    git(&["commit", "-q", "-m", "main"]);
    git(&["checkout", "-q", "-b", "feature"]);
    std::fs::write(repo.join("FEATURE"), "feature branch\n").unwrap();
    git(&["add", "FEATURE"]);
    git(&["commit", "-q", "-m", "feature"]);
    git(&["checkout", "-q", "main"]);
    format!("file://{}", repo.display())
}

async fn wait_checkout(hub: &TestHub, id: &str, state: &str) -> Value {
    hub.wait_for(id, WAIT, |w| w["agent"]["checkout"]["state"] == state)
        .await
        .unwrap()["agent"]["checkout"]
        .clone()
}

#[tokio::test]
async fn the_repository_is_checked_out_on_first_boot() {
    let hub = TestHub::start().await.unwrap();
    let src = tempfile::tempdir().unwrap();
    let url = git_repo(src.path());
    let secret = "ghp_do-not-store-this-token-4711";
    let (code, ws) = hub
        .api(
            "POST",
            "/workspaces",
            Some(json!({"metadata": {"repo": url, "branch": "feature"}, "git_token": secret})),
        )
        .await
        .unwrap();
    assert_eq!(code, 201, "{ws}");
    let id = ws["id"].as_str().unwrap().to_owned();
    let mut events = Events::open(&hub, &id).await;
    let done = wait_checkout(&hub, &id, "done").await;
    let path = std::path::PathBuf::from(done["path"].as_str().unwrap());
    assert_eq!(path, hub.workspace_dir(&id).join("widgets"));
    assert_eq!(
        std::fs::read_to_string(path.join("FEATURE")).unwrap(),
        "feature branch\n"
    );
    // The checkout showed up on the event stream.
    loop {
        let (name, data) = events.next().await;
        if name == "checkout" && data["detail"]["state"] == "done" {
            break;
        }
    }
    // The token is in no file of the hub's state and in none of its logs.
    for entry in walk(&hub.state_dir) {
        if entry.starts_with(hub.state_dir.join("workspaces")) {
            continue; // the workspace's own folder stands in for the VM
        }
        let bytes = std::fs::read(&entry).unwrap_or_default();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "token found in {}",
            entry.display()
        );
    }

    // A bad URL ends in a readable error, and the workspace stays usable.
    let (code, ws) = hub
        .api(
            "POST",
            "/workspaces",
            Some(json!({"metadata": {"repo": "file:///nonexistent/nothing.git"}})),
        )
        .await
        .unwrap();
    assert_eq!(code, 201);
    let id = ws["id"].as_str().unwrap();
    let failed = wait_checkout(&hub, id, "failed").await;
    let message = failed["message"].as_str().unwrap();
    assert!(
        message.starts_with("fatal:") && message.contains("nonexistent"),
        "{message}"
    );

    // Bad repository values are refused up front.
    for metadata in [
        json!({"repo": "-uhttps://evil"}),
        json!({"repo": "ftp://example.com/r.git"}),
        json!({"repo": "https://example.com/r.git", "branch": "../../etc"}),
        json!({"branch": "main"}),
    ] {
        let (code, body) = hub
            .api("POST", "/workspaces", Some(json!({"metadata": metadata})))
            .await
            .unwrap();
        assert_eq!(
            (code, body["error"]["code"].as_str()),
            (400, Some("invalid_request")),
            "{metadata}"
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[tokio::test]
async fn an_agent_that_never_connects_ends_in_error_with_a_reason() {
    // The agent is told a hub address where nothing answers (a broken user-data).
    let hub = TestHub::start_with(HubOptions {
        config: "agent_hub_addr = \"127.0.0.1:9\"\nprovision_timeout = \"1s\"\nreconcile_interval = \"200ms\"\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let ws = hub.create_workspace().await.unwrap();
    let id = ws["id"].as_str().unwrap();
    let ws = hub
        .wait_for(id, Duration::from_secs(20), |w| w["status"] == "ERROR")
        .await
        .unwrap();
    let reason = ws["status_reason"].as_str().unwrap();
    assert!(reason.contains("did not connect within 1s"), "{reason}");
    assert!(
        !reason.contains("wse_"),
        "an enrollment token in the reason: {reason}"
    );
}
