//! v1: OpenChoreo's JSON messages (`internal/cluster-agent/messaging/types.go`), in text frames.

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

/// An error the agent reports instead of a backend response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelError {
    /// An HTTP-like code, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// What went wrong.
    pub message: String,
    /// More detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<String>,
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

/// A v1 message; the wire has no type field, so the shape decides.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Message {
    /// `HTTPTunnelRequest` (has `method`).
    Request(HttpTunnelRequest),
    /// `HTTPTunnelResponse` (has `statusCode`).
    Response(HttpTunnelResponse),
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

/// Encodes a message as the JSON text OpenChoreo sends.
pub fn encode(message: &Message) -> String {
    // Serialising these types cannot fail: string keys, no floats.
    match message {
        Message::Request(request) => serde_json::to_string(request),
        Message::Response(response) => serde_json::to_string(response),
    }
    .unwrap_or_default()
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
