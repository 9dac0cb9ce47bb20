//! A sync root: scanning into a manifest, and every change made to it.
//!
//! Safety rules, applied to every path from a peer or a plan:
//! - the path passes [`check_path`] (relative, no `.`/`..`, no empty parts);
//! - every folder on the way is a real folder, never a symbolic link ([`OpErrorCode::Escape`]);
//! - the last component is never followed: links are read, replaced or removed as links;
//! - devices, sockets and FIFOs are neither read nor replaced ([`OpErrorCode::Unsupported`]);
//! - file content goes to a temporary file beside the target (`.wsh-sync-*.tmp`, never
//!   scanned), is checked against the sender's hash, and is renamed into place only if the
//!   target still holds what the sender expected.

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use protocol::sync::delta::{self, BlockSig, Op};
use protocol::sync::plan::Tree;
use protocol::sync::{
    FileMeta, Hash, Node, OpError, OpErrorCode, check_link_target, check_path, parent, same,
};
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const TEMP_PREFIX: &str = ".wsh-sync-";
const TEMP_SUFFIX: &str = ".tmp";

fn is_temp(name: &str) -> bool {
    name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX)
}

fn io(context: &str, e: std::io::Error) -> OpError {
    let code = match e.kind() {
        std::io::ErrorKind::NotFound => OpErrorCode::NotFound,
        std::io::ErrorKind::DirectoryNotEmpty => OpErrorCode::NotEmpty,
        _ => OpErrorCode::Io,
    };
    OpError::new(code, format!("{context}: {e}"))
}

/// What the scanner remembers of a hashed file, to hash it again only when it changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Stat {
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    ino: u64,
    mode: u32,
}

impl Stat {
    fn of(m: &fs::Metadata) -> Stat {
        Stat {
            size: m.size(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
            ino: m.ino(),
            mode: m.mode() & 0o777,
        }
    }

    fn node(&self, hash: Hash) -> Node {
        Node::File(FileMeta {
            size: self.size,
            mode: self.mode,
            mtime_ns: self.mtime_ns,
            hash,
        })
    }
}

fn hash_file(path: &Path) -> std::io::Result<Hash> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(open_nofollow(path)?)?;
    Ok(Hash(*hasher.finalize().as_bytes()))
}

/// Hashes one file of the tree. A file that changed while it was hashed gets a stat that
/// never matches the cache, so the next scan hashes it again.
fn hash_one(dir: &Path, rel: &str, stat: &Stat) -> Option<(String, Stat, Hash)> {
    let path = dir.join(rel);
    let hash = hash_file(&path).ok()?;
    let now = Stat::of(&fs::symlink_metadata(&path).ok()?);
    let stat = if now == *stat {
        now
    } else {
        Stat {
            ino: u64::MAX,
            ..now
        }
    };
    Some((rel.to_owned(), stat, hash))
}

fn open_nofollow(path: &Path) -> std::io::Result<File> {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
}

/// Hashes of files by path, valid while size, times, inode and mode stay the same; kept
/// between sessions so a new session does not read every file again.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct HashCache(HashMap<String, (Stat, Hash)>);

/// A folder being synced.
pub struct Root {
    dir: PathBuf,
    /// Created entries are given to this user and group (an agent running as root).
    owner: Option<(u32, u32)>,
    ignore: Arc<Gitignore>,
    cache: HashCache,
    /// Each folder's own ignore rules, for rescans of single paths.
    folder_rules: HashMap<String, Arc<Gitignore>>,
    /// What the last scan left out, and why (special files, bad names, escaping links).
    pub skipped: Vec<String>,
}

impl std::fmt::Debug for Root {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Root").field("dir", &self.dir).finish()
    }
}

/// An incoming file: a temporary file beside its target, hashed as it is written.
pub struct Incoming {
    pub path: String,
    tmp: tempfile::NamedTempFile,
    hasher: blake3::Hasher,
    /// The file a delta refers to, with its block length.
    base: Option<(File, u64)>,
    mode: u32,
    mtime_ns: i64,
    pub written: u64,
}

impl Incoming {
    /// Copies blocks of the base file into the new file.
    fn copy_blocks(
        &mut self,
        base: &mut File,
        block: u64,
        first: u32,
        count: u32,
        buf: &mut Vec<u8>,
    ) -> Result<(), OpError> {
        let mut left = u64::from(count) * block;
        base.seek(SeekFrom::Start(u64::from(first) * block))
            .map_err(|e| io("base", e))?;
        if buf.is_empty() {
            *buf = vec![0; 256 * 1024];
        }
        let mut copied = 0;
        while left > 0 {
            let want = (left as usize).min(buf.len());
            let n = base.read(&mut buf[..want]).map_err(|e| io("base", e))?;
            if n == 0 {
                break;
            }
            self.write(&buf[..n])?;
            left -= n as u64;
            copied += n;
        }
        if copied == 0 {
            return Err(OpError::new(OpErrorCode::Changed, "the base file shrank"));
        }
        Ok(())
    }

    pub fn write(&mut self, bytes: &[u8]) -> Result<(), OpError> {
        self.tmp.write_all(bytes).map_err(|e| io(&self.path, e))?;
        self.hasher.update(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Applies delta operations against the base file.
    pub fn apply(&mut self, ops: &[Op]) -> Result<(), OpError> {
        let mut buf = Vec::new();
        for op in ops {
            match op {
                Op::Literal(bytes) => self.write(bytes)?,
                Op::Copy { first, count } => {
                    let Some((mut base, block)) = self.base.take() else {
                        return Err(OpError::new(
                            OpErrorCode::BadRequest,
                            "delta without a base",
                        ));
                    };
                    let copied = self.copy_blocks(&mut base, block, *first, *count, &mut buf);
                    self.base = Some((base, block));
                    copied?;
                }
            }
        }
        Ok(())
    }
}

impl Root {
    /// Opens (and creates, if missing) the folder. `extra_ignores` are gitignore patterns on
    /// top of the tree's own `.gitignore` and `.ignore` files.
    pub fn open(
        dir: &Path,
        extra_ignores: &[String],
        owner: Option<(u32, u32)>,
    ) -> Result<Root, OpError> {
        // Create what is missing, each new folder owned like the rest of the tree.
        let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
        for d in missing.into_iter().rev() {
            fs::create_dir(d).map_err(|e| io(&d.display().to_string(), e))?;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::lchown(d, Some(uid), Some(gid)).map_err(|e| io("chown", e))?;
            }
        }
        let meta = fs::symlink_metadata(dir).map_err(|e| io(&dir.display().to_string(), e))?;
        if !meta.is_dir() {
            return Err(OpError::new(
                OpErrorCode::BadPath,
                format!("{} is not a folder", dir.display()),
            ));
        }
        let mut builder = GitignoreBuilder::new(dir);
        for pattern in extra_ignores {
            builder.add_line(None, pattern).map_err(|e| {
                OpError::new(OpErrorCode::BadRequest, format!("ignore {pattern:?}: {e}"))
            })?;
        }
        let ignore = builder
            .build()
            .map_err(|e| OpError::new(OpErrorCode::BadRequest, format!("ignore rules: {e}")))?;
        Ok(Root {
            dir: dir.to_owned(),
            owner,
            ignore: Arc::new(ignore),
            cache: HashCache::default(),
            folder_rules: HashMap::new(),
            skipped: Vec::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Hands over the hash cache (to keep it for the next session).
    pub fn take_cache(&mut self) -> HashCache {
        std::mem::take(&mut self.cache)
    }

    /// The hash cache as it stands.
    pub fn cache(&self) -> &HashCache {
        &self.cache
    }

    /// Starts from a cache an earlier session kept.
    pub fn set_cache(&mut self, cache: HashCache) {
        self.cache = cache;
    }

    /// Scans the whole tree. Files whose size, times, inode and mode are unchanged since
    /// the last scan keep their hash; the others are hashed again (on a few threads).
    pub fn scan(&mut self) -> Tree {
        let mut tree = Tree::new();
        self.skipped.clear();
        self.folder_rules.clear();
        let dir = self.dir.clone();
        let fresh = self.walk(&dir, &mut tree, false);
        // Forget files that are gone.
        self.cache
            .0
            .retain(|p, _| fresh.contains(p) || tree.contains_key(p));
        tree
    }

    /// Updates `tree` for paths that file events named (absolute, under the root).
    /// Returns false when only a full scan will do (an ignore file changed, too many
    /// paths, or a name that is not UTF-8).
    pub fn rescan_paths(&mut self, tree: &mut Tree, paths: &[PathBuf]) -> bool {
        if paths.len() > 4096 {
            return false;
        }
        let mut rels = std::collections::BTreeSet::new();
        for p in paths {
            let Ok(rel) = p.strip_prefix(&self.dir) else {
                continue;
            };
            let Some(rel) = rel.to_str() else {
                return false;
            };
            if rel.is_empty() {
                return false;
            }
            let name = rel.rsplit('/').next().unwrap_or(rel);
            if name == ".gitignore" || name == ".ignore" {
                return false;
            }
            if check_path(rel).is_ok() {
                rels.insert(rel.to_owned());
            }
        }
        for rel in rels {
            self.rescan_one(tree, &rel);
        }
        true
    }

    fn rescan_one(&mut self, tree: &mut Tree, rel: &str) {
        // What was at and below the path goes; what is there now comes back.
        tree.remove(rel);
        let below: Vec<String> = tree
            .range(format!("{rel}/")..format!("{rel}0"))
            .map(|(p, _)| p.clone())
            .collect();
        for p in below {
            tree.remove(&p);
        }
        let Ok(full) = self.resolve(rel) else { return };
        let Ok(meta) = fs::symlink_metadata(&full) else {
            return;
        };
        if self.ignored(rel, meta.is_dir()) {
            return;
        }
        // Folders on the way (their own events may have been merged away).
        let mut up = parent(rel);
        while let Some(p) = up {
            if tree.contains_key(p) {
                break;
            }
            tree.insert(p.to_owned(), Node::Dir);
            up = parent(p);
        }
        if meta.is_dir() {
            tree.insert(rel.to_owned(), Node::Dir);
            self.walk(&full, tree, true);
        } else if let Some(node) = self.node_of(rel, &full, &meta) {
            tree.insert(rel.to_owned(), node);
        }
    }

    /// The node for a non-folder entry (hashing a file unless the cache knows it).
    fn node_of(&mut self, rel: &str, full: &Path, meta: &fs::Metadata) -> Option<Node> {
        let kind = meta.file_type();
        if kind.is_symlink() {
            let target = fs::read_link(full).ok()?;
            match target.to_str() {
                Some(t) if check_link_target(rel, t).is_ok() => Some(Node::Symlink(t.to_owned())),
                _ => {
                    self.skipped.push(format!(
                        "{rel}: link to {} leaves the folder (not synced)",
                        target.display()
                    ));
                    None
                }
            }
        } else if kind.is_file() {
            let stat = Stat::of(meta);
            if let Some((s, hash)) = self.cache.0.get(rel)
                && *s == stat
            {
                return Some(stat.node(*hash));
            }
            let (_, stat, hash) = self.hash_all(vec![(rel.to_owned(), stat)]).pop()?;
            self.cache.0.insert(rel.to_owned(), (stat, hash));
            Some(stat.node(hash))
        } else {
            self.skipped
                .push(format!("{rel}: not a file, folder or link (not synced)"));
            None
        }
    }

    /// The ignore rules of one folder (its `.gitignore`, then `.ignore`), cached until the
    /// next full scan.
    fn folder_rules(&mut self, rel_dir: &str) -> Arc<Gitignore> {
        if let Some(rules) = self.folder_rules.get(rel_dir) {
            return rules.clone();
        }
        let dir = if rel_dir.is_empty() {
            self.dir.clone()
        } else {
            self.dir.join(rel_dir)
        };
        let mut builder = GitignoreBuilder::new(&dir);
        for name in [".gitignore", ".ignore"] {
            let file = dir.join(name);
            if file.is_file() {
                builder.add(file);
            }
        }
        let rules = Arc::new(builder.build().unwrap_or_else(|_| Gitignore::empty()));
        self.folder_rules.insert(rel_dir.to_owned(), rules.clone());
        rules
    }

    /// Whether a path is ignored: by the extra patterns or an ignore file of any folder
    /// above it (the deepest decides), or because a folder above it is ignored.
    fn ignored(&mut self, rel: &str, is_dir: bool) -> bool {
        let mut up = parent(rel);
        while let Some(p) = up {
            if self.ignored_here(p, true) {
                return true;
            }
            up = parent(p);
        }
        self.ignored_here(rel, is_dir)
    }

    fn ignored_here(&mut self, rel: &str, is_dir: bool) -> bool {
        let full = self.dir.join(rel);
        let name = rel.rsplit('/').next().unwrap_or(rel);
        if is_temp(name) || self.ignore.matched(&full, is_dir).is_ignore() {
            return true;
        }
        let mut folder = parent(rel);
        loop {
            let rules = self.folder_rules(folder.unwrap_or(""));
            match rules.matched(&full, is_dir) {
                ignore::Match::Ignore(_) => return true,
                ignore::Match::Whitelist(_) => return false,
                ignore::Match::None => {}
            }
            match folder {
                Some(f) => folder = parent(f),
                None => return false,
            }
        }
    }

    /// Walks `start` (the root, or a folder in it) into `tree`, with the tree's ignore
    /// files; `recheck` also applies the rules of the folders above `start`. Returns the
    /// files it saw.
    fn walk(
        &mut self,
        start: &Path,
        tree: &mut Tree,
        recheck: bool,
    ) -> std::collections::HashSet<String> {
        let ignore = self.ignore.clone();
        let walk = ignore::WalkBuilder::new(start)
            .hidden(false)
            .parents(false)
            .ignore(true)
            .git_ignore(true)
            .git_global(false)
            .git_exclude(false)
            .require_git(false)
            .follow_links(false)
            .filter_entry(move |e| {
                let temp = e.file_name().to_str().is_some_and(is_temp);
                let is_dir = e.file_type().is_some_and(|t| t.is_dir());
                !temp && !ignore.matched(e.path(), is_dir).is_ignore()
            })
            .build();
        let mut to_hash: Vec<(String, Stat)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for entry in walk {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    self.skipped.push(e.to_string());
                    continue;
                }
            };
            if entry.depth() == 0 {
                continue;
            }
            let Ok(rel) = entry.path().strip_prefix(&self.dir) else {
                continue;
            };
            let Some(rel) = rel.to_str().map(str::to_owned) else {
                self.skipped
                    .push(format!("{}: name is not UTF-8", entry.path().display()));
                continue;
            };
            if let Err(e) = check_path(&rel) {
                self.skipped.push(e.message);
                continue;
            }
            let Some(kind) = entry.file_type() else {
                continue;
            };
            if recheck && self.ignored(&rel, kind.is_dir()) {
                continue;
            }
            if kind.is_dir() {
                tree.insert(rel, Node::Dir);
            } else if kind.is_file() {
                let Ok(meta) = entry.metadata() else { continue };
                let stat = Stat::of(&meta);
                match self.cache.0.get(&rel) {
                    Some((s, hash)) if *s == stat => {
                        seen.insert(rel.clone());
                        tree.insert(rel, stat.node(*hash));
                    }
                    _ => to_hash.push((rel, stat)),
                }
            } else if let Ok(meta) = entry.metadata()
                && let Some(node) = self.node_of(&rel, entry.path(), &meta)
            {
                tree.insert(rel, node);
            }
        }
        for (rel, stat, hash) in self.hash_all(to_hash) {
            seen.insert(rel.clone());
            self.cache.0.insert(rel.clone(), (stat, hash));
            tree.insert(rel, stat.node(hash));
        }
        seen
    }

    /// Hashes files, on a few threads when there are several.
    fn hash_all(&self, files: Vec<(String, Stat)>) -> Vec<(String, Stat, Hash)> {
        let dir = &self.dir;
        if files.len() <= 1 {
            return files
                .iter()
                .filter_map(|(rel, stat)| hash_one(dir, rel, stat))
                .collect();
        }
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
        let per = files.len().div_ceil(threads);
        std::thread::scope(|s| {
            let jobs: Vec<_> = files
                .chunks(per)
                .map(|chunk| {
                    s.spawn(move || {
                        chunk
                            .iter()
                            .filter_map(|(rel, stat)| hash_one(dir, rel, stat))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            jobs.into_iter()
                .flat_map(|j| j.join().unwrap_or_default())
                .collect()
        })
    }

    /// The full path of a checked relative path whose folders are all real folders.
    /// Missing folders are fine (the path does not exist); a link or file on the way is not.
    pub fn resolve(&self, path: &str) -> Result<PathBuf, OpError> {
        check_path(path)?;
        let mut full = self.dir.clone();
        let mut parts = path.split('/').peekable();
        while let Some(part) = parts.next() {
            full.push(part);
            if parts.peek().is_none() {
                break;
            }
            match fs::symlink_metadata(&full) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(OpError::new(
                        OpErrorCode::Escape,
                        format!("{path:?}: runs through a symbolic link"),
                    ));
                }
                Ok(_) => {
                    return Err(OpError::new(
                        OpErrorCode::NotFound,
                        format!("{path:?}: a part of it is not a folder"),
                    ));
                }
                Err(_) => {
                    // Nothing below a missing folder exists.
                    for rest in parts {
                        full.push(rest);
                    }
                    return Ok(full);
                }
            }
        }
        Ok(full)
    }

    /// What is at `path` now.
    pub fn current(&mut self, path: &str) -> Result<Option<Node>, OpError> {
        let full = self.resolve(path)?;
        let meta = match fs::symlink_metadata(&full) {
            Ok(m) => m,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(io(path, e)),
        };
        let kind = meta.file_type();
        if kind.is_dir() {
            Ok(Some(Node::Dir))
        } else if kind.is_symlink() {
            let target = fs::read_link(&full).map_err(|e| io(path, e))?;
            Ok(Some(Node::Symlink(target.to_string_lossy().into_owned())))
        } else if kind.is_file() {
            let stat = Stat::of(&meta);
            if let Some((s, hash)) = self.cache.0.get(path)
                && *s == stat
            {
                return Ok(Some(stat.node(*hash)));
            }
            let hash = hash_file(&full).map_err(|e| io(path, e))?;
            self.cache.0.insert(path.to_owned(), (stat, hash));
            Ok(Some(stat.node(hash)))
        } else {
            Err(OpError::new(
                OpErrorCode::Unsupported,
                format!("{path:?} is a special file"),
            ))
        }
    }

    fn expect(&mut self, path: &str, expect: Option<&Node>) -> Result<Option<Node>, OpError> {
        let now = self.current(path)?;
        if same(now.as_ref(), expect) {
            Ok(now)
        } else {
            Err(OpError::new(
                OpErrorCode::Changed,
                format!("{path:?} changed since it was scanned"),
            ))
        }
    }

    fn parent_exists(&self, path: &str, full: &Path) -> Result<(), OpError> {
        match full.parent().map(fs::symlink_metadata) {
            Some(Ok(m)) if m.is_dir() => Ok(()),
            _ => Err(OpError::new(
                OpErrorCode::NotFound,
                format!("the folder of {path:?} does not exist"),
            )),
        }
    }

    fn chown(&self, full: &Path) -> Result<(), OpError> {
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::lchown(full, Some(uid), Some(gid)).map_err(|e| io("chown", e))?;
        }
        Ok(())
    }

    /// Clears the way for a new entry: removes a file, link or empty folder in its place.
    fn clear(&mut self, path: &str, full: &Path, now: Option<&Node>) -> Result<(), OpError> {
        match now {
            None => Ok(()),
            Some(Node::Dir) => fs::remove_dir(full).map_err(|e| io(path, e)),
            Some(_) => fs::remove_file(full).map_err(|e| io(path, e)),
        }?;
        self.cache.0.remove(path);
        Ok(())
    }

    /// Starts receiving a file. With `delta`, the current file is the base of the delta.
    pub fn create(
        &mut self,
        path: &str,
        mode: u32,
        mtime_ns: i64,
        delta: bool,
    ) -> Result<Incoming, OpError> {
        let full = self.resolve(path)?;
        self.parent_exists(path, &full)?;
        let folder = full.parent().unwrap_or(&self.dir);
        let tmp = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .suffix(TEMP_SUFFIX)
            .tempfile_in(folder)
            .map_err(|e| io(path, e))?;
        let base = if delta {
            match self.current(path)? {
                Some(Node::File(f)) => {
                    let file = open_nofollow(&full).map_err(|e| io(path, e))?;
                    Some((file, u64::from(delta::block_len(f.size))))
                }
                _ => {
                    return Err(OpError::new(
                        OpErrorCode::Changed,
                        format!("{path:?}: no file to apply a delta to"),
                    ));
                }
            }
        } else {
            None
        };
        Ok(Incoming {
            path: path.to_owned(),
            tmp,
            hasher: blake3::Hasher::new(),
            base,
            mode: mode & 0o777,
            mtime_ns,
            written: 0,
        })
    }

    /// Moves a received file into place if its content hashes to `hash` and the target
    /// still holds `expect`.
    pub fn commit(
        &mut self,
        incoming: Incoming,
        hash: Hash,
        expect: Option<&Node>,
    ) -> Result<Node, OpError> {
        let path = incoming.path.clone();
        if Hash(*incoming.hasher.finalize().as_bytes()) != hash {
            return Err(OpError::new(
                OpErrorCode::HashMismatch,
                format!("{path:?}: content does not match its hash"),
            ));
        }
        let full = self.resolve(&path)?;
        let file = incoming.tmp.as_file();
        file.set_permissions(fs::Permissions::from_mode(incoming.mode))
            .map_err(|e| io(&path, e))?;
        let mtime = if incoming.mtime_ns >= 0 {
            UNIX_EPOCH + Duration::from_nanos(incoming.mtime_ns as u64)
        } else {
            SystemTime::now()
        };
        file.set_modified(mtime).map_err(|e| io(&path, e))?;
        self.chown(incoming.tmp.path())?;
        let now = self.expect(&path, expect)?;
        if matches!(now, Some(Node::Dir)) {
            self.clear(&path, &full, now.as_ref())?;
        }
        self.persist(incoming, path, &full, hash)
    }

    /// Renames a finished incoming file over `full` and remembers its hash.
    fn persist(
        &mut self,
        incoming: Incoming,
        path: String,
        full: &Path,
        hash: Hash,
    ) -> Result<Node, OpError> {
        incoming.tmp.persist(full).map_err(|e| io(&path, e.error))?;
        let meta = fs::symlink_metadata(full).map_err(|e| io(&path, e))?;
        let stat = Stat::of(&meta);
        self.cache.0.insert(path, (stat, hash));
        Ok(stat.node(hash))
    }

    /// Applies a change that carries no content.
    pub fn apply(
        &mut self,
        path: &str,
        expect: Option<&Node>,
        action: &protocol::sync::Action,
    ) -> Result<Option<Node>, OpError> {
        use protocol::sync::Action;
        let full = self.resolve(path)?;
        let now = self.expect(path, expect)?;
        match action {
            Action::Mkdir => {
                if now == Some(Node::Dir) {
                    return Ok(now);
                }
                self.parent_exists(path, &full)?;
                self.clear(path, &full, now.as_ref())?;
                fs::create_dir(&full).map_err(|e| io(path, e))?;
                self.chown(&full)?;
                Ok(Some(Node::Dir))
            }
            Action::Symlink(target) => {
                check_link_target(path, target)?;
                self.parent_exists(path, &full)?;
                self.clear(path, &full, now.as_ref())?;
                std::os::unix::fs::symlink(target, &full).map_err(|e| io(path, e))?;
                self.chown(&full)?;
                Ok(Some(Node::Symlink(target.clone())))
            }
            Action::Remove => {
                self.clear(path, &full, now.as_ref())?;
                Ok(None)
            }
            Action::Chmod(mode) => {
                if !matches!(now, Some(Node::File(_))) {
                    return Err(OpError::new(
                        OpErrorCode::Changed,
                        format!("{path:?} is not a file"),
                    ));
                }
                fs::set_permissions(&full, fs::Permissions::from_mode(mode & 0o777))
                    .map_err(|e| io(path, e))?;
                self.current(path)
            }
            Action::Rename(to) => {
                let to_full = self.resolve(to)?;
                if now.is_none() {
                    return Err(OpError::new(
                        OpErrorCode::NotFound,
                        format!("{path:?} does not exist"),
                    ));
                }
                if self.current(to)?.is_some() {
                    return Err(OpError::new(OpErrorCode::Changed, format!("{to:?} exists")));
                }
                self.parent_exists(to, &to_full)?;
                fs::rename(&full, &to_full).map_err(|e| io(path, e))?;
                if let Some(entry) = self.cache.0.remove(path) {
                    self.cache.0.insert(to.clone(), entry);
                }
                self.current(to)
            }
        }
    }

    /// Opens a regular file of the tree for reading, with what it is.
    pub fn open_file(&mut self, path: &str) -> Result<(File, FileMeta), OpError> {
        let full = self.resolve(path)?;
        match self.current(path)? {
            Some(Node::File(meta)) => Ok((open_nofollow(&full).map_err(|e| io(path, e))?, meta)),
            Some(_) => Err(OpError::new(
                OpErrorCode::Changed,
                format!("{path:?} is not a file"),
            )),
            None => Err(OpError::new(
                OpErrorCode::NotFound,
                format!("{path:?} does not exist"),
            )),
        }
    }

    /// Opens a regular file for reading without hashing it (the files API streams it).
    pub fn open_read(&self, path: &str) -> Result<(File, fs::Metadata), OpError> {
        let full = self.resolve(path)?;
        // Never blocks on a FIFO put there meanwhile (regular files ignore O_NONBLOCK).
        let flags = rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK;
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(flags.bits() as i32)
            .open(&full)
            .map_err(|e| io(path, e))?;
        let meta = file.metadata().map_err(|e| io(path, e))?;
        if !meta.is_file() {
            return Err(OpError::new(
                if meta.is_dir() {
                    OpErrorCode::Changed
                } else {
                    OpErrorCode::Unsupported
                },
                format!("{path:?} is not a file"),
            ));
        }
        Ok((file, meta))
    }

    /// Creates the missing folders on the way to `path` (not `path` itself), each owned
    /// like the rest of the tree.
    pub fn create_parents(&self, path: &str) -> Result<(), OpError> {
        let full = self.resolve(path)?;
        let mut missing: Vec<&Path> = full
            .ancestors()
            .skip(1)
            .take_while(|d| *d != self.dir && !d.exists())
            .collect();
        missing.reverse();
        for d in missing {
            match fs::create_dir(d) {
                Ok(()) => self.chown(d)?,
                // Another writer made it meanwhile.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io(path, e)),
            }
        }
        // What exists now must still be real folders all the way.
        self.resolve(path).map(|_| ())
    }

    /// Moves a received file into place over whatever file is there (the last complete
    /// write wins), with `mode`, modified now.
    pub fn commit_over(&mut self, incoming: Incoming, mode: u32) -> Result<Node, OpError> {
        let path = incoming.path.clone();
        let hash = Hash(*incoming.hasher.finalize().as_bytes());
        let full = self.resolve(&path)?;
        let file = incoming.tmp.as_file();
        file.set_permissions(fs::Permissions::from_mode(mode & 0o777))
            .map_err(|e| io(&path, e))?;
        self.chown(incoming.tmp.path())?;
        if matches!(fs::symlink_metadata(&full), Ok(m) if m.is_dir()) {
            return Err(OpError::new(
                OpErrorCode::Changed,
                format!("{path:?} is a folder"),
            ));
        }
        self.persist(incoming, path, &full, hash)
    }

    /// The block signature of a file of the tree.
    pub fn signature(&mut self, path: &str) -> Result<(u32, Vec<BlockSig>), OpError> {
        let (file, meta) = self.open_file(path)?;
        signature_of(file, meta.size)
    }
}

/// The block signature of an open file whose size was `size` when it was scanned.
pub fn signature_of(mut file: File, size: u64) -> Result<(u32, Vec<BlockSig>), OpError> {
    let block = delta::block_len(size);
    let mut sig = delta::SignatureBuilder::new(block);
    let mut buf = vec![0; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| io("signature", e))?;
        if n == 0 {
            break;
        }
        sig.feed(&buf[..n]);
    }
    Ok((block, sig.finish()))
}
