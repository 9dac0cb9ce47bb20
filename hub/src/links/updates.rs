//! Agent updates, the hub's side (protocol 9+): `[agent_update]` names an agent binary and
//! its signed release file; every agent of an older version is offered it after its
//! welcome, and gets it on a stream of its own when it asks. The hub never signs and
//! never decides: agents check the signature against keys their image trusts, take only
//! newer versions, and say what they did ([`UpdateStatus`], logged and counted).

use crate::Hub;
use anyhow::{Context, Result, ensure};
use link::send_msg;
use protocol::stream::StreamHeader;
use protocol::update::{AgentUpdateOpen, Release, UpdateOffer, UpdateStatus};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::AsyncReadExt;

/// How many agents receive the binary at once; the rest wait their turn (a fleet that
/// reconnects to a new hub asks all at once).
const SENDING_AT_ONCE: usize = 32;

/// How many times one agent connection gets the binary: an agent cannot make the hub send
/// it again and again (a transfer that failed is tried on its next connection).
pub const SENDS_PER_CONNECTION: u32 = 1;

/// The release this hub offers.
#[derive(Debug)]
pub struct AgentRelease {
    pub offer: UpdateOffer,
    binary: PathBuf,
    sending: tokio::sync::Semaphore,
}

impl AgentRelease {
    /// Reads the release file and checks that the binary is the one it describes (the
    /// signature is for agents to check).
    /// `binary` and its release file (`release`, or the binary's path with `.release`).
    pub fn load(binary: &std::path::Path, release: Option<&std::path::Path>) -> Result<Arc<Self>> {
        let release_path = release.map_or_else(
            || {
                let mut p = binary.as_os_str().to_owned();
                p.push(".release");
                PathBuf::from(p)
            },
            std::path::Path::to_path_buf,
        );
        let text = std::fs::read_to_string(&release_path)
            .with_context(|| format!("agent_update.release {}", release_path.display()))?;
        let release: Release = toml::from_str(&text)
            .with_context(|| format!("agent_update.release {}", release_path.display()))?;
        let offer = release.offer().with_context(|| {
            format!(
                "agent_update.release {}: a malformed version, hash or signature",
                release_path.display()
            )
        })?;
        let bytes = std::fs::read(binary)
            .with_context(|| format!("agent_update.binary {}", binary.display()))?;
        let sha256 = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes);
        ensure!(
            bytes.len() as u64 == offer.size && sha256.as_ref() == offer.sha256,
            "agent_update.binary {} is not the binary {} describes",
            binary.display(),
            release_path.display()
        );
        if offer.version != env!("CARGO_PKG_VERSION") {
            tracing::warn!(version = %offer.version, hub_version = env!("CARGO_PKG_VERSION"), "the agent offered is not this hub's version");
        }
        tracing::info!(version = %offer.version, size = offer.size, "agent update offered to older agents");
        Ok(Arc::new(Self {
            offer,
            binary: binary.to_path_buf(),
            sending: tokio::sync::Semaphore::new(SENDING_AT_ONCE),
        }))
    }

    /// The offer for an agent that says it is `agent_version` and speaks `protocol`.
    pub fn offer_for(&self, agent_version: &str, protocol: u16) -> Option<UpdateOffer> {
        (protocol >= protocol::UPDATE_SINCE_VERSION
            && protocol::update::is_newer(&self.offer.version, agent_version))
        .then(|| self.offer.clone())
    }
}

/// An agent asked for `version`: sends the binary on a new stream (in the background; the
/// control session goes on). A version this hub does not offer is ignored.
pub fn send(hub: &Hub, conn: &quinn::Connection, workspace: uuid::Uuid, version: &str) {
    let Some(release) = hub
        .agent_release
        .clone()
        .filter(|r| r.offer.version == version)
    else {
        tracing::warn!(%workspace, %version, "agent asked for an update this hub does not offer");
        return;
    };
    let conn = conn.clone();
    let metrics = hub.metrics.clone();
    tokio::spawn(async move {
        let _turn = release.sending.acquire().await;
        match send_binary(&release, &conn).await {
            Ok(()) => {
                metrics.agent_updates.get_or_create(&kind("sent")).inc();
                tracing::info!(%workspace, version = %release.offer.version, "agent update sent");
            }
            Err(e) => tracing::warn!(%workspace, error = %e, "agent update not sent"),
        }
    });
}

async fn send_binary(release: &AgentRelease, conn: &quinn::Connection) -> Result<()> {
    let mut file = tokio::fs::File::open(&release.binary).await?;
    let (mut send, _recv) = conn.open_bi().await?;
    let open = AgentUpdateOpen {
        version: release.offer.version.clone(),
        size: release.offer.size,
    };
    send_msg(&mut send, &StreamHeader::AgentUpdate(open)).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut sent = 0u64;
    // Exactly the offered length, whatever the file became meanwhile: the agent checks
    // the hash. A file that became shorter resets the stream.
    while sent < release.offer.size {
        let want = (release.offer.size - sent).min(buf.len() as u64) as usize;
        let n = file.read(&mut buf[..want]).await?;
        if n == 0 {
            let _ = send.reset(quinn::VarInt::from_u32(0));
            anyhow::bail!(
                "{} is shorter than its release says",
                release.binary.display()
            );
        }
        send.write_all(&buf[..n]).await?;
        sent += n as u64;
    }
    send.finish()?;
    let _ = send.stopped().await;
    Ok(())
}

/// What an agent said of an offer: logged and counted.
pub fn status(hub: &Hub, workspace: uuid::Uuid, status: &UpdateStatus) {
    let state = match status.state {
        protocol::update::UpdateState::Declined => "declined",
        protocol::update::UpdateState::Waiting => "waiting",
        protocol::update::UpdateState::Refused => "refused",
        protocol::update::UpdateState::Failed => "failed",
        protocol::update::UpdateState::Restarting => "restarting",
    };
    hub.metrics.agent_updates.get_or_create(&kind(state)).inc();
    let message: String = status
        .message
        .chars()
        .filter(|c| !c.is_control())
        .take(protocol::update::MAX_STATUS_MESSAGE)
        .collect();
    let version: String = status
        .version
        .chars()
        .filter(|c| !c.is_control())
        .take(64)
        .collect();
    tracing::info!(%workspace, %version, state, %message, "agent update");
}

/// An offer made.
pub fn offered(hub: &Hub) {
    hub.metrics
        .agent_updates
        .get_or_create(&kind("offered"))
        .inc();
}

fn kind(kind: &'static str) -> crate::base::metrics::Kind {
    crate::base::metrics::Kind { kind }
}
