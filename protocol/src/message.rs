//! Tagged messages: every message on the wire is `tag (varint u16) ++ postcard(body)`.
//!
//! Tags are written out by hand in each enum (see [`tagged_messages!`]), never derived from
//! declaration order, so reordering code cannot change the wire and a retired tag is simply
//! never written again. A duplicate tag inside one enum fails to compile (unreachable
//! pattern, denied in this workspace).

use crate::ProtocolError;

/// A family of tagged messages that can travel in a frame.
pub trait Message: Sized {
    /// The never-reused wire tag of this value's variant.
    fn tag(&self) -> u16;
    /// Appends the postcard body of this value (without the tag).
    fn encode_body(&self, out: Vec<u8>) -> Result<Vec<u8>, ProtocolError>;
    /// Decodes a body for a tag read off the wire.
    fn decode_body(tag: u16, body: &[u8]) -> Result<Self, ProtocolError>;

    /// Decodes a full payload (`tag ++ body`).
    fn from_payload(payload: &[u8]) -> Result<Self, ProtocolError> {
        if payload.is_empty() {
            return Err(ProtocolError::EmptyFrame);
        }
        let (tag, body) = postcard::take_from_bytes::<u16>(payload)?;
        Self::decode_body(tag, body)
    }
}

/// Declares an enum whose variants each wrap one body type under an explicit tag.
///
/// ```text
/// tagged_messages! {
///     /// Docs.
///     pub enum ControlMsg {
///         1 => Hello(Hello),
///         2 => Welcome(Welcome),
///     }
/// }
/// ```
#[macro_export]
macro_rules! tagged_messages {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $tag:literal => $variant:ident($body:ty), )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq)]
        pub enum $name {
            $( $(#[$vmeta])* $variant($body), )*
        }

        impl $name {
            /// Every tag this enum uses, in declaration order.
            pub const TAGS: &'static [u16] = &[$($tag),*];
        }

        impl $crate::message::Message for $name {
            fn tag(&self) -> u16 {
                match self {
                    $( Self::$variant(_) => $tag, )*
                }
            }

            fn encode_body(&self, out: Vec<u8>) -> Result<Vec<u8>, $crate::ProtocolError> {
                match self {
                    $( Self::$variant(body) => Ok(postcard::to_extend(body, out)?), )*
                }
            }

            fn decode_body(tag: u16, body: &[u8]) -> Result<Self, $crate::ProtocolError> {
                match tag {
                    $( $tag => Ok(Self::$variant(postcard::from_bytes(body)?)), )*
                    tag => Err($crate::ProtocolError::UnknownTag { tag }),
                }
            }
        }
    };
}
