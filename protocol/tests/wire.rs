//! Property tests for the wire: round-trips hold; hostile bytes give typed errors, never a
//! panic or an unbounded allocation.

use proptest::prelude::*;
use protocol::control::{
    ControlMsg, Hello, HelloRefusal, HelloRefused, Ping, Pong, PortClosed, PortInfo, PortSource,
    Ports, Welcome,
};
use protocol::enroll::{EnrollMsg, EnrollRefusal, EnrollRefused, EnrollRequest, Issued};
use protocol::pty::{
    PtyClose, PtyError, PtyErrorCode, PtyExit, PtyInput, PtyList, PtyMsg, PtyOpenRequest,
    PtyOutput, PtyResize, PtyScreen, PtyTruncated,
};
use protocol::stream::{
    Accepted, ControlOpen, EnrollOpen, PtyOpen, StreamHeader, StreamRefusal, StreamRefused,
    StreamReply, SyncOpen, TcpForwardOpen,
};
use protocol::{FrameDecoder, MAX_FRAME_LEN, Message, ProtocolError, encode_frame};

fn control_msg() -> impl Strategy<Value = ControlMsg> {
    prop_oneof![
        (any::<u16>(), ".{0,40}", ".{0,40}").prop_map(|(v, a, h)| ControlMsg::Hello(Hello {
            protocol_version: v,
            agent_version: a,
            hostname: h,
        })),
        (any::<u16>(), ".{0,40}", any::<u32>(), any::<u32>()).prop_map(|(v, h, i, t)| {
            ControlMsg::Welcome(Welcome {
                protocol_version: v,
                hub_version: h,
                heartbeat_interval_ms: i,
                heartbeat_timeout_ms: t,
            })
        }),
        (
            prop_oneof![
                Just(HelloRefusal::VersionTooOld),
                Just(HelloRefusal::VersionTooNew),
                Just(HelloRefusal::UnknownAgent)
            ],
            ".{0,40}",
            any::<u16>(),
            any::<u16>()
        )
            .prop_map(|(reason, message, min_version, max_version)| {
                ControlMsg::HelloRefused(HelloRefused {
                    reason,
                    message,
                    min_version,
                    max_version,
                })
            }),
        any::<u64>().prop_map(|seq| ControlMsg::Ping(Ping { seq })),
        any::<u64>().prop_map(|seq| ControlMsg::Pong(Pong { seq })),
        port_info().prop_map(ControlMsg::PortOpened),
        any::<u16>().prop_map(|port| ControlMsg::PortClosed(PortClosed { port })),
        any::<u64>().prop_map(|drain_ms| ControlMsg::Move(protocol::control::Move { drain_ms })),
        (any::<bool>(), prop::collection::vec(port_info(), 0..8)).prop_map(|(netlink, ports)| {
            ControlMsg::Ports(Ports {
                source: if netlink {
                    PortSource::SockDiag
                } else {
                    PortSource::ProcNet
                },
                ports,
            })
        }),
    ]
}

fn port_info() -> impl Strategy<Value = PortInfo> {
    (
        any::<u16>(),
        prop::collection::vec("[0-9a-f:.]{1,39}", 0..3),
        any::<bool>(),
        proptest::option::of(any::<u32>()),
        ".{0,15}",
        ".{0,60}",
        proptest::option::of(any::<bool>()),
    )
        .prop_map(
            |(port, addresses, loopback_only, pid, process, command, http)| PortInfo {
                port,
                addresses,
                loopback_only,
                pid,
                process,
                command,
                http,
            },
        )
}

fn enroll_msg() -> impl Strategy<Value = EnrollMsg> {
    prop_oneof![
        (
            any::<u16>(),
            ".{0,20}",
            "[a-zA-Z0-9_-]{0,64}",
            prop::collection::vec(any::<u8>(), 0..512)
        )
            .prop_map(|(v, a, token, csr_der)| EnrollMsg::Request(EnrollRequest {
                protocol_version: v,
                agent_version: a,
                token,
                csr_der,
            })),
        (".{0,40}", prop::collection::vec(any::<u8>(), 0..1024)).prop_map(
            |(workspace_id, cert_der)| EnrollMsg::Issued(Issued {
                workspace_id,
                cert_der
            })
        ),
        (
            prop_oneof![
                Just(EnrollRefusal::UnknownToken),
                Just(EnrollRefusal::TokenUsed),
                Just(EnrollRefusal::TokenExpired),
                Just(EnrollRefusal::BadRequest),
                Just(EnrollRefusal::VersionUnsupported),
                Just(EnrollRefusal::Unavailable)
            ],
            ".{0,40}"
        )
            .prop_map(|(reason, message)| EnrollMsg::Refused(EnrollRefused { reason, message })),
    ]
}

fn header() -> impl Strategy<Value = StreamHeader> {
    prop_oneof![
        Just(StreamHeader::Control(ControlOpen {})),
        Just(StreamHeader::Enroll(EnrollOpen {})),
        Just(StreamHeader::Pty(PtyOpen {})),
        any::<u16>().prop_map(|port| StreamHeader::TcpForward(TcpForwardOpen { port })),
        ".{0,60}".prop_map(|root| StreamHeader::Sync(SyncOpen { root })),
        "[a-f0-9-]{0,36}".prop_map(|workspace_id| StreamHeader::ClientPty(
            protocol::stream::ClientPtyOpen { workspace_id }
        )),
        ("[a-f0-9-]{0,36}", any::<i64>()).prop_map(|(workspace_id, epoch)| {
            StreamHeader::PeerAgent(protocol::stream::PeerAgentOpen {
                workspace_id,
                epoch,
            })
        }),
        Just(StreamHeader::PeerEvents(
            protocol::stream::PeerEventsOpen {}
        )),
        proptest::collection::vec("[a-f0-9-]{0,36}", 0..4).prop_map(|workspace_ids| {
            StreamHeader::PeerAgentViews(protocol::stream::PeerAgentViewsOpen { workspace_ids })
        }),
        (any::<u16>(), proptest::option::of(resume())).prop_map(|(port, resume)| {
            StreamHeader::Forward(protocol::stream::ForwardOpen { port, resume })
        }),
        (
            "[a-f0-9-]{0,36}",
            any::<u16>(),
            proptest::option::of(resume())
        )
            .prop_map(|(workspace_id, port, resume)| {
                StreamHeader::ClientForward(protocol::stream::ClientForwardOpen {
                    workspace_id,
                    port,
                    resume,
                })
            }),
    ]
}

fn resume() -> impl Strategy<Value = protocol::forward::Resume> {
    (any::<[u8; 16]>(), any::<u64>()).prop_map(|(token, received)| protocol::forward::Resume {
        token: protocol::forward::ForwardToken(token),
        received,
    })
}

fn pty_msg() -> impl Strategy<Value = PtyMsg> {
    let bytes = || prop::collection::vec(any::<u8>(), 0..512);
    prop_oneof![
        (
            proptest::option::of("[a-z0-9]{0,20}"),
            proptest::option::of(any::<u64>()),
            prop::collection::vec(".{0,10}", 0..4),
            any::<u16>(),
            any::<u16>()
        )
            .prop_map(|(session, offset, command, cols, rows)| PtyMsg::Open(
                PtyOpenRequest {
                    session,
                    offset,
                    command,
                    env: vec![("K".into(), "V".into())],
                    cwd: None,
                    cols,
                    rows,
                }
            )),
        bytes().prop_map(|bytes| PtyMsg::Input(PtyInput { bytes })),
        (any::<u64>(), bytes())
            .prop_map(|(offset, bytes)| PtyMsg::Output(PtyOutput { offset, bytes })),
        (any::<u64>(), bytes(), any::<bool>()).prop_map(|(offset, bytes, more)| PtyMsg::Screen(
            PtyScreen {
                offset,
                bytes,
                more
            }
        )),
        (any::<u16>(), any::<u16>())
            .prop_map(|(cols, rows)| PtyMsg::Resize(PtyResize { cols, rows })),
        (any::<u64>(), any::<u64>()).prop_map(|(requested, resumed_at)| PtyMsg::Truncated(
            PtyTruncated {
                requested,
                resumed_at
            }
        )),
        any::<i32>().prop_map(|code| PtyMsg::Exit(PtyExit { code })),
        ".{0,30}".prop_map(|message| PtyMsg::Error(PtyError {
            code: PtyErrorCode::NoSuchSession,
            message
        })),
        Just(PtyMsg::Close(PtyClose {})),
        Just(PtyMsg::List(PtyList {})),
    ]
}

fn reply() -> impl Strategy<Value = StreamReply> {
    prop_oneof![
        Just(StreamReply::Accepted(Accepted {})),
        (
            prop_oneof![
                Just(StreamRefusal::Unsupported),
                Just(StreamRefusal::Unauthorized),
                Just(StreamRefusal::BadHeader),
                Just(StreamRefusal::Unavailable),
                Just(StreamRefusal::Moved),
                Just(StreamRefusal::Gone)
            ],
            ".{0,40}"
        )
            .prop_map(|(reason, message)| StreamReply::Refused(StreamRefused { reason, message })),
        resume().prop_map(|r| StreamReply::Forwarding(protocol::stream::Forwarding {
            token: r.token,
            received: r.received
        })),
    ]
}

/// Feeds `bytes` to a decoder in chunks of `chunk` and collects what comes out.
fn decode_chunked<M: Message>(bytes: &[u8], chunk: usize) -> Result<Vec<M>, ProtocolError> {
    let mut dec = FrameDecoder::default();
    let mut out = Vec::new();
    for part in bytes.chunks(chunk.max(1)) {
        dec.push(part);
        while let Some(m) = dec.decode::<M>()? {
            out.push(m);
        }
    }
    dec.finish()?;
    Ok(out)
}

fn round_trip<M: Message + PartialEq + std::fmt::Debug + Clone>(msgs: Vec<M>, chunk: usize) {
    let mut bytes = Vec::new();
    for m in &msgs {
        bytes.extend(encode_frame(m).expect("encode"));
    }
    let back: Vec<M> = decode_chunked(&bytes, chunk).expect("decode");
    assert_eq!(back, msgs);
}

proptest! {
    #[test]
    fn control_round_trips(msgs in prop::collection::vec(control_msg(), 0..8), chunk in 1usize..64) {
        round_trip(msgs, chunk);
    }

    #[test]
    fn enroll_round_trips(msgs in prop::collection::vec(enroll_msg(), 0..4), chunk in 1usize..300) {
        round_trip(msgs, chunk);
    }

    #[test]
    fn pty_round_trips(msgs in prop::collection::vec(pty_msg(), 0..8), chunk in 1usize..700) {
        round_trip(msgs, chunk);
    }

    #[test]
    fn headers_and_replies_round_trip(h in prop::collection::vec(header(), 0..8), r in prop::collection::vec(reply(), 0..8), chunk in 1usize..64) {
        round_trip(h, chunk);
        round_trip(r, chunk);
    }

    /// Arbitrary bytes never panic: each outcome is a message, "need more", or a typed error.
    #[test]
    fn arbitrary_bytes_give_typed_errors(bytes in prop::collection::vec(any::<u8>(), 0..2048), chunk in 1usize..128) {
        let _ = decode_chunked::<ControlMsg>(&bytes, chunk);
        let _ = decode_chunked::<EnrollMsg>(&bytes, chunk);
        let _ = decode_chunked::<StreamHeader>(&bytes, chunk);
        let _ = ControlMsg::from_payload(&bytes);
        let _ = EnrollMsg::from_payload(&bytes);
        let _ = StreamHeader::from_payload(&bytes);
        let _ = decode_chunked::<PtyMsg>(&bytes, chunk);
    }

    /// Any strict prefix of a valid stream of frames ends in `Truncated` (or nothing at all).
    #[test]
    fn truncated_frames_are_reported(msgs in prop::collection::vec(control_msg(), 1..4), cut in any::<prop::sample::Index>()) {
        let mut bytes = Vec::new();
        for m in &msgs {
            bytes.extend(encode_frame(m).unwrap());
        }
        let cut = cut.index(bytes.len());
        match decode_chunked::<ControlMsg>(&bytes[..cut], 7) {
            Ok(got) => prop_assert!(got.len() < msgs.len() || cut == bytes.len()),
            Err(ProtocolError::Truncated { buffered }) => prop_assert!(buffered > 0),
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }

    /// A length prefix beyond the limit is refused on sight, before any payload arrives.
    #[test]
    fn oversized_length_prefix_is_refused_without_allocating(len in (MAX_FRAME_LEN as u32 + 1)..=u32::MAX) {
        let mut dec = FrameDecoder::default();
        dec.push(&len.to_be_bytes());
        match dec.next_payload() {
            Err(ProtocolError::FrameTooLarge { len: got, max }) => {
                prop_assert_eq!(got, len as u64);
                prop_assert_eq!(max, MAX_FRAME_LEN);
            }
            other => prop_assert!(false, "expected FrameTooLarge, got {:?}", other.map(|p| p.map(<[u8]>::len))),
        }
        prop_assert_eq!(dec.buffered(), 4);
    }

    /// Known tags with garbage bodies, and unknown tags, are typed errors.
    #[test]
    fn bad_bodies_and_unknown_tags(tag in any::<u16>(), body in prop::collection::vec(any::<u8>(), 0..64)) {
        let mut payload = postcard::to_allocvec(&tag).unwrap();
        payload.extend(&body);
        match ControlMsg::from_payload(&payload) {
            Ok(m) => prop_assert!(ControlMsg::TAGS.contains(&m.tag())),
            Err(ProtocolError::UnknownTag { tag: t }) => {
                prop_assert_eq!(t, tag);
                prop_assert!(!ControlMsg::TAGS.contains(&tag));
            }
            Err(ProtocolError::Malformed(_)) => prop_assert!(ControlMsg::TAGS.contains(&tag)),
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }
}

#[test]
fn gigabyte_prefix_is_refused() {
    let mut dec = FrameDecoder::default();
    dec.push(&(3u32 << 30).to_be_bytes());
    dec.push(&[0u8; 16]);
    assert!(matches!(
        dec.decode::<ControlMsg>(),
        Err(ProtocolError::FrameTooLarge { len, .. }) if len == 3 << 30
    ));
}

#[test]
fn empty_frame_is_an_error() {
    let mut dec = FrameDecoder::default();
    dec.push(&0u32.to_be_bytes());
    assert_eq!(dec.decode::<ControlMsg>(), Err(ProtocolError::EmptyFrame));
}

#[test]
fn encoding_refuses_frames_over_the_limit() {
    let big = EnrollMsg::Issued(Issued {
        workspace_id: String::new(),
        cert_der: vec![0; MAX_FRAME_LEN + 1],
    });
    assert!(matches!(
        encode_frame(&big),
        Err(ProtocolError::FrameTooLarge { .. })
    ));
}

/// Tags are part of the wire contract: changing one breaks every deployed agent.
#[test]
fn tags_are_stable() {
    assert_eq!(
        ControlMsg::TAGS,
        &[
            1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21
        ]
    );
    assert_eq!(protocol::direct::DirectMsg::TAGS, &[1, 2]);
    assert_eq!(EnrollMsg::TAGS, &[1, 2, 3]);
    assert_eq!(
        StreamHeader::TAGS,
        &[
            1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19
        ]
    );
    assert_eq!(protocol::peer::PeerMsg::TAGS, &[1, 2, 3]);
    assert_eq!(protocol::exec::ExecMsg::TAGS, &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
    assert_eq!(protocol::files::FileMsg::TAGS, &[1, 2, 3, 4]);
    assert_eq!(
        protocol::sync::SyncMsg::TAGS,
        &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    );
    assert_eq!(protocol::client::ClientMsg::TAGS, &[1, 2, 3]);
    assert_eq!(StreamReply::TAGS, &[1, 2, 3]);
    assert_eq!(PtyMsg::TAGS, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    let ping = encode_frame(&ControlMsg::Ping(Ping { seq: 7 })).unwrap();
    assert_eq!(ping, vec![0, 0, 0, 2, 4, 7]);
}

#[test]
fn take_buffered_hands_over_undecoded_bytes() {
    let mut dec = FrameDecoder::default();
    let mut bytes = encode_frame(&ControlMsg::Ping(Ping { seq: 1 })).unwrap();
    bytes.extend(encode_frame(&ControlMsg::Pong(Pong { seq: 2 })).unwrap());
    bytes.extend([9, 9]);
    dec.push(&bytes);
    assert_eq!(
        dec.decode::<ControlMsg>().unwrap(),
        Some(ControlMsg::Ping(Ping { seq: 1 }))
    );
    let rest = dec.take_buffered();
    assert_eq!(rest.len(), bytes.len() - 6);
    assert_eq!(dec.buffered(), 0);
}

#[test]
fn token_never_shows_in_debug_output() {
    let req = EnrollRequest {
        protocol_version: 1,
        agent_version: "x".into(),
        token: "s3cr3t-token".into(),
        csr_der: vec![1, 2, 3],
    };
    let shown = format!("{:?}", EnrollMsg::Request(req));
    assert!(!shown.contains("s3cr3t"), "{shown}");
}
