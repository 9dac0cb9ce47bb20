//! The test OpenID Connect issuer as a process, for the browser tests:
//! `test-issuer <client-id> <client-secret>` prints `{"url": ...}` and serves until killed.

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(client_id), Some(secret)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: test-issuer <client-id> <client-secret>");
    };
    let issuer = harness::oidc::TestIssuer::start(&client_id, &secret).await?;
    println!("{}", serde_json::json!({ "url": issuer.url }));
    std::future::pending::<()>().await;
    Ok(())
}
