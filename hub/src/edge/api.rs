//! The HTTP API and web UI. [`app`] builds the router; [`ApiError`] is the one error type,
//! rendered as `{"error": {"code", "message"}}` with the matching status.

pub use crate::base::workspace::rfc3339;
use crate::base::workspace::{IdlePolicy, Metadata, Status, Workspace, now_ms};
use crate::domain::agent::AgentInfo;
use crate::domain::auth::Caller;
use crate::domain::auth::token_hash;
use crate::domain::events::{self, Detail, WorkspaceEvent};
use crate::domain::lifecycle::{self, CreateRequest};
use crate::store::StoreError;
use crate::{AppState, Hub, domain::idle, domain::reconcile};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
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
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/workspaces", get(list_workspaces).post(create_workspace))
        .route(
            "/workspaces/{id}",
            get(get_workspace).delete(delete_workspace),
        )
        .route("/workspaces/{id}/stop", post(stop_workspace))
        .route("/workspaces/{id}/start", post(start_workspace))
        .route("/workspaces/{id}/status", get(workspace_status))
        .route("/events", get(owner_events))
        .route("/workspaces/{id}/events", get(workspace_events))
        .route("/preview/{id}", get(workspace_events))
        .route("/workspaces/{id}/ports", get(workspace_ports))
        .route(
            "/workspaces/{id}/ports/{port}/sharing",
            get(crate::edge::preview::get_sharing).put(crate::edge::preview::set_sharing),
        )
        .route(
            "/workspaces/{id}/ports/{port}/links",
            post(crate::edge::preview::create_link),
        )
        .route(
            "/workspaces/{id}/ports/{port}/links/{link}",
            axum::routing::delete(crate::edge::preview::revoke_link),
        )
        .route("/preview/{id}/{port}", passthrough())
        .route("/preview/{id}/{port}/", passthrough())
        .route("/preview/{id}/{port}/{*rest}", passthrough())
        .route("/workspaces/{id}/keep-awake", post(keep_awake))
        .route("/workspaces/{id}/tickets", post(create_ticket))
        .route(
            "/workspaces/{id}/files",
            get(crate::edge::files::get)
                .put(crate::edge::files::put)
                .delete(crate::edge::files::delete)
                .post(crate::edge::files::post),
        )
        .route(
            "/workspaces/{id}/files/{*rest}",
            get(crate::edge::files::get)
                .put(crate::edge::files::put)
                .delete(crate::edge::files::delete)
                .post(crate::edge::files::post),
        )
        .route(
            "/workspaces/{id}/exec",
            post(crate::edge::exec::exec).get(crate::edge::exec::exec_socket),
        )
        .route("/cleanup", post(cleanup))
        .route("/audit", get(crate::edge::audit::list))
        .route("/tokens", get(list_tokens).post(create_token))
        .route(
            "/ssh-keys",
            get(crate::edge::profile::list_keys).post(crate::edge::profile::add_key),
        )
        .route(
            "/ssh-keys/{id}",
            axum::routing::delete(crate::edge::profile::remove_key),
        )
        .route(
            "/dotfiles",
            get(crate::edge::profile::get_dotfiles)
                .put(crate::edge::profile::set_dotfiles)
                .delete(crate::edge::profile::clear_dotfiles),
        )
        .route("/login", get(crate::edge::session::login))
        .route("/login/callback", get(crate::edge::session::callback))
        .route("/login/once", get(crate::edge::session::once))
        .route("/session", get(crate::edge::session::whoami))
        .route("/logout", post(crate::edge::session::logout))
        .route("/login/device", post(crate::edge::device::start))
        .route("/login/device/approve", post(crate::edge::device::approve))
        .route("/login/device/token", post(crate::edge::device::poll))
        .route("/tokens/{id}", axum::routing::delete(revoke_token))
        .route(
            "/workspaces/{id}/terminal",
            get(crate::edge::terminal::terminal),
        )
        .route("/terminal/{id}", get(crate::edge::terminal::terminal))
        .route(
            "/workspaces/{id}/sessions",
            get(crate::edge::terminal::list_sessions),
        )
        .route(
            "/embed/terminal/{id}",
            get(crate::edge::embed::terminal_page),
        )
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            hub.clone(),
            crate::edge::embed::cors,
        ))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(
            hub.clone(),
            crate::edge::preview::by_host,
        ))
        .layer(axum::middleware::from_fn(json_errors))
        .layer(axum::middleware::from_fn_with_state(
            hub.clone(),
            crate::edge::audit::record_actions,
        ))
        .layer(axum::middleware::from_fn_with_state(
            hub.clone(),
            count_requests,
        ))
        .layer(axum::middleware::from_fn(request_id))
        .layer(axum::middleware::from_fn_with_state(
            hub.clone(),
            refuse_while_draining,
        ))
        .with_state(hub)
}

/// The methods a preview passes on to the dev server (TRACE and CONNECT are refused: 405).
fn passthrough() -> axum::routing::MethodRouter<AppState> {
    use axum::routing::{head, options};
    let f = crate::edge::preview::path_form;
    get(f)
        .post(f)
        .put(f)
        .patch(f)
        .delete(f)
        .merge(head(f))
        .merge(options(f))
}

/// Marks a response as a workspace's own (a preview's), which [`json_errors`] leaves alone.
#[derive(Debug, Clone, Copy)]
pub struct Proxied;

/// Every error the hub answers is `{"error": {"code", "message"}}`: the few that axum
/// makes itself (a path or query that does not parse, a method a route does not have) are
/// rewritten, keeping their status and headers (`Allow` on a 405).
async fn json_errors(req: Request, next: axum::middleware::Next) -> Response {
    let res = next.run(req).await;
    let status = res.status();
    let json = res
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if json
        || !(status.is_client_error() || status.is_server_error())
        || res.extensions().get::<Proxied>().is_some()
    {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let message = match String::from_utf8_lossy(&text).trim() {
        "" => status.canonical_reason().unwrap_or("error").to_owned(),
        text => text.to_owned(),
    };
    let code = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        s if s.is_server_error() => "internal",
        _ => "invalid_request",
    };
    let rewritten = ApiError::new(status, code, message).into_response();
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    parts.headers.extend(rewritten.headers().clone());
    parts.extensions.insert(crate::edge::audit::ErrorCode(code));
    Response::from_parts(parts, rewritten.into_body())
}

/// A leaving hub answers requests that still reach it (on a connection kept alive from
/// before) with 503 and `Retry-After: 1`, and closes the connection: the client's next
/// connection goes to another replica.
async fn refuse_while_draining(
    State(hub): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !hub.draining.is_cancelled() {
        return next.run(req).await;
    }
    let mut res =
        ApiError::retry_later("draining", "this hub is restarting; retry").into_response();
    res.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    res
}

/// The API's error: a status, a stable machine-readable code and a human message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Sent as `Retry-After` (seconds): the request will likely succeed if repeated then.
    retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 503 with `Retry-After: 1`: a passing condition, retry.
    pub fn retry_later(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
        }
    }

    /// No path to the workspace's agent. For a READY workspace that is a passing condition
    /// (its agent is moving between replicas or reconnecting): 503, retry. Otherwise the
    /// workspace is not running: 409.
    pub fn agent_offline(status: crate::base::workspace::Status) -> Self {
        if status == crate::base::workspace::Status::Ready {
            Self::retry_later(
                "agent_offline",
                "the workspace's agent is reconnecting; retry",
            )
        } else {
            Self::new(
                StatusCode::CONFLICT,
                "agent_offline",
                format!(
                    "the workspace's agent is not connected (the workspace is {})",
                    status.as_str()
                ),
            )
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

    /// The stable machine-readable code.
    pub fn code(&self) -> &str {
        self.code
    }

    /// The human-readable message (safe to show to the caller).
    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub(crate) fn internal(context: &str, e: impl std::fmt::Display) -> Self {
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
        crate::domain::error::Error::from(e).into()
    }
}

impl From<crate::domain::error::Error> for ApiError {
    fn from(e: crate::domain::error::Error) -> Self {
        use crate::domain::error::Kind;
        let status = match e.kind {
            Kind::Invalid => StatusCode::BAD_REQUEST,
            Kind::Unauthorized => StatusCode::UNAUTHORIZED,
            Kind::Forbidden => StatusCode::FORBIDDEN,
            Kind::NotFound => StatusCode::NOT_FOUND,
            Kind::Conflict => StatusCode::CONFLICT,
            Kind::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            Kind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Kind::Upstream => StatusCode::BAD_GATEWAY,
            Kind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.code(), e.message())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        let mut res = (self.status, Json(body)).into_response();
        res.extensions_mut()
            .insert(crate::edge::audit::ErrorCode(self.code));
        if let Some(seconds) = self.retry_after {
            res.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(seconds),
            );
        }
        res
    }
}

/// The body of every error response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// A stable machine-readable code, e.g. `not_found`, `conflict`, `quota_exceeded`.
    pub code: String,
    pub message: String,
}

/// The OpenAPI document, generated from the handlers above so it cannot drift.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Workspace Hub API", description = "Remote development workspaces: lifecycle, status and events. Any request may be answered `503` with `Retry-After` and error code `draining` while the hub (or the replica it reached) restarts: retry it."),
    paths(
        index, asset, ca_pem, openapi, healthz, version, metrics, list_workspaces, create_workspace, get_workspace, delete_workspace,
        stop_workspace, start_workspace, workspace_status, keep_awake, workspace_events, owner_events, cleanup,
        create_token, list_tokens, revoke_token, create_ticket, workspace_ports,
        crate::edge::preview::get_sharing, crate::edge::preview::set_sharing, crate::edge::preview::create_link,
        crate::edge::preview::revoke_link,
        crate::edge::device::start, crate::edge::device::approve, crate::edge::device::poll,
        crate::edge::session::login, crate::edge::session::callback, crate::edge::session::once,
        crate::edge::session::whoami, crate::edge::session::logout,
        crate::edge::terminal::terminal, crate::edge::preview::path_form,
        crate::edge::exec::exec, crate::edge::exec::exec_socket, crate::edge::files::get, crate::edge::files::put,
        crate::edge::files::delete, crate::edge::files::post, crate::edge::embed::terminal_page,
        crate::edge::profile::list_keys, crate::edge::profile::add_key,
        crate::edge::profile::remove_key, crate::edge::profile::get_dotfiles,
        crate::edge::profile::set_dotfiles, crate::edge::profile::clear_dotfiles,
        crate::edge::terminal::list_sessions, crate::edge::audit::list
    ),
    modifiers(&BearerAuth, &Scoped, &Aliases)
)]
pub struct ApiDoc;

/// The routes served at a second path, documented at both (with their own operation ids).
const ALIASES: [(&str, &str); 4] = [
    ("/workspaces/{id}/files", "/workspaces/{id}/files/{path}"),
    ("/terminal/{id}", "/workspaces/{id}/terminal"),
    ("/preview/{id}", "/workspaces/{id}/events"),
    ("/preview/{id}/{port}", "/preview/{id}/{port}/{path}"),
];

struct Aliases;

impl utoipa::Modify for Aliases {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (alias, of) in ALIASES {
            let Some(mut item) = openapi.paths.paths.get(of).cloned() else {
                continue;
            };
            for op in operations(&mut item) {
                op.operation_id = op.operation_id.take().map(|id| format!("{id}_alias"));
                op.description = Some(format!("The same as `{of}`."));
                if let Some(params) = &mut op.parameters {
                    params.retain(|p| match p {
                        utoipa::openapi::RefOr::T(p) => !alias_drops(alias, &p.name),
                        utoipa::openapi::RefOr::Ref(_) => true,
                    });
                }
            }
            openapi.paths.paths.insert(alias.to_owned(), item);
        }
    }
}

/// What every route of a kind answers, documented once here: a route that takes credentials
/// (answers 401) also answers 403 to a service or browser token that does not reach it and
/// 429 to an address with too many failed authentications; those with a scope
/// (`edge::caller::route_scope`) take the `X-Wsh-Owner` header of service tokens; a JSON
/// body can be malformed (400), too large (413) or not JSON (415).
struct Scoped;

/// A response with an [`ErrorBody`].
fn error_response(description: &str) -> utoipa::openapi::RefOr<utoipa::openapi::Response> {
    utoipa::openapi::RefOr::T(
        utoipa::openapi::ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                utoipa::openapi::ContentBuilder::new()
                    .schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build(),
    )
}

impl utoipa::Modify for Scoped {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::RefOr;
        use utoipa::openapi::path::{ParameterBuilder, ParameterIn};
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        for (path, item) in openapi.paths.paths.iter_mut() {
            let scope = crate::edge::caller::route_scope(&path.replace("{path}", "{*rest}"));
            for op in operations(item) {
                let json_body = op.request_body.as_ref().is_some_and(|b| match b {
                    RefOr::T(b) => b.content.contains_key("application/json"),
                    RefOr::Ref(_) => false,
                });
                if json_body {
                    let responses = &mut op.responses.responses;
                    responses.entry("400".into()).or_insert_with(|| {
                        error_response("A body that is not valid JSON of this shape, or a bad field (`invalid_request`)")
                    });
                    responses
                        .entry("413".into())
                        .or_insert_with(|| error_response("A body over 64 KiB (`body_too_large`)"));
                    responses.entry("415".into()).or_insert_with(|| {
                        error_response("A body without `Content-Type: application/json` (`unsupported_media_type`)")
                    });
                }
                if !op.responses.responses.contains_key("401") {
                    continue;
                }
                let forbidden = if scope.is_some() {
                    "A service token without this route's scope, or acting for an owner id \
                     outside its `owner_prefix` (`scope`, `owner_not_allowed`), or a browser \
                     token for another purpose (`scope`)"
                } else {
                    "A service or browser token: they do not reach this route (`scope`)"
                };
                let responses = &mut op.responses.responses;
                responses
                    .entry("403".into())
                    .or_insert_with(|| error_response(forbidden));
                responses.entry("429".into()).or_insert_with(|| {
                    error_response(
                        "Too many failed authentications from this address in the last \
                         minute (`too_many_failures`, `auth_failures_per_minute`)",
                    )
                });
                if scope.is_some() {
                    op.responses.responses.entry("400".into()).or_insert_with(|| {
                        error_response("A malformed `X-Wsh-Owner` (`bad_owner`), or a service token without one (`owner_required`)")
                    });
                    let owner = ObjectBuilder::new()
                        .schema_type(Type::String)
                        .min_length(Some(1))
                        .max_length(Some(128))
                        .pattern(Some("^[A-Za-z0-9._@+-]+$"));
                    op.parameters.get_or_insert_with(Vec::new).push(RefOr::T(
                        ParameterBuilder::new()
                            .name("X-Wsh-Owner")
                            .parameter_in(ParameterIn::Header)
                            .schema(Some(owner))
                            .description(Some(
                                "With a service token: the owner id it acts for (starting \
                                 with its `owner_prefix`); missing is `400 owner_required`. \
                                 Other credentials: ignored",
                            ))
                            .build(),
                    ));
                }
            }
        }
    }
}

/// The operations of a path, whatever their method.
fn operations(
    item: &mut utoipa::openapi::PathItem,
) -> impl Iterator<Item = &mut utoipa::openapi::path::Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.options,
        &mut item.head,
        &mut item.patch,
    ]
    .into_iter()
    .flatten()
}

/// Whether the alias path lacks the parameter `name` of the path it stands for.
fn alias_drops(alias: &str, name: &str) -> bool {
    name == "path" && !alias.contains("{path}")
}

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        components.add_security_scheme(
            "cleanup_token",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        components.add_security_scheme(
            "metrics_token",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

#[utoipa::path(get, path = "/openapi.json", tag = "meta", responses((status = 200, description = "This document", body = Object)))]
async fn openapi() -> Json<serde_json::Value> {
    static DOCUMENT: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    Json(DOCUMENT.get_or_init(document).clone())
}

/// The OpenAPI document: what utoipa generates from the handlers, and the rules it has no
/// attribute for (per-item and per-key rules, rules between fields, the events of the SSE
/// routes), added here.
pub fn document() -> serde_json::Value {
    let mut doc = serde_json::to_value(<ApiDoc as utoipa::OpenApi>::openapi())
        .unwrap_or_else(|e| json!({ "error": e.to_string() }));
    let no_nul = json!({"type": "string", "pattern": "^[^\\x00]*$"});
    let schemas = &mut doc["components"]["schemas"];
    let exec = &mut schemas["ExecRequest"];
    exec["properties"]["argv"]["prefixItems"] =
        json!([{"type": "string", "minLength": 1, "pattern": "^[^\\x00]+$"}]);
    exec["properties"]["argv"]["items"] = no_nul.clone();
    exec["properties"]["env"]["propertyNames"] = json!({"pattern": "^[A-Za-z_][A-Za-z0-9_]*$"});
    exec["properties"]["env"]["additionalProperties"] = no_nul;
    exec["properties"]["env"]["maxProperties"] = json!(protocol::exec::MAX_ENV);
    exec["properties"]["stdin_base64"]["pattern"] = json!(
        "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)?$"
    );
    exec["not"] = json!({
        "required": ["stdin", "stdin_base64"],
        "properties": {"stdin": {"type": "string"}, "stdin_base64": {"type": "string"}}
    });
    schemas["Metadata"]["if"] =
        json!({"required": ["branch"], "properties": {"branch": {"type": "string"}}});
    schemas["Metadata"]["then"] =
        json!({"required": ["repo"], "properties": {"repo": {"type": "string"}}});
    schemas["WorkspaceEvent"] = workspace_event_schema();
    for path in ["/events", "/workspaces/{id}/events", "/preview/{id}"] {
        if let Some(ok) =
            doc["paths"][path]["get"]["responses"]["200"]["content"].get_mut("text/event-stream")
        {
            ok["schema"] = json!({"$ref": "#/components/schemas/WorkspaceEvent"});
        }
    }
    doc
}

/// One server-sent event of the events routes: its name, and its data as JSON.
fn workspace_event_schema() -> serde_json::Value {
    let detail = json!({"anyOf": [
        {"$ref": "#/components/schemas/CheckoutView"},
        {"$ref": "#/components/schemas/SetupView"},
        {"type": "object", "required": ["sessions"], "properties": {
            "sessions": {"type": "array", "items": {"$ref": "#/components/schemas/SyncSessionView"}}}},
        {"type": "object", "required": ["state", "ports"], "properties": {
            "state": {"const": "all"},
            "ports": {"type": "array", "items": {"$ref": "#/components/schemas/PortView"}}}},
        {"type": "object", "required": ["state", "port"], "properties": {
            "state": {"enum": ["opened", "updated"]},
            "port": {"$ref": "#/components/schemas/PortView"}}},
        {"type": "object", "required": ["state", "port"], "properties": {
            "state": {"const": "closed"},
            "port": {"type": "object", "required": ["port"], "properties": {
                "port": {"type": "integer", "minimum": 1, "maximum": 65535}}}}}
    ]});
    let data = json!({
        "type": "object",
        "required": ["workspace_id", "status", "reason", "at"],
        "properties": {
            "workspace_id": {"type": "string", "format": "uuid"},
            "status": {"oneOf": [{"$ref": "#/components/schemas/Status"}, {"type": "null"}]},
            "reason": {"type": ["string", "null"]},
            "at": {"type": "string", "format": "date-time"},
            "detail": detail
        }
    });
    json!({
        "description": "A server-sent event: `event` names it, `data` is JSON. `status`, \
            `deleted`, `profile`: the workspace and its status; `checkout`, `setup`, `sync`, \
            `port`: with a `detail`; `lagged`: the number of events missed.",
        "type": "object",
        "required": ["event", "data"],
        "properties": {
            "event": {"enum": ["status", "checkout", "port", "setup", "sync", "profile", "deleted", "lagged"]},
            "data": {"type": "string", "contentMediaType": "application/json"}
        },
        "if": {"properties": {"event": {"const": "lagged"}}},
        "then": {"properties": {"data": {"contentSchema": {"type": "integer", "minimum": 0}}}},
        "else": {"properties": {"data": {"contentSchema": data}}}
    })
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

#[utoipa::path(get, path = "/", tag = "meta", responses((status = 200, description = "The web UI", content_type = "text/html", body = String)))]
async fn index() -> impl IntoResponse {
    // Framed by no one: a host app embeds `/embed/terminal/{id}`, never the web UI.
    (
        [(
            axum::http::header::CONTENT_SECURITY_POLICY,
            "frame-ancestors 'none'",
        )],
        Html(include_str!("web/index.html")),
    )
}

/// The front-end files embedded in the binary.
#[utoipa::path(get, path = "/assets/{file}", tag = "meta", params(("file" = String, Path, description = "`xterm.js`, `addon-fit.js`, `xterm.css` or `terminal.js`")), responses((status = 200, description = "The file", content((String = "text/javascript"), (String = "text/css"))), (status = 404, description = "No such asset", body = ErrorBody)))]
async fn asset(Path(file): Path<String>) -> Result<Response, ApiError> {
    let (body, content_type): (&'static [u8], &str) = match file.as_str() {
        "xterm.js" => (include_bytes!("web/vendor/xterm.js"), "text/javascript"),
        "addon-fit.js" => (include_bytes!("web/vendor/addon-fit.js"), "text/javascript"),
        "xterm.css" => (include_bytes!("web/vendor/xterm.css"), "text/css"),
        "terminal.js" => (include_bytes!("web/terminal.js"), "text/javascript"),
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

/// The hub CA certificates (public): clients pin them for the hub's QUIC endpoint (two
/// during a CA rotation).
#[utoipa::path(get, path = "/ca.pem", tag = "meta", responses((status = 200, description = "The hub's CA certificates, PEM (two during a CA rotation)", content_type = "application/x-pem-file", body = String)))]
async fn ca_pem(State(hub): State<AppState>) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-pem-file")],
        hub.identity.trust_bundle_pem(),
    )
        .into_response()
}

#[utoipa::path(get, path = "/healthz", tag = "meta", responses((status = 200, description = "The hub is up", body = Object), (status = 503, description = "Draining: the hub is restarting (load balancers stop sending it work)", body = ErrorBody)))]
async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Gives every request an id (the client's `X-Request-Id` when it is 1 to 64 of
/// `A-Z a-z 0-9 . _ -`, else a new one): the log lines of its handling, store and provider
/// calls included, carry it (in the `request` span), and so does the response.
async fn request_id(mut req: Request, next: axum::middleware::Next) -> Response {
    use tracing::Instrument;
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            (1..=64).contains(&v.len())
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        })
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()));
    let span = tracing::info_span!("request", id = %id, method = %req.method());
    req.extensions_mut()
        .insert(crate::edge::audit::RequestId(id.clone()));
    let mut res = next.run(req).instrument(span).await;
    if let Ok(value) = axum::http::HeaderValue::from_str(&id) {
        res.headers_mut().insert("x-request-id", value);
    }
    res
}

/// Counts every request by route template (never its path: no client grows the series),
/// method and status, and times it to the response head.
async fn count_requests(
    State(hub): State<AppState>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let start = std::time::Instant::now();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let method = match req.method().as_str() {
        m @ ("GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE" | "OPTIONS") => m,
        _ => "other",
    }
    .to_owned();
    let res = next.run(req).await;
    let m = &hub.metrics;
    let timed = crate::base::metrics::Route { route, method };
    m.http_seconds
        .get_or_create(&timed)
        .observe(start.elapsed().as_secs_f64());
    m.http_requests
        .get_or_create(&crate::base::metrics::Request {
            route: timed.route,
            method: timed.method,
            status: res.status().as_u16(),
        })
        .inc();
    res
}

/// `GET /metrics`: the scraper's bearer token (`metrics_token`), or an admin.
#[utoipa::path(get, path = "/metrics", tag = "meta", security(("metrics_token" = []), ("bearer" = [])), responses((status = 200, description = "The hub's figures, OpenMetrics text (Prometheus reads it): HTTP requests by route, method and status with latency histograms, agents connected and their connections, enrollments, streams relayed (open, total, bytes) by kind, store and provider calls by operation and outcome with latency histograms, housekeeping actions, SSE feeds, and the figures agents report about themselves added up (memory, CPU time, sessions)", content_type = "application/openmetrics-text", body = String), (status = 401, description = "Missing or bad token", body = ErrorBody), (status = 403, description = "Signed in, but not an admin (`admin_only`)", body = ErrorBody), (status = 429, description = "Too many failed authentications from this address (`too_many_failures`)", body = ErrorBody)))]
async fn metrics(State(hub): State<AppState>, req: Request) -> Result<Response, ApiError> {
    use axum::extract::FromRequestParts;
    let scraper = hub.config.metrics_token.as_ref().is_some_and(|secret| {
        crate::edge::caller::bearer(req.headers())
            .is_some_and(|given| token_hash(given) == token_hash(secret.expose()))
    });
    if !scraper {
        let (mut parts, _) = req.into_parts();
        let caller = Caller::from_request_parts(&mut parts, &hub).await?;
        if !caller.admin {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "admin_only",
                "the metrics are for admins and the metrics_token",
            ));
        }
    }
    let m = &hub.metrics;
    m.agents_connected.set(hub.agents.len() as i64);
    m.sse_feeds.set(hub.events.feeds() as i64);
    m.set_agent_totals(hub.agents.stats_totals());
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
        .into_response())
}

#[utoipa::path(get, path = "/version", tag = "meta", responses((status = 200, description = "Build, protocol and provider", body = Object)))]
async fn version(State(hub): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "protocol_version": protocol::PROTOCOL_VERSION,
        "min_protocol_version": protocol::MIN_PROTOCOL_VERSION,
        "provider": hub.provider.name(),
        "quic_addr": hub.agent_hub_addr,
        "server_name": hub.config.server_names[0],
        "sign_in": if hub.oidc.is_some() { "oidc" } else { "token" },
    }))
}

/// The body of `POST /workspaces`; every field optional.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWorkspace {
    /// Unique among your workspaces: 1 to 40 of a-z 0-9 -, starting with a letter. Default:
    /// the repository's name (`acme/api.git` -> `api`, then `api-2`, ...), else `ws`. Every
    /// path that takes the workspace id takes this name too; so a name is never a UUID.
    #[schema(
        max_length = 40,
        pattern = r"^(?![0-9a-f]{32}$)(?![0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$)[a-z](?:[a-z0-9-]{0,38}[a-z0-9])?$"
    )]
    pub name: Option<String>,
    #[schema(max_length = 63, pattern = r"^[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?$")]
    pub zone: Option<String>,
    #[schema(max_length = 63, pattern = r"^[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?$")]
    pub machine_type: Option<String>,
    #[schema(max_length = 128, pattern = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")]
    pub image_tag: Option<String>,
    #[serde(default)]
    pub metadata: Metadata,
    /// Idle clean-up times for this workspace; one longer than the hub's default is cut to it.
    pub idle: Option<IdleRequest>,
    /// A token for cloning a private `metadata.repo` over HTTPS. Travels only to the
    /// workspace's memory; never stored or shown.
    #[schema(
        min_length = 1,
        max_length = 4096,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]+$"
    )]
    pub git_token: Option<String>,
}

/// Idle clean-up times a create may ask for (seconds; missing means the hub's default).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IdleRequest {
    pub stop_after_secs: Option<u64>,
    pub delete_after_secs: Option<u64>,
    pub max_lifetime_secs: Option<u64>,
}

/// A workspace as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WorkspaceView {
    pub id: Uuid,
    /// Unique among its owner's workspaces; empty for one created before names existed.
    pub name: String,
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
    /// The last use the agent reported (attached clients, terminal input).
    pub last_active_at: Option<String>,
    /// Idle clean-up leaves the workspace alone until then.
    pub keep_awake_until: Option<String>,
    pub metadata: Metadata,
    /// The live agent connection, if any (held by this replica or another).
    #[schema(value_type = Option<AgentInfo>)]
    pub agent: Option<serde_json::Value>,
    /// Only in the create response of the manual provider: the agent's config file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_config: Option<String>,
}

/// The workspaces as the API shows them, with their agents wherever they are connected.
async fn views(hub: &crate::Hub, list: Vec<Workspace>) -> Vec<WorkspaceView> {
    let ids: Vec<Uuid> = list.iter().map(|ws| ws.id).collect();
    let mut remote = crate::links::peers::remote_agents(hub, &ids).await;
    list.into_iter()
        .map(|ws| {
            let agent = remote.remove(&ws.id).map(|r| r.agent);
            view(hub, ws, agent)
        })
        .collect()
}

/// A workspace as the API shows it; `remote` is its agent as another replica holds it.
fn view(hub: &crate::Hub, ws: Workspace, remote: Option<serde_json::Value>) -> WorkspaceView {
    WorkspaceView {
        agent: hub
            .agents
            .get(ws.id)
            .and_then(|info| serde_json::to_value(info).ok())
            .or(remote),
        id: ws.id,
        name: ws.name,
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
        last_active_at: ws.last_active_at.map(rfc3339),
        keep_awake_until: ws.keep_awake_until.map(rfc3339),
        metadata: ws.metadata,
        agent_config: None,
    }
}

/// Checks a name-like field: 1..=max chars of `[a-z0-9-]`, starting with a letter.
fn check_name(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    if crate::base::workspace::is_label(value, max) {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "{field} must be 1 to {max} characters of a-z, 0-9 and '-', starting with a letter and not ending with '-'"
        )))
    }
}

fn check_text(field: &str, value: &Option<String>, max: usize) -> Result<(), ApiError> {
    match value {
        Some(v) if v.chars().count() > max => Err(ApiError::invalid(format!(
            "metadata.{field} is longer than {max} characters"
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

/// A repository URL git can clone (`base::workspace::is_git_url`).
fn check_repo(repo: &str) -> Result<(), ApiError> {
    if !crate::base::workspace::is_git_url(repo) {
        return Err(ApiError::invalid(
            "metadata.repo must be an https, http, ssh, git or file URL (or user@host:path)",
        ));
    }
    Ok(())
}

/// A branch name git accepts (`git check-ref-format --branch`, in short).
fn check_branch(branch: &str) -> Result<(), ApiError> {
    let bad = branch.is_empty()
        || branch.starts_with(['-', '/', '.'])
        || branch.ends_with(['/', '.'])
        || branch.ends_with(".lock")
        || branch.contains("..")
        || branch.contains("@{")
        || branch.contains("//")
        || branch
            .chars()
            .any(|c| c.is_control() || matches!(c, ' ' | '~' | '^' | ':' | '?' | '*' | '[' | '\\'));
    if bad {
        return Err(ApiError::invalid(
            "metadata.branch is not a valid git branch name",
        ));
    }
    Ok(())
}

impl CreateWorkspace {
    fn validate(&self) -> Result<(), ApiError> {
        if let Some(name) = &self.name {
            crate::base::workspace::check_name(name).map_err(ApiError::invalid)?;
        }
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
        if let Some(repo) = &self.metadata.repo {
            check_repo(repo)?;
        }
        if let Some(branch) = &self.metadata.branch {
            check_branch(branch)?;
            if self.metadata.repo.is_none() {
                return Err(ApiError::invalid("metadata.branch needs metadata.repo"));
            }
        }
        if let Some(token) = &self.git_token
            && (token.is_empty()
                || token.chars().count() > 4096
                || token.chars().any(char::is_control))
        {
            return Err(ApiError::invalid(
                "git_token must be 1 to 4096 characters without control characters",
            ));
        }
        Ok(())
    }
}

#[utoipa::path(get, path = "/workspaces", tag = "workspaces", security(("bearer" = [])), responses((status = 200, description = "The caller's workspaces, newest first", body = [WorkspaceView]), (status = 401, description = "Missing or bad token", body = ErrorBody)))]
async fn list_workspaces(
    State(hub): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<WorkspaceView>>, ApiError> {
    let list = hub.store.list_workspaces(caller.scope()).await?;
    Ok(Json(views(&hub, list).await))
}

#[utoipa::path(get, path = "/workspaces/{id}", tag = "workspaces", security(("bearer" = [])), params(("id" = String, Path, description = "Workspace id (UUID), or the name of one of yours (browser tokens: the id)")), responses((status = 200, description = "The workspace", body = WorkspaceView), (status = 401, description = "Missing or bad token", body = ErrorBody), (status = 404, description = "No such workspace (or not yours)", body = ErrorBody)))]
async fn get_workspace(
    State(hub): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<WorkspaceView>, ApiError> {
    let ws = owned(&hub, &caller, &id).await?;
    Ok(Json(views(&hub, vec![ws]).await.remove(0)))
}

/// Loads a workspace the caller may act on, by id or by the name of one of theirs.
async fn owned(hub: &crate::Hub, caller: &Caller, id: &str) -> Result<Workspace, ApiError> {
    Ok(caller.workspace(hub, id).await?)
}

/// Checks an `Idempotency-Key` header: 1 to 255 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| {
            ApiError::invalid("Idempotency-Key must be 1 to 255 visible ASCII characters")
        })?;
    Ok(Some(key.to_owned()))
}

#[utoipa::path(post, path = "/workspaces", tag = "workspaces", security(("bearer" = [])), params(("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255, pattern = r"^[\x21-\x7e]+$", description = "Retrying with the same key returns the same workspace")), request_body = CreateWorkspace, responses((status = 201, description = "Created: PROVISIONING", body = WorkspaceView), (status = 200, description = "Already created with this idempotency key", body = WorkspaceView), (status = 400, description = "Invalid field", body = ErrorBody), (status = 401, description = "Missing or bad token", body = ErrorBody), (status = 403, description = "Quota exceeded or machine type not allowed", body = ErrorBody), (status = 409, description = "You have a workspace of this name (`name_taken`)", body = ErrorBody), (status = 413, description = "Body too large", body = ErrorBody), (status = 415, description = "Not JSON", body = ErrorBody), (status = 502, description = "The provider failed", body = ErrorBody)))]
async fn create_workspace(
    State(hub): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ValidJson(req): ValidJson<CreateWorkspace>,
) -> Result<(StatusCode, Json<WorkspaceView>), ApiError> {
    req.validate()?;
    let idle = req.idle.map(|i| {
        let d = hub.config.idle;
        let secs = |v: Option<u64>, default: std::time::Duration| {
            v.map_or(default, std::time::Duration::from_secs)
        };
        IdlePolicy {
            stop_after: secs(i.stop_after_secs, d.stop_after),
            delete_after: secs(i.delete_after_secs, d.delete_after),
            max_lifetime: secs(i.max_lifetime_secs, d.max_lifetime),
        }
    });
    let created = lifecycle::create(
        &hub,
        &caller.owner_id,
        CreateRequest {
            name: req.name,
            zone: req.zone,
            machine_type: req.machine_type,
            image_tag: req.image_tag,
            metadata: req.metadata,
            idle,
            idempotency_key: idempotency_key(&headers)?,
            git_token: req.git_token,
        },
    )
    .await?;
    let status = if created.is_new {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut body = view(&hub, created.workspace, None);
    body.agent_config = created.agent_config;
    Ok((status, Json(body)))
}

#[utoipa::path(delete, path = "/workspaces/{id}", tag = "workspaces", security(("bearer" = [])), params(("id" = String, Path, description = "Workspace id (UUID), or the name of one of yours (browser tokens: the id)")), responses((status = 202, description = "Deleting: DELETING, then gone", body = WorkspaceView), (status = 409, description = "Not allowed in the current state", body = ErrorBody), (status = 401, description = "Missing or bad token", body = ErrorBody), (status = 404, description = "No such workspace (or not yours)", body = ErrorBody)))]
async fn delete_workspace(
    State(hub): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<WorkspaceView>), ApiError> {
    let ws = owned(&hub, &caller, &id).await?;
    let ws = lifecycle::delete(&hub, ws.id).await?;
    Ok((StatusCode::ACCEPTED, Json(view(&hub, ws, None))))
}

#[utoipa::path(post, path = "/workspaces/{id}/stop", tag = "workspaces", security(("bearer" = [])), params(("id" = String, Path, description = "Workspace id (UUID), or the name of one of yours (browser tokens: the id)")), responses((status = 202, description = "Stopping: STOPPING, then SUSPENDED", body = WorkspaceView), (status = 409, description = "Not allowed in the current state", body = ErrorBody), (status = 401, description = "Missing or bad token", body = ErrorBody), (status = 404, description = "No such workspace (or not yours)", body = ErrorBody)))]
async fn stop_workspace(
    State(hub): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<WorkspaceView>), ApiError> {
    let ws = owned(&hub, &caller, &id).await?;
    let ws = lifecycle::stop(&hub, ws.id).await?;
    Ok((StatusCode::ACCEPTED, Json(view(&hub, ws, None))))
}

#[utoipa::path(post, path = "/workspaces/{id}/start", tag = "workspaces", security(("bearer" = [])), params(("id" = String, Path, description = "Workspace id (UUID), or the name of one of yours (browser tokens: the id)")), responses((status = 202, description = "Starting: STARTING, then READY", body = WorkspaceView), (status = 403, description = "Quota exceeded", body = ErrorBody), (status = 409, description = "Not allowed in the current state", body = ErrorBody), (status = 401, description = "Missing or bad token", body = ErrorBody), (status = 404, description = "No such workspace (or not yours)", body = ErrorBody)))]
async fn start_workspace(
    State(hub): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<WorkspaceView>), ApiError> {
    let ws = owned(&hub, &caller, &id).await?;
    let ws = lifecycle::start(&hub, ws.id, &ws.owner_id).await?;
    Ok((StatusCode::ACCEPTED, Json(view(&hub, ws, None))))
}

/// Live status: the record, what the provider observes, the agent, and the idle verdict.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StatusView {
    pub id: Uuid,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    /// What the provider sees: RUNNING, SUSPENDED, STOPPED, MISSING or UNKNOWN.
    pub observed: &'static str,
    pub agent: Option<AgentInfo>,
    pub keep_awake_until: Option<String>,
    pub activity: ActivityView,
}

/// Why the workspace counts as active or idle, and what clean-up will do when.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ActivityView {
    pub active: bool,
    pub reason: String,
    pub idle_since: Option<String>,
    pub stop_at: Option<String>,
    pub delete_at: Option<String>,
}

#[utoipa::path(get, path = "/workspaces/{id}/status", tag = "workspaces", security(("bearer" = [])), params(("id" = String, Path, description = "Workspace id (UUID), or the name of one of yours (browser tokens: the id)")), responses((status = 200, description = "Live status and idle verdict", body = StatusView), (status = 401, description = "Missing or bad token", body = ErrorBody), (status = 404, description = "No such workspace (or not yours)", body = ErrorBody)))]
async fn workspace_status(
    State(hub): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<StatusView>, ApiError> {
    let ws = owned(&hub, &caller, &id).await?;
    let observed = match hub.provider.observe(&(&ws).into()).await {
        Ok(o) => o.as_str(),
        Err(e) => {
            tracing::warn!(workspace = %ws.id, error = %e, "observe");
            "UNKNOWN"
        }
    };
    let agent = hub.agents.get(ws.id);
    let j = idle::judge(&ws, agent.as_ref(), now_ms());
    Ok(Json(StatusView {
        id: ws.id,
        status: ws.status,
        status_reason: ws.status_reason,
        observed,
        agent,
        keep_awake_until: ws.keep_awake_until.map(rfc3339),
        activity: ActivityView {
            active: j.active,
            reason: j.reason,
            idle_since: j.idle_since.map(rfc3339),
            stop_at: j.stop_at.map(rfc3339),
            delete_at: j.delete_at.map(rfc3339),
        },
    }))
}

/// The body of `POST /workspaces/:id/keep-awake`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeepAwake {
    /// How long from now; 0 releases the lease.
    #[schema(maximum = 86400)]
    pub seconds: u64,
}

#[utoipa::path(post, path = "/workspaces/{id}/keep-awake", tag = "workspaces", security(("bearer" = [])), params(("id" = String, Path, description = "Workspace id (UUID), or the name of one of yours (browser tokens: the id)")), request_body = KeepAwake, responses((status = 200, description = "Lease taken (or released with 0)", body = WorkspaceView), (status = 400, description = "Invalid field", body = ErrorBody), (status = 409, description = "Being deleted", body = ErrorBody), (status = 415, description = "Not JSON", body = ErrorBody), (status = 401, description = "Missing or bad token", body = ErrorBody), (status = 404, description = "No such workspace (or not yours)", body = ErrorBody)))]
async fn keep_awake(
    State(hub): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ValidJson(req): ValidJson<KeepAwake>,
) -> Result<Json<WorkspaceView>, ApiError> {
    let ws = owned(&hub, &caller, &id).await?;
    let ws = lifecycle::keep_awake(&hub, &ws, req.seconds).await?;
    Ok(Json(views(&hub, vec![ws]).await.remove(0)))
}

/// `GET /workspaces/:id/events`: the current status, then every change, as SSE.
#[utoipa::path(get, path = "/workspaces/{id}/events", tag = "workspaces", security(("bearer" = [])), params(("id" = String, Path, description = "Workspace id (UUID), or the name of one of yours (browser tokens: the id)")), responses((status = 200, description = "Server-sent events: `status` (JSON: workspace_id, status, reason, at), `checkout`, `port` (detail: state `all` with ports, or `opened`/`updated`/`closed` with one port), `setup` (detail: the agent's setup steps and the dev container settings not applied), `profile` (the owner's SSH keys or dotfiles changed), `deleted`; `lagged` (data: events missed) when the client fell behind, followed by a fresh `status` and `port` `all` snapshot; also at `/preview/{id}`", content_type = "text/event-stream", body = String), (status = 401, description = "Missing or bad token", body = ErrorBody), (status = 404, description = "No such workspace (or not yours)", body = ErrorBody)))]
async fn workspace_events(
    State(hub): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Sse<impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>>>, ApiError>
{
    let ws = owned(&hub, &caller, &id).await?;
    // Subscribe before reading the status so no change falls between the two.
    let id = ws.id;
    let sub = hub.events.subscribe(events::Watch::Workspace(id));
    let (first, last) = snapshot(&hub, id).await?;
    // A change that lands between the subscription and the read arrives twice: once in
    // the snapshot and once from the feed. Repeats of the last sent state are dropped.
    let stream = futures_util::stream::unfold(
        (hub, sub, last, false),
        move |(hub, mut sub, mut last, done)| async move {
            if done {
                return None;
            }
            loop {
                let events: Vec<Result<Event, std::convert::Infallible>> = match sub.next().await {
                    events::Next::Event(ev) => {
                        let state = (ev.status, ev.reason.clone());
                        if ev.kind == "status" && state == last {
                            continue;
                        }
                        last = state;
                        let end = ev.kind == "deleted";
                        return Some((
                            futures_util::stream::iter(vec![Ok(sse_event(&hub, &ev))]),
                            (hub, sub, last, end),
                        ));
                    }
                    // Fallen behind: no backlog, the state as it is now instead.
                    events::Next::Lagged(n) => {
                        let lagged = Event::default().event("lagged").data(n.to_string());
                        match snapshot(&hub, id).await {
                            Ok((now, state)) => {
                                last = state;
                                std::iter::once(lagged).chain(now).map(Ok).collect()
                            }
                            // Gone (deleted) or the store failed: end the stream.
                            Err(_) => return None,
                        }
                    }
                    events::Next::Closed => return None,
                };
                return Some((futures_util::stream::iter(events), (hub, sub, last, false)));
            }
        },
    )
    .flatten();
    let stream = futures_util::stream::iter(first.into_iter().map(Ok)).chain(stream);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// `GET /events`: every event of the caller's workspaces (an admin's: everyone's), as SSE.
#[utoipa::path(get, path = "/events", tag = "workspaces", security(("bearer" = [])), responses((status = 200, description = "Server-sent events of every workspace of the caller's (an admin's: every workspace), as `GET /workspaces/{id}/events` sends them, from now on and with no snapshot: read `GET /workspaces` after the stream opens (and again after `lagged`, which says how many events were missed). A new workspace shows as its first `status` event, a deleted one as `deleted`.", content_type = "text/event-stream", body = String), (status = 401, description = "Missing or bad token", body = ErrorBody)))]
async fn owner_events(
    State(hub): State<AppState>,
    caller: Caller,
) -> Sse<impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>>> {
    let watch = match caller.scope() {
        Some(owner) => events::Watch::Owner(owner.to_owned()),
        None => events::Watch::All,
    };
    let sub = hub.events.subscribe(watch);
    let stream = futures_util::stream::unfold((hub, sub), |(hub, mut sub)| async move {
        let event = match sub.next().await {
            events::Next::Event(ev) => sse_event(&hub, &ev),
            events::Next::Lagged(n) => Event::default().event("lagged").data(n.to_string()),
            events::Next::Closed => return None,
        };
        Some((Ok(event), (hub, sub)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// A workspace as it is now, as SSE events (its status, then all its ports), and the
/// status and reason they carry.
async fn snapshot(
    hub: &Hub,
    id: Uuid,
) -> Result<(Vec<Event>, (Option<Status>, Option<String>)), ApiError> {
    let ws = hub.store.get_workspace(id).await?;
    let status = WorkspaceEvent {
        at: ws.updated_at,
        ..WorkspaceEvent::new(ws.id, &ws.owner_id, "status")
            .with_status(ws.status, ws.status_reason.clone())
    };
    let ports = WorkspaceEvent::new(ws.id, &ws.owner_id, "port").with_detail(
        match crate::links::peers::remote_agent(hub, ws.id).await {
            Some(remote) => {
                Detail::Json(json!({"state": "all", "ports": port_list(&remote.ports)}))
            }
            None => Detail::Ports,
        },
    );
    Ok((
        vec![sse_event(hub, &status), sse_event(hub, &ports)],
        (Some(ws.status), ws.status_reason),
    ))
}

fn sse_event(hub: &Hub, ev: &WorkspaceEvent) -> Event {
    Event::default()
        .event(ev.kind)
        .data(crate::links::webhooks::event_data(hub, ev))
}

/// The `ports` array of an SSE `port` event from a `GET /workspaces/{id}/ports` body.
fn port_list(ports: &serde_json::Value) -> serde_json::Value {
    ports["ports"]
        .as_object()
        .map(|map| map.values().cloned().collect())
        .unwrap_or_default()
}

#[utoipa::path(get, path = "/workspaces/{id}/ports", tag = "ports", security(("bearer" = [])), params(("id" = String, Path, description = "Workspace id (UUID), or the name of one of yours (browser tokens: the id)")), responses((status = 200, description = "Listening ports, as the agent reports them (empty while it is not connected)", body = crate::links::agents::Ports), (status = 401, description = "Missing or bad token", body = ErrorBody), (status = 404, description = "No such workspace (or not yours)", body = ErrorBody)))]
async fn workspace_ports(
    State(hub): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let ws = owned(&hub, &caller, &id).await?;
    // Held here, or by no replica: none answers, and the local (maybe empty) list stands.
    if let Some(remote) = crate::links::peers::remote_agent(&hub, ws.id).await {
        return Ok(Json(remote.ports));
    }
    Ok(Json(json!(hub.agents.ports(ws.id))))
}

/// The body of `POST /workspaces/:id/tickets`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TicketRequest {
    pub purpose: crate::domain::auth::Purpose,
    /// Lifetime in seconds: 1 to 3600, default 60. A browser token is reusable until then
    /// (an embedded terminal reconnects with it).
    #[schema(minimum = 1, maximum = 3600)]
    pub expires_in_secs: Option<u64>,
}

/// A browser token (ticket): one workspace, one purpose, until `expires_at`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TicketView {
    pub ticket: String,
    /// The workspace the ticket is bound to (its id: what URLs carrying the ticket name).
    pub workspace_id: Uuid,
    pub expires_at: String,
}

#[utoipa::path(post, path = "/workspaces/{id}/tickets", tag = "workspaces", security(("bearer" = [])), params(("id" = String, Path, description = "Workspace id (UUID), or the name of one of yours (browser tokens: the id)")), request_body = TicketRequest,
    description = "A browser token bound to this workspace and one purpose: `terminal` (the terminal WebSocket's `?ticket=`, `/embed/terminal/{id}#ticket=`), `preview` (`/preview/{id}/{port}/?ticket=`), `exec` and `files` (`Authorization: Bearer <ticket>`, or `?ticket=` on a GET, from the origins in `[embed] allowed_origins` too). It opens nothing else. A service token needs the `tickets` scope and the purpose's own.",
    responses((status = 201, description = "The ticket", body = TicketView), (status = 400, description = "Invalid field", body = ErrorBody), (status = 401, description = "Missing or bad token", body = ErrorBody), (status = 403, description = "A service token without the purpose's scope (`scope`)", body = ErrorBody), (status = 404, description = "No such workspace (or not yours)", body = ErrorBody)))]
async fn create_ticket(
    State(hub): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ValidJson(req): ValidJson<TicketRequest>,
) -> Result<(StatusCode, Json<TicketView>), ApiError> {
    let ttl_ms = match req.expires_in_secs {
        None => crate::domain::auth::TICKET_TTL_MS,
        Some(secs @ 1..=3600) => secs as i64 * 1000,
        Some(_) => return Err(ApiError::invalid("expires_in_secs must be 1 to 3600")),
    };
    // Ownership is checked once, here; the ticket carries the owner, not the admin right.
    let ws = owned(&hub, &caller, &id).await?;
    if !caller.grant.reaches(req.purpose.scope()) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "scope",
            "this service token's scopes do not include the ticket's purpose",
        ));
    }
    let (ticket, expires) = hub
        .tickets
        .issue(ws.id, &ws.owner_id, req.purpose, now_ms() + ttl_ms);
    Ok((
        StatusCode::CREATED,
        Json(TicketView {
            ticket,
            workspace_id: ws.id,
            expires_at: rfc3339(expires),
        }),
    ))
}

/// The body of `POST /tokens`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// What the token is for (`laptop`, `ci`): 1 to 64 printable characters.
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]+$"
    )]
    pub name: String,
    /// Lifetime in seconds; default 90 days, at least a minute, at most 365 days.
    #[schema(minimum = 60, maximum = 31536000)]
    pub expires_in_secs: Option<u64>,
    /// Admins only: a service token for a host app's backend, which acts for the owner ids
    /// it names in `X-Wsh-Owner` (with this prefix) on the routes of its scopes, within
    /// each owner's quotas.
    pub service: Option<crate::store::ServiceGrant>,
}

/// An API token as listed: never the secret itself.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TokenView {
    /// The token's public id (the SHA-256 of the secret).
    pub id: String,
    pub name: String,
    pub expires_at: Option<String>,
    /// A service token's grant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<crate::store::ServiceGrant>,
    /// Only in the response that creates it, once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

const DEFAULT_TOKEN_SECS: u64 = 90 * 24 * 3600;
const MAX_TOKEN_SECS: u64 = 365 * 24 * 3600;

#[utoipa::path(post, path = "/tokens", tag = "tokens", security(("bearer" = [])), request_body = CreateToken, responses((status = 201, description = "The new token, shown once", body = TokenView), (status = 400, description = "Invalid field", body = ErrorBody), (status = 401, description = "Missing or bad token", body = ErrorBody), (status = 429, description = "Too many failed authentications", body = ErrorBody)))]
async fn create_token(
    State(hub): State<AppState>,
    caller: Caller,
    ValidJson(req): ValidJson<CreateToken>,
) -> Result<(StatusCode, Json<TokenView>), ApiError> {
    if req.name.is_empty()
        || req.name.chars().count() > 64
        || req.name.chars().any(char::is_control)
    {
        return Err(ApiError::invalid(
            "name must be 1 to 64 printable characters",
        ));
    }
    let secs = req.expires_in_secs.unwrap_or(DEFAULT_TOKEN_SECS);
    if !(60..=MAX_TOKEN_SECS).contains(&secs) {
        return Err(ApiError::invalid(format!(
            "expires_in_secs must be between 60 and {MAX_TOKEN_SECS}"
        )));
    }
    if let Some(service) = &req.service {
        if !caller.admin {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "admin_only",
                "only an admin creates service tokens",
            ));
        }
        let prefix = &service.owner_prefix;
        if prefix.is_empty()
            || prefix.len() > 64
            || crate::domain::auth::check_owner_id(prefix).is_err()
        {
            return Err(ApiError::invalid(
                "service.owner_prefix must be 1 to 64 of A-Z a-z 0-9 . _ @ + -",
            ));
        }
        if service.scopes.is_empty() {
            return Err(ApiError::invalid(
                "service.scopes must name at least one scope",
            ));
        }
    }
    let expires_at = now_ms() + secs as i64 * 1000;
    let token = crate::domain::auth::mint_api_token(
        &hub,
        &caller.owner_id,
        caller.email.as_deref(),
        &req.name,
        Some(expires_at),
        req.service.clone(),
    )
    .await
    .map_err(|e| ApiError::internal("mint token", e))?;
    Ok((
        StatusCode::CREATED,
        Json(TokenView {
            id: token_hash(&token),
            name: req.name,
            expires_at: Some(rfc3339(expires_at)),
            service: req.service,
            token: Some(token),
        }),
    ))
}

#[utoipa::path(get, path = "/tokens", tag = "tokens", security(("bearer" = [])), responses((status = 200, description = "The caller's tokens (never their secrets)", body = [TokenView]), (status = 401, description = "Missing or bad token", body = ErrorBody)))]
async fn list_tokens(
    State(hub): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<TokenView>>, ApiError> {
    let tokens = hub.store.list_api_tokens(&caller.owner_id).await?;
    Ok(Json(
        tokens
            .into_iter()
            .map(|(id, t)| TokenView {
                id,
                name: t.name,
                expires_at: t.expires_at.map(rfc3339),
                service: t.service,
                token: None,
            })
            .collect(),
    ))
}

#[utoipa::path(delete, path = "/tokens/{id}", tag = "tokens", security(("bearer" = [])), params(("id" = String, Path, description = "The token's id")), responses((status = 204, description = "Revoked"), (status = 401, description = "Missing or bad token", body = ErrorBody), (status = 404, description = "No such token of yours", body = ErrorBody)))]
async fn revoke_token(
    State(hub): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let not_found = || ApiError::not_found("token");
    let token = hub.store.find_api_token(&id).await?.ok_or_else(not_found)?;
    if token.owner_id != caller.owner_id {
        return Err(not_found());
    }
    match hub.store.delete_api_token(&id).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(StoreError::NotFound) => Err(not_found()),
        Err(e) => Err(e.into()),
    }
}

/// Who may call `POST /cleanup`: the configured service account's ID token for the
/// configured audience, or the shared secret.
async fn check_scheduler(hub: &crate::Hub, given: &str) -> Result<(), ApiError> {
    let secret = hub.config.cleanup_token.as_ref();
    let oidc = hub.scheduler.as_ref().zip(hub.config.cleanup_oidc.as_ref());
    if secret.is_none() && oidc.is_none() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "cleanup_disabled",
            "POST /cleanup is off: set cleanup_token or [cleanup_oidc] in the hub config",
        ));
    }
    // Compare hashes, so the time taken says nothing about the secret.
    if secret.is_some_and(|s| token_hash(given) == token_hash(s.expose())) {
        return Ok(());
    }
    match oidc {
        Some((issuer, expected)) if given.contains('.') => {
            let claims = issuer.verify(given, &expected.audience).await?;
            if claims.verified_email() == Some(expected.service_account.as_str()) {
                Ok(())
            } else {
                Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "invalid_token",
                    "token is not the configured cleanup service account's",
                ))
            }
        }
        _ => Err(ApiError::unauthorized("invalid cleanup token")),
    }
}

/// `POST /cleanup`: the reconciler and the idle clean-up, for Cloud Scheduler or cron,
/// authenticated by Cloud Scheduler's OIDC token (`[cleanup_oidc]`) or the shared
/// `cleanup_token`.
#[utoipa::path(post, path = "/cleanup", tag = "operations", security(("cleanup_token" = [])), responses((status = 200, description = "What the reconciler and the idle clean-up did", body = Object), (status = 401, description = "No or a bad cleanup token", body = ErrorBody), (status = 403, description = "No cleanup_token or cleanup_oidc configured (`cleanup_disabled`)", body = ErrorBody)))]
async fn cleanup(
    State(hub): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    // No credentials is 401 whatever the configuration; only a caller who sent some
    // learns that clean-up is switched off.
    let token = crate::edge::caller::bearer(&headers)
        .ok_or_else(|| ApiError::unauthorized("POST /cleanup needs a bearer token"))?;
    check_scheduler(&hub, token).await?;
    crate::domain::audit::note_actor("system", "scheduler");
    let now = now_ms();
    let reconciled = reconcile::reconcile(&hub, now)
        .await
        .map_err(|e| ApiError::internal("reconcile", e))?;
    let swept = idle::sweep(&hub, now).await?;
    Ok(Json(json!({ "reconciled": reconciled, "idle": swept })))
}
