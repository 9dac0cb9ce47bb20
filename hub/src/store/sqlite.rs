//! The embedded store: SQLite in the hub's state folder (`rusqlite`, bundled).
//!
//! One connection behind a mutex, used from blocking threads. Every status change is a
//! transaction that re-reads the current status before writing.

use super::{
    AgentRoute, ApiToken, AuditEntry, AuditQuery, Limits, Profile, ReplicaRecord, Store,
    StoreError, TokenRejection,
};
use crate::base::workspace::{IdlePolicy, Metadata, Status, Workspace};
use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};
use std::path::Path;
use std::sync::{Arc, Mutex};
use uuid::Uuid;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS workspaces (
    id TEXT PRIMARY KEY,
    owner_id TEXT NOT NULL,
    instance_name TEXT NOT NULL UNIQUE,
    zone TEXT NOT NULL,
    image_tag TEXT NOT NULL,
    machine_type TEXT NOT NULL,
    status TEXT NOT NULL,
    status_reason TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    last_connected_at INTEGER,
    metadata TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS workspaces_owner ON workspaces(owner_id, created_at);
-- Quota counts read this index alone, never the rows.
CREATE INDEX IF NOT EXISTS workspaces_owner_status ON workspaces(owner_id, status);
CREATE TABLE IF NOT EXISTS enrollment_tokens (
    token_hash TEXT PRIMARY KEY,
    workspace_id TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER,
    used_by TEXT
);
CREATE TABLE IF NOT EXISTS agent_certs (
    workspace_id TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    issued_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS grants (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    payload TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (kind, key)
);
CREATE TABLE IF NOT EXISTS replicas (
    id TEXT PRIMARY KEY,
    peer_addr TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS agent_routes (
    workspace_id TEXT PRIMARY KEY,
    replica_id TEXT NOT NULL,
    epoch INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    until INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS api_tokens (
    token_hash TEXT PRIMARY KEY,
    owner_id TEXT NOT NULL,
    name TEXT NOT NULL,
    expires_at INTEGER,
    email TEXT,
    service TEXT
);
CREATE TABLE IF NOT EXISTS profiles (
    owner_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    data TEXT NOT NULL
);
-- The audit log: ids sort as their times do; the entry itself is JSON in `data`.
CREATE TABLE IF NOT EXISTS audit (
    id TEXT PRIMARY KEY,
    at INTEGER NOT NULL,
    workspace_id TEXT,
    actor TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_workspace ON audit(workspace_id, id);
CREATE INDEX IF NOT EXISTS audit_actor ON audit(actor, id);
"#;

/// An `api_tokens` row from column `at` on: owner_id, name, expires_at, email, service.
fn token_row(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<ApiToken> {
    let service: Option<String> = r.get(at + 4)?;
    Ok(ApiToken {
        owner_id: r.get(at)?,
        name: r.get(at + 1)?,
        expires_at: r.get(at + 2)?,
        email: r.get(at + 3)?,
        service: service
            .map(|s| serde_json::from_str(&s))
            .transpose()
            .map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    at + 4,
                    rusqlite::types::Type::Text,
                    e.into(),
                )
            })?,
    })
}

/// SQLite-backed [`Store`].
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl SqliteStore {
    /// Opens (or creates) the database file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(backend)?;
        Self::init(conn)
    }

    /// A private in-memory database (for tests of other components).
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::init(Connection::open_in_memory().map_err(backend)?)
    }

    fn init(conn: Connection) -> Result<Self, StoreError> {
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(backend)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(backend)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(backend)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(backend)?;
        conn.execute_batch(SCHEMA).map_err(backend)?;
        migrate(&conn)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().map_err(|_| backend("store lock poisoned"))?;
            f(&mut guard)
        })
        .await
        .map_err(backend)?
    }

    /// A lookup by key, on the hot path of every API and preview request: done right here
    /// when the connection is free (an indexed read takes microseconds, and in WAL mode a
    /// read does not wait for writers, in this process or another sharing the file; only a
    /// recovery after such a process crashed could hold it up), else on a blocking thread
    /// like everything else. Saves two thread hand-offs per lookup.
    async fn lookup<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        if let Ok(mut guard) = self.conn.try_lock() {
            return f(&mut guard);
        }
        self.with(f).await
    }
}

/// Columns added after the first schema, with their types; added to older files on open.
const ADDED_COLUMNS: [(&str, &str); 5] = [
    ("name", "TEXT NOT NULL DEFAULT ''"),
    ("last_active_at", "INTEGER"),
    ("keep_awake_until", "INTEGER"),
    ("idle", "TEXT NOT NULL DEFAULT '{}'"),
    ("sharing", "TEXT NOT NULL DEFAULT '{}'"),
];

fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let mut stmt = conn
        .prepare("SELECT name FROM pragma_table_info('workspaces')")
        .map_err(backend)?;
    let have: Vec<String> = stmt
        .query_map([], |row| row.get(0))
        .map_err(backend)?
        .collect::<Result<_, _>>()
        .map_err(backend)?;
    for (name, ty) in ADDED_COLUMNS {
        if !have.iter().any(|c| c == name) {
            conn.execute_batch(&format!("ALTER TABLE workspaces ADD COLUMN {name} {ty}"))
                .map_err(backend)?;
        }
    }
    // Names are looked up (and checked unique) per owner.
    conn.execute_batch(
        "CREATE INDEX IF NOT EXISTS workspaces_owner_name ON workspaces(owner_id, name)",
    )
    .map_err(backend)?;
    for (name, ty) in [("email", "TEXT"), ("service", "TEXT")] {
        let have: bool = conn
            .query_row(
                "SELECT COUNT(*) FROM pragma_table_info('api_tokens') WHERE name = ?1",
                [name],
                |r| r.get::<_, i64>(0),
            )
            .map_err(backend)?
            > 0;
        if !have {
            conn.execute_batch(&format!("ALTER TABLE api_tokens ADD COLUMN {name} {ty}"))
                .map_err(backend)?;
        }
    }
    Ok(())
}

const WS_COLUMNS: &str = "id, owner_id, instance_name, zone, image_tag, machine_type, status, \
    status_reason, created_at, updated_at, last_connected_at, metadata, last_active_at, \
    keep_awake_until, idle, sharing, name";

fn row_to_workspace(row: &rusqlite::Row<'_>) -> rusqlite::Result<Workspace> {
    let conv = |i: usize, e: String| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e.into())
    };
    let id: String = row.get(0)?;
    let status: String = row.get(6)?;
    let metadata: String = row.get(11)?;
    let idle: String = row.get(14)?;
    let sharing: String = row.get(15)?;
    Ok(Workspace {
        id: Uuid::parse_str(&id).map_err(|e| conv(0, e.to_string()))?,
        owner_id: row.get(1)?,
        instance_name: row.get(2)?,
        zone: row.get(3)?,
        image_tag: row.get(4)?,
        machine_type: row.get(5)?,
        status: Status::parse(&status).ok_or_else(|| conv(6, format!("status {status}")))?,
        status_reason: row.get(7)?,
        created_at: row.get(8)?,
        updated_at: row.get(9)?,
        last_connected_at: row.get(10)?,
        metadata: serde_json::from_str::<Metadata>(&metadata)
            .map_err(|e| conv(11, e.to_string()))?,
        last_active_at: row.get(12)?,
        keep_awake_until: row.get(13)?,
        idle: serde_json::from_str::<IdlePolicy>(&idle).map_err(|e| conv(14, e.to_string()))?,
        sharing: serde_json::from_str(&sharing).map_err(|e| conv(15, e.to_string()))?,
        name: row.get(16)?,
    })
}

fn get_ws(conn: &Connection, id: Uuid) -> Result<Workspace, StoreError> {
    // Every API request reads its workspace: the statement is parsed once per connection.
    conn.prepare_cached(&format!(
        "SELECT {WS_COLUMNS} FROM workspaces WHERE id = ?1"
    ))
    .and_then(|mut s| s.query_row(params![id.to_string()], row_to_workspace))
    .optional()
    .map_err(backend)?
    .ok_or(StoreError::NotFound)
}

fn find_by_name(
    conn: &Connection,
    owner_id: &str,
    name: &str,
) -> Result<Option<Workspace>, StoreError> {
    conn.query_row(
        &format!("SELECT {WS_COLUMNS} FROM workspaces WHERE owner_id = ?1 AND name = ?2"),
        params![owner_id, name],
        row_to_workspace,
    )
    .optional()
    .map_err(backend)
}

/// A `replicas` row: `id, peer_addr, expires_at`.
fn row_to_replica(r: &rusqlite::Row<'_>) -> rusqlite::Result<ReplicaRecord> {
    Ok(ReplicaRecord {
        id: r.get(0)?,
        peer_addr: r.get(1)?,
        expires_at: r.get(2)?,
    })
}

/// How many workspaces the owner has, and how many of them run.
fn count_ws(conn: &Connection, owner: &str) -> Result<(usize, usize), StoreError> {
    conn.query_row(
        "SELECT COUNT(*), COALESCE(SUM(status IN ('PROVISIONING', 'READY', 'STARTING')), 0) \
         FROM workspaces WHERE owner_id = ?1",
        params![owner],
        |r| Ok((r.get::<_, i64>(0)? as usize, r.get::<_, i64>(1)? as usize)),
    )
    .map_err(backend)
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert_workspace(&self, ws: &Workspace, limits: Limits) -> Result<(), StoreError> {
        let ws = ws.clone();
        self.with(move |conn| {
            // One write transaction for the count and the insert: other processes on the
            // same file wait for it (BEGIN IMMEDIATE), so no two creates count the same rows.
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(backend)?;
            if get_ws(&tx, ws.id).is_ok() {
                return Err(StoreError::AlreadyExists);
            }
            let (total, running) = count_ws(&tx, &ws.owner_id)?;
            limits.admit(total, running)?;
            if !ws.name.is_empty() && find_by_name(&tx, &ws.owner_id, &ws.name)?.is_some() {
                return Err(StoreError::NameTaken(ws.name.clone()));
            }
            let metadata = serde_json::to_string(&ws.metadata).map_err(backend)?;
            let idle = serde_json::to_string(&ws.idle).map_err(backend)?;
            let sharing = serde_json::to_string(&ws.sharing).map_err(backend)?;
            let res = tx.execute(
                &format!("INSERT INTO workspaces ({WS_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)"),
                params![
                    ws.id.to_string(),
                    ws.owner_id,
                    ws.instance_name,
                    ws.zone,
                    ws.image_tag,
                    ws.machine_type,
                    ws.status.as_str(),
                    ws.status_reason,
                    ws.created_at,
                    ws.updated_at,
                    ws.last_connected_at,
                    metadata,
                    ws.last_active_at,
                    ws.keep_awake_until,
                    idle,
                    sharing,
                    ws.name,
                ],
            );
            match res {
                Ok(_) => tx.commit().map_err(backend),
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    Err(StoreError::AlreadyExists)
                }
                Err(e) => Err(backend(e)),
            }
        })
        .await
    }

    async fn get_workspace(&self, id: Uuid) -> Result<Workspace, StoreError> {
        self.lookup(move |conn| get_ws(conn, id)).await
    }

    async fn find_workspace_by_name(
        &self,
        owner_id: &str,
        name: &str,
    ) -> Result<Workspace, StoreError> {
        let (owner, name) = (owner_id.to_owned(), name.to_owned());
        self.lookup(move |conn| find_by_name(conn, &owner, &name)?.ok_or(StoreError::NotFound))
            .await
    }

    async fn list_workspaces(&self, owner_id: Option<&str>) -> Result<Vec<Workspace>, StoreError> {
        let owner = owner_id.map(str::to_owned);
        self.with(move |conn| {
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT {WS_COLUMNS} FROM workspaces WHERE (?1 IS NULL OR owner_id = ?1) \
                     ORDER BY created_at DESC, id"
                ))
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![owner], row_to_workspace)
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
    }

    async fn count_workspaces(&self, owner_id: &str) -> Result<(usize, usize), StoreError> {
        let owner = owner_id.to_owned();
        self.with(move |conn| count_ws(conn, &owner)).await
    }

    async fn transition(
        &self,
        id: Uuid,
        from: &[Status],
        to: Status,
        reason: Option<&str>,
    ) -> Result<Workspace, StoreError> {
        let from = from.to_vec();
        let reason = reason.map(str::to_owned);
        self.with(move |conn| {
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(backend)?;
            let current = get_ws(&tx, id)?;
            if !from.contains(&current.status) {
                return Err(StoreError::Conflict {
                    current: current.status,
                });
            }
            let now = crate::base::workspace::now_ms();
            tx.execute(
                "UPDATE workspaces SET status = ?2, status_reason = ?3, updated_at = ?4 WHERE id = ?1",
                params![id.to_string(), to.as_str(), reason, now],
            )
            .map_err(backend)?;
            let updated = get_ws(&tx, id)?;
            tx.commit().map_err(backend)?;
            Ok(updated)
        })
        .await
    }

    async fn touch(
        &self,
        id: Uuid,
        connected_at: Option<i64>,
        active_at: Option<i64>,
    ) -> Result<(), StoreError> {
        self.with(move |conn| {
            let n = conn
                .execute(
                    "UPDATE workspaces SET \
                     last_connected_at = MAX(COALESCE(last_connected_at, ?2), COALESCE(?2, last_connected_at)), \
                     last_active_at = MAX(COALESCE(last_active_at, ?3), COALESCE(?3, last_active_at)) \
                     WHERE id = ?1",
                    params![id.to_string(), connected_at, active_at],
                )
                .map_err(backend)?;
            if n == 0 {
                return Err(StoreError::NotFound);
            }
            Ok(())
        })
        .await
    }

    async fn set_keep_awake(&self, id: Uuid, until: Option<i64>) -> Result<Workspace, StoreError> {
        self.with(move |conn| {
            let tx = conn.transaction().map_err(backend)?;
            let n = tx
                .execute(
                    "UPDATE workspaces SET keep_awake_until = ?2 WHERE id = ?1",
                    params![id.to_string(), until],
                )
                .map_err(backend)?;
            if n == 0 {
                return Err(StoreError::NotFound);
            }
            let ws = get_ws(&tx, id)?;
            tx.commit().map_err(backend)?;
            Ok(ws)
        })
        .await
    }

    async fn update_sharing(
        &self,
        id: Uuid,
        change: crate::base::workspace::SharingChange,
        now: i64,
    ) -> Result<Workspace, StoreError> {
        self.with(move |conn| {
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(backend)?;
            let mut ws = get_ws(&tx, id)?;
            ws.sharing
                .apply(&change, now)
                .map_err(|_| StoreError::NotFound)?;
            tx.execute(
                "UPDATE workspaces SET sharing = ?2 WHERE id = ?1",
                params![
                    id.to_string(),
                    serde_json::to_string(&ws.sharing).map_err(backend)?
                ],
            )
            .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(ws)
        })
        .await
    }

    async fn delete_workspace(&self, id: Uuid) -> Result<(), StoreError> {
        self.with(move |conn| {
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(backend)?;
            let current = get_ws(&tx, id)?;
            if current.status != Status::Deleting {
                return Err(StoreError::Conflict {
                    current: current.status,
                });
            }
            let id = id.to_string();
            tx.execute("DELETE FROM workspaces WHERE id = ?1", params![id])
                .map_err(backend)?;
            tx.execute(
                "DELETE FROM enrollment_tokens WHERE workspace_id = ?1",
                params![id],
            )
            .map_err(backend)?;
            tx.execute(
                "DELETE FROM agent_certs WHERE workspace_id = ?1",
                params![id],
            )
            .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn insert_enrollment_token(
        &self,
        token_hash: &str,
        workspace_id: Uuid,
        expires_at_ms: i64,
    ) -> Result<(), StoreError> {
        let token_hash = token_hash.to_owned();
        self.with(move |conn| {
            conn.execute(
                "INSERT INTO enrollment_tokens (token_hash, workspace_id, expires_at) VALUES (?1, ?2, ?3)",
                params![token_hash, workspace_id.to_string(), expires_at_ms],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn redeem_enrollment_token(
        &self,
        token_hash: &str,
        key_fingerprint: &str,
        now_ms: i64,
    ) -> Result<Result<Uuid, TokenRejection>, StoreError> {
        let token_hash = token_hash.to_owned();
        let key_fingerprint = key_fingerprint.to_owned();
        self.with(move |conn| {
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(backend)?;
            let row: Option<(String, i64, Option<String>)> = tx
                .query_row(
                    "SELECT workspace_id, expires_at, used_by FROM enrollment_tokens WHERE token_hash = ?1",
                    params![token_hash],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()
                .map_err(backend)?;
            let Some((workspace_id, expires_at, used_by)) = row else {
                return Ok(Err(TokenRejection::Unknown));
            };
            if now_ms >= expires_at {
                let id = Uuid::parse_str(&workspace_id).map_err(backend)?;
                return Ok(Err(TokenRejection::Expired(id)));
            }
            match used_by {
                Some(by) if by != key_fingerprint => return Ok(Err(TokenRejection::Used)),
                Some(_) => {}
                None => {
                    tx.execute(
                        "UPDATE enrollment_tokens SET used_at = ?2, used_by = ?3 WHERE token_hash = ?1",
                        params![token_hash, now_ms, key_fingerprint],
                    )
                    .map_err(backend)?;
                }
            }
            tx.commit().map_err(backend)?;
            Uuid::parse_str(&workspace_id).map(Ok).map_err(backend)
        })
        .await
    }

    async fn put_agent_cert(
        &self,
        workspace_id: Uuid,
        fingerprint: &str,
    ) -> Result<(), StoreError> {
        let fingerprint = fingerprint.to_owned();
        self.with(move |conn| {
            conn.execute(
                "INSERT INTO agent_certs (workspace_id, fingerprint, issued_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT(workspace_id) DO UPDATE SET fingerprint = excluded.fingerprint, issued_at = excluded.issued_at",
                params![workspace_id.to_string(), fingerprint, crate::base::workspace::now_ms()],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn agent_cert(&self, workspace_id: Uuid) -> Result<Option<String>, StoreError> {
        self.with(move |conn| {
            conn.query_row(
                "SELECT fingerprint FROM agent_certs WHERE workspace_id = ?1",
                params![workspace_id.to_string()],
                |r| r.get(0),
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn insert_api_token(&self, token_hash: &str, token: &ApiToken) -> Result<(), StoreError> {
        let token_hash = token_hash.to_owned();
        let token = token.clone();
        let service = token
            .service
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(backend)?;
        self.with(move |conn| {
            conn.execute(
                "INSERT INTO api_tokens (token_hash, owner_id, name, expires_at, email, service) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    token_hash,
                    token.owner_id,
                    token.name,
                    token.expires_at,
                    token.email,
                    service
                ],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn find_api_token(&self, token_hash: &str) -> Result<Option<ApiToken>, StoreError> {
        let token_hash = token_hash.to_owned();
        self.lookup(move |conn| {
            conn.prepare_cached(
                "SELECT owner_id, name, expires_at, email, service FROM api_tokens \
                 WHERE token_hash = ?1",
            )
            .and_then(|mut s| s.query_row(params![token_hash], |r| token_row(r, 0)))
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn list_api_tokens(&self, owner_id: &str) -> Result<Vec<(String, ApiToken)>, StoreError> {
        let owner = owner_id.to_owned();
        self.with(move |conn| {
            let mut stmt = conn
                .prepare(
                    "SELECT token_hash, owner_id, name, expires_at, email, service \
                     FROM api_tokens WHERE owner_id = ?1 ORDER BY name, token_hash",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![owner], |r| Ok((r.get(0)?, token_row(r, 1)?)))
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
    }

    async fn delete_api_token(&self, token_hash: &str) -> Result<(), StoreError> {
        let token_hash = token_hash.to_owned();
        self.with(move |conn| {
            let n = conn
                .execute(
                    "DELETE FROM api_tokens WHERE token_hash = ?1",
                    params![token_hash],
                )
                .map_err(backend)?;
            if n == 0 {
                return Err(StoreError::NotFound);
            }
            Ok(())
        })
        .await
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now: i64,
        until: i64,
    ) -> Result<bool, StoreError> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        self.with(move |conn| {
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(backend)?;
            let current: Option<(String, i64)> = tx
                .query_row(
                    "SELECT holder, until FROM leases WHERE name = ?1",
                    params![name],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(backend)?;
            if current.is_some_and(|(h, u)| h != holder && u > now) {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO leases (name, holder, until) VALUES (?1, ?2, ?3) \
                 ON CONFLICT(name) DO UPDATE SET holder = ?2, until = ?3",
                params![name, holder, until],
            )
            .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(true)
        })
        .await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        self.with(move |conn| {
            conn.execute(
                "DELETE FROM leases WHERE name = ?1 AND holder = ?2",
                params![name, holder],
            )
            .map(|_| ())
            .map_err(backend)
        })
        .await
    }

    async fn put_grant(
        &self,
        kind: &str,
        key: &str,
        payload: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        let (kind, key, payload) = (kind.to_owned(), key.to_owned(), payload.to_owned());
        self.with(move |conn| {
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(backend)?;
            // An expired grant under the same key is gone.
            tx.execute(
                "DELETE FROM grants WHERE kind = ?1 AND key = ?2 AND expires_at <= ?3",
                params![kind, key, now],
            )
            .map_err(backend)?;
            match tx.execute(
                "INSERT INTO grants (kind, key, payload, expires_at) VALUES (?1, ?2, ?3, ?4)",
                params![kind, key, payload, expires_at],
            ) {
                Ok(_) => tx.commit().map_err(backend),
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    Err(StoreError::AlreadyExists)
                }
                Err(e) => Err(backend(e)),
            }
        })
        .await
    }

    async fn get_grant(
        &self,
        kind: &str,
        key: &str,
        now: i64,
    ) -> Result<Option<String>, StoreError> {
        let (kind, key) = (kind.to_owned(), key.to_owned());
        self.with(move |conn| {
            conn.query_row(
                "SELECT payload FROM grants WHERE kind = ?1 AND key = ?2 AND expires_at > ?3",
                params![kind, key, now],
                |r| r.get(0),
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn swap_grant(
        &self,
        kind: &str,
        key: &str,
        expected: &str,
        payload: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let (kind, key) = (kind.to_owned(), key.to_owned());
        let (expected, payload) = (expected.to_owned(), payload.to_owned());
        self.with(move |conn| {
            conn.execute(
                "UPDATE grants SET payload = ?4 WHERE kind = ?1 AND key = ?2 AND payload = ?3 \
                 AND expires_at > ?5",
                params![kind, key, expected, payload, now],
            )
            .map(|n| n == 1)
            .map_err(backend)
        })
        .await
    }

    async fn take_grant(
        &self,
        kind: &str,
        key: &str,
        expected: Option<&str>,
        now: i64,
    ) -> Result<Option<String>, StoreError> {
        let (kind, key) = (kind.to_owned(), key.to_owned());
        let expected = expected.map(str::to_owned);
        self.with(move |conn| {
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(backend)?;
            let payload: Option<String> = tx
                .query_row(
                    "SELECT payload FROM grants WHERE kind = ?1 AND key = ?2 AND expires_at > ?3",
                    params![kind, key, now],
                    |r| r.get(0),
                )
                .optional()
                .map_err(backend)?;
            let Some(payload) = payload.filter(|p| expected.as_ref().is_none_or(|e| e == p)) else {
                return Ok(None);
            };
            tx.execute(
                "DELETE FROM grants WHERE kind = ?1 AND key = ?2",
                params![kind, key],
            )
            .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(Some(payload))
        })
        .await
    }

    async fn purge_grants(&self, now: i64) -> Result<usize, StoreError> {
        self.with(move |conn| {
            conn.execute("DELETE FROM grants WHERE expires_at <= ?1", params![now])
                .map_err(backend)
        })
        .await
    }

    async fn put_replica(&self, replica: &ReplicaRecord) -> Result<(), StoreError> {
        let r = replica.clone();
        self.with(move |conn| {
            conn.execute(
                "INSERT INTO replicas (id, peer_addr, expires_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT(id) DO UPDATE SET peer_addr = ?2, expires_at = ?3",
                params![r.id, r.peer_addr, r.expires_at],
            )
            .map(|_| ())
            .map_err(backend)
        })
        .await
    }

    async fn get_replica(&self, id: &str, now: i64) -> Result<Option<ReplicaRecord>, StoreError> {
        let id = id.to_owned();
        self.with(move |conn| {
            conn.query_row(
                "SELECT id, peer_addr, expires_at FROM replicas WHERE id = ?1 AND expires_at > ?2",
                params![id, now],
                row_to_replica,
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn list_replicas(&self, now: i64) -> Result<Vec<ReplicaRecord>, StoreError> {
        self.with(move |conn| {
            let mut stmt = conn
                .prepare("SELECT id, peer_addr, expires_at FROM replicas WHERE expires_at > ?1")
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![now], row_to_replica)
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
    }

    async fn delete_replica(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.with(move |conn| {
            conn.execute("DELETE FROM replicas WHERE id = ?1", params![id])
                .map(|_| ())
                .map_err(backend)
        })
        .await
    }

    async fn put_agent_route(
        &self,
        workspace_id: Uuid,
        route: &AgentRoute,
    ) -> Result<bool, StoreError> {
        let route = route.clone();
        self.with(move |conn| {
            conn.execute(
                "INSERT INTO agent_routes (workspace_id, replica_id, epoch) VALUES (?1, ?2, ?3) \
                 ON CONFLICT(workspace_id) DO UPDATE SET replica_id = ?2, epoch = ?3 \
                 WHERE agent_routes.epoch < ?3",
                params![workspace_id.to_string(), route.replica_id, route.epoch],
            )
            .map(|changed| changed == 1)
            .map_err(backend)
        })
        .await
    }

    async fn agent_route(&self, workspace_id: Uuid) -> Result<Option<AgentRoute>, StoreError> {
        self.with(move |conn| {
            conn.query_row(
                "SELECT replica_id, epoch FROM agent_routes WHERE workspace_id = ?1",
                params![workspace_id.to_string()],
                |r| {
                    Ok(AgentRoute {
                        replica_id: r.get(0)?,
                        epoch: r.get(1)?,
                    })
                },
            )
            .optional()
            .map_err(backend)
        })
        .await
    }

    async fn clear_agent_route(
        &self,
        workspace_id: Uuid,
        route: &AgentRoute,
    ) -> Result<(), StoreError> {
        let route = route.clone();
        self.with(move |conn| {
            conn.execute(
                "DELETE FROM agent_routes WHERE workspace_id = ?1 AND replica_id = ?2 AND epoch = ?3",
                params![workspace_id.to_string(), route.replica_id, route.epoch],
            )
            .map(|_| ())
            .map_err(backend)
        })
        .await
    }

    async fn get_profile(&self, owner_id: &str) -> Result<Profile, StoreError> {
        let owner = owner_id.to_owned();
        self.with(move |conn| {
            let data: Option<String> = conn
                .query_row(
                    "SELECT data FROM profiles WHERE owner_id = ?1",
                    params![owner],
                    |r| r.get(0),
                )
                .optional()
                .map_err(backend)?;
            match data {
                Some(data) => serde_json::from_str(&data).map_err(backend),
                None => Ok(Profile::default()),
            }
        })
        .await
    }

    async fn put_profile(&self, owner_id: &str, profile: &Profile) -> Result<bool, StoreError> {
        let owner = owner_id.to_owned();
        let data = serde_json::to_string(profile).map_err(backend)?;
        let version = profile.version;
        self.with(move |conn| {
            let changed = if version == 1 {
                conn.execute(
                    "INSERT OR IGNORE INTO profiles (owner_id, version, data) VALUES (?1, 1, ?2)",
                    params![owner, data],
                )
            } else {
                conn.execute(
                    "UPDATE profiles SET version = ?2, data = ?3 \
                     WHERE owner_id = ?1 AND version = ?2 - 1",
                    params![owner, version, data],
                )
            }
            .map_err(backend)?;
            Ok(changed == 1)
        })
        .await
    }

    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        let data = serde_json::to_string(entry).map_err(backend)?;
        let e = entry.clone();
        self.with(move |conn| {
            let added = conn
                .execute(
                    "INSERT OR IGNORE INTO audit (id, at, workspace_id, actor, data) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        e.id,
                        e.at,
                        e.workspace_id.map(|id| id.to_string()),
                        e.actor,
                        data
                    ],
                )
                .map_err(backend)?;
            if added == 0 {
                return Err(StoreError::AlreadyExists);
            }
            Ok(())
        })
        .await
    }

    async fn list_audit(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        let (low, high) = query.id_range();
        let mut sql = String::from("SELECT data FROM audit WHERE 1 = 1");
        let mut args: Vec<String> = Vec::new();
        let mut filter = |clause: &str, value: String| {
            args.push(value);
            sql.push_str(&format!(" AND {clause} ?{}", args.len()));
        };
        if let Some(id) = query.workspace_id {
            filter("workspace_id =", id.to_string());
        }
        if let Some(actor) = &query.actor {
            filter("actor =", actor.clone());
        }
        if let Some(low) = low {
            filter("id >=", low);
        }
        if let Some(high) = high {
            filter("id <", high);
        }
        sql.push_str(&format!(" ORDER BY id DESC LIMIT {}", query.limit));
        self.with(move |conn| {
            let mut stmt = conn.prepare(&sql).map_err(backend)?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(args.iter()), |r| {
                    r.get::<_, String>(0)
                })
                .map_err(backend)?;
            rows.map(|row| serde_json::from_str(&row.map_err(backend)?).map_err(backend))
                .collect()
        })
        .await
    }

    async fn purge_audit(&self, before: i64, max: usize) -> Result<usize, StoreError> {
        let high = AuditEntry::id_at(before);
        self.with(move |conn| {
            conn.execute(
                "DELETE FROM audit WHERE id IN \
                 (SELECT id FROM audit WHERE id < ?1 ORDER BY id LIMIT ?2)",
                params![high, i64::try_from(max).unwrap_or(i64::MAX)],
            )
            .map_err(backend)
        })
        .await
    }
}
