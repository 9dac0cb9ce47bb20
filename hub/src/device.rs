//! Device-code sign-in for the CLI (`wsh login`), after RFC 8628: the CLI asks for a code
//! pair, the user approves the short code in a signed-in browser, and the CLI's polling
//! turns into an API token minted for that user. Pending codes live in memory for ten
//! minutes; a device code yields at most one token.

use crate::api::{ApiError, ValidJson};
use crate::auth::Caller;
use crate::{AppState, ca};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const CODE_TTL: Duration = Duration::from_secs(600);
/// At most this many sign-ins may be pending at once (a bound on memory, not on users).
const MAX_PENDING: usize = 10_000;
/// Letters that cannot be misread for one another or spell much.
const USER_CODE_ALPHABET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";

#[derive(Debug)]
struct Pending {
    user_code: String,
    created: Instant,
    /// The approving user: subject and verified e-mail.
    approved_by: Option<(String, Option<String>)>,
}

/// Sign-ins waiting for approval, by device code.
#[derive(Debug, Default)]
pub struct DeviceLogins(Mutex<HashMap<String, Pending>>);

/// What `POST /login/device` answers.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeviceCode {
    /// The CLI's secret for polling.
    pub device_code: String,
    /// What the user approves in the browser (`XXXX-XXXX`).
    pub user_code: String,
    /// Where the user approves it (the web UI, signed in).
    pub verification_uri: String,
    pub expires_in: u64,
    /// Seconds between polls.
    pub interval: u64,
}

fn user_code() -> String {
    let bytes = ca::random_bytes::<8>();
    let mut code: String = bytes
        .iter()
        .map(|b| USER_CODE_ALPHABET[*b as usize % USER_CODE_ALPHABET.len()] as char)
        .collect();
    code.insert(4, '-');
    code
}

#[utoipa::path(post, path = "/login/device", tag = "auth", responses((status = 200, description = "A code pair for `wsh login`", body = DeviceCode), (status = 503, description = "Too many sign-ins pending", body = crate::api::ErrorBody)))]
pub async fn start(State(hub): State<AppState>) -> Result<Json<DeviceCode>, ApiError> {
    let mut pending = hub.device_logins.0.lock().map_err(|_| busy())?;
    pending.retain(|_, p| p.created.elapsed() < CODE_TTL);
    if pending.len() >= MAX_PENDING {
        return Err(busy());
    }
    let device_code = ca::hex(&ca::random_bytes::<32>());
    let code = user_code();
    pending.insert(
        device_code.clone(),
        Pending {
            user_code: code.clone(),
            created: Instant::now(),
            approved_by: None,
        },
    );
    Ok(Json(DeviceCode {
        device_code,
        verification_uri: format!("/#device={code}"),
        user_code: code,
        expires_in: CODE_TTL.as_secs(),
        interval: 1,
    }))
}

fn busy() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "busy",
        "too many sign-ins pending; try again shortly",
    )
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Approve {
    pub user_code: String,
}

#[utoipa::path(post, path = "/login/device/approve", tag = "auth", security(("bearer" = [])), request_body = Approve, responses((status = 204, description = "Approved: the CLI receives a token for you"), (status = 401, description = "Missing or bad token", body = crate::api::ErrorBody), (status = 404, description = "No such pending code", body = crate::api::ErrorBody)))]
pub async fn approve(
    State(hub): State<AppState>,
    caller: Caller,
    ValidJson(req): ValidJson<Approve>,
) -> Result<StatusCode, ApiError> {
    let code = req.user_code.trim().to_ascii_uppercase();
    let mut pending = hub.device_logins.0.lock().map_err(|_| busy())?;
    let entry = pending
        .values_mut()
        .find(|p| p.user_code == code && p.created.elapsed() < CODE_TTL && p.approved_by.is_none())
        .ok_or_else(|| ApiError::not_found("sign-in code"))?;
    entry.approved_by = Some((caller.owner_id, caller.email));
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Poll {
    pub device_code: String,
}

/// The token a finished sign-in yields.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeviceToken {
    pub token: String,
    pub owner_id: String,
    pub expires_at: String,
}

#[utoipa::path(post, path = "/login/device/token", tag = "auth", request_body = Poll, responses((status = 200, description = "Approved: a new API token (once)", body = DeviceToken), (status = 400, description = "`authorization_pending`, `expired_token` or an unknown code", body = crate::api::ErrorBody)))]
pub async fn poll(
    State(hub): State<AppState>,
    ValidJson(req): ValidJson<Poll>,
) -> Result<Json<DeviceToken>, ApiError> {
    let (owner, email) = {
        let mut pending = hub.device_logins.0.lock().map_err(|_| busy())?;
        let entry = pending
            .get(&req.device_code)
            .ok_or_else(|| ApiError::invalid("unknown device code"))?;
        if entry.created.elapsed() >= CODE_TTL {
            pending.remove(&req.device_code);
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "expired_token",
                "the sign-in code expired; run `wsh login` again",
            ));
        }
        let Some(owner) = entry.approved_by.clone() else {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "authorization_pending",
                "waiting for approval in the browser",
            ));
        };
        pending.remove(&req.device_code);
        owner
    };
    let expires_at = crate::workspace::now_ms() + 90 * 24 * 3600 * 1000;
    let token = crate::auth::mint_api_token(
        &hub,
        &owner,
        email.as_deref(),
        "wsh login",
        Some(expires_at),
    )
    .await
    .map_err(|e| ApiError::internal("mint token", e))?;
    tracing::info!(owner = %owner, "CLI signed in with a device code");
    Ok(Json(DeviceToken {
        token,
        owner_id: owner,
        expires_at: crate::api::rfc3339(expires_at),
    }))
}
