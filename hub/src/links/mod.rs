//! The QUIC links: agents (enrollment, control sessions), CLI clients and the other
//! replicas, each spliced to agent streams; below the HTTP edge, above lifecycle.

pub mod agents;
pub mod clients;
pub mod peers;
pub mod updates;
pub mod webhooks;

use crate::AppState;

/// Serves one incoming QUIC connection to completion: by its ALPN, a CLI client, another
/// replica, or an agent (enrolling without a certificate, or connecting with one).
pub async fn handle_incoming(hub: AppState, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(e @ (quinn::ConnectionError::TimedOut | quinn::ConnectionError::Reset)) => {
            tracing::debug!(%remote, error = %e, "quic handshake abandoned");
            return;
        }
        Err(e) => {
            // A wrong CA, a wrong ALPN, a broken TLS stack: worth an operator's eye.
            tracing::info!(%remote, error = %e, "quic handshake failed");
            return;
        }
    };
    match link::alpn(&conn).as_deref() {
        Some(protocol::ALPN_CLIENT) => {
            return clients::client_connection(&hub, conn, remote).await;
        }
        Some(protocol::ALPN_PEER) => return peers::peer_connection(hub, conn, remote).await,
        _ => {}
    }
    match link::peer_certificate(&conn) {
        None => agents::enrollment_connection(&hub, conn, remote).await,
        Some(cert) => agents::agent_connection(&hub, conn, remote, &cert).await,
    }
}
