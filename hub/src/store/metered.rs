//! A store that counts and times every call of the one it wraps (`/metrics`).

use super::*;
use crate::base::metrics::Metrics;
use std::sync::Arc;
use std::time::Instant;

pub struct Metered {
    inner: Arc<dyn Store>,
    metrics: Arc<Metrics>,
}

impl Metered {
    pub fn new(inner: Arc<dyn Store>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let start = Instant::now();
        let out = call.await;
        // Not found, a lost race, a taken name: answers, not failures of the store.
        let ok = !matches!(&out, Err(StoreError::Backend(_)));
        let took = start.elapsed();
        tracing::debug!(op, ok, ms = took.as_secs_f64() * 1000.0, "store call");
        let m = &self.metrics;
        Metrics::call(&m.store_calls, &m.store_seconds, op, ok, took);
        out
    }
}

#[async_trait]
impl Store for Metered {
    async fn insert_workspace(&self, ws: &Workspace, limits: Limits) -> Result<(), StoreError> {
        self.timed("insert_workspace", self.inner.insert_workspace(ws, limits))
            .await
    }

    async fn get_workspace(&self, id: Uuid) -> Result<Workspace, StoreError> {
        self.timed("get_workspace", self.inner.get_workspace(id))
            .await
    }

    async fn find_workspace_by_name(
        &self,
        owner_id: &str,
        name: &str,
    ) -> Result<Workspace, StoreError> {
        self.timed(
            "find_workspace_by_name",
            self.inner.find_workspace_by_name(owner_id, name),
        )
        .await
    }

    async fn list_workspaces(&self, owner_id: Option<&str>) -> Result<Vec<Workspace>, StoreError> {
        self.timed("list_workspaces", self.inner.list_workspaces(owner_id))
            .await
    }

    async fn count_workspaces(&self, owner_id: &str) -> Result<(usize, usize), StoreError> {
        self.timed("count_workspaces", self.inner.count_workspaces(owner_id))
            .await
    }

    async fn transition(
        &self,
        id: Uuid,
        from: &[Status],
        to: Status,
        reason: Option<&str>,
    ) -> Result<Workspace, StoreError> {
        self.timed("transition", self.inner.transition(id, from, to, reason))
            .await
    }

    async fn touch(
        &self,
        id: Uuid,
        connected_at: Option<i64>,
        active_at: Option<i64>,
    ) -> Result<(), StoreError> {
        self.timed("touch", self.inner.touch(id, connected_at, active_at))
            .await
    }

    async fn set_keep_awake(&self, id: Uuid, until: Option<i64>) -> Result<Workspace, StoreError> {
        self.timed("set_keep_awake", self.inner.set_keep_awake(id, until))
            .await
    }

    async fn update_sharing(
        &self,
        id: Uuid,
        change: crate::base::workspace::SharingChange,
        now: i64,
    ) -> Result<Workspace, StoreError> {
        self.timed("update_sharing", self.inner.update_sharing(id, change, now))
            .await
    }

    async fn delete_workspace(&self, id: Uuid) -> Result<(), StoreError> {
        self.timed("delete_workspace", self.inner.delete_workspace(id))
            .await
    }

    async fn insert_enrollment_token(
        &self,
        token_hash: &str,
        workspace_id: Uuid,
        expires_at_ms: i64,
    ) -> Result<(), StoreError> {
        self.timed(
            "insert_enrollment_token",
            self.inner
                .insert_enrollment_token(token_hash, workspace_id, expires_at_ms),
        )
        .await
    }

    async fn redeem_enrollment_token(
        &self,
        token_hash: &str,
        key_fingerprint: &str,
        now_ms: i64,
    ) -> Result<Result<Uuid, TokenRejection>, StoreError> {
        self.timed(
            "redeem_enrollment_token",
            self.inner
                .redeem_enrollment_token(token_hash, key_fingerprint, now_ms),
        )
        .await
    }

    async fn put_agent_cert(
        &self,
        workspace_id: Uuid,
        fingerprint: &str,
    ) -> Result<(), StoreError> {
        self.timed(
            "put_agent_cert",
            self.inner.put_agent_cert(workspace_id, fingerprint),
        )
        .await
    }

    async fn agent_cert(&self, workspace_id: Uuid) -> Result<Option<String>, StoreError> {
        self.timed("agent_cert", self.inner.agent_cert(workspace_id))
            .await
    }

    async fn insert_api_token(&self, token_hash: &str, token: &ApiToken) -> Result<(), StoreError> {
        self.timed(
            "insert_api_token",
            self.inner.insert_api_token(token_hash, token),
        )
        .await
    }

    async fn find_api_token(&self, token_hash: &str) -> Result<Option<ApiToken>, StoreError> {
        self.timed("find_api_token", self.inner.find_api_token(token_hash))
            .await
    }

    async fn list_api_tokens(&self, owner_id: &str) -> Result<Vec<(String, ApiToken)>, StoreError> {
        self.timed("list_api_tokens", self.inner.list_api_tokens(owner_id))
            .await
    }

    async fn delete_api_token(&self, token_hash: &str) -> Result<(), StoreError> {
        self.timed("delete_api_token", self.inner.delete_api_token(token_hash))
            .await
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now: i64,
        until: i64,
    ) -> Result<bool, StoreError> {
        self.timed(
            "acquire_lease",
            self.inner.acquire_lease(name, holder, now, until),
        )
        .await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        self.timed("release_lease", self.inner.release_lease(name, holder))
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
        self.timed(
            "put_grant",
            self.inner.put_grant(kind, key, payload, now, expires_at),
        )
        .await
    }

    async fn get_grant(
        &self,
        kind: &str,
        key: &str,
        now: i64,
    ) -> Result<Option<String>, StoreError> {
        self.timed("get_grant", self.inner.get_grant(kind, key, now))
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
        self.timed(
            "swap_grant",
            self.inner.swap_grant(kind, key, expected, payload, now),
        )
        .await
    }

    async fn take_grant(
        &self,
        kind: &str,
        key: &str,
        expected: Option<&str>,
        now: i64,
    ) -> Result<Option<String>, StoreError> {
        self.timed(
            "take_grant",
            self.inner.take_grant(kind, key, expected, now),
        )
        .await
    }

    async fn purge_grants(&self, now: i64) -> Result<usize, StoreError> {
        self.timed("purge_grants", self.inner.purge_grants(now))
            .await
    }

    async fn put_replica(&self, replica: &ReplicaRecord) -> Result<(), StoreError> {
        self.timed("put_replica", self.inner.put_replica(replica))
            .await
    }

    async fn get_replica(&self, id: &str, now: i64) -> Result<Option<ReplicaRecord>, StoreError> {
        self.timed("get_replica", self.inner.get_replica(id, now))
            .await
    }

    async fn list_replicas(&self, now: i64) -> Result<Vec<ReplicaRecord>, StoreError> {
        self.timed("list_replicas", self.inner.list_replicas(now))
            .await
    }

    async fn delete_replica(&self, id: &str) -> Result<(), StoreError> {
        self.timed("delete_replica", self.inner.delete_replica(id))
            .await
    }

    async fn put_agent_route(
        &self,
        workspace_id: Uuid,
        route: &AgentRoute,
    ) -> Result<bool, StoreError> {
        self.timed(
            "put_agent_route",
            self.inner.put_agent_route(workspace_id, route),
        )
        .await
    }

    async fn agent_route(&self, workspace_id: Uuid) -> Result<Option<AgentRoute>, StoreError> {
        self.timed("agent_route", self.inner.agent_route(workspace_id))
            .await
    }

    async fn clear_agent_route(
        &self,
        workspace_id: Uuid,
        route: &AgentRoute,
    ) -> Result<(), StoreError> {
        self.timed(
            "clear_agent_route",
            self.inner.clear_agent_route(workspace_id, route),
        )
        .await
    }

    async fn get_profile(&self, owner_id: &str) -> Result<Profile, StoreError> {
        self.timed("get_profile", self.inner.get_profile(owner_id))
            .await
    }

    async fn put_profile(&self, owner_id: &str, profile: &Profile) -> Result<bool, StoreError> {
        self.timed("put_profile", self.inner.put_profile(owner_id, profile))
            .await
    }

    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        self.timed("append_audit", self.inner.append_audit(entry))
            .await
    }

    async fn list_audit(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        self.timed("list_audit", self.inner.list_audit(query)).await
    }

    async fn purge_audit(&self, before: i64, max: usize) -> Result<usize, StoreError> {
        self.timed("purge_audit", self.inner.purge_audit(before, max))
            .await
    }
}
