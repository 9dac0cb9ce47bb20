//! The `wsh` binary against a real hub.

use harness::TestHub;
use std::process::Command;

fn wsh(hub: &TestHub, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(harness::binary("wsh").unwrap())
        .args(args)
        .env("WSH_HUB", hub.url(""))
        .env("WSH_TOKEN", &hub.token)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn wsh_creates_waits_and_lists() {
    let hub = TestHub::start().await.unwrap();
    let (ok, out, err) = wsh(
        &hub,
        &[
            "create",
            "--wait",
            "--repo",
            "https://example.com/r.git",
            "--json",
        ],
    );
    assert!(ok, "{err}");
    let ws: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(ws["status"], "READY");
    let id = ws["id"].as_str().unwrap();

    let (ok, out, _) = wsh(&hub, &["list"]);
    assert!(ok);
    assert!(out.contains(id) && out.contains("READY"), "{out}");

    let (ok, _, err) = wsh(&hub, &["show", "00000000-0000-4000-8000-000000000000"]);
    assert!(!ok);
    assert!(err.contains("not_found"), "{err}");

    let (ok, _, err) = wsh(&hub, &["create", "--zone", "BAD ZONE"]);
    assert!(!ok);
    assert!(err.contains("invalid_request"), "{err}");
}
