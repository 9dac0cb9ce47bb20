//! The user-data every image-booting provider sends passes `cloud-init schema` (Debian's
//! `cloud-init`), and hostile values cannot break out of their strings: cloud-init's own
//! YAML parser reads back exactly the agent config that went in.

use protocol::bootstrap::AgentBootstrap;
use std::process::Command;

fn hostile(s: &str) -> String {
    format!(
        "{s}\"'\n- injected: true\n---\n#comment\n{{a: [b]}} &anchor *alias !!python/object:os.system \u{2028}\u{2029}\u{85}\u{7f}\u{9b}\u{feff}\u{fffe}\u{1f600}\r\t\x1b[31m$(reboot)`id`\\"
    )
}

#[test]
fn rendered_user_data_passes_cloud_init_schema_and_keeps_hostile_values_inside() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        AgentBootstrap {
            hub_addr: "hub.example.com:7443".into(),
            server_name: "hub.example.com".into(),
            ca_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
            enrollment_token: Some("wse_token".into()),
            state_dir: "/var/lib/workspace-agent".into(),
            user: Some("dev".into()),
            detached_session_ttl_secs: Some(3600),
            terminal_ring_bytes: Some(4 << 20),
            ports: None,
        },
        AgentBootstrap {
            hub_addr: hostile("hub:1"),
            server_name: hostile("name"),
            ca_pem: hostile("pem"),
            enrollment_token: Some(hostile("token")),
            state_dir: hostile("/state"),
            user: Some(hostile("user")),
            detached_session_ttl_secs: None,
            terminal_ring_bytes: None,
            ports: None,
        },
    ];
    for (i, bootstrap) in cases.iter().enumerate() {
        let config = toml::to_string(bootstrap).unwrap();
        let user_data = hub::provider::cloudinit::render(&config).unwrap();
        let path = dir.path().join(format!("user-data-{i}"));
        std::fs::write(&path, &user_data).unwrap();
        let out = Command::new("cloud-init")
            .args(["schema", "--config-file"])
            .arg(&path)
            .output()
            .expect("cloud-init is installed (./scripts/test installs it)");
        assert!(
            out.status.success(),
            "case {i}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // cloud-init's parser (PyYAML) reads the very same config back, and nothing else.
        let parsed = Command::new("/usr/bin/python3")
            .args([
                "-c",
                "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
            ])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            parsed.status.success(),
            "{}",
            String::from_utf8_lossy(&parsed.stderr)
        );
        let doc: serde_json::Value = serde_json::from_slice(&parsed.stdout).unwrap();
        let keys: Vec<&String> = doc.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["bootcmd", "runcmd"], "case {i}");
        assert_eq!(doc["bootcmd"][0][4], config, "case {i}");
        assert_eq!(
            toml::from_str::<AgentBootstrap>(doc["bootcmd"][0][4].as_str().unwrap()).unwrap(),
            *bootstrap
        );
    }
}
