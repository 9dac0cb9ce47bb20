//! Who is calling: API tokens (random, stored only as SHA-256 hashes).
//!
//! Every handler that touches a workspace takes a [`Caller`] and goes through
//! [`Caller::authorize`]; a workspace that is not the caller's reads as "not found".

use crate::agents::token_hash;
use crate::api::ApiError;
use crate::store::ApiToken;
use crate::workspace::{Workspace, now_ms};
use crate::{AppState, ca};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub owner_id: String,
}

impl Caller {
    /// The one ownership check: a non-owner learns nothing, not even that it exists.
    pub fn authorize(&self, ws: Workspace) -> Result<Workspace, ApiError> {
        if ws.owner_id == self.owner_id {
            Ok(ws)
        } else {
            Err(ApiError::not_found("workspace"))
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, hub: &AppState) -> Result<Self, ApiError> {
        let token = match parts.headers.get(axum::http::header::AUTHORIZATION) {
            Some(header) => header
                .to_str()
                .ok()
                .and_then(|h| h.strip_prefix("Bearer "))
                .map(str::trim)
                .map(str::to_owned),
            // Browsers cannot set headers on a WebSocket: there, and only there, the token
            // may come as `access_token` in the query.
            None if is_websocket(parts) => websocket_token(parts),
            None => return Err(ApiError::unauthorized("missing bearer token")),
        };
        authenticate(hub, token.as_deref().unwrap_or_default()).await
    }
}

/// The one place an API token becomes a [`Caller`] (HTTP, WebSocket and the CLI's QUIC).
pub async fn authenticate(hub: &crate::Hub, token: &str) -> Result<Caller, ApiError> {
    if token.is_empty() || token.len() > 256 {
        return Err(ApiError::unauthorized("malformed or missing token"));
    }
    let record = hub
        .store
        .find_api_token(&token_hash(token))
        .await
        .map_err(ApiError::from)?
        .ok_or_else(|| ApiError::unauthorized("invalid token"))?;
    if record.expires_at.is_some_and(|at| at <= now_ms()) {
        return Err(ApiError::unauthorized("token expired"));
    }
    Ok(Caller {
        owner_id: record.owner_id,
    })
}

fn is_websocket(parts: &Parts) -> bool {
    parts
        .headers
        .get(axum::http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

fn websocket_token(parts: &Parts) -> Option<String> {
    parts
        .uri
        .query()?
        .split('&')
        .find_map(|pair| pair.strip_prefix("access_token=").map(str::to_owned))
}

/// Mints a new API token for `owner_id`; only its hash is stored. Returns the token.
pub async fn mint_api_token(
    hub: &crate::Hub,
    owner_id: &str,
    name: &str,
    expires_at: Option<i64>,
) -> anyhow::Result<String> {
    let token = format!("wsh_{}", ca::hex(&ca::random_bytes::<24>()));
    hub.store
        .insert_api_token(
            &token_hash(&token),
            &ApiToken {
                owner_id: owner_id.to_owned(),
                name: name.to_owned(),
                expires_at,
            },
        )
        .await?;
    Ok(token)
}
