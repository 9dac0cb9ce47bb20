//! The version handshake: which protocol versions a hub accepts from an agent.
//!
//! Rule: the hub accepts its own version and the one before it (N-1), and answers with the
//! lower of the two versions, which both sides then speak.

use crate::control::{Hello, HelloRefusal, HelloRefused, Welcome};
use crate::{MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use std::time::Duration;

/// Checks a peer's protocol version; returns the version both will speak.
pub fn negotiate(peer_version: u16) -> Result<u16, HelloRefused> {
    let refuse = |reason, message: String| HelloRefused {
        reason,
        message,
        min_version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
    };
    if peer_version < MIN_PROTOCOL_VERSION {
        return Err(refuse(
            HelloRefusal::VersionTooOld,
            format!(
                "protocol version {peer_version} is too old; this hub accepts {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}"
            ),
        ));
    }
    if peer_version > PROTOCOL_VERSION {
        return Err(refuse(
            HelloRefusal::VersionTooNew,
            format!("protocol version {peer_version} is newer than this hub's {PROTOCOL_VERSION}"),
        ));
    }
    Ok(peer_version.min(PROTOCOL_VERSION))
}

/// The hub's side of the hello: a welcome, or the reason for refusing.
pub fn accept_hello(
    hello: &Hello,
    hub_version: &str,
    heartbeat_interval: Duration,
    heartbeat_timeout: Duration,
) -> Result<Welcome, HelloRefused> {
    let protocol_version = negotiate(hello.protocol_version)?;
    Ok(Welcome {
        protocol_version,
        hub_version: hub_version.to_owned(),
        heartbeat_interval_ms: heartbeat_interval.as_millis().min(u32::MAX as u128) as u32,
        heartbeat_timeout_ms: heartbeat_timeout.as_millis().min(u32::MAX as u128) as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_current_and_previous_refuses_others() {
        assert_eq!(negotiate(PROTOCOL_VERSION), Ok(PROTOCOL_VERSION));
        assert_eq!(negotiate(MIN_PROTOCOL_VERSION), Ok(MIN_PROTOCOL_VERSION));
        let too_new = negotiate(PROTOCOL_VERSION + 1).unwrap_err();
        assert_eq!(too_new.reason, HelloRefusal::VersionTooNew);
        assert_eq!(too_new.max_version, PROTOCOL_VERSION);
        let too_old = negotiate(0).unwrap_err();
        assert_eq!(too_old.reason, HelloRefusal::VersionTooOld);
        assert!(negotiate(MIN_PROTOCOL_VERSION - 1).is_err());
    }

    #[test]
    fn welcome_carries_liveness() {
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "1.0.0".into(),
            hostname: "h".into(),
        };
        let w = accept_hello(
            &hello,
            "hub",
            Duration::from_secs(2),
            Duration::from_secs(6),
        )
        .unwrap();
        assert_eq!(w.heartbeat_interval_ms, 2000);
        assert_eq!(w.heartbeat_timeout_ms, 6000);
        assert_eq!(w.protocol_version, PROTOCOL_VERSION);
    }
}
