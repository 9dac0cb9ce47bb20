//! The serving side of a sync stream (the agent): scans and watches its folder, sends
//! manifest batches when something changed, and carries out the driver's requests one at
//! a time, each checked by [`Root`]. A bad request fails alone (`Done` with an error); a
//! frame that does not decode ends the stream.

use crate::transfer::Tx;
use crate::tree::{HashCache, Incoming, Root};
use crate::watch::Watcher;
use link::{FramedRecv, LinkError};
use protocol::ProtocolError;
use protocol::control::{SyncSession, SyncSessions};
use protocol::stream::{Accepted, StreamRefusal, StreamRefused, StreamReply};
use protocol::sync::delta::BlockSig;
use protocol::sync::plan::Tree;
use protocol::sync::{
    Entry, FileHeader, MANIFEST_CHUNK_BYTES, ManifestChunk, Node, OpDone, OpError, OpErrorCode,
    SYNC_VERSION, SyncMsg, SyncReady, check_path,
};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where sync roots live and who owns what is written.
#[derive(Debug, Clone)]
pub struct Options {
    /// Sync roots are relative to this folder (the workspace user's home).
    pub home: PathBuf,
    /// Created entries are chowned to this user and group (when the agent is root).
    pub owner: Option<(u32, u32)>,
    /// Full rescans as a safety net for lost events.
    pub rescan: Duration,
    /// Quiet time after a file event before rescanning (events come in bursts).
    pub debounce: Duration,
    /// What ended sessions leave for the next one on the same folder.
    pub memory: Arc<Mutex<HashMap<PathBuf, Memory>>>,
    /// The sessions open now, for the agent to report.
    pub sessions: Sessions,
}

/// The sync sessions being served, as the hub is told of them.
#[derive(Debug, Clone, Default)]
pub struct Sessions(Arc<Mutex<(u64, std::collections::BTreeMap<u64, SyncSession>)>>);

impl Sessions {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, (u64, std::collections::BTreeMap<u64, SyncSession>)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a session; it is listed until the guard goes.
    fn open(&self, session: SyncSession) -> Listed {
        let mut inner = self.lock();
        inner.0 += 1;
        let key = inner.0;
        inner.1.insert(key, session);
        Listed {
            sessions: self.clone(),
            key,
        }
    }

    /// The sessions open now, oldest first, as a report (bounded to fit one).
    pub fn report(&self) -> SyncSessions {
        SyncSessions::bounded(self.lock().1.values())
    }
}

/// A session's entry in [`Sessions`], removed on drop (however the session ends).
struct Listed {
    sessions: Sessions,
    key: u64,
}

impl Listed {
    fn update(&self, f: impl FnOnce(&mut SyncSession)) {
        if let Some(session) = self.sessions.lock().1.get_mut(&self.key) {
            f(session);
        }
    }
}

impl Drop for Listed {
    fn drop(&mut self) {
        self.sessions.lock().1.remove(&self.key);
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// What a session on a folder leaves behind: file hashes (so the next session does not
/// read every file again) and the manifest the driver held (so it gets only what changed).
#[derive(Debug, Default)]
pub struct Memory {
    cache: HashCache,
    sent: Tree,
}

/// Folders remembered at most.
const MEMORY_ROOTS: usize = 16;

/// How long after a request file events wait before they start a rescan.
const QUIET_AFTER_REQUEST: Duration = Duration::from_millis(25);

/// The most signature blocks a driver may keep pending (about 20 MiB).
const MAX_PENDING_BLOCKS: usize = 1 << 20;

/// Splits a manifest change into frames that stay well under the frame limit.
pub fn manifest_chunks(
    scan: Option<u64>,
    entries: Vec<Entry>,
    removed: Vec<String>,
) -> Vec<ManifestChunk> {
    let mut out = Vec::new();
    let mut size = 0;
    let full = |size: usize| size >= MANIFEST_CHUNK_BYTES;
    let empty = || ManifestChunk {
        scan,
        entries: Vec::new(),
        removed: Vec::new(),
        last: false,
    };
    let mut chunk = empty();
    for e in entries {
        size += e.path.len()
            + 64
            + match &e.node {
                Node::Symlink(t) => t.len(),
                _ => 0,
            };
        chunk.entries.push(e);
        if full(size) {
            out.push(std::mem::replace(&mut chunk, empty()));
            size = 0;
        }
    }
    for p in removed {
        size += p.len() + 8;
        chunk.removed.push(p);
        if full(size) {
            out.push(std::mem::replace(&mut chunk, empty()));
            size = 0;
        }
    }
    out.push(chunk);
    if let Some(last) = out.last_mut() {
        last.last = true;
    }
    out
}

/// What changed from `old` to `new`: entries with other content, and removed paths.
pub fn diff(old: &Tree, new: &Tree) -> (Vec<Entry>, Vec<String>) {
    let changed = new
        .iter()
        .filter(|(p, n)| !old.get(*p).is_some_and(|o| o.same(n)))
        .map(|(p, n)| Entry {
            path: p.clone(),
            node: n.clone(),
        })
        .collect();
    let removed = old
        .keys()
        .filter(|p| !new.contains_key(*p))
        .cloned()
        .collect();
    (changed, removed)
}

struct Session {
    root: Option<Root>,
    tx: Tx,
    /// The tree as last scanned (and changed by requests since).
    current: Tree,
    /// The manifest as the driver knows it.
    sent: Tree,
    incoming: Option<(FileHeader, Result<Incoming, OpError>)>,
    signatures: HashMap<u64, (u32, Vec<BlockSig>)>,
    pending_blocks: usize,
    /// Files written here, and sent from here.
    files_received: u64,
    files_sent: u64,
}

fn unexpected(what: &'static str) -> LinkError {
    ProtocolError::Unexpected(what).into()
}

impl Session {
    fn root(&mut self) -> &mut Root {
        self.root
            .as_mut()
            .expect("root is only taken during a scan")
    }

    /// Scans on a blocking thread (only the paths events named, when that will do) and
    /// sends what changed (always a batch when asked).
    async fn rescan(
        &mut self,
        scan: Option<u64>,
        paths: Option<Vec<PathBuf>>,
    ) -> Result<(), LinkError> {
        let mut root = self.root.take().expect("root present");
        let mut tree = std::mem::take(&mut self.current);
        let (root, tree) = tokio::task::spawn_blocking(move || {
            if !paths.is_some_and(|p| root.rescan_paths(&mut tree, &p)) {
                tree = root.scan();
            }
            (root, tree)
        })
        .await
        .map_err(|_| unexpected("scan panicked"))?;
        self.root = Some(root);
        self.current = tree;
        let (entries, removed) = diff(&self.sent, &self.current);
        self.sent.clone_from(&self.current);
        if scan.is_none() && entries.is_empty() && removed.is_empty() {
            return Ok(());
        }
        for chunk in manifest_chunks(scan, entries, removed) {
            self.tx.msg(&SyncMsg::Manifest(chunk)).await?;
        }
        Ok(())
    }

    async fn done(
        &mut self,
        id: u64,
        path: &str,
        result: Result<Option<Node>, OpError>,
    ) -> Result<(), LinkError> {
        if let Ok(node) = &result {
            // The driver learns the new state from this answer: no echo in the next batch.
            for tree in [&mut self.sent, &mut self.current] {
                match node {
                    Some(n) => tree.insert(path.to_owned(), n.clone()),
                    None => tree.remove(path),
                };
            }
        }
        self.tx.msg(&SyncMsg::Done(OpDone { id, result })).await
    }

    async fn handle(&mut self, msg: SyncMsg) -> Result<(), LinkError> {
        match msg {
            SyncMsg::Scan(req) => self.rescan(Some(req.id), None).await,
            SyncMsg::Put(header) => {
                if self.incoming.is_some() {
                    return Err(unexpected("a Put before the previous End"));
                }
                let created = check_path(&header.path).and_then(|_| {
                    self.root()
                        .create(&header.path, header.mode, header.mtime_ns, header.delta)
                });
                self.incoming = Some((header, created));
                Ok(())
            }
            SyncMsg::Data(chunk) => {
                let Some((header, file)) = self.incoming.as_mut().filter(|(h, _)| h.id == chunk.id)
                else {
                    return Err(unexpected("Data outside a Put"));
                };
                if let Ok(f) = file {
                    if header.delta {
                        *file = Err(OpError::new(OpErrorCode::BadRequest, "Data in a delta Put"));
                    } else if let Err(e) = f.write(&chunk.bytes) {
                        *file = Err(e);
                    }
                }
                Ok(())
            }
            SyncMsg::Delta(chunk) => {
                if !matches!(&self.incoming, Some((h, _)) if h.id == chunk.id) {
                    return Err(unexpected("Delta outside a Put"));
                }
                let Some((header, file)) = self.incoming.take() else {
                    return Err(unexpected("Delta outside a Put"));
                };
                let file = match file {
                    // Copying blocks of a large base file takes a while: not on the
                    // agent's runtime.
                    Ok(mut f) if header.delta => {
                        tokio::task::spawn_blocking(move || f.apply(&chunk.ops).map(|_| f))
                            .await
                            .map_err(|_| unexpected("delta panicked"))?
                    }
                    Ok(_) => Err(OpError::new(
                        OpErrorCode::BadRequest,
                        "Delta in a whole Put",
                    )),
                    Err(e) => Err(e),
                };
                self.incoming = Some((header, file));
                Ok(())
            }
            SyncMsg::End(end) => {
                let Some((header, file)) = self.incoming.take().filter(|(h, _)| h.id == end.id)
                else {
                    return Err(unexpected("End outside a Put"));
                };
                let result = file.and_then(|f| {
                    self.root()
                        .commit(f, end.hash, header.expect.as_ref())
                        .map(Some)
                });
                self.files_received += u64::from(result.is_ok());
                self.done(header.id, &header.path, result).await
            }
            SyncMsg::SignatureRequest(req) => {
                // Reading a large file takes a while: not on the agent's runtime.
                let signature = match self.root().open_file(&req.path) {
                    Ok((file, meta)) => tokio::task::spawn_blocking(move || {
                        crate::tree::signature_of(file, meta.size)
                    })
                    .await
                    .map_err(|_| unexpected("signature panicked"))?,
                    Err(e) => Err(e),
                };
                match signature {
                    Ok((block, blocks)) => self.tx.signature(req.id, block, &blocks).await,
                    Err(e) => self.done(req.id, &req.path, Err(e)).await,
                }
            }
            SyncMsg::Signature(chunk) => {
                self.pending_blocks += chunk.blocks.len();
                if self.pending_blocks > MAX_PENDING_BLOCKS || chunk.block_len == 0 {
                    return Err(unexpected("too many signature blocks"));
                }
                let entry = self
                    .signatures
                    .entry(chunk.id)
                    .or_insert_with(|| (chunk.block_len, Vec::new()));
                entry.1.extend(chunk.blocks);
                Ok(())
            }
            SyncMsg::Get(req) => {
                let signature = self.signatures.remove(&req.id);
                if let Some((_, blocks)) = &signature {
                    self.pending_blocks -= blocks.len();
                }
                if req.delta && signature.is_none() {
                    let e = OpError::new(OpErrorCode::BadRequest, "delta Get without a signature");
                    return self.done(req.id, &req.path, Err(e)).await;
                }
                let signature = signature.filter(|_| req.delta);
                let mut root = self.root.take().expect("root present");
                let sent = self
                    .tx
                    .file(&mut root, req.id, &req.path, None, signature)
                    .await;
                self.root = Some(root);
                match sent? {
                    Ok(_) => {
                        self.files_sent += 1;
                        Ok(())
                    }
                    Err(e) => {
                        self.tx
                            .msg(&SyncMsg::Done(OpDone {
                                id: req.id,
                                result: Err(e),
                            }))
                            .await
                    }
                }
            }
            SyncMsg::Apply(req) => {
                let result = self
                    .root()
                    .apply(&req.path, req.expect.as_ref(), &req.action);
                let path = match (&req.action, &result) {
                    (protocol::sync::Action::Rename(to), Ok(_)) => {
                        self.sent.remove(&req.path);
                        self.current.remove(&req.path);
                        to.clone()
                    }
                    _ => req.path.clone(),
                };
                self.done(req.id, &path, result).await
            }
            SyncMsg::Hello(_)
            | SyncMsg::Ready(_)
            | SyncMsg::Manifest(_)
            | SyncMsg::Done(_)
            | SyncMsg::Notice(_) => Err(unexpected("a message the server never receives")),
        }
    }
}

/// Serves one sync stream whose header named `root` (relative to `options.home`), from a
/// client that came straight to the agent (`direct`) or through the hub.
pub async fn serve(
    root: String,
    direct: bool,
    options: Options,
    send: quinn::SendStream,
    mut recv: FramedRecv,
) -> Result<(), LinkError> {
    let mut tx = Tx::new(send);
    let refuse = |message: String| {
        StreamReply::Refused(StreamRefused {
            reason: StreamRefusal::BadHeader,
            message,
        })
    };
    if let Err(e) = check_path(&root) {
        link::send_msg(&mut tx.send, &refuse(format!("sync root: {}", e.message))).await?;
        let _ = tx.send.finish();
        return Ok(());
    }
    link::send_msg(&mut tx.send, &StreamReply::Accepted(Accepted {})).await?;
    let SyncMsg::Hello(hello) = recv.expect::<SyncMsg>().await? else {
        return Err(unexpected("expected a sync Hello"));
    };
    if hello.version != SYNC_VERSION {
        return Err(unexpected("unsupported sync version"));
    }
    let dir = options.home.join(&root);
    let name = root;
    let opened = Root::open(&dir, &hello.ignore, options.owner);
    let mut root = match opened {
        Ok(r) => r,
        Err(e) => {
            tx.msg(&SyncMsg::Done(OpDone {
                id: 0,
                result: Err(e),
            }))
            .await?;
            let _ = tx.send.finish();
            return Ok(());
        }
    };
    let remembered = options.memory.lock().ok().and_then(|mut m| m.remove(&dir));
    let mut sent = Tree::new();
    if let Some(memory) = remembered {
        root.set_cache(memory.cache);
        if hello.known.is_some() && hello.known == Some(protocol::sync::digest(&memory.sent)) {
            sent = memory.sent;
        }
    }
    let watcher = Watcher::new(&dir);
    let listed = options.sessions.open(SyncSession {
        root: name,
        direct,
        started_at: now_ms(),
        files_received: 0,
        files_sent: 0,
        bytes_received: 0,
        bytes_sent: 0,
        last_transfer_at: None,
        watching: watcher.watching(),
        notice: None,
    });
    tx.msg(&SyncMsg::Ready(SyncReady {
        version: SYNC_VERSION,
        root: dir.display().to_string(),
        watching: watcher.watching(),
        resumed: !sent.is_empty(),
    }))
    .await?;
    let mut s = Session {
        root: Some(root),
        tx,
        current: Tree::new(),
        sent,
        incoming: None,
        signatures: HashMap::new(),
        pending_blocks: 0,
        files_received: 0,
        files_sent: 0,
    };
    let result = run(&mut s, &options, &watcher, &mut recv, &listed).await;
    // Whatever ended the session, the next one on this folder starts from here.
    if let (Ok(mut memory), Some(root)) = (options.memory.lock(), s.root.as_mut()) {
        if memory.len() >= MEMORY_ROOTS
            && let Some(key) = memory.keys().next().cloned()
        {
            memory.remove(&key);
        }
        let cache = root.take_cache();
        memory.insert(
            dir,
            Memory {
                cache,
                sent: std::mem::take(&mut s.sent),
            },
        );
    }
    result
}

async fn run(
    s: &mut Session,
    options: &Options,
    watcher: &Watcher,
    recv: &mut FramedRecv,
    listed: &Listed,
) -> Result<(), LinkError> {
    s.rescan(Some(0), None).await?;
    let mut files_moved = 0;
    // File events start a rescan once they pause (`debounce`) and no request came for a
    // while: during a transfer our own writes would otherwise start one after another.
    let mut dirty = false;
    let mut last_event = tokio::time::Instant::now();
    let mut last_request = last_event;
    let mut skipped_reported = 0;
    let mut handled = 0u64;
    let mut rescan = tokio::time::interval(options.rescan);
    rescan.reset();
    loop {
        // What the hub shows of this session, brought up to date before waiting again.
        let moved = s.files_received + s.files_sent;
        let moved_now = std::mem::replace(&mut files_moved, moved) != moved;
        listed.update(|l| {
            l.files_received = s.files_received;
            l.files_sent = s.files_sent;
            l.bytes_received = recv.bytes_read();
            l.bytes_sent = s.tx.bytes;
            l.watching = watcher.watching();
            if moved_now {
                l.last_transfer_at = Some(now_ms());
            }
        });
        if let Some(notice) = watcher.take_problem() {
            listed.update(|l| l.notice = Some(notice.message.clone()));
            s.tx.msg(&SyncMsg::Notice(notice)).await?;
        }
        let skipped = &s.root().skipped;
        if skipped.len() != skipped_reported {
            skipped_reported = skipped.len();
            let message = skipped
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ");
            let notice = protocol::sync::Notice {
                kind: protocol::sync::NoticeKind::Skipped,
                message: format!("{} entries not synced: {message}", skipped_reported),
            };
            listed.update(|l| l.notice = Some(notice.message.clone()));
            s.tx.msg(&SyncMsg::Notice(notice)).await?;
        }
        let due = (last_event + options.debounce).max(last_request + QUIET_AFTER_REQUEST);
        tokio::select! {
            biased;
            msg = recv.next::<SyncMsg>() => match msg? {
                Some(msg) => {
                    s.handle(msg).await?;
                    last_request = tokio::time::Instant::now();
                    // Requests can arrive faster than they are served: let the agent's
                    // other tasks (heartbeats, terminals) run now and then.
                    handled += 1;
                    if handled.is_multiple_of(16) {
                        tokio::task::yield_now().await;
                    }
                }
                None => {
                    let _ = s.tx.send.finish();
                    return Ok(());
                }
            },
            _ = watcher.changed() => {
                dirty = true;
                last_event = tokio::time::Instant::now();
            }
            _ = tokio::time::sleep_until(due), if dirty => {
                dirty = false;
                s.rescan(None, watcher.take()).await?;
            }
            _ = rescan.tick() => {
                watcher.take();
                s.rescan(None, None).await?
            }
        }
    }
}
