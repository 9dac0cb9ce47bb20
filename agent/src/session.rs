//! One connection to the hub: the control stream (hello, heartbeats) and the streams the
//! hub opens, until the link is lost or the agent shuts down.

use crate::direct::{Direct, purpose_of};
use crate::identity::connect;
use crate::{Agent, AgentError, AgentEvent};
use link::{FramedRecv, LinkError, send_msg};
use protocol::close::CloseCode;
use protocol::control::{Activity, ControlMsg, Hello, HelloRefusal};
use protocol::direct::Credential;
use protocol::liveness::Liveness;
use protocol::stream::{ControlOpen, StreamHeader, StreamRefusal, StreamRefused, StreamReply};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How a session ended.
#[derive(Debug)]
pub enum End {
    Shutdown,
    /// The hub asked the agent to connect again (it is leaving); the old connection stays
    /// open for its streams.
    Moving,
    Fatal(AgentError),
    /// The link went away; `was_up` says whether the hello had been accepted.
    Lost {
        reason: String,
        was_up: bool,
    },
    /// The hub refused the connection at once (a replica that is leaving).
    Refused(String),
    /// An agent update is installed at `path`: restart into it.
    Update {
        path: std::path::PathBuf,
        version: String,
    },
}

fn lost(reason: impl ToString, was_up: bool) -> End {
    End::Lost {
        reason: reason.to_string(),
        was_up,
    }
}

/// Maps the hub's close of the connection to what the agent does next.
fn closed(err: &quinn::ConnectionError, was_up: bool) -> End {
    if let quinn::ConnectionError::ApplicationClosed(close) = err {
        let reason = String::from_utf8_lossy(&close.reason).into_owned();
        if CloseCode::from_code(close.error_code.into_inner()) == Some(CloseCode::Unauthorized) {
            return End::Fatal(AgentError::Revoked(reason));
        }
        return lost(format!("closed by hub: {reason}"), was_up);
    }
    lost(err, was_up)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// Connects, says hello, and serves the connection until it ends.
pub async fn connect_and_serve(
    agent: &Agent,
    client: &quinn::ClientConfig,
    direct: Option<&Arc<Direct>>,
    shutdown: &CancellationToken,
) -> End {
    let endpoint = agent.endpoint();
    let conn = tokio::select! {
        conn = connect(&agent.config, &endpoint, client.clone()) => match conn {
            Ok(conn) => conn,
            Err(e) if e.refused => return End::Refused(e.message),
            Err(e) => return lost(e, false),
        },
        _ = shutdown.cancelled() => return End::Shutdown,
    };
    let streams = TaskTracker::new();
    let services = Services {
        sessions: agent.sessions.clone(),
        forwards: agent.forwards.clone(),
        sync: agent.sync.clone(),
        run_as: agent.config.run_as.clone(),
        setup: agent.setup.clone(),
        direct: direct.map(|d| (d.clone(), endpoint.clone(), conn.remote_address())),
        updates: agent.updates.clone(),
    };
    // Direct clients, on the same socket, while this session lasts (each connection then
    // lives until its client goes).
    let accepting = direct.map(|d| {
        endpoint.set_server_config(Some(d.server_config()));
        let only_clients = Services {
            direct: None,
            updates: None,
            ..services.clone()
        };
        tokio::spawn(d.clone().accept(endpoint.clone(), only_clients))
    });
    let end = serve(agent, &conn, &streams, &services, shutdown).await;
    if let Some(task) = accepting {
        task.abort();
    }
    if let Some(updates) = &agent.updates {
        // An offer is made again on the next connection.
        updates.forget_offer();
    }
    match end {
        End::Shutdown => conn.close(
            quinn::VarInt::from_u32(CloseCode::Normal.code()),
            b"agent shutting down",
        ),
        End::Update { .. } => conn.close(
            quinn::VarInt::from_u32(CloseCode::Normal.code()),
            b"agent restarting into an update",
        ),
        // The streams the leaving hub opened finish here (they hold their own ends of
        // the connection); then the agent closes it. The hub closes it first if its
        // drain time runs out; a shutdown ends it at once.
        End::Moving => {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                streams.close();
                let close = |why: &'static [u8]| {
                    conn.close(quinn::VarInt::from_u32(CloseCode::Normal.code()), why)
                };
                loop {
                    tokio::select! {
                        // One the hub opened just before it asked the agent to move.
                        stream = conn.accept_bi() => match stream {
                            Ok((send, recv)) => {
                                streams.spawn(serve_stream(services.clone(), None, send, recv));
                            }
                            Err(_) => break,
                        },
                        _ = streams.wait() => break close(b"moved"),
                        _ = shutdown.cancelled() => break close(b"agent shutting down"),
                    }
                }
                // The old socket lives until its connection has said goodbye.
                let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
            });
        }
        _ => {}
    }
    end
}

async fn serve(
    agent: &Agent,
    conn: &quinn::Connection,
    streams: &TaskTracker,
    services: &Services,
    shutdown: &CancellationToken,
) -> End {
    let (mut send, mut recv) = match hello(conn).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(end)) => return end,
        Err(LinkError::Connection(e)) => return closed(&e, false),
        Err(e) => return lost(e, false),
    };
    let welcome = match recv.expect::<ControlMsg>().await {
        Ok(ControlMsg::Welcome(w)) => w,
        Ok(ControlMsg::HelloRefused(r)) => {
            tracing::error!(reason = ?r.reason, message = %r.message, "hub refused hello");
            return match r.reason {
                HelloRefusal::UnknownAgent => End::Fatal(AgentError::Revoked(r.message)),
                _ => lost(format!("hello refused: {}", r.message), false),
            };
        }
        Ok(_) => return lost("unexpected reply to hello", false),
        Err(LinkError::Connection(e)) => return closed(&e, false),
        Err(e) => return lost(e, false),
    };
    tracing::info!(hub_version = %welcome.hub_version, protocol = welcome.protocol_version, agent_version = %crate::update::version(), "connected to hub");
    agent.emit(AgentEvent::Connected);
    // An update on probation has come up.
    let updates = agent
        .updates
        .clone()
        .filter(|_| welcome.protocol_version >= protocol::UPDATE_SINCE_VERSION);
    if let Some(u) = &agent.updates {
        u.confirm();
    }
    // Whether the hub has heard that a taken offer waits for streams to end.
    let mut said_waiting = false;

    let interval = Duration::from_millis(welcome.heartbeat_interval_ms.max(100) as u64);
    let timeout = Duration::from_millis(welcome.heartbeat_timeout_ms.max(300) as u64);
    let mut live = Liveness::new(Instant::now(), interval, timeout);
    let mut activity = (welcome.protocol_version >= protocol::ACTIVITY_SINCE_VERSION)
        .then(ActivityReports::default);
    let mut activity_tick = tokio::time::interval(ACTIVITY_POLL);
    // Port reports: a full list first, then differences (protocol 3+).
    let mut ports = agent
        .ports
        .clone()
        .filter(|_| welcome.protocol_version >= protocol::PORTS_SINCE_VERSION);
    if let Some(p) = ports.as_mut() {
        p.mark_changed();
    }
    let mut ports_sent: Option<crate::ports::PortTable> = None;
    // Direct clients, for the hub to show (protocol 5+).
    let mut direct_clients = services
        .direct
        .as_ref()
        .filter(|_| welcome.protocol_version >= protocol::DIRECT_SINCE_VERSION)
        .map(|(direct, ..)| (direct.clone(), direct.clients_changed()));
    let mut checkout = agent.checkout.subscribe();
    // The hub learns the checkout's state again after every reconnect.
    checkout.mark_changed();
    // And the setup's (protocol 7+), once there is something to tell.
    let mut setup = (welcome.protocol_version >= protocol::SETUP_SINCE_VERSION)
        .then(|| agent.setup.subscribe());
    if let Some(setup) = setup.as_mut()
        && *setup.borrow() != protocol::control::SetupReport::default()
    {
        setup.mark_changed();
    }
    // File-sync sessions (protocol 8+): looked at with the activity, sent when they change
    // (the first look after a connect always sends, an empty list included).
    let mut sync_sent = (welcome.protocol_version >= protocol::SYNC_STATUS_SINCE_VERSION)
        .then_some(None::<protocol::control::SyncSessions>);
    // What the agent costs its machine (protocol 8+): at the first look, then every 10 s.
    let stats_every = protocol::control::AGENT_STATS_INTERVAL_SECS as u32;
    let mut stats_due =
        (welcome.protocol_version >= protocol::SYNC_STATUS_SINCE_VERSION).then_some(0u32);
    loop {
        let deadline = tokio::time::Instant::from_std(live.next_deadline());
        tokio::select! {
            msg = recv.next::<ControlMsg>() => {
                let now = Instant::now();
                match msg {
                    Ok(Some(ControlMsg::Ping(ping))) => {
                        let pong = live.on_ping(now, ping);
                        if let Err(e) = send_msg(&mut send, &ControlMsg::Pong(pong)).await {
                            return lost(e, true);
                        }
                        live.on_sent(now);
                    }
                    Ok(Some(ControlMsg::Pong(_))) => live.on_heard(now),
                    Ok(Some(ControlMsg::Observed(seen))) => {
                        if let Some((direct, ..)) = &services.direct {
                            direct.observed(&seen.addr);
                        }
                    }
                    Ok(Some(ControlMsg::Move(moving))) => {
                        tracing::info!(drain_ms = moving.drain_ms, "hub asks to move");
                        return End::Moving;
                    }
                    Ok(Some(ControlMsg::Profile(profile))) => {
                        live.on_heard(now);
                        agent.setup.profile(profile);
                    }
                    Ok(Some(ControlMsg::UpdateOffer(offer))) => {
                        live.on_heard(now);
                        said_waiting = false;
                        let taken = match &updates {
                            Some(u) => u.consider(&offer),
                            None => Err(crate::update::no_keys(&offer.version)),
                        };
                        if let Err(status) = taken {
                            tracing::info!(version = %offer.version, why = %status.message, "agent update offer not taken");
                            if let Err(e) = send_msg(&mut send, &ControlMsg::UpdateStatus(status)).await {
                                return lost(e, true);
                            }
                        }
                    }
                    Ok(Some(ControlMsg::Checkout(request))) => {
                        live.on_heard(now);
                        let run_as = agent.config.run_as.clone();
                        let workdir = crate::checkout::workdir(run_as.as_deref());
                        tokio::spawn(crate::checkout::run(request, workdir, run_as, agent.checkout.clone()));
                    }
                    Ok(Some(_)) => {
                        conn.close(quinn::VarInt::from_u32(CloseCode::ProtocolError.code()), b"unexpected control message");
                        return lost("hub sent an unexpected control message", true);
                    }
                    Ok(None) => return lost("hub closed the control stream", true),
                    Err(LinkError::Connection(e)) => return closed(&e, true),
                    Err(LinkError::Read(quinn::ReadError::ConnectionLost(e))) => return closed(&e, true),
                    Err(e) => return lost(e, true),
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                let now = Instant::now();
                if live.is_expired(now) {
                    conn.close(quinn::VarInt::from_u32(CloseCode::HeartbeatTimeout.code()), b"no heartbeat");
                    return lost("hub heartbeat timed out", true);
                }
                if let Some(ping) = live.poll_ping(now)
                    && let Err(e) = send_msg(&mut send, &ControlMsg::Ping(ping)).await
                {
                    return lost(e, true);
                }
            }
            _ = activity_tick.tick(), if activity.is_some() => {
                let (attached, last_input) = agent.sessions.activity();
                // Open forwards (previews, `wsh forward`) are use of the workspace too.
                let attached = attached + agent.forwards.open();
                let now = Instant::now();
                if let Some(report) = activity.as_mut().and_then(|a| a.poll(now, attached, last_input)) {
                    if let Err(e) = send_msg(&mut send, &ControlMsg::Activity(report)).await {
                        return lost(e, true);
                    }
                    live.on_sent(now);
                }
                // A taken offer is asked for once nothing a restart would cut is open.
                if let Some(u) = updates.as_ref().filter(|u| u.waiting()) {
                    let open = agent.forwards.open();
                    let msg = if open == 0 {
                        u.request().map(|version| ControlMsg::UpdateRequest(protocol::update::UpdateRequest { version }))
                    } else if !said_waiting {
                        said_waiting = true;
                        u.offered_version().map(|v| ControlMsg::UpdateStatus(crate::update::waiting(&v, open)))
                    } else {
                        None
                    };
                    if let Some(msg) = msg {
                        if let Err(e) = send_msg(&mut send, &msg).await {
                            return lost(e, true);
                        }
                        live.on_sent(now);
                    }
                }
                if let Some(due) = stats_due.as_mut() {
                    if *due == 0 {
                        let stats = own_stats(agent.sessions.count());
                        if let Err(e) = send_msg(&mut send, &ControlMsg::AgentStats(stats)).await {
                            return lost(e, true);
                        }
                        live.on_sent(now);
                    }
                    *due = (*due + 1) % stats_every;
                }
                if let Some(sent) = sync_sent.as_mut() {
                    let report = services.sync.sessions.report();
                    if sent.as_ref() != Some(&report) {
                        if let Err(e) = send_msg(&mut send, &ControlMsg::SyncSessions(report.clone())).await {
                            return lost(e, true);
                        }
                        *sent = Some(report);
                        live.on_sent(now);
                    }
                }
            }
            changed = async { direct_clients.as_mut()?.1.changed().await.ok() }, if direct_clients.is_some() => {
                let Some(()) = changed else {
                    direct_clients = None;
                    continue;
                };
                let report = direct_clients.as_ref().map(|(direct, _)| direct.clients_report());
                if let Some(report) = report {
                    if let Err(e) = send_msg(&mut send, &ControlMsg::DirectClients(report)).await {
                        return lost(e, true);
                    }
                    live.on_sent(Instant::now());
                }
            }
            changed = checkout.changed(), if activity.is_some() => {
                if changed.is_err() {
                    continue;
                }
                let current = checkout.borrow_and_update().clone();
                if let Some(status) = current {
                    if let Err(e) = send_msg(&mut send, &ControlMsg::CheckoutStatus(status)).await {
                        return lost(e, true);
                    }
                    live.on_sent(Instant::now());
                }
            }
            changed = async { setup.as_mut()?.changed().await.ok() }, if setup.is_some() => {
                let Some(()) = changed else {
                    setup = None;
                    continue;
                };
                let report = setup.as_mut().map(|s| s.borrow_and_update().clone());
                if let Some(report) = report {
                    if let Err(e) = send_msg(&mut send, &ControlMsg::Setup(report)).await {
                        return lost(e, true);
                    }
                    live.on_sent(Instant::now());
                }
            }
            changed = async { ports.as_mut()?.changed().await.ok() }, if ports.is_some() => {
                let Some(()) = changed else {
                    ports = None;
                    continue;
                };
                let now_table = ports.as_mut().map(|p| p.borrow_and_update().clone());
                if let Some(table) = now_table {
                    for report in crate::ports::reports(ports_sent.as_ref(), &table) {
                        if let Err(e) = send_msg(&mut send, &report).await {
                            return lost(e, true);
                        }
                    }
                    ports_sent = Some(table);
                    live.on_sent(Instant::now());
                }
            }
            stream = conn.accept_bi() => match stream {
                Ok((send, recv)) => {
                    streams.spawn(serve_stream(services.clone(), None, send, recv));
                }
                Err(e) => return closed(&e, true),
            },
            outcome = async { updates.as_ref().expect("guarded").outcome().await }, if updates.is_some() => {
                match outcome {
                    crate::update::Outcome::Status(status) => {
                        if let Err(e) = send_msg(&mut send, &ControlMsg::UpdateStatus(status)).await {
                            return lost(e, true);
                        }
                    }
                    crate::update::Outcome::Installed { path, version } => {
                        let _ = send_msg(&mut send, &ControlMsg::UpdateStatus(crate::update::restarting(&version))).await;
                        let _ = send.finish();
                        return End::Update { path, version };
                    }
                }
            }
            _ = shutdown.cancelled() => return End::Shutdown,
        }
    }
}

/// The agent process's resident memory and CPU time (from `/proc/self`), and `sessions`.
fn own_stats(sessions: usize) -> protocol::control::AgentStats {
    let page = rustix::param::page_size() as u64;
    let rss_bytes = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page);
    // Fields 14 and 15 of /proc/self/stat (utime, stime) in clock ticks; the command name
    // (field 2) may hold spaces, so count from the `)` that ends it.
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 1..];
            let mut fields = rest.split_whitespace().skip(11);
            Some(fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?)
        });
    let per_second = rustix::param::clock_ticks_per_second().max(1);
    protocol::control::AgentStats {
        rss_bytes,
        cpu_ms: ticks.map_or(0, |t| t * 1000 / per_second),
        sessions: u32::try_from(sessions).unwrap_or(u32::MAX),
    }
}

/// How often the agent looks at its sessions for activity to report.
const ACTIVITY_POLL: Duration = Duration::from_secs(1);
/// New input is reported at most this often (a change in attached clients at once).
const INPUT_REPORT_INTERVAL: Duration = Duration::from_secs(15);

/// Decides when an [`Activity`] report is due: at connect, when the number of attached
/// clients changes, and for new input at most every [`INPUT_REPORT_INTERVAL`].
#[derive(Debug, Default)]
struct ActivityReports {
    sent: Option<(Instant, usize, Option<Instant>)>,
}

impl ActivityReports {
    fn poll(
        &mut self,
        now: Instant,
        attached: usize,
        last_input: Option<Instant>,
    ) -> Option<Activity> {
        let due = match self.sent {
            None => true,
            Some((at, n, input)) => {
                n != attached
                    || (last_input > input && now.duration_since(at) >= INPUT_REPORT_INTERVAL)
            }
        };
        if !due {
            return None;
        }
        self.sent = Some((now, attached, last_input));
        Some(Activity {
            attached_clients: u32::try_from(attached).unwrap_or(u32::MAX),
            input_ago_ms: last_input.map(|t| now.duration_since(t).as_millis() as u64),
        })
    }
}

/// Opens the control stream and sends the hello.
async fn hello(
    conn: &quinn::Connection,
) -> Result<Result<(quinn::SendStream, FramedRecv), End>, LinkError> {
    let (mut send, recv) = conn.open_bi().await?;
    let mut recv = FramedRecv::with_limit(recv, 64 * 1024);
    send_msg(&mut send, &StreamHeader::Control(ControlOpen {})).await?;
    send_msg(
        &mut send,
        &ControlMsg::Hello(Hello {
            protocol_version: protocol::PROTOCOL_VERSION,
            agent_version: crate::update::version().into(),
            hostname: hostname(),
        }),
    )
    .await?;
    match recv.expect::<StreamReply>().await? {
        StreamReply::Accepted(_) => Ok(Ok((send, recv))),
        StreamReply::Refused(r) => Ok(Err(lost(
            format!("control stream refused: {}", r.message),
            false,
        ))),
        StreamReply::Forwarding(_) => {
            Ok(Err(lost("unexpected answer to the control stream", false)))
        }
    }
}

/// What the agent serves on streams opened towards it.
#[derive(Clone)]
pub struct Services {
    pub sessions: Arc<crate::pty::Sessions>,
    /// TCP forwards and sync sessions open right now, and the resumable forwards.
    pub forwards: Arc<crate::forward::Forwards>,
    pub sync: filesync::serve::Options,
    /// Direct connections, with the socket and the hub address of the session: only on
    /// streams from the hub.
    pub direct: Option<(Arc<Direct>, quinn::Endpoint, std::net::SocketAddr)>,
    /// The workspace user commands run as (when the agent is root).
    pub run_as: Option<String>,
    /// The workspace's setup: its environment for terminals and commands.
    pub setup: Arc<crate::setup::Setup>,
    /// Agent updates (the binary arrives on a stream from the hub only).
    pub updates: Option<Arc<crate::update::Updates>>,
}

pub(crate) fn refusal(reason: StreamRefusal, message: String) -> StreamReply {
    StreamReply::Refused(StreamRefused { reason, message })
}

/// Answers a stream with a refusal and finishes it.
pub(crate) async fn refuse(
    send: &mut quinn::SendStream,
    reason: StreamRefusal,
    message: String,
) -> Result<(), LinkError> {
    send_msg(send, &refusal(reason, message)).await?;
    let _ = send.finish();
    Ok(())
}

/// A stream the hub (`credential: None`) or a direct client opened: its header says what
/// it is for, and a direct client's credential must allow it.
pub(crate) async fn serve_stream(
    services: Services,
    credential: Option<Arc<Credential>>,
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let Services {
        sessions,
        forwards,
        sync,
        direct,
        run_as,
        setup,
        updates,
    } = services;
    let mut recv = FramedRecv::new(recv);
    let header = match recv.expect::<StreamHeader>().await {
        Ok(header) => header,
        Err(e) => {
            let _ = refuse(&mut send, StreamRefusal::BadHeader, e.to_string()).await;
            return;
        }
    };
    if let Some(credential) = &credential
        && !purpose_of(&header).is_some_and(|p| credential.allows(p))
    {
        let message = format!(
            "stream type {} is not allowed on this direct connection",
            protocol::Message::tag(&header)
        );
        let _ = refuse(&mut send, StreamRefusal::Unauthorized, message).await;
        return;
    }
    let result = match header {
        StreamHeader::Direct(open) if direct.is_some() => {
            let Some((direct, endpoint, hub)) = direct else {
                return;
            };
            direct.punch(open, &endpoint, hub, send).await
        }
        StreamHeader::AgentUpdate(open) if credential.is_none() && updates.is_some() => {
            let Some(updates) = updates else {
                return;
            };
            let (recv, mut decoder) = recv.into_parts();
            updates.receive(open, recv, decoder.take_buffered()).await;
            Ok(())
        }
        StreamHeader::Pty(_) => {
            let accepted = StreamReply::Accepted(protocol::stream::Accepted {});
            match send_msg(&mut send, &accepted).await {
                Ok(()) => crate::pty::stream::serve(sessions, setup, &mut send, &mut recv).await,
                Err(e) => Err(e),
            }
        }
        StreamHeader::TcpForward(open) => crate::forward::serve(open, send, recv, forwards).await,
        StreamHeader::Forward(open) => {
            crate::forward::serve_resumable(open, send, recv, forwards).await
        }
        StreamHeader::Exec(_) => {
            // A running command is use of the workspace.
            let _busy = forwards.busy();
            let accepted = StreamReply::Accepted(protocol::stream::Accepted {});
            match send_msg(&mut send, &accepted).await {
                Ok(()) => {
                    let workdir = crate::checkout::workdir(run_as.as_deref());
                    let env = setup.env();
                    crate::exec::serve(run_as.as_deref(), &workdir, &env, &mut send, &mut recv)
                        .await
                }
                Err(e) => Err(e),
            }
        }
        StreamHeader::Files(_) => {
            // File use is use of the workspace.
            let _busy = forwards.busy();
            let accepted = StreamReply::Accepted(protocol::stream::Accepted {});
            match send_msg(&mut send, &accepted).await {
                Ok(()) => crate::files::serve(&sync, &mut send, recv).await,
                Err(e) => Err(e),
            }
        }
        StreamHeader::Sync(open) => {
            // A running sync is use of the workspace, like an open forward.
            let _busy = forwards.busy();
            filesync::serve::serve(open.root, credential.is_some(), sync, send, recv).await
        }
        other => {
            let message = format!(
                "stream type {} is not supported by this agent",
                protocol::Message::tag(&other)
            );
            refuse(&mut send, StreamRefusal::Unsupported, message).await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "stream ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activity_reports_when_it_changes() {
        let t0 = Instant::now();
        let mut r = ActivityReports::default();
        let first = r.poll(t0, 0, None).expect("a report at connect");
        assert_eq!(first.attached_clients, 0);
        assert_eq!(r.poll(t0 + Duration::from_secs(1), 0, None), None);
        // A client attaches: reported at once.
        assert_eq!(
            r.poll(t0 + Duration::from_secs(2), 1, None)
                .map(|a| a.attached_clients),
            Some(1)
        );
        // Typing is reported, but not more often than the interval.
        let typed = t0 + Duration::from_secs(3);
        assert_eq!(r.poll(typed, 1, Some(typed)), None);
        let later = t0 + Duration::from_secs(2) + INPUT_REPORT_INTERVAL;
        let report = r.poll(later, 1, Some(typed)).expect("input reported");
        assert_eq!(
            report.input_ago_ms,
            Some((later - typed).as_millis() as u64)
        );
        assert_eq!(
            r.poll(later + INPUT_REPORT_INTERVAL, 1, Some(typed)),
            None,
            "no new input"
        );
    }
}
