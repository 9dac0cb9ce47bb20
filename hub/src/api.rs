//! The HTTP API and web UI. [`app`] builds the router; [`ApiError`] is the one error type,
//! rendered as `{"error": {"code", "message"}}` with the matching status.

use crate::agents::{AgentInfo, token_hash};
use crate::auth::Caller;
use crate::provider::InstanceSpec;
use crate::store::StoreError;
use crate::workspace::{Metadata, Status, Workspace, now_ms};
use crate::{AppState, ca};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use protocol::bootstrap::AgentBootstrap;
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

/// Request bodies larger than this are refused before they are read.
const BODY_LIMIT: usize = 64 * 1024;

/// Builds the router.
pub fn app(hub: AppState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/assets/{file}", get(asset))
        .route("/ca.pem", get(ca_pem))
        .route("/healthz", get(healthz))
        .route("/version", get(version))
        .route("/workspaces", get(list_workspaces).post(create_workspace))
        .route("/workspaces/{id}", get(get_workspace))
        .route("/workspaces/{id}/terminal", get(crate::terminal::terminal))
        .route("/terminal/{id}", get(crate::terminal::terminal))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(hub)
}

/// The API's error: a status, a stable machine-readable code and a human message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    pub fn unauthorized(message: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// The human-readable message (safe to show to the caller).
    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    fn internal(context: &str, e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "{context}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => ApiError::not_found("workspace"),
            StoreError::Conflict { current } => ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("workspace is {}", current.as_str()),
            ),
            StoreError::AlreadyExists => {
                ApiError::new(StatusCode::CONFLICT, "already_exists", "already exists")
            }
            StoreError::Backend(e) => ApiError::internal("store", e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, Json(body)).into_response()
    }
}

/// JSON body extractor whose rejections are [`ApiError`]s.
pub struct ValidJson<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for ValidJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ValidJson(v)),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "expected Content-Type: application/json",
            )),
            Err(JsonRejection::BytesRejection(_)) => Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("request body exceeds {BODY_LIMIT} bytes"),
            )),
            Err(e) => Err(ApiError::invalid(e.body_text())),
        }
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found("route")
}

async fn index() -> Html<&'static str> {
    Html(include_str!("web/index.html"))
}

/// The front-end files embedded in the binary.
async fn asset(Path(file): Path<String>) -> Result<Response, ApiError> {
    let (body, content_type): (&'static [u8], &str) = match file.as_str() {
        "xterm.js" => (include_bytes!("web/vendor/xterm.js"), "text/javascript"),
        "addon-fit.js" => (include_bytes!("web/vendor/addon-fit.js"), "text/javascript"),
        "xterm.css" => (include_bytes!("web/vendor/xterm.css"), "text/css"),
        _ => return Err(ApiError::not_found("asset")),
    };
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, content_type),
            (axum::http::header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response())
}

/// The hub CA certificate (public): clients pin it for the hub's QUIC endpoint.
async fn ca_pem(State(hub): State<AppState>) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-pem-file")],
        hub.ca.cert_pem().to_owned(),
    )
        .into_response()
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn version(State(hub): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "protocol_version": protocol::PROTOCOL_VERSION,
        "min_protocol_version": protocol::MIN_PROTOCOL_VERSION,
        "provider": hub.provider.name(),
        "quic_addr": hub.agent_hub_addr,
        "server_name": hub.config.server_names[0],
    }))
}

/// The body of `POST /workspaces`; every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateWorkspace {
    pub zone: Option<String>,
    pub machine_type: Option<String>,
    pub image_tag: Option<String>,
    #[serde(default)]
    pub metadata: Metadata,
}

/// A workspace as the API shows it.
#[derive(Debug, Serialize)]
pub struct WorkspaceView {
    pub id: Uuid,
    pub owner_id: String,
    pub instance_name: String,
    pub zone: String,
    pub image_tag: String,
    pub machine_type: String,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub last_connected_at: Option<String>,
    pub metadata: Metadata,
    /// The live agent connection, if any.
    pub agent: Option<AgentInfo>,
    /// Only in the create response of the manual provider: the agent's config file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_config: Option<String>,
}

fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn view(hub: &crate::Hub, ws: Workspace) -> WorkspaceView {
    WorkspaceView {
        agent: hub.agents.get(ws.id),
        id: ws.id,
        owner_id: ws.owner_id,
        instance_name: ws.instance_name,
        zone: ws.zone,
        image_tag: ws.image_tag,
        machine_type: ws.machine_type,
        status: ws.status,
        status_reason: ws.status_reason,
        created_at: rfc3339(ws.created_at),
        updated_at: rfc3339(ws.updated_at),
        last_connected_at: ws.last_connected_at.map(rfc3339),
        metadata: ws.metadata,
        agent_config: None,
    }
}

/// Checks a name-like field: 1..=max chars of `[a-z0-9-]`, starting with a letter.
fn check_name(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    let ok = !value.is_empty()
        && value.len() <= max
        && value.starts_with(|c: char| c.is_ascii_lowercase())
        && !value.ends_with('-')
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "{field} must be 1 to {max} characters of a-z, 0-9 and '-', starting with a letter and not ending with '-'"
        )))
    }
}

fn check_text(field: &str, value: &Option<String>, max: usize) -> Result<(), ApiError> {
    match value {
        Some(v) if v.len() > max => Err(ApiError::invalid(format!(
            "metadata.{field} is longer than {max} bytes"
        ))),
        Some(v) if v.chars().any(char::is_control) => Err(ApiError::invalid(format!(
            "metadata.{field} contains control characters"
        ))),
        _ => Ok(()),
    }
}

fn check_image_tag(value: &str) -> Result<(), ApiError> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "image_tag must be 1 to 128 characters of A-Z, a-z, 0-9, '_', '.', '-'",
        ))
    }
}

impl CreateWorkspace {
    fn validate(&self) -> Result<(), ApiError> {
        if let Some(zone) = &self.zone {
            check_name("zone", zone, 63)?;
        }
        if let Some(mt) = &self.machine_type {
            check_name("machine_type", mt, 63)?;
        }
        if let Some(tag) = &self.image_tag {
            check_image_tag(tag)?;
        }
        check_text("repo", &self.metadata.repo, 2048)?;
        check_text("branch", &self.metadata.branch, 255)?;
        check_text("device_id", &self.metadata.device_id, 128)?;
        Ok(())
    }
}

async fn list_workspaces(
    State(hub): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<WorkspaceView>>, ApiError> {
    let list = hub.store.list_workspaces(Some(&caller.owner_id)).await?;
    Ok(Json(list.into_iter().map(|ws| view(&hub, ws)).collect()))
}

async fn get_workspace(
    State(hub): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<WorkspaceView>, ApiError> {
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::not_found("workspace"))?;
    let ws = caller.authorize(hub.store.get_workspace(id).await?)?;
    Ok(Json(view(&hub, ws)))
}

async fn create_workspace(
    State(hub): State<AppState>,
    caller: Caller,
    ValidJson(req): ValidJson<CreateWorkspace>,
) -> Result<(StatusCode, Json<WorkspaceView>), ApiError> {
    req.validate()?;
    let id = Uuid::new_v4();
    let now = now_ms();
    let cfg = &hub.config;
    let ws = Workspace {
        id,
        owner_id: caller.owner_id.clone(),
        instance_name: format!("ws-{}", &id.simple().to_string()[..20]),
        zone: req.zone.unwrap_or_else(|| cfg.default_zone.clone()),
        image_tag: req
            .image_tag
            .unwrap_or_else(|| cfg.default_image_tag.clone()),
        machine_type: req
            .machine_type
            .unwrap_or_else(|| cfg.default_machine_type.clone()),
        status: Status::Provisioning,
        status_reason: None,
        created_at: now,
        updated_at: now,
        last_connected_at: None,
        metadata: req.metadata,
    };
    hub.store.insert_workspace(&ws).await?;

    let token = format!("wse_{}", ca::hex(&ca::random_bytes::<32>()));
    let expires = now + cfg.enrollment_ttl.as_millis() as i64;
    hub.store
        .insert_enrollment_token(&token_hash(&token), id, expires)
        .await?;
    let spec = InstanceSpec {
        workspace_id: id,
        instance_name: ws.instance_name.clone(),
        zone: ws.zone.clone(),
        machine_type: ws.machine_type.clone(),
        image_tag: ws.image_tag.clone(),
        bootstrap: AgentBootstrap {
            hub_addr: hub.agent_hub_addr.clone(),
            server_name: cfg.server_names[0].clone(),
            ca_pem: hub.ca.cert_pem().to_owned(),
            enrollment_token: Some(token),
            state_dir: "/var/lib/workspace-agent".into(),
            // The process provider runs agents as the hub's own user; VM images set the
            // workspace user here (cloud-init).
            user: None,
            detached_session_ttl_secs: Some(cfg.detached_session_ttl.as_secs()),
            terminal_ring_bytes: Some(cfg.terminal_ring_bytes),
        },
    };
    match hub.provider.create(&spec).await {
        Ok(created) => {
            tracing::info!(workspace = %id, owner = %caller.owner_id, "workspace created");
            let ws = hub.store.get_workspace(id).await?;
            let mut body = view(&hub, ws);
            body.agent_config = created.agent_config;
            Ok((StatusCode::CREATED, Json(body)))
        }
        Err(e) => {
            tracing::warn!(workspace = %id, error = %e, "provider create failed");
            let reason = format!("create instance: {e}");
            hub.store
                .transition(id, &[Status::Provisioning], Status::Error, Some(&reason))
                .await?;
            Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "provider_failed",
                reason,
            ))
        }
    }
}
