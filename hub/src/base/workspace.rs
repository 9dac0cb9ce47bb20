//! The workspace record and its statuses. The transitions between them are the `from`
//! lists of the conditional writes in `lifecycle`, `reconcile` and `agents` (the one place
//! each edge is taken), so there is no second table here to drift from them.

use serde::{Deserialize, Serialize};
use std::time::Duration;
use uuid::Uuid;

/// Idle clean-up defaults; a create request may choose shorter (never longer) times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdlePolicy {
    /// A READY workspace with no activity for this long is stopped (suspended).
    #[serde(with = "humantime_serde")]
    pub stop_after: Duration,
    /// A SUSPENDED or ERROR workspace untouched for this long is deleted.
    #[serde(with = "humantime_serde")]
    pub delete_after: Duration,
    /// Any workspace older than this is deleted, active or not.
    #[serde(with = "humantime_serde")]
    pub max_lifetime: Duration,
}

impl Default for IdlePolicy {
    fn default() -> Self {
        Self {
            stop_after: Duration::from_secs(30 * 60),
            delete_after: Duration::from_secs(14 * 24 * 3600),
            max_lifetime: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

/// A workspace's lifecycle status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    /// The VM is being created; turns READY when its agent says hello.
    Provisioning,
    /// The agent has enrolled and connected at least once since the last (re)start.
    Ready,
    /// Being suspended.
    Stopping,
    /// Suspended: the VM keeps its state but does not run.
    Suspended,
    /// Being resumed.
    Starting,
    /// Being destroyed.
    Deleting,
    /// Something failed; `status_reason` says what.
    Error,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Provisioning => "PROVISIONING",
            Status::Ready => "READY",
            Status::Stopping => "STOPPING",
            Status::Suspended => "SUSPENDED",
            Status::Starting => "STARTING",
            Status::Deleting => "DELETING",
            Status::Error => "ERROR",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "PROVISIONING" => Status::Provisioning,
            "READY" => Status::Ready,
            "STOPPING" => Status::Stopping,
            "SUSPENDED" => Status::Suspended,
            "STARTING" => Status::Starting,
            "DELETING" => Status::Deleting,
            "ERROR" => Status::Error,
            _ => return None,
        })
    }

    /// Whether the instance is meant to be running (counts against `max_running`).
    pub fn is_running(self) -> bool {
        matches!(
            self,
            Status::Provisioning | Status::Ready | Status::Starting
        )
    }
}

/// Free-form context a workspace was created with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// A git URL: `https://`, `http://`, `ssh://`, `git://`, `file:///` or `user@host:path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        max_length = 2048,
        pattern = r"^(?:(?:https?|ssh|git)://|file:///|(?:[^\x00-\x1f\x7f-\x9f :/@-][^\x00-\x1f\x7f-\x9f :/]*)?@[^\x00-\x1f\x7f-\x9f :/]*:)[^\x00-\x1f\x7f-\x9f ]*$"
    )]
    pub repo: Option<String>,
    /// A branch name git accepts (`git check-ref-format --branch`); needs `repo`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(
        max_length = 255,
        pattern = r"^(?![-/.])(?!.*(?:\.\.|@\{|//))(?!.*(?:[/.]|\.lock)$)[^\x00-\x1f\x7f-\x9f ~^:?*\[\\]+$"
    )]
    pub branch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 128, pattern = r"^[^\x00-\x1f\x7f-\x9f]*$")]
    pub device_id: Option<String>,
}

/// One workspace as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workspace {
    pub id: Uuid,
    /// Unique among its owner's workspaces ([`check_name`]); empty for workspaces created
    /// before names existed.
    #[serde(default)]
    pub name: String,
    pub owner_id: String,
    pub instance_name: String,
    pub zone: String,
    pub image_tag: String,
    pub machine_type: String,
    pub status: Status,
    /// Why the workspace is in ERROR (or other human-readable status detail).
    pub status_reason: Option<String>,
    /// Unix milliseconds.
    pub created_at: i64,
    pub updated_at: i64,
    /// When the agent was last connected (written at most once a minute).
    pub last_connected_at: Option<i64>,
    /// When the agent last reported use: input, attached clients (at most once a minute).
    pub last_active_at: Option<i64>,
    /// A keep-awake lease: idle clean-up leaves the workspace alone until then.
    pub keep_awake_until: Option<i64>,
    /// The idle clean-up policy chosen at create time.
    pub idle: IdlePolicy,
    pub metadata: Metadata,
    /// Who besides the owner may open the workspace's port previews.
    #[serde(default)]
    pub sharing: Sharing,
}

/// Who may open a port's preview.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    /// The owner (and admins).
    #[default]
    Private,
    /// Anyone signed in to the hub.
    Authenticated,
    /// Anyone with the URL.
    Public,
}

/// A port shared beyond its owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PortShare {
    pub port: u16,
    pub visibility: Visibility,
}

/// An expiring, revocable link to one port's preview; only its secret's hash is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ShareLink {
    pub id: String,
    pub port: u16,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub secret_hash: String,
    /// Unix milliseconds.
    pub expires_at: i64,
}

/// A workspace's preview sharing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Sharing {
    #[serde(default)]
    pub ports: Vec<PortShare>,
    #[serde(default)]
    pub links: Vec<ShareLink>,
}

/// At most this many share links per workspace.
pub const MAX_SHARE_LINKS: usize = 100;

/// A change to [`Sharing`], applied by the store inside its conditional write.
#[derive(Debug, Clone)]
pub enum SharingChange {
    Visibility(u16, Visibility),
    AddLink(ShareLink),
    RemoveLink(String),
}

impl Sharing {
    pub fn visibility(&self, port: u16) -> Visibility {
        self.ports
            .iter()
            .find(|p| p.port == port)
            .map(|p| p.visibility)
            .unwrap_or_default()
    }

    /// Applies a change; expired links are dropped on the way. Removing an unknown link
    /// is an error.
    pub fn apply(&mut self, change: &SharingChange, now: i64) -> Result<(), UnknownLink> {
        self.links.retain(|l| l.expires_at > now);
        match change {
            SharingChange::Visibility(port, v) => {
                self.ports.retain(|p| p.port != *port);
                if *v != Visibility::Private {
                    self.ports.push(PortShare {
                        port: *port,
                        visibility: *v,
                    });
                    self.ports.sort_by_key(|p| p.port);
                }
            }
            SharingChange::AddLink(link) => {
                if self.links.len() >= MAX_SHARE_LINKS {
                    self.links.remove(0);
                }
                self.links.push(link.clone());
            }
            SharingChange::RemoveLink(id) => {
                let before = self.links.len();
                self.links.retain(|l| &l.id != id);
                if self.links.len() == before {
                    return Err(UnknownLink);
                }
            }
        }
        Ok(())
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A repository URL git can clone: https, http, ssh, git or file, or `user@host:path`; at
/// most 2,048 characters, no blanks or control characters, never starting with `-` (git
/// would read it as an option; it is also given `--`, belt and braces).
pub fn is_git_url(repo: &str) -> bool {
    let scheme_ok = ["https://", "http://", "ssh://", "git://", "file:///"]
        .iter()
        .any(|s| repo.starts_with(s))
        || repo
            .split_once(':')
            .is_some_and(|(host, _)| host.contains('@') && !host.contains('/'));
    scheme_ok
        && repo.chars().count() <= 2048
        && !repo.starts_with('-')
        && !repo.chars().any(|c| c.is_control() || c == ' ')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rules_and_defaults_come_from_the_repository() {
        for good in ["api", "a", "web-2", "a1-b2"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        let uuid = "abcdef01-2345-4678-9abc-def012345678";
        for bad in [
            "",
            "Api",
            "1api",
            "api-",
            "a_b",
            "a.b",
            "a/b",
            uuid,
            &"a".repeat(41),
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        let id = Uuid::parse_str("0123abcd-0000-4000-8000-000000000000").unwrap();
        let name = |repo: Option<&str>, attempt| default_name(repo, id, attempt);
        assert_eq!(name(Some("https://github.com/acme/api.git"), 0), "api");
        assert_eq!(
            name(Some("git@github.com:acme/Web_App.git"), 1),
            "web-app-2"
        );
        assert_eq!(name(Some("https://example.com/x/123"), 0), "ws-123");
        assert_eq!(name(Some("https://example.com/x/api"), 10), "api-0123abcd");
        assert_eq!(name(None, 0), "ws-0123ab");
        let long = name(Some(&"x".repeat(100)), 9);
        assert_eq!(long.len(), MAX_NAME);
        assert!(long.ends_with("-10"));
        for repo in ["", "/", "---", "https://h/a..b", "https://h/ä"] {
            let name = name(Some(repo), 0);
            assert!(check_name(&name).is_ok(), "{repo:?} -> {name:?}");
        }
    }

    use super::Status::*;

    #[test]
    fn statuses_round_trip() {
        for s in [
            Provisioning,
            Ready,
            Stopping,
            Suspended,
            Starting,
            Deleting,
            Error,
        ] {
            assert_eq!(super::Status::parse(s.as_str()), Some(s));
        }
    }
}

/// A share link that is not there (to remove).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownLink;

/// 1 to `max` of `a-z 0-9 -`, a letter first, not ending with `-` (names, zones, machine
/// types).
pub fn is_label(value: &str, max: usize) -> bool {
    (1..=max).contains(&value.len())
        && value.starts_with(|c: char| c.is_ascii_lowercase())
        && !value.ends_with('-')
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The longest workspace name.
pub const MAX_NAME: usize = 40;

/// A workspace name: 1 to [`MAX_NAME`] of `a-z 0-9 -`, starting with a letter, not ending
/// with `-`, and never a UUID (so a path segment is one or the other).
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = is_label(name, MAX_NAME) && Uuid::parse_str(name).is_err();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "name must be 1 to {MAX_NAME} of a-z 0-9 -, start with a letter and not end with -"
        ))
    }
}

/// How many default names a create tries: the repository's, then `-2` to `-10`, then one
/// with the id in it.
pub const DEFAULT_NAME_TRIES: usize = 11;

/// The name a workspace gets when none is asked for: the repository's (`acme/api.git` ->
/// `api`; `api-2`... on later `attempt`s, then `api-<8 hex of the id>`), else
/// `ws-<6 hex of the id>`.
pub fn default_name(repo: Option<&str>, id: Uuid, attempt: usize) -> String {
    let last = repo
        .and_then(|r| r.trim_end_matches('/').rsplit(['/', ':']).next())
        .map(|last| {
            last.strip_suffix(".git")
                .unwrap_or(last)
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    let mut base = String::new();
    for c in last.chars() {
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if !(c == '-' && (base.is_empty() || base.ends_with('-'))) {
            base.push(c);
        }
    }
    let hex = id.simple().to_string();
    let mut base = base.trim_matches('-').to_owned();
    if base.is_empty() {
        base = format!("ws-{}", &hex[..6]);
    } else if !base.starts_with(|c: char| c.is_ascii_lowercase()) {
        base = format!("ws-{base}");
    }
    let suffix = match attempt {
        0 => String::new(),
        n if n + 1 < DEFAULT_NAME_TRIES => format!("-{}", n + 1),
        _ => format!("-{}", &hex[..8]),
    };
    base.truncate(MAX_NAME - suffix.len());
    format!("{}{suffix}", base.trim_end_matches('-'))
}

/// The provider's name for a workspace's instance (GCE's rules: a letter, then up to 62 of
/// `[a-z0-9-]`).
pub fn instance_name(id: Uuid) -> String {
    format!("ws-{}", &id.simple().to_string()[..20])
}

pub fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}
