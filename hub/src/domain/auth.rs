//! Who is calling: API tokens (random, stored only as SHA-256 hashes), sent as a bearer
//! token by the CLI and scripts, or held by browsers in the `wsh_session` cookie (a session
//! is a token minted at sign-in). Requests authenticated by the cookie must carry the
//! session's CSRF token in `X-CSRF-Token` unless their method is safe (GET, HEAD).
//!
//! Every handler that touches a workspace takes a [`Caller`] and goes through
//! [`Caller::authorize`]; a workspace that is not the caller's reads as "not found".

use crate::base::ca;
use crate::base::workspace::{Workspace, now_ms};
use crate::domain::error::{Error, Kind};
use crate::store::ApiToken;
pub use crate::store::{Scope, ServiceGrant};
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;
use uuid::Uuid;

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub owner_id: String,
    /// The verified e-mail the caller signed in with, if any (for `@domain` admins).
    pub email: Option<String>,
    /// Team mode: an admin (listed in `admins`) sees and acts on every workspace.
    pub admin: bool,
    /// What the credential reaches.
    pub grant: Grant,
}

/// What a caller's credential reaches. Only a user's own token (or session) reaches every
/// route; the others are held to the routes of their scopes (`edge::caller::route_scope`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// A user's API token or browser session.
    User,
    /// A host app's service token acting for `owner_id` (named in `X-Wsh-Owner`).
    Service(ServiceGrant),
    /// A browser token: one workspace, one purpose, until it expires.
    Ticket { workspace: Uuid, purpose: Purpose },
}

impl Grant {
    /// Whether the credential reaches a route of `scope`.
    pub fn reaches(&self, scope: Scope) -> bool {
        match self {
            Grant::User => true,
            Grant::Service(s) => s.scopes.contains(&scope),
            Grant::Ticket { purpose, .. } => purpose.scope() == scope,
        }
    }
}

impl Caller {
    /// Whose workspaces the caller lists: their own, or everyone's for an admin.
    pub fn scope(&self) -> Option<&str> {
        (!self.admin).then_some(self.owner_id.as_str())
    }

    /// The workspace `key` names (its id, or the name of one of the caller's own) if the
    /// caller may act on it; anything else reads as not found.
    pub async fn workspace(&self, hub: &crate::Hub, key: &str) -> Result<Workspace, Error> {
        let ws = match Uuid::parse_str(key) {
            Ok(id) => hub.store.get_workspace(id).await?,
            Err(_) if crate::base::workspace::check_name(key).is_ok() => {
                hub.store
                    .find_workspace_by_name(&self.owner_id, key)
                    .await?
            }
            Err(_) => return Err(Error::not_found("workspace")),
        };
        // Admins see attempts on a workspace in its audit log, refused ones included.
        crate::domain::audit::note_workspace(ws.id);
        self.authorize(ws)
    }

    /// The one ownership check: a non-owner learns nothing, not even that it exists.
    pub fn authorize(&self, ws: Workspace) -> Result<Workspace, Error> {
        if self.admin || ws.owner_id == self.owner_id {
            Ok(ws)
        } else {
            Err(Error::not_found("workspace"))
        }
    }
}

/// The window for `auth_failures_per_minute`.
pub const FAILURE_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// Failed authentications per client address, for rate limiting.
#[derive(Debug, Default)]
pub struct Failures(std::sync::Mutex<HashMap<IpAddr, (u32, Instant)>>);

impl Failures {
    fn blocked(&self, ip: IpAddr, now: Instant, limit: u32) -> bool {
        let Ok(map) = self.0.lock() else { return false };
        map.get(&ip)
            .is_some_and(|(n, since)| *n >= limit && now.duration_since(*since) < FAILURE_WINDOW)
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

/// The one place a user's API token becomes a [`Caller`] (HTTP, WebSocket and the CLI's
/// QUIC). Failures are counted per client address; past `auth_failures_per_minute`, the
/// address gets `429` without its token being looked at. A service token is refused here:
/// it acts only through [`authenticate_service`], naming an owner.
pub async fn authenticate(
    hub: &crate::Hub,
    token: &str,
    peer: Option<IpAddr>,
) -> Result<Caller, Error> {
    let record = lookup(hub, token, peer).await?;
    if record.service.is_some() {
        return Err(Error::new(
            Kind::Forbidden,
            "service_token",
            "a service token acts through the HTTP API and names an owner in X-Wsh-Owner",
        ));
    }
    Ok(Caller {
        admin: hub
            .config
            .is_admin(&record.owner_id, record.email.as_deref()),
        owner_id: record.owner_id,
        email: record.email,
        grant: Grant::User,
    })
}

/// A service token acting for `owner` (the `X-Wsh-Owner` header) on a route of `scope`.
/// The owner id must start with the token's `owner_prefix`, the scope must be one of its
/// scopes, and the admin who created it must still be an admin.
pub async fn authenticate_service(
    hub: &crate::Hub,
    token: &str,
    peer: Option<IpAddr>,
    owner: Option<&str>,
    scope: Option<Scope>,
) -> Result<Caller, Error> {
    let record = lookup(hub, token, peer).await?;
    let Some(grant) = record.service else {
        return Err(Error::unauthorized("invalid token"));
    };
    if !hub
        .config
        .is_admin(&record.owner_id, record.email.as_deref())
    {
        return Err(Error::unauthorized(
            "this service token's creator is no longer an admin",
        ));
    }
    if !scope.is_some_and(|s| grant.scopes.contains(&s)) {
        return Err(Error::new(
            Kind::Forbidden,
            "scope",
            "this service token's scopes do not include this route",
        ));
    }
    let owner = owner.ok_or_else(|| {
        Error::new(
            Kind::Invalid,
            "owner_required",
            "a service token names the owner it acts for in X-Wsh-Owner",
        )
    })?;
    check_owner_id(owner)?;
    if !owner.starts_with(&grant.owner_prefix) {
        return Err(Error::new(
            Kind::Forbidden,
            "owner_not_allowed",
            "this service token may act only for owner ids with its owner_prefix",
        ));
    }
    Ok(Caller {
        owner_id: owner.to_owned(),
        email: None,
        admin: false,
        grant: Grant::Service(grant),
    })
}

/// An owner id a service token names: 1 to 128 of `A-Z a-z 0-9 . _ @ + -`.
pub fn check_owner_id(owner: &str) -> Result<(), Error> {
    let ok = !owner.is_empty()
        && owner.len() <= 128
        && owner
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@+-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            Kind::Invalid,
            "bad_owner",
            "X-Wsh-Owner must be 1 to 128 of A-Z a-z 0-9 . _ @ + -",
        ))
    }
}

/// Looks a token up, with rate limiting of failures per address.
async fn lookup(hub: &crate::Hub, token: &str, peer: Option<IpAddr>) -> Result<ApiToken, Error> {
    let now = Instant::now();
    let limit = hub.config.auth_failures_per_minute;
    if peer.is_some_and(|ip| hub.auth_failures.blocked(ip, now, limit)) {
        return Err(Error::new(
            Kind::TooManyRequests,
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

async fn check_token(hub: &crate::Hub, token: &str) -> Result<ApiToken, Error> {
    if token.is_empty() {
        return Err(Error::unauthorized("missing bearer token"));
    }
    if token.len() > 256 {
        return Err(Error::unauthorized("malformed token"));
    }
    let record = hub
        .store
        .find_api_token(&token_hash(token))
        .await
        .map_err(Error::from)?
        .ok_or_else(|| Error::unauthorized("invalid token"))?;
    if record.expires_at.is_some_and(|at| at <= now_ms()) {
        return Err(Error::unauthorized("token expired"));
    }
    Ok(record)
}

/// Hash under which enrollment and API tokens are stored: hex SHA-256, never the token.
pub fn token_hash(token: &str) -> String {
    ca::fingerprint(token.as_bytes())
}

/// Mints a new API token for `owner_id` (signed in with `email`, if verified), or with
/// `service`, a service token created by that admin; only its hash is stored. Returns the
/// token.
pub async fn mint_api_token(
    hub: &crate::Hub,
    owner_id: &str,
    email: Option<&str>,
    name: &str,
    expires_at: Option<i64>,
    service: Option<ServiceGrant>,
) -> anyhow::Result<String> {
    let kind = if service.is_some() {
        "wsh_svc_"
    } else {
        "wsh_"
    };
    let token = format!("{kind}{}", ca::hex(&ca::random_bytes::<24>()));
    hub.store
        .insert_api_token(
            &token_hash(&token),
            &ApiToken {
                owner_id: owner_id.to_owned(),
                email: email.map(str::to_owned),
                name: name.to_owned(),
                expires_at,
                service,
            },
        )
        .await?;
    Ok(token)
}

/// What a ticket (a browser token) lets its bearer open, on one workspace.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// Its terminal WebSocket (and the embeddable terminal page).
    Terminal,
    /// Its port previews (`/preview/{id}/{port}?ticket=`).
    Preview,
    /// Its exec API.
    Exec,
    /// Its files API.
    Files,
}

impl Purpose {
    pub const ALL: [Purpose; 4] = [
        Purpose::Terminal,
        Purpose::Preview,
        Purpose::Exec,
        Purpose::Files,
    ];

    /// In the signed payload; distinct from the preview cookie's and entry tickets' own.
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Terminal => "terminal",
            Purpose::Preview => "preview-open",
            Purpose::Exec => "exec",
            Purpose::Files => "files",
        }
    }

    /// The routes it reaches.
    pub fn scope(self) -> Scope {
        match self {
            Purpose::Terminal => Scope::Terminal,
            Purpose::Preview => Scope::Preview,
            Purpose::Exec => Scope::Exec,
            Purpose::Files => Scope::Files,
        }
    }
}

/// How long a ticket is good for by default: long enough to open a connection.
pub const TICKET_TTL_MS: i64 = 60_000;
/// The longest a ticket may be asked to live (an embedded page reconnects with it).
pub const TICKET_MAX_TTL_MS: i64 = 3_600_000;

/// Scoped session tickets: short-lived, bound to one workspace and one purpose, signed with
/// the hub's ticket key (HMAC-SHA256). Browsers put them in WebSocket URLs instead of their
/// API token, so a URL that leaks (logs, history) opens one thing for a minute at most.
pub struct Tickets {
    key: aws_lc_rs::hmac::Key,
}

impl std::fmt::Debug for Tickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tickets")
    }
}

impl Tickets {
    /// Tickets signed with the hub identity's ticket key (shared by every replica).
    pub fn new(secret: &[u8]) -> Self {
        Self {
            key: aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret),
        }
    }

    /// A ticket for `owner` to open `purpose` on `workspace` until `expires`.
    pub fn issue(
        &self,
        workspace: Uuid,
        owner: &str,
        purpose: Purpose,
        expires: i64,
    ) -> (String, i64) {
        self.issue_scoped(&workspace.to_string(), owner, purpose.as_str(), expires)
    }

    /// A ticket for `owner` to use `purpose` on `scope` (`[0-9a-z:-]`) until `expires`.
    pub fn issue_scoped(
        &self,
        scope: &str,
        owner: &str,
        purpose: &str,
        expires: i64,
    ) -> (String, i64) {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let payload = format!("{scope}.{purpose}.{expires}.{}", b64.encode(owner));
        let tag = aws_lc_rs::hmac::sign(&self.key, payload.as_bytes());
        (
            format!("wst_{payload}.{}", b64.encode(tag.as_ref())),
            expires,
        )
    }

    /// The CSRF token of a browser session: derived from the session token with the
    /// ticket key, so it needs no storage and dies with the session.
    pub fn csrf(&self, session: &str) -> String {
        use base64::Engine;
        let tag = aws_lc_rs::hmac::sign(&self.key, format!("csrf.{session}").as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag.as_ref())
    }

    /// Whether `given` is the CSRF token of `session` (compared in constant time).
    pub fn check_csrf(&self, session: &str, given: &str) -> bool {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(given)
            .is_ok_and(|tag| {
                aws_lc_rs::hmac::verify(&self.key, format!("csrf.{session}").as_bytes(), &tag)
                    .is_ok()
            })
    }

    /// The subject a ticket was issued to, if it is genuine, unexpired and for this
    /// workspace and purpose. Ownership was checked when it was issued.
    pub fn verify(
        &self,
        ticket: &str,
        workspace: Uuid,
        purpose: Purpose,
        now: i64,
    ) -> Result<String, Error> {
        self.verify_scoped(ticket, &workspace.to_string(), purpose.as_str(), now)
    }

    /// When a ticket expires, as its payload says (check it with `verify` first).
    pub fn expiry(ticket: &str) -> Option<i64> {
        ticket.split('.').nth(2)?.parse().ok()
    }

    /// [`Tickets::verify`] for tickets from [`Tickets::issue_scoped`].
    pub fn verify_scoped(
        &self,
        ticket: &str,
        scope: &str,
        purpose: &str,
        now: i64,
    ) -> Result<String, Error> {
        use base64::Engine;
        let bad = || Error::unauthorized("invalid or expired ticket");
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let body = ticket.strip_prefix("wst_").ok_or_else(bad)?;
        let (payload, tag) = body.rsplit_once('.').ok_or_else(bad)?;
        let tag = b64.decode(tag).map_err(|_| bad())?;
        aws_lc_rs::hmac::verify(&self.key, payload.as_bytes(), &tag).map_err(|_| bad())?;
        let mut parts = payload.split('.');
        let (Some(ws), Some(p), Some(exp), Some(owner), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad());
        };
        let exp: i64 = exp.parse().map_err(|_| bad())?;
        if ws != scope || p != purpose || exp <= now {
            return Err(bad());
        }
        String::from_utf8(b64.decode(owner).map_err(|_| bad())?).map_err(|_| bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_are_bound_to_workspace_purpose_and_time() {
        let tickets = Tickets::new(&[1; 32]);
        let ws = Uuid::new_v4();
        let (t, exp) = tickets.issue(ws, "alice@example.com", Purpose::Terminal, 61_000);
        assert_eq!(exp, 61_000);
        assert!(
            tickets.verify(&t, ws, Purpose::Exec, 2_000).is_err(),
            "another purpose"
        );
        let owner = tickets.verify(&t, ws, Purpose::Terminal, 2_000).unwrap();
        assert_eq!(owner, "alice@example.com");
        assert!(
            tickets
                .verify(&t, Uuid::new_v4(), Purpose::Terminal, 2_000)
                .is_err()
        );
        assert!(
            tickets.verify(&t, ws, Purpose::Terminal, exp).is_err(),
            "expired"
        );
        // Any change to the payload breaks the signature.
        let forged = t.replacen(&ws.to_string(), &Uuid::new_v4().to_string(), 1);
        assert!(
            tickets
                .verify(&forged, ws, Purpose::Terminal, 2_000)
                .is_err()
        );
        assert!(
            tickets
                .verify("wst_garbage", ws, Purpose::Terminal, 2_000)
                .is_err()
        );
        // Another hub's key does not verify it; the same key (reloaded) does.
        let other = Tickets::new(&[2; 32]);
        assert!(other.verify(&t, ws, Purpose::Terminal, 2_000).is_err());
        let again = Tickets::new(&[1; 32]);
        assert!(again.verify(&t, ws, Purpose::Terminal, 2_000).is_ok());
    }

    #[test]
    fn csrf_tokens_belong_to_one_session_and_key() {
        let tickets = Tickets::new(&[1; 32]);
        let csrf = tickets.csrf("wsh_session_a");
        assert!(tickets.check_csrf("wsh_session_a", &csrf));
        assert!(!tickets.check_csrf("wsh_session_b", &csrf));
        assert!(!tickets.check_csrf("wsh_session_a", ""));
        assert!(!tickets.check_csrf("wsh_session_a", "not base64!"));
        let other = Tickets::new(&[2; 32]);
        assert!(!other.check_csrf("wsh_session_a", &csrf));
    }
}
