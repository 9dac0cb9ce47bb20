//! Browser terminals through a real hub and a real agent: the WebSocket bridge, replay by
//! offset, a hub that dies mid-stream, exit codes, and bad input.

use futures_util::{SinkExt, StreamExt};
use harness::TestHub;
use serde_json::{Value, json};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const WAIT: Duration = Duration::from_secs(30);

/// What the bridge sends, decoded.
#[derive(Debug)]
enum Frame {
    Output {
        offset: u64,
        bytes: Vec<u8>,
    },
    Screen {
        offset: u64,
        bytes: Vec<u8>,
        last: bool,
    },
    Event(Value),
    Closed,
}

async fn open(hub: &TestHub, id: &str, query: &str) -> Ws {
    let url = hub.terminal_url(id, query).await.unwrap();
    tokio_tungstenite::connect_async(url)
        .await
        .expect("websocket")
        .0
}

async fn frame(ws: &mut Ws) -> Frame {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("terminal stalled");
        return match msg {
            Some(Ok(Message::Binary(b))) => {
                let offset = u64::from_be_bytes(b[1..9].try_into().unwrap());
                match b[0] {
                    0 => Frame::Output {
                        offset,
                        bytes: b[9..].to_vec(),
                    },
                    kind => Frame::Screen {
                        offset,
                        bytes: b[9..].to_vec(),
                        last: kind == 2,
                    },
                }
            }
            Some(Ok(Message::Text(t))) => Frame::Event(serde_json::from_str(&t).unwrap()),
            Some(Ok(Message::Close(close))) => {
                eprintln!("the hub closed the terminal: {close:?}");
                Frame::Closed
            }
            None | Some(Err(_)) => {
                eprintln!("the terminal's WebSocket ended: {msg:?}");
                Frame::Closed
            }
            Some(Ok(_)) => continue,
        };
    }
}

/// A terminal client that keeps what it saw, by offset.
struct Client {
    ws: Ws,
    session: String,
    /// Offset of `seen[0]`.
    base: u64,
    seen: Vec<u8>,
    events: Vec<Value>,
    /// The last screen snapshot received (`seen` continues after it).
    screen: Vec<u8>,
    screen_done: bool,
}

impl Client {
    async fn connect(hub: &TestHub, id: &str, query: &str) -> Self {
        let mut ws = open(hub, id, query).await;
        let session = match frame(&mut ws).await {
            Frame::Event(e) if e["type"] == "opened" => e["session"].as_str().unwrap().to_owned(),
            other => panic!("expected opened, got {other:?}"),
        };
        Self {
            ws,
            session,
            base: u64::MAX,
            seen: vec![],
            events: vec![],
            screen: vec![],
            screen_done: true,
        }
    }

    fn next_offset(&self) -> u64 {
        self.base + self.seen.len() as u64
    }

    /// Reads until `pred(seen as text)` holds or the stream closes; returns false on close.
    async fn read_until(&mut self, pred: impl Fn(&str) -> bool) -> bool {
        while !pred(&String::from_utf8_lossy(&self.seen)) {
            if !self.pump().await {
                return false;
            }
        }
        true
    }

    /// Reads one frame; returns false when the stream ended.
    async fn pump(&mut self) -> bool {
        match frame(&mut self.ws).await {
            Frame::Output { offset, bytes } => {
                if self.base == u64::MAX {
                    self.base = offset;
                }
                assert_eq!(
                    offset,
                    self.next_offset(),
                    "output is contiguous (base {}, screen_done {}, events {:?})",
                    self.base,
                    self.screen_done,
                    self.events
                );
                self.seen.extend(bytes);
            }
            Frame::Screen {
                offset,
                bytes,
                last,
            } => {
                if self.screen_done {
                    self.screen.clear();
                }
                self.screen.extend(bytes);
                self.screen_done = last;
                if last {
                    self.base = offset;
                    self.seen.clear();
                }
            }
            Frame::Event(e) => {
                let done = e["type"] == "exit";
                self.events.push(e);
                if done {
                    return false;
                }
            }
            Frame::Closed => return false,
        }
        true
    }

    /// What a terminal emulator shows after this client's snapshot and output up to `upto`.
    fn render(&self, upto: u64, rows: u16, cols: u16) -> vt100::Parser {
        let mut p = vt100::Parser::new(rows.try_into().unwrap(), cols.try_into().unwrap(), 0);
        p.process(&self.screen);
        p.process(&self.seen[..(upto - self.base) as usize]);
        p
    }

    async fn type_text(&mut self, text: &str) {
        self.ws
            .send(Message::Binary(text.as_bytes().to_vec().into()))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn output_is_replayed_exactly_once_after_reattach() {
    let hub = TestHub::start().await.unwrap();
    let id = hub.ready_workspace().await.unwrap();
    let marker = format!("hello-{}", rand::random::<u32>());
    let mut a = Client::connect(&hub, &id, "cols=100&rows=30").await;
    a.type_text(&format!("echo {marker}\n")).await;
    assert!(
        a.read_until(|s| s.matches(&marker).count() >= 2).await,
        "typed text echoes"
    );

    // A second client attaches at the first client's starting offset: same bytes.
    let mut b = Client::connect(
        &hub,
        &id,
        &format!("session={}&offset={}", a.session, a.base),
    )
    .await;
    let a_len = a.seen.len();
    let a_snapshot = a.seen.clone();
    assert!(b.read_until(|s| s.len() >= a_len).await);
    assert_eq!(&b.seen[..a_len], &a_snapshot[..]);

    // B leaves; 3.4 MiB of output happens (more frames than the hub sends in one batch);
    // B comes back at its offset.
    let b_offset = b.next_offset();
    let b_seen_before = b.seen.clone();
    drop(b);
    a.type_text("seq 1 500000; echo all-done-$((6*7))\n").await;
    assert!(a.read_until(|s| s.contains("all-done-42")).await);
    let mut b = Client::connect(
        &hub,
        &id,
        &format!("session={}&offset={b_offset}", a.session),
    )
    .await;
    let target = a.next_offset();
    assert!(b.read_until(|s| s.contains("all-done-42")).await);
    while b.next_offset() < target {
        assert!(b.read_until(|s| !s.is_empty()).await);
        if b.next_offset() < target {
            let n = b.seen.len();
            b.read_until(|s| s.len() > n).await;
        }
    }
    assert_eq!(b.base, b_offset, "resumed exactly where it left off");
    let a_from = (b_offset - a.base) as usize;
    // B may have read a little further (the next prompt) than A had when it stopped.
    let common = b.seen.len().min(a.seen.len() - a_from);
    assert!(
        common as u64 >= target - b_offset,
        "B caught up with what A saw"
    );
    assert_eq!(
        &b.seen[..common],
        &a.seen[a_from..a_from + common],
        "same bytes, once, in order"
    );
    assert!(b.seen.len() > 3 << 20, "{} bytes replayed", b.seen.len());
    assert!(!b_seen_before.is_empty());
    for e in &b.events {
        assert_ne!(e["type"], "truncated", "nothing fell out of a 4 MiB ring");
    }
}

#[tokio::test]
async fn a_hub_that_dies_mid_stream_loses_no_byte() {
    let mut hub = TestHub::start().await.unwrap();
    let id = hub.ready_workspace().await.unwrap();
    let mut a = Client::connect(&hub, &id, "").await;
    a.type_text("for i in $(seq 1 40); do echo tick$i; sleep 0.05; done; echo fin-$((1+1))\n")
        .await;
    assert!(a.read_until(|s| s.contains("tick3\r\n")).await);
    hub.kill();
    hub.start_again().await.unwrap();
    hub.wait_for(&id, WAIT, |w| !w["agent"].is_null())
        .await
        .unwrap();
    let mut b = Client::connect(
        &hub,
        &id,
        &format!("session={}&offset={}", a.session, a.next_offset()),
    )
    .await;
    assert!(b.read_until(|s| s.contains("fin-2")).await);
    assert_eq!(b.base, a.next_offset());
    let mut all = a.seen.clone();
    all.extend(&b.seen);
    let text = String::from_utf8_lossy(&all);
    let ticks = harness::numbered_lines(&text, "tick");
    assert_eq!(
        ticks,
        (1..=40).collect::<Vec<_>>(),
        "every line once, in order"
    );
}

#[tokio::test]
async fn exit_status_reaches_the_browser() {
    let hub = TestHub::start().await.unwrap();
    let id = hub.ready_workspace().await.unwrap();
    let mut a = Client::connect(&hub, &id, "").await;
    a.type_text("exit 3\n").await;
    assert!(!a.read_until(|_| false).await);
    let exit = a
        .events
        .iter()
        .find(|e| e["type"] == "exit")
        .expect("exit event");
    assert_eq!(exit["code"], 3);
}

#[tokio::test]
async fn bad_terminal_input_gets_clear_errors_and_everything_keeps_running() {
    let hub = TestHub::start().await.unwrap();
    let id = hub.ready_workspace().await.unwrap();

    // Unknown session.
    let mut ws = open(&hub, &id, "session=nope&offset=5").await;
    match frame(&mut ws).await {
        Frame::Event(e) => assert_eq!(
            (e["type"].as_str(), e["code"].as_str()),
            (Some("error"), Some("NoSuchSession"))
        ),
        other => panic!("{other:?}"),
    }

    // Impossible sizes, garbage control messages: errors, and the session lives on.
    let mut a = Client::connect(&hub, &id, "").await;
    for bad in [
        json!({"type": "resize", "cols": 0, "rows": 0}),
        json!({"type": "resize", "cols": 65535, "rows": 65535}),
    ] {
        a.ws.send(Message::Text(bad.to_string().into()))
            .await
            .unwrap();
    }
    a.ws.send(Message::Text("{not json".into())).await.unwrap();
    a.type_text("echo still-$((2+3))\n").await;
    assert!(a.read_until(|s| s.contains("still-5")).await);
    let codes: Vec<&str> = a.events.iter().filter_map(|e| e["code"].as_str()).collect();
    assert_eq!(
        codes.iter().filter(|c| **c == "BadSize").count(),
        2,
        "{:?}",
        a.events
    );
    assert!(codes.contains(&"bad_request"), "{:?}", a.events);

    // An oversized message closes that WebSocket only.
    a.ws.send(Message::Binary(vec![b'x'; 200_000].into()))
        .await
        .ok();
    assert!(!a.read_until(|_| false).await);
    let mut again = Client::connect(&hub, &id, &format!("session={}", a.session)).await;
    again.type_text("echo alive-$((3+4))\n").await;
    assert!(again.read_until(|s| s.contains("alive-7")).await);

    // HTTP-level refusals: no credentials, a forged or foreign ticket, a user token in the
    // query (no longer accepted: browsers use tickets), another owner's bearer token.
    let base = format!("ws://{}/workspaces/{id}/terminal", hub.listening.http);
    let other = hub.create_workspace().await.unwrap();
    let foreign = hub
        .terminal_url(other["id"].as_str().unwrap(), "")
        .await
        .unwrap();
    let foreign_ticket = foreign
        .split("ticket=")
        .nth(1)
        .unwrap()
        .trim_end_matches('&');
    let mallory = hub.mint_token("mallory").unwrap();
    let cases = [
        (base.clone(), None, 401),
        (format!("{base}?ticket=wst_forged.x"), None, 401),
        (format!("{base}?ticket={foreign_ticket}"), None, 401),
        (format!("{base}?access_token={}", hub.token), None, 401),
        (base.clone(), Some(mallory.as_str()), 404),
    ];
    for (url, bearer, status) in cases {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = url.as_str().into_client_request().unwrap();
        if let Some(token) = bearer {
            req.headers_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        match tokio_tungstenite::connect_async(req).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(res)) => {
                assert_eq!(res.status().as_u16(), status, "{url}")
            }
            other => panic!("expected HTTP {status}, got {:?}", other.map(|_| ())),
        }
    }
    let (status, body) = hub.api("GET", "/healthz", None).await.unwrap();
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
}

#[tokio::test]
async fn a_workspace_without_a_connected_agent_says_so() {
    let hub = TestHub::start_manual().await.unwrap();
    let ws = hub.create_workspace().await.unwrap();
    let url = hub
        .terminal_url(ws["id"].as_str().unwrap(), "")
        .await
        .unwrap()
        .replace("/workspaces/", "/terminal/")
        .replace("/terminal?", "?");
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => {
            assert_eq!(res.status().as_u16(), 409)
        }
        other => panic!("expected 409, got {:?}", other.map(|_| ())),
    }
}

/// Two emulators show the same thing: every cell with its attributes, the cursor, the modes.
fn assert_same_screen(a: &vt100::Parser, b: &vt100::Parser, what: &str) {
    let (a, b) = (a.screen(), b.screen());
    assert_eq!(a.contents(), b.contents(), "{what}: text");
    assert_eq!(
        a.contents_formatted(),
        b.contents_formatted(),
        "{what}: cells"
    );
    assert_eq!(a.cursor_position(), b.cursor_position(), "{what}: cursor");
    assert_eq!(
        (
            a.alternate_screen(),
            a.hide_cursor(),
            a.application_cursor()
        ),
        (
            b.alternate_screen(),
            b.hide_cursor(),
            b.application_cursor()
        ),
        "{what}: modes"
    );
}

/// Reads both clients until both have seen past `after`, then a little longer so that a
/// redraw in progress completes; returns an offset both have reached.
async fn common_offset(a: &mut Client, b: &mut Client, after: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no common offset past {after}"
        );
        for c in [&mut *a, &mut *b] {
            // Until it has been quiet for 200 ms, or for at most a second.
            let round = tokio::time::Instant::now() + Duration::from_secs(1);
            while tokio::time::Instant::now() < round
                && tokio::time::timeout(Duration::from_millis(200), c.pump())
                    .await
                    .is_ok_and(|open| open)
            {}
        }
        if a.base == u64::MAX || b.base == u64::MAX {
            continue;
        }
        // Under load a client can fall behind the ring too and restart from a newer
        // snapshot: the common offset must lie after both clients' snapshots.
        let x = a.next_offset().min(b.next_offset());
        if x > after && x >= a.base && x >= b.base {
            return x;
        }
    }
}

/// Full-screen programs look the same to a client that attaches long after they started,
/// with their start fallen out of the ring, as to one that watched all along, and stay so
/// while the program goes on drawing.
#[tokio::test]
async fn full_screen_programs_reattach_exactly() {
    let hub = TestHub::start_with(harness::HubOptions {
        config: "terminal_ring_bytes = 65536\n".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let id = hub.ready_workspace().await.unwrap();
    let (cols, rows) = (100u16, 30u16);
    let size = format!("cols={cols}&rows={rows}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("numbers.txt");
    std::fs::write(
        &file,
        (1..=60_000)
            .map(|i| format!("line {i} \x1b-free text with a tab\there\n"))
            .collect::<String>(),
    )
    .unwrap();
    let file = file.display();

    // (program, keys that make it draw well past the ring, keys once re-attached)
    let cases: [(String, &str, &str); 3] = [
        (
            format!("vim -u NONE -N -i NONE -n {file}"),
            "\x06",
            "\x05\x05\x19Gkk",
        ),
        (format!("less -R {file}"), " ", "kkkG"),
        // Ctrl-L: htop repaints everything.
        ("htop -d 1".to_owned(), "\x0c", "\x1b[B\x1b[B"),
    ];
    for (program, page, keys) in cases {
        let mut a = Client::connect(&hub, &id, &size).await;
        a.type_text(&format!("exec {program}\n")).await;
        while a.base == u64::MAX {
            assert!(a.pump().await);
        }
        // Let it draw, then page on until far more than the ring has gone by.
        let start = a.next_offset();
        while a.next_offset() < start + 150_000 {
            a.type_text(&page.repeat(20)).await;
            let n = a.next_offset();
            while a.next_offset() < n + 4096 {
                assert!(a.pump().await, "{program} keeps drawing");
            }
        }
        // B attaches at the very first offset, long out of the ring: truncated, then the
        // screen, then the live stream.
        let mut b =
            Client::connect(&hub, &id, &format!("session={}&offset=0&{size}", a.session)).await;
        let x = common_offset(&mut a, &mut b, 0).await;
        assert!(
            b.events.iter().any(|e| e["type"] == "truncated"),
            "{program}: truncation is reported ({:?})",
            b.events
        );
        assert_same_screen(&a.render(x, rows, cols), &b.render(x, rows, cols), &program);

        // The program goes on drawing (scrolling, moving the cursor) for both of them.
        b.type_text(keys).await;
        let y = common_offset(&mut a, &mut b, x).await;
        assert!(y > x, "{program} answered the keys");
        assert_same_screen(&a.render(y, rows, cols), &b.render(y, rows, cols), &program);
        let contents = b.render(y, rows, cols).screen().contents();
        assert!(
            program.starts_with("htop") || contents.contains("line "),
            "{program} shows the file: {contents}"
        );
    }
}

#[tokio::test]
async fn a_named_session_is_attached_or_created_like_tmux_new_a() {
    let hub = TestHub::start().await.unwrap();
    let id = hub.ready_workspace().await.unwrap();
    // The first client to name it creates it; the next attaches to the same one.
    let mut a = Client::connect(&hub, &id, "session=main").await;
    assert_eq!(a.session, "main");
    a.type_text("echo one-$((1+1))\n").await;
    assert!(a.read_until(|s| s.contains("one-2")).await);
    let mut b = Client::connect(&hub, &id, "session=main").await;
    assert_eq!(b.session, "main");
    b.type_text("echo two-$((2+2))\n").await;
    assert!(a.read_until(|s| s.contains("two-4")).await);
    assert!(b.read_until(|s| s.contains("two-4")).await);
    let list = hub.wsh().unwrap().args(["sessions", &id]).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert_eq!(list.matches("main").count(), 1, "{list}");

    // A name that breaks the rules is refused, and resuming a name that is not running
    // (an offset) does not create it.
    for query in ["session=bad%2Fname", "session=other&offset=7"] {
        let mut ws = open(&hub, &id, query).await;
        match frame(&mut ws).await {
            Frame::Event(e) => assert_eq!(e["type"], "error", "{query}: {e}"),
            other => panic!("{query}: {other:?}"),
        }
    }

    // Once its process exits, the name starts a new session.
    a.type_text("exit 4\n").await;
    assert!(!a.read_until(|_| false).await);
    let mut c = Client::connect(&hub, &id, "session=main").await;
    c.type_text("echo three-$((1+2))\n").await;
    assert!(c.read_until(|s| s.contains("three-3")).await);
    assert!(!c.seen.windows(5).any(|w| w == b"two-4"), "a fresh session");
}
