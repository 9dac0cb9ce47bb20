//! The HTTP edge: the REST API and its OpenAPI document, browser sessions and sign-in,
//! device codes, previews and browser terminals. The top layer: nothing below imports it.

pub mod api;
pub mod caller;
pub mod device;
pub mod exec;
pub mod files;
pub mod oidc;
pub mod preview;
pub mod session;
pub mod terminal;
