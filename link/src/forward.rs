//! The IO half of resumable forwards ([`protocol::forward`]): a local byte stream (a TCP
//! connection, or stdin and stdout) that outlives the QUIC streams carrying it.
//!
//! [`Pipe::run`] copies both ways over one stream until both directions are finished
//! ([`Ended::Done`]), the local side fails ([`Ended::Failed`]), or the stream breaks
//! ([`Ended::Broken`]); after a break the same pipe runs again on a new stream, once both
//! sides have traded their counts ([`Pipe::resume`]). Every await in `run` leaves the pipe
//! consistent, so a run may also be dropped half-way (when a resume takes the pipe over).

use bytes::{Buf, Bytes};
use protocol::forward::{Gap, REPLAY_CAPACITY, Replay};
use quinn::{RecvStream, SendStream, VarInt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The stream error code for a stream given up because the connection broke: the peer
/// should resume.
const BROKEN: VarInt = VarInt::from_u32(1);
/// The stream error code for a connection that is over (its local side failed): the peer
/// should not try to resume it.
const OVER: VarInt = VarInt::from_u32(2);

/// How a run ended.
#[derive(Debug)]
pub enum Ended {
    /// Both directions finished, and the peer has all our bytes.
    Done,
    /// The stream broke: the connection may go on over a new one.
    Broken(String),
    /// The local side failed, or the peer ended the connection: it is over.
    Failed(std::io::Error),
}

/// One forwarded connection's local side and its counts.
pub struct Pipe<R, W> {
    read: R,
    write: W,
    /// What was sent to the peer (and may have to be sent again).
    out: Replay,
    /// The local side has ended its output; the stream is finished after the replay.
    read_eof: bool,
    /// Bytes taken from the streams so far.
    received: u64,
    /// Taken from a stream, not yet written to the local side.
    pending: Bytes,
    /// The peer finished its direction and the local side was shut down for writing.
    write_eof: bool,
    buf: Box<[u8]>,
}

impl<R, W> Pipe<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    pub fn new(read: R, write: W) -> Self {
        Pipe {
            read,
            write,
            out: Replay::new(REPLAY_CAPACITY),
            read_eof: false,
            received: 0,
            pending: Bytes::new(),
            write_eof: false,
            buf: vec![0; 64 * 1024].into_boxed_slice(),
        }
    }

    /// Bytes taken from the streams so far (what the peer need not send again).
    pub fn received(&self) -> u64 {
        self.received
    }

    /// The peer has received `received` of our bytes: the next run starts with the ones
    /// after them.
    pub fn resume(&mut self, received: u64) -> Result<(), Gap> {
        self.out.resume(received).map(|_| ())
    }

    /// Copies both ways over one stream. `early` are bytes of the connection that came
    /// with the stream's reply. Sends again first what the peer lacks (after
    /// [`Self::resume`]).
    pub async fn run(&mut self, send: SendStream, recv: RecvStream, early: &[u8]) -> Ended {
        let mut streams = Streams {
            send,
            recv,
            code: BROKEN,
        };
        let Pipe {
            read,
            write,
            out,
            read_eof,
            received,
            pending,
            write_eof,
            buf,
        } = self;
        let (send, recv) = (&mut streams.send, &mut streams.recv);
        let outbound = async {
            let (a, b) = out.unacked();
            for part in [a, b] {
                send.write_all(part).await.map_err(|e| broken(&e))?;
            }
            while !*read_eof {
                let n = read.read(buf).await.map_err(Stop::Failed)?;
                if n == 0 {
                    *read_eof = true;
                    break;
                }
                out.push(&buf[..n]);
                send.write_all(&buf[..n]).await.map_err(|e| broken(&e))?;
            }
            send.finish().map_err(|e| broken(&e))?;
            match send.stopped().await {
                Ok(None) => Ok(()),
                Ok(Some(code)) => Err(reset(code)),
                Err(e) => Err(broken(&e)),
            }
        };
        let inbound = async {
            if *write_eof {
                return Ok(());
            }
            drain(write, pending).await?;
            *received += early.len() as u64;
            *pending = Bytes::copy_from_slice(early);
            drain(write, pending).await?;
            loop {
                match recv.read_chunk(usize::MAX, true).await {
                    Ok(Some(chunk)) => {
                        *received += chunk.bytes.len() as u64;
                        *pending = chunk.bytes;
                        drain(write, pending).await?;
                    }
                    Ok(None) => break,
                    Err(quinn::ReadError::Reset(code)) => return Err(reset(code)),
                    Err(e) => return Err(broken(&e)),
                }
            }
            write.shutdown().await.map_err(Stop::Failed)?;
            *write_eof = true;
            Ok(())
        };
        match tokio::try_join!(outbound, inbound) {
            Ok(_) => Ended::Done,
            Err(Stop::Broken(why)) => Ended::Broken(why),
            Err(Stop::Failed(e)) => {
                streams.code = OVER;
                Ended::Failed(e)
            }
        }
    }
}

/// Writes what is pending to the local side; what was written leaves `pending`, so a
/// dropped call loses nothing.
async fn drain<W: AsyncWrite + Unpin>(write: &mut W, pending: &mut Bytes) -> Result<(), Stop> {
    while !pending.is_empty() {
        let n = write.write(pending).await.map_err(Stop::Failed)?;
        if n == 0 {
            return Err(Stop::Failed(std::io::ErrorKind::WriteZero.into()));
        }
        pending.advance(n);
    }
    write.flush().await.map_err(Stop::Failed)
}

enum Stop {
    Broken(String),
    Failed(std::io::Error),
}

fn broken(e: &dyn std::fmt::Display) -> Stop {
    Stop::Broken(e.to_string())
}

/// The peer reset or stopped the stream: over if it said so, else broken.
fn reset(code: VarInt) -> Stop {
    if code == OVER {
        Stop::Failed(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "the other end closed the connection",
        ))
    } else {
        Stop::Broken(format!("stream reset ({code})"))
    }
}

/// A run's streams: reset (with the run's verdict) when the run ends or is dropped, so a
/// stream given up on is never finished as if complete.
struct Streams {
    send: SendStream,
    recv: RecvStream,
    code: VarInt,
}

impl Drop for Streams {
    fn drop(&mut self) {
        let _ = self.send.reset(self.code);
        let _ = self.recv.stop(self.code);
    }
}
