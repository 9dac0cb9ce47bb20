//! `wsh attach` and `wsh sessions`: terminals over direct QUIC to the hub.
//!
//! The CLI authenticates with its API token on the connection's first stream, then opens a
//! PTY stream on the workspace; the hub splices it to the agent. The local terminal is put
//! in raw mode (when it is one), window resizes are forwarded, and if the link drops the
//! CLI reconnects and resumes at the offset after the last byte it printed.

use crate::path::Paths;
use anyhow::{Context, Result, anyhow, bail};
use link::{FramedRecv, send_msg};
use protocol::client::{ClientHello, ClientMsg};
use protocol::forward::Resume;
use protocol::pty::{PtyInput, PtyList, PtyMsg, PtyOpenRequest, PtyResize, PtySessionInfo};
use protocol::stream::{ClientPtyOpen, StreamHeader, StreamRefusal, StreamReply};
use rustix::termios;
use std::io::{IsTerminal, Write};
use std::time::Duration;

/// Where and how to reach the hub over QUIC.
pub struct Hub {
    pub http: reqwest::Client,
    pub url: String,
    pub token: String,
    pub ca_file: Option<std::path::PathBuf>,
}

/// A QUIC connection that carries streams to one workspace's agent: to the hub, which
/// relays them (`direct: false`), or to the agent itself ([`crate::path`]).
pub struct Link {
    pub(crate) conn: quinn::Connection,
    pub(crate) direct: bool,
    /// The socket it runs on (a direct connection goes out of the same one).
    pub(crate) endpoint: quinn::Endpoint,
    /// The hub's CA bundle (DER), which issued the agents' certificates too.
    pub(crate) cas: Vec<Vec<u8>>,
}

impl Hub {
    async fn get_text(&self, path: &str) -> Result<String> {
        let url = format!("{}{path}", self.url.trim_end_matches('/'));
        let res = self
            .http
            .get(&url)
            .send()
            .await
            .with_context(|| format!("call {url}"))?;
        if !res.status().is_success() {
            bail!("{url}: {}", res.status());
        }
        Ok(res.text().await?)
    }

    /// Connects and authenticates over QUIC.
    pub async fn connect(&self) -> Result<Link> {
        let version: serde_json::Value = serde_json::from_str(&self.get_text("/version").await?)?;
        let quic_addr = version["quic_addr"]
            .as_str()
            .context("hub reports no quic_addr")?;
        let server_name = version["server_name"].as_str().unwrap_or("localhost");
        let ca_pem = match &self.ca_file {
            Some(path) => {
                std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?
            }
            None => self.get_text("/ca.pem").await?,
        };
        let hub_cas = link::parse_ca_bundle(&ca_pem).context("the hub's CA")?;
        let addr = tokio::net::lookup_host(quic_addr)
            .await?
            .next()
            .ok_or_else(|| anyhow!("resolve {quic_addr}"))?;
        let bind: std::net::SocketAddr = if addr.is_ipv6() {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        }
        .parse()?;
        let endpoint = quinn::Endpoint::client(bind)?;
        let config = link::cli_client_config(&hub_cas)?;
        let conn = endpoint.connect_with(config, addr, server_name)?.await?;
        let (mut send, recv) = conn.open_bi().await?;
        let mut recv = FramedRecv::new(recv);
        send_msg(
            &mut send,
            &ClientMsg::Hello(ClientHello {
                protocol_version: protocol::PROTOCOL_VERSION,
                token: self.token.clone(),
            }),
        )
        .await?;
        match recv.expect::<ClientMsg>().await? {
            ClientMsg::Welcome(_) => Ok(Link {
                conn,
                direct: false,
                endpoint,
                cas: hub_cas,
            }),
            ClientMsg::Refused(r) => bail!("hub refused: {}", r.message),
            ClientMsg::Hello(_) => bail!("unexpected reply from hub"),
        }
    }
}

/// The hub replica this connection reaches can no longer reach the workspace's agent (the
/// agent moved to another replica, or this one is leaving): a new connection can.
#[derive(Debug)]
pub struct Moved(pub String);

/// A forward stream the agent accepted.
pub struct ForwardStream {
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    /// Bytes of the connection that came with the answer.
    pub early: Vec<u8>,
    /// `None` for a plain forward (an older hub or agent).
    pub resumable: Option<protocol::stream::Forwarding>,
}

/// The hub or agent does not know the stream header (it is older than this CLI), or
/// found it malformed.
#[derive(Debug)]
pub struct UnknownHeader(pub String);

/// The forwarded connection a resume names is gone.
#[derive(Debug)]
pub struct Gone(pub String);

macro_rules! message_error {
    ($($t:ident),*) => {$(
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl std::error::Error for $t {}
    )*};
}
message_error!(Moved, UnknownHeader, Gone);

/// A refused stream as an error; [`Moved`] when a new connection may succeed.
fn refused(r: protocol::stream::StreamRefused) -> anyhow::Error {
    if r.reason == StreamRefusal::Moved {
        Moved(r.message).into()
    } else {
        anyhow!("{}", r.message)
    }
}

impl Link {
    /// Opens a TCP forward to `port` of `workspace` (or resumes one); returns the stream
    /// once the agent has connected to the port, with the first bytes of the connection if
    /// any came along. An older hub or agent opens a plain forward instead.
    pub async fn forward(
        &self,
        workspace: &str,
        port: u16,
        resume: Option<Resume>,
    ) -> Result<ForwardStream> {
        let resumable = if self.direct {
            StreamHeader::Forward(protocol::stream::ForwardOpen { port, resume })
        } else {
            StreamHeader::ClientForward(protocol::stream::ClientForwardOpen {
                workspace_id: workspace.to_owned(),
                port,
                resume,
            })
        };
        match self.open_forward(&resumable).await {
            Err(e) if resume.is_none() && e.is::<UnknownHeader>() => {
                let plain = if self.direct {
                    StreamHeader::TcpForward(protocol::stream::TcpForwardOpen { port })
                } else {
                    StreamHeader::ClientTcpForward(protocol::stream::ClientTcpForwardOpen {
                        workspace_id: workspace.to_owned(),
                        port,
                    })
                };
                self.open_forward(&plain).await
            }
            result => result,
        }
    }

    async fn open_forward(&self, header: &StreamHeader) -> Result<ForwardStream> {
        let (mut send, recv) = self.conn.open_bi().await?;
        let mut recv = FramedRecv::new(recv);
        send_msg(&mut send, header).await?;
        let reply = recv.expect::<StreamReply>().await?;
        let (recv, mut decoder) = recv.into_parts();
        let stream = |resumable| ForwardStream {
            send,
            recv,
            early: decoder.take_buffered(),
            resumable,
        };
        match reply {
            StreamReply::Accepted(_) => Ok(stream(None)),
            StreamReply::Forwarding(f) => Ok(stream(Some(f))),
            StreamReply::Refused(r) => Err(match r.reason {
                StreamRefusal::BadHeader | StreamRefusal::Unsupported => {
                    UnknownHeader(r.message).into()
                }
                StreamRefusal::Gone => Gone(r.message).into(),
                _ => refused(r),
            }),
        }
    }

    /// Opens a sync stream on `root` of `workspace`.
    pub async fn sync(
        &self,
        workspace: &str,
        root: &str,
    ) -> Result<(quinn::SendStream, FramedRecv)> {
        let (mut send, recv) = self.conn.open_bi().await?;
        let mut recv = FramedRecv::new(recv);
        let header = if self.direct {
            StreamHeader::Sync(protocol::stream::SyncOpen {
                root: root.to_owned(),
            })
        } else {
            StreamHeader::ClientSync(protocol::stream::ClientSyncOpen {
                workspace_id: workspace.to_owned(),
                root: root.to_owned(),
            })
        };
        send_msg(&mut send, &header).await?;
        match recv.expect::<StreamReply>().await? {
            StreamReply::Accepted(_) => Ok((send, recv)),
            StreamReply::Refused(r) if r.reason == StreamRefusal::Unavailable => Err(refused(r)),
            StreamReply::Refused(r) => match refused(r) {
                e if e.is::<Moved>() => Err(e),
                e => Err(crate::sync::Fatal(e.to_string()).into()),
            },
            StreamReply::Forwarding(_) => bail!("unexpected answer to a sync stream"),
        }
    }

    /// Opens a PTY stream on `workspace` and sends `first`; returns the agent's answer.
    pub(crate) async fn pty(
        &self,
        workspace: &str,
        first: PtyMsg,
    ) -> Result<(quinn::SendStream, FramedRecv)> {
        let (mut send, recv) = self.conn.open_bi().await?;
        let mut recv = FramedRecv::new(recv);
        let header = if self.direct {
            StreamHeader::Pty(protocol::stream::PtyOpen {})
        } else {
            StreamHeader::ClientPty(ClientPtyOpen {
                workspace_id: workspace.to_owned(),
            })
        };
        send_msg(&mut send, &header).await?;
        send_msg(&mut send, &first).await?;
        match recv.expect::<StreamReply>().await? {
            StreamReply::Accepted(_) => Ok((send, recv)),
            StreamReply::Refused(r) => Err(refused(r)),
            StreamReply::Forwarding(_) => bail!("unexpected answer to a terminal stream"),
        }
    }
}

/// `wsh sessions`: the workspace's terminal sessions.
pub async fn sessions(paths: &Paths) -> Result<Vec<PtySessionInfo>> {
    let link = paths.link().await?;
    let (_send, mut recv) = link.pty(&paths.workspace, PtyMsg::List(PtyList {})).await?;
    match recv.expect::<PtyMsg>().await? {
        PtyMsg::Sessions(s) => Ok(s.sessions),
        PtyMsg::Error(e) => bail!("{}", e.message),
        _ => bail!("unexpected reply"),
    }
}

/// Restores the terminal's settings when dropped.
struct RawMode(Option<termios::Termios>);

impl RawMode {
    fn enter() -> Self {
        let stdin = rustix::stdio::stdin();
        if !std::io::stdin().is_terminal() {
            return Self(None);
        }
        let Ok(saved) = termios::tcgetattr(stdin) else {
            return Self(None);
        };
        let mut raw = saved.clone();
        raw.make_raw();
        let _ = termios::tcsetattr(stdin, termios::OptionalActions::Now, &raw);
        Self(Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ =
                termios::tcsetattr(rustix::stdio::stdin(), termios::OptionalActions::Now, saved);
        }
    }
}

fn window_size() -> (u16, u16) {
    match termios::tcgetwinsize(rustix::stdio::stdout()) {
        Ok(ws) if ws.ws_col > 0 && ws.ws_row > 0 => (ws.ws_col, ws.ws_row),
        _ => (80, 24),
    }
}

/// `wsh attach`: returns the process's exit status.
pub async fn attach(paths: &Paths, session: Option<String>, command: Vec<String>) -> Result<i32> {
    // Keystrokes come from a blocking reader thread.
    let (input_tx, mut input_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 4096];
        loop {
            match std::io::Read::read(&mut stdin, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if input_tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let _raw = RawMode::enter();
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
    let mut session = session;
    let mut offset: Option<u64> = None;
    let mut input_open = true;
    let mut failures = 0u32;
    let mut stdout = std::io::stdout();
    loop {
        let (cols, rows) = window_size();
        let open = PtyMsg::Open(PtyOpenRequest {
            session: session.clone(),
            offset,
            command: if session.is_none() {
                command.clone()
            } else {
                vec![]
            },
            env: vec![],
            cwd: None,
            cols,
            rows,
        });
        let attempt = async {
            let link = paths.link().await?;
            match link.pty(&paths.workspace, open).await {
                Ok(streams) => Ok((link, streams)),
                Err(e) => {
                    paths.failed(&link).await;
                    Err(e)
                }
            }
        };
        let (link, (mut send, mut recv)) = match attempt.await {
            Ok(streams) => streams,
            Err(e) if (offset.is_some() || e.is::<Moved>()) && failures < 60 => {
                // We were attached before: the hub or the network is coming back.
                failures += 1;
                tokio::time::sleep(Duration::from_millis(250 + rand::random_range(0..250))).await;
                tracing_note(&format!("reconnecting: {e}"));
                continue;
            }
            Err(e) => return Err(e),
        };
        failures = 0;
        // Set when a better path came up: this stream ends and the next one resumes on it
        // at the offset printed so far, once there is one (a joined session's screen may
        // still be coming).
        let mut moving = false;
        let mut changes = paths.changes();
        let outcome: Result<Option<i32>> = async {
            loop {
                if !paths.prefers(&link) && session.is_some() && offset.is_some() {
                    moving = true;
                    return Ok(None);
                }
                tokio::select! {
                    Ok(()) = changes.changed() => {}
                    msg = recv.next::<PtyMsg>() => match msg? {
                        Some(PtyMsg::Opened(o)) => {
                            // A session this attach created: its output starts at 0.
                            if session.is_none() {
                                offset = Some(0);
                            }
                            session = Some(o.session);
                        }
                        Some(PtyMsg::Output(o)) => {
                            stdout.write_all(&o.bytes)?;
                            stdout.flush()?;
                            offset = Some(o.offset + o.bytes.len() as u64);
                        }
                        Some(PtyMsg::Screen(s)) => {
                            stdout.write_all(&s.bytes)?;
                            stdout.flush()?;
                            if !s.more {
                                offset = Some(s.offset);
                            }
                        }
                        Some(PtyMsg::Truncated(_)) => tracing_note("some output was dropped while disconnected"),
                        Some(PtyMsg::Exit(e)) => return Ok(Some(e.code)),
                        Some(PtyMsg::Error(e)) => {
                            if offset.is_none() {
                                bail!("{}", e.message);
                            }
                            tracing_note(&e.message);
                        }
                        Some(_) => {}
                        None => return Ok(None),
                    },
                    keys = input_rx.recv(), if input_open => match keys {
                        Some(bytes) => send_msg(&mut send, &PtyMsg::Input(PtyInput { bytes })).await?,
                        None => input_open = false,
                    },
                    _ = winch.recv() => {
                        let (cols, rows) = window_size();
                        send_msg(&mut send, &PtyMsg::Resize(PtyResize { cols, rows })).await?;
                    }
                }
            }
        }
        .await;
        match outcome {
            Ok(Some(code)) => return Ok(code),
            Ok(None) if moving => continue,
            Ok(None) | Err(_) if session.is_some() => {
                paths.failed(&link).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Ok(None) => bail!("the hub closed the terminal"),
            Err(e) => return Err(e),
        }
    }
}

fn tracing_note(message: &str) {
    let _ = write!(std::io::stderr(), "\r\n[wsh: {message}]\r\n");
}
