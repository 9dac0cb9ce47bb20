//! The HTTP edge: the REST API and its OpenAPI document, browser sessions and sign-in,
//! device codes, previews and browser terminals. The top layer: nothing below imports it.

pub mod api;
pub mod audit;
pub mod caller;
pub mod device;
pub mod embed;
pub mod exec;
pub mod files;
pub mod oidc;
pub mod preview;
pub mod profile;
pub mod session;
pub mod terminal;

use crate::AppState;
use crate::base::metrics::Relayed;
use crate::domain::auth::Caller;
use api::ApiError;
use axum::http::StatusCode;
use link::{FramedRecv, send_msg};
use protocol::stream::{StreamHeader, StreamRefusal, StreamReply};

/// The agent could not be reached, or answered out of turn.
pub fn agent_unreachable(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::BAD_GATEWAY, "agent_unreachable", e.to_string())
}

/// A stream to the agent of the caller's workspace `id`, opened with `header` and its first
/// message, once the agent has accepted it, counted in `/metrics` while the returned
/// [`Relayed`] lives. A refusal becomes the API's error: the agent moved (retry), predates
/// `feature` (`agent_outdated`), or cannot be reached.
pub async fn agent_stream<M: protocol::Message>(
    hub: &AppState,
    caller: &Caller,
    id: &str,
    header: StreamHeader,
    first: &M,
    feature: &str,
) -> Result<(quinn::SendStream, FramedRecv, Relayed), ApiError> {
    let workspace = caller.workspace(hub, id).await?;
    let agent = crate::links::peers::agent_path_waiting(hub, &workspace)
        .await
        .ok_or_else(|| ApiError::agent_offline(workspace.status))?;
    let (mut send, recv) = agent.open_bi().await.map_err(agent_unreachable)?;
    let mut recv = FramedRecv::new(recv);
    send_msg(&mut send, &header)
        .await
        .map_err(agent_unreachable)?;
    send_msg(&mut send, first)
        .await
        .map_err(agent_unreachable)?;
    match recv
        .expect::<StreamReply>()
        .await
        .map_err(agent_unreachable)?
    {
        StreamReply::Accepted(_) => {
            let relayed = hub
                .metrics
                .relayed(crate::links::clients::stream_kind(&header));
            Ok((send, recv, relayed))
        }
        StreamReply::Refused(r) if r.reason == StreamRefusal::Moved => {
            Err(ApiError::retry_later("agent_moved", r.message))
        }
        StreamReply::Refused(r)
            if matches!(
                r.reason,
                StreamRefusal::BadHeader | StreamRefusal::Unsupported
            ) =>
        {
            Err(ApiError::new(
                StatusCode::CONFLICT,
                "agent_outdated",
                format!(
                    "the workspace's agent predates {feature}: start the workspace again to update it"
                ),
            ))
        }
        StreamReply::Refused(r) => Err(agent_unreachable(r.message)),
        StreamReply::Forwarding(_) => Err(agent_unreachable("unexpected answer")),
    }
}
