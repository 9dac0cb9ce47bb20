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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
}

/// One workspace as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workspace {
    pub id: Uuid,
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

#[cfg(test)]
mod tests {
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
