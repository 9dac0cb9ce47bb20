//! The files API (`/workspaces/:id/files/{path}`) against a real hub and agent.

use futures_util::StreamExt;
use harness::TestHub;
use serde_json::{Value, json};
use std::time::Duration;

struct Files<'a> {
    hub: &'a TestHub,
    id: String,
}

impl Files<'_> {
    fn url(&self, path: &str) -> String {
        self.hub
            .url(&format!("/workspaces/{}/files/{path}", self.id))
    }

    async fn put(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let res = self
            .hub
            .http
            .put(self.url(path))
            .bearer_auth(&self.hub.token)
            .body(body)
            .send()
            .await
            .unwrap();
        (
            res.status().as_u16(),
            res.json().await.unwrap_or(Value::Null),
        )
    }

    async fn get(&self, path: &str) -> (u16, Vec<u8>) {
        let res = self
            .hub
            .http
            .get(self.url(path))
            .bearer_auth(&self.hub.token)
            .send()
            .await
            .unwrap();
        (res.status().as_u16(), res.bytes().await.unwrap().to_vec())
    }

    async fn json(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .hub
            .http
            .request(method.parse().unwrap(), self.url(path))
            .bearer_auth(&self.hub.token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let res = req.send().await.unwrap();
        (
            res.status().as_u16(),
            res.json().await.unwrap_or(Value::Null),
        )
    }
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn files_are_read_written_listed_moved_and_deleted_by_the_sync_rules() {
    let hub = TestHub::start().await.unwrap();
    let id = hub.ready_workspace().await.unwrap();
    let dir = hub.workspace_dir(&id);
    let f = Files { hub: &hub, id };

    // Write (folders on the way made), read back, stat, list.
    let (status, info) = f.put("src/app/main.rs", "fn main() {}\n").await;
    assert_eq!(status, 201, "{info}");
    assert_eq!(
        (
            info["name"].as_str(),
            info["kind"].as_str(),
            info["size"].as_u64()
        ),
        (Some("src/app/main.rs"), Some("file"), Some(13))
    );
    assert_eq!(info["mode"], 0o644);
    assert_eq!(
        std::fs::read_to_string(dir.join("src/app/main.rs")).unwrap(),
        "fn main() {}\n"
    );
    assert_eq!(
        f.get("src/app/main.rs").await,
        (200, b"fn main() {}\n".to_vec())
    );
    let (status, stat) = f.json("GET", "src/app?stat=true", None).await;
    assert_eq!((status, stat["kind"].as_str()), (200, Some("dir")));
    let (status, listing) = f.json("GET", "src/app", None).await;
    assert_eq!(status, 200);
    assert_eq!(listing["entries"][0]["name"], "main.rs");
    let root = hub.url(&format!("/workspaces/{}/files", f.id));
    let listing: Value = hub
        .http
        .get(&root)
        .bearer_auth(&hub.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        listing["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "src" && e["kind"] == "dir"),
        "{listing}"
    );
    // A mode, kept by the next write; no folders made when told not to.
    let (status, info) = f.put("run.sh?mode=755", "#!/bin/sh\n").await;
    assert_eq!((status, info["mode"].as_u64()), (201, Some(0o755)));
    let (_, info) = f.put("run.sh", "#!/bin/sh\necho hi\n").await;
    assert_eq!(info["mode"], 0o755);
    let (status, e) = f.put("new/dir/x?parents=false", "x").await;
    assert_eq!((status, code(&e)), (404, "not_found"));
    let (status, e) = f.put("run.sh?mode=999", "x").await;
    assert_eq!((status, code(&e)), (400, "invalid_request"));

    // Mkdir, move, delete.
    let (status, e) = f
        .json("POST", "src", Some(json!({"action": "mkdir"})))
        .await;
    assert_eq!((status, code(&e)), (409, "exists"));
    let (status, _) = f
        .json(
            "POST",
            "a/b/c",
            Some(json!({"action": "mkdir", "parents": true})),
        )
        .await;
    assert_eq!(status, 200);
    assert!(dir.join("a/b/c").is_dir());
    let (status, e) = f
        .json("POST", "x/y", Some(json!({"action": "mkdir"})))
        .await;
    assert_eq!((status, code(&e)), (404, "not_found"));
    let (status, e) = f
        .json(
            "POST",
            "run.sh",
            Some(json!({"action": "move", "to": "src/app/main.rs"})),
        )
        .await;
    assert_eq!((status, code(&e)), (409, "exists"));
    let (status, info) = f
        .json(
            "POST",
            "run.sh",
            Some(json!({"action": "move", "to": "src/app/main.rs", "overwrite": true})),
        )
        .await;
    assert_eq!(
        (status, info["name"].as_str()),
        (200, Some("src/app/main.rs"))
    );
    assert_eq!(f.get("src/app/main.rs").await.1, b"#!/bin/sh\necho hi\n");
    let (status, e) = f
        .json(
            "POST",
            "src/app/main.rs",
            Some(json!({"action": "move", "to": "a"})),
        )
        .await;
    assert_eq!((status, code(&e)), (409, "is_a_directory"));
    let (status, e) = f
        .json("POST", "src", Some(json!({"action": "chmod"})))
        .await;
    assert_eq!((status, code(&e)), (400, "invalid_request"));
    let (status, e) = f.json("DELETE", "a", None).await;
    assert_eq!((status, code(&e)), (409, "not_empty"));
    let (status, _) = f.json("DELETE", "a?recursive=true", None).await;
    assert_eq!(status, 200);
    assert!(!dir.join("a").exists());
    let (status, e) = f.json("DELETE", "a", None).await;
    assert_eq!((status, code(&e)), (404, "not_found"));
    let (status, e) = f.put("src", "x").await;
    assert_eq!((status, code(&e)), (409, "is_a_directory"));
    let (status, e) = f.json("GET", "nothing-here", None).await;
    assert_eq!((status, code(&e)), (404, "not_found"));

    // Escapes, on every route: `..`, absolute paths, links on the way; special files.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), "do not read").unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.join("door")).unwrap();
    std::os::unix::fs::symlink("../..", dir.join("door2")).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(dir.join("fifo"))
        .status()
        .unwrap();
    assert!(made.success());
    for path in [
        // Slashes encoded, so that no URL parser folds the dots away first.
        "..%2Fescape",
        "a%2F..%2F..%2Fescape",
        "%2Fetc%2Fpasswd",
        "door/secret",
        "door2/etc/passwd",
        "door/new",
    ] {
        for (method, suffix, body) in [
            ("GET", "", None),
            ("GET", "?stat=true", None),
            ("DELETE", "", None),
            (
                "POST",
                "",
                Some(json!({"action": "mkdir", "parents": true})),
            ),
            ("POST", "", Some(json!({"action": "move", "to": "stolen"}))),
        ] {
            let (status, e) = f
                .json(method, &format!("{path}{suffix}"), body.clone())
                .await;
            assert_eq!(
                (status, code(&e)),
                (400, "bad_path"),
                "{method} {path}{suffix}"
            );
        }
        let (status, e) = f.put(path, "pwned").await;
        assert_eq!((status, code(&e)), (400, "bad_path"), "PUT {path}");
        let (status, e) = f
            .json(
                "POST",
                "src",
                Some(json!({"action": "move", "to": path.replace("%2F", "/")})),
            )
            .await;
        assert_eq!((status, code(&e)), (400, "bad_path"), "move to {path}");
    }
    assert_eq!(
        std::fs::read_to_string(outside.path().join("secret")).unwrap(),
        "do not read"
    );
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 1);
    // The link itself is what is at its path: stat says so, delete removes only it.
    let (status, stat) = f.json("GET", "door?stat=true", None).await;
    assert_eq!((status, stat["kind"].as_str()), (200, Some("symlink")));
    let (status, e) = f.json("GET", "fifo", None).await;
    assert_eq!((status, code(&e)), (409, "special_file"));
    let (status, e) = f.put("fifo", "x").await;
    assert_eq!((status, code(&e)), (409, "special_file"));
    let (status, _) = f.json("DELETE", "door", None).await;
    assert_eq!(status, 200);
    assert!(outside.path().join("secret").exists());

    // An upload cut off half-way changes nothing and leaves nothing behind.
    std::fs::write(dir.join("keep.txt"), "old").unwrap();
    let chunks = futures_util::stream::iter(vec![
        Ok(vec![b'n'; 1 << 20]),
        Err(std::io::Error::other("the client gave up")),
    ]);
    let res = hub
        .http
        .put(f.url("keep.txt"))
        .bearer_auth(&hub.token)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await;
    assert!(res.is_err() || res.unwrap().status() != 201);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        std::fs::read_to_string(dir.join("keep.txt")).unwrap(),
        "old"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".wsh-sync-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A stranger learns nothing.
    let stranger = hub.mint_token("stranger").unwrap();
    let res = hub
        .http
        .get(f.url("src/app/main.rs"))
        .bearer_auth(&stranger)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    assert!(!res.text().await.unwrap().contains("main"));
}

#[tokio::test]
async fn concurrent_writers_never_mix_and_a_large_file_round_trips() {
    let hub = TestHub::start().await.unwrap();
    let id = hub.ready_workspace().await.unwrap();
    let f = Files { hub: &hub, id };

    // Eight writers of 4 MiB each, all different, to one file, with readers beside them:
    // every read is one writer's whole content, and so is the end.
    let size = 4 << 20;
    let writers = (0..8u8).map(|i| {
        let f = &f;
        async move {
            let (status, _) = f.put("shared.bin", vec![b'a' + i; size]).await;
            assert_eq!(status, 201);
        }
    });
    let readers = (0..8).map(|_| {
        let f = &f;
        async move {
            for _ in 0..4 {
                let (status, body) = f.get("shared.bin").await;
                if status == 404 {
                    continue; // no writer finished yet
                }
                assert_eq!(status, 200);
                assert_eq!(body.len(), size);
                assert!(body.iter().all(|b| *b == body[0]), "a mix of writers");
            }
        }
    });
    futures_util::future::join(
        futures_util::future::join_all(writers),
        futures_util::future::join_all(readers),
    )
    .await;
    let (_, last) = f.get("shared.bin").await;
    assert_eq!(last.len(), size);
    assert!(last.iter().all(|b| *b == last[0]) && (b'a'..b'i').contains(&last[0]));

    // A large file up and down, streamed both ways, hashed on each side.
    let total: u64 = 256 << 20;
    let chunk = 1 << 20;
    let mut sent = blake3::Hasher::new();
    let chunks: Vec<Vec<u8>> = (0..total / chunk)
        .map(|i| harness::pseudo_bytes(chunk as usize, i))
        .collect();
    for c in &chunks {
        sent.update(c);
    }
    let body = futures_util::stream::iter(chunks.into_iter().map(Ok::<_, std::io::Error>));
    let (status, info) = f.put("big.bin", reqwest::Body::wrap_stream(body)).await;
    assert_eq!(
        (status, info["size"].as_u64()),
        (201, Some(total)),
        "{info}"
    );
    let res = hub
        .http
        .get(f.url("big.bin"))
        .bearer_auth(&hub.token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.content_length(), Some(total));
    let mut got = blake3::Hasher::new();
    let mut n = 0u64;
    let mut stream = res.bytes_stream();
    while let Some(piece) = stream.next().await {
        let piece = piece.unwrap();
        n += piece.len() as u64;
        got.update(&piece);
    }
    assert_eq!(n, total);
    assert_eq!(got.finalize(), sent.finalize(), "the same bytes came back");
}
