//! The caller's profile over HTTP: SSH public keys (`/ssh-keys`) and dotfiles
//! (`/dotfiles`). A change reaches every workspace of the caller's through its agent.

use crate::AppState;
use crate::base::workspace::now_ms;
use crate::domain::auth::Caller;
use crate::edge::api::{ApiError, ErrorBody, ValidJson};
use crate::store::{DotfilesSetting, SshKey};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;

/// A key to add.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// An OpenSSH public key line, as in `~/.ssh/id_ed25519.pub`: type, base64 key,
    /// optional comment. Types: ssh-ed25519, ssh-rsa, ecdsa-sha2-nistp256/384/521 and the
    /// security-key forms; no options.
    #[schema(max_length = 16384)]
    pub key: String,
}

/// Tells the caller's agents (here and on the other replicas).
async fn spread(hub: &crate::Hub, owner: &str) {
    if let Err(e) = crate::links::agents::profile_changed(hub, owner).await {
        // Saved all the same: agents get it on their next connection.
        tracing::warn!(error = %e, "profile change not sent to every agent");
    }
}

#[utoipa::path(get, path = "/ssh-keys", tag = "profile", security(("bearer" = [])), responses(
    (status = 200, description = "The caller's SSH public keys (they reach every workspace's `~/.ssh/authorized_keys`)", body = [SshKey]),
    (status = 401, description = "Missing or bad token", body = ErrorBody)))]
pub async fn list_keys(
    State(hub): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<SshKey>>, ApiError> {
    Ok(Json(
        hub.store.get_profile(&caller.owner_id).await?.ssh_keys,
    ))
}

#[utoipa::path(post, path = "/ssh-keys", tag = "profile", security(("bearer" = [])), request_body = NewKey, responses(
    (status = 201, description = "Added; every workspace of the caller's gets it (running ones at once)", body = SshKey),
    (status = 400, description = "`bad_key`: not one OpenSSH public key line of a known type", body = ErrorBody),
    (status = 401, description = "Missing or bad token", body = ErrorBody),
    (status = 409, description = "`key_exists` or `too_many_keys` (50)", body = ErrorBody),
    (status = 415, description = "Not JSON", body = ErrorBody)))]
pub async fn add_key(
    State(hub): State<AppState>,
    caller: Caller,
    ValidJson(req): ValidJson<NewKey>,
) -> Result<(StatusCode, Json<SshKey>), ApiError> {
    let (_, key) =
        crate::domain::profile::add_key(&hub, &caller.owner_id, &req.key, now_ms()).await?;
    tracing::info!(owner = %caller.owner_id, key = %key.id, "ssh key added");
    spread(&hub, &caller.owner_id).await;
    Ok((StatusCode::CREATED, Json(key)))
}

#[utoipa::path(delete, path = "/ssh-keys/{id}", tag = "profile", security(("bearer" = [])),
    params(("id" = String, Path, description = "The key's fingerprint, `SHA256:...` (percent-encode `/` and `+`)")),
    responses(
    (status = 204, description = "Removed from the caller's workspaces"),
    (status = 401, description = "Missing or bad token", body = ErrorBody),
    (status = 404, description = "No such key of yours", body = ErrorBody)))]
pub async fn remove_key(
    State(hub): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    crate::domain::profile::remove_key(&hub, &caller.owner_id, &id).await?;
    tracing::info!(owner = %caller.owner_id, key = %id, "ssh key removed");
    spread(&hub, &caller.owner_id).await;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/dotfiles", tag = "profile", security(("bearer" = [])), responses(
    (status = 200, description = "The caller's dotfiles repository, `null` when none is set", body = Option<DotfilesSetting>),
    (status = 401, description = "Missing or bad token", body = ErrorBody)))]
pub async fn get_dotfiles(
    State(hub): State<AppState>,
    caller: Caller,
) -> Result<Json<Option<DotfilesSetting>>, ApiError> {
    Ok(Json(
        hub.store.get_profile(&caller.owner_id).await?.dotfiles,
    ))
}

#[utoipa::path(put, path = "/dotfiles", tag = "profile", security(("bearer" = [])), request_body = DotfilesSetting, responses(
    (status = 200, description = "Set: cloned and installed once in every workspace of the caller's that has not installed dotfiles yet (running ones at once, new ones on first boot)", body = DotfilesSetting),
    (status = 400, description = "Bad repository URL or install command", body = ErrorBody),
    (status = 401, description = "Missing or bad token", body = ErrorBody),
    (status = 415, description = "Not JSON", body = ErrorBody)))]
pub async fn set_dotfiles(
    State(hub): State<AppState>,
    caller: Caller,
    ValidJson(req): ValidJson<DotfilesSetting>,
) -> Result<Json<DotfilesSetting>, ApiError> {
    crate::domain::profile::set_dotfiles(&hub, &caller.owner_id, Some(req.clone())).await?;
    tracing::info!(owner = %caller.owner_id, repo = %req.repo, "dotfiles set");
    spread(&hub, &caller.owner_id).await;
    Ok(Json(req))
}

#[utoipa::path(delete, path = "/dotfiles", tag = "profile", security(("bearer" = [])), responses(
    (status = 204, description = "Cleared: new workspaces install none (those that did keep theirs)"),
    (status = 401, description = "Missing or bad token", body = ErrorBody)))]
pub async fn clear_dotfiles(
    State(hub): State<AppState>,
    caller: Caller,
) -> Result<StatusCode, ApiError> {
    crate::domain::profile::set_dotfiles(&hub, &caller.owner_id, None).await?;
    Ok(StatusCode::NO_CONTENT)
}
