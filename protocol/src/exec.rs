//! Messages on an exec stream (version 6+; opened towards the agent with
//! [`StreamHeader::Exec`](crate::stream::StreamHeader::Exec)): one command run without a
//! terminal, its stdout and stderr kept apart, its exit status at the end.
//!
//! The client's first message is [`ExecMsg::Start`]; the agent answers
//! [`ExecMsg::Started`] or [`ExecMsg::Failed`]. Then stdin flows one way
//! ([`ExecMsg::Stdin`], [`ExecMsg::StdinEnd`]) and output the other, each kind in order;
//! [`ExecMsg::Exit`] is the agent's last message once the process has exited and both of
//! its output pipes are closed. QUIC flow control is the backpressure: an agent whose
//! stream is full stops reading the pipes, and the command blocks on its writes.

use serde::{Deserialize, Serialize};

/// At most this many arguments.
pub const MAX_ARGS: usize = 4096;
/// At most this many bytes of arguments, environment and folder together.
pub const MAX_START_BYTES: usize = 256 * 1024;
/// At most this many environment variables.
pub const MAX_ENV: usize = 1024;
/// Output and input travel in chunks of at most this many bytes.
pub const MAX_CHUNK: usize = 64 * 1024;

crate::tagged_messages! {
    /// Everything on an exec stream, in both directions.
    pub enum ExecMsg {
        /// Client -> agent, first: what to run.
        1 => Start(ExecStart),
        /// Agent -> client: it runs.
        2 => Started(ExecStarted),
        /// Agent -> client: it could not start (no such program or folder, a bad
        /// request), or (after `Started`, instead of `Exit`) the agent lost track of it;
        /// the stream ends.
        3 => Failed(ExecFailed),
        /// Client -> agent: bytes for the command's stdin.
        4 => Stdin(ExecData),
        /// Client -> agent: stdin is closed.
        5 => StdinEnd(ExecStdinEnd),
        /// Client -> agent: send a signal to the command (and everything it started).
        6 => Signal(ExecSignal),
        /// Agent -> client: bytes the command wrote to stdout.
        7 => Stdout(ExecData),
        /// Agent -> client: bytes the command wrote to stderr.
        8 => Stderr(ExecData),
        /// Agent -> client, last: how the command ended.
        9 => Exit(ExecExit),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ExecStart {
    /// Program and arguments; the program is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Added to (or replacing in) the agent's environment for the workspace user.
    pub env: Vec<(String, String)>,
    /// The working folder: absolute, or relative to the workspace folder (the default).
    pub cwd: Option<String>,
    /// Kill the command (and everything it started) after this long.
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecStarted {
    pub pid: u32,
}

/// Why a command could not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecFailure {
    /// The request breaks a rule (no program, too large, a bad variable name, a NUL).
    BadRequest,
    /// No such program.
    NotFound,
    /// The program or folder may not be used.
    PermissionDenied,
    /// The working folder does not exist.
    NoSuchFolder,
    /// Anything else the system refused.
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecFailed {
    pub reason: ExecFailure,
    pub message: String,
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ExecData {
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for ExecData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ExecData({} bytes)", self.bytes.len())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ExecStdinEnd {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSignal {
    /// One of [`SIGNALS`] (by number, as on Linux).
    pub signal: i32,
}

/// The signals a client may send: HUP, INT, QUIT, KILL, USR1, USR2, TERM, CONT, STOP.
pub const SIGNALS: [(i32, &str); 9] = [
    (1, "HUP"),
    (2, "INT"),
    (3, "QUIT"),
    (9, "KILL"),
    (10, "USR1"),
    (12, "USR2"),
    (15, "TERM"),
    (18, "CONT"),
    (19, "STOP"),
];

/// The number of a signal named `HUP`, `SIGHUP` or `1` (of [`SIGNALS`]).
pub fn signal_number(name: &str) -> Option<i32> {
    let bare = name.strip_prefix("SIG").unwrap_or(name);
    SIGNALS
        .iter()
        .find(|(n, s)| *s == bare || n.to_string() == bare)
        .map(|(n, _)| *n)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecExit {
    /// The exit code, if the command exited.
    pub code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// The agent killed it because its timeout passed.
    pub timed_out: bool,
}

impl ExecStart {
    /// Checks the request against the rules above; the message says what is wrong.
    pub fn check(&self) -> Result<(), String> {
        let Some(program) = self.argv.first() else {
            return Err("argv is empty".into());
        };
        if program.is_empty() {
            return Err("the program name is empty".into());
        }
        if self.argv.len() > MAX_ARGS {
            return Err(format!("more than {MAX_ARGS} arguments"));
        }
        if self.env.len() > MAX_ENV {
            return Err(format!("more than {MAX_ENV} environment variables"));
        }
        let size: usize = self.argv.iter().map(String::len).sum::<usize>()
            + self
                .env
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
            + self.cwd.as_ref().map_or(0, String::len);
        if size > MAX_START_BYTES {
            return Err(format!("more than {MAX_START_BYTES} bytes of arguments"));
        }
        let strings = self
            .argv
            .iter()
            .chain(self.env.iter().flat_map(|(k, v)| [k, v]))
            .chain(&self.cwd);
        if strings.into_iter().any(|s| s.contains('\0')) {
            return Err("a NUL byte in an argument, variable or folder".into());
        }
        for (name, _) in &self.env {
            let mut chars = name.chars();
            let first_ok = chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
            if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("{name:?} is not a variable name"));
            }
        }
        if self.cwd.as_deref() == Some("") {
            return Err("the working folder is empty".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(argv: &[&str]) -> ExecStart {
        ExecStart {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn requests_are_checked() {
        assert!(start(&["true"]).check().is_ok());
        assert!(start(&[]).check().is_err());
        assert!(start(&[""]).check().is_err());
        assert!(start(&["echo", "a\0b"]).check().is_err());
        let mut s = start(&["env"]);
        s.env = vec![("GOOD_1".into(), "x y=z".into())];
        assert!(s.check().is_ok());
        for bad in ["", "1X", "A-B", "A=B", "Ä"] {
            s.env = vec![(bad.into(), "v".into())];
            assert!(s.check().is_err(), "{bad:?}");
        }
        s.env.clear();
        s.cwd = Some(String::new());
        assert!(s.check().is_err());
        let big = start(&["echo", &"x".repeat(MAX_START_BYTES)]);
        assert!(big.check().is_err());
    }

    #[test]
    fn signals_are_named_or_numbered() {
        assert_eq!(signal_number("TERM"), Some(15));
        assert_eq!(signal_number("SIGKILL"), Some(9));
        assert_eq!(signal_number("2"), Some(2));
        assert_eq!(signal_number("SEGV"), None);
        assert_eq!(signal_number("11"), None);
    }
}
