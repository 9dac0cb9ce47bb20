//! Messages between replicas of one hub (ALPN `wsh-peer/1`) beyond spliced agent streams:
//! the workspace events that happen on one replica, for the subscribers of the others.

use serde::{Deserialize, Serialize};

crate::tagged_messages! {
    /// Messages on a [`StreamHeader::PeerEvents`](crate::stream::StreamHeader::PeerEvents)
    /// stream, opener to receiver, in the order they happened on the opener.
    pub enum PeerMsg {
        1 => Event(PeerEvent),
    }
}

/// A workspace event as the opening replica's subscribers saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerEvent {
    pub workspace_id: String,
    /// `status`, `checkout`, `port` or `deleted`.
    pub kind: String,
    /// The workspace status, as the API spells it.
    pub status: Option<String>,
    pub reason: Option<String>,
    /// Unix milliseconds.
    pub at: i64,
    /// The event's `detail` as JSON text (a port, a checkout state, the whole port list).
    pub detail: Option<String>,
}
