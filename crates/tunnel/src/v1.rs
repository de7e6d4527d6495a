//! v1: OpenChoreo's JSON messages (`internal/cluster-agent/messaging/types.go`), in text frames.
//!
//! The wire has no type tag: the fields decide, in the order OpenChoreo's receivers try them
//! (v1.2.3's `agent.go handleConnection` and `server.go handleConnection`):
//! `HTTPTunnelStreamInit` (`isUpgrade` true and a `requestID`), `HTTPTunnelStreamChunk` (a
//! `requestID` and a non-null `data` or `isClose` true), then `HTTPTunnelResponse`
//! (`statusCode`) and `HTTPTunnelRequest` (`method`). [`encode`] writes what Go's
//! `encoding/json` writes for the same values: struct field order, `omitempty` fields left out,
//! and `<`, `>`, `&`, U+2028 and U+2029 escaped as `\u003c`, `\u003e`, `\u0026`, `\u2028`,
//! `\u2029` (golden files of v1.2.3's own output in `test_data/openchoreo-v1.2.3/`).

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Headers as Go's `http.Header`: a name to a list of values.
pub type Headers = BTreeMap<String, Vec<String>>;

/// A request from the gateway to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpTunnelRequest {
    /// Correlates the response.
    #[serde(rename = "requestID")]
    pub request_id: String,
    /// The caller's request id, for logs.
    #[serde(
        rename = "gatewayRequestID",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub gateway_request_id: Option<String>,
    /// The backend on the agent side; `k8s` is the local API server.
    pub target: String,
    /// HTTP method.
    pub method: String,
    /// Path on the target, starting with `/`.
    pub path: String,
    /// Raw query string, without `?`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// Request headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Headers>,
    /// Body, base64 as Go encodes `[]byte`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "base64_bytes"
    )]
    pub body: Option<Vec<u8>>,
}

/// An error the agent reports instead of a backend response (Go's `ErrorDetails`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelError {
    /// An HTTP-like code, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// What went wrong.
    #[serde(default)]
    pub message: String,
    /// More detail: any JSON value. OpenChoreo declares a `map[string]any` (an object); older
    /// peers of ours sent a string. Neither closes anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpTunnelResponse {
    /// The request it answers.
    #[serde(rename = "requestID")]
    pub request_id: String,
    /// HTTP status of the backend (or of the failure).
    #[serde(rename = "statusCode")]
    pub status_code: u16,
    /// Response headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Headers>,
    /// Body, base64.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "base64_bytes"
    )]
    pub body: Option<Vec<u8>>,
    /// Set when the agent could not reach the backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TunnelError>,
}

/// The opening of a streamed exchange (`HTTPTunnelStreamInit`): OpenChoreo v1.x gateways send
/// it for exec (`upgradeProto` `SPDY/3.1`) and Hubble wirelogs (`target` `hubble`,
/// `upgradeProto` `hubble/v1`), then [`HttpTunnelStreamChunk`]s both ways.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpTunnelStreamInit {
    /// Names the stream (the gateway's request id, not a UUID).
    #[serde(rename = "requestID")]
    pub request_id: String,
    /// `k8s` or `hubble`.
    #[serde(default)]
    pub target: String,
    /// HTTP method.
    #[serde(default)]
    pub method: String,
    /// Path on the target.
    #[serde(default)]
    pub path: String,
    /// Raw query string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// Request headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Headers>,
    /// Always true on the wire: what tells a stream opening from a request.
    #[serde(rename = "isUpgrade", default)]
    pub is_upgrade: bool,
    /// `SPDY/3.1` (exec) or `hubble/v1`.
    #[serde(
        rename = "upgradeProto",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub upgrade_proto: Option<String>,
}

/// A piece of a streamed exchange (`HTTPTunnelStreamChunk`), either way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpTunnelStreamChunk {
    /// The stream it belongs to.
    #[serde(rename = "requestID")]
    pub request_id: String,
    /// Bytes, base64. Go writes it without `omitempty`: `None` is `null`, an empty `Some` is
    /// `""` (Hubble's "stream active" sentinel).
    #[serde(default, with = "base64_bytes")]
    pub data: Option<Vec<u8>>,
    /// The SPDY stream (1 stdout, 2 stderr); 0 is left out.
    #[serde(rename = "streamId", default, skip_serializing_if = "is_zero")]
    pub stream_id: i64,
    /// The stream ends; `data`, if any, is the error that ended it.
    #[serde(rename = "isClose", default, skip_serializing_if = "is_false")]
    pub is_close: bool,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A v1 message; the wire has no type field, so the shape decides.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message {
    /// `HTTPTunnelRequest` (has `method`).
    Request(HttpTunnelRequest),
    /// `HTTPTunnelResponse` (has `statusCode`).
    Response(HttpTunnelResponse),
    /// `HTTPTunnelStreamChunk` (has `requestID` and a non-null `data` or `isClose`).
    StreamChunk(HttpTunnelStreamChunk),
    /// `HTTPTunnelStreamInit` (has `requestID` and `isUpgrade` true).
    StreamInit(HttpTunnelStreamInit),
}

/// Default largest v1 text frame: bodies are buffered whole in v1 (OpenChoreo sets no read
/// limit at all), so this is generous but finite.
pub const DEFAULT_MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// Why a text frame is not a v1 message.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Larger than the configured limit.
    #[error("message of {len} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// Not JSON, or neither a request nor a response.
    #[error("not a tunnel message: {0}")]
    Invalid(String),
}

/// Decodes one text frame, rejecting it before parsing when it exceeds `limit` bytes.
pub fn decode(text: &str, limit: usize) -> Result<Message, DecodeError> {
    if text.len() > limit {
        return Err(DecodeError::TooLarge {
            len: text.len(),
            limit,
        });
    }
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| DecodeError::Invalid(e.to_string()))?;
    // As Go's receivers do: a shape that does not parse falls through to the next.
    let has_id = value
        .get("requestID")
        .and_then(serde_json::Value::as_str)
        .is_some_and(|id| !id.is_empty());
    if has_id
        && value.get("isUpgrade") == Some(&serde_json::Value::Bool(true))
        && let Ok(init) = HttpTunnelStreamInit::deserialize(&value)
    {
        return Ok(Message::StreamInit(init));
    }
    let has_data = value.get("data").is_some_and(|d| !d.is_null());
    let is_close = value.get("isClose") == Some(&serde_json::Value::Bool(true));
    if has_id
        && (has_data || is_close)
        && let Ok(chunk) = HttpTunnelStreamChunk::deserialize(&value)
    {
        return Ok(Message::StreamChunk(chunk));
    }
    if value.get("statusCode").is_some() {
        serde_json::from_value(value)
            .map(Message::Response)
            .map_err(|e| DecodeError::Invalid(e.to_string()))
    } else if value.get("method").is_some() {
        serde_json::from_value(value)
            .map(Message::Request)
            .map_err(|e| DecodeError::Invalid(e.to_string()))
    } else {
        Err(DecodeError::Invalid(
            "neither a request (method) nor a response (statusCode)".into(),
        ))
    }
}

/// Encodes a message as the JSON text OpenChoreo sends, byte for byte as Go would.
pub fn encode(message: &Message) -> String {
    // Serialising these types cannot fail: string keys, and the only floats are in `details`,
    // which came from JSON.
    let text = match message {
        Message::Request(request) => serde_json::to_string(request),
        Message::Response(response) => serde_json::to_string(response),
        Message::StreamChunk(chunk) => serde_json::to_string(chunk),
        Message::StreamInit(init) => serde_json::to_string(init),
    }
    .unwrap_or_default();
    go_escape(text)
}

/// The id of the request a message answers (or asks), read without building its body: for a
/// message too large to decode, so that its one request fails instead of waiting for a timeout.
pub fn request_id(text: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Id {
        #[serde(rename = "requestID")]
        request_id: String,
    }
    serde_json::from_str::<Id>(text)
        .ok()
        .map(|id| id.request_id)
        .filter(|id| !id.is_empty())
}

/// Go's `encoding/json` escapes `<`, `>`, `&` (HTML safety) and U+2028, U+2029 in strings.
/// These characters occur only inside strings in our JSON, so a replacement over the whole text
/// is exact.
fn go_escape(text: String) -> String {
    if !text.contains(['<', '>', '&', '\u{2028}', '\u{2029}']) {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

/// Go's `http.CanonicalHeaderKey`: the first letter and each letter after a `-` upper case, the
/// rest lower case; a name with a byte outside the token characters is left as it is. OpenChoreo
/// reads headers with `http.Header.Get`, which finds only canonical keys.
pub fn canonical_header_key(name: &str) -> String {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return name.to_owned();
    }
    let mut upper = true;
    name.chars()
        .map(|c| {
            let out = if upper {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            };
            upper = c == '-';
            out
        })
        .collect()
}

mod base64_bytes {
    use super::*;

    pub(super) fn serialize<S: serde::Serializer>(
        bytes: &Option<Vec<u8>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(bytes) => {
                serializer.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
            }
            None => serializer.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Vec<u8>>, D::Error> {
        let text: Option<String> = Option::deserialize(deserializer)?;
        text.map(|t| {
            base64::engine::general_purpose::STANDARD
                .decode(t)
                .map_err(serde::de::Error::custom)
        })
        .transpose()
    }
}
