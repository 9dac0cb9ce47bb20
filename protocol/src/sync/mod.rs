//! File sync (`StreamHeader::Sync`): the messages, the path rules, the block delta
//! ([`delta`]) and the three-way reconciliation ([`plan`]), all without IO.
//!
//! One side drives (the CLI: it holds the last agreed state and decides), the other serves
//! (the agent: it scans, watches, reads and writes its folder on request). Both sides run
//! the same checks on every path and every write, so neither trusts the other.

pub mod delta;
pub mod plan;

use serde::{Deserialize, Serialize};

/// The sync sub-protocol version carried in [`SyncHello`].
pub const SYNC_VERSION: u16 = 1;

/// The longest relative path accepted (bytes), as Linux's `PATH_MAX`.
pub const MAX_PATH_LEN: usize = 4096;

/// The largest [`DataChunk`] or literal a sender puts in one frame.
pub const CHUNK_LEN: usize = 256 * 1024;

/// A manifest frame stops growing past this many (estimated) bytes.
pub const MANIFEST_CHUNK_BYTES: usize = 256 * 1024;

crate::tagged_messages! {
    /// Messages on a sync stream, after the [`StreamReply`](crate::stream::StreamReply).
    pub enum SyncMsg {
        /// Driver -> server, first: ignore rules and version.
        1 => Hello(SyncHello),
        /// Server -> driver: the root is open; a full manifest follows.
        2 => Ready(SyncReady),
        /// Server -> driver: entries added or changed and paths removed since the server's
        /// previous manifest on this stream (the first batch is the whole tree).
        3 => Manifest(ManifestChunk),
        /// Driver -> server: rescan everything now and answer with a batch tagged `id`.
        4 => Scan(ScanRequest),
        /// Either way: a file's content follows as [`SyncMsg::Data`] (whole) or
        /// [`SyncMsg::Delta`] (against the receiver's current file), then [`SyncMsg::End`].
        5 => Put(FileHeader),
        6 => Data(DataChunk),
        7 => Delta(DeltaChunk),
        8 => End(FileEnd),
        /// Either way: block signatures of a file (answer to `SignatureRequest`, or the
        /// driver's own file before a delta `Get`).
        9 => Signature(SignatureChunk),
        /// Driver -> server: send the signature of this file.
        10 => SignatureRequest(PathRequest),
        /// Driver -> server: send this file (as a `Put` with the same id).
        11 => Get(GetRequest),
        /// Driver -> server: a change that carries no content.
        12 => Apply(ApplyRequest),
        /// Server -> driver: the outcome of a `Put`, `Apply`, `Get` or `SignatureRequest`.
        13 => Done(OpDone),
        /// Server -> driver: something the user should know (watch limits, skipped files).
        14 => Notice(Notice),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncHello {
    pub version: u16,
    /// Extra ignore patterns (gitignore syntax) on top of the tree's own `.gitignore` files.
    pub ignore: Vec<String>,
    /// The [`digest`] of the server's manifest as the driver last held it (an earlier
    /// session). If the server still holds the same tree, its first batch is only what
    /// changed since; otherwise it is the whole tree.
    pub known: Option<Hash>,
}

/// A digest of a whole manifest (BLAKE3 over its entries in order).
pub fn digest(tree: &plan::Tree) -> Hash {
    let mut hasher = blake3::Hasher::new();
    for (path, node) in tree {
        hasher.update(&(path.len() as u64).to_le_bytes());
        hasher.update(path.as_bytes());
        // Nodes are small; their postcard form always encodes.
        hasher.update(&postcard::to_stdvec(node).unwrap_or_default());
    }
    Hash(*hasher.finalize().as_bytes())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncReady {
    pub version: u16,
    /// The root as the server sees it (for display).
    pub root: String,
    /// Whether file events are watched (false: periodic rescans only).
    pub watching: bool,
    /// The server still held the tree [`SyncHello::known`] names: the first batch is what
    /// changed since. Otherwise it is the whole tree.
    pub resumed: bool,
}

/// A content hash (BLAKE3).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct Hash(pub [u8; 32]);

impl std::fmt::Debug for Hash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// What sits at a path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Node {
    Dir,
    File(FileMeta),
    /// A symbolic link, synced as a link; its target never leaves the root.
    Symlink(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileMeta {
    pub size: u64,
    /// Permission bits (`0o777`); executable bits are what matters across machines.
    pub mode: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    pub hash: Hash,
}

impl Node {
    /// Same content: kind, bytes, permissions and link target (never the time).
    pub fn same(&self, other: &Node) -> bool {
        match (self, other) {
            (Node::Dir, Node::Dir) => true,
            (Node::File(a), Node::File(b)) => {
                a.hash == b.hash && a.size == b.size && a.mode & 0o777 == b.mode & 0o777
            }
            (Node::Symlink(a), Node::Symlink(b)) => a == b,
            _ => false,
        }
    }
}

/// Whether two optional nodes hold the same content (both absent counts).
pub fn same(a: Option<&Node>, b: Option<&Node>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => a.same(b),
        _ => false,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: String,
    pub node: Node,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestChunk {
    /// The [`ScanRequest`] this batch answers, if any.
    pub scan: Option<u64>,
    /// Added or changed entries.
    pub entries: Vec<Entry>,
    /// Paths that no longer exist.
    pub removed: Vec<String>,
    /// The last chunk of a consistent batch.
    pub last: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanRequest {
    pub id: u64,
}

/// Opens a file transfer. The receiver writes to a temporary file beside the target and
/// renames it into place only if the hash in [`FileEnd`] matches what it wrote and the
/// target still holds `expect` (nothing, if `None`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileHeader {
    pub id: u64,
    pub path: String,
    pub mode: u32,
    pub mtime_ns: i64,
    pub size: u64,
    /// What the sender believes the receiver holds at `path` now.
    pub expect: Option<Node>,
    /// `Delta` chunks against the receiver's current file rather than `Data`.
    pub delta: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataChunk {
    pub id: u64,
    #[serde(with = "serde_bytes_compat")]
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaChunk {
    pub id: u64,
    pub ops: Vec<delta::Op>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEnd {
    pub id: u64,
    /// BLAKE3 of the whole new content.
    pub hash: Hash,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureChunk {
    pub id: u64,
    pub block_len: u32,
    pub blocks: Vec<delta::BlockSig>,
    pub last: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathRequest {
    pub id: u64,
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetRequest {
    pub id: u64,
    pub path: String,
    /// Answer with a delta against the signature the driver sent under this id.
    pub delta: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyRequest {
    pub id: u64,
    pub path: String,
    /// What the driver believes is at `path` now; the server refuses if it is not.
    pub expect: Option<Node>,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Create a folder (replacing what `expect` names).
    Mkdir,
    /// Create a symbolic link (replacing what `expect` names).
    Symlink(String),
    /// Remove the file, link or (empty) folder.
    Remove,
    /// Set the permission bits of a file whose content is unchanged.
    Chmod(u32),
    /// Move the entry to another path of the root (conflict copies); the target must not
    /// exist.
    Rename(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpDone {
    pub id: u64,
    /// What is at the path now, or why nothing changed.
    pub result: Result<Option<Node>, OpError>,
}

/// Why one operation failed. The stream stays open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct OpError {
    pub code: OpErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpErrorCode {
    /// The path breaks the rules of [`check_path`].
    BadPath,
    /// The path runs through a symbolic link, or a link target leaves the root.
    Escape,
    /// The target does not hold what the request expected (changed meanwhile).
    Changed,
    NotFound,
    /// The content did not hash to what the sender announced.
    HashMismatch,
    /// Devices, sockets, FIFOs: never synced.
    Unsupported,
    /// A folder to remove still has entries.
    NotEmpty,
    /// Messages out of order or a limit exceeded.
    BadRequest,
    Io,
}

impl OpError {
    pub fn new(code: OpErrorCode, message: impl Into<String>) -> Self {
        OpError {
            code,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    pub kind: NoticeKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoticeKind {
    /// The inotify watch limit was reached: changes are found by periodic rescans only.
    WatchLimit,
    /// Watching failed for another reason.
    WatchFailed,
    /// An entry was skipped (special file, non-UTF-8 name, link leaving the root).
    Skipped,
}

/// Checks a relative sync path: `/`-separated UTF-8, not empty, not absolute, no empty,
/// `.` or `..` components, no NUL, at most [`MAX_PATH_LEN`] bytes: only names of entries
/// inside the root.
pub fn check_path(path: &str) -> Result<(), OpError> {
    let bad = |why: &str| {
        Err(OpError::new(
            OpErrorCode::BadPath,
            format!("{path:?}: {why}"),
        ))
    };
    if path.is_empty() {
        return bad("empty path");
    }
    if path.len() > MAX_PATH_LEN {
        return bad("path too long");
    }
    if path.starts_with('/') {
        return bad("absolute path");
    }
    if path.contains('\0') {
        return bad("NUL in path");
    }
    for part in path.split('/') {
        match part {
            "" => return bad("empty component"),
            "." | ".." => return bad("`.` or `..` component"),
            _ if part.len() > 255 => return bad("component longer than 255 bytes"),
            _ => {}
        }
    }
    Ok(())
}

/// Checks a symbolic link's target as seen from `link` (a checked path): relative, and
/// resolving lexically to somewhere inside the root.
pub fn check_link_target(link: &str, target: &str) -> Result<(), OpError> {
    let escape = |why: &str| {
        Err(OpError::new(
            OpErrorCode::Escape,
            format!("link {link:?} -> {target:?}: {why}"),
        ))
    };
    if target.is_empty() || target.contains('\0') || target.len() > MAX_PATH_LEN {
        return escape("bad target");
    }
    if target.starts_with('/') {
        return escape("absolute target");
    }
    // Depth of the folder holding the link, then walk the target's components.
    let mut depth = link.split('/').count() as i64 - 1;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return escape("target leaves the root");
                }
            }
            _ => depth += 1,
        }
    }
    Ok(())
}

/// The parent folder of a checked path (`None` at the top).
pub fn parent(path: &str) -> Option<&str> {
    path.rsplit_once('/').map(|(p, _)| p)
}

/// serde helper: byte vectors as one length-prefixed run, not a sequence of varints.
mod serde_bytes_compat {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_borrowed_bytes<E>(self, v: &'de [u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_bytes(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked() {
        for ok in ["a", "a/b", "a/.b", "...", "a b/ü", "x..y"] {
            check_path(ok).unwrap();
        }
        for bad in [
            "", "/a", "a/", "a//b", "./a", "a/./b", "..", "a/../b", "../x", "a\0b",
        ] {
            assert_eq!(
                check_path(bad).unwrap_err().code,
                OpErrorCode::BadPath,
                "{bad}"
            );
        }
        assert!(check_path(&"a/".repeat(2100)).is_err());
        assert!(check_path(&"x".repeat(256)).is_err());
    }

    #[test]
    fn link_targets_stay_inside() {
        for (link, target) in [
            ("a", "b"),
            ("d/a", "../b"),
            ("d/e/a", "../../x/y"),
            ("a", "./b"),
        ] {
            check_link_target(link, target).unwrap();
        }
        for (link, target) in [
            ("a", "../b"),
            ("d/a", "../../b"),
            ("a", "/etc"),
            ("a", ""),
            ("d/a", "x/../../../y"),
        ] {
            assert_eq!(
                check_link_target(link, target).unwrap_err().code,
                OpErrorCode::Escape
            );
        }
    }
}
