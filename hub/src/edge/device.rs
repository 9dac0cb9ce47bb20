//! Device-code sign-in for the CLI (`wsh login`), after RFC 8628: the CLI asks for a code
//! pair, the user approves the short code in a signed-in browser, and the CLI's polling
//! turns into an API token minted for that user. Pending sign-ins are store grants (kind
//! `device`, keyed by the user code, ten minutes), so any replica answers any step; a device
//! code yields at most one token.

use crate::base::workspace::now_ms;
use crate::domain::auth::Caller;
use crate::edge::api::{ApiError, ValidJson};
use crate::store::StoreError;
use crate::{AppState, base::ca};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use std::time::Duration;

const CODE_TTL: Duration = Duration::from_secs(600);
/// The store grant kind of pending device sign-ins.
const GRANT: &str = "device";
/// Letters that cannot be misread for one another or spell much.
const USER_CODE_ALPHABET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";

/// A pending sign-in as the store keeps it (JSON).
#[derive(Debug, Serialize, Deserialize)]
struct Pending {
    /// SHA-256 of the device code's secret part.
    secret_hash: String,
    /// The approving user: subject and verified e-mail.
    approved_by: Option<(String, Option<String>)>,
}

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

/// `XXXX-XXXX` in the user-code alphabet (what [`user_code`] makes).
fn valid_user_code(code: &str) -> bool {
    code.len() == 9
        && code.bytes().enumerate().all(|(i, b)| {
            if i == 4 {
                b == b'-'
            } else {
                USER_CODE_ALPHABET.contains(&b)
            }
        })
}

fn encode(pending: &Pending) -> Result<String, ApiError> {
    serde_json::to_string(pending).map_err(|e| ApiError::internal("device sign-in", e))
}

#[utoipa::path(post, path = "/login/device", tag = "auth", responses((status = 200, description = "A code pair for `wsh login`", body = DeviceCode), (status = 503, description = "No free sign-in code; try again", body = crate::edge::api::ErrorBody)))]
pub async fn start(State(hub): State<AppState>) -> Result<Json<DeviceCode>, ApiError> {
    let secret = ca::hex(&ca::random_bytes::<32>());
    let payload = encode(&Pending {
        secret_hash: crate::domain::auth::token_hash(&secret),
        approved_by: None,
    })?;
    let now = now_ms();
    // 20^8 user codes: a collision with a pending one is rare; try a few.
    for _ in 0..4 {
        let code = user_code();
        match hub
            .store
            .put_grant(
                GRANT,
                &code,
                &payload,
                now,
                now + CODE_TTL.as_millis() as i64,
            )
            .await
        {
            Ok(()) => {
                return Ok(Json(DeviceCode {
                    device_code: format!("{code}.{secret}"),
                    verification_uri: format!("/#device={code}"),
                    user_code: code,
                    expires_in: CODE_TTL.as_secs(),
                    interval: 1,
                }));
            }
            Err(StoreError::AlreadyExists) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "busy",
        "no free sign-in code; try again shortly",
    ))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Approve {
    pub user_code: String,
}

#[utoipa::path(post, path = "/login/device/approve", tag = "auth", security(("bearer" = [])), request_body = Approve, responses((status = 204, description = "Approved: the CLI receives a token for you"), (status = 401, description = "Missing or bad token", body = crate::edge::api::ErrorBody), (status = 404, description = "No such pending code", body = crate::edge::api::ErrorBody)))]
pub async fn approve(
    State(hub): State<AppState>,
    caller: Caller,
    ValidJson(req): ValidJson<Approve>,
) -> Result<StatusCode, ApiError> {
    let code = req.user_code.trim().to_ascii_uppercase();
    let not_found = || ApiError::not_found("sign-in code");
    if !valid_user_code(&code) {
        return Err(not_found());
    }
    let now = now_ms();
    let current = hub
        .store
        .get_grant(GRANT, &code, now)
        .await?
        .ok_or_else(not_found)?;
    let pending: Pending = serde_json::from_str(&current).map_err(|_| not_found())?;
    if pending.approved_by.is_some() {
        return Err(not_found());
    }
    let approved = encode(&Pending {
        approved_by: Some((caller.owner_id, caller.email)),
        ..pending
    })?;
    if !hub
        .store
        .swap_grant(GRANT, &code, &current, &approved, now)
        .await?
    {
        return Err(not_found());
    }
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

#[utoipa::path(post, path = "/login/device/token", tag = "auth", request_body = Poll, responses((status = 200, description = "Approved: a new API token (once)", body = DeviceToken), (status = 400, description = "`authorization_pending`, `expired_token` or an unknown code", body = crate::edge::api::ErrorBody)))]
pub async fn poll(
    State(hub): State<AppState>,
    ValidJson(req): ValidJson<Poll>,
) -> Result<Json<DeviceToken>, ApiError> {
    let unknown = || {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "expired_token",
            "the sign-in code is unknown or expired; run `wsh login` again",
        )
    };
    let (code, secret) = req
        .device_code
        .split_once('.')
        .filter(|(code, _)| valid_user_code(code))
        .ok_or_else(unknown)?;
    let now = now_ms();
    let current = hub
        .store
        .get_grant(GRANT, code, now)
        .await?
        .ok_or_else(unknown)?;
    let pending: Pending = serde_json::from_str(&current).map_err(|_| unknown())?;
    let given = crate::domain::auth::token_hash(secret);
    if aws_lc_rs::constant_time::verify_slices_are_equal(
        given.as_bytes(),
        pending.secret_hash.as_bytes(),
    )
    .is_err()
    {
        return Err(unknown());
    }
    let Some((owner, email)) = pending.approved_by else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "authorization_pending",
            "waiting for approval in the browser",
        ));
    };
    crate::domain::audit::note_actor(&owner, "device");
    // Of concurrent polls, one takes it.
    if hub
        .store
        .take_grant(GRANT, code, Some(&current), now)
        .await?
        .is_none()
    {
        return Err(unknown());
    }
    let expires_at = now + 90 * 24 * 3600 * 1000;
    let token = crate::domain::auth::mint_api_token(
        &hub,
        &owner,
        email.as_deref(),
        "wsh login",
        Some(expires_at),
        None,
    )
    .await
    .map_err(|e| ApiError::internal("mint token", e))?;
    tracing::info!(owner = %owner, "CLI signed in with a device code");
    Ok(Json(DeviceToken {
        token,
        owner_id: owner,
        expires_at: crate::edge::api::rfc3339(expires_at),
    }))
}
