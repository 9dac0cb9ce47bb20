//! Workspace lifecycle: create, stop, start, delete and keep-awake, each a conditional
//! status change in the store followed by the provider call. Stop, start and delete answer
//! at once with the transient status (`STOPPING`, `STARTING`, `DELETING`) and finish in the
//! background; the reconciler finishes whatever a crash interrupted. Every status change is
//! published as a [`WorkspaceEvent`] (the SSE stream at `/workspaces/:id/events`).

use crate::base::workspace::{
    DEFAULT_NAME_TRIES, IdlePolicy, Metadata, Status, Workspace, default_name, now_ms,
};
use crate::domain::auth::token_hash;
use crate::domain::error::{Error, Kind};
use crate::domain::events::WorkspaceEvent;
use crate::provider::{InstanceSpec, ProviderError, Target};
use crate::store::{Limits, StoreError};
use crate::{Hub, base::ca};
use protocol::bootstrap::AgentBootstrap;
use protocol::close::CloseCode;
use std::sync::Arc;
use uuid::Uuid;

/// Namespace of workspace ids derived from an idempotency key (UUID v5).
const IDEMPOTENCY_NAMESPACE: Uuid = Uuid::from_u128(0x8f1c_5a4e_2b7d_4e11_9c3a_6d0e_7f21_b5a9);

/// The longest keep-awake lease one request may take.
pub const MAX_KEEP_AWAKE_SECS: u64 = 24 * 3600;

impl Hub {
    /// A conditional status change that, when it succeeds, is published to subscribers.
    pub async fn transition(
        &self,
        id: Uuid,
        from: &[Status],
        to: Status,
        reason: Option<&str>,
    ) -> Result<Workspace, StoreError> {
        let ws = self.store.transition(id, from, to, reason).await?;
        self.events.publish(
            WorkspaceEvent::new(id, &ws.owner_id, "status")
                .with_status(ws.status, ws.status_reason.clone()),
        );
        Ok(ws)
    }

    /// Ends the agent's connection (after a stop or a delete), so the registry drops it now
    /// rather than after a heartbeat timeout.
    fn disconnect_agent(&self, id: Uuid, why: &str) {
        if let Some(conn) = self.agents.connection(id) {
            conn.close(
                quinn::VarInt::from_u32(CloseCode::ShuttingDown.code()),
                why.as_bytes(),
            );
        }
    }
}

/// What a create asks for, already validated by the API.
#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    /// Checked by the caller (`base::workspace::check_name`); default from the repository.
    pub name: Option<String>,
    pub zone: Option<String>,
    pub machine_type: Option<String>,
    pub image_tag: Option<String>,
    pub metadata: Metadata,
    /// Shorter idle times than the hub's defaults (never longer).
    pub idle: Option<IdlePolicy>,
    /// A client-chosen key: retrying a create with the same key returns the same workspace.
    pub idempotency_key: Option<String>,
    /// Credentials for a private repository: kept in the hub's memory only until the agent
    /// has checked it out, never stored.
    pub git_token: Option<String>,
}

/// The outcome of a create.
#[derive(Debug)]
pub struct Created {
    pub workspace: Workspace,
    /// For the manual provider: the agent's config file.
    pub agent_config: Option<String>,
    /// False when an earlier request with the same idempotency key created it.
    pub is_new: bool,
}

fn quota_exceeded(message: String) -> Error {
    Error::new(Kind::Forbidden, "quota_exceeded", message)
}

/// The owner's limits for a create; the store counts them atomically with the insert.
fn create_limits(hub: &Hub, owner: &str, machine_type: &str) -> Result<Limits, Error> {
    let quota = hub.config.quotas.for_owner(owner);
    if !quota.machine_types.is_empty() && !quota.machine_types.iter().any(|m| m == machine_type) {
        return Err(Error::new(
            Kind::Forbidden,
            "machine_type_not_allowed",
            format!(
                "machine type {machine_type} is not allowed; allowed: {}",
                quota.machine_types.join(", ")
            ),
        ));
    }
    Ok(Limits {
        workspaces: quota.max_workspaces as usize,
        running: quota.max_running as usize,
    })
}

/// Checks the owner's running quota before a start.
async fn check_running_quota(hub: &Hub, owner: &str) -> Result<(), Error> {
    let quota = hub.config.quotas.for_owner(owner);
    let (_, running) = hub.store.count_workspaces(owner).await?;
    if running >= quota.max_running as usize {
        return Err(quota_exceeded(format!(
            "you have {running} running workspaces; the limit is {}",
            quota.max_running
        )));
    }
    Ok(())
}

/// Creates a workspace record (`PROVISIONING`) and asks the provider for its machine.
pub async fn create(hub: &Arc<Hub>, owner: &str, req: CreateRequest) -> Result<Created, Error> {
    let cfg = &hub.config;
    let id = match &req.idempotency_key {
        Some(key) => Uuid::new_v5(&IDEMPOTENCY_NAMESPACE, format!("{owner}\0{key}").as_bytes()),
        None => Uuid::new_v4(),
    };
    if req.idempotency_key.is_some() {
        match hub.store.get_workspace(id).await {
            Ok(ws) => {
                crate::domain::audit::note_workspace(id);
                return Ok(existing(ws));
            }
            Err(StoreError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let machine_type = req
        .machine_type
        .unwrap_or_else(|| cfg.default_machine_type.clone());
    let limits = create_limits(hub, owner, &machine_type)?;
    let defaults = cfg.idle;
    let idle = req.idle.map_or(defaults, |asked| IdlePolicy {
        stop_after: asked.stop_after.min(defaults.stop_after),
        delete_after: asked.delete_after.min(defaults.delete_after),
        max_lifetime: asked.max_lifetime.min(defaults.max_lifetime),
    });
    crate::domain::audit::note_workspace(id);
    let now = now_ms();
    let mut ws = Workspace {
        id,
        name: String::new(),
        owner_id: owner.to_owned(),
        instance_name: crate::base::workspace::instance_name(id),
        zone: req.zone.unwrap_or_else(|| cfg.default_zone.clone()),
        image_tag: req
            .image_tag
            .unwrap_or_else(|| cfg.default_image_tag.clone()),
        machine_type,
        status: Status::Provisioning,
        status_reason: None,
        created_at: now,
        updated_at: now,
        last_connected_at: None,
        last_active_at: None,
        keep_awake_until: None,
        idle,
        metadata: req.metadata,
        sharing: Default::default(),
    };
    // A name asked for is taken or not; a default one tries the next suffix.
    let mut attempt = 0;
    loop {
        ws.name = match &req.name {
            Some(name) => name.clone(),
            None => default_name(ws.metadata.repo.as_deref(), id, attempt),
        };
        match hub.store.insert_workspace(&ws, limits).await {
            Ok(()) => break,
            // The same idempotency key, raced: the other request created it.
            Err(StoreError::AlreadyExists) if req.idempotency_key.is_some() => {
                return Ok(existing(hub.store.get_workspace(id).await?));
            }
            Err(StoreError::NameTaken(_))
                if req.name.is_none() && attempt + 1 < DEFAULT_NAME_TRIES =>
            {
                attempt += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
    hub.events
        .publish(WorkspaceEvent::new(id, &ws.owner_id, "status").with_status(ws.status, None));
    if let Some(token) = req.git_token {
        hub.agents.keep_checkout_token(id, token);
    }
    tracing::info!(workspace = %id, owner = %owner, "workspace created");
    crash_point("after-record");
    let agent_config = if hub.provider.creates_slowly() {
        // Answer with PROVISIONING now; a failure turns the workspace ERROR (see events).
        let (hub, ws) = (hub.clone(), ws.clone());
        follow_up(async move { provision(&hub, &ws).await });
        None
    } else {
        provision(hub, &ws).await?
    };
    Ok(Created {
        workspace: hub.store.get_workspace(id).await?,
        agent_config,
        is_new: true,
    })
}

/// Runs the rest of an action after its answer, in the span of the request that asked for
/// it: its provider calls log with that request's id.
fn follow_up<F>(work: F)
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    use tracing::Instrument;
    tokio::spawn(work.instrument(tracing::Span::current()));
}

fn existing(workspace: Workspace) -> Created {
    Created {
        workspace,
        agent_config: None,
        is_new: false,
    }
}

/// Fault injection for crash tests: `WORKSPACE_HUB_CRASH_AT=<point>` aborts the process
/// there, the way a power cut would.
fn crash_point(point: &str) {
    if std::env::var("WORKSPACE_HUB_CRASH_AT").is_ok_and(|p| p == point) {
        tracing::error!(point, "crash point reached: aborting");
        std::process::abort();
    }
}

/// Mints an enrollment token and asks the provider for the machine. A failure turns the
/// workspace `ERROR`. Used by create and by the reconciler to resume an interrupted create.
pub async fn provision(hub: &Hub, ws: &Workspace) -> Result<Option<String>, Error> {
    let cfg = &hub.config;
    let token = format!("wse_{}", ca::hex(&ca::random_bytes::<32>()));
    let expires = now_ms() + cfg.enrollment_ttl.as_millis() as i64;
    hub.store
        .insert_enrollment_token(&token_hash(&token), ws.id, expires)
        .await?;
    let spec = InstanceSpec {
        workspace_id: ws.id,
        owner_id: ws.owner_id.clone(),
        instance_name: ws.instance_name.clone(),
        zone: ws.zone.clone(),
        machine_type: ws.machine_type.clone(),
        image_tag: ws.image_tag.clone(),
        bootstrap: AgentBootstrap {
            hub_addr: hub.agent_hub_addr.clone(),
            server_name: cfg.server_names[0].clone(),
            ca_pem: hub.identity.trust_bundle_pem(),
            enrollment_token: Some(token),
            state_dir: "/var/lib/workspace-agent".into(),
            // The process provider runs agents as the hub's own user; VM images have one.
            user: hub.provider.workspace_user().map(str::to_owned),
            detached_session_ttl_secs: Some(cfg.detached_session_ttl.as_secs()),
            terminal_ring_bytes: Some(cfg.terminal_ring_bytes),
            // An agent beside other programs reports only its own process tree's ports.
            ports: hub
                .provider
                .shares_host()
                .then_some(protocol::bootstrap::PortScope::Descendants),
        },
    };
    match hub.provider.create(&spec).await {
        Ok(created) => Ok(created.agent_config),
        Err(e) => {
            tracing::warn!(workspace = %ws.id, error = %e, "provider create failed");
            let reason = format!("create instance: {e}");
            hub.transition(ws.id, &[Status::Provisioning], Status::Error, Some(&reason))
                .await?;
            Err(provider_error(e))
        }
    }
}

/// The API error for a provider failure.
pub fn provider_error(e: ProviderError) -> Error {
    match e {
        ProviderError::NotFound => Error::new(
            Kind::Upstream,
            "instance_not_found",
            "the workspace's instance no longer exists",
        ),
        ProviderError::QuotaExceeded(m) => {
            Error::new(Kind::Unavailable, "provider_quota_exceeded", m)
        }
        ProviderError::PermissionDenied(m) => {
            Error::new(Kind::Upstream, "provider_permission_denied", m)
        }
        ProviderError::Failed(m) => Error::new(Kind::Upstream, "provider_failed", m),
    }
}

/// A workspace that can no longer come up ends in `ERROR` with `why` and the last lines
/// of its boot log, instead of provisioning forever; audited as `action` by `via`.
/// Whether it was still `PROVISIONING` (else nothing changes).
pub async fn fail_provisioning(
    hub: &Hub,
    ws: &Workspace,
    why: &str,
    via: &str,
    action: &str,
) -> Result<bool, StoreError> {
    let mut reason = why.to_owned();
    if let Some(log) = hub
        .provider
        .boot_log(&ws.into())
        .await
        .filter(|l| !l.is_empty())
    {
        reason.push_str(&format!("; last boot log: {log}"));
    }
    match hub
        .transition(ws.id, &[Status::Provisioning], Status::Error, Some(&reason))
        .await
    {
        Ok(_) => {}
        Err(StoreError::Conflict { .. }) => return Ok(false),
        Err(e) => return Err(e),
    }
    tracing::warn!(workspace = %ws.id, %reason, "provisioning failed");
    crate::domain::audit::system(hub, via, action, ws.id, None).await;
    Ok(true)
}

/// An agent presented its workspace's enrollment token after it expired: it can never
/// enroll with it, so a workspace still provisioning fails now rather than at the
/// provision timeout.
pub async fn enrollment_expired(hub: &Hub, id: Uuid) {
    let Ok(ws) = hub.store.get_workspace(id).await else {
        return;
    };
    if ws.status != Status::Provisioning {
        return;
    }
    let why = format!(
        "the agent's enrollment token expired ({} after the create) before it enrolled",
        humantime::format_duration(hub.config.enrollment_ttl)
    );
    if let Err(e) =
        fail_provisioning(hub, &ws, &why, "enrollment", "workspace.enrollment_expired").await
    {
        tracing::warn!(workspace = %id, error = %e, "fail a workspace whose token expired");
    }
}

/// Suspends a READY workspace: `STOPPING` now, `SUSPENDED` when the provider is done.
pub async fn stop(hub: &Arc<Hub>, id: Uuid) -> Result<Workspace, Error> {
    let ws = hub
        .transition(id, &[Status::Ready], Status::Stopping, None)
        .await?;
    let (hub, target) = (hub.clone(), Target::from(&ws));
    follow_up(async move { finish_stop(&hub, &target).await });
    Ok(ws)
}

/// The provider half of a stop (also run by the reconciler for a stop a crash cut short).
pub async fn finish_stop(hub: &Hub, target: &Target) {
    let id = target.workspace_id;
    let result = hub.provider.stop(target).await;
    hub.disconnect_agent(id, "workspace stopped");
    let (to, reason) = match result {
        Ok(()) => (Status::Suspended, None),
        Err(ProviderError::NotFound) => (Status::Error, Some("instance vanished".to_owned())),
        Err(e) => (Status::Error, Some(format!("stop instance: {e}"))),
    };
    if let Err(e) = hub
        .transition(id, &[Status::Stopping], to, reason.as_deref())
        .await
    {
        tracing::warn!(workspace = %id, error = %e, "finish stop");
    }
}

/// Resumes a SUSPENDED (or failed) workspace: `STARTING` now, `READY` when its agent says
/// hello again.
pub async fn start(hub: &Arc<Hub>, id: Uuid, owner: &str) -> Result<Workspace, Error> {
    check_running_quota(hub, owner).await?;
    let ws = hub
        .transition(
            id,
            &[Status::Suspended, Status::Error],
            Status::Starting,
            None,
        )
        .await?;
    let (hub, target) = (hub.clone(), Target::from(&ws));
    follow_up(async move { finish_start(&hub, &target).await });
    Ok(ws)
}

/// The provider half of a start.
pub async fn finish_start(hub: &Hub, target: &Target) {
    let id = target.workspace_id;
    let failure = match hub.provider.start(target).await {
        Ok(()) => {
            // An agent that never went away (a start after an error) is ready at once.
            if hub.agents.get(id).is_some() {
                let _ = hub
                    .transition(id, &[Status::Starting], Status::Ready, None)
                    .await;
            }
            return;
        }
        Err(ProviderError::NotFound) => "instance vanished".to_owned(),
        Err(e) => format!("start instance: {e}"),
    };
    if let Err(e) = hub
        .transition(id, &[Status::Starting], Status::Error, Some(&failure))
        .await
    {
        tracing::warn!(workspace = %id, error = %e, "finish start");
    }
}

/// Destroys a workspace: `DELETING` now; the instance and then the record go in the
/// background. Deleting a workspace already being deleted retries the delete.
pub async fn delete(hub: &Arc<Hub>, id: Uuid) -> Result<Workspace, Error> {
    const FROM: [Status; 7] = [
        Status::Provisioning,
        Status::Ready,
        Status::Stopping,
        Status::Suspended,
        Status::Starting,
        Status::Error,
        Status::Deleting,
    ];
    let ws = hub.transition(id, &FROM, Status::Deleting, None).await?;
    let (hub, gone) = (hub.clone(), ws.clone());
    follow_up(async move { finish_delete(&hub, &gone).await });
    Ok(ws)
}

/// The provider half of a delete; on failure the record stays `DELETING` with the reason,
/// and the reconciler tries again.
pub async fn finish_delete(hub: &Hub, ws: &Workspace) {
    let (id, target) = (ws.id, Target::from(ws));
    hub.disconnect_agent(id, "workspace deleted");
    match hub.provider.delete(&target).await {
        Ok(()) | Err(ProviderError::NotFound) => match hub.store.delete_workspace(id).await {
            Ok(()) | Err(StoreError::NotFound) => {
                tracing::info!(workspace = %id, "workspace deleted");
                hub.events
                    .publish(WorkspaceEvent::new(id, &ws.owner_id, "deleted"));
            }
            Err(e) => tracing::warn!(workspace = %id, error = %e, "delete record"),
        },
        Err(e) => {
            let reason = format!("delete instance: {e}");
            tracing::warn!(workspace = %id, error = %e, "delete instance");
            let _ = hub
                .transition(id, &[Status::Deleting], Status::Deleting, Some(&reason))
                .await;
        }
    }
}

/// Takes (or with 0 seconds, releases) a keep-awake lease.
pub async fn keep_awake(hub: &Hub, ws: &Workspace, seconds: u64) -> Result<Workspace, Error> {
    if ws.status == Status::Deleting {
        return Err(StoreError::Conflict { current: ws.status }.into());
    }
    if seconds > MAX_KEEP_AWAKE_SECS {
        return Err(Error::invalid(format!(
            "seconds must be at most {MAX_KEEP_AWAKE_SECS}"
        )));
    }
    let until = (seconds > 0).then(|| now_ms() + seconds as i64 * 1000);
    Ok(hub.store.set_keep_awake(ws.id, until).await?)
}
