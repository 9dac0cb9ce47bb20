//! OpenID Connect: ID-token verification against an issuer's published keys, and browser
//! sign-in with the authorization-code flow and PKCE.
//!
//! [`Issuer`] verifies RS256 ID tokens (signature, `iss`, `aud`, `exp`, `nbf`) with the
//! issuer's JWKS, cached for the `max-age` the issuer sends (at most an hour) and fetched
//! again when a token names a key the cache does not hold (a rotation), at most once a
//! second. The same verifier checks Cloud Scheduler's tokens on `POST /cleanup`.
//!
//! [`Oidc`] runs the browser flow: `GET /login` sends the browser to the issuer with a
//! fresh `state` (also set in a short-lived cookie, so a callback only completes in the
//! browser that started it), `nonce` and PKCE challenge; `GET /login/callback` swaps the
//! code for an ID token, verifies it, and starts a hub session for its subject (`sub`).

use crate::base::ca;
use crate::edge::api::ApiError;
use axum::http::StatusCode;
use base64::Engine;
use serde::Deserialize;
use std::collections::HashMap;
use std::time::{Duration, Instant};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
/// Longer tokens are refused before any parsing (Google's are about 1 KiB).
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Issuer documents larger than this are refused.
const MAX_DOCUMENT_BYTES: usize = 1 << 20;
/// Clock skew allowed on `exp` and `nbf`.
const LEEWAY_SECS: i64 = 60;
/// Keys are fetched again after this long even if the issuer allows longer.
const MAX_KEY_AGE: Duration = Duration::from_secs(3600);
/// When the issuer sends no `max-age`.
const DEFAULT_KEY_AGE: Duration = Duration::from_secs(300);
/// A token naming an unknown key triggers at most one fetch per this interval.
const MIN_REFETCH: Duration = Duration::from_secs(1);
/// A sign-in must come back from the issuer within this time.
const LOGIN_TTL: Duration = Duration::from_secs(600);

/// Why an ID token was refused. The messages never contain the token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("unsupported signing algorithm (only RS256 is accepted)")]
    Algorithm,
    #[error("token signed with a key the issuer does not publish")]
    UnknownKey,
    #[error("bad token signature")]
    Signature,
    #[error("token from another issuer")]
    Issuer,
    #[error("token for another audience")]
    Audience,
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("token nonce does not match this sign-in")]
    Nonce,
    #[error("identity provider unavailable: {0}")]
    Provider(String),
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Provider(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "identity_provider_unavailable",
                e.to_string(),
            ),
            _ => ApiError::new(StatusCode::UNAUTHORIZED, "invalid_token", e.to_string()),
        }
    }
}

/// The claims the hub reads from an ID token.
#[derive(Debug, Clone, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    aud: Audience,
    pub exp: i64,
    pub nbf: Option<i64>,
    pub nonce: Option<String>,
    pub email: Option<String>,
    #[serde(default)]
    email_verified: serde_json::Value,
}

impl Claims {
    /// The e-mail address, only if the issuer says it is verified.
    pub fn verified_email(&self) -> Option<&str> {
        let verified = self.email_verified == serde_json::Value::Bool(true)
            || self.email_verified == serde_json::Value::String("true".into());
        self.email.as_deref().filter(|_| verified)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn contains(&self, aud: &str) -> bool {
        match self {
            Audience::One(a) => a == aud,
            Audience::Many(all) => all.iter().any(|a| a == aud),
        }
    }
}

#[derive(Debug, Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
}

#[derive(Debug, Deserialize)]
struct JwkSet {
    keys: Vec<Jwk>,
}

#[derive(Debug, Deserialize)]
struct Jwk {
    kty: String,
    kid: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    alg: Option<String>,
    n: Option<String>,
    e: Option<String>,
}

struct RsaKey {
    n: Vec<u8>,
    e: Vec<u8>,
}

#[derive(Default)]
struct KeyCache {
    discovery: Option<Discovery>,
    keys: HashMap<String, RsaKey>,
    fetched: Option<Instant>,
    max_age: Duration,
}

/// One OpenID Connect issuer: its discovery document and signing keys, cached.
pub struct Issuer {
    url: String,
    http: reqwest::Client,
    cache: tokio::sync::Mutex<KeyCache>,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer").field("url", &self.url).finish()
    }
}

/// Issuers are reached over HTTPS, or plain HTTP on a loopback address (tests, dev).
pub fn check_issuer_url(url: &str) -> anyhow::Result<()> {
    let parsed = url::Url::parse(url).map_err(|e| anyhow::anyhow!("issuer {url:?}: {e}"))?;
    let loopback = match parsed.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    };
    anyhow::ensure!(
        parsed.scheme() == "https" || (parsed.scheme() == "http" && loopback),
        "issuer {url:?} must be https (plain http only on a loopback address)"
    );
    Ok(())
}

impl Issuer {
    pub fn new(url: &str) -> anyhow::Result<Self> {
        check_issuer_url(url)?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            url: url.trim_end_matches('/').to_owned(),
            http,
            cache: Default::default(),
        })
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
    ) -> Result<(T, Option<Duration>), TokenError> {
        let unavailable = |e: &dyn std::fmt::Display| TokenError::Provider(format!("{url}: {e}"));
        let mut response = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| unavailable(&e))?;
        if !response.status().is_success() {
            return Err(unavailable(&response.status()));
        }
        let max_age = response
            .headers()
            .get(reqwest::header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.split(',')
                    .find_map(|d| d.trim().strip_prefix("max-age="))
                    .and_then(|s| s.parse().ok())
            })
            .map(Duration::from_secs);
        let body = read_limited(&mut response)
            .await
            .map_err(|e| unavailable(&e))?;
        let value = serde_json::from_slice(&body).map_err(|e| unavailable(&e))?;
        Ok((value, max_age))
    }

    async fn discovery(&self, cache: &mut KeyCache) -> Result<Discovery, TokenError> {
        if let Some(d) = &cache.discovery {
            return Ok(d.clone());
        }
        let (d, _): (Discovery, _) = self
            .get_json(&format!("{}/.well-known/openid-configuration", self.url))
            .await?;
        if d.issuer.trim_end_matches('/') != self.url {
            return Err(TokenError::Provider(
                "discovery document names another issuer".into(),
            ));
        }
        cache.discovery = Some(d.clone());
        Ok(d)
    }

    /// Where the browser goes to sign in, and where the code is exchanged.
    async fn endpoints(&self) -> Result<Discovery, TokenError> {
        let mut cache = self.cache.lock().await;
        self.discovery(&mut cache).await
    }

    async fn refresh_keys(&self, cache: &mut KeyCache) -> Result<(), TokenError> {
        let discovery = self.discovery(cache).await?;
        cache.fetched = Some(Instant::now());
        let (set, max_age): (JwkSet, _) = self.get_json(&discovery.jwks_uri).await?;
        cache.max_age = max_age.unwrap_or(DEFAULT_KEY_AGE).min(MAX_KEY_AGE);
        cache.keys = set
            .keys
            .into_iter()
            .filter(|k| k.kty == "RSA" && k.use_.as_deref().is_none_or(|u| u == "sig"))
            .filter(|k| k.alg.as_deref().is_none_or(|a| a == "RS256"))
            .filter_map(|k| {
                let n = B64.decode(k.n?).ok()?;
                let e = B64.decode(k.e?).ok()?;
                Some((k.kid.unwrap_or_default(), RsaKey { n, e }))
            })
            .collect();
        tracing::debug!(issuer = %self.url, keys = cache.keys.len(), "fetched signing keys");
        Ok(())
    }

    /// Verifies an ID token's signature, issuer, audience and validity period.
    pub async fn verify(&self, token: &str, audience: &str) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let header: Header = decode_json(h)?;
        if header.alg != "RS256" {
            return Err(TokenError::Algorithm);
        }
        let signature = B64.decode(s).map_err(|_| TokenError::Malformed)?;
        {
            let mut cache = self.cache.lock().await;
            let kid = header.kid.unwrap_or_default();
            let stale = cache.fetched.is_none_or(|at| at.elapsed() >= cache.max_age);
            let may_refetch = cache.fetched.is_none_or(|at| at.elapsed() >= MIN_REFETCH);
            if stale || (!cache.keys.contains_key(&kid) && may_refetch) {
                // Keep serving from the old keys if the issuer is briefly unreachable.
                if let Err(e) = self.refresh_keys(&mut cache).await
                    && cache.keys.is_empty()
                {
                    return Err(e);
                }
            }
            let key = cache.keys.get(&kid).ok_or(TokenError::UnknownKey)?;
            aws_lc_rs::signature::RsaPublicKeyComponents {
                n: &key.n,
                e: &key.e,
            }
            .verify(
                &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
                format!("{h}.{p}").as_bytes(),
                &signature,
            )
            .map_err(|_| TokenError::Signature)?;
        }
        let claims: Claims = decode_json(p)?;
        if claims.iss.trim_end_matches('/') != self.url {
            return Err(TokenError::Issuer);
        }
        if !claims.aud.contains(audience) {
            return Err(TokenError::Audience);
        }
        let now = crate::base::workspace::now_ms() / 1000;
        if claims.exp + LEEWAY_SECS <= now {
            return Err(TokenError::Expired);
        }
        if claims.nbf.is_some_and(|nbf| nbf - LEEWAY_SECS > now) {
            return Err(TokenError::NotYetValid);
        }
        Ok(claims)
    }
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, TokenError> {
    let bytes = B64.decode(part).map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)
}

async fn read_limited(response: &mut reqwest::Response) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
            return Err(format!("response larger than {MAX_DOCUMENT_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A sign-in between `begin` and `finish`, as a store grant (kind `oidc-login`, keyed by
/// its state), so the callback may reach any replica.
#[derive(serde::Serialize, serde::Deserialize)]
struct PendingLogin {
    verifier: String,
    nonce: String,
}

/// The store grant kind of sign-ins in progress.
const LOGIN_GRANT: &str = "oidc-login";

/// Browser sign-in with one configured issuer.
pub struct Oidc {
    pub issuer: Issuer,
    client_id: String,
    client_secret: Option<crate::base::secret::Secret>,
}

impl std::fmt::Debug for Oidc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Oidc")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

/// Where to send the browser, and the `state` to bind to it with a cookie.
#[derive(Debug)]
pub struct Redirect {
    pub url: String,
    pub state: String,
}

/// Who signed in.
#[derive(Debug)]
pub struct Identity {
    pub subject: String,
    pub email: Option<String>,
}

impl Oidc {
    pub fn new(config: &OidcConfig) -> anyhow::Result<Self> {
        Ok(Self {
            issuer: Issuer::new(&config.issuer)?,
            client_id: config.client_id.clone(),
            client_secret: config.client_secret.clone(),
        })
    }

    /// Starts a sign-in: a fresh state, nonce and PKCE verifier, remembered in `store` for
    /// ten minutes.
    pub async fn begin(
        &self,
        store: &dyn crate::store::Store,
        redirect_uri: &str,
    ) -> Result<Redirect, ApiError> {
        let endpoints = self.issuer.endpoints().await?;
        let state = ca::hex(&ca::random_bytes::<16>());
        let nonce = ca::hex(&ca::random_bytes::<16>());
        let verifier = B64.encode(ca::random_bytes::<32>());
        let challenge = B64.encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            verifier.as_bytes(),
        ));
        let pending = serde_json::to_string(&PendingLogin {
            verifier,
            nonce: nonce.clone(),
        })
        .map_err(|e| ApiError::internal("sign-in", e))?;
        let now = crate::base::workspace::now_ms();
        store
            .put_grant(
                LOGIN_GRANT,
                &state,
                &pending,
                now,
                now + LOGIN_TTL.as_millis() as i64,
            )
            .await?;
        let mut url = url::Url::parse(&endpoints.authorization_endpoint)
            .map_err(|e| TokenError::Provider(format!("authorization_endpoint: {e}")))?;
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.client_id)
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("scope", "openid email")
            .append_pair("state", &state)
            .append_pair("nonce", &nonce)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
        Ok(Redirect {
            url: url.into(),
            state,
        })
    }

    /// Completes a sign-in: the state must be one this hub issued (once), the code is
    /// exchanged with the PKCE verifier, and the ID token must verify and carry our nonce.
    pub async fn finish(
        &self,
        store: &dyn crate::store::Store,
        state: &str,
        code: &str,
        redirect_uri: &str,
    ) -> Result<Identity, ApiError> {
        let expired = || {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "login_expired",
                "this sign-in is unknown or expired; start again",
            )
        };
        // The state is ours (32 hex digits) or nothing we know.
        if state.len() != 32 || !state.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(expired());
        }
        let pending = store
            .take_grant(LOGIN_GRANT, state, None, crate::base::workspace::now_ms())
            .await?
            .ok_or_else(expired)?;
        let pending: PendingLogin = serde_json::from_str(&pending).map_err(|_| expired())?;
        let endpoints = self.issuer.endpoints().await?;
        let form = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "authorization_code")
            .append_pair("code", code)
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("client_id", &self.client_id)
            .append_pair(
                "client_secret",
                self.client_secret
                    .as_ref()
                    .map(|s| s.expose())
                    .unwrap_or_default(),
            )
            .append_pair("code_verifier", &pending.verifier)
            .finish();
        let mut response = self
            .issuer
            .http
            .post(&endpoints.token_endpoint)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(form)
            .send()
            .await
            .map_err(|e| TokenError::Provider(format!("token endpoint: {e}")))?;
        let status = response.status();
        let body = read_limited(&mut response)
            .await
            .map_err(|e| TokenError::Provider(format!("token endpoint: {e}")))?;
        if !status.is_success() {
            // The issuer refused the code (used, expired, wrong verifier): the user's
            // sign-in failed, the hub is fine.
            let error = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or_else(|| status.to_string());
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "login_failed",
                format!("the identity provider refused the sign-in: {error}"),
            ));
        }
        #[derive(Deserialize)]
        struct TokenResponse {
            id_token: String,
        }
        let tokens: TokenResponse = serde_json::from_slice(&body)
            .map_err(|_| TokenError::Provider("token endpoint sent no id_token".into()))?;
        let claims = self
            .issuer
            .verify(&tokens.id_token, &self.client_id)
            .await?;
        if claims.nonce.as_deref() != Some(pending.nonce.as_str()) {
            return Err(TokenError::Nonce.into());
        }
        Ok(Identity {
            email: claims.verified_email().map(str::to_owned),
            subject: claims.sub,
        })
    }
}

fn google() -> String {
    "https://accounts.google.com".into()
}

/// Browser sign-in through an OpenID Connect issuer (`[oidc]`); Google by default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    #[serde(default = "google")]
    pub issuer: String,
    pub client_id: String,
    /// Or `WORKSPACE_HUB_OIDC_CLIENT_SECRET` in the environment.
    #[serde(default)]
    pub client_secret: Option<crate::base::secret::Secret>,
}

/// Cloud Scheduler's OIDC tokens for `POST /cleanup` (`[cleanup_oidc]`): the token must
/// come from `issuer`, name `audience`, and belong to the `service_account` e-mail.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerConfig {
    #[serde(default = "google")]
    pub issuer: String,
    pub audience: String,
    pub service_account: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuer_urls_must_be_https_or_loopback() {
        assert!(check_issuer_url("https://accounts.google.com").is_ok());
        assert!(check_issuer_url("http://127.0.0.1:4444").is_ok());
        assert!(check_issuer_url("http://localhost:4444").is_ok());
        assert!(check_issuer_url("http://idp.example.com").is_err());
        assert!(check_issuer_url("ftp://127.0.0.1").is_err());
        assert!(check_issuer_url("not a url").is_err());
    }

    #[tokio::test]
    async fn malformed_tokens_are_refused_before_any_fetch() {
        // Port 9 on loopback: any fetch would fail with Provider, not these errors.
        let issuer = Issuer::new("http://127.0.0.1:9").unwrap();
        let b64 = |v: &str| B64.encode(v);
        for (token, want) in [
            ("", TokenError::Malformed),
            ("a.b", TokenError::Malformed),
            ("a.b.c.d", TokenError::Malformed),
            ("!!!.e30.", TokenError::Malformed),
            (&"x".repeat(MAX_TOKEN_BYTES + 1), TokenError::Malformed),
            (
                &format!("{}.{}.", b64(r#"{"alg":"none"}"#), b64("{}")),
                TokenError::Algorithm,
            ),
            (
                &format!("{}.{}.c2ln", b64(r#"{"alg":"HS256"}"#), b64("{}")),
                TokenError::Algorithm,
            ),
        ] {
            assert_eq!(issuer.verify(token, "aud").await.unwrap_err(), want);
        }
    }
}
