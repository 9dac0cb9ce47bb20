//! Moving files over a sync stream: a counted sender, and sending one file whole or as a
//! delta against the receiver's signature.

use crate::tree::Root;
use link::LinkError;
use protocol::ProtocolError;
use protocol::sync::delta::{BlockSig, Encoder, Op};
use protocol::sync::{
    CHUNK_LEN, DataChunk, DeltaChunk, FileEnd, FileHeader, FileMeta, Hash, Node, OpError, SyncMsg,
};
use std::io::Read;

/// The sending half of a sync stream, counting what goes on the wire.
pub struct Tx {
    pub send: quinn::SendStream,
    pub bytes: u64,
}

impl Tx {
    pub fn new(send: quinn::SendStream) -> Tx {
        Tx { send, bytes: 0 }
    }

    pub async fn msg(&mut self, msg: &SyncMsg) -> Result<(), LinkError> {
        let frame = protocol::encode_frame(msg)?;
        self.send.write_all(&frame).await?;
        self.bytes += frame.len() as u64;
        Ok(())
    }

    /// Sends a signature in frames of at most 32,768 blocks.
    pub async fn signature(
        &mut self,
        id: u64,
        block_len: u32,
        blocks: &[BlockSig],
    ) -> Result<(), LinkError> {
        let mut chunks = blocks.chunks(32 * 1024).peekable();
        if chunks.peek().is_none() {
            return self
                .msg(&SyncMsg::Signature(protocol::sync::SignatureChunk {
                    id,
                    block_len,
                    blocks: Vec::new(),
                    last: true,
                }))
                .await;
        }
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            self.msg(&SyncMsg::Signature(protocol::sync::SignatureChunk {
                id,
                block_len,
                blocks: chunk.to_vec(),
                last,
            }))
            .await?;
        }
        Ok(())
    }

    /// Sends the file at `path` as `Put` + `Data`/`Delta` + `End`. The outer error is the
    /// stream's; the inner one means nothing was sent (the file could not be opened).
    /// The hash sent is the one the scan found for this very file version; if the file
    /// changes while it is read (its size or times move), the file ends with the zero
    /// hash instead, which the receiver refuses; so does any read error. The receiver
    /// hashes what it got either way, so a mismatch never lands.
    pub async fn file(
        &mut self,
        root: &mut Root,
        id: u64,
        path: &str,
        expect: Option<Node>,
        signature: Option<(u32, Vec<BlockSig>)>,
    ) -> Result<Result<FileMeta, OpError>, LinkError> {
        let (mut file, meta) = match root.open_file(path) {
            Ok(f) => f,
            Err(e) => return Ok(Err(e)),
        };
        let delta = signature.is_some();
        self.msg(&SyncMsg::Put(FileHeader {
            id,
            path: path.to_owned(),
            mode: meta.mode,
            mtime_ns: meta.mtime_ns,
            size: meta.size,
            expect,
            delta,
        }))
        .await?;
        let mut encoder = signature.map(|(block, blocks)| Encoder::new(block, blocks));
        // Small files get small buffers: most files are far smaller than a chunk.
        let mut buf = vec![0; (meta.size as usize).clamp(4096, CHUNK_LEN)];
        let mut ops: Vec<Op> = Vec::new();
        loop {
            let read = match encoder.take() {
                None => file.read(&mut buf),
                // Matching a large file against a signature is long work that never
                // waits on the network: it runs off the runtime, a chunk at a time, so
                // the agent keeps up its heartbeats meanwhile.
                Some(mut enc) => {
                    let (back, read) = tokio::task::spawn_blocking(move || {
                        let read = file.read(&mut buf);
                        if let Ok(n) = read {
                            enc.feed(&buf[..n], |op| ops.push(op));
                        }
                        ((file, buf, enc, ops), read)
                    })
                    .await
                    .map_err(|_| ProtocolError::Unexpected("delta encoding panicked"))?;
                    let enc;
                    (file, buf, enc, ops) = back;
                    encoder = Some(enc);
                    read
                }
            };
            let n = match read {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    // The zero hash never matches: the receiver discards what it got and
                    // answers with an error, as for any failed transfer.
                    tracing::debug!(path, error = %e, "read failed mid-file");
                    let hash = Hash([0; 32]);
                    self.msg(&SyncMsg::End(FileEnd { id, hash })).await?;
                    return Ok(Ok(meta));
                }
            };
            if encoder.is_none() {
                self.msg(&SyncMsg::Data(DataChunk {
                    id,
                    bytes: buf[..n].to_vec(),
                }))
                .await?;
            } else if ops.len() > 1024 || literal_len(&ops) >= CHUNK_LEN {
                self.delta(id, &mut ops).await?;
            }
        }
        if let Some(enc) = encoder {
            enc.finish(|op| ops.push(op));
            self.delta(id, &mut ops).await?;
        }
        let unchanged = file.metadata().is_ok_and(|m| {
            use std::os::unix::fs::MetadataExt;
            m.size() == meta.size && m.mtime() * 1_000_000_000 + m.mtime_nsec() == meta.mtime_ns
        });
        let hash = if unchanged { meta.hash } else { Hash([0; 32]) };
        self.msg(&SyncMsg::End(FileEnd { id, hash })).await?;
        Ok(Ok(meta))
    }

    async fn delta(&mut self, id: u64, ops: &mut Vec<Op>) -> Result<(), LinkError> {
        if !ops.is_empty() {
            let ops = std::mem::take(ops);
            self.msg(&SyncMsg::Delta(DeltaChunk { id, ops })).await?;
        }
        Ok(())
    }
}

fn literal_len(ops: &[Op]) -> usize {
    ops.iter()
        .map(|op| match op {
            Op::Literal(b) => b.len(),
            Op::Copy { .. } => 0,
        })
        .sum()
}
