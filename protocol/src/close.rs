//! Application close codes for QUIC connections. Like tags, a code is never reused.

/// Why a connection was closed by the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum CloseCode {
    /// Orderly close; nothing went wrong.
    Normal = 0,
    /// The peer sent bytes that are not a valid frame or message here.
    ProtocolError = 1,
    /// The peer is not allowed to do what it tried (no or revoked certificate).
    Unauthorized = 2,
    /// A newer connection from the same agent took this one's place.
    Replaced = 3,
    /// The closing side is shutting down; reconnect soon.
    ShuttingDown = 4,
    /// The protocol versions cannot be reconciled.
    VersionMismatch = 5,
    /// The peer was silent for longer than the heartbeat timeout.
    HeartbeatTimeout = 6,
    /// Enrollment finished (successfully or not); this connection has no further use.
    EnrollmentDone = 7,
}

impl CloseCode {
    pub fn code(self) -> u32 {
        self as u32
    }

    /// Maps a code read off the wire; unknown codes (from newer peers) give `None`.
    pub fn from_code(code: u64) -> Option<Self> {
        Some(match code {
            0 => Self::Normal,
            1 => Self::ProtocolError,
            2 => Self::Unauthorized,
            3 => Self::Replaced,
            4 => Self::ShuttingDown,
            5 => Self::VersionMismatch,
            6 => Self::HeartbeatTimeout,
            7 => Self::EnrollmentDone,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::CloseCode;

    #[test]
    fn codes_round_trip() {
        for c in 0..8u64 {
            assert_eq!(CloseCode::from_code(c).map(|c| c.code() as u64), Some(c));
        }
        assert_eq!(CloseCode::from_code(99), None);
    }
}
