//! Embedding in a host app (`[embed] allowed_origins`): the terminal page an iframe shows
//! (`/embed/terminal/{id}`, framed only by those origins), and CORS for the routes a browser
//! token reaches by `fetch` (exec and files). No other route answers another origin, and
//! none with credentials: a host page sends a browser token, never a cookie.

use crate::AppState;
use crate::domain::auth::Scope;
use crate::edge::api::ApiError;
use crate::edge::caller::route_scope;
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// `/embed/terminal/{id}`: the workspace's terminal, alone on the page, for an iframe.
#[utoipa::path(get, path = "/embed/terminal/{id}", tag = "embed",
    description = "An embeddable terminal page for a host app's iframe: `/embed/terminal/{id}#ticket=<terminal ticket>` (the ticket in the fragment never reaches a server). It reconnects like the web UI's terminal, with the same ticket until it expires; the host page passes a fresh one with `postMessage({type: 'wsh-ticket', ticket})`. Only the hub itself and `[embed] allowed_origins` may frame it. The page holds no data: a workspace that does not exist, or is not the ticket's, fails to connect.",
    params(("id" = String, Path, description = "Workspace id (UUID)")),
    responses((status = 200, description = "The page", content_type = "text/html"), (status = 404, description = "Not a workspace id", body = crate::edge::api::ErrorBody)))]
pub async fn terminal_page(
    State(hub): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    uuid::Uuid::parse_str(&id).map_err(|_| ApiError::not_found("workspace"))?;
    let ancestors: Vec<&str> = std::iter::once("'self'")
        .chain(hub.config.embed.allowed_origins.iter().map(String::as_str))
        .collect();
    let csp = format!("frame-ancestors {}", ancestors.join(" "));
    Ok((
        [
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_str(&csp).map_err(|e| ApiError::internal("csp", e))?,
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
        ],
        include_str!("web/embed.html"),
    )
        .into_response())
}

/// Middleware: CORS for the allowed origins on the exec and files routes (preflights
/// answered here); every other request passes untouched.
pub async fn cors(State(hub): State<AppState>, req: Request, next: Next) -> Response {
    let embeddable = req
        .extensions()
        .get::<MatchedPath>()
        .and_then(|p| route_scope(p.as_str()))
        .is_some_and(|s| matches!(s, Scope::Exec | Scope::Files));
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .filter(|o| o.to_str().is_ok_and(|o| hub.config.embed.allows(o)))
        .cloned();
    if !embeddable {
        return next.run(req).await;
    }
    let Some(origin) = origin else {
        // The answer depends on the Origin: caches must not give it to an allowed one.
        let mut res = next.run(req).await;
        res.headers_mut()
            .append(header::VARY, HeaderValue::from_static("origin"));
        return res;
    };
    let preflight = req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut res = if preflight {
        let mut res = StatusCode::NO_CONTENT.into_response();
        let h = res.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, PUT, POST, DELETE"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        res
    } else {
        next.run(req).await
    };
    let h = res.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.append(header::VARY, HeaderValue::from_static("origin"));
    res
}
