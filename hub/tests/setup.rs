//! A workspace's setup through real hubs and agents (process provider): the owner's SSH
//! keys in `authorized_keys`, dotfiles cloned and installed, and the repository's dev
//! container (lifecycle commands, environment, port labels, settings not applied).

use harness::TestHub;
use harness::sse::Events;
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);
const ED25519: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl me@laptop";

fn git(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A repository with `files` committed, as a `file://` URL.
fn repo(dir: &Path, name: &str, files: &[(&str, &str)]) -> String {
    let repo = dir.join(name);
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    for (path, text) in files {
        let path = repo.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
    }
    git(&repo, &["add", "-A"]);
    git(&repo, &["commit", "-q", "-m", "init"]);
    format!("file://{}", repo.display())
}

/// A real key from `ssh-keygen`.
fn keygen(dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    let out = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::read_to_string(path.with_extension("pub"))
        .unwrap()
        .trim()
        .to_owned()
}

/// Kills the workspace's agent process (and what it started) and starts it again as the
/// process provider does; the new one is killed with the hub's workspaces at the end.
fn restart_agent(dir: &Path) {
    let pid = std::fs::read_to_string(dir.join("agent.pid")).unwrap();
    let killed = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", pid.trim())])
        .status()
        .unwrap();
    assert!(killed.success());
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("agent.log"))
        .unwrap();
    use std::os::unix::process::CommandExt;
    let child = std::process::Command::new(harness::binary("workspace-agent").unwrap())
        .arg("--config")
        .arg(dir.join("agent.toml"))
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .process_group(0)
        .spawn()
        .unwrap();
    std::fs::write(dir.join("agent.pid"), child.id().to_string()).unwrap();
    // Reaped when the hub's workspaces are killed at the end.
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
}

fn step<'a>(ws: &'a Value, name: &str) -> Option<&'a Value> {
    ws["agent"]["setup"]["steps"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == name)
}

async fn wait_step(hub: &TestHub, id: &str, name: &str, state: &str) -> Value {
    let ws = hub
        .wait_for(id, WAIT, |w| {
            step(w, name).is_some_and(|s| s["state"] == state)
        })
        .await
        .unwrap_or_else(|e| panic!("{name} never {state}: {e}\n{}", hub.agent_log(id)));
    step(&ws, name).unwrap().clone()
}

async fn wait_file(path: &Path, want: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if want(&text) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}: {text:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn keys_are_checked_and_reach_every_workspace_of_their_owner() {
    let hub = TestHub::start().await.unwrap();
    let keys = tempfile::tempdir().unwrap();
    let id = hub.ready_workspace().await.unwrap();
    let authorized = hub.workspace_dir(&id).join(".ssh/authorized_keys");
    // The user's own line stays through every change.
    std::fs::create_dir_all(authorized.parent().unwrap()).unwrap();
    std::fs::write(&authorized, "ssh-ed25519 AAAAmine own@key\n").unwrap();

    let first = keygen(keys.path(), "first");
    let (code, added) = hub
        .api("POST", "/ssh-keys", Some(json!({ "key": first })))
        .await
        .unwrap();
    assert_eq!(code, 201, "{added}");
    let fingerprint = added["id"].as_str().unwrap().to_owned();
    // The fingerprint is the one ssh-keygen prints.
    let listed = std::process::Command::new("ssh-keygen")
        .args(["-l", "-f"])
        .arg(keys.path().join("first.pub"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&fingerprint));
    let text = wait_file(&authorized, |t| t.contains(&first)).await;
    assert!(text.starts_with("ssh-ed25519 AAAAmine own@key\n"), "{text}");

    // Through the CLI too, from a .pub file.
    let second = keygen(keys.path(), "second");
    let out = hub
        .wsh()
        .unwrap()
        .args(["ssh-keys", "add"])
        .arg(keys.path().join("second.pub"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_file(&authorized, |t| t.contains(&first) && t.contains(&second)).await;
    let out = hub
        .wsh()
        .unwrap()
        .args(["ssh-keys", "list"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains(&fingerprint) && table.contains("second"),
        "{table}"
    );

    // Bad keys and the same key twice are refused; nothing changes.
    for (bad, code) in [
        (json!({"key": "ssh-ed25519 !!!"}), "bad_key"),
        (json!({"key": format!("command=\"sh\" {first}")}), "bad_key"),
        (json!({"key": format!("{first}\n{ED25519}")}), "bad_key"),
        (json!({"key": first}), "key_exists"),
    ] {
        let (status, body) = hub.api("POST", "/ssh-keys", Some(bad)).await.unwrap();
        assert_eq!(body["error"]["code"], code, "{status} {body}");
    }
    let (_, body) = hub
        .api("POST", "/ssh-keys", Some(json!({"key": first, "extra": 1})))
        .await
        .unwrap();
    assert_eq!(body["error"]["code"], "invalid_request");

    // A workspace created later gets the keys when its agent first connects.
    let later = hub.ready_workspace().await.unwrap();
    let later_keys = hub.workspace_dir(&later).join(".ssh/authorized_keys");
    wait_file(&later_keys, |t| t.contains(&first) && t.contains(&second)).await;

    // Removing one (fingerprint percent-encoded) takes it out everywhere.
    let encoded: String = fingerprint
        .bytes()
        .map(|b| match b {
            b'/' => "%2F".to_owned(),
            b'+' => "%2B".to_owned(),
            b => (b as char).to_string(),
        })
        .collect();
    let (code, _) = hub
        .api("DELETE", &format!("/ssh-keys/{encoded}"), None)
        .await
        .unwrap();
    assert_eq!(code, 204);
    for path in [&authorized, &later_keys] {
        wait_file(path, |t| !t.contains(&first) && t.contains(&second)).await;
    }
    let (code, _) = hub
        .api("DELETE", &format!("/ssh-keys/{encoded}"), None)
        .await
        .unwrap();
    assert_eq!(code, 404);

    // Another user sees none of them, and their keys go to none of these workspaces.
    let other = hub.mint_token("mallory").unwrap();
    let (code, list) = hub.api_as(&other, "GET", "/ssh-keys", None).await.unwrap();
    assert_eq!((code, list), (200, json!([])));
    let theirs = keygen(keys.path(), "theirs");
    let (code, _) = hub
        .api_as(&other, "POST", "/ssh-keys", Some(json!({"key": theirs})))
        .await
        .unwrap();
    assert_eq!(code, 201);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = std::fs::read_to_string(&authorized).unwrap();
    assert!(!text.contains(&theirs), "{text}");

    // Removing the last key leaves the user's own line alone.
    let out = hub
        .wsh()
        .unwrap()
        .args(["ssh-keys", "remove", "SHA256:nothing/like+this"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let (_, list) = hub.api("GET", "/ssh-keys", None).await.unwrap();
    let last = list[0]["id"].as_str().unwrap();
    let out = hub
        .wsh()
        .unwrap()
        .args(["ssh-keys", "remove", last])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_file(&authorized, |t| t == "ssh-ed25519 AAAAmine own@key\n").await;
}

#[tokio::test]
async fn dotfiles_and_the_dev_container_set_the_workspace_up() {
    let hub = TestHub::start().await.unwrap();
    let src = tempfile::tempdir().unwrap();
    let port = harness::free_port();
    let dotfiles = repo(
        src.path(),
        "dotfiles",
        &[
            (
                "install.sh",
                "echo \"installed from $PWD\" > ../dotfiles-ran\n",
            ),
            (".vimrc", "set nocompatible\n"),
        ],
    );
    let devcontainer = format!(
        r#"{{
        // JSON with comments, as VS Code writes it.
        "name": "widgets",
        "image": "mcr.microsoft.com/devcontainers/base:bookworm",
        "features": {{ "ghcr.io/devcontainers/features/node:1": {{}} }},
        "containerEnv": {{ "GREETING": "hello" }},
        "remoteEnv": {{ "APP_DIR": "${{containerWorkspaceFolder}}/app", }},
        "onCreateCommand": "echo on-create >> ../lifecycle.log",
        "updateContentCommand": ["sh", "-c", "echo update-content $GREETING >> ../lifecycle.log"],
        "postCreateCommand": "echo post-create $APP_DIR >> ../lifecycle.log",
        "postStartCommand": {{
            "log": "echo post-start >> ../lifecycle.log",
            "server": "exec python3 -m http.server {port} --bind 127.0.0.1",
        }},
        "postAttachCommand": "echo attached >> ../attach.log",
        "forwardPorts": [{port}],
        "portsAttributes": {{ "{port}": {{ "label": "Docs server" }} }},
    }}"#
    );
    let url = repo(
        src.path(),
        "widgets.git",
        &[(".devcontainer/devcontainer.json", &devcontainer)],
    );
    let (code, _) = hub
        .api(
            "PUT",
            "/dotfiles",
            Some(json!({"repo": dotfiles, "install_command": null})),
        )
        .await
        .unwrap();
    assert_eq!(code, 200);
    // Bad dotfiles settings are refused.
    for bad in [
        json!({"repo": "-uhttps://evil"}),
        json!({"repo": "https://example.com/d.git", "install_command": ""}),
        json!({"repo": "https://example.com/d.git", "script": "x"}),
    ] {
        let (code, body) = hub.api("PUT", "/dotfiles", Some(bad)).await.unwrap();
        assert_eq!(code, 400, "{body}");
    }
    let (_, set) = hub.api("GET", "/dotfiles", None).await.unwrap();
    assert_eq!(set["repo"], dotfiles.as_str());

    let (code, ws) = hub
        .api(
            "POST",
            "/workspaces",
            Some(json!({"metadata": {"repo": url}})),
        )
        .await
        .unwrap();
    assert_eq!(code, 201, "{ws}");
    let id = ws["id"].as_str().unwrap().to_owned();
    let mut events = Events::open(&hub, &id).await;
    let dir = hub.workspace_dir(&id);

    // Dotfiles: cloned into ~/.dotfiles, their install script run there.
    wait_step(&hub, &id, "dotfiles", "done").await;
    let ran = std::fs::read_to_string(dir.join("dotfiles-ran")).unwrap();
    assert_eq!(
        ran.trim(),
        format!("installed from {}", dir.join(".dotfiles").display())
    );

    // The dev container: the once-only commands in order, then postStartCommand.
    for name in [
        "onCreateCommand",
        "updateContentCommand",
        "postCreateCommand",
    ] {
        wait_step(&hub, &id, name, "done").await;
    }
    let log = wait_file(&dir.join("lifecycle.log"), |t| t.contains("post-start")).await;
    let app = dir.join("widgets/app");
    assert_eq!(
        log.lines().collect::<Vec<_>>(),
        [
            "on-create".to_owned(),
            "update-content hello".to_owned(),
            format!("post-create {}", app.display()),
            "post-start".to_owned(),
        ]
    );
    // The server postStartCommand started shows with its label.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, ports) = hub
            .api("GET", &format!("/workspaces/{id}/ports"), None)
            .await
            .unwrap();
        if ports["ports"][port.to_string()]["label"] == "Docs server" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "port {port} never labelled: {ports}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, ws) = hub
        .api("GET", &format!("/workspaces/{id}"), None)
        .await
        .unwrap();
    assert_eq!(step(&ws, "postStartCommand").unwrap()["state"], "running");
    let not_applied: Vec<&str> = ws["agent"]["setup"]["not_applied"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["field"].as_str().unwrap())
        .collect();
    assert_eq!(not_applied, ["features", "image"], "{ws}");

    // The environment reaches exec and terminals; a new terminal runs postAttachCommand.
    let out = hub
        .wsh()
        .unwrap()
        .args([
            "exec",
            &id,
            "-n",
            "--",
            "sh",
            "-c",
            "echo $GREETING $APP_DIR",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("hello {}", app.display())
    );
    let out = hub
        .wsh()
        .unwrap()
        .args(["attach", &id, "--", "sh", "-c", "echo term-$GREETING"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("term-hello"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    wait_file(&dir.join("attach.log"), |t| t == "attached\n").await;
    wait_step(&hub, &id, "postAttachCommand", "done").await;

    // Progress reached the event stream.
    let mut seen = Vec::new();
    while !seen.contains(&"postCreateCommand:done".to_owned()) {
        let (name, data) = events.next().await;
        if name == "setup" {
            for s in data["detail"]["steps"].as_array().unwrap() {
                let entry = format!(
                    "{}:{}",
                    s["name"].as_str().unwrap(),
                    s["state"].as_str().unwrap()
                );
                if !seen.contains(&entry) {
                    seen.push(entry);
                }
            }
        }
    }
    assert!(
        seen.contains(&"onCreateCommand:running".to_owned()),
        "{seen:?}"
    );

    // After the agent starts again (as at a VM's next boot) the once-only commands are
    // skipped, postStartCommand runs again, and the dotfiles are not installed twice.
    std::fs::remove_file(dir.join("dotfiles-ran")).unwrap();
    restart_agent(&dir);
    assert_eq!(
        wait_step(&hub, &id, "onCreateCommand", "skipped").await["message"],
        "ran on an earlier start"
    );
    wait_step(&hub, &id, "dotfiles", "skipped").await;
    wait_file(&dir.join("lifecycle.log"), |t| {
        t.matches("post-start").count() == 2
    })
    .await;
    assert!(!dir.join("dotfiles-ran").exists());
}

#[tokio::test]
async fn a_failing_lifecycle_command_shows_its_output_and_stops_the_later_ones() {
    let hub = TestHub::start().await.unwrap();
    let src = tempfile::tempdir().unwrap();
    let url = repo(
        src.path(),
        "broken.git",
        &[(
            ".devcontainer.json",
            r#"{
                "onCreateCommand": {"ok": "true", "bad": "echo first line; echo 'npm ERR! missing script' >&2; exit 3"},
                "postCreateCommand": "touch ../should-not-run",
                "postStartCommand": "touch ../should-not-run"
            }"#,
        )],
    );
    let (code, ws) = hub
        .api(
            "POST",
            "/workspaces",
            Some(json!({"metadata": {"repo": url}})),
        )
        .await
        .unwrap();
    assert_eq!(code, 201);
    let id = ws["id"].as_str().unwrap();
    let failed = wait_step(&hub, id, "onCreateCommand", "failed").await;
    let message = failed["message"].as_str().unwrap();
    assert!(
        message.starts_with("bad: exit status: 3") && message.contains("npm ERR! missing script"),
        "{message}"
    );
    assert_eq!(
        wait_step(&hub, id, "postCreateCommand", "skipped").await["message"],
        "onCreateCommand failed"
    );
    wait_step(&hub, id, "postStartCommand", "skipped").await;
    assert!(!hub.workspace_dir(id).join("should-not-run").exists());
    // The whole output is in the setup log, in the home folder.
    let log =
        std::fs::read_to_string(hub.workspace_dir(id).join(".local/state/wsh/setup.log")).unwrap();
    assert!(log.contains("[onCreateCommand.bad] first line"), "{log}");

    // A file that is not JSON fails visibly and runs nothing.
    let url = repo(
        src.path(),
        "garbage.git",
        &[(".devcontainer/devcontainer.json", "{ \"onCreateCommand\": ")],
    );
    let (_, ws) = hub
        .api(
            "POST",
            "/workspaces",
            Some(json!({"metadata": {"repo": url}})),
        )
        .await
        .unwrap();
    let id = ws["id"].as_str().unwrap();
    let failed = wait_step(&hub, id, "devcontainer.json", "failed").await;
    assert!(
        failed["message"].as_str().unwrap().contains("EOF"),
        "{failed}"
    );
}
