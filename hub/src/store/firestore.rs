//! The production store: Cloud Firestore (the `firestore` crate, gRPC, rustls with
//! aws-lc-rs). Tests run it against the real Firestore emulator.
//!
//! Collections: `workspaces/{id}` (the [`Workspace`] fields as the design names them),
//! `enrollment_tokens/{sha256}`, `agent_certs/{workspace_id}`, `api_tokens/{sha256}`,
//! `leases/{name}`, `replicas/{replica id}`, `agent_routes/{workspace_id}`,
//! `audit/{entry id}` (the [`AuditEntry`] fields; listed by `id` with equality filters on
//! `workspace_id` and `actor`: the composite indexes are in the terraform module),
//! `owners/{sha256 of the owner id}` (a create counter: every create of an owner commits
//! it together with the new workspace, under an update-time precondition, which makes the
//! quota count and the insert one atomic step).
//! Every read-modify-write (status transitions, touches, token redemption, deletes) is a
//! conditional write with an update-time precondition: a write that loses to a concurrent
//! one fails on the server and is retried here with a fresh read, so no update is ever lost
//! and no lock is held (Firestore's transactions lock pessimistically and time out under
//! the contention the conformance suite creates).

use super::{
    AgentRoute, ApiToken, AuditEntry, AuditQuery, Limits, Profile, ReplicaRecord, Store,
    StoreError, TokenRejection,
};
use crate::base::workspace::{Status, Workspace};
use async_trait::async_trait;
use firestore::errors::FirestoreError;
use firestore::{FirestoreDb, FirestoreDbOptions, FirestoreWritePrecondition};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use uuid::Uuid;

const WORKSPACES: &str = "workspaces";
const ENROLLMENT_TOKENS: &str = "enrollment_tokens";
const AGENT_CERTS: &str = "agent_certs";
const API_TOKENS: &str = "api_tokens";
const OWNERS: &str = "owners";
const LEASES: &str = "leases";
const REPLICAS: &str = "replicas";
const GRANTS: &str = "grants";
const PROFILES: &str = "profiles";
const AGENT_ROUTES: &str = "agent_routes";
const AUDIT: &str = "audit";

/// How often a conditional write that lost to a concurrent writer is tried again.
const MAX_ATTEMPTS: u32 = 30;

/// The same for an owner's create counter: each round lets one of the owner's concurrent
/// creates through, so this bounds how many may race (the rest see the quota full).
const MAX_CREATE_ATTEMPTS: u32 = 100;

/// Where the Firestore store lives.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirestoreConfig {
    /// The Google Cloud project.
    pub project: String,
    /// `host:port` of an emulator (else `FIRESTORE_EMULATOR_HOST`); without either, the real
    /// Firestore with Application Default Credentials.
    #[serde(default)]
    pub emulator_host: Option<String>,
}

#[derive(Clone)]
pub struct FirestoreStore {
    db: FirestoreDb,
}

impl std::fmt::Debug for FirestoreStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirestoreStore").finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct EnrollmentTokenDoc {
    workspace_id: Uuid,
    expires_at: i64,
    used_at: Option<i64>,
    used_by: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct AgentCertDoc {
    fingerprint: String,
    issued_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct GrantDoc {
    kind: String,
    payload: String,
    expires_at: i64,
}

/// A grant's document id: its kind and key (a hash or a code the hub made, `[A-Za-z0-9-]`).
fn grant_id(kind: &str, key: &str) -> String {
    format!("{kind}.{key}")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ReplicaDoc {
    peer_addr: String,
    expires_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct AgentRouteDoc {
    replica_id: String,
    epoch: i64,
}

/// A lease: who holds it, until when (ms since the epoch).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LeaseDoc {
    holder: String,
    until: i64,
}

/// Per owner: how many workspaces were ever created. Its update time orders creates.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct OwnerDoc {
    owner_id: String,
    creates: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ApiTokenDoc {
    owner_id: String,
    name: String,
    expires_at: Option<i64>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    service: Option<super::ServiceGrant>,
}

impl From<ApiTokenDoc> for ApiToken {
    fn from(d: ApiTokenDoc) -> Self {
        ApiToken {
            owner_id: d.owner_id,
            name: d.name,
            expires_at: d.expires_at,
            email: d.email,
            service: d.service,
        }
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// What a read-modify-write decides after reading the current document.
enum Change<D, T> {
    /// Write this document (only if nobody changed it since the read), then return.
    Write(D, T),
    /// Delete the document (only if nobody changed it since the read), then return.
    Delete(T),
    /// Leave it alone and return (nothing to do, or a refusal).
    Keep(T),
}

/// Before retry `round` of a write that lost a race (none before the first): a few
/// milliseconds, growing, with jitter so the racers spread out.
async fn retry_pause(round: u32) {
    if round > 0 {
        let jitter = rand::random::<u64>() % 10;
        tokio::time::sleep(Duration::from_millis(u64::from(round.min(10)) + jitter)).await;
    }
}

/// A document's id: the last part of its resource name.
fn doc_id(doc: &firestore::FirestoreDocument) -> String {
    doc.name.rsplit('/').next().unwrap_or_default().to_owned()
}

/// A write whose precondition failed: somebody else wrote first.
fn lost_race(e: &FirestoreError) -> bool {
    match e {
        FirestoreError::DataConflictError(_) | FirestoreError::DataNotFoundError(_) => true,
        FirestoreError::DatabaseError(e) => {
            matches!(
                e.public.code.as_str(),
                "FailedPrecondition" | "Aborted" | "AlreadyExists" | "NotFound"
            )
        }
        _ => false,
    }
}

impl FirestoreStore {
    /// The owner's workspace named `name`, if any.
    async fn by_name(&self, owner_id: &str, name: &str) -> Result<Option<Workspace>, StoreError> {
        let found: Vec<Workspace> = self
            .db
            .fluent()
            .select()
            .from(WORKSPACES)
            .filter(|q| q.for_all([q.field("owner_id").eq(owner_id), q.field("name").eq(name)]))
            .limit(1)
            .obj()
            .query()
            .await
            .map_err(backend)?;
        Ok(found.into_iter().next())
    }

    pub async fn connect(config: &FirestoreConfig) -> Result<Self, StoreError> {
        let options = FirestoreDbOptions::new(config.project.clone())
            .with_request_timeout(Duration::from_secs(30));
        let emulator = config
            .emulator_host
            .clone()
            .or_else(|| std::env::var("FIRESTORE_EMULATOR_HOST").ok());
        let db = match &emulator {
            Some(host) => {
                let anonymous =
                    firestore::gcloud_sdk::google_cloud_auth::credentials::anonymous::Builder::new(
                    )
                    .build();
                FirestoreDb::with_options_auth(
                    options.with_firebase_api_url(format!("http://{host}")),
                    anonymous,
                )
                .await
            }
            None => FirestoreDb::with_options(options).await,
        }
        .map_err(backend)?;
        Ok(Self { db })
    }

    /// An optimistic read-modify-write of one document: read it with its update time, let
    /// `decide` choose, and write with the precondition that the document is unchanged
    /// (or, if it did not exist, still does not). A write that loses to a concurrent one is
    /// retried with a fresh read, so no update is lost and no lock is held.
    async fn modify<D, T>(
        &self,
        collection: &str,
        id: &str,
        decide: impl Fn(Option<D>) -> Result<Change<D, T>, StoreError>,
    ) -> Result<T, StoreError>
    where
        D: Serialize + for<'de> Deserialize<'de> + Send + Sync,
    {
        for round in 0..MAX_ATTEMPTS {
            retry_pause(round).await;
            let (current, precondition) = self.read_versioned::<D>(collection, id).await?;
            let result = match decide(current)? {
                Change::Keep(value) => return Ok(value),
                Change::Write(new, value) => self
                    .db
                    .fluent()
                    .update()
                    .in_col(collection)
                    .precondition(precondition)
                    .document_id(id)
                    .object(&new)
                    .execute::<D>()
                    .await
                    .map(|_| value),
                Change::Delete(value) => self
                    .db
                    .fluent()
                    .delete()
                    .from(collection)
                    .precondition(precondition)
                    .document_id(id)
                    .execute()
                    .await
                    .map(|_| value),
            };
            match result {
                Ok(value) => return Ok(value),
                Err(e) if lost_race(&e) => continue,
                Err(e) => return Err(backend(e)),
            }
        }
        Err(backend(format!(
            "{collection}/{id} kept changing under {MAX_ATTEMPTS} attempts to update it"
        )))
    }

    /// A document with the precondition that it is still the same when written (its update
    /// time), or, if there is none, that there still is none.
    async fn read_versioned<D>(
        &self,
        collection: &str,
        id: &str,
    ) -> Result<(Option<D>, FirestoreWritePrecondition), StoreError>
    where
        D: for<'de> Deserialize<'de>,
    {
        let doc: Option<firestore::FirestoreDocument> = self
            .db
            .fluent()
            .select()
            .by_id_in(collection)
            .one(id)
            .await
            .map_err(backend)?;
        let Some(doc) = doc else {
            return Ok((None, FirestoreWritePrecondition::Exists(false)));
        };
        let updated = doc
            .update_time
            .ok_or_else(|| backend("document without an update time"))?;
        let updated = firestore::timestamp_utils::from_timestamp(updated).map_err(backend)?;
        Ok((
            Some(FirestoreDb::deserialize_doc_to::<D>(&doc).map_err(backend)?),
            FirestoreWritePrecondition::UpdateTime(updated),
        ))
    }

    /// Creates a document; `AlreadyExists` if the id is taken.
    async fn insert<D>(&self, collection: &str, id: &str, doc: &D) -> Result<(), StoreError>
    where
        D: Serialize + for<'de> Deserialize<'de> + Send + Sync,
    {
        let res: Result<D, FirestoreError> = self
            .db
            .fluent()
            .insert()
            .into(collection)
            .document_id(id)
            .object(doc)
            .execute()
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(FirestoreError::DataConflictError(_)) => Err(StoreError::AlreadyExists),
            Err(e) => Err(backend(e)),
        }
    }

    async fn get<D>(&self, collection: &str, id: &str) -> Result<Option<D>, StoreError>
    where
        D: for<'de> Deserialize<'de> + Send,
    {
        self.db
            .fluent()
            .select()
            .by_id_in(collection)
            .obj()
            .one(id)
            .await
            .map_err(backend)
    }

    /// A read-modify-write of one workspace; a missing one is `NotFound`.
    async fn modify_workspace<T>(
        &self,
        id: Uuid,
        decide: impl Fn(Workspace) -> Result<Change<Workspace, T>, StoreError>,
    ) -> Result<T, StoreError> {
        self.modify(WORKSPACES, &id.to_string(), |ws: Option<Workspace>| {
            decide(ws.ok_or(StoreError::NotFound)?)
        })
        .await
    }
}

#[async_trait]
impl Store for FirestoreStore {
    async fn insert_workspace(&self, ws: &Workspace, limits: Limits) -> Result<(), StoreError> {
        let id = ws.id.to_string();
        if limits == Limits::NONE && ws.name.is_empty() {
            return self.insert(WORKSPACES, &id, ws).await;
        }
        // Creates of one owner serialize on the owner's counter (its update time is the
        // commit's precondition), so the quota count and the name check below both hold
        // when the commit succeeds.
        let owner_key = crate::base::ca::fingerprint(ws.owner_id.as_bytes());
        for round in 0..MAX_CREATE_ATTEMPTS {
            retry_pause(round).await;
            // The owner's counter first: a create that commits after this read changes its
            // update time and fails our commit; one that committed before is in the count.
            let (owner, precondition) = self.read_versioned::<OwnerDoc>(OWNERS, &owner_key).await?;
            let creates = owner.map_or(0, |o| o.creates);
            let (total, running) = self.count_workspaces(&ws.owner_id).await?;
            let taken = match ws.name.as_str() {
                "" => false,
                name => self.by_name(&ws.owner_id, name).await?.is_some(),
            };
            let refused = limits
                .admit(total, running)
                .err()
                .or_else(|| taken.then(|| StoreError::NameTaken(ws.name.clone())));
            if let Some(refused) = refused {
                return match self.get::<Workspace>(WORKSPACES, &id).await? {
                    Some(_) => Err(StoreError::AlreadyExists),
                    None => Err(refused),
                };
            }
            let mut tx = self.db.begin_transaction().await.map_err(backend)?;
            self.db
                .fluent()
                .update()
                .in_col(OWNERS)
                .precondition(precondition)
                .document_id(&owner_key)
                .object(&OwnerDoc {
                    owner_id: ws.owner_id.clone(),
                    creates: creates + 1,
                })
                .add_to_transaction(&mut tx)
                .map_err(backend)?;
            self.db
                .fluent()
                .update()
                .in_col(WORKSPACES)
                .precondition(FirestoreWritePrecondition::Exists(false))
                .document_id(&id)
                .object(ws)
                .add_to_transaction(&mut tx)
                .map_err(backend)?;
            match tx.commit().await {
                Ok(_) => return Ok(()),
                Err(e) if lost_race(&e) => {
                    if self.get::<Workspace>(WORKSPACES, &id).await?.is_some() {
                        return Err(StoreError::AlreadyExists);
                    }
                }
                Err(e) => return Err(backend(e)),
            }
        }
        Err(backend(format!(
            "the create counter of {} kept changing under {MAX_CREATE_ATTEMPTS} attempts",
            ws.owner_id
        )))
    }

    async fn get_workspace(&self, id: Uuid) -> Result<Workspace, StoreError> {
        self.get(WORKSPACES, &id.to_string())
            .await?
            .ok_or(StoreError::NotFound)
    }

    async fn find_workspace_by_name(
        &self,
        owner_id: &str,
        name: &str,
    ) -> Result<Workspace, StoreError> {
        self.by_name(owner_id, name)
            .await?
            .ok_or(StoreError::NotFound)
    }

    async fn list_workspaces(&self, owner_id: Option<&str>) -> Result<Vec<Workspace>, StoreError> {
        let select = self.db.fluent().select().from(WORKSPACES);
        let mut list: Vec<Workspace> = match owner_id {
            Some(owner) => {
                select
                    .filter(|q| q.field("owner_id").eq(owner))
                    .obj()
                    .query()
                    .await
            }
            None => select.obj().query().await,
        }
        .map_err(backend)?;
        list.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(a.id.cmp(&b.id)));
        Ok(list)
    }

    async fn transition(
        &self,
        id: Uuid,
        from: &[Status],
        to: Status,
        reason: Option<&str>,
    ) -> Result<Workspace, StoreError> {
        self.modify_workspace(id, |mut ws| {
            if !from.contains(&ws.status) {
                return Err(StoreError::Conflict { current: ws.status });
            }
            ws.status = to;
            ws.status_reason = reason.map(str::to_owned);
            ws.updated_at = crate::base::workspace::now_ms();
            Ok(Change::Write(ws.clone(), ws))
        })
        .await
    }

    async fn touch(
        &self,
        id: Uuid,
        connected_at: Option<i64>,
        active_at: Option<i64>,
    ) -> Result<(), StoreError> {
        self.modify_workspace(id, |mut ws| {
            let connected = ws.last_connected_at.max(connected_at);
            let active = ws.last_active_at.max(active_at);
            if (connected, active) == (ws.last_connected_at, ws.last_active_at) {
                return Ok(Change::Keep(()));
            }
            ws.last_connected_at = connected;
            ws.last_active_at = active;
            Ok(Change::Write(ws, ()))
        })
        .await
    }

    async fn set_keep_awake(&self, id: Uuid, until: Option<i64>) -> Result<Workspace, StoreError> {
        self.modify_workspace(id, |mut ws| {
            ws.keep_awake_until = until;
            Ok(Change::Write(ws.clone(), ws))
        })
        .await
    }

    async fn update_sharing(
        &self,
        id: Uuid,
        change: crate::base::workspace::SharingChange,
        now: i64,
    ) -> Result<Workspace, StoreError> {
        self.modify_workspace(id, |mut ws| {
            ws.sharing
                .apply(&change, now)
                .map_err(|_| StoreError::NotFound)?;
            Ok(Change::Write(ws.clone(), ws))
        })
        .await
    }

    async fn delete_workspace(&self, id: Uuid) -> Result<(), StoreError> {
        let ws = self.get_workspace(id).await?;
        if ws.status != Status::Deleting {
            return Err(StoreError::Conflict { current: ws.status });
        }
        // What hangs off the workspace goes first, so a crash in between leaves a record
        // still DELETING (which the reconciler finishes), never credentials without one.
        self.db
            .fluent()
            .delete()
            .from(AGENT_CERTS)
            .document_id(id.to_string())
            .execute()
            .await
            .map_err(backend)?;
        let tokens: Vec<firestore::FirestoreDocument> = self
            .db
            .fluent()
            .select()
            .from(ENROLLMENT_TOKENS)
            .filter(|q| q.field("workspace_id").eq(id.to_string()))
            .query()
            .await
            .map_err(backend)?;
        for token in tokens.iter().filter_map(|d| d.name.rsplit('/').next()) {
            self.db
                .fluent()
                .delete()
                .from(ENROLLMENT_TOKENS)
                .document_id(token)
                .execute()
                .await
                .map_err(backend)?;
        }
        self.modify_workspace(id, |ws| {
            if ws.status != Status::Deleting {
                return Err(StoreError::Conflict { current: ws.status });
            }
            Ok(Change::Delete(()))
        })
        .await
    }

    async fn insert_enrollment_token(
        &self,
        token_hash: &str,
        workspace_id: Uuid,
        expires_at_ms: i64,
    ) -> Result<(), StoreError> {
        let doc = EnrollmentTokenDoc {
            workspace_id,
            expires_at: expires_at_ms,
            used_at: None,
            used_by: None,
        };
        self.insert(ENROLLMENT_TOKENS, token_hash, &doc).await
    }

    async fn redeem_enrollment_token(
        &self,
        token_hash: &str,
        key_fingerprint: &str,
        now_ms: i64,
    ) -> Result<Result<Uuid, TokenRejection>, StoreError> {
        self.modify(
            ENROLLMENT_TOKENS,
            token_hash,
            |doc: Option<EnrollmentTokenDoc>| {
                let Some(mut doc) = doc else {
                    return Ok(Change::Keep(Err(TokenRejection::Unknown)));
                };
                if now_ms >= doc.expires_at {
                    return Ok(Change::Keep(Err(TokenRejection::Expired(doc.workspace_id))));
                }
                Ok(match &doc.used_by {
                    Some(by) if by != key_fingerprint => Change::Keep(Err(TokenRejection::Used)),
                    Some(_) => Change::Keep(Ok(doc.workspace_id)),
                    None => {
                        doc.used_at = Some(now_ms);
                        doc.used_by = Some(key_fingerprint.to_owned());
                        let id = doc.workspace_id;
                        Change::Write(doc, Ok(id))
                    }
                })
            },
        )
        .await
    }

    async fn put_agent_cert(
        &self,
        workspace_id: Uuid,
        fingerprint: &str,
    ) -> Result<(), StoreError> {
        let doc = AgentCertDoc {
            fingerprint: fingerprint.to_owned(),
            issued_at: crate::base::workspace::now_ms(),
        };
        let _: AgentCertDoc = self
            .db
            .fluent()
            .update()
            .in_col(AGENT_CERTS)
            .document_id(workspace_id.to_string())
            .object(&doc)
            .execute()
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn agent_cert(&self, workspace_id: Uuid) -> Result<Option<String>, StoreError> {
        let doc: Option<AgentCertDoc> = self.get(AGENT_CERTS, &workspace_id.to_string()).await?;
        Ok(doc.map(|d| d.fingerprint))
    }

    async fn insert_api_token(&self, token_hash: &str, token: &ApiToken) -> Result<(), StoreError> {
        let doc = ApiTokenDoc {
            owner_id: token.owner_id.clone(),
            name: token.name.clone(),
            expires_at: token.expires_at,
            email: token.email.clone(),
            service: token.service.clone(),
        };
        self.insert(API_TOKENS, token_hash, &doc).await
    }

    async fn find_api_token(&self, token_hash: &str) -> Result<Option<ApiToken>, StoreError> {
        let doc: Option<ApiTokenDoc> = self.get(API_TOKENS, token_hash).await?;
        Ok(doc.map(ApiToken::from))
    }

    async fn list_api_tokens(&self, owner_id: &str) -> Result<Vec<(String, ApiToken)>, StoreError> {
        let docs: Vec<firestore::FirestoreDocument> = self
            .db
            .fluent()
            .select()
            .from(API_TOKENS)
            .filter(|q| q.field("owner_id").eq(owner_id))
            .query()
            .await
            .map_err(backend)?;
        let mut out = Vec::with_capacity(docs.len());
        for doc in &docs {
            let hash = doc_id(doc);
            let d: ApiTokenDoc = FirestoreDb::deserialize_doc_to(doc).map_err(backend)?;
            out.push((hash, ApiToken::from(d)));
        }
        out.sort_by(|a, b| (&a.1.name, &a.0).cmp(&(&b.1.name, &b.0)));
        Ok(out)
    }

    async fn delete_api_token(&self, token_hash: &str) -> Result<(), StoreError> {
        match self
            .db
            .fluent()
            .delete()
            .from(API_TOKENS)
            .precondition(FirestoreWritePrecondition::Exists(true))
            .document_id(token_hash)
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(FirestoreError::DataNotFoundError(_)) => Err(StoreError::NotFound),
            Err(e) => Err(backend(e)),
        }
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now: i64,
        until: i64,
    ) -> Result<bool, StoreError> {
        self.modify(LEASES, name, |current: Option<LeaseDoc>| {
            Ok(match current {
                Some(lease) if lease.holder != holder && lease.until > now => Change::Keep(false),
                _ => Change::Write(
                    LeaseDoc {
                        holder: holder.to_owned(),
                        until,
                    },
                    true,
                ),
            })
        })
        .await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        self.modify(LEASES, name, |current: Option<LeaseDoc>| {
            Ok(match current {
                Some(lease) if lease.holder == holder => Change::Delete(()),
                _ => Change::Keep(()),
            })
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
        self.modify(
            GRANTS,
            &grant_id(kind, key),
            |current: Option<GrantDoc>| match current {
                Some(live) if live.expires_at > now => Err(StoreError::AlreadyExists),
                _ => Ok(Change::Write(
                    GrantDoc {
                        kind: kind.to_owned(),
                        payload: payload.to_owned(),
                        expires_at,
                    },
                    (),
                )),
            },
        )
        .await
    }

    async fn get_grant(
        &self,
        kind: &str,
        key: &str,
        now: i64,
    ) -> Result<Option<String>, StoreError> {
        Ok(self
            .get::<GrantDoc>(GRANTS, &grant_id(kind, key))
            .await?
            .filter(|g| g.expires_at > now)
            .map(|g| g.payload))
    }

    async fn swap_grant(
        &self,
        kind: &str,
        key: &str,
        expected: &str,
        payload: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.modify(GRANTS, &grant_id(kind, key), |current: Option<GrantDoc>| {
            Ok(match current {
                Some(g) if g.expires_at > now && g.payload == expected => Change::Write(
                    GrantDoc {
                        payload: payload.to_owned(),
                        ..g
                    },
                    true,
                ),
                _ => Change::Keep(false),
            })
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
        self.modify(GRANTS, &grant_id(kind, key), |current: Option<GrantDoc>| {
            Ok(match current {
                Some(g) if g.expires_at > now && expected.is_none_or(|e| e == g.payload) => {
                    Change::Delete(Some(g.payload))
                }
                _ => Change::Keep(None),
            })
        })
        .await
    }

    async fn purge_grants(&self, now: i64) -> Result<usize, StoreError> {
        let expired: Vec<firestore::FirestoreDocument> = self
            .db
            .fluent()
            .select()
            .from(GRANTS)
            .filter(|q| q.field("expires_at").less_than_or_equal(now))
            .query()
            .await
            .map_err(backend)?;
        let mut purged = 0;
        for doc in expired {
            let id = doc_id(&doc);
            let (current, precondition) = self.read_versioned::<GrantDoc>(GRANTS, &id).await?;
            if current.is_some_and(|g| g.expires_at <= now) {
                let deleted = self
                    .db
                    .fluent()
                    .delete()
                    .from(GRANTS)
                    .precondition(precondition)
                    .document_id(&id)
                    .execute()
                    .await;
                match deleted {
                    Ok(()) => purged += 1,
                    Err(e) if lost_race(&e) => {}
                    Err(e) => return Err(backend(e)),
                }
            }
        }
        Ok(purged)
    }

    async fn put_replica(&self, replica: &ReplicaRecord) -> Result<(), StoreError> {
        let doc = ReplicaDoc {
            peer_addr: replica.peer_addr.clone(),
            expires_at: replica.expires_at,
        };
        self.db
            .fluent()
            .update()
            .in_col(REPLICAS)
            .document_id(&replica.id)
            .object(&doc)
            .execute::<ReplicaDoc>()
            .await
            .map(|_| ())
            .map_err(backend)
    }

    async fn get_replica(&self, id: &str, now: i64) -> Result<Option<ReplicaRecord>, StoreError> {
        Ok(self
            .get::<ReplicaDoc>(REPLICAS, id)
            .await?
            .filter(|r| r.expires_at > now)
            .map(|r| ReplicaRecord {
                id: id.to_owned(),
                peer_addr: r.peer_addr,
                expires_at: r.expires_at,
            }))
    }

    async fn list_replicas(&self, now: i64) -> Result<Vec<ReplicaRecord>, StoreError> {
        let docs: Vec<firestore::FirestoreDocument> = self
            .db
            .fluent()
            .select()
            .from(REPLICAS)
            .query()
            .await
            .map_err(backend)?;
        let mut live = Vec::new();
        for doc in docs {
            let id = doc_id(&doc);
            let r = FirestoreDb::deserialize_doc_to::<ReplicaDoc>(&doc).map_err(backend)?;
            if r.expires_at > now {
                live.push(ReplicaRecord {
                    id,
                    peer_addr: r.peer_addr,
                    expires_at: r.expires_at,
                });
            }
        }
        Ok(live)
    }

    async fn delete_replica(&self, id: &str) -> Result<(), StoreError> {
        self.db
            .fluent()
            .delete()
            .from(REPLICAS)
            .document_id(id)
            .execute()
            .await
            .map_err(backend)
    }

    async fn put_agent_route(
        &self,
        workspace_id: Uuid,
        route: &AgentRoute,
    ) -> Result<bool, StoreError> {
        self.modify(
            AGENT_ROUTES,
            &workspace_id.to_string(),
            |current: Option<AgentRouteDoc>| {
                Ok(match current {
                    Some(newer) if newer.epoch >= route.epoch => Change::Keep(false),
                    _ => Change::Write(
                        AgentRouteDoc {
                            replica_id: route.replica_id.clone(),
                            epoch: route.epoch,
                        },
                        true,
                    ),
                })
            },
        )
        .await
    }

    async fn agent_route(&self, workspace_id: Uuid) -> Result<Option<AgentRoute>, StoreError> {
        Ok(self
            .get::<AgentRouteDoc>(AGENT_ROUTES, &workspace_id.to_string())
            .await?
            .map(|r| AgentRoute {
                replica_id: r.replica_id,
                epoch: r.epoch,
            }))
    }

    async fn clear_agent_route(
        &self,
        workspace_id: Uuid,
        route: &AgentRoute,
    ) -> Result<(), StoreError> {
        self.modify(
            AGENT_ROUTES,
            &workspace_id.to_string(),
            |current: Option<AgentRouteDoc>| {
                Ok(match current {
                    Some(r) if r.replica_id == route.replica_id && r.epoch == route.epoch => {
                        Change::Delete(())
                    }
                    _ => Change::Keep(()),
                })
            },
        )
        .await
    }

    async fn get_profile(&self, owner_id: &str) -> Result<Profile, StoreError> {
        let key = crate::base::ca::fingerprint(owner_id.as_bytes());
        Ok(self.get(PROFILES, &key).await?.unwrap_or_default())
    }

    async fn put_profile(&self, owner_id: &str, profile: &Profile) -> Result<bool, StoreError> {
        let key = crate::base::ca::fingerprint(owner_id.as_bytes());
        self.modify(PROFILES, &key, |current: Option<Profile>| {
            Ok(if current.map_or(0, |p| p.version) + 1 == profile.version {
                Change::Write(profile.clone(), true)
            } else {
                Change::Keep(false)
            })
        })
        .await
    }

    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        self.insert(AUDIT, &entry.id, entry).await
    }

    async fn list_audit(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        let (low, high) = query.id_range();
        let workspace = query.workspace_id.map(|id| id.to_string());
        self.db
            .fluent()
            .select()
            .from(AUDIT)
            .filter(|q| {
                q.for_all([
                    workspace
                        .as_ref()
                        .and_then(|w| q.field("workspace_id").eq(w)),
                    query.actor.as_ref().and_then(|a| q.field("actor").eq(a)),
                    low.as_ref()
                        .and_then(|l| q.field("id").greater_than_or_equal(l)),
                    high.as_ref().and_then(|h| q.field("id").less_than(h)),
                ])
            })
            .order(|o| o.fields([o.field("id").desc()]))
            .limit(u32::try_from(query.limit).unwrap_or(u32::MAX))
            .obj()
            .query()
            .await
            .map_err(backend)
    }

    async fn purge_audit(&self, before: i64, max: usize) -> Result<usize, StoreError> {
        let high = AuditEntry::id_at(before);
        let old: Vec<firestore::FirestoreDocument> = self
            .db
            .fluent()
            .select()
            .from(AUDIT)
            .filter(|q| q.field("id").less_than(&high))
            .order(|o| o.fields([o.field("id").asc()]))
            .limit(u32::try_from(max).unwrap_or(u32::MAX))
            .query()
            .await
            .map_err(backend)?;
        for doc in &old {
            self.db
                .fluent()
                .delete()
                .from(AUDIT)
                .document_id(doc_id(doc))
                .execute()
                .await
                .map_err(backend)?;
        }
        Ok(old.len())
    }
}
