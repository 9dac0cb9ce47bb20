//! State behind one small trait: workspaces, enrollment tokens, agent certificates, API
//! tokens, per-owner create counters, profiles and the audit log. The embedded implementation is SQLite ([`sqlite::SqliteStore`]); production uses
//! Firestore ([`firestore::FirestoreStore`]). Both pass one conformance suite
//! (`hub/tests/store.rs`).

pub mod firestore;
pub mod metered;
pub mod sqlite;

use crate::base::workspace::{Status, Workspace};
use async_trait::async_trait;
use uuid::Uuid;

/// Which store the hub keeps its state in (`[store]` in the config).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum StoreConfig {
    /// A SQLite file: `path`, or `hub.sqlite3` in the state folder. Several hub processes on
    /// one machine may share a file (replicas without a cloud store).
    Sqlite {
        #[serde(default)]
        path: Option<std::path::PathBuf>,
    },
    Firestore(firestore::FirestoreConfig),
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self::Sqlite { path: None }
    }
}

/// Opens the configured store.
pub async fn open(
    config: &StoreConfig,
    state_dir: &std::path::Path,
) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    Ok(match config {
        StoreConfig::Sqlite { path } => {
            let path = path
                .clone()
                .unwrap_or_else(|| state_dir.join("hub.sqlite3"));
            std::sync::Arc::new(sqlite::SqliteStore::open(&path)?)
        }
        StoreConfig::Firestore(fs) => {
            std::sync::Arc::new(firestore::FirestoreStore::connect(fs).await?)
        }
    })
}

/// Errors a caller branches on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    /// A conditional write lost: the record is not in a state the caller expected.
    #[error("workspace is {current:?}, not one of the expected states")]
    Conflict { current: Status },
    #[error("already exists")]
    AlreadyExists,
    /// The owner already has a workspace by this name.
    #[error("you already have a workspace named {0}")]
    NameTaken(String),
    /// A create would take its owner past a limit.
    #[error("you have {count} {what}; the limit is {limit}")]
    OverQuota {
        what: &'static str,
        count: usize,
        limit: usize,
    },
    #[error("store backend: {0}")]
    Backend(String),
}

/// Why an enrollment token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejection {
    #[error("unknown enrollment token")]
    Unknown,
    #[error("enrollment token already used")]
    Used,
    /// Past its time: the workspace it was for can no longer enroll an agent with it.
    #[error("enrollment token expired")]
    Expired(Uuid),
}

/// An API token's record (only its hash is stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiToken {
    pub owner_id: String,
    pub name: String,
    pub expires_at: Option<i64>,
    /// The verified e-mail its owner signed in with (team mode's `@domain` admins).
    pub email: Option<String>,
    /// A service token's grant (created by an admin, `owner_id` then names that admin).
    pub service: Option<ServiceGrant>,
}

/// What a service token may do: act for any owner id that starts with `owner_prefix`, on
/// the routes its `scopes` name.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceGrant {
    /// The owner ids it may name in `X-Wsh-Owner` start with this.
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9._@+-]+$")]
    pub owner_prefix: String,
    #[schema(min_items = 1)]
    pub scopes: Vec<Scope>,
}

/// A part of the API a service token (or, for the four purposes, a browser token) reaches.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Create, list, read, stop, start and delete workspaces; ports, sharing, keep-awake.
    Workspaces,
    /// Terminal sessions.
    Terminal,
    /// Port previews.
    Preview,
    /// Commands (`/exec`).
    Exec,
    /// The files API.
    Files,
    /// Browser tokens (`POST /workspaces/{id}/tickets`), for the purposes it also holds.
    Tickets,
}

/// A hub replica as the others find it: its peer address, while its registration lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaRecord {
    pub id: String,
    pub peer_addr: String,
    pub expires_at: i64,
}

/// Which replica holds a workspace's agent, and the epoch of that connection (microseconds
/// since the Unix epoch at its start): a later connection's route replaces an earlier one,
/// never the other way round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRoute {
    pub replica_id: String,
    pub epoch: i64,
}

/// What an owner may hold when a workspace is created, counted in the same atomic step as
/// the insert, so concurrent creates (on any replica) cannot pass it together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub workspaces: usize,
    /// Running ([`Status::is_running`]) workspaces, the new one included.
    pub running: usize,
}

impl Limits {
    pub const NONE: Self = Self {
        workspaces: usize::MAX,
        running: usize::MAX,
    };

    /// Whether one more running workspace fits beside `total` (`running` of them running).
    pub fn admit(&self, total: usize, running: usize) -> Result<(), StoreError> {
        if total >= self.workspaces {
            return Err(StoreError::OverQuota {
                what: "workspaces",
                count: total,
                limit: self.workspaces,
            });
        }
        if running >= self.running {
            return Err(StoreError::OverQuota {
                what: "running workspaces",
                count: running,
                limit: self.running,
            });
        }
        Ok(())
    }
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Inserts a new (running) workspace if its owner stays within `limits`, counted
    /// atomically with the insert; `OverQuota` if not, `AlreadyExists` if the id is taken,
    /// `NameTaken` if the owner has a workspace by its name.
    async fn insert_workspace(&self, ws: &Workspace, limits: Limits) -> Result<(), StoreError>;
    async fn get_workspace(&self, id: Uuid) -> Result<Workspace, StoreError>;
    /// The owner's workspace named `name`.
    async fn find_workspace_by_name(
        &self,
        owner_id: &str,
        name: &str,
    ) -> Result<Workspace, StoreError>;
    /// The owner's workspaces, or all of them for `None`; newest first.
    async fn list_workspaces(&self, owner_id: Option<&str>) -> Result<Vec<Workspace>, StoreError>;
    /// How many workspaces the owner has, and how many of them are running
    /// ([`Status::is_running`]), for quota checks.
    async fn count_workspaces(&self, owner_id: &str) -> Result<(usize, usize), StoreError> {
        let all = self.list_workspaces(Some(owner_id)).await?;
        let running = all.iter().filter(|w| w.status.is_running()).count();
        Ok((all.len(), running))
    }
    /// Conditional status change: succeeds only if the current status is in `from`.
    async fn transition(
        &self,
        id: Uuid,
        from: &[Status],
        to: Status,
        reason: Option<&str>,
    ) -> Result<Workspace, StoreError>;
    /// Moves `last_connected_at` and `last_active_at` forward (never back) to the given
    /// times; `None` leaves a field alone.
    async fn touch(
        &self,
        id: Uuid,
        connected_at: Option<i64>,
        active_at: Option<i64>,
    ) -> Result<(), StoreError>;
    /// Sets (or, with `None`, clears) the keep-awake lease.
    async fn set_keep_awake(&self, id: Uuid, until: Option<i64>) -> Result<Workspace, StoreError>;
    /// Changes a workspace's preview sharing atomically (read, apply, conditional write).
    async fn update_sharing(
        &self,
        id: Uuid,
        change: crate::base::workspace::SharingChange,
        now: i64,
    ) -> Result<Workspace, StoreError>;
    /// Removes the record; only a workspace in `DELETING` may go (else `Conflict`).
    async fn delete_workspace(&self, id: Uuid) -> Result<(), StoreError>;

    /// Stores an enrollment token (by hash) for a workspace.
    async fn insert_enrollment_token(
        &self,
        token_hash: &str,
        workspace_id: Uuid,
        expires_at_ms: i64,
    ) -> Result<(), StoreError>;
    /// Atomically marks a token used by `key_fingerprint`. The same key may redeem the
    /// same token again before it expires (a lost reply must not strand an agent).
    async fn redeem_enrollment_token(
        &self,
        token_hash: &str,
        key_fingerprint: &str,
        now_ms: i64,
    ) -> Result<Result<Uuid, TokenRejection>, StoreError>;

    /// Records the certificate an agent holds (the only one accepted for that workspace).
    async fn put_agent_cert(&self, workspace_id: Uuid, fingerprint: &str)
    -> Result<(), StoreError>;
    async fn agent_cert(&self, workspace_id: Uuid) -> Result<Option<String>, StoreError>;

    async fn insert_api_token(&self, token_hash: &str, token: &ApiToken) -> Result<(), StoreError>;
    async fn find_api_token(&self, token_hash: &str) -> Result<Option<ApiToken>, StoreError>;
    /// The owner's tokens with their hashes (the hash is the token's public id).
    async fn list_api_tokens(&self, owner_id: &str) -> Result<Vec<(String, ApiToken)>, StoreError>;
    /// Revokes a token; `NotFound` if there is none with this hash.
    async fn delete_api_token(&self, token_hash: &str) -> Result<(), StoreError>;

    /// Takes the lease `name` (`[a-z0-9-]`) for `holder` until `until` (ms since the
    /// epoch) if it is free, expired at `now`, or `holder`'s already (a renewal), in one
    /// atomic step. Returns whether `holder` holds it afterwards.
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now: i64,
        until: i64,
    ) -> Result<bool, StoreError>;
    /// Ends `holder`'s lease now (a replica shutting down), so another takes over at once;
    /// a lease someone else holds is left alone.
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError>;

    /// Stores a short-lived grant of `kind` (`[a-z-]`) under `key` (a hash, or a code the
    /// hub made): sign-ins in progress, one-time links, device codes. `AlreadyExists` if the
    /// key is taken by a grant alive at `now`.
    async fn put_grant(
        &self,
        kind: &str,
        key: &str,
        payload: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<(), StoreError>;
    /// A grant that has not expired at `now`.
    async fn get_grant(
        &self,
        kind: &str,
        key: &str,
        now: i64,
    ) -> Result<Option<String>, StoreError>;
    /// Replaces a live grant's payload if it is still `expected` (compare and swap).
    async fn swap_grant(
        &self,
        kind: &str,
        key: &str,
        expected: &str,
        payload: &str,
        now: i64,
    ) -> Result<bool, StoreError>;
    /// Removes a grant and returns its payload if it was `expected` (`None`: any) and alive
    /// at `now`: of concurrent takers, one gets it.
    async fn take_grant(
        &self,
        kind: &str,
        key: &str,
        expected: Option<&str>,
        now: i64,
    ) -> Result<Option<String>, StoreError>;
    /// Deletes grants expired at `now` (housekeeping).
    async fn purge_grants(&self, now: i64) -> Result<usize, StoreError>;

    /// Registers (or renews) a replica.
    async fn put_replica(&self, replica: &ReplicaRecord) -> Result<(), StoreError>;
    /// A replica whose registration has not expired at `now`.
    async fn get_replica(&self, id: &str, now: i64) -> Result<Option<ReplicaRecord>, StoreError>;
    /// Every replica whose registration has not expired at `now`.
    async fn list_replicas(&self, now: i64) -> Result<Vec<ReplicaRecord>, StoreError>;
    /// Removes a replica's registration (it is shutting down).
    async fn delete_replica(&self, id: &str) -> Result<(), StoreError>;

    /// Records `route` unless the workspace has a route of a later epoch already; returns
    /// whether it was recorded.
    async fn put_agent_route(
        &self,
        workspace_id: Uuid,
        route: &AgentRoute,
    ) -> Result<bool, StoreError>;
    async fn agent_route(&self, workspace_id: Uuid) -> Result<Option<AgentRoute>, StoreError>;
    /// Removes the workspace's route if it is still `route` (the connection ended); a newer
    /// route, of a connection to another replica, stays.
    async fn clear_agent_route(
        &self,
        workspace_id: Uuid,
        route: &AgentRoute,
    ) -> Result<(), StoreError>;

    /// The owner's profile (an empty one, version 0, if they never saved one).
    async fn get_profile(&self, owner_id: &str) -> Result<Profile, StoreError>;
    /// Saves `profile` if the stored one is still at `profile.version - 1` (compare and
    /// set: false when another write came first).
    async fn put_profile(&self, owner_id: &str, profile: &Profile) -> Result<bool, StoreError>;

    /// Appends an entry to the audit log (`AlreadyExists` if its id is taken).
    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError>;
    /// The entries `query` selects, newest first (by id), at most `query.limit`.
    async fn list_audit(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError>;
    /// Deletes the entries recorded before `before` (Unix ms; retention), at most `max` of
    /// them; returns how many went.
    async fn purge_audit(&self, before: i64, max: usize) -> Result<usize, StoreError>;
}

/// One entry of the audit log: who did what to what, when, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct AuditEntry {
    /// Unique and in time order: its time in µs as 16 hex digits, then 8 random ones.
    pub id: String,
    /// When (Unix ms).
    pub at: i64,
    /// Who: an owner id, `system` (the hub's own housekeeping) or `anonymous` (no or bad
    /// credentials).
    pub actor: String,
    /// How they acted: `user` (their token or session), `service:<owner prefix>` (a host
    /// app's service token), `ticket:<purpose>` (a browser token), `oidc`, `link`, `device`
    /// (a sign-in), `scheduler` (`/cleanup`), `idle` or `reconciler` (housekeeping).
    pub via: String,
    /// What: `workspace.create`, `workspace.stop`, `sign_in`, `token.create`, ...
    pub action: String,
    /// The workspace acted on, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace_id: Option<Uuid>,
    /// What else names the target: the path's workspace key, a port, a token or link id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    pub outcome: AuditOutcome,
    /// The HTTP status, for actions that came over HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The error code of a refusal or failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// The request's `X-Request-Id` (it names the request in the hub's logs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The address the request came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
}

impl AuditEntry {
    /// The first 16 hex digits of the ids of entries recorded at `at_ms`: ids sort as
    /// their times do, so a time range is an id range.
    pub fn id_at(at_ms: i64) -> String {
        format!("{:016x}", at_ms.clamp(0, i64::MAX / 1000) * 1000)
    }

    /// A fresh id for an entry recorded at `at_us` (Unix µs; its `at` is that in ms).
    pub fn new_id(at_us: i64) -> String {
        format!("{:016x}{:08x}", at_us.max(0), rand::random::<u32>())
    }
}

/// How an audited action ended.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum AuditOutcome {
    /// Done (or accepted and under way).
    Ok,
    /// Not allowed: no, bad or insufficient credentials.
    Denied,
    /// Refused as asked: bad input, a conflict, a quota, not found.
    Refused,
    /// Failed on the hub's side.
    Failed,
}

impl AuditOutcome {
    /// The outcome an HTTP status stands for.
    pub fn of_status(status: u16) -> Self {
        match status {
            401 | 403 | 429 => Self::Denied,
            400..=499 => Self::Refused,
            500.. => Self::Failed,
            _ => Self::Ok,
        }
    }
}

/// Which audit entries to read: all filters given must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditQuery {
    pub workspace_id: Option<Uuid>,
    pub actor: Option<String>,
    /// Recorded at or after (Unix ms).
    pub since: Option<i64>,
    /// Recorded before (Unix ms).
    pub until: Option<i64>,
    /// Older than the entry with this id (the previous page's last).
    pub before: Option<String>,
    pub limit: usize,
}

impl AuditQuery {
    /// The id range the time filters and the cursor make: ids in `[low, high)`.
    pub fn id_range(&self) -> (Option<String>, Option<String>) {
        let low = self.since.map(AuditEntry::id_at);
        let high = [self.until.map(AuditEntry::id_at), self.before.clone()]
            .into_iter()
            .flatten()
            .min();
        (low, high)
    }
}

/// What a user set up for all their workspaces: SSH public keys (they reach every
/// workspace's `authorized_keys` through its agent) and a dotfiles repository.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Profile {
    #[serde(default)]
    pub ssh_keys: Vec<SshKey>,
    #[serde(default)]
    pub dotfiles: Option<DotfilesSetting>,
    /// One more with every write.
    #[serde(default)]
    pub version: i64,
}

/// One SSH public key of a user.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct SshKey {
    /// The key's SHA-256 fingerprint as `ssh-keygen -l` prints it (`SHA256:...`).
    pub id: String,
    /// The OpenSSH public key line: type, key, comment.
    pub key: String,
    /// When it was added (Unix ms).
    pub added_at: i64,
}

/// A user's dotfiles repository.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DotfilesSetting {
    /// A git URL (the forms a workspace's repository takes).
    #[schema(
        max_length = 2048,
        pattern = r"^(?:(?:https?|ssh|git)://|file:///|(?:[^\x00-\x1f\x7f-\x9f :/@-][^\x00-\x1f\x7f-\x9f :/]*)?@[^\x00-\x1f\x7f-\x9f :/]*:)[^\x00-\x1f\x7f-\x9f ]*$"
    )]
    pub repo: String,
    /// A shell command run in the clone; none runs the first of `install.sh`, `install`,
    /// `bootstrap.sh`, `bootstrap`, `script/bootstrap`, `setup.sh`, `setup`, `script/setup`,
    /// or links the repository's dotfiles into the home folder when there is none.
    #[serde(default)]
    #[schema(
        min_length = 1,
        max_length = 4096,
        pattern = r"^[^\x00]*[^\x00\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\x00]*$"
    )]
    pub install_command: Option<String>,
}
