//! The lowest layer: the workspace record, the hub's CA and identity, file helpers. Imports
//! nothing else of the hub.

pub mod ca;
pub mod fsutil;
pub mod identity;
pub mod metrics;
pub mod secret;
pub mod update_key;
pub mod workspace;
