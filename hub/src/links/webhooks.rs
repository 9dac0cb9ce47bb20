//! Webhooks: every workspace event that happens on this replica (status changes, ports,
//! checkouts, deletions) POSTed to the configured receiver (`[webhooks]`), signed, in order,
//! with retries.
//!
//! A delivery is the event's JSON (as SSE subscribers get it) with an `id` (a UUID, the
//! same on every attempt: receivers drop repeats by it), its `type` and the workspace's
//! `owner_id`. Headers: `X-Wsh-Event` (the type), `X-Wsh-Delivery` (the id) and
//! `X-Wsh-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" with the secret>`
//! (receivers check it and reject old timestamps). A 2xx answer is a delivery; a network
//! error, 408, 429 or 5xx is tried again after 0.5 s, 1 s, 2 s, ... up to [`ATTEMPTS`]
//! times; any other answer drops the event. Events wait in a queue of [`QUEUE`]; past that
//! (a receiver down for long) new ones are dropped and counted in the log, never held
//! without bound. Each replica sends the events that happen on it.

use crate::Hub;
use crate::domain::events::{Detail, WorkspaceEvent};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// Events waiting for delivery.
pub const QUEUE: usize = 1024;
/// Tries per event.
pub const ATTEMPTS: u32 = 8;
/// How long one attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where deliveries go, and how they are signed (from `[webhooks]`).
struct Receiver {
    url: String,
    key: aws_lc_rs::hmac::Key,
    /// The event types to send; all when empty.
    events: Vec<String>,
}

/// Starts delivering this replica's events to the configured receiver, if there is one.
pub fn start(hub: &Arc<Hub>) {
    let Some(config) = &hub.config.webhooks else {
        return;
    };
    let receiver = Receiver {
        url: config.url.clone(),
        key: aws_lc_rs::hmac::Key::new(
            aws_lc_rs::hmac::HMAC_SHA256,
            config.secret.expose().as_bytes(),
        ),
        events: config.events.clone(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
    hub.events.hook_to(tx);
    tokio::spawn(deliver_all(Arc::downgrade(hub), receiver, rx));
}

/// The event as subscribers see it: `workspace_id`, `status`, `reason`, `at` (RFC 3339)
/// and `detail` (a port list as the registry holds it now).
pub fn event_data(hub: &Hub, ev: &WorkspaceEvent) -> String {
    let mut data = json!({
        "workspace_id": ev.workspace_id,
        "status": ev.status,
        "reason": ev.reason,
        "at": crate::base::workspace::rfc3339(ev.at),
    });
    match &ev.detail {
        Detail::None => data.to_string(),
        Detail::Json(detail) => {
            data["detail"] = detail.clone();
            data.to_string()
        }
        // The list as the registry rendered it (once per change, for every subscriber).
        Detail::Ports => {
            let head = data.to_string();
            let head = head.strip_suffix('}').unwrap_or(&head);
            let ports = hub.agents.ports_json(ev.workspace_id);
            format!(r#"{head},"detail":{{"state":"all","ports":{ports}}}}}"#)
        }
    }
}

async fn deliver_all(
    hub: std::sync::Weak<Hub>,
    receiver: Receiver,
    mut rx: tokio::sync::mpsc::Receiver<Arc<WorkspaceEvent>>,
) {
    let client = match reqwest::Client::builder().timeout(ATTEMPT_TIMEOUT).build() {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "webhooks: no HTTP client");
            return;
        }
    };
    while let Some(ev) = rx.recv().await {
        if !receiver.events.is_empty() && !receiver.events.iter().any(|e| e == ev.kind) {
            continue;
        }
        let Some(hub) = hub.upgrade() else { return };
        let id = uuid::Uuid::new_v4();
        let owner = hub
            .store
            .get_workspace(ev.workspace_id)
            .await
            .ok()
            .map(|w| w.owner_id);
        let data = event_data(&hub, &ev);
        drop(hub);
        // `{"id":…,"type":…,"owner_id":…,` and the event's own fields.
        let head = json!({"id": id, "type": ev.kind, "owner_id": owner}).to_string();
        let body = format!("{},{}", head.trim_end_matches('}'), &data[1..]);
        deliver(&client, &receiver, &id.to_string(), ev.kind, body).await;
    }
}

/// The signature header for `body` sent at `t` (Unix seconds).
pub fn signature(key: &aws_lc_rs::hmac::Key, t: u64, body: &str) -> String {
    let tag = aws_lc_rs::hmac::sign(key, format!("{t}.{body}").as_bytes());
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("t={t},v1={hex}")
}

/// How long to wait before attempt `n` (from 1).
fn backoff(n: u32) -> Duration {
    Duration::from_millis(500 << (n - 1).min(6))
}

async fn deliver(
    client: &reqwest::Client,
    receiver: &Receiver,
    id: &str,
    kind: &str,
    body: String,
) {
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(backoff(attempt)).await;
        }
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let sent = client
            .post(&receiver.url)
            .header("content-type", "application/json")
            .header("x-wsh-event", kind)
            .header("x-wsh-delivery", id)
            .header("x-wsh-signature", signature(&receiver.key, t, &body))
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(res) if res.status().is_success() => return,
            Ok(res)
                if res.status().is_client_error()
                    && !matches!(res.status().as_u16(), 408 | 429) =>
            {
                tracing::warn!(delivery = id, status = %res.status(), "webhook refused; dropped");
                return;
            }
            Ok(res) => {
                tracing::debug!(delivery = id, attempt, status = %res.status(), "webhook failed; will retry");
            }
            Err(e) => {
                tracing::debug!(delivery = id, attempt, error = %e, "webhook failed; will retry");
            }
        }
    }
    tracing::warn!(delivery = id, "webhook gave up after {ATTEMPTS} attempts");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_the_documented_form() {
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, b"0123456789abcdef");
        let sig = signature(&key, 1700000000, r#"{"a":1}"#);
        let (t, v1) = sig.split_once(',').unwrap();
        assert_eq!(t, "t=1700000000");
        let tag = aws_lc_rs::hmac::sign(&key, br#"1700000000.{"a":1}"#);
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(v1, format!("v1={hex}"));
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(3), Duration::from_secs(2));
        assert_eq!(backoff(20), Duration::from_secs(32));
    }
}
