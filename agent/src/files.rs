//! Files streams (`protocol::files`): one file operation in the workspace folder. Every
//! path goes through `filesync::tree::Root` (the sync rules: no `..`, no link on the way,
//! no special files); writes land by rename from a temporary file beside the target. File
//! IO runs on blocking threads, so heartbeats and terminals keep running meanwhile; bytes
//! cross between the thread and the stream through a small channel (a slow peer slows the
//! disk side, nothing piles up).

use filesync::tree::Root;
use link::{FramedRecv, LinkError, send_msg};
use protocol::files::{
    FileError, FileErrorCode, FileInfo, FileKind, FileListing, FileMsg, FileRequest, MAX_LISTING,
};
use protocol::sync::{OpError, OpErrorCode};
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long the request may take to arrive.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes per chunk between the disk thread and the stream.
const CHUNK: usize = 256 * 1024;

fn err(code: FileErrorCode, message: impl Into<String>) -> FileError {
    FileError {
        code,
        message: message.into(),
    }
}

fn from_op(e: OpError) -> FileError {
    let code = match e.code {
        OpErrorCode::BadPath | OpErrorCode::Escape => FileErrorCode::BadPath,
        OpErrorCode::NotFound => FileErrorCode::NotFound,
        OpErrorCode::Unsupported => FileErrorCode::SpecialFile,
        OpErrorCode::NotEmpty => FileErrorCode::NotEmpty,
        _ => FileErrorCode::Other,
    };
    err(code, e.message)
}

fn from_io(path: &str, e: std::io::Error) -> FileError {
    use std::io::ErrorKind as K;
    let code = match e.kind() {
        K::NotFound => FileErrorCode::NotFound,
        K::AlreadyExists => FileErrorCode::Exists,
        K::PermissionDenied => FileErrorCode::PermissionDenied,
        K::IsADirectory => FileErrorCode::IsADirectory,
        K::NotADirectory => FileErrorCode::NotADirectory,
        K::DirectoryNotEmpty => FileErrorCode::NotEmpty,
        _ => FileErrorCode::Other,
    };
    err(code, format!("{path:?}: {e}"))
}

/// What `meta` says of the entry `name`.
fn info(name: &str, full: &Path, meta: &fs::Metadata) -> FileInfo {
    let kind = if meta.is_dir() {
        FileKind::Dir
    } else if meta.file_type().is_symlink() {
        FileKind::Symlink
    } else {
        FileKind::File
    };
    FileInfo {
        name: name.to_owned(),
        kind,
        size: meta.len(),
        mode: meta.mode() & 0o7777,
        mtime_ms: meta.mtime() * 1000 + meta.mtime_nsec() / 1_000_000,
        target: (kind == FileKind::Symlink)
            .then(|| fs::read_link(full).ok())
            .flatten()
            .map(|t| t.to_string_lossy().into_owned()),
    }
}

/// The full path of `path` (the empty path is the folder itself), checked.
fn resolve(root: &Root, path: &str, empty_ok: bool) -> Result<PathBuf, FileError> {
    if path.is_empty() && empty_ok {
        return Ok(root.dir().to_owned());
    }
    root.resolve(path).map_err(from_op)
}

/// What is at `path`, never a special file.
fn stat(root: &Root, path: &str) -> Result<(PathBuf, fs::Metadata), FileError> {
    let full = resolve(root, path, true)?;
    let meta = fs::symlink_metadata(&full).map_err(|e| from_io(path, e))?;
    let kind = meta.file_type();
    if !(kind.is_file() || kind.is_dir() || kind.is_symlink()) {
        return Err(err(
            FileErrorCode::SpecialFile,
            format!("{path:?} is a special file"),
        ));
    }
    Ok((full, meta))
}

fn listing(full: &Path, path: &str) -> Result<FileListing, FileError> {
    let mut entries = Vec::new();
    let mut skipped = 0u32;
    for entry in fs::read_dir(full).map_err(|e| from_io(path, e))? {
        let Ok(entry) = entry else {
            skipped += 1;
            continue;
        };
        let (Some(name), Ok(meta)) = (
            entry.file_name().to_str().map(str::to_owned),
            entry.metadata(),
        ) else {
            skipped += 1;
            continue;
        };
        let kind = meta.file_type();
        if !(kind.is_file() || kind.is_dir() || kind.is_symlink()) || entries.len() >= MAX_LISTING {
            skipped += 1;
            continue;
        }
        entries.push(info(&name, &entry.path(), &meta));
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(FileListing { entries, skipped })
}

/// Runs a blocking operation on the workspace folder.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FileError> + Send + 'static,
) -> Result<T, FileError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(err(FileErrorCode::Other, e.to_string())))
}

fn open_root(options: &filesync::serve::Options) -> Result<Root, FileError> {
    Root::open(&options.home, &[], options.owner).map_err(from_op)
}

/// Serves one files stream (`Accepted` has been sent).
pub async fn serve(
    options: &filesync::serve::Options,
    send: &mut quinn::SendStream,
    mut recv: FramedRecv,
) -> Result<(), LinkError> {
    let request = match tokio::time::timeout(REQUEST_TIMEOUT, recv.next::<FileMsg>()).await {
        Ok(Ok(Some(FileMsg::Request(request)))) => request,
        Ok(Err(e)) => return Err(e),
        _ => {
            let e = err(FileErrorCode::Other, "the first message must be a request");
            return answer(send, Err(e)).await;
        }
    };
    let root = match open_root(options) {
        Ok(root) => root,
        Err(e) => return answer(send, Err(e)).await,
    };
    match request {
        FileRequest::Read { path } => read(root, path, send).await,
        FileRequest::Write {
            path,
            mode,
            parents,
        } => {
            let result = write(root, path, mode, parents, recv).await;
            answer(send, result).await
        }
        other => {
            let result = blocking(move || change(root, other)).await;
            answer(send, result).await
        }
    }
}

async fn answer(
    send: &mut quinn::SendStream,
    result: Result<FileMsg, FileError>,
) -> Result<(), LinkError> {
    let msg = result.unwrap_or_else(FileMsg::Error);
    send_msg(send, &msg).await?;
    let _ = send.finish();
    Ok(())
}

/// Stat, mkdir, move, delete.
fn change(mut root: Root, request: FileRequest) -> Result<FileMsg, FileError> {
    match request {
        FileRequest::Stat { path } => {
            let (full, meta) = stat(&root, &path)?;
            Ok(FileMsg::Info(info(&path, &full, &meta)))
        }
        FileRequest::Mkdir { path, parents } => {
            let full = resolve(&root, &path, false)?;
            match fs::symlink_metadata(&full) {
                Ok(meta) if meta.is_dir() && parents => {
                    return Ok(FileMsg::Info(info(&path, &full, &meta)));
                }
                Ok(_) => return Err(err(FileErrorCode::Exists, format!("{path:?} exists"))),
                Err(_) => {}
            }
            if parents {
                root.create_parents(&path).map_err(from_op)?;
            }
            root.apply(&path, None, &protocol::sync::Action::Mkdir)
                .map_err(from_op)?;
            let (full, meta) = stat(&root, &path)?;
            Ok(FileMsg::Info(info(&path, &full, &meta)))
        }
        FileRequest::Move {
            from,
            to,
            overwrite,
        } => {
            let (from_full, _) = stat(&root, &from)?;
            let to_full = resolve(&root, &to, false)?;
            if from_full == root.dir() {
                return Err(err(FileErrorCode::BadPath, "the workspace folder stays"));
            }
            match fs::symlink_metadata(&to_full) {
                Ok(m) if m.is_dir() => {
                    return Err(err(
                        FileErrorCode::IsADirectory,
                        format!("{to:?} is a folder"),
                    ));
                }
                Ok(_) if !overwrite => {
                    return Err(err(FileErrorCode::Exists, format!("{to:?} exists")));
                }
                _ => {}
            }
            // A file in the way is replaced in one step.
            fs::rename(&from_full, &to_full).map_err(|e| from_io(&from, e))?;
            let (full, meta) = stat(&root, &to)?;
            Ok(FileMsg::Info(info(&to, &full, &meta)))
        }
        FileRequest::Delete { path, recursive } => {
            let full = resolve(&root, &path, false)?;
            let meta = fs::symlink_metadata(&full).map_err(|e| from_io(&path, e))?;
            let gone = info(&path, &full, &meta);
            if meta.is_dir() {
                if recursive {
                    // Never follows links inside.
                    fs::remove_dir_all(&full)
                } else {
                    fs::remove_dir(&full)
                }
            } else {
                fs::remove_file(&full)
            }
            .map_err(|e| from_io(&path, e))?;
            Ok(FileMsg::Info(gone))
        }
        FileRequest::Read { .. } | FileRequest::Write { .. } => {
            Err(err(FileErrorCode::Other, "not a change"))
        }
    }
}

/// A file's info and bytes, or a folder's listing.
async fn read(root: Root, path: String, send: &mut quinn::SendStream) -> Result<(), LinkError> {
    let opened = blocking({
        let path = path.clone();
        move || {
            let (full, meta) = stat(&root, &path)?;
            if meta.is_dir() {
                return Ok(Err(FileMsg::Listing(listing(&full, &path)?)));
            }
            let (file, meta) = root.open_read(&path).map_err(from_op)?;
            Ok(Ok((file, info(&path, &full, &meta))))
        }
    })
    .await;
    let (mut file, info) = match opened {
        Ok(Ok(opened)) => opened,
        Ok(Err(listing)) => return answer(send, Ok(listing)).await,
        Err(e) => return answer(send, Err(e)).await,
    };
    let size = info.size;
    send_msg(send, &FileMsg::Info(info)).await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let reader = tokio::task::spawn_blocking(move || {
        let mut left = size;
        while left > 0 {
            let mut buf = vec![0u8; CHUNK.min(left as usize)];
            let n = match file.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            buf.truncate(n);
            left -= n as u64;
            if tx.blocking_send(buf).is_err() {
                break;
            }
        }
        left
    });
    while let Some(chunk) = rx.recv().await {
        send.write_all(&chunk).await?;
    }
    match reader.await {
        Ok(0) => {
            let _ = send.finish();
        }
        // The file shrank while it was read: the reader must not take it as whole.
        _ => {
            let _ = send.reset(quinn::VarInt::from_u32(1));
        }
    }
    Ok(())
}

/// Receives a file's content and moves it into place.
async fn write(
    root: Root,
    path: String,
    mode: Option<u32>,
    parents: bool,
    recv: FramedRecv,
) -> Result<FileMsg, FileError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
    let writer = tokio::task::spawn_blocking(move || {
        let mut root = root;
        let full = resolve(&root, &path, false)?;
        let old = fs::symlink_metadata(&full).ok();
        if let Some(old) = &old {
            if old.is_dir() {
                return Err(err(
                    FileErrorCode::IsADirectory,
                    format!("{path:?} is a folder"),
                ));
            }
            if !old.is_file() && !old.file_type().is_symlink() {
                return Err(err(
                    FileErrorCode::SpecialFile,
                    format!("{path:?} is a special file"),
                ));
            }
        }
        if parents {
            root.create_parents(&path).map_err(from_op)?;
        }
        let mut incoming = root.create(&path, 0o600, -1, false).map_err(from_op)?;
        let mut complete = false;
        while let Some(chunk) = rx.blocking_recv() {
            // An empty chunk marks the end of a complete stream.
            if chunk.is_empty() {
                complete = true;
                break;
            }
            incoming.write(&chunk).map_err(from_op)?;
        }
        if !complete {
            return Err(err(
                FileErrorCode::Incomplete,
                "the content did not arrive whole",
            ));
        }
        let mode = mode
            .or_else(|| old.filter(|m| m.is_file()).map(|m| m.permissions().mode()))
            .unwrap_or(0o644);
        root.commit_over(incoming, mode).map_err(from_op)?;
        let (full, meta) = stat(&root, &path)?;
        Ok(FileMsg::Info(info(&path, &full, &meta)))
    });
    let (mut stream, mut decoder) = recv.into_parts();
    let early = decoder.take_buffered();
    // Bytes go to the disk thread in chunks of at least half of `CHUNK` (a sender's small
    // frames would otherwise cost a thread wake-up each).
    let pump = async {
        let mut buf = early;
        loop {
            match stream.read_chunk(CHUNK, true).await {
                Ok(Some(chunk)) => {
                    buf.extend_from_slice(&chunk.bytes);
                    if buf.len() >= CHUNK / 2
                        && tx
                            .send(std::mem::replace(&mut buf, Vec::with_capacity(CHUNK)))
                            .await
                            .is_err()
                    {
                        return;
                    }
                }
                Ok(None) => {
                    if !buf.is_empty() && tx.send(buf).await.is_err() {
                        return;
                    }
                    let _ = tx.send(Vec::new()).await;
                    return;
                }
                // Reset: the writer sees the channel close without the end mark.
                Err(_) => return,
            }
        }
    };
    pump.await;
    drop(tx);
    writer
        .await
        .unwrap_or_else(|e| Err(err(FileErrorCode::Other, e.to_string())))
}
