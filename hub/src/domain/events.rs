//! Workspace events for SSE subscribers: one small feed per watched workspace, and one per
//! owner watching all of theirs (an admin: everyone's).
//!
//! What one workspace can make the hub hold here is bounded and small, whoever else is
//! subscribed: a feed exists only while somebody watches that workspace, it keeps at most
//! [`FEED_CAPACITY`] events, and an event is small (one port, one checkout state, one status;
//! the full port list is never queued: [`Detail::Ports`] says "send the ports as they are
//! now"). A subscriber that falls behind is not handed a backlog: it gets a fresh snapshot.

use crate::base::workspace::Status;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::broadcast;
use uuid::Uuid;

/// Events a feed keeps for a slow subscriber before it falls behind.
pub const FEED_CAPACITY: usize = 32;

/// Something that happened to a workspace.
#[derive(Debug, Clone)]
pub struct WorkspaceEvent {
    pub workspace_id: Uuid,
    /// The workspace's owner, where the publisher knows it (owner feeds get only those).
    pub owner: Option<String>,
    /// The SSE event name: `status`, `checkout`, `port`, `setup`, `profile`, `deleted`.
    pub kind: &'static str,
    pub status: Option<Status>,
    pub reason: Option<String>,
    /// Unix milliseconds.
    pub at: i64,
    pub detail: Detail,
}

impl WorkspaceEvent {
    /// An event of `kind` about workspace `id` (of `owner`), now, with nothing more.
    pub fn new(id: Uuid, owner: &str, kind: &'static str) -> Self {
        Self {
            workspace_id: id,
            owner: Some(owner.to_owned()),
            kind,
            status: None,
            reason: None,
            at: crate::base::workspace::now_ms(),
            detail: Detail::None,
        }
    }

    pub fn with_status(mut self, status: Status, reason: Option<String>) -> Self {
        self.status = Some(status);
        self.reason = reason;
        self
    }

    pub fn with_detail(mut self, detail: Detail) -> Self {
        self.detail = detail;
        self
    }
}

/// What an event carries beyond the status.
#[derive(Debug, Clone)]
pub enum Detail {
    None,
    /// Sent as the event's `detail` (one port, a checkout state).
    Json(serde_json::Value),
    /// The workspace's whole port list, read from the registry when the event is sent.
    Ports,
}

/// Which events a feed carries: all of them (an admin's), one owner's, or one
/// workspace's. Feeds sort in that order, so whether anyone watches more than a workspace
/// is the first key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Watch {
    All,
    Owner(String),
    Workspace(Uuid),
}

type Feeds = Arc<Mutex<BTreeMap<Watch, broadcast::Sender<Arc<WorkspaceEvent>>>>>;

/// Events an owner's feed keeps for a slow subscriber (an owner has many workspaces).
pub const OWNER_FEED_CAPACITY: usize = 256;

/// The feeds somebody is watching.
#[derive(Default)]
pub struct Events {
    feeds: Feeds,
    /// Where events that happen here also go (the other replicas), if anywhere.
    forward: std::sync::OnceLock<tokio::sync::mpsc::Sender<Arc<WorkspaceEvent>>>,
    /// Where events that happen here also go for webhooks, if configured.
    hooks: std::sync::OnceLock<tokio::sync::mpsc::Sender<Arc<WorkspaceEvent>>>,
}

/// Events waiting to be forwarded to the other replicas; more are dropped (their
/// subscribers then miss them, as a subscriber of a lost connection does).
pub const FORWARD_CAPACITY: usize = 4096;

impl Events {
    /// Also hands every event that happens here to `tx` (replicas: to the others).
    pub fn forward_to(&self, tx: tokio::sync::mpsc::Sender<Arc<WorkspaceEvent>>) {
        let _ = self.forward.set(tx);
    }

    /// Also hands every event that happens here to `tx` (webhooks); when it is full, the
    /// event is dropped for it (and counted in the log).
    pub fn hook_to(&self, tx: tokio::sync::mpsc::Sender<Arc<WorkspaceEvent>>) {
        let _ = self.hooks.set(tx);
    }

    /// Sends an event that happened here to the workspace's subscribers (and to the other
    /// replicas' through the forward, and to webhooks); nobody watching costs nothing.
    pub fn publish(&self, event: WorkspaceEvent) {
        if let Some(tx) = self.forward.get() {
            let _ = tx.try_send(Arc::new(event.clone()));
        }
        if let Some(tx) = self.hooks.get()
            && tx.try_send(Arc::new(event.clone())).is_err()
        {
            tracing::warn!(workspace = %event.workspace_id, kind = event.kind, "webhook queue full: event dropped");
        }
        self.publish_here(event);
    }

    /// Sends an event to this replica's subscribers only (one that happened on another).
    pub fn publish_here(&self, event: WorkspaceEvent) {
        let mut feeds = lock(&self.feeds);
        if feeds.is_empty() {
            return;
        }
        let event = Arc::new(event);
        let owner = event.owner.clone().map(Watch::Owner);
        let watches = [
            Some(Watch::Workspace(event.workspace_id)),
            owner,
            Some(Watch::All),
        ];
        for watch in watches.into_iter().flatten() {
            if let Some(tx) = feeds.get(&watch) {
                if tx.receiver_count() == 0 {
                    feeds.remove(&watch);
                } else {
                    let _ = tx.send(event.clone());
                }
            }
        }
    }

    /// Subscribes to the events `watch` names; the feed goes when its last subscriber does.
    pub fn subscribe(&self, watch: Watch) -> Subscription {
        let capacity = match watch {
            Watch::Workspace(_) => FEED_CAPACITY,
            Watch::Owner(_) | Watch::All => OWNER_FEED_CAPACITY,
        };
        let rx = lock(&self.feeds)
            .entry(watch.clone())
            .or_insert_with(|| broadcast::channel(capacity).0)
            .subscribe();
        Subscription {
            rx: Some(rx),
            feeds: self.feeds.clone(),
            watch,
        }
    }

    /// How many feeds exist (someone watching).
    pub fn feeds(&self) -> usize {
        lock(&self.feeds).len()
    }

    /// Whether anyone here watches an owner's (or all) events: only then does an event
    /// from another replica need its owner looked up.
    pub fn owners_watched(&self) -> bool {
        lock(&self.feeds)
            .keys()
            .next()
            .is_some_and(|w| !matches!(w, Watch::Workspace(_)))
    }
}

fn lock(feeds: &Feeds) -> MutexGuard<'_, BTreeMap<Watch, broadcast::Sender<Arc<WorkspaceEvent>>>> {
    feeds.lock().unwrap_or_else(|p| p.into_inner())
}

/// One subscriber's place in a feed.
pub struct Subscription {
    rx: Option<broadcast::Receiver<Arc<WorkspaceEvent>>>,
    feeds: Feeds,
    watch: Watch,
}

/// What a subscriber gets next.
pub enum Next {
    Event(Arc<WorkspaceEvent>),
    /// It fell behind by this many events, which are gone: send a fresh snapshot.
    Lagged(u64),
    Closed,
}

impl Subscription {
    pub async fn next(&mut self) -> Next {
        let Some(rx) = self.rx.as_mut() else {
            return Next::Closed;
        };
        match rx.recv().await {
            Ok(ev) => Next::Event(ev),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                // Skip what is left of the backlog too: the snapshot covers it.
                *rx = rx.resubscribe();
                Next::Lagged(n)
            }
            Err(broadcast::error::RecvError::Closed) => Next::Closed,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        drop(self.rx.take());
        let mut feeds = lock(&self.feeds);
        if feeds
            .get(&self.watch)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            feeds.remove(&self.watch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: Uuid, n: i64) -> WorkspaceEvent {
        WorkspaceEvent {
            at: n,
            ..WorkspaceEvent::new(id, "alice", "port")
        }
    }

    #[tokio::test]
    async fn feeds_are_per_workspace_small_and_go_with_their_subscribers() {
        let events = Events::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        events.publish(event(a, 0)); // nobody watching: nothing kept
        assert_eq!(events.feeds(), 0);
        let mut sub_b = events.subscribe(Watch::Workspace(b));
        let mut sub_a = events.subscribe(Watch::Workspace(a));
        for n in 0..1000 {
            events.publish(event(a, n));
        }
        events.publish(event(b, 7));
        // B's subscriber sees B's event, untouched by A's flood.
        match sub_b.next().await {
            Next::Event(ev) => assert_eq!((ev.workspace_id, ev.at), (b, 7)),
            _ => panic!("expected B's event"),
        }
        // A's subscriber fell behind: told so once, then only what comes next.
        assert!(matches!(sub_a.next().await, Next::Lagged(n) if n >= 1000 - FEED_CAPACITY as u64));
        events.publish(event(a, 5000));
        match sub_a.next().await {
            Next::Event(ev) => assert_eq!(ev.at, 5000),
            _ => panic!("expected the next event"),
        }
        drop(sub_a);
        assert_eq!(events.feeds(), 1);
        drop(sub_b);
        assert_eq!(events.feeds(), 0);
    }

    #[tokio::test]
    async fn owner_feeds_see_their_owners_workspaces_and_all_sees_everything() {
        let events = Events::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let mut alice = events.subscribe(Watch::Owner("alice".into()));
        let mut all = events.subscribe(Watch::All);
        assert!(events.owners_watched());
        events.publish(WorkspaceEvent::new(b, "bob", "status"));
        events.publish(WorkspaceEvent::new(a, "alice", "status"));
        // An event whose owner the publisher did not know reaches only `All`.
        events.publish(WorkspaceEvent {
            owner: None,
            ..WorkspaceEvent::new(a, "alice", "port")
        });
        match alice.next().await {
            Next::Event(ev) => assert_eq!((ev.workspace_id, ev.kind), (a, "status")),
            _ => panic!("expected alice's event"),
        }
        for expected in [(b, "status"), (a, "status"), (a, "port")] {
            match all.next().await {
                Next::Event(ev) => assert_eq!((ev.workspace_id, ev.kind), expected),
                _ => panic!("expected {expected:?}"),
            }
        }
        drop((alice, all));
        assert_eq!(events.feeds(), 0);
        assert!(!events.owners_watched());
    }
}
