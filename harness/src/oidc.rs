//! A test OpenID Connect issuer on `127.0.0.1:0`: its own RSA keys, a discovery document,
//! a JWKS (with `max-age`, and a count of fetches), an authorization endpoint that signs the
//! configured user in at once, and a token endpoint that checks the client secret and the
//! PKCE verifier. Tests sign tokens directly with [`TestIssuer::sign`] to try bad ones.

use anyhow::Result;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{KeyPair, RSA_PKCS1_SHA256, RsaKeyPair};
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// A signing key and its id.
pub struct Key {
    pub kid: String,
    pair: RsaKeyPair,
}

impl Key {
    pub fn generate(kid: &str) -> Self {
        Self {
            kid: kid.to_owned(),
            pair: RsaKeyPair::generate(KeySize::Rsa2048).expect("generate RSA key"),
        }
    }

    fn jwk(&self) -> Value {
        let public = self.pair.public_key();
        json!({
            "kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.kid,
            "n": B64.encode(public.modulus().big_endian_without_leading_zero()),
            "e": B64.encode(public.exponent().big_endian_without_leading_zero()),
        })
    }

    /// A compact JWS of `claims` with `header` (as given: tests may lie in it).
    pub fn sign_raw(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let mut sig = vec![0; self.pair.public_modulus_len()];
        self.pair
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                input.as_bytes(),
                &mut sig,
            )
            .expect("sign");
        format!("{input}.{}", B64.encode(sig))
    }
}

struct Grant {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    nonce: Option<String>,
    user: (String, String),
}

struct Inner {
    url: String,
    client_id: String,
    client_secret: String,
    keys: Vec<Key>,
    user: (String, String),
    grants: HashMap<String, Grant>,
    jwks_fetches: u32,
    /// The next token response carries this ID token instead of a good one.
    next_id_token: Option<String>,
}

/// A running test issuer.
#[derive(Clone)]
pub struct TestIssuer {
    pub url: String,
    inner: Arc<Mutex<Inner>>,
}

impl TestIssuer {
    /// Starts an issuer for one client, with one key and the user `test-user` /
    /// `user@example.com`.
    pub async fn start(client_id: &str, client_secret: &str) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let inner = Arc::new(Mutex::new(Inner {
            url: url.clone(),
            client_id: client_id.to_owned(),
            client_secret: client_secret.to_owned(),
            keys: vec![Key::generate("key-1")],
            user: ("test-user".into(), "user@example.com".into()),
            grants: HashMap::new(),
            jwks_fetches: 0,
            next_id_token: None,
        }));
        let app = axum::Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .route("/authorize", get(authorize))
            .route("/token", post(token))
            .with_state(inner.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Self { url, inner })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The user the next sign-in signs in as.
    pub fn set_user(&self, subject: &str, email: &str) {
        self.lock().user = (subject.to_owned(), email.to_owned());
    }

    /// Replaces the signing key: the old one leaves the JWKS. Returns the old key.
    pub fn rotate(&self, kid: &str) -> Key {
        let mut inner = self.lock();
        inner.keys.push(Key::generate(kid));
        inner.keys.remove(0)
    }

    /// How often the JWKS was fetched.
    pub fn jwks_fetches(&self) -> u32 {
        self.lock().jwks_fetches
    }

    /// Good claims for `audience` about `subject`, valid for an hour.
    pub fn claims(&self, audience: &str, subject: &str, email: &str) -> Value {
        good_claims(&self.url, audience, subject, email)
    }

    /// `claims` signed with the current key.
    pub fn sign(&self, claims: &Value) -> String {
        let inner = self.lock();
        let key = inner.keys.last().expect("a key");
        key.sign_raw(
            &json!({"alg": "RS256", "typ": "JWT", "kid": key.kid}),
            claims,
        )
    }

    /// The next code exchange answers with this ID token.
    pub fn answer_next_with(&self, id_token: String) {
        self.lock().next_id_token = Some(id_token);
    }
}

fn good_claims(issuer: &str, audience: &str, subject: &str, email: &str) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    json!({
        "iss": issuer, "aud": audience, "sub": subject, "email": email,
        "email_verified": true, "iat": now, "nbf": now, "exp": now + 3600,
    })
}

type Shared = State<Arc<Mutex<Inner>>>;

fn locked(state: &Arc<Mutex<Inner>>) -> std::sync::MutexGuard<'_, Inner> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

async fn discovery(State(state): Shared) -> axum::Json<Value> {
    let url = locked(&state).url.clone();
    axum::Json(json!({
        "issuer": url,
        "authorization_endpoint": format!("{url}/authorize"),
        "token_endpoint": format!("{url}/token"),
        "jwks_uri": format!("{url}/jwks"),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "code_challenge_methods_supported": ["S256"],
    }))
}

async fn jwks(State(state): Shared) -> Response {
    let mut inner = locked(&state);
    inner.jwks_fetches += 1;
    let keys: Vec<Value> = inner.keys.iter().map(Key::jwk).collect();
    (
        [(header::CACHE_CONTROL, "public, max-age=300")],
        axum::Json(json!({ "keys": keys })),
    )
        .into_response()
}

fn refuse(status: StatusCode, error: &str) -> Response {
    (status, axum::Json(json!({ "error": error }))).into_response()
}

async fn authorize(State(state): Shared, Query(q): Query<HashMap<String, String>>) -> Response {
    let mut inner = locked(&state);
    let field = |k: &str| q.get(k).cloned().unwrap_or_default();
    if field("client_id") != inner.client_id
        || field("response_type") != "code"
        || field("code_challenge_method") != "S256"
        || field("code_challenge").is_empty()
        || field("redirect_uri").is_empty()
        || !field("scope").split(' ').any(|s| s == "openid")
    {
        return refuse(StatusCode::BAD_REQUEST, "invalid_request");
    }
    let code = format!("code-{}", inner.grants.len() + 1);
    let grant = Grant {
        client_id: field("client_id"),
        redirect_uri: field("redirect_uri"),
        challenge: field("code_challenge"),
        nonce: q.get("nonce").cloned(),
        user: inner.user.clone(),
    };
    let mut back = match url::Url::parse(&grant.redirect_uri) {
        Ok(u) => u,
        Err(_) => return refuse(StatusCode::BAD_REQUEST, "invalid_request"),
    };
    back.query_pairs_mut()
        .append_pair("code", &code)
        .append_pair("state", &field("state"));
    inner.grants.insert(code, grant);
    (StatusCode::FOUND, [(header::LOCATION, back.to_string())]).into_response()
}

async fn token(State(state): Shared, body: String) -> Response {
    let form: HashMap<String, String> = url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let field = |k: &str| form.get(k).cloned().unwrap_or_default();
    let mut inner = locked(&state);
    if field("client_id") != inner.client_id || field("client_secret") != inner.client_secret {
        return refuse(StatusCode::UNAUTHORIZED, "invalid_client");
    }
    let Some(grant) = inner.grants.remove(&field("code")) else {
        return refuse(StatusCode::BAD_REQUEST, "invalid_grant");
    };
    let challenge = B64.encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        field("code_verifier").as_bytes(),
    ));
    if field("grant_type") != "authorization_code"
        || grant.client_id != field("client_id")
        || grant.redirect_uri != field("redirect_uri")
        || grant.challenge != challenge
    {
        return refuse(StatusCode::BAD_REQUEST, "invalid_grant");
    }
    let id_token = match inner.next_id_token.take() {
        Some(t) => t,
        None => {
            let mut claims =
                good_claims(&inner.url, &grant.client_id, &grant.user.0, &grant.user.1);
            claims["nonce"] = json!(grant.nonce);
            let key = inner.keys.last().expect("a key");
            key.sign_raw(
                &json!({"alg": "RS256", "typ": "JWT", "kid": key.kid}),
                &claims,
            )
        }
    };
    axum::Json(json!({
        "access_token": "unused", "token_type": "Bearer", "expires_in": 3600,
        "id_token": id_token,
    }))
    .into_response()
}
