//! The tunnel wire protocol between the cluster gateway and the cluster agent. No I/O: the
//! gateway and agent own the sockets; this crate turns messages into bytes and back.
//!
//! Two versions are negotiated with the WebSocket subprotocol header:
//!
//! - [`v1`] (`buildplane.tunnel.v1`, or no subprotocol at all): OpenChoreo's JSON in text frames,
//!   `HTTPTunnelRequest` and `HTTPTunnelResponse` with base64 bodies. Bodies are buffered whole.
//! - [`v2`] (`buildplane.tunnel.v2`): binary frames with a type byte, a stream id and a payload,
//!   so requests multiplex, bodies stream in chunks (watch, logs follow), each stream has
//!   flow-control credits, and either side can reset one stream without closing the others.
//!
//! # v2 frame layout
//! Every WebSocket binary message is exactly one frame; all integers are big-endian.
//!
//! ```text
//! +--------+-------------+----------------+-------------------+
//! | type u8| stream u32  | length u32     | payload (length)  |
//! +--------+-------------+----------------+-------------------+
//! ```
//!
//! | type | frame | payload |
//! |---|---|---|
//! | 0x01 | `Hello` (stream 0, first frame each way) | version u16, plane id str |
//! | 0x02 | `RequestHead` | method str, target str, path str, query str, headers, flags u8 |
//! | 0x03 | `ResponseHead` | status u16, headers, flags u8 |
//! | 0x04 | `Data` | body bytes |
//! | 0x05 | `End` | empty: the sender's half of the stream is complete |
//! | 0x06 | `Reset` | code u16, reason str: the stream is abandoned |
//! | 0x07 | `WindowUpdate` | credits u32: the receiver consumed that many body bytes |
//! | 0x08 | `Ping` (stream 0) | nonce u64 |
//! | 0x09 | `Pong` (stream 0) | nonce u64 |
//! | 0x0A | `GoAway` (stream 0) | reason str: no new streams; drain and reconnect |
//!
//! `str` is a u16 length and UTF-8 bytes; `headers` is a u16 count of (name str, value str).
//! Flags: bit 0 = no body follows (the head ends the sender's half); other bits are ignored.
//! A sender may have at most [`flow::INITIAL_WINDOW`] unacknowledged body bytes per stream; the
//! [`session::Session`] owns the credits of both directions of every stream.
//!
//! From `Hello` version 3 on, a peer reads several frames back to back in one WebSocket message
//! (a small response's head, data and end leave together); a sender batches only for a peer
//! that said version 3 or later.
//!
//! # v2 rules
//! - The first frame each way is `Hello`; a peer that receives anything else first closes.
//! - Stream 0 carries only connection frames (`Hello`, `Ping`, `Pong`, `GoAway`); the stream id
//!   field of those frames is written as 0 and ignored on decode.
//! - A stream is opened by `RequestHead`, answered by `ResponseHead`, then `Data` chunks, then
//!   `End` from each side (or the head's no-body flag); `Reset` ends both halves at once.
//! - [`v2::decode`] checks the declared payload length against [`v2::Limits::max_frame`] and
//!   the input before touching the payload, caps header counts at [`v2::MAX_HEADERS`] and by the
//!   bytes present, rejects bytes after the payload or after its fields, and never panics.
//! - [`v2::encode`] never fails: over-long strings are cut at a char boundary and heads keep
//!   their first [`v2::MAX_HEADERS`] headers. [`v2::try_encode`] refuses such frames instead.
//!
//! # Example
//! ```
//! use buildplane_tunnel::v2::{self, Frame, Limits};
//!
//! let mut wire = Vec::new();
//! v2::encode(&Frame::Ping { nonce: 7 }, &mut wire);
//! assert_eq!(v2::decode(&wire, Limits::default()), Ok(Frame::Ping { nonce: 7 }));
//!
//! let text = r#"{"requestID":"1","statusCode":200}"#;
//! assert!(matches!(
//!     buildplane_tunnel::decode_v1(text),
//!     Ok(buildplane_tunnel::V1Message::Response(_))
//! ));
//! ```

pub mod flow;
pub mod session;
pub mod v1;
pub mod v2;

/// A v1 message (request or response), as decided by its fields.
pub type V1Message = v1::Message;

/// Decodes one v1 text frame with the default size limit ([`v1::DEFAULT_MAX_MESSAGE`]).
pub fn decode_v1(text: &str) -> Result<V1Message, v1::DecodeError> {
    v1::decode(text, v1::DEFAULT_MAX_MESSAGE)
}

/// Encodes a v1 message as OpenChoreo's JSON text.
pub fn encode_v1(message: &V1Message) -> String {
    v1::encode(message)
}

/// Protocol versions.
pub mod version {
    /// OpenChoreo's JSON protocol.
    pub const V1: u16 = 1;
    /// The binary multiplexed protocol.
    pub const V2: u16 = 2;
    /// v2 whose messages may carry several whole frames (said in `Hello`; the subprotocol stays
    /// `buildplane.tunnel.v2`, and a peer that says 2 gets one frame per message).
    pub const V3: u16 = 3;
    /// The newest version this build speaks.
    pub const CURRENT: u16 = V3;
}

/// Largest tunnel message (and WebSocket frame) the gateway and the agent accept from each
/// other, in either version: a v2 frame, or a v1 JSON message with its base64 body.
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// The WebSocket subprotocol of v1.
pub const SUBPROTOCOL_V1: &str = "buildplane.tunnel.v1";
/// The WebSocket subprotocol of v2.
pub const SUBPROTOCOL_V2: &str = "buildplane.tunnel.v2";

/// Picks the version for a `Sec-WebSocket-Protocol` offer: v2 when offered, else v1 (OpenChoreo
/// agents offer nothing).
pub fn negotiate(offered: Option<&str>) -> (u16, Option<&'static str>) {
    let offered = offered.unwrap_or("");
    let has = |name: &str| offered.split(',').any(|p| p.trim() == name);
    if has(SUBPROTOCOL_V2) {
        (version::V2, Some(SUBPROTOCOL_V2))
    } else if has(SUBPROTOCOL_V1) {
        (version::V1, Some(SUBPROTOCOL_V1))
    } else {
        (version::V1, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// v2 wins when offered; OpenChoreo agents (no header) get v1.
    #[test]
    fn negotiation_prefers_v2() {
        assert_eq!(
            negotiate(Some("buildplane.tunnel.v1, buildplane.tunnel.v2")),
            (2, Some(SUBPROTOCOL_V2))
        );
        assert_eq!(
            negotiate(Some("buildplane.tunnel.v1")),
            (1, Some(SUBPROTOCOL_V1))
        );
        assert_eq!(negotiate(None), (1, None));
        assert_eq!(negotiate(Some("chat")), (1, None));
    }
}
