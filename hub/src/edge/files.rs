//! The files API: `GET`, `PUT`, `DELETE` and `POST` on `/workspaces/:id/files/{path}`,
//! one files stream to the agent per request (`protocol::files`). Content streams both
//! ways (any size, never whole in the hub's memory); paths follow the sync rules on the
//! agent, and writes land by rename. Errors are JSON codes: `bad_path`, `not_found`,
//! `is_a_directory`, `not_a_directory`, `exists`, `not_empty`, `special_file`,
//! `permission_denied`, `incomplete`.

use crate::AppState;
use crate::base::metrics::Relayed;
use crate::domain::auth::Caller;
use crate::edge::agent_unreachable;
use crate::edge::api::{ApiError, ValidJson};
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use link::FramedRecv;
use protocol::files::{FileError, FileErrorCode, FileInfo, FileKind, FileMsg, FileRequest};
use protocol::stream::{FilesOpen, StreamHeader};
use serde::{Deserialize, Serialize};

/// What is at a path.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FileView {
    /// The path (relative to the workspace folder), or the name in a listing.
    pub name: String,
    /// `file`, `dir` or `symlink`.
    pub kind: &'static str,
    pub size: u64,
    /// Permission bits (e.g. 420 = 0644).
    pub mode: u32,
    /// Last modification, milliseconds since the Unix epoch.
    pub mtime_ms: i64,
    /// A link's target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl From<FileInfo> for FileView {
    fn from(i: FileInfo) -> Self {
        FileView {
            name: i.name,
            kind: match i.kind {
                FileKind::File => "file",
                FileKind::Dir => "dir",
                FileKind::Symlink => "symlink",
            },
            size: i.size,
            mode: i.mode,
            mtime_ms: i.mtime_ms,
            target: i.target,
        }
    }
}

/// A folder's entries.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ListingView {
    pub entries: Vec<FileView>,
    /// Entries left out (special files, names that are not UTF-8, beyond 10,000).
    pub skipped: u32,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct GetQuery {
    /// Answer what is at the path (JSON) instead of its content.
    #[serde(default)]
    pub stat: bool,
    /// A browser token (purpose `files`) instead of a bearer token: a plain link downloads.
    pub ticket: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PutQuery {
    /// Permission bits of the file, octal (`755`); default: the old file's, else `644`.
    #[param(pattern = r"^[0-7]{1,4}$")]
    pub mode: Option<String>,
    /// Create missing folders on the way (default true).
    pub parents: Option<bool>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeleteQuery {
    /// Remove a folder with everything in it.
    #[serde(default)]
    pub recursive: bool,
}

/// A change that carries no content.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum FileAction {
    /// Create the folder (`parents`: and the missing ones on the way; no error if it exists).
    Mkdir {
        #[serde(default)]
        parents: bool,
    },
    /// Move (rename) to `to`; `overwrite` replaces a file there.
    Move {
        to: String,
        #[serde(default)]
        overwrite: bool,
    },
}

fn error(e: FileError) -> ApiError {
    let (status, code) = match e.code {
        FileErrorCode::BadPath => (StatusCode::BAD_REQUEST, "bad_path"),
        FileErrorCode::NotFound => (StatusCode::NOT_FOUND, "not_found"),
        FileErrorCode::IsADirectory => (StatusCode::CONFLICT, "is_a_directory"),
        FileErrorCode::NotADirectory => (StatusCode::CONFLICT, "not_a_directory"),
        FileErrorCode::Exists => (StatusCode::CONFLICT, "exists"),
        FileErrorCode::NotEmpty => (StatusCode::CONFLICT, "not_empty"),
        FileErrorCode::SpecialFile => (StatusCode::CONFLICT, "special_file"),
        FileErrorCode::PermissionDenied => (StatusCode::FORBIDDEN, "permission_denied"),
        FileErrorCode::Incomplete => (StatusCode::BAD_REQUEST, "incomplete"),
        FileErrorCode::Other => (StatusCode::INTERNAL_SERVER_ERROR, "file_error"),
    };
    ApiError::new(status, code, e.message)
}

/// A files stream to the caller's workspace's agent, with `request` sent.
async fn open(
    hub: &AppState,
    caller: &Caller,
    id: &str,
    request: FileRequest,
) -> Result<(quinn::SendStream, FramedRecv, Relayed), ApiError> {
    let header = StreamHeader::Files(FilesOpen {});
    let first = FileMsg::Request(request);
    crate::edge::agent_stream(hub, caller, id, header, &first, "the files API").await
}

/// The agent's one answer as JSON.
async fn answer(recv: &mut FramedRecv, created: bool) -> Result<Response, ApiError> {
    json(
        recv.expect::<FileMsg>().await.map_err(agent_unreachable)?,
        created,
    )
}

fn json(msg: FileMsg, created: bool) -> Result<Response, ApiError> {
    match msg {
        FileMsg::Info(info) => {
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok((status, axum::Json(FileView::from(info))).into_response())
        }
        FileMsg::Listing(l) => Ok(axum::Json(ListingView {
            entries: l.entries.into_iter().map(FileView::from).collect(),
            skipped: l.skipped,
        })
        .into_response()),
        FileMsg::Error(e) => Err(error(e)),
        FileMsg::Request(_) => Err(agent_unreachable("unexpected answer")),
    }
}

#[derive(Debug, Deserialize)]
pub struct IdAndPath {
    id: String,
    /// The route's `{*rest}` (absent on `/workspaces/{id}/files`: the folder itself).
    #[serde(default, rename = "rest")]
    path: String,
}

#[utoipa::path(get, path = "/workspaces/{id}/files/{path}", tag = "files", security(("bearer" = [])),
    description = "A file's content (streamed, `application/octet-stream`, with `Content-Length`), a folder's listing (JSON `ListingView`), or with `stat=true` what is at the path (JSON `FileView`). Paths are relative to the workspace folder (`/workspaces/{id}/files` is the folder itself, where only GET succeeds); `..`, links on the way and special files are refused. Reading a file that shrinks meanwhile ends the response early (an incomplete body).",
    params(("id" = String, Path, description = "Workspace id (UUID), or the name of one of yours (browser tokens: the id)"), ("path" = String, Path, description = "Relative path (may hold `/`)"), GetQuery),
    responses(
        (status = 200, description = "The content, the listing, or the stat", body = ListingView),
        (status = 400, description = "A path that breaks the rules (`bad_path`), or a bad query", body = crate::edge::api::ErrorBody),
        (status = 401, description = "Missing or bad token", body = crate::edge::api::ErrorBody),
        (status = 404, description = "No such workspace (or not yours), or no such path (`not_found`)", body = crate::edge::api::ErrorBody),
        (status = 409, description = "A special file (`special_file`); no agent (`agent_offline`, `agent_outdated`)", body = crate::edge::api::ErrorBody),
        (status = 503, description = "The agent is between hub replicas (`agent_offline`, with `Retry-After`)", body = crate::edge::api::ErrorBody)))]
pub async fn get(
    State(hub): State<AppState>,
    caller: Caller,
    Path(p): Path<IdAndPath>,
    query: Result<Query<GetQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let request = if query.stat {
        FileRequest::Stat { path: p.path }
    } else {
        FileRequest::Read { path: p.path }
    };
    let (_send, mut recv, relayed) = open(&hub, &caller, &p.id, request).await?;
    let info = match recv.expect::<FileMsg>().await.map_err(agent_unreachable)? {
        FileMsg::Info(info) if !query.stat => info,
        // Everything but content: JSON.
        other => return json(other, false),
    };
    let (stream, mut decoder) = recv.into_parts();
    let early = decoder.take_buffered();
    relayed.bytes.inc_by(early.len() as u64);
    let first =
        futures_util::stream::iter((!early.is_empty()).then(|| Ok(axum::body::Bytes::from(early))));
    let rest =
        futures_util::stream::unfold((stream, relayed), |(mut stream, relayed)| async move {
            match stream.read_chunk(256 * 1024, true).await {
                Ok(Some(chunk)) => {
                    relayed.bytes.inc_by(chunk.bytes.len() as u64);
                    Some((Ok(chunk.bytes), (stream, relayed)))
                }
                Ok(None) => None,
                Err(e) => Some((Err(std::io::Error::other(e)), (stream, relayed))),
            }
        });
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, info.size.to_string()),
        ],
        axum::body::Body::from_stream(first.chain(rest)),
    )
        .into_response())
}

#[utoipa::path(put, path = "/workspaces/{id}/files/{path}", tag = "files", security(("bearer" = [])),
    description = "Writes a file from the request body (streamed, any size): into a temporary file beside the target, renamed over it once the body is complete, so a reader sees the old content or the new, never a mix, and of concurrent writers the last to finish wins. An interrupted upload changes nothing.",
    params(("id" = String, Path, description = "Workspace id (UUID), or the name of one of yours (browser tokens: the id)"), ("path" = String, Path, description = "Relative path (may hold `/`)"), PutQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "Written; what is there now", body = FileView),
        (status = 400, description = "A path that breaks the rules (`bad_path`), a bad `mode`, an incomplete body (`incomplete`)", body = crate::edge::api::ErrorBody),
        (status = 401, description = "Missing or bad token", body = crate::edge::api::ErrorBody),
        (status = 404, description = "No such workspace (or not yours); a missing folder with `parents=false` (`not_found`)", body = crate::edge::api::ErrorBody),
        (status = 409, description = "A folder or special file is there (`is_a_directory`, `special_file`); no agent (`agent_offline`)", body = crate::edge::api::ErrorBody),
        (status = 503, description = "The agent is between hub replicas (`agent_offline`, with `Retry-After`)", body = crate::edge::api::ErrorBody)))]
pub async fn put(
    State(hub): State<AppState>,
    caller: Caller,
    Path(p): Path<IdAndPath>,
    query: Result<Query<PutQuery>, axum::extract::rejection::QueryRejection>,
    body: Request,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let octal =
        |m: &str| (1..=4).contains(&m.len()) && m.bytes().all(|b| (b'0'..=b'7').contains(&b));
    let mode = match query
        .mode
        .as_deref()
        .map(|m| (octal(m), u32::from_str_radix(m, 8)))
    {
        None => None,
        Some((true, Ok(m))) => Some(m),
        Some(_) => return Err(ApiError::invalid("mode is octal permission bits, like 644")),
    };
    let request = FileRequest::Write {
        path: p.path,
        mode,
        parents: query.parents.unwrap_or(true),
    };
    let (mut send, mut recv, relayed) = open(&hub, &caller, &p.id, request).await?;
    let mut body = body.into_body().into_data_stream();
    // The agent may refuse before the body is through (a folder there): its answer wins.
    let upload = async {
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| ApiError::invalid(format!("body: {e}")))?;
            relayed.bytes.inc_by(chunk.len() as u64);
            send.write_chunk(chunk).await.map_err(agent_unreachable)?;
        }
        send.finish().map_err(agent_unreachable)?;
        Ok::<_, ApiError>(())
    };
    let answered = tokio::select! {
        uploaded = upload => match uploaded {
            Ok(()) => None,
            Err(e) => {
                // Not complete: the agent drops its temporary file.
                let _ = send.reset(quinn::VarInt::from_u32(1));
                return Err(e);
            }
        },
        answer = answer(&mut recv, true) => Some(answer),
    };
    match answered {
        Some(answer) => answer,
        None => answer(&mut recv, true).await,
    }
}

#[utoipa::path(delete, path = "/workspaces/{id}/files/{path}", tag = "files", security(("bearer" = [])),
    description = "Removes a file, a link (not what it points to) or an empty folder; with `recursive=true`, a folder and everything in it (links inside are removed, never followed).",
    params(("id" = String, Path, description = "Workspace id (UUID), or the name of one of yours (browser tokens: the id)"), ("path" = String, Path, description = "Relative path (may hold `/`)"), DeleteQuery),
    responses(
        (status = 200, description = "Removed; what was there", body = FileView),
        (status = 400, description = "A path that breaks the rules (`bad_path`)", body = crate::edge::api::ErrorBody),
        (status = 401, description = "Missing or bad token", body = crate::edge::api::ErrorBody),
        (status = 404, description = "No such workspace (or not yours), or no such path (`not_found`)", body = crate::edge::api::ErrorBody),
        (status = 409, description = "A folder that is not empty (`not_empty`); no agent (`agent_offline`)", body = crate::edge::api::ErrorBody),
        (status = 503, description = "The agent is between hub replicas (`agent_offline`, with `Retry-After`)", body = crate::edge::api::ErrorBody)))]
pub async fn delete(
    State(hub): State<AppState>,
    caller: Caller,
    Path(p): Path<IdAndPath>,
    query: Result<Query<DeleteQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    let request = FileRequest::Delete {
        path: p.path,
        recursive: query.recursive,
    };
    let (_send, mut recv, _relayed) = open(&hub, &caller, &p.id, request).await?;
    answer(&mut recv, false).await
}

#[utoipa::path(post, path = "/workspaces/{id}/files/{path}", tag = "files", security(("bearer" = [])),
    description = "Creates a folder (`{\"action\":\"mkdir\",\"parents\":true}`) or moves what is at the path (`{\"action\":\"move\",\"to\":\"new/path\",\"overwrite\":false}`; a file at `to` is replaced in one step with `overwrite`, a folder never).",
    params(("id" = String, Path, description = "Workspace id (UUID), or the name of one of yours (browser tokens: the id)"), ("path" = String, Path, description = "Relative path (may hold `/`)")),
    request_body = FileAction,
    responses(
        (status = 200, description = "Done; what is at the (new) path", body = FileView),
        (status = 400, description = "A path that breaks the rules (`bad_path`), a bad body", body = crate::edge::api::ErrorBody),
        (status = 401, description = "Missing or bad token", body = crate::edge::api::ErrorBody),
        (status = 404, description = "No such workspace (or not yours), or no such path or folder (`not_found`)", body = crate::edge::api::ErrorBody),
        (status = 409, description = "Something is in the way (`exists`, `is_a_directory`); no agent (`agent_offline`)", body = crate::edge::api::ErrorBody),
        (status = 503, description = "The agent is between hub replicas (`agent_offline`, with `Retry-After`)", body = crate::edge::api::ErrorBody)))]
pub async fn post(
    State(hub): State<AppState>,
    caller: Caller,
    Path(p): Path<IdAndPath>,
    ValidJson(action): ValidJson<FileAction>,
) -> Result<Response, ApiError> {
    let request = match action {
        FileAction::Mkdir { parents } => FileRequest::Mkdir {
            path: p.path,
            parents,
        },
        FileAction::Move { to, overwrite } => FileRequest::Move {
            from: p.path,
            to,
            overwrite,
        },
    };
    let (_send, mut recv, _relayed) = open(&hub, &caller, &p.id, request).await?;
    answer(&mut recv, false).await
}
