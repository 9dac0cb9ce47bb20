//! The caller of an HTTP request: a bearer token (CLI, scripts) or the browser's session
//! cookie, whose unsafe requests must carry the session's CSRF token.

use crate::AppState;
use crate::domain::auth::{Caller, authenticate};
use crate::edge::api::ApiError;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, hub: &AppState) -> Result<Self, ApiError> {
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip());
        if parts
            .headers
            .contains_key(axum::http::header::AUTHORIZATION)
        {
            let token = bearer(&parts.headers).unwrap_or_default();
            return Ok(authenticate(hub, token, peer).await?);
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

/// `Option<Caller>`: `None` when the request carries no `Authorization` header at all (the
/// terminal then looks for a ticket); a header that does not authenticate is an error.
impl axum::extract::OptionalFromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        hub: &AppState,
    ) -> Result<Option<Self>, ApiError> {
        if !parts
            .headers
            .contains_key(axum::http::header::AUTHORIZATION)
        {
            return Ok(None);
        }
        <Caller as FromRequestParts<AppState>>::from_request_parts(parts, hub)
            .await
            .map(Some)
    }
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
