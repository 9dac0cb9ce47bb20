//! Messages between replicas of one hub (ALPN `wsh-peer/1`) beyond spliced agent streams:
//! the workspace events that happen on one replica, for the subscribers of the others, and
//! what a replica knows of the agents it holds.

use serde::{Deserialize, Serialize};

crate::tagged_messages! {
    /// Messages between replicas.
    pub enum PeerMsg {
        /// On a [`StreamHeader::PeerEvents`](crate::stream::StreamHeader::PeerEvents)
        /// stream, opener to receiver, in the order they happened on the opener.
        1 => Event(PeerEvent),
        /// The answer to a
        /// [`StreamHeader::PeerAgentViews`](crate::stream::StreamHeader::PeerAgentViews):
        /// one entry per asked workspace whose agent the answering replica holds.
        2 => AgentViews(Vec<PeerAgentView>),
        /// On a `PeerEvents` stream: the opener is leaving (draining). The receiver drops
        /// idle connections it keeps through the opener, so they do not hold the opener's
        /// agent connections open while it waits for them to move.
        3 => Leaving(PeerLeaving),
    }
}

/// The body of [`PeerMsg::Leaving`]: nothing; the replica is the connection's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PeerLeaving {}

/// A connected agent as the replica holding it sees it, in the API's JSON shapes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAgentView {
    pub workspace_id: String,
    /// The `agent` object of `GET /workspaces/{id}`, as JSON text.
    pub agent: String,
    /// The body of `GET /workspaces/{id}/ports`, as JSON text.
    pub ports: String,
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
