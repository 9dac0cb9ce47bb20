//! The domain layer's error: what went wrong and a stable code, in terms each edge maps to
//! its own (an HTTP status and JSON body, a refused stream).

use crate::store::StoreError;

/// What kind of failure, for the edges to map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The request is malformed or out of bounds.
    Invalid,
    /// Not authenticated (no, bad or expired credentials).
    Unauthorized,
    /// Authenticated, and not allowed (quota, CSRF).
    Forbidden,
    NotFound,
    /// Not in the current state (a transition, a name taken).
    Conflict,
    /// Too many failed attempts from one place.
    TooManyRequests,
    /// A passing condition: retry shortly.
    Unavailable,
    /// The cloud provider failed.
    Upstream,
    /// A bug or a broken dependency; details are logged, not shown.
    Internal,
}

/// A failure with a stable machine-readable code and a message safe to show the caller.
#[derive(Debug)]
pub struct Error {
    pub kind: Kind,
    code: &'static str,
    message: String,
}

impl Error {
    pub fn new(kind: Kind, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind,
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Kind::Invalid, "invalid_request", message)
    }

    pub fn unauthorized(message: &str) -> Self {
        Self::new(Kind::Unauthorized, "unauthorized", message)
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(Kind::NotFound, "not_found", format!("{what} not found"))
    }

    /// Logs `e` with `context`; the caller sees only "internal error".
    pub fn internal(context: &str, e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "{context}");
        Self::new(Kind::Internal, "internal", "internal error")
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// The human-readable message (safe to show to the caller).
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => Error::not_found("workspace"),
            StoreError::Conflict { current } => Error::new(
                Kind::Conflict,
                "conflict",
                format!("workspace is {}", current.as_str()),
            ),
            StoreError::OverQuota { .. } => {
                Error::new(Kind::Forbidden, "quota_exceeded", e.to_string())
            }
            StoreError::AlreadyExists => {
                Error::new(Kind::Conflict, "already_exists", "already exists")
            }
            StoreError::NameTaken(_) => Error::new(Kind::Conflict, "name_taken", e.to_string()),
            StoreError::Backend(e) => Error::internal("store", e),
        }
    }
}
