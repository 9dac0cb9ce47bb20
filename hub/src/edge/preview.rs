//! Port previews: an HTTP reverse proxy to a port inside a workspace, over a QUIC stream to
//! its agent (a `TcpForward` stream per request; the agent connects on loopback).
//!
//! Two forms:
//! - `/preview/:id/:port/...` on the hub's origin. API clients send a bearer token and are
//!   proxied there. Browsers are sent on to the subdomain form with a one-minute entry
//!   ticket: the workspace's pages must never run on the hub's origin, where they could
//!   use the user's hub session.
//! - `<port>-<id>.<preview domain>` (default `localhost` when the hub is on loopback, which
//!   browsers resolve to 127.0.0.1). `/__wsh/auth?ticket=` trades an entry ticket for a
//!   host-only `wsh_preview` cookie (12 h), whose grounds (owner, admin, signed-in user of
//!   an `authenticated` port, share link) are checked again on every request.
//!
//! Both accept a workspace's name where they accept its id (`/preview/api/3000/`,
//! `3000-api.<preview domain>`): a bearer token's owner or the signed-in user's workspace
//! of that name. Browsers are sent on to the id's origin; pages never run on a name's.
//!
//! Requests and responses stream both ways, WebSocket upgrades are spliced, hop-by-hop
//! headers are dropped, `X-Forwarded-*` is set, and the hub's own credentials (its cookies,
//! the bearer token) never reach the workspace.

use crate::base::workspace::{ShareLink, SharingChange, Visibility, Workspace, now_ms};
use crate::edge::api::ApiError;
use crate::edge::caller::{SESSION_COOKIE, bearer, cookie};
use crate::{AppState, Hub};
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use link::{FramedRecv, send_msg};
use protocol::stream::{StreamHeader, StreamRefusal, StreamReply, TcpForwardOpen};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use uuid::Uuid;

pub const PREVIEW_COOKIE: &str = "wsh_preview";
/// How long a preview cookie lasts.
const COOKIE_TTL_MS: i64 = 12 * 3600 * 1000;
/// How long the agent may take to connect to the port.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Idle pooled connections are closed after this long (they count as use of the workspace
/// while open).
pub const POOL_IDLE: Duration = Duration::from_secs(10);
/// At most this many idle connections are kept per port.
const POOL_MAX_PER_PORT: usize = 16;

type Sender = hyper::client::conn::http1::SendRequest<Body>;
/// Idle connections by workspace and port.
type Idle = std::collections::HashMap<(Uuid, u16), Vec<Pooled>>;

/// An idle connection to a previewed port.
struct Pooled {
    sender: Sender,
    /// The replica it goes through, if the agent is held by another one.
    via: Option<String>,
    since: std::time::Instant,
}

/// Idle HTTP/1.1 connections to previewed ports (each a forward stream to the agent),
/// reused by later requests: a request on a pooled connection skips opening a stream and
/// the agent's connect.
#[derive(Default)]
pub struct Pool(std::sync::Mutex<PoolState>);

#[derive(Default)]
struct PoolState {
    idle: Idle,
    /// Replicas that said they are leaving, and when: nothing through them is pooled for
    /// [`LEAVING_MEMORY`] (a request under way when the word came must not put its
    /// connection back).
    leaving: std::collections::HashMap<String, std::time::Instant>,
    /// This replica is leaving: nothing is pooled any more.
    closed: bool,
}

/// How long a replica that said it is leaving gets no pooled connections.
const LEAVING_MEMORY: Duration = Duration::from_secs(60);

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pool")
    }
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self, key: (Uuid, u16)) -> Option<(Sender, Option<String>)> {
        let mut pool = self.lock();
        let idle = pool.idle.get_mut(&key)?;
        while let Some(p) = idle.pop() {
            if p.since.elapsed() < POOL_IDLE && p.sender.is_ready() {
                return Some((p.sender, p.via));
            }
        }
        None
    }

    fn put(&self, key: (Uuid, u16), sender: Sender, via: Option<String>) {
        let mut pool = self.lock();
        let leaving = via.as_ref().and_then(|v| pool.leaving.get(v));
        if pool.closed || leaving.is_some_and(|since| since.elapsed() < LEAVING_MEMORY) {
            return;
        }
        let idle = pool.idle.entry(key).or_default();
        if idle.len() < POOL_MAX_PER_PORT {
            idle.push(Pooled {
                sender,
                via,
                since: std::time::Instant::now(),
            });
        }
    }

    fn retain(&self, keep: impl Fn(&(Uuid, u16), &Pooled) -> bool) {
        let mut pool = self.lock();
        for (key, idle) in pool.idle.iter_mut() {
            idle.retain(|p| keep(key, p));
        }
        pool.idle.retain(|_, idle| !idle.is_empty());
    }

    /// Closes connections idle for [`POOL_IDLE`].
    pub fn prune(&self) {
        self.retain(|_, p| p.since.elapsed() < POOL_IDLE && !p.sender.is_closed());
        self.lock()
            .leaving
            .retain(|_, since| since.elapsed() < LEAVING_MEMORY);
    }

    /// Closes every pooled connection of a workspace (its agent went away).
    pub fn forget(&self, id: Uuid) {
        self.retain(|(ws, _), _| *ws != id);
    }

    /// Closes every pooled connection through `replica`: it is leaving, and an idle stream
    /// through it would keep the agent's connection there open until the drain time ends.
    pub fn forget_via(&self, replica: &str) {
        self.lock()
            .leaving
            .insert(replica.to_owned(), std::time::Instant::now());
        self.retain(|_, p| p.via.as_deref() != Some(replica));
    }

    /// Closes every pooled connection and pools no more (this replica is leaving).
    pub fn close(&self) {
        let mut pool = self.lock();
        pool.closed = true;
        pool.idle.clear();
    }
}

fn scope(id: Uuid, port: u16) -> String {
    format!("{id}:{port}")
}

/// The preview domain: configured, or `localhost` for a hub on a loopback address.
fn preview_domain(hub: &Hub) -> Option<String> {
    if let Some(d) = &hub.config.preview_domain {
        return Some(d.clone());
    }
    let url = url::Url::parse(&hub.public_url).ok()?;
    let loopback = match url.host()? {
        url::Host::Domain(d) => d == "localhost",
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => ip.is_loopback(),
    };
    loopback.then(|| match url.port() {
        Some(p) => format!("localhost:{p}"),
        None => "localhost".into(),
    })
}

/// Where a port's preview is served (the subdomain form's origin).
pub fn origin(hub: &Hub, id: Uuid, port: u16) -> Option<String> {
    let scheme = if hub.public_url.starts_with("https://") {
        "https"
    } else {
        "http"
    };
    Some(format!("{scheme}://{port}-{id}.{}", preview_domain(hub)?))
}

/// What a preview host names: `<port>-<id>`, or `<port>-<name>` (an owner's name for one
/// of their workspaces, which only the hub can resolve: it sends browsers there).
#[derive(Debug, PartialEq)]
enum Target {
    Id(Uuid, u16),
    Name(String, u16),
}

/// The workspace and port a `Host` names, if it is a preview host.
fn target(hub: &Hub, host: &str) -> Option<Target> {
    let domain = preview_domain(hub)?;
    let label = host
        .to_ascii_lowercase()
        .strip_suffix(&domain.to_ascii_lowercase())?
        .strip_suffix('.')?
        .to_owned();
    let (port, key) = label.split_once('-')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    match Uuid::parse_str(key) {
        Ok(id) => Some(Target::Id(id, port)),
        Err(_) => crate::base::workspace::check_name(key)
            .is_ok()
            .then(|| Target::Name(key.to_owned(), port)),
    }
}

fn port_param(s: &str) -> Result<u16, ApiError> {
    s.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ApiError::invalid("port must be 1 to 65535"))
}

/// Why someone may open a preview; kept in the preview cookie and checked on every request.
fn grounds_hold(hub: &Hub, ws: &Workspace, port: u16, grounds: &str) -> bool {
    let now = now_ms();
    match grounds.split_once(':') {
        Some(("until", rest)) => rest.split_once(':').is_some_and(|(until, grounds)| {
            until.parse::<i64>().is_ok_and(|until| until > now)
                && grounds_hold(hub, ws, port, grounds)
        }),
        Some(("owner", sub)) => sub == ws.owner_id,
        Some(("admin", sub)) => hub.config.admins.iter().any(|a| a == sub) || sub == ws.owner_id,
        Some(("user", _)) => ws.sharing.visibility(port) != Visibility::Private,
        Some(("link", id)) => ws
            .sharing
            .links
            .iter()
            .any(|l| l.id == id && l.port == port && l.expires_at > now),
        _ => false,
    }
}

/// Middleware: requests for a preview host go to the preview, everything else on.
pub async fn by_host(State(hub): State<AppState>, req: Request, next: Next) -> Response {
    // HTTP/1.1 names the host in `Host`, HTTP/2 in the `:authority` of the URI.
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .and_then(|h| target(&hub, h));
    match host {
        Some(Target::Id(id, port)) => subdomain(hub, id, port, req)
            .await
            .unwrap_or_else(IntoResponse::into_response),
        Some(Target::Name(name, port)) => by_name(&hub, &name, port, &req),
        None => next.run(req).await,
    }
}

/// A preview host naming a workspace by name: a browser goes through the hub, which knows
/// whose name it is (the signed-in user's) and sends it on to the id's own origin. Pages
/// never run on a name's origin: two owners may use one name, and an origin is a trust
/// boundary (cookies, storage).
fn by_name(hub: &Hub, name: &str, port: u16, req: &Request) -> Response {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    if req.method() == Method::GET {
        return redirect(&format!("{}/preview/{name}/{port}{path}", hub.public_url));
    }
    ApiError::new(
        StatusCode::NOT_FOUND,
        "use_the_id",
        "a preview host with a workspace's name only forwards browsers; use its id's host",
    )
    .into_response()
}

fn query_param(req: &Request, name: &str) -> Option<String> {
    crate::edge::caller::query_param(req.uri().query(), name)
}

async fn subdomain(hub: AppState, id: Uuid, port: u16, req: Request) -> Result<Response, ApiError> {
    let now = now_ms();
    if req.uri().path() == "/__wsh/auth" {
        let ticket = query_param(&req, "ticket").unwrap_or_default();
        let grounds = hub
            .tickets
            .verify_scoped(&ticket, &scope(id, port), "preview-entry", now)?;
        let next = query_param(&req, "next")
            .filter(|n| n.starts_with('/') && !n.starts_with("//") && !n.contains('\\'))
            .unwrap_or_else(|| "/".into());
        let (long, _) =
            hub.tickets
                .issue_scoped(&scope(id, port), &grounds, "preview", now + COOKIE_TTL_MS);
        let secure = if hub.public_url.starts_with("https://") {
            "; Secure"
        } else {
            ""
        };
        let cookie = format!(
            "{PREVIEW_COOKIE}={long}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}{secure}",
            COOKIE_TTL_MS / 1000
        );
        let mut res = StatusCode::SEE_OTHER.into_response();
        res.headers_mut().insert(
            header::LOCATION,
            HeaderValue::from_str(&next).map_err(|_| ApiError::invalid("bad next"))?,
        );
        res.headers_mut().insert(
            header::SET_COOKIE,
            HeaderValue::from_str(&cookie).map_err(|e| ApiError::internal("cookie", e))?,
        );
        return Ok(res);
    }
    let ws = hub.store.get_workspace(id).await?;
    let allowed = ws.sharing.visibility(port) == Visibility::Public
        || cookie(req.headers(), PREVIEW_COOKIE)
            .and_then(|c| {
                hub.tickets
                    .verify_scoped(c, &scope(id, port), "preview", now)
                    .ok()
            })
            .is_some_and(|grounds| grounds_hold(&hub, &ws, port, &grounds));
    if !allowed {
        // A browser without a preview cookie goes through the hub to get one.
        let wants_html = req
            .headers()
            .get(header::ACCEPT)
            .and_then(|a| a.to_str().ok())
            .is_some_and(|a| a.contains("text/html"));
        if req.method() == Method::GET && wants_html {
            let path = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            let to = format!("{}/preview/{id}/{port}{path}", hub.public_url);
            return Ok(redirect(&to));
        }
        return Err(ApiError::unauthorized(
            "open the preview through the hub to sign in",
        ));
    }
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    proxy(&hub, &ws, port, req, path, None).await
}

fn redirect(to: &str) -> Response {
    let mut res = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    res
}

/// `/preview/:id/:port` and `/preview/:id/:port/*rest`.
#[utoipa::path(method(get, put, post, delete, patch, head, options), path = "/preview/{id}/{port}/{path}", tag = "ports",
    security((), ("bearer" = [])),
    description = "A workspace port's preview, path form (also `/preview/{id}/{port}` with no path). With a bearer token the request is proxied right here (a WebSocket upgrade too), and the answer is the dev server's own, whatever its status. Without one (browsers) the hub decides on what grounds the caller may open it (the port's visibility, a `share` link secret, the session cookie) and redirects (303) to the preview's own origin, which needs `preview_domain` in the hub config.",
    params(("id" = String, Path, description = "Workspace id (UUID), or the name of one of yours (browsers: sent on to the id; browser tokens and share links: the id)"), ("port" = u16, Path, minimum = 1, maximum = 65535, description = "Port"), ("path" = String, Path, description = "Path on the dev server (may be empty and may hold `/`), with its query"),
        ("share" = Option<String>, Query, description = "A share link's secret (browsers)")),
    responses(
        (status = 200, description = "The dev server's answer (any status it sends)"),
        (status = 303, description = "Browsers: on to the preview's origin (`Location`)"),
        (status = 400, description = "Bad port or path", body = crate::edge::api::ErrorBody),
        (status = 401, description = "Missing or bad token, cookie or share link (a private port)", body = crate::edge::api::ErrorBody),
        (status = 404, description = "No such workspace (or not yours), or `preview_domain_not_configured` for browsers", body = crate::edge::api::ErrorBody),
        (status = 409, description = "No agent connected (`agent_offline`)", body = crate::edge::api::ErrorBody),
        (status = 502, description = "`port_unreachable` (nothing listens), `agent_unreachable` or `bad_response`", body = crate::edge::api::ErrorBody),
        (status = 503, description = "The agent is between hub replicas (`agent_offline` or `agent_moved`, with `Retry-After`)", body = crate::edge::api::ErrorBody),
        (status = 504, description = "`preview_timeout`: the port sent no response in time", body = crate::edge::api::ErrorBody)))]
pub async fn path_form(
    State(hub): State<AppState>,
    Path(params): Path<Vec<(String, String)>>,
    req: Request,
) -> Result<Response, ApiError> {
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let key = param("id").unwrap_or_default().to_owned();
    let id = Uuid::parse_str(&key).ok();
    if id.is_none() && crate::base::workspace::check_name(&key).is_err() {
        return Err(ApiError::not_found("workspace"));
    }
    let port = port_param(param("port").unwrap_or_default())?;
    let prefix = format!("/preview/{key}/{port}");
    let rest = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .strip_prefix(&prefix)
        .unwrap_or("/")
        .to_owned();
    let rest = if rest.starts_with('/') {
        rest
    } else {
        format!("/{rest}")
    };
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());

    // API clients: a bearer token, proxied right here.
    if let Some(token) = bearer(req.headers()) {
        let caller = crate::edge::caller::token_caller(
            &hub,
            req.headers(),
            token,
            peer,
            Some(crate::domain::auth::Scope::Preview),
            id,
        )
        .await?;
        let ws = match id {
            // By id, anyone signed in opens a port that is not private.
            Some(id) => {
                let ws = hub.store.get_workspace(id).await?;
                match caller.authorize(ws.clone()) {
                    Ok(ws) => ws,
                    Err(e) if ws.sharing.visibility(port) == Visibility::Private => {
                        return Err(e.into());
                    }
                    Err(_) => ws,
                }
            }
            // A name is the caller's own.
            None => caller.workspace(&hub, &key).await?,
        };
        return proxy(&hub, &ws, port, req, rest, Some(prefix)).await;
    }

    // Browsers naming a workspace by name: it is the signed-in user's; on to its id.
    let Some(id) = id else {
        let session = cookie(req.headers(), SESSION_COOKIE)
            .ok_or_else(|| ApiError::unauthorized("sign in to open this preview"))?;
        let caller = crate::domain::auth::authenticate(&hub, session, peer).await?;
        let ws = caller.workspace(&hub, &key).await?;
        return Ok(redirect(&format!("/preview/{}/{port}{rest}", ws.id)));
    };

    // Browsers: decide on what grounds, then on to the preview's own origin.
    let origin = origin(&hub, id, port).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "preview_domain_not_configured",
            "browser previews need preview_domain in the hub config",
        )
    })?;
    // Until the caller is known, a workspace that does not exist looks like a private
    // port: a stranger learns nothing from the answer.
    let ws = match hub.store.get_workspace(id).await {
        Ok(ws) => Some(ws),
        Err(crate::store::StoreError::NotFound) => None,
        Err(e) => return Err(e.into()),
    };
    let visibility = ws
        .as_ref()
        .map_or(Visibility::Private, |ws| ws.sharing.visibility(port));
    let grounds = if let Some(secret) = query_param(&req, "share") {
        let hash = crate::domain::auth::token_hash(&secret);
        let link = ws
            .iter()
            .flat_map(|ws| &ws.sharing.links)
            .find(|l| l.secret_hash == hash && l.port == port && l.expires_at > now_ms())
            .ok_or_else(|| {
                ApiError::unauthorized("this share link is unknown, revoked or expired")
            })?;
        format!("link:{}", link.id)
    } else if let Some(ticket) = query_param(&req, "ticket") {
        // A browser token for this workspace's previews (a host app's page links here).
        let owner =
            hub.tickets
                .verify(&ticket, id, crate::domain::auth::Purpose::Preview, now_ms())?;
        // The preview cookie lasts no longer than the browser token did.
        let until = crate::domain::auth::Tickets::expiry(&ticket).unwrap_or_default();
        format!("until:{until}:owner:{owner}")
    } else if visibility == Visibility::Public {
        return Ok(redirect(&format!("{origin}{rest}")));
    } else {
        let session = cookie(req.headers(), SESSION_COOKIE)
            .ok_or_else(|| ApiError::unauthorized("sign in to open this preview"))?;
        let caller = crate::domain::auth::authenticate(&hub, session, peer).await?;
        let ws = ws.ok_or_else(|| ApiError::not_found("workspace"))?;
        match caller.authorize(ws.clone()) {
            Ok(_) if caller.owner_id == ws.owner_id => format!("owner:{}", caller.owner_id),
            Ok(_) => format!("admin:{}", caller.owner_id),
            Err(_) if visibility == Visibility::Authenticated => {
                format!("user:{}", caller.owner_id)
            }
            Err(e) => return Err(e.into()),
        }
    };
    let (ticket, _) = hub.tickets.issue_scoped(
        &scope(id, port),
        &grounds,
        "preview-entry",
        now_ms() + crate::domain::auth::TICKET_TTL_MS,
    );
    let next = rest
        .split_once('?')
        .map(|(path, query)| {
            let kept: Vec<_> = url::form_urlencoded::parse(query.as_bytes())
                .filter(|(k, _)| k != "share" && k != "ticket")
                .collect();
            if kept.is_empty() {
                path.to_owned()
            } else {
                let q = url::form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(kept)
                    .finish();
                format!("{path}?{q}")
            }
        })
        .unwrap_or(rest);
    let to = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("ticket", &ticket)
        .append_pair("next", &next)
        .finish();
    Ok(redirect(&format!("{origin}/__wsh/auth?{to}")))
}

/// Drops hop-by-hop headers (and those `Connection` names); returns the `Upgrade` value
/// if the message asked to upgrade.
fn strip_hop_by_hop(headers: &mut HeaderMap) -> Option<HeaderValue> {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    let upgrade = listed
        .contains(&header::UPGRADE)
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten();
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    for name in listed {
        headers.remove(name);
    }
    upgrade
}

/// Removes the hub's own cookies from a request bound for the workspace.
fn strip_hub_cookies(headers: &mut HeaderMap) {
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|pair| {
            let name = pair.split('=').next().unwrap_or_default();
            !name.is_empty() && !name.starts_with("wsh_")
        })
        .map(str::to_owned)
        .collect();
    headers.remove(header::COOKIE);
    if !kept.is_empty()
        && let Ok(v) = HeaderValue::from_str(&kept.join("; "))
    {
        headers.insert(header::COOKIE, v);
    }
}

fn bad_gateway(code: &'static str, message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_GATEWAY, code, message)
}

/// Proxies one request to `port` of the workspace.
async fn proxy(
    hub: &Hub,
    ws: &Workspace,
    port: u16,
    mut req: Request,
    path_and_query: String,
    prefix: Option<String>,
) -> Result<Response, ApiError> {
    let used = || {
        if hub.config.preview_is_activity {
            hub.agents.note_use(ws.id, now_ms());
        }
    };
    let key = (ws.id, port);
    let pooled = if req.headers().contains_key(header::UPGRADE) {
        None // an upgraded connection is never reused
    } else {
        hub.previews.take(key)
    };
    // A pooled connection reaches the agent already; only a new one needs its path (on
    // another replica's agent, that is a store read).
    let (mut sender, reused, mut via) = match pooled {
        Some((sender, via)) => {
            used();
            (sender, true, via)
        }
        None => {
            let (sender, via) = connect_port(hub, ws, port).await?;
            used();
            (sender, false, via)
        }
    };
    // The request as the workspace's server should see it.
    let client_upgrade = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>();
    let original_host = req.headers().get(header::HOST).cloned().or_else(|| {
        req.uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let (mut parts, body) = req.into_parts();
    let upgrade = strip_hop_by_hop(&mut parts.headers);
    strip_hub_cookies(&mut parts.headers);
    parts.headers.remove(header::AUTHORIZATION);
    parts.uri = path_and_query
        .parse()
        .map_err(|_| ApiError::invalid("bad path"))?;
    parts.version = axum::http::Version::HTTP_11;
    let headers = &mut parts.headers;
    if let Ok(v) = HeaderValue::from_str(&format!("localhost:{port}")) {
        headers.insert(header::HOST, v);
    }
    if let Some(host) = original_host {
        headers.insert("x-forwarded-host", host);
    }
    let proto = if hub.public_url.starts_with("https://") {
        "https"
    } else {
        "http"
    };
    headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    if let Some(ip) = peer {
        let chain = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(before) => format!("{before}, {ip}"),
            None => ip.to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&chain) {
            headers.insert("x-forwarded-for", v);
        }
    }
    if let Some(prefix) = prefix
        && let Ok(v) = HeaderValue::from_str(&prefix)
    {
        headers.insert("x-forwarded-prefix", v);
    }
    if let Some(upgrade) = &upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade.clone());
    }
    // A pooled connection the server closed meanwhile fails before any byte of the
    // request is taken: a bodiless request is then sent again on a fresh connection.
    let retry = (reused && matches!(parts.method, Method::GET | Method::HEAD)).then(|| {
        let mut again = hyper::Request::new(Body::empty());
        *again.method_mut() = parts.method.clone();
        *again.uri_mut() = parts.uri.clone();
        *again.version_mut() = parts.version;
        *again.headers_mut() = parts.headers.clone();
        again
    });
    // The timeout counts silence, not the whole exchange: an upload that keeps moving
    // (the server takes its body) goes on for as long as it takes.
    let started = tokio::time::Instant::now();
    let moved = Arc::new(AtomicU64::new(0));
    let body = {
        let moved = moved.clone();
        Body::new(http_body_util::BodyExt::map_frame(body, move |frame| {
            moved.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
            frame
        }))
    };
    let request = hyper::Request::from_parts(parts, body);
    let timeout = hub.config.preview_timeout;
    let timed_out = || {
        ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "preview_timeout",
            format!("port {port} sent no response in time"),
        )
    };
    let bad = |e: hyper::Error| bad_gateway("bad_response", format!("port {port}: {e}"));
    let mut response =
        match until_silent(timeout, started, &moved, sender.send_request(request)).await {
            None => return Err(timed_out()),
            Some(Ok(response)) => response,
            Some(Err(e)) => match retry {
                Some(again) if e.is_canceled() || e.is_closed() || e.is_incomplete_message() => {
                    (sender, via) = connect_port(hub, ws, port).await?;
                    tokio::time::timeout(timeout, sender.send_request(again))
                        .await
                        .map_err(|_| timed_out())?
                        .map_err(bad)?
                }
                _ => return Err(bad(e)),
            },
        };

    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        // WebSocket (or another upgrade): splice the two upgraded connections.
        let Some(client) = client_upgrade else {
            return Err(bad_gateway(
                "bad_response",
                "the server switched protocols unasked".into(),
            ));
        };
        let server = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            if let (Ok(client), Ok(server)) = (client.await, server.await) {
                let mut client = hyper_util::rt::TokioIo::new(client);
                let mut server = hyper_util::rt::TokioIo::new(server);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            }
        });
        let (parts, _) = response.into_parts();
        return Ok(Response::from_parts(parts, Body::empty()));
    }
    // Once this response is read to its end, the connection can serve another request.
    let pool = hub.previews.clone();
    tokio::spawn(async move {
        if sender.ready().await.is_ok() {
            pool.put(key, sender, via);
        }
    });
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // The dev server's answer, whatever its status: not one of the hub's errors.
    parts.extensions.insert(crate::edge::api::Proxied);
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// `response`, unless `timeout` passes with neither it nor a move of the request's body
/// (`moved`: when the body last gave a frame, in ms after `started`).
async fn until_silent<T>(
    timeout: Duration,
    started: tokio::time::Instant,
    moved: &AtomicU64,
    response: impl std::future::Future<Output = T>,
) -> Option<T> {
    let last_move = || started + Duration::from_millis(moved.load(Ordering::Relaxed));
    tokio::pin!(response);
    loop {
        let last = last_move();
        tokio::select! {
            out = &mut response => return Some(out),
            _ = tokio::time::sleep_until(last + timeout) => {
                if last_move() == last {
                    return None;
                }
            }
        }
    }
}

/// An HTTP/1.1 connection to `port` over a new forward stream to the workspace's agent, on
/// this replica or through another (named in the answer). An agent moving between replicas
/// is looked for again for up to [`crate::links::peers::AGENT_RETURN_WAIT`].
async fn connect_port(
    hub: &Hub,
    ws: &Workspace,
    port: u16,
) -> Result<(Sender, Option<String>), ApiError> {
    let deadline = tokio::time::Instant::now() + crate::links::peers::AGENT_RETURN_WAIT;
    loop {
        let agent = crate::links::peers::agent_path_waiting(hub, ws)
            .await
            .ok_or_else(|| ApiError::agent_offline(ws.status))?;
        let via = agent.replica().map(str::to_owned);
        match connect(&hub.metrics, agent, port).await {
            Err(e) if e.code() == AGENT_MOVED => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(ApiError::agent_offline(ws.status));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            result => return result.map(|sender| (sender, via)),
        }
    }
}

/// The code of [`connect`]'s error when the replica it went through no longer holds the
/// agent.
const AGENT_MOVED: &str = "agent_moved";

/// Opens a forward stream to `port` and an HTTP/1.1 connection over it.
async fn connect(
    metrics: &crate::base::metrics::Metrics,
    agent: crate::links::peers::AgentPath,
    port: u16,
) -> Result<Sender, ApiError> {
    // Ask the agent for the port.
    let (mut send, recv) = agent
        .open_bi()
        .await
        .map_err(|e| bad_gateway("agent_unreachable", e.to_string()))?;
    send_msg(
        &mut send,
        &StreamHeader::TcpForward(TcpForwardOpen { port }),
    )
    .await
    .map_err(|e| bad_gateway("agent_unreachable", e.to_string()))?;
    let mut recv = FramedRecv::with_limit(recv, crate::links::agents::CONTROL_FRAME_LIMIT);
    match tokio::time::timeout(REPLY_TIMEOUT, recv.expect::<StreamReply>()).await {
        Ok(Ok(StreamReply::Accepted(_))) => {}
        Ok(Ok(StreamReply::Refused(r))) if r.reason == StreamRefusal::Moved => {
            return Err(ApiError::retry_later(AGENT_MOVED, r.message));
        }
        Ok(Ok(StreamReply::Refused(r))) => {
            return Err(bad_gateway(
                "port_unreachable",
                format!("nothing answers on port {port}: {}", r.message),
            ));
        }
        Ok(Ok(StreamReply::Forwarding(_))) => {
            return Err(bad_gateway("agent_unreachable", "unexpected answer".into()));
        }
        Ok(Err(e)) => return Err(bad_gateway("agent_unreachable", e.to_string())),
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "preview_timeout",
                "the agent did not reach the port in time",
            ));
        }
    }
    let (recv, mut decoder) = recv.into_parts();
    let early = std::io::Cursor::new(decoder.take_buffered());
    // Counted in /metrics while the connection lives, its bytes both ways.
    let relayed = metrics.relayed("preview");
    let (down, up) = (relayed.bytes.clone(), relayed.bytes.clone());
    let recv =
        tokio_util::io::InspectReader::new(tokio::io::AsyncReadExt::chain(early, recv), move |b| {
            down.inc_by(b.len() as u64);
        });
    let send = tokio_util::io::InspectWriter::new(send, move |b| {
        up.inc_by(b.len() as u64);
    });
    let io = tokio::io::join(recv, send);
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|e| bad_gateway("port_unreachable", e.to_string()))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "preview connection ended");
        }
        drop(relayed);
    });
    Ok(sender)
}

/// The body of `PUT /workspaces/:id/ports/:port/sharing`.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetSharing {
    pub visibility: Visibility,
}

/// A port's preview sharing, as the API shows it.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct PortSharing {
    pub port: u16,
    pub visibility: Visibility,
    /// Where the preview is served to browsers (`null` without a preview domain).
    pub url: Option<String>,
    /// Share links of this port (their secrets are shown only once, at creation).
    pub links: Vec<ShareLinkView>,
}

#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ShareLinkView {
    pub id: String,
    pub expires_at: String,
    /// Only in the answer that created it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

fn sharing_view(hub: &Hub, ws: &Workspace, port: u16) -> PortSharing {
    let now = now_ms();
    PortSharing {
        port,
        visibility: ws.sharing.visibility(port),
        url: origin(hub, ws.id, port).map(|o| format!("{o}/")),
        links: ws
            .sharing
            .links
            .iter()
            .filter(|l| l.port == port && l.expires_at > now)
            .map(|l| ShareLinkView {
                id: l.id.clone(),
                expires_at: crate::edge::api::rfc3339(l.expires_at),
                url: None,
            })
            .collect(),
    }
}

async fn owned_port(
    hub: &Hub,
    caller: &crate::domain::auth::Caller,
    id: &str,
    port: &str,
) -> Result<(Workspace, u16), ApiError> {
    let ws = caller.workspace(hub, id).await?;
    Ok((ws, port_param(port)?))
}

#[utoipa::path(get, path = "/workspaces/{id}/ports/{port}/sharing", tag = "ports", security(("bearer" = [])), params(("id" = String, Path, description = "Workspace id (UUID), or the name of one of yours (browser tokens: the id)"), ("port" = u16, Path, minimum = 1, maximum = 65535, description = "Port")), responses((status = 200, description = "Who may open the port's preview", body = PortSharing), (status = 400, description = "Bad port", body = crate::edge::api::ErrorBody), (status = 401, description = "Missing or bad token", body = crate::edge::api::ErrorBody), (status = 404, description = "No such workspace (or not yours)", body = crate::edge::api::ErrorBody)))]
pub async fn get_sharing(
    State(hub): State<AppState>,
    caller: crate::domain::auth::Caller,
    Path((id, port)): Path<(String, String)>,
) -> Result<axum::Json<PortSharing>, ApiError> {
    let (ws, port) = owned_port(&hub, &caller, &id, &port).await?;
    Ok(axum::Json(sharing_view(&hub, &ws, port)))
}

#[utoipa::path(put, path = "/workspaces/{id}/ports/{port}/sharing", tag = "ports", security(("bearer" = [])), params(("id" = String, Path, description = "Workspace id (UUID), or the name of one of yours (browser tokens: the id)"), ("port" = u16, Path, minimum = 1, maximum = 65535, description = "Port")), request_body = SetSharing, responses((status = 200, description = "Updated", body = PortSharing), (status = 400, description = "Bad port or body", body = crate::edge::api::ErrorBody), (status = 401, description = "Missing or bad token", body = crate::edge::api::ErrorBody), (status = 404, description = "No such workspace (or not yours)", body = crate::edge::api::ErrorBody)))]
pub async fn set_sharing(
    State(hub): State<AppState>,
    caller: crate::domain::auth::Caller,
    Path((id, port)): Path<(String, String)>,
    crate::edge::api::ValidJson(req): crate::edge::api::ValidJson<SetSharing>,
) -> Result<axum::Json<PortSharing>, ApiError> {
    let (ws, port) = owned_port(&hub, &caller, &id, &port).await?;
    let ws = hub
        .store
        .update_sharing(
            ws.id,
            SharingChange::Visibility(port, req.visibility),
            now_ms(),
        )
        .await?;
    tracing::info!(workspace = %ws.id, port, visibility = ?req.visibility, "port sharing changed");
    Ok(axum::Json(sharing_view(&hub, &ws, port)))
}

/// The body of `POST /workspaces/:id/ports/:port/links`.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateLink {
    /// 60 s to 30 days; default 24 h.
    #[schema(minimum = 60, maximum = 2592000)]
    pub expires_in_secs: Option<u64>,
}

#[utoipa::path(post, path = "/workspaces/{id}/ports/{port}/links", tag = "ports", security(("bearer" = [])), params(("id" = String, Path, description = "Workspace id (UUID), or the name of one of yours (browser tokens: the id)"), ("port" = u16, Path, minimum = 1, maximum = 65535, description = "Port")), request_body = CreateLink, responses((status = 201, description = "A share link (its URL is shown only now)", body = ShareLinkView), (status = 400, description = "Bad port or body", body = crate::edge::api::ErrorBody), (status = 401, description = "Missing or bad token", body = crate::edge::api::ErrorBody), (status = 404, description = "No such workspace (or not yours)", body = crate::edge::api::ErrorBody)))]
pub async fn create_link(
    State(hub): State<AppState>,
    caller: crate::domain::auth::Caller,
    Path((id, port)): Path<(String, String)>,
    crate::edge::api::ValidJson(req): crate::edge::api::ValidJson<CreateLink>,
) -> Result<(StatusCode, axum::Json<ShareLinkView>), ApiError> {
    let (ws, port) = owned_port(&hub, &caller, &id, &port).await?;
    let secs = req.expires_in_secs.unwrap_or(24 * 3600);
    if !(60..=30 * 24 * 3600).contains(&secs) {
        return Err(ApiError::invalid(
            "expires_in_secs must be between 60 and 2592000",
        ));
    }
    let secret = format!(
        "wsl_{}",
        crate::base::ca::hex(&crate::base::ca::random_bytes::<24>())
    );
    let link = ShareLink {
        id: crate::base::ca::hex(&crate::base::ca::random_bytes::<8>()),
        port,
        secret_hash: crate::domain::auth::token_hash(&secret),
        expires_at: now_ms() + secs as i64 * 1000,
    };
    hub.store
        .update_sharing(ws.id, SharingChange::AddLink(link.clone()), now_ms())
        .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(ShareLinkView {
            id: link.id,
            expires_at: crate::edge::api::rfc3339(link.expires_at),
            url: Some(format!(
                "{}/preview/{}/{port}/?share={secret}",
                hub.public_url, ws.id
            )),
        }),
    ))
}

#[utoipa::path(delete, path = "/workspaces/{id}/ports/{port}/links/{link}", tag = "ports", security(("bearer" = [])), params(("id" = String, Path, description = "Workspace id (UUID), or the name of one of yours (browser tokens: the id)"), ("port" = u16, Path, minimum = 1, maximum = 65535, description = "Port"), ("link" = String, Path, description = "Share link id")), responses((status = 204, description = "Revoked"), (status = 401, description = "Missing or bad token", body = crate::edge::api::ErrorBody), (status = 404, description = "No such workspace or link", body = crate::edge::api::ErrorBody)))]
pub async fn revoke_link(
    State(hub): State<AppState>,
    caller: crate::domain::auth::Caller,
    Path((id, port, link)): Path<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    let (ws, port) = owned_port(&hub, &caller, &id, &port).await?;
    if !ws
        .sharing
        .links
        .iter()
        .any(|l| l.id == link && l.port == port)
    {
        return Err(ApiError::not_found("share link"));
    }
    hub.store
        .update_sharing(ws.id, SharingChange::RemoveLink(link), now_ms())
        .await
        .map_err(|e| match e {
            crate::store::StoreError::NotFound => ApiError::not_found("share link"),
            e => e.into(),
        })?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_hub_cookies_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            "keep-alive, x-private, Upgrade".parse().unwrap(),
        );
        h.insert("x-private", "1".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("accept", "text/html".parse().unwrap());
        let upgrade = strip_hop_by_hop(&mut h);
        assert_eq!(upgrade.unwrap(), "websocket");
        assert!(h.get("x-private").is_none() && h.get("te").is_none());
        assert!(h.get("connection").is_none());
        assert_eq!(h["accept"], "text/html");

        let mut h = HeaderMap::new();
        h.insert(
            "cookie",
            "wsh_session=s; app=1; wsh_preview=p; theme=dark"
                .parse()
                .unwrap(),
        );
        strip_hub_cookies(&mut h);
        assert_eq!(h["cookie"], "app=1; theme=dark");
        let mut h = HeaderMap::new();
        h.insert("cookie", "wsh_session=s".parse().unwrap());
        strip_hub_cookies(&mut h);
        assert!(h.get("cookie").is_none());
    }
}
