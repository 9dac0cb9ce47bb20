//! Direct sessions as `wsh` makes them (`protocol::direct`), for tests and benchmarks that
//! speak the protocol themselves.

use anyhow::{Context, Result, bail};
use link::{FramedRecv, send_msg};
use protocol::direct::{Candidates, DirectMsg, DirectOffer};
use protocol::stream::{ClientDirectOpen, StreamHeader, StreamReply};

/// Asks the hub, over `conn` (an authenticated CLI connection), for a direct session to
/// `workspace`; returns the offer and the key its certificate is for (PKCS#8 DER).
pub async fn offer(conn: &quinn::Connection, workspace: &str) -> Result<(DirectOffer, Vec<u8>)> {
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
    let (mut send, recv) = conn.open_bi().await?;
    let mut recv = FramedRecv::new(recv);
    let open = ClientDirectOpen {
        workspace_id: workspace.into(),
        csr_der: csr.der().to_vec(),
        candidates: Candidates::default(),
    };
    send_msg(&mut send, &StreamHeader::ClientDirect(open)).await?;
    match recv.expect::<StreamReply>().await? {
        StreamReply::Accepted(_) => {}
        StreamReply::Refused(r) => bail!("direct session refused: {}", r.message),
        StreamReply::Forwarding(_) => bail!("unexpected answer to a direct-session request"),
    }
    let DirectMsg::Offer(offer) = recv.expect::<DirectMsg>().await? else {
        bail!("no offer");
    };
    Ok((offer, key.serialize_der()))
}

/// A direct connection to `workspace`'s agent, brokered over `conn`; `cas` is the hub's CA
/// bundle (DER).
pub async fn connect(
    conn: &quinn::Connection,
    cas: &[Vec<u8>],
    workspace: &str,
) -> Result<quinn::Connection> {
    let (offer, key) = offer(conn, workspace).await?;
    let addr = *offer
        .agent
        .parse()
        .and_then(|a| a.first().copied())
        .as_ref()
        .context("no agent candidate")?;
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let config = link::direct_client_config(cas, (offer.cert_der, key))?;
    Ok(endpoint
        .connect_with(config, addr, &offer.server_name)?
        .await?)
}
