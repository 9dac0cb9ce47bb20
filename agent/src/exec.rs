//! Exec streams (`protocol::exec`): one command without a terminal, as the workspace user,
//! in a process group of its own (signals and timeouts reach everything it started).
//!
//! Three things run at once: stdin from the stream to the command, stdout and stderr from
//! the command to the stream (one send at a time: a full stream stops the reads, and the
//! command blocks on its writes), and the wait for its exit (with the timeout). The exit
//! goes last, once the process has exited and both pipes are closed. A client that goes
//! away (the stream reset, the connection lost) takes the command with it.

use link::{FramedRecv, LinkError, send_msg};
use protocol::exec::{
    ExecData, ExecExit, ExecFailed, ExecFailure, ExecMsg, ExecStart, ExecStarted, MAX_CHUNK,
    SIGNALS,
};
use rustix::process::{Pid, Signal};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long the first message may take.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one exec stream (`Accepted` has been sent).
pub async fn serve(
    run_as: Option<&str>,
    workdir: &Path,
    env: &[(String, Option<String>)],
    send: &mut quinn::SendStream,
    recv: &mut FramedRecv,
) -> Result<(), LinkError> {
    let start = match tokio::time::timeout(START_TIMEOUT, recv.next::<ExecMsg>()).await {
        Ok(Ok(Some(ExecMsg::Start(start)))) => start,
        Ok(Err(e)) => return Err(e),
        _ => {
            let why = "the first message must be Start".to_owned();
            return fail(send, ExecFailure::BadRequest, why).await;
        }
    };
    if let Err(why) = start.check() {
        return fail(send, ExecFailure::BadRequest, why).await;
    }
    let cwd = match &start.cwd {
        Some(dir) => workdir.join(dir),
        None => workdir.to_owned(),
    };
    if !cwd.is_dir() {
        let why = format!("{}: no such folder", cwd.display());
        return fail(send, ExecFailure::NoSuchFolder, why).await;
    }
    let mut child = match command(&start, run_as, env, &cwd).spawn() {
        Ok(child) => child,
        Err(e) => {
            let reason = match e.kind() {
                std::io::ErrorKind::NotFound => ExecFailure::NotFound,
                std::io::ErrorKind::PermissionDenied => ExecFailure::PermissionDenied,
                _ => ExecFailure::Other,
            };
            return fail(send, reason, format!("{}: {e}", start.argv[0])).await;
        }
    };
    let Some(pid) = child.id() else {
        return fail(send, ExecFailure::Other, "the process is gone".into()).await;
    };
    let group = Pid::from_raw(pid as i32);
    let signal_group = move |signal: Signal| {
        if let Some(group) = group {
            let _ = rustix::process::kill_process_group(group, signal);
        }
    };
    send_msg(send, &ExecMsg::Started(ExecStarted { pid })).await?;

    let mut stdin = child.stdin.take();
    let (mut stdout, mut stderr) = (child.stdout.take(), child.stderr.take());
    let (sent, (status, timed_out)) = {
        let input = async {
            loop {
                match recv.next::<ExecMsg>().await {
                    Ok(Some(ExecMsg::Stdin(data))) => {
                        if let Some(pipe) = stdin.as_mut()
                            && pipe.write_all(&data.bytes).await.is_err()
                        {
                            // The command closed its stdin: what follows is dropped.
                            stdin = None;
                        }
                    }
                    Ok(Some(ExecMsg::StdinEnd(_))) => stdin = None,
                    Ok(Some(ExecMsg::Signal(s))) => {
                        if SIGNALS.iter().any(|(n, _)| *n == s.signal)
                            && let Some(signal) = Signal::from_named_raw(s.signal)
                        {
                            signal_group(signal);
                        }
                    }
                    // The client finished its side: stdin closes, output goes on.
                    Ok(None) => {
                        stdin = None;
                        return;
                    }
                    // Anything else from the client is a broken client; gone is gone.
                    Ok(Some(_)) | Err(_) => {
                        signal_group(Signal::KILL);
                        return;
                    }
                }
            }
        };
        let output = async {
            let (mut out_buf, mut err_buf) = (vec![0u8; MAX_CHUNK], vec![0u8; MAX_CHUNK]);
            while stdout.is_some() || stderr.is_some() {
                let (bytes, is_out) = tokio::select! {
                    r = read(&mut stdout, &mut out_buf), if stdout.is_some() => (r, true),
                    r = read(&mut stderr, &mut err_buf), if stderr.is_some() => (r, false),
                };
                let Some(bytes) = bytes else {
                    if is_out {
                        stdout = None;
                    } else {
                        stderr = None;
                    }
                    continue;
                };
                let data = ExecData { bytes };
                let msg = if is_out {
                    ExecMsg::Stdout(data)
                } else {
                    ExecMsg::Stderr(data)
                };
                send_msg(send, &msg).await?;
            }
            Ok::<_, LinkError>(())
        };
        let wait = async {
            let limit = start.timeout_ms.map(Duration::from_millis);
            match limit {
                Some(limit) => match tokio::time::timeout(limit, child.wait()).await {
                    Ok(status) => (status, false),
                    Err(_) => {
                        signal_group(Signal::KILL);
                        (child.wait().await, true)
                    }
                },
                None => (child.wait().await, false),
            }
        };
        let work = async { tokio::join!(output, wait) };
        tokio::pin!(work, input);
        let mut input_open = true;
        loop {
            tokio::select! {
                done = &mut work => break done,
                _ = &mut input, if input_open => input_open = false,
            }
        }
    };
    if let Err(e) = sent {
        // Nobody reads the output any more.
        signal_group(Signal::KILL);
        return Err(e);
    }
    let status = match status {
        Ok(status) => status,
        Err(e) => return fail(send, ExecFailure::Other, format!("wait: {e}")).await,
    };
    use std::os::unix::process::ExitStatusExt;
    let exit = ExecExit {
        code: status.code(),
        signal: status.signal(),
        timed_out,
    };
    send_msg(send, &ExecMsg::Exit(exit)).await?;
    let _ = send.finish();
    Ok(())
}

/// The command, as the workspace user when the agent is root and one is set, with the
/// workspace's environment (`env`, its dev container's) and then the client's.
fn command(
    start: &ExecStart,
    run_as: Option<&str>,
    env: &[(String, Option<String>)],
    cwd: &PathBuf,
) -> tokio::process::Command {
    let mut argv = crate::as_user_prefix(run_as);
    argv.extend(start.argv.iter().cloned());
    let mut cmd = tokio::process::Command::new(&argv[0]);
    for (name, value) in env {
        match value {
            Some(value) => cmd.env(name, value),
            None => cmd.env_remove(name),
        };
    }
    cmd.args(&argv[1..])
        .envs(start.env.iter().map(|(k, v)| (k, v)))
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    cmd
}

/// Reads a chunk from an output pipe; `None` at its end.
async fn read<R: tokio::io::AsyncRead + Unpin>(
    pipe: &mut Option<R>,
    buf: &mut [u8],
) -> Option<Vec<u8>> {
    let pipe = pipe.as_mut()?;
    match pipe.read(buf).await {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(buf[..n].to_vec()),
    }
}

async fn fail(
    send: &mut quinn::SendStream,
    reason: ExecFailure,
    message: String,
) -> Result<(), LinkError> {
    send_msg(send, &ExecMsg::Failed(ExecFailed { reason, message })).await?;
    let _ = send.finish();
    Ok(())
}
