//! Webhooks against a receiver that fails before it succeeds.

use harness::{HubOptions, TestHub};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECRET: &str = "webhook-secret-0123456789";

/// What the receiver saw: every attempt, in order (delivery id, headers, body).
#[derive(Default)]
struct Seen {
    attempts: Vec<(String, HashMap<String, String>, String)>,
}

/// A receiver that answers 500 to the first two attempts of each delivery, then 200.
async fn receiver() -> (std::net::SocketAddr, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let state = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let seen = state.clone();
            async move {
                let headers: HashMap<String, String> = headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
                    .collect();
                let id = headers.get("x-wsh-delivery").cloned().unwrap_or_default();
                let mut seen = seen.lock().unwrap();
                let tries = seen.attempts.iter().filter(|(d, _, _)| *d == id).count();
                seen.attempts.push((id, headers, body));
                if tries < 2 {
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    axum::http::StatusCode::OK
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, seen)
}

fn verify(headers: &HashMap<String, String>, body: &str) -> bool {
    let sig = &headers["x-wsh-signature"];
    let (t, v1) = sig.split_once(',').unwrap();
    let t = t.strip_prefix("t=").unwrap();
    let v1 = v1.strip_prefix("v1=").unwrap();
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, SECRET.as_bytes());
    let tag: Vec<u8> = (0..v1.len() / 2)
        .map(|i| u8::from_str_radix(&v1[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    aws_lc_rs::hmac::verify(&key, format!("{t}.{body}").as_bytes(), &tag).is_ok()
}

#[tokio::test]
async fn lifecycle_events_reach_a_failing_receiver_signed_and_recognisable_on_retry() {
    let (addr, seen) = receiver().await;
    let hub = TestHub::start_with(HubOptions {
        config: format!(
            "[webhooks]\nurl = \"http://{addr}/hook\"\nsecret = \"{SECRET}\"\nevents = [\"status\", \"deleted\"]\n"
        ),
        ..Default::default()
    })
    .await
    .unwrap();
    let id = hub.ready_workspace().await.unwrap();

    // The READY status arrives after two failures, each attempt with the same id and a
    // valid signature; what the receiver accepted once is not sent again.
    let start = Instant::now();
    let ready = loop {
        let delivered = {
            let seen = seen.lock().unwrap();
            seen.attempts
                .iter()
                .filter(|(_, h, b)| h["x-wsh-event"] == "status" && b.contains("\"READY\""))
                .map(|(d, h, b)| (d.clone(), h.clone(), b.clone()))
                .collect::<Vec<_>>()
        };
        if delivered.len() >= 3 {
            break delivered;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "READY not delivered: {} attempts so far",
            seen.lock().unwrap().attempts.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (delivery, _, body) = &ready[0];
    assert!(
        ready
            .iter()
            .all(|(d, h, b)| d == delivery && b == body && verify(h, b)),
        "three attempts of one delivery, each signed"
    );
    let event: Value = serde_json::from_str(body).unwrap();
    assert_eq!(event["id"], delivery.as_str());
    assert_eq!(event["type"], "status");
    assert_eq!(event["workspace_id"], id.as_str());
    assert_eq!(event["owner_id"], "dev");
    assert_eq!(event["status"], "READY");
    {
        let seen = seen.lock().unwrap();
        assert_eq!(
            seen.attempts
                .iter()
                .filter(|(d, _, _)| d == delivery)
                .count(),
            3,
            "no attempt after the receiver accepted it"
        );
        // A forged or altered body does not verify.
        let (_, headers, _) = &seen.attempts[0];
        assert!(!verify(headers, &body.replace("READY", "STOPPED")));
        // Only the event types asked for.
        assert!(
            seen.attempts
                .iter()
                .all(|(_, h, _)| h["x-wsh-event"] != "port")
        );
    }

    // Deleting the workspace is delivered too, with a new id.
    let (status, _) = hub
        .api("DELETE", &format!("/workspaces/{id}"), None)
        .await
        .unwrap();
    assert_eq!(status, 202);
    let start = Instant::now();
    loop {
        let found = seen.lock().unwrap().attempts.iter().any(|(d, h, b)| {
            d != delivery && h["x-wsh-event"] == "deleted" && b.contains(&id) && verify(h, b)
        });
        if found {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no deleted event"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
