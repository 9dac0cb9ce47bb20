//! Messages on a files stream (version 6+; opened towards the agent with
//! [`StreamHeader::Files`](crate::stream::StreamHeader::Files)): one file operation in the
//! workspace folder, for programs (the hub's files API).
//!
//! The client's first message is a [`FileMsg::Request`]. Paths are relative to the
//! workspace folder and follow the sync rules ([`crate::sync::check_path`]: no `..`, no
//! absolute path, no link on the way, no special files); the empty path is the workspace
//! folder itself. Answers:
//! - `Read`: a file's [`FileMsg::Info`], then exactly `size` raw bytes and the end of the
//!   stream (fewer, and a reset stream, if the file shrank meanwhile); a folder's
//!   [`FileMsg::Listing`].
//! - `Write`: after the request, the client sends the content as raw bytes and finishes
//!   the stream; the agent writes a temporary file beside the target and renames it over
//!   the target once complete (a reader sees the old content or the new, never a mix; of
//!   concurrent writers the last to finish wins), then answers the new file's `Info`.
//! - `Stat`, `Mkdir`, `Move`: `Info`; `Delete`: `Info` of what was removed.
//! - Anything that fails: [`FileMsg::Error`].

use serde::{Deserialize, Serialize};

crate::tagged_messages! {
    /// Everything on a files stream.
    pub enum FileMsg {
        /// Client -> agent, first: what to do.
        1 => Request(FileRequest),
        /// Agent -> client: what is at a path (after the operation).
        2 => Info(FileInfo),
        /// Agent -> client: a folder's entries, by name.
        3 => Listing(FileListing),
        /// Agent -> client: the operation failed; nothing was changed.
        4 => Error(FileError),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileRequest {
    Stat {
        path: String,
    },
    Read {
        path: String,
    },
    Write {
        path: String,
        /// Permission bits of the new file (default: the old file's, else 0644).
        mode: Option<u32>,
        /// Create missing folders on the way.
        parents: bool,
    },
    Mkdir {
        path: String,
        /// Create missing folders on the way, and succeed if the folder exists.
        parents: bool,
    },
    Move {
        from: String,
        to: String,
        /// Replace a file (not a folder) at `to`.
        overwrite: bool,
    },
    Delete {
        path: String,
        /// Remove a folder with everything in it.
        recursive: bool,
    },
}

impl FileRequest {
    /// The paths the request names.
    pub fn paths(&self) -> Vec<&str> {
        match self {
            FileRequest::Stat { path }
            | FileRequest::Read { path }
            | FileRequest::Write { path, .. }
            | FileRequest::Mkdir { path, .. }
            | FileRequest::Delete { path, .. } => vec![path],
            FileRequest::Move { from, to, .. } => vec![from, to],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// The path (in `Info`) or the name (in a `Listing`).
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Last modification, milliseconds since the Unix epoch.
    pub mtime_ms: i64,
    /// A link's target.
    pub target: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileListing {
    pub entries: Vec<FileInfo>,
    /// Entries left out: special files, names that are not UTF-8, beyond [`MAX_LISTING`].
    pub skipped: u32,
}

/// At most this many entries per listing.
pub const MAX_LISTING: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileErrorCode {
    /// The path breaks a rule (`..`, absolute, a link on the way, too long).
    BadPath,
    NotFound,
    IsADirectory,
    NotADirectory,
    /// Something is already there.
    Exists,
    /// A folder that is not empty (delete without `recursive`).
    NotEmpty,
    /// A device, socket or pipe: never read or written.
    SpecialFile,
    PermissionDenied,
    /// The request arrived incomplete (a write whose stream was reset).
    Incomplete,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileError {
    pub code: FileErrorCode,
    pub message: String,
}
