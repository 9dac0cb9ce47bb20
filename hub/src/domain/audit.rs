//! The audit log: every lifecycle change, sign-in, token and share-link change and admin
//! action, with who did it, to what, when and how it ended, kept in the store
//! (`GET /audit` reads it).
//!
//! Actions that come over HTTP are recorded by the edge once the response is known, so a
//! refusal is recorded as surely as a success; what only the handling learns (who the
//! caller turned out to be, which workspace a name meant, the id of a new workspace) it
//! notes here, in facts that belong to the request's task. The hub's own actions (the idle
//! clean-up, the reconciler) are recorded where they happen, as `system`.

use crate::Hub;
use crate::domain::auth::{Caller, Grant};
use crate::store::{AuditEntry, AuditOutcome};
use std::cell::RefCell;
use uuid::Uuid;

/// What the handling of one request learned about it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Facts {
    /// Who (an owner id) and how (see [`AuditEntry::via`]).
    pub actor: Option<(String, String)>,
    pub workspace_id: Option<Uuid>,
}

tokio::task_local! {
    static FACTS: RefCell<Facts>;
}

/// Runs `f` with facts of its own, and returns what it noted.
pub async fn collect<F: std::future::Future>(f: F) -> (F::Output, Facts) {
    FACTS
        .scope(RefCell::new(Facts::default()), async {
            let out = f.await;
            (out, FACTS.with(|facts| facts.take()))
        })
        .await
}

fn note(change: impl FnOnce(&mut Facts)) {
    // Outside a collecting task (a test calling the domain directly) there is no one to tell.
    let _ = FACTS.try_with(|facts| change(&mut facts.borrow_mut()));
}

/// Notes who is acting.
pub fn note_actor(owner_id: &str, via: &str) {
    note(|facts| facts.actor = Some((owner_id.to_owned(), via.to_owned())));
}

/// Notes an authenticated caller as the one acting. Every authenticated request passes
/// here; only one being audited pays for the strings.
pub fn note_caller(caller: &Caller) {
    note(|facts| {
        let via = match &caller.grant {
            Grant::User if caller.admin => "admin".to_owned(),
            Grant::User => "user".to_owned(),
            Grant::Service(grant) => format!("service:{}", grant.owner_prefix),
            Grant::Ticket { purpose, .. } => format!("ticket:{}", purpose.as_str()),
        };
        facts.actor = Some((caller.owner_id.clone(), via));
    });
}

/// Notes the workspace acted on.
pub fn note_workspace(id: Uuid) {
    note(|facts| facts.workspace_id = Some(id));
}

/// An entry for `action`, recorded now, by nobody yet, ending well.
pub fn entry(action: &str) -> AuditEntry {
    let at_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or_default();
    AuditEntry {
        id: AuditEntry::new_id(at_us),
        at: at_us / 1000,
        actor: "anonymous".into(),
        via: "none".into(),
        action: action.into(),
        workspace_id: None,
        target: None,
        outcome: AuditOutcome::Ok,
        status: None,
        code: None,
        request_id: None,
        ip: None,
    }
}

/// Appends `entry` to the log. A store that fails is logged and counted (the store's call
/// metrics), and the action it records stands: the hub keeps serving.
pub async fn record(hub: &Hub, entry: AuditEntry) {
    tracing::info!(
        action = %entry.action,
        actor = %entry.actor,
        via = %entry.via,
        workspace = ?entry.workspace_id,
        target = ?entry.target,
        outcome = ?entry.outcome,
        code = ?entry.code,
        "audit"
    );
    if let Err(e) = hub.store.append_audit(&entry).await {
        tracing::error!(error = %e, action = %entry.action, "audit entry not stored");
    }
}

/// Records an action of the hub's own housekeeping (`via`: `idle`, `reconciler`) on a
/// workspace, with the error code of a failure.
pub async fn system(hub: &Hub, via: &str, action: &str, workspace: Uuid, failure: Option<&str>) {
    let mut e = entry(action);
    e.actor = "system".into();
    e.via = via.into();
    e.workspace_id = Some(workspace);
    if let Some(code) = failure {
        e.outcome = AuditOutcome::Failed;
        e.code = Some(code.into());
    }
    record(hub, e).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn facts_belong_to_their_task() {
        let id = Uuid::new_v4();
        let ((), facts) = collect(async {
            note_actor("alice", "user");
            note_workspace(id);
        })
        .await;
        assert_eq!(facts.actor, Some(("alice".into(), "user".into())));
        assert_eq!(facts.workspace_id, Some(id));
        // Outside a scope, noting is harmless and goes nowhere.
        note_workspace(id);
        let ((), other) = collect(async {}).await;
        assert_eq!(other, Facts::default());
    }

    #[test]
    fn ids_sort_as_times_do() {
        let a = entry("x");
        let b = AuditEntry::new_id((a.at + 1) * 1000);
        assert!(b > a.id);
        assert!(a.id >= AuditEntry::id_at(a.at) && a.id < AuditEntry::id_at(a.at + 1));
        assert_eq!(a.id.len(), 24);
    }
}
