//! The caller of an HTTP request: a bearer token (CLI, scripts), a host app's service token
//! naming the owner it acts for (`X-Wsh-Owner`), a browser token (a ticket, as a bearer
//! token or `?ticket=` on a GET), or the browser's session cookie, whose unsafe requests
//! must carry the session's CSRF token.
//!
//! Service and browser tokens reach only the routes [`route_scope`] gives a scope; a route
//! it does not list (tokens, sign-in, clean-up, anything added later) admits neither.

use crate::AppState;
use crate::base::workspace::now_ms;
use crate::domain::auth::{Caller, Grant, Purpose, Scope, authenticate, authenticate_service};
use crate::domain::error::{Error, Kind};
use crate::edge::api::ApiError;
use axum::extract::{FromRequestParts, MatchedPath, RawPathParams};
use axum::http::Method;
use axum::http::request::Parts;
use uuid::Uuid;

/// The scope a route belongs to, for service and browser tokens; `None`: users only.
pub fn route_scope(path: &str) -> Option<Scope> {
    Some(match path {
        "/workspaces"
        | "/events"
        | "/workspaces/{id}"
        | "/workspaces/{id}/stop"
        | "/workspaces/{id}/start"
        | "/workspaces/{id}/status"
        | "/workspaces/{id}/events"
        | "/preview/{id}"
        | "/workspaces/{id}/ports"
        | "/workspaces/{id}/ports/{port}/sharing"
        | "/workspaces/{id}/ports/{port}/links"
        | "/workspaces/{id}/ports/{port}/links/{link}"
        | "/workspaces/{id}/keep-awake" => Scope::Workspaces,
        "/workspaces/{id}/terminal" | "/terminal/{id}" | "/workspaces/{id}/sessions" => {
            Scope::Terminal
        }
        "/preview/{id}/{port}" | "/preview/{id}/{port}/" | "/preview/{id}/{port}/{*rest}" => {
            Scope::Preview
        }
        "/workspaces/{id}/exec" => Scope::Exec,
        "/workspaces/{id}/files" | "/workspaces/{id}/files/{*rest}" => Scope::Files,
        "/workspaces/{id}/tickets" => Scope::Tickets,
        _ => return None,
    })
}

/// Names the owner a service token acts for.
pub const OWNER_HEADER: &str = "x-wsh-owner";

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, hub: &AppState) -> Result<Self, ApiError> {
        let caller = Self::from_credentials(parts, hub).await?;
        crate::domain::audit::note_caller(&caller);
        // Only service tokens act on it, but a malformed one is an error whoever sends it.
        if let Some(owner) = parts.headers.get(OWNER_HEADER) {
            crate::domain::auth::check_owner_id(owner.to_str().unwrap_or("\0"))?;
        }
        Ok(caller)
    }
}

impl Caller {
    async fn from_credentials(parts: &mut Parts, hub: &AppState) -> Result<Self, ApiError> {
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip());
        let scope = parts
            .extensions
            .get::<MatchedPath>()
            .and_then(|p| route_scope(p.as_str()));
        let query_ticket = (parts.method == Method::GET)
            .then(|| query_param(parts.uri.query(), "ticket"))
            .flatten();
        let has_bearer = parts
            .headers
            .contains_key(axum::http::header::AUTHORIZATION);
        if has_bearer || query_ticket.is_some() {
            let token = match query_ticket {
                Some(t) if !has_bearer => t,
                _ => bearer(&parts.headers).unwrap_or_default().to_owned(),
            };
            // Only a browser token is bound to the workspace in the path.
            let id = if token.starts_with("wst_") {
                RawPathParams::from_request_parts(parts, hub)
                    .await
                    .ok()
                    .and_then(|params| {
                        params
                            .iter()
                            .find(|(k, _)| *k == "id")
                            .and_then(|(_, v)| Uuid::parse_str(v).ok())
                    })
            } else {
                None
            };
            return token_caller(hub, &parts.headers, &token, peer, scope, id).await;
        }
        let Some(session) = cookie(&parts.headers, SESSION_COOKIE) else {
            return Err(ApiError::unauthorized(
                "sign in, or send Authorization: Bearer <token>",
            ));
        };
        let caller = authenticate(hub, session, peer).await?;
        if !parts.method.is_safe() {
            let given = parts
                .headers
                .get(CSRF_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            if !hub.tickets.check_csrf(session, given) {
                return Err(ApiError::new(
                    axum::http::StatusCode::FORBIDDEN,
                    "csrf",
                    "missing or wrong X-CSRF-Token for this session (GET /session has it)",
                ));
            }
        }
        Ok(caller)
    }
}

/// The caller a bearer token (or a `?ticket=`) makes on a route of `scope` about workspace
/// `id`: a user, a service token acting for the owner in `X-Wsh-Owner`, or a browser token
/// that is genuine, unexpired and for this route's purpose and workspace (ownership was
/// checked when it was issued; `authorize` checks it again).
pub async fn token_caller(
    hub: &crate::Hub,
    headers: &axum::http::HeaderMap,
    token: &str,
    peer: Option<std::net::IpAddr>,
    scope: Option<Scope>,
    id: Option<Uuid>,
) -> Result<Caller, ApiError> {
    if token.starts_with("wsh_svc_") {
        let owner = headers
            .get(OWNER_HEADER)
            .map(|v| v.to_str().unwrap_or_default());
        return Ok(authenticate_service(hub, token, peer, owner, scope).await?);
    }
    if !token.starts_with("wst_") {
        return Ok(authenticate(hub, token, peer).await?);
    }
    let purpose = Purpose::ALL
        .into_iter()
        .find(|p| Some(p.scope()) == scope)
        .ok_or_else(|| {
            Error::new(
                Kind::Forbidden,
                "scope",
                "a browser token opens only its own purpose on its own workspace",
            )
        })?;
    let id = id.ok_or_else(|| ApiError::not_found("workspace"))?;
    let owner = hub.tickets.verify(token, id, purpose, now_ms())?;
    Ok(Caller {
        owner_id: owner,
        email: None,
        admin: false,
        grant: Grant::Ticket {
            workspace: id,
            purpose,
        },
    })
}

/// The value of a query parameter.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The browser session cookie: an API token minted at sign-in.
pub const SESSION_COOKIE: &str = "wsh_session";
/// State-changing requests authenticated by the cookie must repeat the CSRF token here.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The bearer token of an `Authorization` header.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// The value of a cookie.
pub fn cookie<'a>(headers: &'a axum::http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then_some(v)
        })
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_by_exact_name() {
        let mut headers = axum::http::HeaderMap::new();
        headers.append("cookie", "a=1; wsh_session_x=2".parse().unwrap());
        headers.append("cookie", "wsh_session=abc".parse().unwrap());
        assert_eq!(cookie(&headers, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&headers, "a"), Some("1"));
        assert_eq!(cookie(&headers, "b"), None);
    }
}
