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

/// Random agent configs, YAML's and the shell's special characters and Unicode line breaks
/// over-represented, rendered and read back by cloud-init's own parser (PyYAML, in one
/// batch): each comes back exactly, in a document that holds nothing else, written in
/// printable ASCII only. `WSH_FUZZ_ITERS` configs (400) from `WSH_FUZZ_SEED` (printed).
#[test]
fn random_configs_come_back_exactly_through_cloud_inits_parser() {
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("WSH_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    let count: usize = std::env::var("WSH_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    eprintln!("cloud-init renderer: {count} configs from WSH_FUZZ_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    const PIECES: &[&str] = &[
        "\"",
        "'",
        "\\",
        "\n",
        "\r\n",
        "\t",
        ": ",
        "- ",
        "# ",
        "&a ",
        "*a",
        "!!python/",
        "---",
        "...",
        "{",
        "}",
        "[",
        "]",
        "|",
        ">-",
        "%YAML",
        "`id`",
        "$(reboot)",
        "\u{85}",
        "\u{2028}",
        "\u{2029}",
        "\u{feff}",
        "\u{fffe}",
        "\u{7f}",
        "\u{9b}",
        "\u{1b}[31m",
        "\u{1f600}",
        "\u{10ffff}",
        "@AGENT_CONFIG@",
        "\\u0000",
        "\\U0001F600",
        "#cloud-config",
    ];
    let configs: Vec<String> = (0..count)
        .map(|_| {
            let len = rng.random_range(0..48);
            (0..len)
                .map(|_| match rng.random_range(0..3) {
                    0 => PIECES[rng.random_range(0..PIECES.len())].to_owned(),
                    1 => char::from(rng.random_range(1..0x80u8)).to_string(),
                    _ => loop {
                        if let Some(c) = char::from_u32(rng.random_range(1..=0x10ffff)) {
                            break c.to_string();
                        }
                    },
                })
                .collect()
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    for (i, config) in configs.iter().enumerate() {
        let user_data = hub::provider::cloudinit::render(config)
            .unwrap_or_else(|e| panic!("seed {seed}, config {config:?}: {e}"));
        assert!(
            user_data
                .bytes()
                .all(|b| b == b'\n' || (0x20..0x7f).contains(&b)),
            "seed {seed}: not printable ASCII for {config:?}"
        );
        std::fs::write(dir.path().join(format!("{i:05}")), user_data).unwrap();
    }
    let parsed = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import json, os, sys, yaml\n\
             out = []\n\
             for name in sorted(os.listdir(sys.argv[1])):\n\
             \x20   doc = yaml.safe_load(open(os.path.join(sys.argv[1], name), encoding='ascii'))\n\
             \x20   out.append([sorted(doc), doc['bootcmd'][0][4]])\n\
             print(json.dumps(out))",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        parsed.status.success(),
        "seed {seed}: {}",
        String::from_utf8_lossy(&parsed.stderr)
    );
    let back: Vec<(Vec<String>, String)> = serde_json::from_slice(&parsed.stdout).unwrap();
    assert_eq!(back.len(), configs.len());
    for ((keys, config), sent) in back.iter().zip(&configs) {
        assert_eq!(keys, &["bootcmd", "runcmd"], "seed {seed}");
        assert_eq!(config, sent, "seed {seed}");
    }
}
