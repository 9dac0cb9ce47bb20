//! `wsh exec <ws> -- cmd args`: one command without a terminal (`protocol::exec`), stdin
//! passed in, stdout and stderr kept apart, the command's exit status passed on (128 + the
//! signal that ended it, 124 when its timeout passed, as `timeout(1)` does). Works in pipes.
//! Ctrl-C sends the command SIGINT; a second one, SIGKILL.

use crate::path::Paths;
use anyhow::{Result, bail};
use link::{FramedRecv, send_msg};
use protocol::exec::{ExecData, ExecFailed, ExecMsg, ExecSignal, ExecStart, ExecStdinEnd};
use protocol::stream::{StreamHeader, StreamReply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What to run, from the command line.
pub struct Args {
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub timeout: Option<std::time::Duration>,
    /// Do not read stdin (the command gets an empty one), like `ssh -n`.
    pub no_stdin: bool,
}

/// Parses `NAME=VALUE`.
pub fn env_pair(s: &str) -> Result<(String, String)> {
    match s.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => bail!("{s:?} is not NAME=VALUE"),
    }
}

/// Runs the command; returns the exit status to pass on.
pub async fn exec(paths: &Paths, args: Args) -> Result<i32> {
    let start = ExecStart {
        argv: args.command,
        env: args.env,
        cwd: args.cwd,
        timeout_ms: args.timeout.map(|t| t.as_millis() as u64),
    };
    if let Err(why) = start.check() {
        bail!("{why}");
    }
    let link = paths.link().await?;
    let (mut send, recv) = link.conn.open_bi().await?;
    let mut recv = FramedRecv::new(recv);
    let header = if link.direct {
        StreamHeader::Exec(protocol::stream::ExecOpen {})
    } else {
        StreamHeader::ClientExec(protocol::stream::ClientExecOpen {
            workspace_id: paths.workspace.clone(),
        })
    };
    send_msg(&mut send, &header).await?;
    send_msg(&mut send, &ExecMsg::Start(start)).await?;
    match recv.expect::<StreamReply>().await? {
        StreamReply::Accepted(_) => {}
        StreamReply::Refused(r) => bail!("{}", r.message),
        StreamReply::Forwarding(_) => bail!("unexpected answer to an exec stream"),
    }
    match recv.expect::<ExecMsg>().await? {
        ExecMsg::Started(_) => {}
        ExecMsg::Failed(ExecFailed { message, .. }) => bail!("{message}"),
        _ => bail!("unexpected answer to an exec stream"),
    }
    // Stdin, then interrupts. Its failures end nothing: the command may have closed its
    // stdin, or exited; the output says how it ended.
    let input = async {
        let _: Result<()> = async {
            if !args.no_stdin {
                let mut stdin = tokio::io::stdin();
                let mut buf = vec![0u8; protocol::exec::MAX_CHUNK];
                loop {
                    let n = stdin.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    let data = ExecData {
                        bytes: buf[..n].to_vec(),
                    };
                    send_msg(&mut send, &ExecMsg::Stdin(data)).await?;
                }
            }
            send_msg(&mut send, &ExecMsg::StdinEnd(ExecStdinEnd {})).await?;
            let mut signal = 2;
            loop {
                tokio::signal::ctrl_c().await?;
                send_msg(&mut send, &ExecMsg::Signal(ExecSignal { signal })).await?;
                signal = 9;
            }
        }
        .await;
        std::future::pending::<std::convert::Infallible>().await
    };
    let output = async {
        let (mut stdout, mut stderr) = (tokio::io::stdout(), tokio::io::stderr());
        loop {
            match recv.next::<ExecMsg>().await? {
                Some(ExecMsg::Stdout(d)) => {
                    stdout.write_all(&d.bytes).await?;
                    stdout.flush().await?;
                }
                Some(ExecMsg::Stderr(d)) => {
                    stderr.write_all(&d.bytes).await?;
                    stderr.flush().await?;
                }
                Some(ExecMsg::Exit(exit)) => {
                    if exit.timed_out {
                        eprintln!("wsh: the command's timeout passed: killed");
                        return Ok(124);
                    }
                    return Ok(match (exit.code, exit.signal) {
                        (Some(code), _) => code,
                        (None, Some(signal)) => 128 + signal,
                        (None, None) => 255,
                    });
                }
                Some(ExecMsg::Failed(f)) => bail!("{}", f.message),
                Some(_) => {}
                None => bail!("the workspace's agent went away before the command ended"),
            }
        }
    };
    tokio::select! {
        code = output => code,
        never = input => match never {},
    }
}
