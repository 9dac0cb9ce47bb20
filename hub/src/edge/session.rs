//! Browser sessions: sign-in (OIDC, or a one-time link in dev mode), the session cookie,
//! `GET /session` (who am I, and the CSRF token) and sign-out.
//!
//! A session is an API token minted at sign-in and kept in the `wsh_session` cookie
//! (`HttpOnly`, `SameSite=Lax`, `Secure` when the hub's public URL is https), so sessions
//! and CLI tokens share one store, one expiry rule and one revocation path.

use crate::domain::auth::Caller;
use crate::edge::api::{ApiError, ErrorBody};
use crate::edge::caller::{SESSION_COOKIE, cookie};
use crate::{AppState, Hub, base::ca};
use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How long a browser session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Binds an OIDC sign-in to the browser that started it.
const LOGIN_COOKIE: &str = "wsh_login";
/// How long a one-time sign-in link works.
const LINK_TTL: Duration = Duration::from_secs(15 * 60);

/// The ticket purpose of one-time sign-in links.
const LINK_PURPOSE: &str = "login-link";

/// A one-time sign-in link code for `subject` (dev mode): a ticket signed with the hub's
/// key, so any replica accepts it; its first use is recorded in the store (a grant), so it
/// signs in once.
pub fn login_link(hub: &Hub, subject: &str) -> String {
    let nonce = ca::hex(&ca::random_bytes::<16>());
    let expires = crate::base::workspace::now_ms() + LINK_TTL.as_millis() as i64;
    hub.tickets
        .issue_scoped(&format!("login-{nonce}"), subject, LINK_PURPOSE, expires)
        .0
}

/// The subject of a genuine, unexpired, unused link; marks it used.
async fn redeem_link(hub: &Hub, code: &str) -> Result<String, ApiError> {
    let unknown = || ApiError::unauthorized("this sign-in link is unknown, used or expired");
    let now = crate::base::workspace::now_ms();
    let scope = code
        .strip_prefix("wst_")
        .and_then(|body| body.split('.').next())
        .filter(|scope| scope.starts_with("login-"))
        .ok_or_else(unknown)?;
    let subject = hub
        .tickets
        .verify_scoped(code, scope, LINK_PURPOSE, now)
        .map_err(|_| unknown())?;
    let used_until = now + LINK_TTL.as_millis() as i64;
    match hub
        .store
        .put_grant(LINK_PURPOSE, scope, "used", now, used_until)
        .await
    {
        Ok(()) => Ok(subject),
        Err(crate::store::StoreError::AlreadyExists) => Err(unknown()),
        Err(e) => Err(e.into()),
    }
}

fn cookie_header(hub: &Hub, name: &str, value: &str, path: &str, max_age: Duration) -> HeaderValue {
    let secure = if hub.public_url.starts_with("https://") {
        "; Secure"
    } else {
        ""
    };
    let value = format!(
        "{name}={value}; Path={path}; HttpOnly; SameSite=Lax; Max-Age={}{secure}",
        max_age.as_secs()
    );
    HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static(""))
}

fn redirect(to: &str, cookies: Vec<HeaderValue>) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(location) = HeaderValue::from_str(to) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    for c in cookies {
        response.headers_mut().append(header::SET_COOKIE, c);
    }
    response
}

/// Starts a session for `subject`: a token in the store, and the cookie that carries it.
/// `via` says how they signed in (the audit log's `oidc` or `link`).
async fn start_session(
    hub: &Hub,
    subject: &str,
    email: Option<&str>,
    via: &str,
) -> Result<HeaderValue, ApiError> {
    crate::domain::audit::note_actor(subject, via);
    let expires_at = crate::base::workspace::now_ms() + SESSION_TTL.as_millis() as i64;
    let token = crate::domain::auth::mint_api_token(
        hub,
        subject,
        email,
        "browser session",
        Some(expires_at),
        None,
    )
    .await
    .map_err(|e| ApiError::internal("start session", e))?;
    tracing::info!(owner = %subject, "browser signed in");
    Ok(cookie_header(hub, SESSION_COOKIE, &token, "/", SESSION_TTL))
}

fn oidc(hub: &Hub) -> Result<&crate::edge::oidc::Oidc, ApiError> {
    hub.oidc.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "sign_in_not_configured",
            "this hub has no identity provider ([oidc] in its config); use a token or a dev sign-in link",
        )
    })
}

fn redirect_uri(hub: &Hub) -> String {
    format!("{}/login/callback", hub.public_url)
}

/// `GET /login`: off to the identity provider.
#[utoipa::path(get, path = "/login", tag = "auth", responses((status = 303, description = "Redirect to the identity provider"), (status = 404, description = "No identity provider configured", body = ErrorBody)))]
pub async fn login(State(hub): State<AppState>) -> Result<Response, ApiError> {
    let started = oidc(&hub)?
        .begin(hub.store.as_ref(), &redirect_uri(&hub))
        .await?;
    let bind = cookie_header(
        &hub,
        LOGIN_COOKIE,
        &started.state,
        "/login",
        Duration::from_secs(600),
    );
    Ok(redirect(&started.url, vec![bind]))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Callback {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

/// `GET /login/callback`: the identity provider sends the browser back here.
#[utoipa::path(get, path = "/login/callback", tag = "auth", params(Callback), responses((status = 303, description = "Signed in: session cookie set, back to the web UI"), (status = 400, description = "Unknown, expired or foreign sign-in", body = ErrorBody), (status = 401, description = "The identity provider or its token was refused", body = ErrorBody), (status = 404, description = "No identity provider configured (`sign_in_not_configured`)", body = ErrorBody)))]
pub async fn callback(
    State(hub): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<Callback>,
) -> Result<Response, ApiError> {
    let oidc = oidc(&hub)?;
    if let Some(error) = q.error {
        let error: String = error
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(64)
            .collect();
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "login_failed",
            format!("the identity provider ended the sign-in: {error}"),
        ));
    }
    let (Some(code), Some(state)) = (q.code, q.state) else {
        return Err(ApiError::invalid("code and state are required"));
    };
    // The state must be the one this browser was given at `GET /login` (login CSRF).
    if cookie(&headers, LOGIN_COOKIE) != Some(state.as_str()) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "login_state_mismatch",
            "this sign-in was not started in this browser; start again",
        ));
    }
    let who = oidc
        .finish(hub.store.as_ref(), &state, &code, &redirect_uri(&hub))
        .await?;
    let session = start_session(&hub, &who.subject, who.email.as_deref(), "oidc").await?;
    let clear = cookie_header(&hub, LOGIN_COOKIE, "", "/login", Duration::ZERO);
    Ok(redirect("/", vec![session, clear]))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Once {
    code: String,
}

/// `GET /login/once?code=`: a one-time sign-in link (printed by `workspace-hub dev`).
#[utoipa::path(get, path = "/login/once", tag = "auth", params(Once), responses((status = 303, description = "Signed in: session cookie set"), (status = 400, description = "No `code`", body = ErrorBody), (status = 401, description = "Unknown, used or expired link", body = ErrorBody)))]
pub async fn once(
    State(hub): State<AppState>,
    Query(q): Query<Once>,
) -> Result<Response, ApiError> {
    let subject = redeem_link(&hub, &q.code).await?;
    let session = start_session(&hub, &subject, None, "link").await?;
    Ok(redirect("/", vec![session]))
}

/// `GET /session`: who is signed in.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SessionView {
    pub owner_id: String,
    pub email: Option<String>,
    pub admin: bool,
    /// For cookie sessions: send it as `X-CSRF-Token` on every POST and DELETE.
    pub csrf_token: Option<String>,
}

#[utoipa::path(get, path = "/session", tag = "auth", security(("bearer" = [])), responses((status = 200, description = "The caller", body = SessionView), (status = 401, description = "Not signed in", body = ErrorBody)))]
pub async fn whoami(
    State(hub): State<AppState>,
    headers: HeaderMap,
    caller: Caller,
) -> Json<SessionView> {
    let csrf_token = match (
        crate::edge::caller::bearer(&headers),
        cookie(&headers, SESSION_COOKIE),
    ) {
        (None, Some(session)) => Some(hub.tickets.csrf(session)),
        _ => None,
    };
    Json(SessionView {
        owner_id: caller.owner_id,
        email: caller.email,
        admin: caller.admin,
        csrf_token,
    })
}

/// `POST /logout`: ends the browser session (its token is revoked) and clears the cookie.
#[utoipa::path(post, path = "/logout", tag = "auth", security(("bearer" = [])), responses((status = 204, description = "Signed out"), (status = 401, description = "Not signed in", body = ErrorBody), (status = 403, description = "Missing CSRF token", body = ErrorBody)))]
pub async fn logout(
    State(hub): State<AppState>,
    headers: HeaderMap,
    _caller: Caller,
) -> Result<Response, ApiError> {
    if let Some(session) = cookie(&headers, SESSION_COOKIE) {
        match hub
            .store
            .delete_api_token(&crate::domain::auth::token_hash(session))
            .await
        {
            Ok(()) | Err(crate::store::StoreError::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().append(
        header::SET_COOKIE,
        cookie_header(&hub, SESSION_COOKIE, "", "/", Duration::ZERO),
    );
    Ok(response)
}
