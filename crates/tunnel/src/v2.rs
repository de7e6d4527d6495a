//! v2: binary frames (layout in the crate docs). `decode` checks every length against the
//! input and the limits before allocating, rejects trailing bytes, and never panics;
//! [`Frames`] reads the frames of one WebSocket message by slicing it, without copying bodies.

use bytes::{BufMut as _, Bytes, BytesMut};
use thiserror::Error;

/// Length of the fixed frame header.
pub const HEADER_LEN: usize = 9;
/// Default largest frame payload.
pub const DEFAULT_MAX_FRAME: usize = 1024 * 1024;
/// Default largest head (`RequestHead`, `ResponseHead`) payload: heads are kept whole in memory
/// until the application reads them, so they are bounded well below body frames.
pub const DEFAULT_MAX_HEAD: usize = 256 * 1024;
/// Largest payload of a connection or control frame (`Hello`, `End`, `Reset`, `WindowUpdate`,
/// `Ping`, `Pong`, `GoAway`): a u16-length string and a few integers at most.
pub const MAX_CONTROL: usize = 2 + 2 + u16::MAX as usize;
/// Largest number of headers in one head.
pub const MAX_HEADERS: usize = 256;

/// One v2 frame.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Frame {
    /// First frame each way on stream 0. Since v2.
    Hello {
        /// The sender's protocol version.
        version: u16,
        /// The agent's planeID (empty from the gateway).
        plane_id: String,
    },
    /// Opens a stream: a request from the gateway. Since v2.
    RequestHead {
        /// Stream id (odd, chosen by the gateway).
        stream: u32,
        /// HTTP method.
        method: String,
        /// Backend (`k8s`).
        target: String,
        /// Path on the backend.
        path: String,
        /// Raw query.
        query: String,
        /// Headers in order.
        headers: Vec<(String, String)>,
        /// No body follows.
        end_stream: bool,
    },
    /// The response head from the agent. Since v2.
    ResponseHead {
        /// Stream id.
        stream: u32,
        /// HTTP status.
        status: u16,
        /// Headers in order.
        headers: Vec<(String, String)>,
        /// No body follows.
        end_stream: bool,
    },
    /// A chunk of body. Since v2.
    Data {
        /// Stream id.
        stream: u32,
        /// The bytes (a slice of the received message: decoding does not copy them).
        chunk: Bytes,
    },
    /// The sender's half of the stream is complete. Since v2.
    End {
        /// Stream id.
        stream: u32,
    },
    /// The stream is abandoned (caller gone, backend failed). Since v2.
    Reset {
        /// Stream id.
        stream: u32,
        /// An HTTP-like code.
        code: u16,
        /// Why.
        reason: String,
    },
    /// The receiver consumed `credits` body bytes; the sender may send that many more. Since v2.
    WindowUpdate {
        /// Stream id.
        stream: u32,
        /// Bytes granted.
        credits: u32,
    },
    /// Liveness probe on stream 0. Since v2.
    Ping {
        /// Echoed in the pong.
        nonce: u64,
    },
    /// Answer to a ping. Since v2.
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// No new streams: the sender is draining. Since v2.
    GoAway {
        /// Why.
        reason: String,
    },
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Fewer bytes than the header or a field needs.
    #[error("truncated frame: {0}")]
    Truncated(&'static str),
    /// The payload is larger than allowed.
    #[error("frame payload of {len} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Declared length.
        len: usize,
        /// Limit.
        limit: usize,
    },
    /// Bytes after the declared payload, or after the payload's fields.
    #[error("{0} trailing bytes after the frame")]
    TrailingBytes(usize),
    /// An unknown frame type.
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    /// A string is not UTF-8.
    #[error("invalid UTF-8 in {0}")]
    InvalidUtf8(&'static str),
    /// Too many headers.
    #[error("{0} headers exceed the limit of {MAX_HEADERS}")]
    TooManyHeaders(usize),
}

/// Limits applied while decoding, per frame kind: a body chunk may be large, a head less so,
/// and a control frame is never more than [`MAX_CONTROL`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest payload accepted for any frame (`Data` chunks are bounded by this alone).
    pub max_frame: usize,
    /// Largest `RequestHead` or `ResponseHead` payload.
    pub max_head: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame: DEFAULT_MAX_FRAME,
            max_head: DEFAULT_MAX_HEAD,
        }
    }
}

impl Limits {
    /// Limits with `max_frame` for every frame and the default head bound (or `max_frame`, if
    /// smaller).
    pub fn with_max_frame(max_frame: usize) -> Self {
        Self {
            max_frame,
            max_head: DEFAULT_MAX_HEAD.min(max_frame),
        }
    }

    /// The largest payload accepted for frame type `kind`.
    pub fn for_kind(&self, kind: u8) -> usize {
        match kind {
            0x02 | 0x03 => self.max_head.min(self.max_frame),
            0x04 => self.max_frame,
            _ => MAX_CONTROL.min(self.max_frame),
        }
    }
}

fn put_str(out: &mut Vec<u8>, text: &str) {
    // Strings longer than u16 are truncated at a char boundary; heads never carry such strings.
    let mut end = text.len().min(u16::MAX as usize);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_be_bytes());
    out.extend_from_slice(&text.as_bytes()[..end]);
}

fn put_headers(out: &mut Vec<u8>, headers: &[(String, String)]) {
    let n = headers.len().min(MAX_HEADERS);
    out.extend_from_slice(&(n as u16).to_be_bytes());
    for (name, value) in &headers[..n] {
        put_str(out, name);
        put_str(out, value);
    }
}

/// Appends the encoding of `frame` to `out`.
pub fn encode(frame: &Frame, out: &mut Vec<u8>) {
    let start = out.len();
    let (kind, stream) = match frame {
        Frame::Hello { .. } => (0x01, 0),
        Frame::RequestHead { stream, .. } => (0x02, *stream),
        Frame::ResponseHead { stream, .. } => (0x03, *stream),
        Frame::Data { stream, .. } => (0x04, *stream),
        Frame::End { stream } => (0x05, *stream),
        Frame::Reset { stream, .. } => (0x06, *stream),
        Frame::WindowUpdate { stream, .. } => (0x07, *stream),
        Frame::Ping { .. } => (0x08, 0),
        Frame::Pong { .. } => (0x09, 0),
        Frame::GoAway { .. } => (0x0A, 0),
    };
    out.push(kind);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    match frame {
        Frame::Hello { version, plane_id } => {
            out.extend_from_slice(&version.to_be_bytes());
            put_str(out, plane_id);
        }
        Frame::RequestHead {
            method,
            target,
            path,
            query,
            headers,
            end_stream,
            ..
        } => {
            put_str(out, method);
            put_str(out, target);
            put_str(out, path);
            put_str(out, query);
            put_headers(out, headers);
            out.push(u8::from(*end_stream));
        }
        Frame::ResponseHead {
            status,
            headers,
            end_stream,
            ..
        } => {
            out.extend_from_slice(&status.to_be_bytes());
            put_headers(out, headers);
            out.push(u8::from(*end_stream));
        }
        Frame::Data { chunk, .. } => out.extend_from_slice(chunk),
        Frame::End { .. } => {}
        Frame::Reset { code, reason, .. } => {
            out.extend_from_slice(&code.to_be_bytes());
            put_str(out, reason);
        }
        Frame::WindowUpdate { credits, .. } => out.extend_from_slice(&credits.to_be_bytes()),
        Frame::Ping { nonce } | Frame::Pong { nonce } => {
            out.extend_from_slice(&nonce.to_be_bytes())
        }
        Frame::GoAway { reason } => put_str(out, reason),
    }
    let len = (out.len() - start - HEADER_LEN) as u32;
    out[start + 5..start + 9].copy_from_slice(&len.to_be_bytes());
}

/// Why a frame cannot be encoded without loss.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// A string field is longer than a u16 length can say.
    #[error("{field} is {len} bytes, more than {max}", max = u16::MAX)]
    StringTooLong {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
    },
    /// More headers than [`MAX_HEADERS`].
    #[error("{0} headers exceed the limit of {MAX_HEADERS}")]
    TooManyHeaders(usize),
    /// The payload would exceed the peer's frame limit.
    #[error("frame payload of {len} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Payload length.
        len: usize,
        /// Limit.
        limit: usize,
    },
}

/// Like [`encode`], but refuses a frame that `encode` would cut (strings over 65535 bytes,
/// more than [`MAX_HEADERS`] headers) or whose payload exceeds the limit of its kind in `limits`, so the peer
/// would reject it. On error `out` is left unchanged.
pub fn try_encode(frame: &Frame, out: &mut Vec<u8>, limits: Limits) -> Result<(), EncodeError> {
    fn check_str(field: &'static str, text: &str) -> Result<(), EncodeError> {
        if text.len() > u16::MAX as usize {
            return Err(EncodeError::StringTooLong {
                field,
                len: text.len(),
            });
        }
        Ok(())
    }
    fn check_headers(headers: &[(String, String)]) -> Result<(), EncodeError> {
        if headers.len() > MAX_HEADERS {
            return Err(EncodeError::TooManyHeaders(headers.len()));
        }
        for (name, value) in headers {
            check_str("header name", name)?;
            check_str("header value", value)?;
        }
        Ok(())
    }
    match frame {
        Frame::Hello { plane_id, .. } => check_str("plane id", plane_id)?,
        Frame::RequestHead {
            method,
            target,
            path,
            query,
            headers,
            ..
        } => {
            check_str("method", method)?;
            check_str("target", target)?;
            check_str("path", path)?;
            check_str("query", query)?;
            check_headers(headers)?;
        }
        Frame::ResponseHead { headers, .. } => check_headers(headers)?,
        Frame::Reset { reason, .. } | Frame::GoAway { reason } => check_str("reason", reason)?,
        Frame::Data { .. }
        | Frame::End { .. }
        | Frame::WindowUpdate { .. }
        | Frame::Ping { .. }
        | Frame::Pong { .. } => {}
    }
    let start = out.len();
    encode(frame, out);
    let len = out.len() - start - HEADER_LEN;
    let limit = limits.for_kind(out[start]);
    if len > limit {
        out.truncate(start);
        return Err(EncodeError::TooLarge { len, limit });
    }
    Ok(())
}

/// Encodes one frame into a new buffer.
pub fn to_vec(frame: &Frame) -> Vec<u8> {
    let mut out = Vec::new();
    encode(frame, &mut out);
    out
}

/// Appends a `Data` frame's header and `chunk` to `out`: the chunk is copied once, into the
/// message that carries it.
pub fn encode_data(stream: u32, chunk: &[u8], out: &mut BytesMut) {
    out.reserve(HEADER_LEN + chunk.len());
    out.put_u8(0x04);
    out.put_u32(stream);
    out.put_u32(u32::try_from(chunk.len()).unwrap_or(u32::MAX));
    out.put_slice(chunk);
}

/// The frames of one WebSocket message, in order. A message carries one frame, or (when both
/// peers said so in `Hello`, see [`crate::session`]) several whole frames back to back. `Data`
/// chunks are slices of the message: no body byte is copied. After an error the iterator ends.
#[derive(Debug, Clone)]
pub struct Frames {
    message: Bytes,
    limits: Limits,
    failed: bool,
}

impl Frames {
    /// Reads `message` with `limits`.
    pub fn new(message: Bytes, limits: Limits) -> Self {
        Self {
            message,
            limits,
            failed: false,
        }
    }
}

impl Iterator for Frames {
    type Item = Result<Frame, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.message.is_empty() || self.failed {
            return None;
        }
        let result = frame_len(&self.message, self.limits).and_then(|len| {
            let frame = self.message.split_to(HEADER_LEN + len);
            decode_shared(&frame, self.limits)
        });
        self.failed = result.is_err();
        Some(result)
    }
}

/// The payload length the header at the start of `bytes` declares, checked against the limit
/// of its kind and against the bytes present.
fn frame_len(bytes: &[u8], limits: Limits) -> Result<usize, DecodeError> {
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::Truncated("frame header"));
    }
    let kind = bytes[0];
    let len = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) as usize;
    let limit = limits.for_kind(kind);
    if len > limit {
        return Err(DecodeError::TooLarge { len, limit });
    }
    if bytes.len() - HEADER_LEN < len {
        return Err(DecodeError::Truncated("payload"));
    }
    Ok(len)
}

/// Decodes exactly one frame from `bytes`, slicing a `Data` chunk out of it without a copy.
pub fn decode_shared(bytes: &Bytes, limits: Limits) -> Result<Frame, DecodeError> {
    if bytes.first() == Some(&0x04) {
        let len = frame_len(bytes, limits)?;
        if bytes.len() > HEADER_LEN + len {
            return Err(DecodeError::TrailingBytes(bytes.len() - HEADER_LEN - len));
        }
        let stream = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        return Ok(Frame::Data {
            stream,
            chunk: bytes.slice(HEADER_LEN..),
        });
    }
    decode(bytes, limits)
}

struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(DecodeError::Truncated(what));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let b = self.take(8, what)?;
        let mut array = [0u8; 8];
        array.copy_from_slice(b);
        Ok(u64::from_be_bytes(array))
    }

    fn str(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let len = self.u16(what)? as usize;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::InvalidUtf8(what))
    }

    fn headers(&mut self) -> Result<Vec<(String, String)>, DecodeError> {
        let n = self.u16("header count")? as usize;
        if n > MAX_HEADERS {
            return Err(DecodeError::TooManyHeaders(n));
        }
        // Each header needs at least 4 bytes: bound the allocation by the input.
        if n * 4 > self.bytes.len() {
            return Err(DecodeError::Truncated("headers"));
        }
        let mut headers = Vec::with_capacity(n);
        for _ in 0..n {
            headers.push((self.str("header name")?, self.str("header value")?));
        }
        Ok(headers)
    }
}

/// Decodes exactly one frame from `bytes`.
pub fn decode(bytes: &[u8], limits: Limits) -> Result<Frame, DecodeError> {
    let mut header = Cursor { bytes };
    let kind = header.u8("frame type")?;
    let stream = header.u32("stream id")?;
    let len = header.u32("length")? as usize;
    let limit = limits.for_kind(kind);
    if len > limit {
        return Err(DecodeError::TooLarge { len, limit });
    }
    let payload = header.take(len, "payload")?;
    if !header.bytes.is_empty() {
        return Err(DecodeError::TrailingBytes(header.bytes.len()));
    }
    let mut c = Cursor { bytes: payload };
    let frame = match kind {
        0x01 => Frame::Hello {
            version: c.u16("version")?,
            plane_id: c.str("plane id")?,
        },
        0x02 => Frame::RequestHead {
            stream,
            method: c.str("method")?,
            target: c.str("target")?,
            path: c.str("path")?,
            query: c.str("query")?,
            headers: c.headers()?,
            end_stream: c.u8("flags")? & 1 == 1,
        },
        0x03 => Frame::ResponseHead {
            stream,
            status: c.u16("status")?,
            headers: c.headers()?,
            end_stream: c.u8("flags")? & 1 == 1,
        },
        0x04 => Frame::Data {
            stream,
            chunk: Bytes::copy_from_slice(c.take(c.bytes.len(), "data")?),
        },
        0x05 => Frame::End { stream },
        0x06 => Frame::Reset {
            stream,
            code: c.u16("code")?,
            reason: c.str("reason")?,
        },
        0x07 => Frame::WindowUpdate {
            stream,
            credits: c.u32("credits")?,
        },
        0x08 => Frame::Ping {
            nonce: c.u64("nonce")?,
        },
        0x09 => Frame::Pong {
            nonce: c.u64("nonce")?,
        },
        0x0A => Frame::GoAway {
            reason: c.str("reason")?,
        },
        other => return Err(DecodeError::UnknownType(other)),
    };
    if !c.bytes.is_empty() {
        return Err(DecodeError::TrailingBytes(c.bytes.len()));
    }
    Ok(frame)
}
