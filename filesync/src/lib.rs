//! File sync's IO half, shared by the agent (which serves a folder) and the CLI (which
//! drives the sync): [`tree::Root`] scans a folder into a manifest and changes it safely
//! (every path checked against the root, writes through a temporary file and a rename),
//! [`watch::Watcher`] turns file events into "rescan now" signals, and [`serve`] is the
//! agent's side of a sync stream. The rules themselves (messages, paths, deltas, the
//! reconciliation) live in `protocol::sync`, without IO.

pub mod serve;
pub mod transfer;
pub mod tree;
pub mod watch;

/// Patterns ignored unless the user says otherwise (gitignore syntax).
pub const DEFAULT_IGNORES: &[&str] = &[".git/", "node_modules/"];
