//! Idle clean-up: which workspaces are in use, which are idle, and when each will be
//! stopped or deleted. [`judge`] is a pure function of the record, the agent's live
//! report and the time; [`sweep`] acts on its verdicts (from `POST /cleanup` and the hub's
//! own timer). Activity comes only from what agents report and from keep-awake leases.

use crate::Hub;
use crate::base::workspace::{Status, Workspace};
use crate::domain::agent::AgentInfo;
use crate::domain::{audit, lifecycle};
use serde::Serialize;
use std::sync::Arc;
use uuid::Uuid;

/// What idle clean-up will do to a workspace now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Stop,
    Delete,
}

/// Why a workspace counts as active or idle, and what happens when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Judgement {
    pub active: bool,
    /// A sentence for people: what keeps it awake, or since when it is idle.
    pub reason: String,
    /// Unix ms of the last activity that counts (or of the last status change).
    pub idle_since: Option<i64>,
    /// When it will be stopped if nothing happens (READY only).
    pub stop_at: Option<i64>,
    /// When it will be deleted if nothing happens.
    pub delete_at: Option<i64>,
    /// What the clean-up does now, if anything.
    pub action: Option<Action>,
}

fn ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Decides for one workspace at time `now` (Unix ms).
pub fn judge(ws: &Workspace, agent: Option<&AgentInfo>, now: i64) -> Judgement {
    let expires_at = ws.created_at.saturating_add(ms(ws.idle.max_lifetime));
    let mut j = Judgement {
        active: false,
        reason: String::new(),
        idle_since: None,
        stop_at: None,
        delete_at: Some(expires_at),
        action: None,
    };
    if now >= expires_at {
        j.reason = "past its maximum lifetime".into();
        j.action = Some(Action::Delete);
        return j;
    }
    match ws.status {
        Status::Ready => {
            let attached = agent.map_or(0, |a| a.attached_clients);
            let leased = ws.keep_awake_until.filter(|&until| until > now);
            let last_input = agent.and_then(|a| a.last_input_at);
            let since = [
                Some(ws.updated_at),
                ws.last_active_at,
                last_input,
                ws.keep_awake_until,
            ]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(ws.updated_at);
            j.idle_since = Some(since);
            if attached > 0 {
                j.active = true;
                j.reason = format!("{attached} terminal client(s) attached");
            } else if let Some(until) = leased {
                j.active = true;
                j.reason = "a keep-awake lease is held".into();
                j.stop_at = Some(until.saturating_add(ms(ws.idle.stop_after)));
            } else {
                let stop_at = since.saturating_add(ms(ws.idle.stop_after));
                j.stop_at = Some(stop_at);
                if now >= stop_at {
                    j.reason = "idle for longer than its stop-after time".into();
                    j.action = Some(Action::Stop);
                } else {
                    j.active = true;
                    j.reason = "recent activity".into();
                }
            }
        }
        Status::Suspended | Status::Error => {
            let delete_at = ws
                .updated_at
                .saturating_add(ms(ws.idle.delete_after))
                .min(expires_at);
            j.idle_since = Some(ws.updated_at);
            j.delete_at = Some(delete_at);
            if now >= delete_at {
                j.reason = format!(
                    "{} for longer than its delete-after time",
                    ws.status.as_str()
                );
                j.action = Some(Action::Delete);
            } else {
                j.reason = format!(
                    "{}; deleted when untouched until delete_at",
                    ws.status.as_str()
                );
            }
        }
        other => {
            j.active = true;
            j.reason = format!("{} (in transition)", other.as_str());
        }
    }
    j
}

/// What one sweep did.
#[derive(Debug, Default, Serialize)]
pub struct SweepReport {
    pub checked: usize,
    pub stopped: Vec<Uuid>,
    pub deleted: Vec<Uuid>,
    /// Workspaces whose action failed (they are retried on the next sweep).
    pub failed: Vec<Uuid>,
}

/// Judges every workspace at `now` and stops or deletes the ones due.
pub async fn sweep(hub: &Arc<Hub>, now: i64) -> Result<SweepReport, crate::store::StoreError> {
    let all = hub.store.list_workspaces(None).await?;
    let mut report = SweepReport {
        checked: all.len(),
        ..SweepReport::default()
    };
    for ws in all {
        let verdict = judge(&ws, hub.agents.get(ws.id).as_ref(), now);
        let result = match verdict.action {
            None => continue,
            Some(Action::Stop) => lifecycle::stop(hub, ws.id)
                .await
                .map(|_| &mut report.stopped),
            Some(Action::Delete) => lifecycle::delete(hub, ws.id)
                .await
                .map(|_| &mut report.deleted),
        };
        let action = match verdict.action {
            Some(Action::Delete) => "workspace.delete",
            _ => "workspace.stop",
        };
        match result {
            Ok(list) => {
                tracing::info!(workspace = %ws.id, action = ?verdict.action, reason = %verdict.reason, "idle clean-up");
                list.push(ws.id);
                audit::system(hub, "idle", action, ws.id, None).await;
            }
            Err(e) => {
                tracing::warn!(workspace = %ws.id, error = %e.message(), "idle clean-up");
                report.failed.push(ws.id);
                audit::system(hub, "idle", action, ws.id, Some(e.code())).await;
            }
        }
    }
    for (kind, n) in [
        ("idle_stopped", report.stopped.len()),
        ("idle_deleted", report.deleted.len()),
        ("idle_failed", report.failed.len()),
    ] {
        hub.metrics
            .housekeeping
            .get_or_create(&crate::base::metrics::Kind { kind })
            .inc_by(n as u64);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::workspace::{IdlePolicy, Metadata};
    use std::time::Duration;

    const MIN: i64 = 60_000;

    fn ws(status: Status, updated_at: i64) -> Workspace {
        Workspace {
            id: Uuid::nil(),
            name: "x".into(),
            owner_id: "a".into(),
            instance_name: "ws-x".into(),
            zone: "local".into(),
            image_tag: "default".into(),
            machine_type: "local".into(),
            status,
            status_reason: None,
            created_at: 0,
            updated_at,
            last_connected_at: None,
            last_active_at: None,
            keep_awake_until: None,
            idle: IdlePolicy {
                stop_after: Duration::from_secs(30 * 60),
                delete_after: Duration::from_secs(24 * 3600),
                max_lifetime: Duration::from_secs(7 * 24 * 3600),
            },
            metadata: Metadata::default(),
            sharing: Default::default(),
        }
    }

    fn agent(attached: u32, last_input_at: Option<i64>) -> AgentInfo {
        AgentInfo {
            connected_since: 0,
            agent_version: "t".into(),
            hostname: "h".into(),
            protocol_version: 2,
            remote_addr: "x".into(),
            attached_clients: attached,
            last_input_at,
            checkout: None,
            setup: None,
            direct_clients: Vec::new(),
            sync_sessions: Vec::new(),
            stats: None,
        }
    }

    #[test]
    fn ready_workspace_stops_after_its_idle_time() {
        let w = ws(Status::Ready, 10 * MIN);
        let early = judge(&w, None, 39 * MIN);
        assert!(early.active && early.action.is_none());
        assert_eq!(early.stop_at, Some(40 * MIN));
        let due = judge(&w, None, 40 * MIN);
        assert_eq!(due.action, Some(Action::Stop));
        assert!(!due.active);
        // Input reported by the agent moves the clock forward.
        let typed = judge(&w, Some(&agent(0, Some(35 * MIN))), 50 * MIN);
        assert_eq!((typed.action, typed.stop_at), (None, Some(65 * MIN)));
        // A stored last activity counts the same way (a hub restart loses the live report).
        let mut stored = w.clone();
        stored.last_active_at = Some(35 * MIN);
        assert_eq!(judge(&stored, None, 50 * MIN).action, None);
    }

    #[test]
    fn attached_clients_and_leases_keep_it_awake() {
        let w = ws(Status::Ready, 0);
        let far = 6 * 24 * 60 * MIN;
        let attached = judge(&w, Some(&agent(2, None)), far);
        assert!(attached.active);
        assert_eq!(attached.action, None);
        assert!(attached.reason.contains("2 terminal client"));
        let mut leased = w.clone();
        leased.keep_awake_until = Some(far + MIN);
        let j = judge(&leased, None, far);
        assert_eq!(j.action, None);
        assert!(j.reason.contains("keep-awake"));
        // The lease ran out: idle from its end.
        let after = judge(&leased, None, far + 31 * MIN);
        assert_eq!(after.action, Some(Action::Stop));
    }

    #[test]
    fn suspended_is_deleted_later_and_lifetime_is_a_hard_limit() {
        let w = ws(Status::Suspended, 60 * MIN);
        assert_eq!(judge(&w, None, 60 * MIN + 23 * 60 * MIN).action, None);
        assert_eq!(
            judge(&w, None, 60 * MIN + 24 * 60 * MIN).action,
            Some(Action::Delete)
        );
        let busy = ws(Status::Ready, 0);
        let end = 7 * 24 * 60 * MIN;
        assert_eq!(
            judge(&busy, Some(&agent(1, None)), end).action,
            Some(Action::Delete)
        );
        assert_eq!(judge(&ws(Status::Stopping, 0), None, MIN).action, None);
    }
}
