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
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| ApiError::unauthorized("missing bearer token"))?;
        let token = header
            .strip_prefix("Bearer ")
            .map(str::trim)
            .filter(|t| !t.is_empty() && t.len() <= 256)
            .ok_or_else(|| ApiError::unauthorized("malformed authorization header"))?;
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
