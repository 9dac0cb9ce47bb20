//! The audit log over HTTP: [`record_actions`] records every audited request once its
//! response is known (who, what, the workspace, the outcome and error code, the request id
//! and address), and `GET /audit` lets admins read the log.

use crate::AppState;
use crate::domain::audit;
use crate::domain::auth::Caller;
use crate::edge::api::{ApiError, ErrorBody};
use crate::store::{AuditEntry, AuditOutcome, AuditQuery};
use axum::Json;
use axum::extract::{MatchedPath, Query, RawPathParams, Request, State};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The audited action a route stands for; other routes are not recorded.
pub fn action(method: &Method, route: &str) -> Option<&'static str> {
    Some(match (method.as_str(), route) {
        ("POST", "/workspaces") => "workspace.create",
        ("DELETE", "/workspaces/{id}") => "workspace.delete",
        ("POST", "/workspaces/{id}/stop") => "workspace.stop",
        ("POST", "/workspaces/{id}/start") => "workspace.start",
        ("POST", "/workspaces/{id}/keep-awake") => "workspace.keep_awake",
        ("PUT", "/workspaces/{id}/ports/{port}/sharing") => "port.sharing",
        ("POST", "/workspaces/{id}/ports/{port}/links") => "share_link.create",
        ("DELETE", "/workspaces/{id}/ports/{port}/links/{link}") => "share_link.revoke",
        ("POST", "/workspaces/{id}/tickets") => "browser_token.create",
        ("POST", "/tokens") => "token.create",
        ("DELETE", "/tokens/{id}") => "token.revoke",
        ("POST", "/ssh-keys") => "ssh_key.add",
        ("DELETE", "/ssh-keys/{id}") => "ssh_key.remove",
        ("PUT", "/dotfiles") => "dotfiles.set",
        ("DELETE", "/dotfiles") => "dotfiles.clear",
        ("GET", "/login/callback" | "/login/once") | ("POST", "/login/device/token") => "sign_in",
        ("POST", "/login/device/approve") => "device.approve",
        ("POST", "/logout") => "sign_out",
        ("POST", "/cleanup") => "admin.cleanup",
        _ => return None,
    })
}

/// The error code an [`ApiError`] answered with (a response extension).
#[derive(Debug, Clone)]
pub struct ErrorCode(pub &'static str);

/// The request's id, as the `request_id` layer settled it.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// What names a target besides its workspace: the path's parameters (`id=demo port=3000`),
/// cut to a bounded length.
fn target(params: Option<&RawPathParams>) -> Option<String> {
    let text = params?
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ");
    (!text.is_empty()).then(|| text.chars().take(256).collect())
}

/// Records the audited requests: runs the request with facts of its own (who the caller
/// turned out to be, which workspace it acted on), then appends an entry with the outcome.
pub async fn record_actions(
    State(hub): State<AppState>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str());
    let Some(action) = route.and_then(|r| action(req.method(), r)) else {
        return next.run(req).await;
    };
    let (mut parts, body) = req.into_parts();
    let params = <RawPathParams as axum::extract::FromRequestParts<AppState>>::from_request_parts(
        &mut parts, &hub,
    )
    .await
    .ok();
    let mut entry = audit::entry(action);
    entry.target = target(params.as_ref());
    entry.request_id = parts.extensions.get::<RequestId>().map(|r| r.0.clone());
    entry.ip = parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    let (res, facts) = audit::collect(next.run(Request::from_parts(parts, body))).await;
    let status = res.status().as_u16();
    let code = res.extensions().get::<ErrorCode>().map(|c| c.0);
    // A device sign-in is polled until it is approved: the waiting is not an action.
    if matches!(code, Some("authorization_pending" | "slow_down")) {
        return res;
    }
    if let Some((actor, via)) = facts.actor {
        entry.actor = actor;
        entry.via = via;
    }
    entry.workspace_id = facts.workspace_id;
    entry.outcome = AuditOutcome::of_status(status);
    entry.status = Some(status);
    entry.code = code.map(str::to_owned);
    audit::record(&hub, entry).await;
    res
}

/// `GET /audit`'s filters and page.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// Entries about this workspace (its id).
    workspace: Option<Uuid>,
    /// Entries of this actor: an owner id, `system` or `anonymous`.
    #[param(min_length = 1, max_length = 256)]
    actor: Option<String>,
    /// Recorded at or after (Unix ms).
    #[param(minimum = 0)]
    since: Option<i64>,
    /// Recorded before (Unix ms).
    #[param(minimum = 0)]
    until: Option<i64>,
    /// The `next` of the previous page.
    #[param(pattern = "^[0-9a-f]{24}$")]
    cursor: Option<String>,
    /// Entries per page, 1 to 1000 (100 if not given).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

/// A page of the audit log, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// `GET /audit`: the audit log, for admins.
#[utoipa::path(get, path = "/audit", tag = "operations", security(("bearer" = [])), params(AuditParams), responses((status = 200, description = "A page of entries, newest first", body = AuditPage), (status = 400, description = "A bad filter (`invalid_request`)", body = ErrorBody), (status = 401, description = "Missing or bad token", body = ErrorBody), (status = 403, description = "Signed in, but not an admin (`admin_only`)", body = ErrorBody), (status = 429, description = "Too many failed authentications from this address (`too_many_failures`)", body = ErrorBody)))]
pub async fn list(
    State(hub): State<AppState>,
    caller: Caller,
    params: Result<Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<AuditPage>, ApiError> {
    if !caller.admin {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "admin_only",
            "the audit log is for admins",
        ));
    }
    let Query(p) = params.map_err(|e| ApiError::invalid(e.body_text()))?;
    if p.actor
        .as_ref()
        .is_some_and(|a| a.is_empty() || a.chars().count() > 256)
    {
        return Err(ApiError::invalid("actor is 1 to 256 characters"));
    }
    if p.since.is_some_and(|t| t < 0) || p.until.is_some_and(|t| t < 0) {
        return Err(ApiError::invalid(
            "since and until are Unix ms, not negative",
        ));
    }
    if let Some(c) = &p.cursor
        && !(c.len() == 24 && c.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
    {
        return Err(ApiError::invalid("cursor is the `next` of a previous page"));
    }
    let limit = p.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit is 1 to 1000"));
    }
    // One more than asked says whether there is a next page.
    let mut entries = hub
        .store
        .list_audit(&AuditQuery {
            workspace_id: p.workspace,
            actor: p.actor,
            since: p.since,
            until: p.until,
            before: p.cursor,
            limit: limit + 1,
        })
        .await
        .map_err(|e| ApiError::internal("read the audit log", e))?;
    let next = (entries.len() > limit).then(|| {
        entries.truncate(limit);
        entries[limit - 1].id.clone()
    });
    Ok(Json(AuditPage { entries, next }))
}
