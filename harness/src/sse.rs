//! A reader of a workspace's server-sent events, pulled at the test's own pace (so a test
//! can also be a slow subscriber).

use crate::TestHub;
use serde_json::Value;
use std::time::Duration;

/// SSE events (`event:` name and JSON `data:`) from `/workspaces/:id/events` or `/events`.
pub struct Events {
    res: reqwest::Response,
    buf: String,
}

impl Events {
    /// Subscribes with the hub's dev token.
    pub async fn open(hub: &TestHub, id: &str) -> Self {
        Self::open_as(hub, &hub.token, id).await
    }

    pub async fn open_as(hub: &TestHub, token: &str, id: &str) -> Self {
        Self::open_path(hub, token, &format!("/workspaces/{id}/events")).await
    }

    /// Every event of the workspaces `token` sees (`GET /events`).
    pub async fn open_owner(hub: &TestHub, token: &str) -> Self {
        Self::open_path(hub, token, "/events").await
    }

    async fn open_path(hub: &TestHub, token: &str, path: &str) -> Self {
        let res = hub
            .http
            .get(hub.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(
            res.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Self {
            res,
            buf: String::new(),
        }
    }

    /// The next event, or `None` when the stream ends.
    pub async fn recv(&mut self) -> Option<(String, Value)> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut name = String::new();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if name.is_empty() {
                    continue; // keep-alive comment
                }
                return Some((name, serde_json::from_str(&data).unwrap_or(Value::Null)));
            }
            let chunk = self.res.chunk().await.ok()??;
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// The next event, waiting at most `wait` for it (panics after that, or at the end).
    pub async fn next_within(&mut self, wait: Duration) -> (String, Value) {
        tokio::time::timeout(wait, self.recv())
            .await
            .expect("an event in time")
            .expect("stream still open")
    }

    /// The next event, within 15 s.
    pub async fn next(&mut self) -> (String, Value) {
        self.next_within(Duration::from_secs(15)).await
    }

    /// Statuses until (and including) `last`, or the `deleted` event; other events are
    /// skipped.
    pub async fn statuses_until(&mut self, last: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let (name, data) = self.next().await;
            let s = match name.as_str() {
                "deleted" => "deleted".to_owned(),
                "status" => data["status"].as_str().unwrap_or_default().to_owned(),
                _ => continue, // port and checkout events
            };
            seen.push(s.clone());
            if s == last {
                return seen;
            }
        }
    }
}
