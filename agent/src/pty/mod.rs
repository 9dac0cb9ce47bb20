//! Terminal sessions that outlive every connection.
//!
//! Entry points: [`Sessions`] (create, find, list, close), [`PtySession`] (input, resize,
//! attach) and [`Attachment`] (what one client receives). Each session runs its process on
//! a real PTY (`portable-pty`), read by a dedicated thread that appends the output to an
//! [`ring::OutputRing`] indexed by absolute offset and to the backlog of a headless terminal
//! ([`screen::Screen`], parsed lazily) that knows the current screen whenever asked. A client attaching fresh, or one whose
//! offset fell out of the ring, gets the screen first and the live stream after it; any
//! other client gets exactly the bytes after its offset. Clients read at their own pace
//! from the shared ring, so a slow one never blocks the process or the others, and memory
//! stays bounded by the ring.

pub mod ring;
mod screen;
pub mod stream;

use portable_pty::{CommandBuilder, PtySize, native_pty_system};
use ring::{OutputRing, Read as RingRead};
use rustix::process::Pid;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Largest accepted terminal, in columns and rows (the headless screen holds every cell).
pub const MAX_COLS: u16 = 1000;
pub const MAX_ROWS: u16 = 500;
/// Default ring size per session.
pub const DEFAULT_RING: usize = 4 << 20;
/// The most output one [`Event::Output`] carries.
const CHUNK: usize = 64 * 1024;

/// Errors a caller branches on.
#[derive(Debug, thiserror::Error)]
pub enum PtyError {
    #[error("terminal size {cols}x{rows} is outside 1x1..={MAX_COLS}x{MAX_ROWS}")]
    BadSize { cols: u16, rows: u16 },
    #[error("no such session")]
    NoSuchSession,
    #[error("a session name is 1 to 64 of A-Z a-z 0-9 . _ -")]
    BadName,
    #[error("the session's process has exited with status {code}")]
    Exited { code: i32 },
    #[error("start the process: {0}")]
    Spawn(String),
    #[error("pty: {0}")]
    Io(#[from] std::io::Error),
}

/// A terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    pub cols: u16,
    pub rows: u16,
}

impl Size {
    pub fn new(cols: u16, rows: u16) -> Result<Self, PtyError> {
        if (1..=MAX_COLS).contains(&cols) && (1..=MAX_ROWS).contains(&rows) {
            Ok(Self { cols, rows })
        } else {
            Err(PtyError::BadSize { cols, rows })
        }
    }

    fn pty(self) -> PtySize {
        PtySize {
            rows: self.rows,
            cols: self.cols,
            pixel_width: 0,
            pixel_height: 0,
        }
    }
}

/// What to run in a new session.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    /// Program and arguments; empty means the user's login shell.
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Names taken out of the environment the agent passes on.
    pub unset: Vec<String>,
    pub cwd: Option<PathBuf>,
    pub size: Size,
}

/// Wraps a command so it runs as `user` (through util-linux `runuser`): a login shell
/// when `command` is empty (which keeps the variables named in `keep` and resets the rest),
/// the command otherwise. Only meaningful when the agent is root.
fn as_user(user: &str, command: &[String], keep: &[&str]) -> Vec<String> {
    let mut out = vec!["runuser".to_owned()];
    if command.is_empty() {
        out.extend(["-l".to_owned(), user.to_owned()]);
        if !keep.is_empty() {
            out.extend(["-w".to_owned(), keep.join(",")]);
        }
    } else {
        out.extend(["-u".to_owned(), user.to_owned(), "--".to_owned()]);
        out.extend(command.iter().cloned());
    }
    out
}

/// One thing a client receives, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The current screen as escape sequences; output continues at `offset`.
    Screen { offset: u64, bytes: Vec<u8> },
    /// The client's offset fell out of the ring; it resumes at `resumed_at` (after a
    /// [`Event::Screen`]).
    Truncated { requested: u64, resumed_at: u64 },
    /// Output bytes starting at `offset`.
    Output { offset: u64, bytes: Vec<u8> },
    /// The process exited; nothing follows.
    Exit { code: i32 },
}

struct State {
    ring: OutputRing,
    size: Size,
    exit: Option<i32>,
}

/// A running (or finished) terminal session.
pub struct PtySession {
    pub id: String,
    pub command: String,
    pub created_at: u64,
    state: Mutex<State>,
    /// Locked after `state` when both are needed, never the other way round.
    screen: Mutex<screen::Screen>,
    changed: tokio::sync::watch::Sender<()>,
    writer: Mutex<Option<std::fs::File>>,
    /// The PTY's master side (resizes; what an agent update hands to its successor), while
    /// the process runs.
    master: Option<OwnedFd>,
    /// The session's process (its own session leader), while it runs.
    pid: Option<Pid>,
    /// Clients attached now, and when the last one left (for idle expiry).
    attached: Mutex<(usize, Instant)>,
    /// When a client last typed into this session.
    last_input: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for PtySession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PtySession")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What [`PtySession::start`] starts from.
struct Parts {
    id: String,
    command: String,
    created_at: u64,
    state: State,
    screen: screen::Screen,
    master: Option<OwnedFd>,
    pid: Option<Pid>,
    last_input: Option<Instant>,
}

/// Holds every PTY reader still before its next read, so that what the sessions hold is
/// all that was read (an agent update hands exactly that over, and the rest stays in the
/// kernel's buffer for the next process). Readers wait on their PTY and on a pipe that
/// becomes readable while a pause is asked.
#[derive(Debug, Default)]
struct Pause {
    state: Mutex<PauseState>,
    cv: std::sync::Condvar,
    /// Made with the first reader (an agent without terminals holds no descriptors).
    wake: std::sync::OnceLock<(OwnedFd, OwnedFd)>,
}

#[derive(Debug, Default)]
struct PauseState {
    asked: bool,
    readers: usize,
    parked: usize,
}

impl Pause {
    fn reader_started(&self) -> std::io::Result<()> {
        if self.wake.get().is_none() {
            let pipe = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
            let _ = self.wake.set(pipe);
        }
        lock(&self.state).readers += 1;
        Ok(())
    }

    fn wake(&self) -> Option<&(OwnedFd, OwnedFd)> {
        self.wake.get()
    }

    fn reader_ended(&self) {
        lock(&self.state).readers -= 1;
        self.cv.notify_all();
    }

    /// Waits until `pty` has something to read (or hung up: the read says so) and no pause
    /// is asked; `false` when the PTY cannot be waited on.
    fn readable(&self, pty: &std::fs::File) -> bool {
        use rustix::event::{PollFd, PollFlags};
        let Some((wake, _)) = self.wake() else {
            return false;
        };
        loop {
            let mut fds = [
                PollFd::new(pty, PollFlags::IN),
                PollFd::new(wake, PollFlags::IN),
            ];
            match rustix::event::poll(&mut fds, None) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => return false,
            }
            let (pty_ready, wake) = (fds[0].revents(), fds[1].revents());
            if !wake.is_empty() {
                let mut st = lock(&self.state);
                if st.asked {
                    st.parked += 1;
                    self.cv.notify_all();
                    while st.asked {
                        st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
                    }
                    st.parked -= 1;
                }
                continue;
            }
            if !pty_ready.is_empty() {
                return true;
            }
        }
    }

    /// Asks every reader to stop and waits (up to `wait`) until they have; `false` if one
    /// did not in time (it may be mid-read).
    fn pause(&self, wait: Duration) -> bool {
        let mut st = lock(&self.state);
        if !st.asked {
            st.asked = true;
            if let Some((_, wake)) = self.wake() {
                let _ = rustix::io::write(wake, &[1]);
            }
        }
        let deadline = Instant::now() + wait;
        while st.parked < st.readers {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Lets the readers go on.
    fn resume(&self) {
        let mut st = lock(&self.state);
        if st.asked {
            if let Some((wake, _)) = self.wake() {
                let _ = rustix::io::read(wake, &mut [0u8; 16]);
            }
            st.asked = false;
        }
        self.cv.notify_all();
    }
}

/// A session as it crosses an agent update (see [`Sessions::hand_over`]).
#[derive(Debug, Serialize, Deserialize)]
pub struct SessionState {
    id: String,
    command: String,
    created_at: u64,
    cols: u16,
    rows: u16,
    exit: Option<i32>,
    /// The process and the master's descriptor number, while it runs.
    pid: Option<i32>,
    fd: Option<i32>,
    ring_start: u64,
    ring: Vec<u8>,
    screen_end: u64,
    screen: Vec<u8>,
    last_input_ago_ms: Option<u64>,
}

impl PtySession {
    /// Starts the process on a new PTY and the thread that reads it.
    fn spawn(
        id: String,
        spec: &SpawnSpec,
        ring_capacity: usize,
        pause: &Arc<Pause>,
    ) -> Result<Arc<Self>, PtyError> {
        let pair = native_pty_system()
            .openpty(spec.size.pty())
            .map_err(|e| PtyError::Spawn(e.to_string()))?;
        let mut cmd = match spec.command.split_first() {
            Some((program, args)) => {
                let mut cmd = CommandBuilder::new(program);
                cmd.args(args);
                cmd
            }
            None => CommandBuilder::new_default_prog(),
        };
        cmd.env("TERM", "xterm-256color");
        for k in &spec.unset {
            cmd.env_remove(k);
        }
        for (k, v) in &spec.env {
            cmd.env(k, v);
        }
        if let Some(cwd) = &spec.cwd {
            cmd.cwd(cwd);
        }
        let child = pair
            .slave
            .spawn_command(cmd)
            .map_err(|e| PtyError::Spawn(e.to_string()))?;
        drop(pair.slave);
        let pid = child
            .process_id()
            .and_then(|pid| Pid::from_raw(pid as i32))
            .ok_or_else(|| PtyError::Spawn("the process has no id".into()))?;
        // The agent waits for the process itself (`waitpid`), as it does for one it took
        // over in an update; the handle is not needed.
        drop(child);
        let master = pair
            .master
            .as_raw_fd()
            .ok_or_else(|| PtyError::Spawn("the PTY has no descriptor".into()))
            .and_then(|fd| crate::fds::dup_open(fd).map_err(PtyError::Io))?;
        drop(pair.master);
        let created_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let command = if spec.command.is_empty() {
            "(login shell)".into()
        } else {
            spec.command.join(" ")
        };
        Self::start(
            Parts {
                id,
                command,
                created_at,
                state: State {
                    ring: OutputRing::new(ring_capacity),
                    size: spec.size,
                    exit: None,
                },
                screen: screen::Screen::new(spec.size.rows, spec.size.cols),
                master: Some(master),
                pid: Some(pid),
                last_input: None,
            },
            pause,
        )
    }

    /// Starts the threads of a session whose PTY and process exist already.
    fn start(parts: Parts, pause: &Arc<Pause>) -> Result<Arc<Self>, PtyError> {
        let Parts {
            id,
            command,
            created_at,
            state,
            screen,
            master,
            pid,
            last_input,
        } = parts;
        let running = state.exit.is_none();
        let master = master.filter(|_| running);
        let writer = master
            .as_ref()
            .map(|m| m.try_clone().map(std::fs::File::from))
            .transpose()?;
        let (changed, _) = tokio::sync::watch::channel(());
        let session = Arc::new(Self {
            id,
            command,
            created_at,
            state: Mutex::new(state),
            screen: Mutex::new(screen),
            changed,
            writer: Mutex::new(writer),
            master,
            pid: pid.filter(|_| running),
            attached: Mutex::new((0, Instant::now())),
            last_input: Mutex::new(last_input),
        });
        let (Some(pid), Some(master)) = (session.pid, &session.master) else {
            return Ok(session);
        };
        let reader = std::fs::File::from(master.try_clone()?);
        // The reader blocks, so it gets a thread of its own, never the async runtime.
        let (read_done_tx, read_done_rx) = std::sync::mpsc::channel::<()>();
        let s = session.clone();
        let reader_pause = pause.clone();
        reader_pause.reader_started()?;
        std::thread::Builder::new()
            .name(format!("pty-read-{}", s.id))
            .spawn(move || {
                let mut buf = vec![0u8; CHUNK];
                let mut reader = reader;
                while reader_pause.readable(&reader) {
                    match reader.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => s.on_output(&buf[..n]),
                    }
                }
                reader_pause.reader_ended();
                let _ = read_done_tx.send(());
            })
            .map_err(|e| {
                pause.reader_ended();
                PtyError::Io(e)
            })?;
        let s = session.clone();
        std::thread::Builder::new()
            .name(format!("pty-wait-{}", s.id))
            .spawn(move || {
                let code = loop {
                    match rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty())
                    {
                        Err(rustix::io::Errno::INTR) => continue,
                        Ok(Some((_, status))) => {
                            break status.exit_status().unwrap_or(1);
                        }
                        // Not our child (any more): its status is lost.
                        Ok(None) | Err(_) => break -1,
                    }
                };
                // Let the reader drain what the process wrote last; a background process
                // that keeps the terminal open must not hold the exit back for long.
                let _ = read_done_rx.recv_timeout(Duration::from_millis(500));
                lock(&s.state).exit = Some(code);
                s.changed.send_replace(());
            })
            .map_err(PtyError::Io)?;
        Ok(session)
    }

    /// What crosses an update (readers paused: nothing is read meanwhile).
    fn state(&self) -> SessionState {
        let st = lock(&self.state);
        let (screen_end, screen) = lock(&self.screen).snapshot();
        let (ring_start, ring) = st.ring.contents();
        let running = st.exit.is_none();
        SessionState {
            id: self.id.clone(),
            command: self.command.clone(),
            created_at: self.created_at,
            cols: st.size.cols,
            rows: st.size.rows,
            exit: st.exit,
            pid: self
                .pid
                .filter(|_| running)
                .map(Pid::as_raw_nonzero)
                .map(i32::from),
            fd: self
                .master
                .as_ref()
                .filter(|_| running)
                .map(|m| m.as_raw_fd()),
            ring_start,
            ring,
            screen_end,
            screen,
            last_input_ago_ms: lock(&self.last_input).map(|t| t.elapsed().as_millis() as u64),
        }
    }

    fn on_output(&self, bytes: &[u8]) {
        lock(&self.state).ring.push(bytes);
        self.changed.send_replace(());
        // Clients are woken first: parsing (when the backlog is due) must not delay them.
        lock(&self.screen).push(bytes);
    }

    /// Sends keystrokes to the process. Blocks while the PTY's input buffer is full.
    pub fn write_input(&self, bytes: &[u8]) -> Result<(), PtyError> {
        if let Some(code) = lock(&self.state).exit {
            return Err(PtyError::Exited { code });
        }
        *lock(&self.last_input) = Some(Instant::now());
        let mut w = lock(&self.writer);
        let w = w.as_mut().ok_or(PtyError::Exited { code: -1 })?;
        w.write_all(bytes)?;
        w.flush()?;
        Ok(())
    }

    /// Resizes the session (last writer wins).
    pub fn resize(&self, size: Size) -> Result<(), PtyError> {
        let master = self.master.as_ref().ok_or(PtyError::Exited { code: -1 })?;
        rustix::termios::tcsetwinsize(
            master,
            rustix::termios::Winsize {
                ws_row: size.rows,
                ws_col: size.cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            },
        )
        .map_err(|e| PtyError::Io(e.into()))?;
        let mut st = lock(&self.state);
        lock(&self.screen).resize(size.rows, size.cols);
        st.size = size;
        Ok(())
    }

    pub fn size(&self) -> Size {
        lock(&self.state).size
    }

    pub fn exit_code(&self) -> Option<i32> {
        lock(&self.state).exit
    }

    /// The offset one past the newest output byte.
    pub fn end_offset(&self) -> u64 {
        lock(&self.state).ring.end()
    }

    /// Ends the process (SIGHUP, as a terminal closing does).
    pub fn kill(&self) {
        if let Some(pid) = self.pid
            && self.exit_code().is_none()
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::HUP);
        }
    }

    /// A new client. `offset`: the last offset it has seen, or `None` for a fresh client.
    pub fn attach(self: &Arc<Self>, offset: Option<u64>) -> Attachment {
        lock(&self.attached).0 += 1;
        Attachment {
            session: self.clone(),
            next: offset,
            pending: VecDeque::new(),
            changed: self.changed.subscribe(),
            finished: false,
        }
    }
}

/// One client's view of a session.
pub struct Attachment {
    session: Arc<PtySession>,
    next: Option<u64>,
    pending: VecDeque<Event>,
    changed: tokio::sync::watch::Receiver<()>,
    finished: bool,
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("session", &self.session.id)
            .field("next", &self.next)
            .finish()
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let mut attached = lock(&self.session.attached);
        attached.0 = attached.0.saturating_sub(1);
        if attached.0 == 0 {
            attached.1 = Instant::now();
        }
    }
}

impl Attachment {
    /// The offset of the next byte this client will receive.
    pub fn offset(&self) -> Option<u64> {
        self.next
    }

    /// What is ready now, without waiting.
    fn poll_ready(&mut self) -> Option<Event> {
        if let Some(event) = self.pending.pop_front() {
            return Some(event);
        }
        if self.finished {
            return None;
        }
        let st = lock(&self.session.state);
        let end = st.ring.end();
        // The screen may lag the ring by the bytes being handed over right now; the stream
        // continues from the screen's offset, so those bytes follow the snapshot.
        let start_fresh = |pending: &mut VecDeque<Event>| {
            let (offset, bytes) = lock(&self.session.screen).snapshot();
            pending.push_back(Event::Screen { offset, bytes });
            offset
        };
        match self.next {
            None => {
                self.next = Some(start_fresh(&mut self.pending));
            }
            Some(off) if off > end => {
                self.next = Some(start_fresh(&mut self.pending));
            }
            Some(off) => match st.ring.read(off, CHUNK) {
                RingRead::Truncated { .. } => {
                    let resumed_at = start_fresh(&mut self.pending);
                    self.pending.push_front(Event::Truncated {
                        requested: off,
                        resumed_at,
                    });
                    self.next = Some(resumed_at);
                }
                RingRead::Bytes(bytes) if !bytes.is_empty() => {
                    self.next = Some(off + bytes.len() as u64);
                    self.pending.push_back(Event::Output { offset: off, bytes });
                }
                RingRead::Bytes(_) => {
                    if let Some(code) = st.exit {
                        self.finished = true;
                        self.pending.push_back(Event::Exit { code });
                    }
                }
            },
        }
        drop(st);
        self.pending.pop_front()
    }

    /// The next event; `None` after [`Event::Exit`].
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            self.changed.mark_unchanged();
            if let Some(event) = self.poll_ready() {
                return Some(event);
            }
            if self.finished {
                return None;
            }
            if self.changed.changed().await.is_err() {
                // The session is gone; whatever it had was delivered above.
                return None;
            }
        }
    }
}

/// Information about a session, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub id: String,
    pub command: String,
    pub size: Size,
    pub created_at: u64,
    pub end_offset: u64,
    pub exit: Option<i32>,
}

/// All sessions of this agent.
#[derive(Debug)]
pub struct Sessions {
    map: Mutex<HashMap<String, Arc<PtySession>>>,
    pause: Arc<Pause>,
    ring_capacity: usize,
    /// The workspace user sessions run as when the agent runs as root.
    run_as: Option<String>,
    /// A session nobody has been attached to for this long is ended and forgotten.
    detached_ttl: Duration,
}

/// How long a detached session lives by default: hours, not minutes.
pub const DEFAULT_DETACHED_TTL: Duration = Duration::from_secs(8 * 3600);

impl Default for Sessions {
    fn default() -> Self {
        Self::new(DEFAULT_RING)
    }
}

impl Sessions {
    pub fn new(ring_capacity: usize) -> Self {
        Self::with_policy(ring_capacity, None, DEFAULT_DETACHED_TTL)
    }

    pub fn with_policy(
        ring_capacity: usize,
        run_as: Option<String>,
        detached_ttl: Duration,
    ) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            pause: Arc::default(),
            ring_capacity,
            run_as,
            detached_ttl,
        }
    }

    /// Starts a new session (as the workspace user, when the agent is root and one is set).
    pub fn create(&self, spec: &SpawnSpec) -> Result<Arc<PtySession>, PtyError> {
        let id = format!("s{:016x}", rand::random::<u64>());
        let session = self.spawn(id.clone(), spec)?;
        lock(&self.map).insert(id, session.clone());
        Ok(session)
    }

    /// The session named `name` if it is running, else a new one by that name (`tmux new
    /// -A -s name`); `true` when it was created. A name is 1 to 64 of `A-Z a-z 0-9 . _ -`.
    pub fn get_or_create(
        &self,
        name: &str,
        spec: impl FnOnce() -> Result<SpawnSpec, PtyError>,
    ) -> Result<(Arc<PtySession>, bool), PtyError> {
        if !valid_name(name) {
            return Err(PtyError::BadName);
        }
        // Held while spawning, so two clients naming the same new session get one.
        let mut map = lock(&self.map);
        if let Some(s) = map.get(name).filter(|s| s.exit_code().is_none()) {
            return Ok((s.clone(), false));
        }
        let session = self.spawn(name.to_owned(), &spec()?)?;
        if let Some(old) = map.insert(name.to_owned(), session.clone()) {
            old.kill();
        }
        Ok((session, true))
    }

    fn spawn(&self, id: String, spec: &SpawnSpec) -> Result<Arc<PtySession>, PtyError> {
        let mut spec = spec.clone();
        if let Some(user) = &self.run_as
            && rustix::process::geteuid().is_root()
        {
            let keep: Vec<&str> = spec.env.iter().map(|(k, _)| k.as_str()).collect();
            spec.command = as_user(user, &spec.command, &keep);
        }
        PtySession::spawn(id, &spec, self.ring_capacity, &self.pause)
    }

    /// Readies every session to cross an agent update: the readers pause (what is not
    /// read yet stays in the PTY for the next process), and the state comes back with
    /// each running session's master descriptor open across `exec`. Undo it with
    /// [`Sessions::cancel_handover`] if the `exec` fails.
    pub fn prepare_handover(&self) -> Result<Vec<u8>, PtyError> {
        if !self.pause.pause(Duration::from_secs(2)) {
            self.pause.resume();
            return Err(PtyError::Io(std::io::Error::other(
                "a terminal reader did not pause",
            )));
        }
        let map = lock(&self.map);
        let states: Vec<SessionState> = map.values().map(|s| s.state()).collect();
        for master in map.values().filter_map(|s| s.master.as_ref()) {
            rustix::io::fcntl_setfd(master, rustix::io::FdFlags::empty())
                .map_err(|e| PtyError::Io(e.into()))?;
        }
        postcard::to_allocvec(&states).map_err(|e| PtyError::Io(std::io::Error::other(e)))
    }

    /// Undoes [`Sessions::prepare_handover`]: the update did not happen.
    pub fn cancel_handover(&self) {
        for master in lock(&self.map).values().filter_map(|s| s.master.as_ref()) {
            let _ = rustix::io::fcntl_setfd(master, rustix::io::FdFlags::CLOEXEC);
        }
        self.pause.resume();
    }

    /// Takes over the sessions an agent update handed to this process (the state from
    /// [`Sessions::prepare_handover`]); returns how many. A session whose descriptor is not
    /// there any more is skipped, and said so.
    pub fn restore(&self, state: &[u8]) -> Result<usize, PtyError> {
        let states: Vec<SessionState> = postcard::from_bytes(state)
            .map_err(|e| PtyError::Io(std::io::Error::other(format!("handover state: {e}"))))?;
        let mut map = lock(&self.map);
        let now = Instant::now();
        for st in states {
            let size = Size::new(st.cols, st.rows)?;
            // An ended session keeps its output for clients still to read it.
            let (master, pid) = match (st.fd, st.pid.and_then(Pid::from_raw)) {
                (Some(fd), Some(pid)) => (Some(crate::fds::claim_inherited(fd)?), Some(pid)),
                _ => (None, None),
            };
            let exit = st.exit.or(pid.is_none().then_some(-1));
            let session = PtySession::start(
                Parts {
                    id: st.id.clone(),
                    command: st.command,
                    created_at: st.created_at,
                    state: State {
                        ring: OutputRing::restored(self.ring_capacity, st.ring_start, &st.ring),
                        size,
                        exit,
                    },
                    screen: screen::Screen::restored(
                        size.rows,
                        size.cols,
                        st.screen_end,
                        &st.screen,
                    ),
                    master,
                    pid,
                    last_input: st
                        .last_input_ago_ms
                        .and_then(|ago| now.checked_sub(Duration::from_millis(ago))),
                },
                &self.pause,
            )?;
            map.insert(st.id, session);
        }
        Ok(map.len())
    }

    pub fn get(&self, id: &str) -> Result<Arc<PtySession>, PtyError> {
        lock(&self.map)
            .get(id)
            .cloned()
            .ok_or(PtyError::NoSuchSession)
    }

    pub fn list(&self) -> Vec<SessionInfo> {
        let mut out: Vec<SessionInfo> = lock(&self.map)
            .values()
            .map(|s| SessionInfo {
                id: s.id.clone(),
                command: s.command.clone(),
                size: s.size(),
                created_at: s.created_at,
                end_offset: s.end_offset(),
                exit: s.exit_code(),
            })
            .collect();
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        out
    }

    /// How many terminal sessions the agent keeps.
    pub fn count(&self) -> usize {
        lock(&self.map).len()
    }

    /// Clients attached across all sessions, and when any of them last typed.
    pub fn activity(&self) -> (usize, Option<Instant>) {
        lock(&self.map).values().fold((0, None), |(n, last), s| {
            (n + lock(&s.attached).0, last.max(*lock(&s.last_input)))
        })
    }

    /// Ends and forgets sessions that nobody has been attached to for the detached TTL.
    /// Returns how many were reaped.
    pub fn reap(&self, now: Instant) -> usize {
        let mut map = lock(&self.map);
        let expired: Vec<String> = map
            .values()
            .filter(|s| {
                let (clients, since) = *lock(&s.attached);
                clients == 0 && now.saturating_duration_since(since) >= self.detached_ttl
            })
            .map(|s| s.id.clone())
            .collect();
        for id in &expired {
            if let Some(s) = map.remove(id) {
                s.kill();
            }
        }
        expired.len()
    }

    /// Ends a session's process and forgets it.
    pub fn close(&self, id: &str) -> Result<(), PtyError> {
        let session = lock(&self.map).remove(id).ok_or(PtyError::NoSuchSession)?;
        session.kill();
        Ok(())
    }
}

/// A session name a client may choose.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl Drop for Sessions {
    fn drop(&mut self) {
        for s in lock(&self.map).values() {
            s.kill();
        }
    }
}
