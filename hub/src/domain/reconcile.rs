//! The reconciler: compares the store with what the provider observes and repairs drift.
//!
//! - An instance labelled as ours with no record is an orphan: reported at once, deleted
//!   once it has been seen for the grace period.
//! - A record whose instance vanished goes to `ERROR` with the reason.
//! - A create a crash cut short (`PROVISIONING`, no instance, older than the grace period)
//!   is resumed: a fresh enrollment token and the provider's create again.
//! - A stop, start or delete a crash cut short is finished.
//!
//! It runs when the hub starts and then every `reconcile_interval`.

use crate::Hub;
use crate::base::workspace::{Status, Workspace};
use crate::domain::{audit, lifecycle};
use crate::provider::Observed;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use uuid::Uuid;

/// Orphans seen so far and when each was first seen (Unix ms).
#[derive(Debug, Default)]
pub struct Orphans(Mutex<HashMap<Uuid, i64>>);

/// What one pass found and did.
#[derive(Debug, Default, Serialize)]
pub struct ReconcileReport {
    pub orphans_seen: Vec<String>,
    pub orphans_deleted: Vec<String>,
    pub vanished: Vec<Uuid>,
    pub resumed: Vec<Uuid>,
    /// Creates whose agent never connected within `provision_timeout`: now ERROR.
    pub timed_out: Vec<Uuid>,
    pub finished: Vec<Uuid>,
}

/// One pass at time `now` (Unix ms).
pub async fn reconcile(hub: &Arc<Hub>, now: i64) -> anyhow::Result<ReconcileReport> {
    let grace = i64::try_from(hub.config.reconcile_grace.as_millis()).unwrap_or(i64::MAX);
    let mut report = ReconcileReport::default();
    let records = hub.store.list_workspaces(None).await?;
    let known: HashSet<Uuid> = records.iter().map(|w| w.id).collect();

    let instances = hub.provider.list().await?;
    let mut orphans = hub
        .orphans
        .0
        .lock()
        .map_err(|_| anyhow::anyhow!("orphan list poisoned"))?
        .clone();
    orphans.retain(|id, _| instances.iter().any(|i| i.target.workspace_id == *id));
    for inst in instances
        .iter()
        .filter(|i| !known.contains(&i.target.workspace_id))
    {
        let first_seen = *orphans.entry(inst.target.workspace_id).or_insert(now);
        report.orphans_seen.push(inst.target.instance_name.clone());
        if now.saturating_sub(first_seen) >= grace {
            match hub.provider.delete(&inst.target).await {
                Ok(()) => {
                    tracing::warn!(instance = %inst.target.instance_name, "deleted orphan instance");
                    orphans.remove(&inst.target.workspace_id);
                    let orphan = inst.target.workspace_id;
                    audit::system(hub, "reconciler", "instance.delete_orphan", orphan, None).await;
                    report
                        .orphans_deleted
                        .push(inst.target.instance_name.clone());
                }
                Err(e) => {
                    tracing::warn!(instance = %inst.target.instance_name, error = %e, "delete orphan")
                }
            }
        } else {
            tracing::warn!(instance = %inst.target.instance_name, "instance has no workspace record");
        }
    }
    if let Ok(mut shared) = hub.orphans.0.lock() {
        *shared = orphans;
    }

    for ws in records {
        if let Err(e) = repair(hub, &ws, now, grace, &mut report).await {
            tracing::warn!(workspace = %ws.id, error = %e, "reconcile workspace");
        }
    }
    for (kind, n) in [
        ("orphan_deleted", report.orphans_deleted.len()),
        ("vanished", report.vanished.len()),
        ("resumed", report.resumed.len()),
        ("provision_timed_out", report.timed_out.len()),
        ("delete_finished", report.finished.len()),
    ] {
        hub.metrics
            .housekeeping
            .get_or_create(&crate::base::metrics::Kind { kind })
            .inc_by(n as u64);
    }
    Ok(report)
}

async fn repair(
    hub: &Arc<Hub>,
    ws: &Workspace,
    now: i64,
    grace: i64,
    report: &mut ReconcileReport,
) -> anyhow::Result<()> {
    let settled = now.saturating_sub(ws.updated_at) >= grace;
    if ws.status == Status::Deleting {
        // A delete is always safe to repeat.
        lifecycle::finish_delete(hub, ws).await;
        report.finished.push(ws.id);
        return Ok(());
    }
    let timeout = hub.config.provision_timeout;
    if ws.status == Status::Provisioning
        && now.saturating_sub(ws.updated_at)
            >= i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX)
        && hub.agents.get(ws.id).is_none()
    {
        // Bad user-data, a wrong hub address, a boot that failed: say so instead of
        // provisioning forever.
        let why = format!(
            "the agent did not connect within {}",
            humantime::format_duration(timeout)
        );
        if lifecycle::fail_provisioning(
            hub,
            ws,
            &why,
            "reconciler",
            "workspace.provision_timed_out",
        )
        .await?
        {
            report.timed_out.push(ws.id);
        }
        return Ok(());
    }
    let observed = hub.provider.observe(&ws.into()).await?;
    match (ws.status, observed) {
        (_, Observed::Unknown) => {}
        (Status::Provisioning, Observed::Missing) if settled => {
            tracing::warn!(workspace = %ws.id, "resuming a create that was cut short");
            let failure = lifecycle::provision(hub, ws).await.err().map(|e| e.code());
            report.resumed.push(ws.id);
            audit::system(hub, "reconciler", "workspace.resume_create", ws.id, failure).await;
        }
        (Status::Provisioning, _) => {}
        (Status::Error, _) => {}
        (status, Observed::Missing) => {
            let reason = format!("instance vanished while {}", status.as_str());
            hub.transition(ws.id, &[status], Status::Error, Some(&reason))
                .await?;
            report.vanished.push(ws.id);
            audit::system(hub, "reconciler", "workspace.vanished", ws.id, None).await;
        }
        (Status::Stopping, _) if settled => {
            lifecycle::finish_stop(hub, &ws.into()).await;
            report.finished.push(ws.id);
        }
        (Status::Starting, _) if settled => {
            lifecycle::finish_start(hub, &ws.into()).await;
            report.finished.push(ws.id);
        }
        (Status::Ready, Observed::Suspended | Observed::Stopped) => {
            hub.transition(
                ws.id,
                &[Status::Ready],
                Status::Suspended,
                Some("stopped outside the hub"),
            )
            .await?;
            report.finished.push(ws.id);
            audit::system(hub, "reconciler", "workspace.stopped_outside", ws.id, None).await;
        }
        _ => {}
    }
    Ok(())
}
