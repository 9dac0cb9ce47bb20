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
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub owner_id: String,
    /// Team mode: an admin (listed in `admins`) sees and acts on every workspace.
    pub admin: bool,
}

impl Caller {
    /// Whose workspaces the caller lists: their own, or everyone's for an admin.
    pub fn scope(&self) -> Option<&str> {
        (!self.admin).then_some(self.owner_id.as_str())
    }

    /// The one ownership check: a non-owner learns nothing, not even that it exists.
    pub fn authorize(&self, ws: Workspace) -> Result<Workspace, ApiError> {
        if self.admin || ws.owner_id == self.owner_id {
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
            None => None,
        };
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip());
        authenticate(hub, token.as_deref().unwrap_or_default(), peer).await
    }
}

/// Failed authentications a client address may make per [`FAILURE_WINDOW`].
pub const MAX_FAILURES: u32 = 20;
pub const FAILURE_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// Failed authentications per client address, for rate limiting.
#[derive(Debug, Default)]
pub struct Failures(std::sync::Mutex<HashMap<IpAddr, (u32, Instant)>>);

impl Failures {
    fn blocked(&self, ip: IpAddr, now: Instant) -> bool {
        let Ok(map) = self.0.lock() else { return false };
        map.get(&ip).is_some_and(|(n, since)| {
            *n >= MAX_FAILURES && now.duration_since(*since) < FAILURE_WINDOW
        })
    }

    fn record(&self, ip: IpAddr, now: Instant) {
        let Ok(mut map) = self.0.lock() else { return };
        if map.len() > 100_000 {
            map.retain(|_, (_, since)| now.duration_since(*since) < FAILURE_WINDOW);
        }
        let entry = map.entry(ip).or_insert((0, now));
        if now.duration_since(entry.1) >= FAILURE_WINDOW {
            *entry = (0, now);
        }
        entry.0 += 1;
    }
}

/// The one place an API token becomes a [`Caller`] (HTTP, WebSocket and the CLI's QUIC).
/// Failures are counted per client address; past [`MAX_FAILURES`] a minute, the address
/// gets `429` without its token being looked at.
pub async fn authenticate(
    hub: &crate::Hub,
    token: &str,
    peer: Option<IpAddr>,
) -> Result<Caller, ApiError> {
    let now = Instant::now();
    if peer.is_some_and(|ip| hub.auth_failures.blocked(ip, now)) {
        return Err(ApiError::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "too_many_failures",
            "too many failed authentications from this address; try again in a minute",
        ));
    }
    let result = check_token(hub, token).await;
    if let (Err(e), Some(ip)) = (&result, peer)
        && e.code() == "unauthorized"
    {
        hub.auth_failures.record(ip, now);
    }
    result
}

async fn check_token(hub: &crate::Hub, token: &str) -> Result<Caller, ApiError> {
    if token.is_empty() {
        return Err(ApiError::unauthorized("missing bearer token"));
    }
    if token.len() > 256 {
        return Err(ApiError::unauthorized("malformed token"));
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
        admin: hub.config.admins.contains(&record.owner_id),
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
