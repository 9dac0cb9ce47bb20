//! Agent-update signing keys (`workspace-hub agent-update keygen` and `sign`): an Ed25519
//! key pair kept off the hub, whose public half images trust
//! (`/etc/workspace-agent/update-keys`), and the release file a signed binary travels with
//! (`protocol::update::Release`).

use anyhow::{Context, Result, ensure};
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine;
use protocol::update::{Release, signed_message, to_hex};
use std::path::Path;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Writes a new key pair into `out`: `update-key` (PKCS#8, base64, 0600) and
/// `update-key.pub` (the public key, one base64 line: the update-keys file format). Never
/// overwrites.
pub fn generate(out: &Path) -> Result<()> {
    let private = out.join("update-key");
    let public = out.join("update-key.pub");
    for path in [&private, &public] {
        ensure!(!path.exists(), "{} exists: not overwritten", path.display());
    }
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new())
        .map_err(|_| anyhow::anyhow!("generate an Ed25519 key"))?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|_| anyhow::anyhow!("read the new key"))?;
    crate::base::fsutil::write_private(&private, B64.encode(pkcs8.as_ref()).as_bytes())?;
    let line = format!(
        "# workspace-agent update key (Ed25519)\n{}\n",
        B64.encode(pair.public_key().as_ref())
    );
    crate::base::fsutil::write_atomic(&public, line.as_bytes(), 0o644)?;
    Ok(())
}

/// Signs the agent binary at `binary` as `version` with the key file at `key`.
pub fn sign(key: &Path, version: &str, binary: &Path) -> Result<Release> {
    ensure!(
        protocol::update::parse_version(version).is_some(),
        "{version:?} is not a version (semver, at most 64 bytes)"
    );
    let text = std::fs::read_to_string(key).with_context(|| format!("read {}", key.display()))?;
    let pkcs8 = B64
        .decode(text.trim())
        .with_context(|| format!("{}: not base64", key.display()))?;
    let pair = Ed25519KeyPair::from_pkcs8(&pkcs8)
        .map_err(|_| anyhow::anyhow!("{}: not an Ed25519 PKCS#8 key", key.display()))?;
    let bytes = std::fs::read(binary).with_context(|| format!("read {}", binary.display()))?;
    let size = bytes.len() as u64;
    ensure!(
        size <= protocol::update::MAX_BINARY_LEN,
        "{} is larger than an agent takes",
        binary.display()
    );
    let sha256: [u8; 32] = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes)
        .as_ref()
        .try_into()
        .context("SHA-256")?;
    let signature = pair.sign(&signed_message(version, size, &sha256));
    Ok(Release {
        version: version.to_owned(),
        size,
        sha256: to_hex(&sha256),
        signature: to_hex(signature.as_ref()),
    })
}
