//! `wsh sync`: two-way sync between a local folder and a folder of a workspace.
//!
//! The CLI drives: it scans its folder, keeps the last agreed state (the ancestor, saved
//! under `~/.local/state/wsh/sync/`), plans each pass with `protocol::sync::plan` and
//! carries it out over one sync stream; the agent serves its side (`filesync::serve`).
//! After the first pass, file events on either side (or a periodic rescan) start the next
//! one. A lost link is re-opened and the sync goes on from the ancestor.

use crate::attach::Link;
use crate::path::Paths;
use anyhow::{Context, Result, bail};
use filesync::transfer::Tx;
use filesync::tree::{HashCache, Incoming, Root};
use filesync::watch::Watcher;
use link::FramedRecv;
use protocol::sync::delta::{BlockSig, DELTA_MIN_SIZE};
use protocol::sync::plan::{self, Action, Conflict, Side, Step, Tree};
use protocol::sync::{
    ApplyRequest, GetRequest, Node, OpError, OpErrorCode, PathRequest, SYNC_VERSION, ScanRequest,
    SyncHello, SyncMsg,
};
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// An error that reconnecting cannot fix.
#[derive(Debug)]
pub struct Fatal(pub String);

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Fatal {}

#[derive(Debug, Clone)]
pub struct Args {
    pub workspace: String,
    pub local: PathBuf,
    pub remote: Option<String>,
    pub once: bool,
    pub ignore: Vec<String>,
    pub no_default_ignores: bool,
    /// Ask before a pass deletes more than this fraction of a side's entries.
    pub max_delete: f64,
    /// Confirm large deletions without asking.
    pub yes: bool,
}

/// What a sync did, for the summary, `--status` and tests (`--json`).
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct Totals {
    pub files_up: u64,
    pub bytes_up: u64,
    pub files_down: u64,
    pub bytes_down: u64,
    /// Bytes written to and read from the sync stream (frames included).
    pub wire_up: u64,
    pub wire_down: u64,
    pub deleted_local: u64,
    pub deleted_remote: u64,
    pub conflicts: Vec<String>,
    pub errors: u64,
    pub passes: u64,
}

/// The folder state files live in.
fn state_dir() -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("wsh/sync")
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, path)
}

/// The remote root: relative to the workspace folder; `~/` is accepted and dropped.
fn remote_root(args: &Args) -> Result<String> {
    let root = match &args.remote {
        Some(r) => r.trim_start_matches("~/").trim_end_matches('/').to_owned(),
        None => args
            .local
            .file_name()
            .and_then(|n| n.to_str())
            .context("name the remote folder: the local one has no usable name")?
            .to_owned(),
    };
    protocol::sync::check_path(&root).map_err(|e| {
        anyhow::anyhow!(
            "remote folder (relative to the workspace folder): {}",
            e.message
        )
    })?;
    Ok(root)
}

struct Driver {
    args: Args,
    root_name: String,
    local: Root,
    ancestor: Tree,
    /// The local tree as last scanned and changed since (None: scan it in full).
    local_tree: Option<Tree>,
    remote: Tree,
    totals: Totals,
    state_file: PathBuf,
    status_file: PathBuf,
    phase: &'static str,
    started: std::time::SystemTime,
    notices: Vec<String>,
    /// Changes that failed in the last pass (a `--once` sync that ends with some fails).
    failed_last_pass: u64,
    /// The user confirmed this pass's deletions (asked once per pass, not per side).
    confirmed: bool,
    next_id: u64,
    progress: Progress,
}

#[derive(Default)]
struct Progress {
    total_files: u64,
    total_bytes: u64,
    done_files: u64,
    done_bytes: u64,
    last_print: Option<Instant>,
    shown: bool,
}

/// What a sync keeps between runs: the last agreed state, the workspace's manifest as last
/// seen (so the workspace sends only what changed since) and the local file hashes.
#[derive(serde::Deserialize, Default)]
struct Saved {
    ancestor: Tree,
    remote: Tree,
    cache: HashCache,
}

#[derive(serde::Serialize)]
struct SavedRef<'a> {
    ancestor: &'a Tree,
    remote: &'a Tree,
    cache: &'a HashCache,
}

/// What an answer from the workspace settles.
enum Pending {
    /// A change to the workspace: `Done` says how it went.
    Remote(Box<Step>),
    /// The workspace's signature of a file we are about to send as a delta.
    Signature {
        blocks: Vec<BlockSig>,
        block_len: u32,
        complete: bool,
        failed: bool,
    },
    /// A file coming from the workspace.
    Pull {
        step: Box<Step>,
        file: Option<Result<Box<Incoming>, OpError>>,
    },
}

/// Messages from the reader task, with the stream's byte count so far.
type Inbox = mpsc::UnboundedReceiver<Result<(SyncMsg, u64), String>>;

impl Driver {
    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn save(&self) {
        let saved = SavedRef {
            ancestor: &self.ancestor,
            remote: &self.remote,
            cache: self.local.cache(),
        };
        if let Ok(bytes) = postcard::to_stdvec(&saved) {
            let _ = write_atomic(&self.state_file, &bytes);
        }
        self.write_status();
    }

    fn write_status(&self) {
        let status = serde_json::json!({
            "pid": std::process::id(),
            "workspace": self.args.workspace,
            "local": self.local.dir().display().to_string(),
            "remote": self.root_name,
            "phase": self.phase,
            "started": humantime::format_rfc3339_seconds(self.started).to_string(),
            "updated": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            "entries": self.ancestor.len(),
            "progress": {
                "files": self.progress.done_files, "of_files": self.progress.total_files,
                "bytes": self.progress.done_bytes, "of_bytes": self.progress.total_bytes,
            },
            "totals": self.totals,
            "notices": self.notices,
        });
        let _ = write_atomic(&self.status_file, status.to_string().as_bytes());
    }

    fn notice(&mut self, message: String) {
        eprintln!("sync: {message}");
        if !self.notices.contains(&message) {
            self.notices.push(message);
        }
    }

    fn apply_manifest(&mut self, chunk: protocol::sync::ManifestChunk) -> Result<()> {
        for e in chunk.entries {
            protocol::sync::check_path(&e.path).map_err(|e| anyhow::anyhow!("manifest: {e}"))?;
            self.remote.insert(e.path, e.node);
        }
        for p in chunk.removed {
            self.remote.remove(&p);
        }
        Ok(())
    }

    /// The local tree: rescanned in full, or only where file events say it changed.
    fn scan_local(&mut self, full: bool, watcher: &Watcher) -> Tree {
        // The CLI runs on one thread; QUIC buffers what arrives meanwhile.
        let changed = watcher.take();
        let tree = match (self.local_tree.take(), changed) {
            (Some(mut tree), Some(paths)) if !full => {
                if self.local.rescan_paths(&mut tree, &paths) {
                    tree
                } else {
                    self.local.scan()
                }
            }
            _ => self.local.scan(),
        };
        let skipped = std::mem::take(&mut self.local.skipped);
        for s in skipped.into_iter().take(5) {
            self.notice(format!("local: {s}"));
        }
        tree
    }

    /// Asks before a pass that deletes more than the allowed fraction of a side.
    fn guard_deletions(&mut self, plan: &plan::Plan, local: &Tree) -> Result<()> {
        for (side, tree) in [(Side::Local, local), (Side::Workspace, &self.remote)] {
            let n = plan.removals(side);
            let limit = (self.args.max_delete * tree.len() as f64).max(10.0);
            if n as f64 <= limit || self.args.yes || self.confirmed {
                continue;
            }
            let what = format!(
                "this pass would delete {n} of {} entries on the {} side",
                tree.len(),
                side.label()
            );
            if std::io::stdin().is_terminal() && std::io::stderr().is_terminal() {
                eprint!("sync: {what}. Go ahead? [y/N] ");
                let _ = std::io::stderr().flush();
                let mut answer = String::new();
                std::io::stdin().read_line(&mut answer)?;
                if answer.trim().eq_ignore_ascii_case("y") {
                    self.confirmed = true;
                    continue;
                }
            }
            return Err(Fatal(format!(
                "{what} (more than {:.0}%); nothing was changed. If that is right, run again with --yes",
                self.args.max_delete * 100.0
            ))
            .into());
        }
        Ok(())
    }

    fn show_progress(&mut self, force: bool) {
        let p = &mut self.progress;
        let due = p
            .last_print
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(500));
        if !(force || due) || (p.total_files < 200 && p.total_bytes < 32 << 20) {
            return;
        }
        p.last_print = Some(Instant::now());
        p.shown = true;
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let line = format!(
            "sync: {}/{} changes, {:.1}/{:.1} MiB",
            p.done_files,
            p.total_files,
            mib(p.done_bytes),
            mib(p.total_bytes)
        );
        if std::io::stderr().is_terminal() {
            eprint!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
        self.write_status();
    }

    fn settle(&mut self, step: &Step, result: Result<Option<Node>, OpError>) {
        self.progress.done_files += 1;
        let node = match result {
            Ok(node) => node,
            Err(e) => {
                self.totals.errors += 1;
                if e.code != OpErrorCode::Changed {
                    self.notice(format!(
                        "{} ({}): {}",
                        step.path,
                        step.side.label(),
                        e.message
                    ));
                }
                return;
            }
        };
        let here = match step.side {
            Side::Local => self.local_tree.as_mut(),
            Side::Workspace => Some(&mut self.remote),
        };
        match &step.action {
            Action::Rename(to) => {
                if let Some(tree) = here {
                    tree.remove(&step.path);
                    if let Some(n) = &node {
                        tree.insert(to.clone(), n.clone());
                    }
                }
            }
            Action::Remove => {
                if let Some(tree) = here {
                    tree.remove(&step.path);
                }
                self.ancestor.remove(&step.path);
                match step.side {
                    Side::Local => self.totals.deleted_local += 1,
                    Side::Workspace => self.totals.deleted_remote += 1,
                }
            }
            Action::Make(_) => {
                if let (Some(tree), Some(n)) = (here, &node) {
                    tree.insert(step.path.clone(), n.clone());
                }
                if let Some(n) = node {
                    if let Node::File(f) = &n {
                        match step.side {
                            Side::Workspace => {
                                self.totals.files_up += 1;
                                self.totals.bytes_up += f.size;
                            }
                            Side::Local => {
                                self.totals.files_down += 1;
                                self.totals.bytes_down += f.size;
                            }
                        }
                        self.progress.done_bytes += f.size;
                    }
                    self.ancestor.insert(step.path.clone(), n);
                }
            }
        }
    }

    /// Handles one message from the workspace while a pass runs.
    fn on_message(&mut self, msg: SyncMsg, pending: &mut HashMap<u64, Pending>) -> Result<()> {
        let unexpected = |what: &str| anyhow::anyhow!("the workspace sent {what} out of place");
        match msg {
            SyncMsg::Manifest(chunk) => self.apply_manifest(chunk)?,
            SyncMsg::Notice(n) => self.notice(format!("workspace: {}", n.message)),
            SyncMsg::Done(done) => match pending.remove(&done.id) {
                Some(Pending::Remote(step)) => self.settle(&step, done.result),
                Some(Pending::Pull { step, .. }) => self.settle(&step, done.result.map(|_| None)),
                Some(Pending::Signature {
                    blocks, block_len, ..
                }) => {
                    // No signature (the file changed or went away): the step sends it whole.
                    pending.insert(
                        done.id,
                        Pending::Signature {
                            blocks,
                            block_len,
                            complete: true,
                            failed: true,
                        },
                    );
                }
                None => return Err(unexpected("an answer")),
            },
            SyncMsg::Signature(chunk) => match pending.get_mut(&chunk.id) {
                Some(Pending::Signature {
                    blocks,
                    block_len,
                    complete,
                    ..
                }) if !*complete => {
                    *block_len = chunk.block_len;
                    blocks.extend(chunk.blocks);
                    *complete = chunk.last;
                }
                _ => return Err(unexpected("a signature")),
            },
            SyncMsg::Put(header) => match pending.get_mut(&header.id) {
                Some(Pending::Pull { step, file })
                    if file.is_none() && header.path == step.path =>
                {
                    let created =
                        self.local
                            .create(&step.path, header.mode, header.mtime_ns, header.delta);
                    *file = Some(created.map(Box::new));
                }
                _ => return Err(unexpected("a file")),
            },
            SyncMsg::Data(chunk) => match pending.get_mut(&chunk.id) {
                Some(Pending::Pull {
                    file: Some(file), ..
                }) => {
                    if let Ok(f) = file
                        && let Err(e) = f.write(&chunk.bytes)
                    {
                        *file = Err(e);
                    }
                }
                _ => return Err(unexpected("file data")),
            },
            SyncMsg::Delta(chunk) => match pending.get_mut(&chunk.id) {
                Some(Pending::Pull {
                    file: Some(file), ..
                }) => {
                    if let Ok(f) = file
                        && let Err(e) = f.apply(&chunk.ops)
                    {
                        *file = Err(e);
                    }
                }
                _ => return Err(unexpected("a delta")),
            },
            SyncMsg::End(end) => match pending.remove(&end.id) {
                Some(Pending::Pull {
                    step,
                    file: Some(file),
                    ..
                }) => {
                    let result = file.and_then(|f| {
                        self.local
                            .commit(*f, end.hash, step.expect.as_ref())
                            .map(Some)
                    });
                    self.settle(&step, result);
                }
                _ => return Err(unexpected("the end of a file")),
            },
            SyncMsg::Hello(_)
            | SyncMsg::Ready(_)
            | SyncMsg::Scan(_)
            | SyncMsg::SignatureRequest(_)
            | SyncMsg::Get(_)
            | SyncMsg::Apply(_) => return Err(unexpected("a request")),
        }
        Ok(())
    }

    /// Receives one message (waiting for it) and handles it.
    async fn pump(&mut self, inbox: &mut Inbox, pending: &mut HashMap<u64, Pending>) -> Result<()> {
        let (msg, read) = next(inbox).await?;
        self.totals.wire_down = read;
        self.on_message(msg, pending)
    }

    /// Handles whatever already arrived, without waiting.
    fn drain(&mut self, inbox: &mut Inbox, pending: &mut HashMap<u64, Pending>) -> Result<()> {
        while let Ok(msg) = inbox.try_recv() {
            let (msg, read) = msg.map_err(|e| anyhow::anyhow!("link lost: {e}"))?;
            self.totals.wire_down = read;
            self.on_message(msg, pending)?;
        }
        Ok(())
    }

    /// Carries out a plan: local changes at once, workspace changes pipelined on the stream.
    async fn execute(&mut self, steps: Vec<Step>, tx: &mut Tx, inbox: &mut Inbox) -> Result<()> {
        let mut pending: HashMap<u64, Pending> = HashMap::new();
        let big =
            |node: Option<&Node>| matches!(node, Some(Node::File(f)) if f.size >= DELTA_MIN_SIZE);
        // Signatures first, so they are ready when their turn comes.
        let mut signature_ids: HashMap<usize, u64> = HashMap::new();
        for (i, step) in steps.iter().enumerate() {
            if step.side == Side::Workspace
                && let Action::Make(node) = &step.action
                && big(Some(node))
                && big(step.expect.as_ref())
                && !content_same(step.expect.as_ref(), node)
            {
                let id = self.id();
                tx.msg(&SyncMsg::SignatureRequest(PathRequest {
                    id,
                    path: step.path.clone(),
                }))
                .await?;
                pending.insert(
                    id,
                    Pending::Signature {
                        blocks: Vec::new(),
                        block_len: 0,
                        complete: false,
                        failed: false,
                    },
                );
                signature_ids.insert(i, id);
            }
        }
        for (i, step) in steps.into_iter().enumerate() {
            self.drain(inbox, &mut pending)?;
            self.show_progress(false);
            let id = self.id();
            match (step.side, &step.action) {
                (Side::Local, Action::Make(node @ Node::File(_)))
                    if !content_same(step.expect.as_ref(), node) =>
                {
                    let delta = big(Some(node)) && big(step.expect.as_ref());
                    if delta {
                        match self.local.signature(&step.path) {
                            Ok((block_len, blocks)) => tx.signature(id, block_len, &blocks).await?,
                            Err(e) => {
                                self.settle(&step, Err(e));
                                continue;
                            }
                        }
                    }
                    tx.msg(&SyncMsg::Get(GetRequest {
                        id,
                        path: step.path.clone(),
                        delta,
                    }))
                    .await?;
                    pending.insert(
                        id,
                        Pending::Pull {
                            step: Box::new(step),
                            file: None,
                        },
                    );
                }
                (Side::Local, action) => {
                    let action = wire_action(action, step.expect.as_ref());
                    let result = self.local.apply(&step.path, step.expect.as_ref(), &action);
                    self.settle(&step, result);
                }
                (Side::Workspace, Action::Make(node @ Node::File(_)))
                    if !content_same(step.expect.as_ref(), node) =>
                {
                    let mut signature = None;
                    if let Some(sig_id) = signature_ids.get(&i) {
                        loop {
                            match pending.get(sig_id) {
                                Some(Pending::Signature { complete: true, .. }) => break,
                                Some(Pending::Signature { .. }) => {
                                    self.pump(inbox, &mut pending).await?
                                }
                                _ => break,
                            }
                        }
                        if let Some(Pending::Signature {
                            blocks,
                            block_len,
                            failed: false,
                            ..
                        }) = pending.remove(sig_id)
                        {
                            signature = Some((block_len, blocks));
                        }
                    }
                    match tx
                        .file(
                            &mut self.local,
                            id,
                            &step.path,
                            step.expect.clone(),
                            signature,
                        )
                        .await?
                    {
                        Ok(_) => {
                            pending.insert(id, Pending::Remote(Box::new(step)));
                        }
                        Err(e) => self.settle(&step, Err(e)),
                    }
                    self.totals.wire_up = tx.bytes;
                }
                (Side::Workspace, action) => {
                    let action = wire_action(action, step.expect.as_ref());
                    tx.msg(&SyncMsg::Apply(ApplyRequest {
                        id,
                        path: step.path.clone(),
                        expect: step.expect.clone(),
                        action,
                    }))
                    .await?;
                    pending.insert(id, Pending::Remote(Box::new(step)));
                }
            }
            self.totals.wire_up = tx.bytes;
        }
        while pending
            .values()
            .any(|p| !matches!(p, Pending::Signature { complete: true, .. }))
        {
            self.pump(inbox, &mut pending).await?;
            self.show_progress(false);
        }
        Ok(())
    }

    /// Asks the workspace for a fresh manifest and waits for it.
    async fn refresh_remote(&mut self, tx: &mut Tx, inbox: &mut Inbox) -> Result<()> {
        let id = self.id();
        tx.msg(&SyncMsg::Scan(ScanRequest { id })).await?;
        wait_batch(self, inbox, Some(id)).await
    }

    /// One pass: scan, plan, check, execute. Returns whether another pass is needed
    /// (conflict copies to carry across, or changes that failed and may succeed now).
    async fn pass(
        &mut self,
        tx: &mut Tx,
        inbox: &mut Inbox,
        full: bool,
        watcher: &Watcher,
    ) -> Result<bool> {
        self.phase = "scanning";
        let local = self.scan_local(full, watcher);
        let plan = plan::plan(&self.ancestor, &local, &self.remote, &stamp());
        for (path, node) in &plan.agreed {
            match node {
                Some(n) => self.ancestor.insert(path.clone(), n.clone()),
                None => self.ancestor.remove(path),
            };
        }
        let guard = self.guard_deletions(&plan, &local);
        // A confirmation covers the pass it was given for.
        self.confirmed = false;
        // Changes to the local side are recorded in this tree as they succeed.
        self.local_tree = Some(local);
        guard?;
        self.failed_last_pass = 0;
        if plan.steps.is_empty() {
            self.save();
            return Ok(false);
        }
        self.totals.passes += 1;
        self.phase = "syncing";
        self.progress = Progress {
            total_files: plan.steps.len() as u64,
            total_bytes: plan
                .steps
                .iter()
                .map(|s| match &s.action {
                    Action::Make(Node::File(f)) => f.size,
                    _ => 0,
                })
                .sum(),
            ..Default::default()
        };
        let quiet = plan.steps.len() > 20;
        if !quiet {
            for s in &plan.steps {
                let arrow = match s.side {
                    Side::Workspace => "->",
                    Side::Local => "<-",
                };
                let what = match &s.action {
                    Action::Make(Node::Dir) => "mkdir",
                    Action::Make(_) => "update",
                    Action::Remove => "delete",
                    Action::Rename(_) => "keep conflict copy",
                };
                eprintln!("sync: {arrow} {what} {}", s.path);
            }
        }
        for c in &plan.conflicts {
            let message = conflict_message(c);
            eprintln!("sync: conflict: {message}");
            self.totals.conflicts.push(message);
        }
        let copies = plan.conflicts.iter().any(|c| c.copy.is_some());
        let errors = self.totals.errors;
        self.execute(plan.steps, tx, inbox).await?;
        self.failed_last_pass = self.totals.errors - errors;
        if self.progress.shown {
            self.show_progress(true);
            eprintln!();
        }
        self.phase = "watching";
        self.save();
        Ok(copies || self.failed_last_pass > 0)
    }
}

fn conflict_message(c: &Conflict) -> String {
    match &c.copy {
        Some(copy) => format!(
            "{}: both sides changed it; the {} version keeps the name, the other is {copy}",
            c.path,
            c.kept.label()
        ),
        None => format!(
            "{}: deleted on one side, changed on the {} side; the change is kept",
            c.path,
            c.kept.label()
        ),
    }
}

/// Same bytes, maybe other permissions: a chmod is enough.
fn content_same(expect: Option<&Node>, node: &Node) -> bool {
    matches!((expect, node), (Some(Node::File(a)), Node::File(b)) if a.hash == b.hash && a.size == b.size)
}

fn wire_action(action: &Action, expect: Option<&Node>) -> protocol::sync::Action {
    use protocol::sync::Action as Wire;
    match action {
        Action::Make(Node::Dir) => Wire::Mkdir,
        Action::Make(Node::Symlink(target)) => Wire::Symlink(target.clone()),
        Action::Make(Node::File(f)) => {
            debug_assert!(content_same(expect, &Node::File(f.clone())));
            Wire::Chmod(f.mode)
        }
        Action::Remove => Wire::Remove,
        Action::Rename(to) => Wire::Rename(to.clone()),
    }
}

fn stamp() -> String {
    // 2026-11-26T10:15:00Z -> 20261126-101500
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    now.chars()
        .filter(|c| c.is_ascii_digit() || *c == 'T')
        .map(|c| if c == 'T' { '-' } else { c })
        .collect()
}

async fn next(inbox: &mut Inbox) -> Result<(SyncMsg, u64)> {
    match inbox.recv().await {
        Some(Ok(m)) => Ok(m),
        Some(Err(e)) => bail!("link lost: {e}"),
        None => bail!("link lost"),
    }
}

/// Waits for the last chunk of a manifest batch (answering `scan`, if given).
async fn wait_batch(d: &mut Driver, inbox: &mut Inbox, scan: Option<u64>) -> Result<()> {
    loop {
        let (msg, read) = next(inbox).await?;
        d.totals.wire_down = read;
        match msg {
            SyncMsg::Manifest(chunk) => {
                let done = chunk.last && (scan.is_none() || chunk.scan == scan);
                d.apply_manifest(chunk)?;
                if done {
                    return Ok(());
                }
            }
            SyncMsg::Notice(n) => d.notice(format!("workspace: {}", n.message)),
            SyncMsg::Done(done) if done.id == 0 => {
                if let Err(e) = done.result {
                    return Err(Fatal(format!("the workspace folder: {}", e.message)).into());
                }
            }
            _ => bail!("unexpected message from the workspace"),
        }
    }
}

enum Outcome {
    Finished,
    Interrupted,
}

/// One link's worth of syncing: open the stream, then passes until done or the link dies.
async fn run_link(
    paths: &Paths,
    d: &mut Driver,
    watcher: &Watcher,
    patterns: &[String],
) -> Result<Outcome> {
    d.phase = "connecting";
    let link = paths.settled_link(crate::forward::SETTLE).await?;
    let result = run_on(&link, d, watcher, patterns).await;
    if result.is_err() {
        paths.failed(&link).await;
    }
    result
}

async fn run_on(
    link: &Link,
    d: &mut Driver,
    watcher: &Watcher,
    patterns: &[String],
) -> Result<Outcome> {
    let (send, recv) = link.sync(&d.args.workspace, &d.root_name).await?;
    let mut tx = Tx::new(send);
    let known = (!d.remote.is_empty()).then(|| protocol::sync::digest(&d.remote));
    tx.msg(&SyncMsg::Hello(SyncHello {
        version: SYNC_VERSION,
        ignore: patterns.to_vec(),
        known,
    }))
    .await?;
    let (inbox_tx, mut inbox) = mpsc::unbounded_channel();
    let reader = tokio::spawn(read_all(recv, inbox_tx));
    let _abort = AbortOnDrop(reader);
    match next(&mut inbox).await?.0 {
        SyncMsg::Ready(ready) => {
            if !ready.resumed {
                d.remote.clear();
            }
            if !ready.watching {
                d.notice(
                    "the workspace is not watching files: changes there are found by rescans"
                        .into(),
                );
            }
        }
        SyncMsg::Done(done) => {
            let message = done.result.err().map(|e| e.message).unwrap_or_default();
            return Err(Fatal(format!("the workspace folder: {message}")).into());
        }
        _ => bail!("unexpected first message from the workspace"),
    }
    wait_batch(d, &mut inbox, Some(0)).await?;
    let mut rescan = tokio::time::interval(Duration::from_secs(10));
    rescan.reset();
    // A new link starts from a full scan; later passes rescan what events named.
    let mut full = true;
    loop {
        let mut again = d.pass(&mut tx, &mut inbox, full, watcher).await?;
        full = false;
        if d.args.once {
            // Conflict copies travel in a second pass; failed changes get another chance.
            let mut passes = 1;
            while again && passes < 5 {
                d.refresh_remote(&mut tx, &mut inbox).await?;
                again = d.pass(&mut tx, &mut inbox, true, watcher).await?;
                passes += 1;
            }
            close(&mut tx, &mut inbox).await;
            return Ok(Outcome::Finished);
        }
        // Wait for something to change on either side.
        loop {
            tokio::select! {
                _ = watcher.changed() => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    break;
                }
                msg = next(&mut inbox) => {
                    let (msg, read) = msg?;
                    d.totals.wire_down = read;
                    match msg {
                        SyncMsg::Manifest(chunk) => {
                            let last = chunk.last;
                            d.apply_manifest(chunk)?;
                            if last {
                                break;
                            }
                        }
                        SyncMsg::Notice(n) => d.notice(format!("workspace: {}", n.message)),
                        _ => bail!("unexpected message from the workspace"),
                    }
                }
                _ = rescan.tick() => {
                    full = true;
                    break;
                }
                _ = tokio::signal::ctrl_c() => {
                    close(&mut tx, &mut inbox).await;
                    return Ok(Outcome::Interrupted);
                }
            }
        }
        if let Some(problem) = watcher.take_problem() {
            d.notice(format!("local: {}", problem.message));
        }
    }
}

/// Ends the stream and waits (briefly) for the workspace to end its side, so it has
/// recorded where this session left off before the process exits.
async fn close(tx: &mut Tx, inbox: &mut Inbox) {
    let _ = tx.send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while let Some(Ok(_)) = inbox.recv().await {}
    })
    .await;
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn read_all(
    mut recv: FramedRecv,
    out: mpsc::UnboundedSender<Result<(SyncMsg, u64), String>>,
) {
    loop {
        let msg = match recv.next::<SyncMsg>().await {
            Ok(Some(msg)) => Ok((msg, recv.bytes_read())),
            Ok(None) => Err("the workspace closed the sync".to_owned()),
            Err(e) => Err(e.to_string()),
        };
        let end = msg.is_err();
        if out.send(msg).is_err() || end {
            return;
        }
    }
}

fn print_summary(t: &Totals, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(t).unwrap_or_default());
        return;
    }
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "sync: sent {} files ({:.1} MiB), received {} files ({:.1} MiB); {:.1} MiB up and {:.1} MiB down on the wire; deleted {} here and {} there; {} conflicts{}",
        t.files_up,
        mib(t.bytes_up),
        t.files_down,
        mib(t.bytes_down),
        mib(t.wire_up),
        mib(t.wire_down),
        t.deleted_local,
        t.deleted_remote,
        t.conflicts.len(),
        if t.errors > 0 {
            format!(", {} failed changes (retried on the next pass)", t.errors)
        } else {
            String::new()
        }
    );
    for c in &t.conflicts {
        eprintln!("sync: conflict: {c}");
    }
}

/// `wsh sync`: runs until interrupted (or one reconciliation with `--once`).
pub async fn sync(paths: Arc<Paths>, args: Args, json: bool) -> Result<i32> {
    let root_name = remote_root(&args)?;
    std::fs::create_dir_all(&args.local)
        .with_context(|| format!("create {}", args.local.display()))?;
    let local_dir = std::fs::canonicalize(&args.local)?;
    let mut patterns: Vec<String> = Vec::new();
    if !args.no_default_ignores {
        patterns.extend(filesync::DEFAULT_IGNORES.iter().map(|s| s.to_string()));
    }
    patterns.extend(args.ignore.iter().cloned());
    let local =
        Root::open(&local_dir, &patterns, None).map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let dir = state_dir();
    std::fs::create_dir_all(&dir)?;
    let key = blake3::hash(
        format!("{}\0{}\0{}", args.workspace, local_dir.display(), root_name).as_bytes(),
    );
    let key = &key.to_hex()[..16];
    let state_file = dir.join(format!("{key}.tree"));
    let saved: Saved = std::fs::read(&state_file)
        .ok()
        .and_then(|b| postcard::from_bytes(&b).ok())
        .unwrap_or_default();
    let mut local = local;
    local.set_cache(saved.cache);
    let watcher = if args.once {
        Watcher::idle()
    } else {
        Watcher::new(&local_dir)
    };
    let mut d = Driver {
        args,
        root_name,
        local,
        ancestor: saved.ancestor,
        local_tree: None,
        remote: saved.remote,
        totals: Totals::default(),
        state_file,
        status_file: dir.join(format!("{key}.status.json")),
        phase: "starting",
        started: std::time::SystemTime::now(),
        notices: Vec::new(),
        confirmed: false,
        failed_last_pass: 0,
        next_id: 0,
        progress: Progress::default(),
    };
    if let Some(problem) = watcher.take_problem() {
        d.notice(format!("local: {}", problem.message));
    }
    eprintln!(
        "sync: {} <-> {}:{}",
        local_dir.display(),
        d.args.workspace,
        d.root_name
    );
    let mut backoff =
        protocol::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let outcome = loop {
        let result = tokio::select! {
            r = run_link(&paths, &mut d, &watcher, &patterns) => r,
            _ = tokio::signal::ctrl_c() => Ok(Outcome::Interrupted),
        };
        match result {
            Ok(outcome) => break Ok(outcome),
            Err(e) if e.downcast_ref::<Fatal>().is_some() => break Err(e),
            Err(e) => {
                d.phase = "reconnecting";
                d.save();
                let delay = backoff.next_delay(rand::random());
                eprintln!("sync: {e:#}; trying again in {delay:.1?}");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = tokio::signal::ctrl_c() => break Ok(Outcome::Interrupted),
                }
            }
        }
    };
    d.phase = "stopped";
    d.save();
    let _ = std::fs::remove_file(&d.status_file);
    print_summary(&d.totals, json);
    match outcome {
        Ok(Outcome::Finished) if d.failed_last_pass > 0 && d.args.once => Ok(1),
        Ok(Outcome::Finished | Outcome::Interrupted) => Ok(0),
        Err(e) => Err(e),
    }
}

/// `wsh sync --status`: what running syncs are doing.
pub fn status(json: bool) -> Result<()> {
    let mut rows = Vec::new();
    if let Ok(dir) = std::fs::read_dir(state_dir()) {
        for entry in dir.flatten() {
            let path = entry.path();
            if !path.to_string_lossy().ends_with(".status.json") {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let Ok(status) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            let alive = status["pid"]
                .as_u64()
                .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
            if alive {
                rows.push(status);
            } else {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no sync is running");
    }
    for s in rows {
        let t = &s["totals"];
        println!(
            "{} <-> {}:{}  pid {}  {}  since {}\n  {} entries in sync; sent {} files, received {} files; {} conflicts; progress {}/{} changes{}",
            s["local"].as_str().unwrap_or("?"),
            s["workspace"].as_str().unwrap_or("?"),
            s["remote"].as_str().unwrap_or("?"),
            s["pid"],
            s["phase"].as_str().unwrap_or("?"),
            s["started"].as_str().unwrap_or("?"),
            s["entries"],
            t["files_up"],
            t["files_down"],
            t["conflicts"].as_array().map_or(0, |c| c.len()),
            s["progress"]["files"],
            s["progress"]["of_files"],
            s["notices"]
                .as_array()
                .filter(|n| !n.is_empty())
                .map(|n| format!(
                    "\n  notices: {}",
                    n.iter()
                        .filter_map(|v| v.as_str())
                        .collect::<Vec<_>>()
                        .join("; ")
                ))
                .unwrap_or_default(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_state_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), "x").unwrap();
        let mut root = Root::open(dir.path(), &[], None).unwrap();
        let tree = root.scan();
        let saved = SavedRef {
            ancestor: &tree,
            remote: &tree,
            cache: root.cache(),
        };
        let bytes = postcard::to_stdvec(&saved).unwrap();
        let back: Saved = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.remote, tree);
        assert_eq!(back.ancestor, tree);
    }
}
