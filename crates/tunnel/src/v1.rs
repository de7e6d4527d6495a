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
///
/// A request's or response's body is spliced in as base64 after the rest is encoded: base64
/// needs no escaping, JSON's or Go's, so only the small rest is serialised and scanned. (Through
/// serde and [`go_escape`], a 10 MiB body took 3.4 s to encode in a debug build on a loaded
/// machine, under the connection's lock: the agent's pongs waited behind it, and OpenChoreo's
/// gateway, with a short heartbeat timeout, dropped the connection.)
pub fn encode(message: &Message) -> String {
    match message {
        Message::Request(request) if request.body.is_some() => {
            let rest = HttpTunnelRequest {
                request_id: request.request_id.clone(),
                gateway_request_id: request.gateway_request_id.clone(),
                target: request.target.clone(),
                method: request.method.clone(),
                path: request.path.clone(),
                query: request.query.clone(),
                headers: request.headers.clone(),
                body: None,
            };
            // `body` is the last field.
            with_body(
                encode_whole(&Message::Request(rest)),
                request.body.as_deref(),
            )
        }
        Message::Response(response) if response.body.is_some() && response.error.is_none() => {
            let rest = HttpTunnelResponse {
                request_id: response.request_id.clone(),
                status_code: response.status_code,
                headers: response.headers.clone(),
                body: None,
                error: None,
            };
            // `body` is the last field when `error` is left out.
            with_body(
                encode_whole(&Message::Response(rest)),
                response.body.as_deref(),
            )
        }
        other => encode_whole(other),
    }
}

/// Every field through serde, then Go's escapes.
fn encode_whole(message: &Message) -> String {
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

/// `object` (JSON text of an object with at least one field) with `"body":"<base64>"` added as
/// its last field.
fn with_body(object: String, body: Option<&[u8]>) -> String {
    let Some(body) = body else {
        return object;
    };
    let Some(open) = object.strip_suffix('}') else {
        return object;
    };
    let mut text = String::with_capacity(open.len() + body.len().div_ceil(3) * 4 + 12);
    text.push_str(open);
    text.push_str(",\"body\":\"");
    base64::engine::general_purpose::STANDARD.encode_string(body, &mut text);
    text.push_str("\"}");
    text
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
    // One single-character search each (memchr: fast even in a debug build, where a search for
    // any of five characters walks the text char by char).
    if !['<', '>', '&', '\u{2028}', '\u{2029}']
        .iter()
        .any(|c| text.contains(*c))
    {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The body spliced in as base64 gives the bytes serde and Go's escapes give for the whole
    /// message: with and without the optional fields, escapes in the rest, an empty body, every
    /// byte value, and a response with an error (encoded whole).
    #[test]
    fn spliced_bodies_encode_as_the_whole_message_does() {
        let headers: Headers = [(
            "X-Odd".to_string(),
            vec!["<a & b>\u{2028}\"q\"".to_string(), "ü".to_string()],
        )]
        .into();
        let bodies: [Vec<u8>; 4] = [
            Vec::new(),
            b"<&>".to_vec(),
            (0..=255u8).collect(),
            vec![b'x'; 100_001],
        ];
        for body in bodies {
            let requests = [
                HttpTunnelRequest {
                    request_id: "r<1>".into(),
                    gateway_request_id: Some("g&1".into()),
                    target: "k8s".into(),
                    method: "POST".into(),
                    path: "/api/v1/x".into(),
                    query: Some("a=1&b=<2>".into()),
                    headers: Some(headers.clone()),
                    body: Some(body.clone()),
                },
                HttpTunnelRequest {
                    request_id: "r2".into(),
                    gateway_request_id: None,
                    target: "k8s".into(),
                    method: "PUT".into(),
                    path: "/".into(),
                    query: None,
                    headers: None,
                    body: Some(body.clone()),
                },
            ];
            for request in requests {
                let message = Message::Request(request);
                assert_eq!(encode(&message), encode_whole(&message));
            }
            let responses = [
                HttpTunnelResponse {
                    request_id: "r1".into(),
                    status_code: 200,
                    headers: Some(headers.clone()),
                    body: Some(body.clone()),
                    error: None,
                },
                HttpTunnelResponse {
                    request_id: "r2".into(),
                    status_code: 502,
                    headers: None,
                    body: Some(body.clone()),
                    error: Some(TunnelError {
                        code: Some(502),
                        message: "<down>".into(),
                        details: None,
                    }),
                },
            ];
            for response in responses {
                let message = Message::Response(response);
                let text = encode(&message);
                assert_eq!(text, encode_whole(&message));
                assert_eq!(decode(&text, usize::MAX).unwrap(), message);
            }
        }
    }
}
