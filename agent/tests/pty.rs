//! Terminal sessions on real PTYs: replay, truncation, screens, exit codes, slow clients.

use agent::pty::{Event, PtyError, Sessions, Size, SpawnSpec};
use std::time::Duration;

fn spec(cmd: &str) -> SpawnSpec {
    SpawnSpec {
        command: vec!["/bin/sh".into(), "-c".into(), cmd.into()],
        env: vec![],
        unset: vec![],
        cwd: None,
        size: Size::new(80, 24).unwrap(),
    }
}

/// Reads events until exit; returns (concatenated output, events other than output, code).
/// Checks that output offsets are contiguous from the attach offset (or from the offset a
/// screen snapshot says output resumes at).
async fn drain(att: &mut agent::pty::Attachment) -> (Vec<u8>, Vec<Event>, Option<i32>) {
    let mut out = Vec::new();
    let mut other = Vec::new();
    let mut code = None;
    let mut next = att.offset();
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(60), att.next())
        .await
        .expect("session stalled")
    {
        match ev {
            Event::Output { offset, bytes } => {
                assert_eq!(Some(offset), next, "offsets are contiguous");
                next = Some(offset + bytes.len() as u64);
                out.extend(bytes);
            }
            Event::Screen { offset, .. } => {
                next = Some(offset);
                other.push(ev);
            }
            Event::Exit { code: c } => code = Some(c),
            e => other.push(e),
        }
    }
    (out, other, code)
}

#[tokio::test]
async fn output_made_while_detached_is_replayed_exactly_once_and_in_order() {
    let sessions = Sessions::new(4 << 20);
    // About 1.9 MiB of numbered lines, then a pause so the session is still there.
    let s = sessions.create(&spec("seq 1 250000")).unwrap();
    let mut live = s.attach(Some(0));
    let (seen_live, other, code) = drain(&mut live).await;
    assert!(other.is_empty(), "{other:?}");
    assert_eq!(code, Some(0));
    assert!(seen_live.len() >= 1 << 20, "{} bytes", seen_live.len());
    let expected: String = (1..=250000).map(|i| format!("{i}\r\n")).collect();
    assert_eq!(
        seen_live,
        expected.as_bytes(),
        "the PTY stream is the program's output"
    );

    // A client that was away for all of it gets the same bytes, once.
    let mut late = s.attach(Some(0));
    let (replayed, other, code) = drain(&mut late).await;
    assert!(other.is_empty());
    assert_eq!(code, Some(0));
    assert_eq!(replayed, seen_live);

    // A client that saw part of it gets exactly the rest.
    let cut = 777_777u64;
    let mut partial = s.attach(Some(cut));
    let mut rest = Vec::new();
    while let Some(ev) = partial.next().await {
        if let Event::Output { offset, bytes } = ev {
            assert_eq!(offset, cut + rest.len() as u64);
            rest.extend(bytes);
        }
    }
    assert_eq!(rest, &seen_live[cut as usize..]);
}

#[tokio::test]
async fn truncation_is_reported_then_the_screen_then_the_rest() {
    let sessions = Sessions::new(64 * 1024);
    let s = sessions
        .create(&spec("seq 1 200000; printf 'the end'"))
        .unwrap();
    while s.exit_code().is_none() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut att = s.attach(Some(0));
    let first = att.next().await.unwrap();
    let end = s.end_offset();
    assert_eq!(
        first,
        Event::Truncated {
            requested: 0,
            resumed_at: end
        }
    );
    match att.next().await.unwrap() {
        Event::Screen { offset, bytes } => {
            assert_eq!(offset, end);
            let text = String::from_utf8_lossy(&bytes);
            assert!(
                text.contains("200000") && text.contains("the end"),
                "{text}"
            );
        }
        other => panic!("expected the screen, got {other:?}"),
    }
    assert_eq!(att.next().await, Some(Event::Exit { code: 0 }));
    assert_eq!(att.next().await, None);
}

#[tokio::test]
async fn exit_status_reaches_every_client() {
    let sessions = Sessions::default();
    let s = sessions.create(&spec("sleep 0.2; exit 7")).unwrap();
    let mut a = s.attach(None);
    let mut b = s.attach(Some(0));
    let (_, _, code_a) = drain(&mut a).await;
    let (_, _, code_b) = drain(&mut b).await;
    assert_eq!((code_a, code_b), (Some(7), Some(7)));
    assert!(matches!(
        s.write_input(b"x"),
        Err(PtyError::Exited { code: 7 })
    ));
}

#[tokio::test]
async fn a_fresh_client_gets_the_full_screen_program_as_it_is() {
    let sessions = Sessions::default();
    // Alternate screen, cleared, text at row 5 column 10, then keep running.
    let s = sessions
        .create(&spec(
            "printf '\\033[?1049h\\033[2J\\033[5;10Hhello vim'; sleep 30",
        ))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut att = s.attach(None);
    let Some(Event::Screen { bytes, offset }) = att.next().await else {
        panic!("a fresh client starts with the screen");
    };
    assert_eq!(offset, s.end_offset());
    // Replaying the snapshot into a blank terminal reproduces the screen.
    let nz = |n: u16| std::num::NonZeroU16::new(n).unwrap();
    let mut term = vt100::Parser::new(nz(24), nz(80), 0);
    term.process(&bytes);
    assert!(term.screen().alternate_screen());
    assert_eq!(term.screen().cell(4, 9).unwrap().contents(), "h");
    assert!(term.screen().contents().contains("hello vim"));
    sessions.close(&s.id).unwrap();
}

#[tokio::test]
async fn input_reaches_the_process_and_several_clients_see_it() {
    let sessions = Sessions::default();
    let s = sessions.create(&spec("cat")).unwrap();
    let mut a = s.attach(Some(0));
    let mut b = s.attach(Some(0));
    let input = s.clone();
    tokio::task::spawn_blocking(move || input.write_input(b"typed by a\n"))
        .await
        .unwrap()
        .unwrap();
    for att in [&mut a, &mut b] {
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains("typed by a\r\ntyped by a") {
            match tokio::time::timeout(Duration::from_secs(10), att.next())
                .await
                .unwrap()
            {
                Some(Event::Output { bytes, .. }) => seen.extend(bytes),
                other => panic!("{other:?}"),
            }
        }
    }
    s.resize(Size::new(120, 40).unwrap()).unwrap();
    assert_eq!(s.size(), Size::new(120, 40).unwrap());
    sessions.close(&s.id).unwrap();
    assert!(matches!(sessions.get(&s.id), Err(PtyError::NoSuchSession)));
}

#[tokio::test]
async fn a_stalled_client_blocks_neither_the_process_nor_other_clients() {
    let sessions = Sessions::new(256 * 1024);
    let s = sessions.create(&spec("seq 1 1000000")).unwrap();
    let mut stalled = s.attach(Some(0)); // never read until the end
    let mut reader = s.attach(Some(0));
    let (_, other, code) = drain(&mut reader).await;
    assert_eq!(
        code,
        Some(0),
        "the process finished while a client was stalled"
    );
    assert!(
        other
            .iter()
            .all(|e| matches!(e, Event::Truncated { .. } | Event::Screen { .. }))
    );
    // The stalled client learns that it fell behind, never silently.
    assert!(matches!(
        stalled.next().await,
        Some(Event::Truncated { requested: 0, .. })
    ));
}

#[test]
fn bad_sizes_and_unknown_sessions_are_refused() {
    assert!(matches!(Size::new(0, 0), Err(PtyError::BadSize { .. })));
    assert!(matches!(
        Size::new(65535, 65535),
        Err(PtyError::BadSize { .. })
    ));
    assert!(Size::new(1, 1).is_ok());
    let sessions = Sessions::default();
    assert!(matches!(sessions.get("nope"), Err(PtyError::NoSuchSession)));
    assert!(matches!(
        sessions.close("nope"),
        Err(PtyError::NoSuchSession)
    ));
}

#[tokio::test]
async fn sessions_are_listed_until_closed() {
    let sessions = Sessions::default();
    let a = sessions.create(&spec("sleep 30")).unwrap();
    let b = sessions.create(&spec("exit 3")).unwrap();
    while b.exit_code().is_none() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let list = sessions.list();
    assert_eq!(list.len(), 2);
    let info_b = list.iter().find(|i| i.id == b.id).unwrap();
    assert_eq!(info_b.exit, Some(3));
    assert_eq!(list.iter().find(|i| i.id == a.id).unwrap().exit, None);
    sessions.close(&a.id).unwrap();
    assert_eq!(sessions.list().len(), 1);
}

#[tokio::test]
async fn sessions_run_as_the_workspace_user_when_the_agent_is_root() {
    let sessions = Sessions::with_policy(1 << 20, Some("nobody".into()), Duration::from_secs(60));
    let s = sessions.create(&spec("id -un")).unwrap();
    let mut att = s.attach(Some(0));
    let (out, _, code) = drain(&mut att).await;
    let who = String::from_utf8_lossy(&out).trim().to_owned();
    if rustix::process::geteuid().is_root() {
        assert_eq!((who.as_str(), code), ("nobody", Some(0)));
    } else {
        // Without root there is nobody to switch to: the agent's own user runs it.
        assert_eq!(code, Some(0));
        assert_ne!(who, "nobody");
    }
}

#[tokio::test]
async fn detached_sessions_end_after_their_ttl_and_attached_ones_do_not() {
    let sessions = Sessions::with_policy(1 << 20, None, Duration::from_secs(3600));
    let detached = sessions.create(&spec("sleep 300")).unwrap();
    let watched = sessions.create(&spec("sleep 300")).unwrap();
    let _client = watched.attach(None);
    let now = std::time::Instant::now();
    assert_eq!(sessions.reap(now), 0, "nothing is old yet");
    assert_eq!(sessions.reap(now + Duration::from_secs(3601)), 1);
    assert!(matches!(
        sessions.get(&detached.id),
        Err(PtyError::NoSuchSession)
    ));
    assert!(
        sessions.get(&watched.id).is_ok(),
        "a session with a client stays"
    );
    // The reaped session's process is ended.
    for _ in 0..100 {
        if detached.exit_code().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(detached.exit_code().is_some());
}
