//! Workspace events for SSE subscribers: one small feed per watched workspace.
//!
//! What one workspace can make the hub hold here is bounded and small, whoever else is
//! subscribed: a feed exists only while somebody watches that workspace, it keeps at most
//! [`FEED_CAPACITY`] events, and an event is small (one port, one checkout state, one status;
//! the full port list is never queued: [`Detail::Ports`] says "send the ports as they are
//! now"). A subscriber that falls behind is not handed a backlog: it gets a fresh snapshot.

use crate::base::workspace::Status;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::broadcast;
use uuid::Uuid;

/// Events a feed keeps for a slow subscriber before it falls behind.
pub const FEED_CAPACITY: usize = 32;

/// Something that happened to a workspace.
#[derive(Debug, Clone)]
pub struct WorkspaceEvent {
    pub workspace_id: Uuid,
    /// The SSE event name: `status`, `checkout`, `port`, `deleted`.
    pub kind: &'static str,
    pub status: Option<Status>,
    pub reason: Option<String>,
    /// Unix milliseconds.
    pub at: i64,
    pub detail: Detail,
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

type Feeds = Arc<Mutex<HashMap<Uuid, broadcast::Sender<Arc<WorkspaceEvent>>>>>;

/// The feeds of the workspaces somebody is watching.
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
        if let Some(tx) = feeds.get(&event.workspace_id) {
            if tx.receiver_count() == 0 {
                feeds.remove(&event.workspace_id);
            } else {
                let _ = tx.send(Arc::new(event));
            }
        }
    }

    /// Subscribes to one workspace's events; the feed goes when its last subscriber does.
    pub fn subscribe(&self, id: Uuid) -> Subscription {
        let rx = lock(&self.feeds)
            .entry(id)
            .or_insert_with(|| broadcast::channel(FEED_CAPACITY).0)
            .subscribe();
        Subscription {
            rx: Some(rx),
            feeds: self.feeds.clone(),
            id,
        }
    }

    /// How many workspaces have a feed (someone watching).
    pub fn feeds(&self) -> usize {
        lock(&self.feeds).len()
    }
}

fn lock(feeds: &Feeds) -> MutexGuard<'_, HashMap<Uuid, broadcast::Sender<Arc<WorkspaceEvent>>>> {
    feeds.lock().unwrap_or_else(|p| p.into_inner())
}

/// One subscriber's place in a workspace's feed.
pub struct Subscription {
    rx: Option<broadcast::Receiver<Arc<WorkspaceEvent>>>,
    feeds: Feeds,
    id: Uuid,
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
            .get(&self.id)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            feeds.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: Uuid, n: i64) -> WorkspaceEvent {
        WorkspaceEvent {
            workspace_id: id,
            kind: "port",
            status: None,
            reason: None,
            at: n,
            detail: Detail::None,
        }
    }

    #[tokio::test]
    async fn feeds_are_per_workspace_small_and_go_with_their_subscribers() {
        let events = Events::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        events.publish(event(a, 0)); // nobody watching: nothing kept
        assert_eq!(events.feeds(), 0);
        let mut sub_b = events.subscribe(b);
        let mut sub_a = events.subscribe(a);
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
}
