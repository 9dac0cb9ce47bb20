//! Agent updates (protocol 9+): the hub offers the agent binary of its own version, the
//! agent asks for it when it is free to restart, and the hub sends it on a stream of its
//! own. The binary is trusted for what an update key the agent's image holds signed (an
//! Ed25519 signature over [`signed_message`]), never for having come from the hub: a hub
//! can offer, not impose.

use serde::{Deserialize, Serialize};

/// The largest agent binary an agent accepts (the static release binary is about 10 MiB;
/// a debug build, about 40).
pub const MAX_BINARY_LEN: u64 = 256 << 20;

/// Hub -> agent, after the welcome: a newer agent is available.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateOffer {
    /// Its version (semver).
    pub version: String,
    /// Its length in bytes and SHA-256.
    pub size: u64,
    pub sha256: [u8; 32],
    /// Ed25519 over [`signed_message`] of the three fields above.
    pub signature: Vec<u8>,
}

/// Agent -> hub: send the binary of this version now (the hub opens an
/// [`crate::stream::StreamHeader::AgentUpdate`] stream).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateRequest {
    pub version: String,
}

/// Agent -> hub: what became of an offer, for the hub's log and the fleet's view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateStatus {
    pub version: String,
    pub state: UpdateState,
    /// Why, for people (at most [`MAX_STATUS_MESSAGE`] bytes are kept).
    pub message: String,
}

/// The longest [`UpdateStatus::message`] a hub keeps.
pub const MAX_STATUS_MESSAGE: usize = 512;

/// See [`UpdateStatus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpdateState {
    /// Not taken: not newer than the running agent, failed here before, or no update key.
    Declined,
    /// Taken, waiting for streams that a restart would cut (exec, forwards, sync, files).
    Waiting,
    /// The binary did not match the offer or its signature: thrown away.
    Refused,
    /// The binary did not start here (its self-check failed): thrown away, not tried again.
    Failed,
    /// Verified and installed; the agent restarts into it now, terminals kept.
    Restarting,
}

/// The header of the stream that carries the binary: exactly `size` bytes follow, then the
/// hub finishes the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentUpdateOpen {
    pub version: String,
    pub size: u64,
}

/// A signed agent binary's description, as a file beside it (TOML): what `workspace-hub
/// agent-update sign` writes, what the hub offers from, and what an agent keeps beside the
/// binary it installed (checked again before each start of it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    pub version: String,
    pub size: u64,
    /// Hex.
    pub sha256: String,
    /// Hex, 64 bytes of Ed25519.
    pub signature: String,
}

impl Release {
    /// The offer this release makes; `None` when a field is malformed.
    pub fn offer(&self) -> Option<UpdateOffer> {
        parse_version(&self.version)?;
        let sha256 = from_hex(&self.sha256)?.try_into().ok()?;
        let signature = from_hex(&self.signature).filter(|s| s.len() == 64)?;
        (self.size <= MAX_BINARY_LEN).then(|| UpdateOffer {
            version: self.version.clone(),
            size: self.size,
            sha256,
            signature,
        })
    }

    /// The release an offer describes.
    pub fn of(offer: &UpdateOffer) -> Self {
        Self {
            version: offer.version.clone(),
            size: offer.size,
            sha256: to_hex(&offer.sha256),
            signature: to_hex(&offer.signature),
        }
    }
}

/// Lower-case hex.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes from hex (either case); `None` for anything else.
pub fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

/// What an update key signs: the purpose, the version, the length and the hash, so a
/// signature for one binary or version never passes for another.
pub fn signed_message(version: &str, size: u64, sha256: &[u8; 32]) -> Vec<u8> {
    format!(
        "workspace-agent update 1\nversion {version}\nsize {size}\nsha256 {}\n",
        to_hex(sha256)
    )
    .into_bytes()
}

/// A version string as updates use it: semver, at most 64 bytes.
pub fn parse_version(version: &str) -> Option<semver::Version> {
    (version.len() <= 64)
        .then(|| semver::Version::parse(version).ok())
        .flatten()
}

/// Whether `offered` is newer than `running` (semver precedence; build metadata does not
/// count). Anything that is not a version is never newer.
pub fn is_newer(offered: &str, running: &str) -> bool {
    match (parse_version(offered), parse_version(running)) {
        (Some(offered), Some(running)) => {
            offered.cmp_precedence(&running) == std::cmp::Ordering::Greater
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_is_semver_precedence() {
        assert!(is_newer("0.9.1", "0.9.0"));
        assert!(is_newer("0.9.1-test.1", "0.9.0"));
        assert!(is_newer("0.10.0", "0.9.9"));
        assert!(!is_newer("0.9.0", "0.9.0"));
        assert!(!is_newer("0.9.0+other", "0.9.0"));
        assert!(!is_newer("0.9.0-rc.1", "0.9.0"));
        assert!(!is_newer("0.8.9", "0.9.0"));
        assert!(!is_newer("1.0", "0.9.0"));
        assert!(!is_newer(&"9".repeat(70), "0.9.0"));
    }

    #[test]
    fn the_message_binds_every_field() {
        let a = signed_message("0.9.1", 10, &[1; 32]);
        assert_ne!(a, signed_message("0.9.2", 10, &[1; 32]));
        assert_ne!(a, signed_message("0.9.1", 11, &[1; 32]));
        assert_ne!(a, signed_message("0.9.1", 10, &[2; 32]));
        assert!(a.ends_with(format!("{}\n", "01".repeat(32)).as_bytes()));
    }

    #[test]
    fn releases_round_trip_and_refuse_junk() {
        let offer = UpdateOffer {
            version: "0.9.1".into(),
            size: 5,
            sha256: [0xab; 32],
            signature: vec![7; 64],
        };
        assert_eq!(Release::of(&offer).offer(), Some(offer.clone()));
        let mut bad = Release::of(&offer);
        bad.signature.pop();
        assert_eq!(bad.offer(), None);
        let mut bad = Release::of(&offer);
        bad.sha256 = "zz".repeat(32);
        assert_eq!(bad.offer(), None);
        let mut bad = Release::of(&offer);
        bad.version = "latest".into();
        assert_eq!(bad.offer(), None);
        assert_eq!(from_hex("é1"), None);
    }
}
