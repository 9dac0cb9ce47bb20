//! The one error type of the protocol boundary.

/// What can go wrong when bytes from a peer are turned into messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A length prefix announced a frame larger than the limit; nothing was allocated.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: u64, max: usize },
    /// A frame with no payload at all (not even a tag).
    #[error("empty frame")]
    EmptyFrame,
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({buffered} bytes buffered)")]
    Truncated { buffered: usize },
    /// The message tag is not one this build knows.
    #[error("unknown message tag {tag}")]
    UnknownTag { tag: u16 },
    /// The tag is known but its body does not decode.
    #[error("malformed message body: {0}")]
    Malformed(String),
    /// A message arrived that is not allowed at this point of the exchange.
    #[error("unexpected message: {0}")]
    Unexpected(&'static str),
}

impl From<postcard::Error> for ProtocolError {
    fn from(e: postcard::Error) -> Self {
        ProtocolError::Malformed(e.to_string())
    }
}
