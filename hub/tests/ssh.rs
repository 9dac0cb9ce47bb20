//! OpenSSH into a workspace through the agent: `wsh config-ssh` writes the config, then real
//! `ssh`, `scp` and `rsync -e ssh` use nothing but it (and the user's token, as `wsh login`
//! keeps it) to reach the sshd listening on loopback inside the workspace; `wsh ssh` does
//! the same without a config. The block is idempotent and comes out cleanly.

use harness::TestHub;
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn ssh_scp_and_rsync_reach_a_workspace_through_the_generated_config_alone() {
    let hub = TestHub::start().await.unwrap();
    let (status, ws) = hub
        .api("POST", "/workspaces", Some(json!({"name": "box"})))
        .await
        .unwrap();
    assert_eq!(status, 201, "{ws}");
    let id = ws["id"].as_str().unwrap();
    hub.wait_for(id, Duration::from_secs(30), |w| {
        !w["agent"].is_null() && w["status"] == "READY"
    })
    .await
    .unwrap();
    // The workspace's sshd on loopback (a process workspace's loopback is this machine's).
    let sshd = harness::sshd::Ssh::prepare().unwrap();
    let mut server = sshd.start_local().unwrap();
    let port = sshd.port.to_string();
    let key = sshd.dir.path().join("client");

    let home = tempfile::tempdir().unwrap();
    let config = home.path().join(".ssh/config");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    let mine = "Host elsewhere\n  HostName 192.0.2.1\n";
    std::fs::write(&config, mine).unwrap();
    let config_ssh = |extra: &[&str]| {
        let mut cmd = hub.wsh().unwrap();
        cmd.env("HOME", home.path())
            .arg("config-ssh")
            .arg("--ssh-config")
            .arg(&config)
            .args(extra);
        run(&mut cmd);
        std::fs::read_to_string(&config).unwrap()
    };
    let user = harness::sshd::user();
    let settings = [
        "--port",
        &port,
        "--user",
        &user,
        "--identity-file",
        key.to_str().unwrap(),
    ];
    let written = config_ssh(&settings);
    assert!(written.contains("Host box.wsh *.wsh\n"), "{written}");
    assert!(
        written.ends_with(mine),
        "the user's entries stay: {written}"
    );
    assert_eq!(config_ssh(&settings), written, "idempotent");

    // Real OpenSSH clients with the generated config; the token as `wsh login` keeps it.
    let ssh_env = |cmd: &mut Command| {
        cmd.env("WSH_TOKEN", &hub.token).env("HOME", home.path());
    };
    let mut ssh = Command::new("ssh");
    ssh.args([
        "-F",
        config.to_str().unwrap(),
        "box.wsh",
        "echo",
        "hi-$((1+2))",
    ]);
    ssh_env(&mut ssh);
    assert_eq!(run(&mut ssh), "hi-3\n");

    let local = tempfile::tempdir().unwrap();
    let remote = tempfile::tempdir().unwrap();
    let data = harness::pseudo_bytes(3 << 20, 7);
    std::fs::write(local.path().join("a.bin"), &data).unwrap();
    let mut scp = Command::new("scp");
    scp.args(["-q", "-F", config.to_str().unwrap()])
        .arg(local.path().join("a.bin"))
        .arg(format!("box.wsh:{}/a.bin", remote.path().display()));
    ssh_env(&mut scp);
    run(&mut scp);
    assert_eq!(std::fs::read(remote.path().join("a.bin")).unwrap(), data);

    let tree = local.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("sub/b.txt"), "bee\n").unwrap();
    let mut rsync = Command::new("rsync");
    rsync
        .args(["-a", "-e", &format!("ssh -F {}", config.display())])
        .arg(format!("{}/", tree.display()))
        .arg(format!("box.wsh:{}/tree/", remote.path().display()));
    ssh_env(&mut rsync);
    run(&mut rsync);
    assert_eq!(
        std::fs::read_to_string(remote.path().join("tree/sub/b.txt")).unwrap(),
        "bee\n"
    );

    // `wsh ssh` without any config, by name; its host key went to the wsh known hosts.
    let mut cmd = hub.wsh().unwrap();
    cmd.env("HOME", home.path())
        .args(["ssh", "box"])
        .args(settings)
        .args(["--", "echo", "via-wsh"]);
    assert_eq!(run(&mut cmd), "via-wsh\n");
    assert!(Path::new(&home.path().join(".ssh/wsh_known_hosts")).exists());

    // Out again: the file is what it was.
    assert_eq!(config_ssh(&["--remove"]), mine);
    let _ = server.kill();
    let _ = server.wait();
}
