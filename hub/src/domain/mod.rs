//! Lifecycle and housekeeping: what the hub does with workspaces (create, stop, start,
//! delete, reconcile, idle clean-up), who may do it (callers, tokens, tickets), the agents
//! connected to this replica and the events it publishes. Built on the store and the
//! providers; knows nothing of HTTP or of how agents and clients are connected.

pub mod agent;
pub mod audit;
pub mod auth;
pub mod error;
pub mod events;
pub mod idle;
pub mod lifecycle;
pub mod profile;
pub mod reconcile;
