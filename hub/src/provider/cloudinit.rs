//! cloud-init user-data for workspace VMs, one renderer for every provider that boots
//! images (GCE, qemu), from the template `cloud-init/user-data.json` (embedded at build
//! time; see `cloud-init/README.md`).
//!
//! The document is JSON after the `#cloud-config` line (JSON is YAML's flow style, and
//! cloud-init reads it as such), built with `serde_json` and with every non-ASCII character
//! escaped, so no value can end a string early, open a new key, start a YAML construct or
//! be folded, whatever it holds. The agent's config (the hub
//! address, the pinned CA, the single-use enrollment token) is written on every boot, by
//! `bootcmd`, into a memory-only tmpfs at [`CONFIG_DIR`]: it reaches the shell only as a
//! positional argument (`"$1"`), never as script text. Then the agent's unit is started.

/// The memory-only folder the agent's config lives in (mode 0700, root only).
pub const CONFIG_DIR: &str = "/run/workspace-agent";
/// The agent's config file inside it.
pub const CONFIG_PATH: &str = "/run/workspace-agent/agent.toml";
/// The systemd unit baked into the image.
pub const AGENT_UNIT: &str = "workspace-agent.service";
/// GCE's limit for one metadata value; qemu's NoCloud seed has none, but we keep to it.
pub const MAX_USER_DATA: usize = 256 * 1024;

/// Why user-data could not be rendered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RenderError {
    #[error("user-data of {0} bytes exceeds the {MAX_USER_DATA}-byte limit")]
    TooLarge(usize),
    #[error("the agent config contains a NUL byte")]
    Nul,
    #[error("cloud-init/user-data.json is not JSON with one {PLACEHOLDER}")]
    Template,
}

/// The template, with [`PLACEHOLDER`] where the agent's config goes.
const TEMPLATE: &str = include_str!("../../../cloud-init/user-data.json");
/// The JSON string in [`TEMPLATE`] replaced, as a value, by the agent's config.
const PLACEHOLDER: &str = "@AGENT_CONFIG@";

/// The user-data that writes `agent_config` (TOML) to [`CONFIG_PATH`] and starts the agent.
pub fn render(agent_config: &str) -> Result<String, RenderError> {
    if agent_config.contains('\0') {
        return Err(RenderError::Nul);
    }
    let mut doc: serde_json::Value =
        serde_json::from_str(TEMPLATE).map_err(|_| RenderError::Template)?;
    if fill(&mut doc, agent_config) != 1 {
        return Err(RenderError::Template);
    }
    let out = format!("#cloud-config\n{}\n", ascii_only(&doc.to_string()));
    if out.len() > MAX_USER_DATA {
        return Err(RenderError::TooLarge(out.len()));
    }
    Ok(out)
}

/// Replaces every string equal to [`PLACEHOLDER`] with `value`; returns how many.
fn fill(doc: &mut serde_json::Value, value: &str) -> usize {
    match doc {
        serde_json::Value::String(s) if s == PLACEHOLDER => {
            *s = value.to_owned();
            1
        }
        serde_json::Value::Array(items) => items.iter_mut().map(|v| fill(v, value)).sum(),
        serde_json::Value::Object(map) => map.values_mut().map(|v| fill(v, value)).sum(),
        _ => 0,
    }
}

/// Escapes every character outside printable ASCII. YAML reads NEL, LS and PS as line breaks
/// (and folds them inside quoted strings) and refuses C1 controls outright, while JSON
/// leaves them raw; escaped, they reach the agent exactly. `\\U` is YAML's 32-bit escape.
fn ascii_only(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        match c as u32 {
            0x20..=0x7e => out.push(c),
            n @ 0..=0xffff => out.push_str(&format!("\\u{n:04x}")),
            n => out.push_str(&format!("\\U{n:08x}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_survives_rendering_exactly() {
        let config = "hub_addr = \"hub:7443\"\nenrollment_token = \"wse_x\"\n";
        let out = render(config).unwrap();
        assert!(out.starts_with("#cloud-config\n{"));
        let doc: serde_json::Value = serde_json::from_str(out.lines().nth(1).unwrap()).unwrap();
        assert_eq!(doc["bootcmd"][0][4], config);
        assert_eq!(doc["runcmd"][0][3], AGENT_UNIT);
        assert_eq!(render("a\0b"), Err(RenderError::Nul));
        assert!(matches!(
            render(&"x".repeat(MAX_USER_DATA)),
            Err(RenderError::TooLarge(_))
        ));
    }

    #[test]
    fn the_template_writes_where_the_constants_say() {
        let script = serde_json::from_str::<serde_json::Value>(TEMPLATE).unwrap()["bootcmd"][0][2]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(script.contains(&format!(
            "mount -t tmpfs -o mode=0700,size=1m tmpfs {CONFIG_DIR}"
        )));
        assert!(script.contains(&format!("mv {CONFIG_PATH}.tmp {CONFIG_PATH}")));
        assert!(
            script.contains("\"$1\""),
            "the config reaches the shell only as $1"
        );
        // A config that is the placeholder itself is still written once, verbatim.
        let out = render(PLACEHOLDER).unwrap();
        assert_eq!(out.matches(PLACEHOLDER).count(), 1);
    }
}
