//! A small web server for tests and benchmarks, run inside workspaces:
//! `test-server <port> [bind-address]`. Routes: `/` (hello), `/echo` (the request as
//! JSON), `POST /count` (streams the body, answers its length), `/stream` (five chunks,
//! 50 ms apart), `/ws` (WebSocket echo), `/hang` (never answers).
//!
//! Benchmark modes: `test-server churn <count> <interval-ms>` listens on a fresh port
//! `count` times, printing `listen <port> <unix-ns>` right after each `listen()`;
//! `test-server blast <port> <mib>` sends `mib` MiB to every connection, then closes it.

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, Uri};
use axum::response::Response;
use axum::routing::{any, get, post};
use futures_util::StreamExt;
use serde_json::json;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let first = args.next().unwrap_or_default();
    let mut num = |what: &str| -> anyhow::Result<u64> {
        args.next()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("missing {what}"))
    };
    match first.as_str() {
        "churn" => return churn(num("count")?, num("interval-ms")?).await,
        "blast" => return blast(num("port")? as u16, num("mib")?).await,
        _ => {}
    }
    let port: u16 = first.parse()?;
    let bind = args.next().unwrap_or_else(|| "127.0.0.1".into());
    let app = axum::Router::new()
        .route("/", get(|| async { "hello from test-server\n" }))
        .route("/echo", any(echo))
        .route("/count", post(count))
        .route("/stream", get(stream))
        .route("/ws", get(ws))
        .route("/hang", get(std::future::pending::<&'static str>));
    let listener = tokio::net::TcpListener::bind((bind.as_str(), port)).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

async fn echo(
    method: axum::http::Method,
    uri: Uri,
    headers: HeaderMap,
) -> axum::Json<serde_json::Value> {
    let headers: serde_json::Map<String, serde_json::Value> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or_default())))
        .collect();
    axum::Json(json!({ "method": method.as_str(), "uri": uri.to_string(), "headers": headers }))
}

async fn count(body: axum::body::Body) -> axum::Json<serde_json::Value> {
    let mut stream = body.into_data_stream();
    let mut n = 0u64;
    while let Some(Ok(chunk)) = stream.next().await {
        n += chunk.len() as u64;
    }
    axum::Json(json!({ "bytes": n }))
}

async fn stream() -> Response {
    let chunks = futures_util::stream::unfold(0, |i| async move {
        if i == 5 {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        Some((
            Ok::<_, std::io::Error>(format!("data: tick {i}\n\n")),
            i + 1,
        ))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(axum::body::Body::from_stream(chunks))
        .unwrap_or_default()
}

async fn ws(upgrade: WebSocketUpgrade) -> Response {
    upgrade.on_upgrade(|mut socket: WebSocket| async move {
        while let Some(Ok(msg)) = socket.recv().await {
            let reply = match msg {
                Message::Text(t) => Message::Text(format!("echo: {t}").into()),
                Message::Binary(b) => Message::Binary(b),
                Message::Close(_) => break,
                _ => continue,
            };
            if socket.send(reply).await.is_err() {
                break;
            }
        }
    })
}

async fn churn(count: u64, interval_ms: u64) -> anyhow::Result<()> {
    use std::io::Write;
    for _ in 0..count {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "listen {} {}",
            listener.local_addr()?.port(),
            now.as_nanos()
        )?;
        out.flush()?;
        tokio::time::sleep(std::time::Duration::from_millis(interval_ms)).await;
    }
    Ok(())
}

async fn blast(port: u16, mib: u64) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    loop {
        let (mut conn, _) = listener.accept().await?;
        tokio::spawn(async move {
            let chunk = vec![0u8; 1 << 20];
            for _ in 0..mib {
                if conn.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            let _ = conn.shutdown().await;
        });
    }
}
