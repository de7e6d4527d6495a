//! The agent's WebSocket client upgrade (RFC 6455 §4.1), written here rather than taken from
//! tungstenite because tungstenite fails an answer that names no subprotocol when one was
//! offered. The RFC allows that answer (the server agreed to none), and it is what OpenChoreo's
//! gateway gives: it speaks v1 and never names one. With our own upgrade the agent offers v2
//! and v1 on every dial and speaks v1 on the same connection when the gateway names nothing,
//! instead of closing a connection the gateway has already registered and dialling again.
//!
//! The answer's head is parsed with `httparse`, bounded; bytes that arrived after it (the
//! gateway may send a frame at once) are handed to the WebSocket, not lost.

use std::time::Duration;

use bytes::{Buf as _, BytesMut};
use http::{HeaderMap, HeaderValue, StatusCode, Uri};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        handshake::{client::generate_key, derive_accept_key},
        protocol::{Role, WebSocketConfig},
    },
};

/// The most an answer's head may take (status line and headers).
const MAX_HEAD: usize = 16 * 1024;
/// The most of a refusal's body kept for the log.
const MAX_REFUSAL_BODY: usize = 16 * 1024;
/// The most headers an answer may carry.
const MAX_HEADERS: usize = 64;

/// A WebSocket upgrade to dial: where, and which subprotocols to offer (preferred first).
pub(crate) struct Upgrade<'a> {
    pub(crate) uri: &'a Uri,
    pub(crate) offer: &'a [&'a str],
}

/// The gateway's 101, with the subprotocol it chose (none from OpenChoreo's).
pub(crate) struct Upgraded<S> {
    pub(crate) ws: WebSocketStream<S>,
    pub(crate) subprotocol: Option<String>,
    pub(crate) headers: HeaderMap,
}

/// Why an upgrade did not give a WebSocket.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpgradeError {
    /// The gateway answered, but not 101.
    #[error("the gateway refused the upgrade with {status}: {body}")]
    Refused {
        status: StatusCode,
        headers: HeaderMap,
        body: String,
    },
    /// The answer was not a valid upgrade, or the connection failed.
    #[error("{0}")]
    Invalid(String),
}

impl From<std::io::Error> for UpgradeError {
    fn from(err: std::io::Error) -> Self {
        UpgradeError::Invalid(format!("upgrade: {err}"))
    }
}

impl Upgrade<'_> {
    /// Sends the upgrade request over `stream`, reads the answer and, on 101, gives the
    /// WebSocket with the configuration `config` picks for the chosen subprotocol.
    pub(crate) async fn run<S>(
        &self,
        mut stream: S,
        config: impl FnOnce(Option<&str>) -> WebSocketConfig,
    ) -> Result<Upgraded<S>, UpgradeError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let key = generate_key();
        stream.write_all(self.request(&key)?.as_bytes()).await?;
        stream.flush().await?;
        let mut buf = BytesMut::with_capacity(1024);
        let (status, headers, head_len) = loop {
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(UpgradeError::Invalid(
                    "upgrade: the gateway closed the connection before answering".into(),
                ));
            }
            if let Some(head) = parse_head(&buf)? {
                break head;
            }
            if buf.len() > MAX_HEAD {
                return Err(UpgradeError::Invalid(format!(
                    "upgrade: the answer's head is over {MAX_HEAD} bytes"
                )));
            }
        };
        buf.advance(head_len);
        if status != StatusCode::SWITCHING_PROTOCOLS {
            let body = refusal_body(&mut stream, buf, &headers).await;
            return Err(UpgradeError::Refused {
                status,
                headers,
                body,
            });
        }
        self.verify(&headers, &key)?;
        let subprotocol = headers
            .get(http::header::SEC_WEBSOCKET_PROTOCOL)
            .map(|v| header_str(v).to_owned());
        if let Some(chosen) = &subprotocol
            && !self.offer.contains(&chosen.as_str())
        {
            return Err(UpgradeError::Invalid(format!(
                "upgrade: the gateway chose the subprotocol {chosen:?}, which was not offered"
            )));
        }
        let config = config(subprotocol.as_deref());
        let ws =
            WebSocketStream::from_partially_read(stream, buf.to_vec(), Role::Client, Some(config))
                .await;
        Ok(Upgraded {
            ws,
            subprotocol,
            headers,
        })
    }

    fn request(&self, key: &str) -> Result<String, UpgradeError> {
        let host = self
            .uri
            .authority()
            .ok_or_else(|| UpgradeError::Invalid(format!("invalid server URL {}", self.uri)))?;
        let target = self
            .uri
            .path_and_query()
            .map_or("/", http::uri::PathAndQuery::as_str);
        let mut request = format!(
            "GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
        );
        if !self.offer.is_empty() {
            request.push_str("Sec-WebSocket-Protocol: ");
            request.push_str(&self.offer.join(", "));
            request.push_str("\r\n");
        }
        request.push_str("\r\n");
        Ok(request)
    }

    /// RFC 6455 §4.1: `Upgrade: websocket`, `Connection: upgrade`, and the key's answer.
    fn verify(&self, headers: &HeaderMap, key: &str) -> Result<(), UpgradeError> {
        let has = |name: http::header::HeaderName, token: &str| {
            headers.get_all(name).iter().any(|v| {
                header_str(v)
                    .split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case(token))
            })
        };
        if !has(http::header::UPGRADE, "websocket") {
            return Err(UpgradeError::Invalid(
                "upgrade: the 101 has no `Upgrade: websocket`".into(),
            ));
        }
        if !has(http::header::CONNECTION, "upgrade") {
            return Err(UpgradeError::Invalid(
                "upgrade: the 101 has no `Connection: upgrade`".into(),
            ));
        }
        let accept = headers
            .get(http::header::SEC_WEBSOCKET_ACCEPT)
            .map(header_str);
        if accept != Some(derive_accept_key(key.as_bytes()).as_str()) {
            return Err(UpgradeError::Invalid(
                "upgrade: the 101's Sec-WebSocket-Accept does not answer our key".into(),
            ));
        }
        Ok(())
    }
}

fn header_str(value: &HeaderValue) -> &str {
    value.to_str().unwrap_or("")
}

/// The status, headers and length of the answer's head, once it is whole.
fn parse_head(buf: &[u8]) -> Result<Option<(StatusCode, HeaderMap, usize)>, UpgradeError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut slots);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(UpgradeError::Invalid(format!(
                "upgrade: the answer has over {MAX_HEADERS} headers"
            )));
        }
        Err(err) => {
            return Err(UpgradeError::Invalid(format!(
                "upgrade: the answer is not HTTP/1.1: {err}"
            )));
        }
    };
    let status = response
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or_else(|| UpgradeError::Invalid("upgrade: the answer has no valid status".into()))?;
    let mut headers = HeaderMap::with_capacity(response.headers.len());
    for header in response.headers.iter() {
        let (Ok(name), Ok(value)) = (
            http::header::HeaderName::from_bytes(header.name.as_bytes()),
            HeaderValue::from_bytes(header.value),
        ) else {
            return Err(UpgradeError::Invalid(format!(
                "upgrade: the answer has an invalid header {:?}",
                header.name
            )));
        };
        headers.append(name, value);
    }
    Ok(Some((status, headers, len)))
}

/// A refusal's body, as much as `Content-Length` says (bounded), or what arrives within a
/// short wait when it says nothing: only for the log, so a slow or endless body is cut.
async fn refusal_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    mut buf: BytesMut,
    headers: &HeaderMap,
) -> String {
    let length = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| header_str(v).parse::<usize>().ok());
    let want = length.unwrap_or(MAX_REFUSAL_BODY).min(MAX_REFUSAL_BODY);
    let read = async {
        while buf.len() < want {
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), read).await;
    buf.truncate(want);
    String::from_utf8_lossy(&buf).into_owned()
}

#[cfg(test)]
mod tests {
    use futures::{SinkExt as _, StreamExt as _};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_tungstenite::tungstenite::{
        Message,
        handshake::server::{Request, Response},
    };

    use super::*;

    const OFFER: &[&str] = &["buildplane.tunnel.v2", "buildplane.tunnel.v1"];

    fn uri() -> Uri {
        "wss://gateway.example:8443/ws?planeID=p1".parse().unwrap()
    }

    /// Runs our upgrade against tungstenite's server, which answers with `choose`'s subprotocol
    /// (or none), then sends one message each way (within 10 s: a lost message fails, not hangs).
    async fn against_tungstenite(choose: Option<&'static str>) -> Result<Option<String>, String> {
        tokio::time::timeout(Duration::from_secs(10), exchange_with_tungstenite(choose))
            .await
            .map_err(|_| "no exchange within 10 s".to_owned())?
    }

    async fn exchange_with_tungstenite(
        choose: Option<&'static str>,
    ) -> Result<Option<String>, String> {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            // tungstenite's callback type fixes the large error.
            #[allow(clippy::result_large_err)]
            let callback = move |request: &Request, mut response: Response| {
                assert_eq!(request.uri().path(), "/ws");
                assert_eq!(request.uri().query(), Some("planeID=p1"));
                if let Some(chosen) = choose {
                    response.headers_mut().insert(
                        http::header::SEC_WEBSOCKET_PROTOCOL,
                        HeaderValue::from_static(chosen),
                    );
                }
                Ok(response)
            };
            let mut ws = tokio_tungstenite::accept_hdr_async(server, callback)
                .await
                .map_err(|e| e.to_string())?;
            ws.send(Message::text("hello"))
                .await
                .map_err(|e| e.to_string())?;
            let echoed = ws
                .next()
                .await
                .ok_or("no message")?
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(echoed)
        });
        let uri = uri();
        let upgraded = Upgrade {
            uri: &uri,
            offer: OFFER,
        }
        .run(client, |_| WebSocketConfig::default())
        .await
        .map_err(|e| e.to_string())?;
        let mut ws = upgraded.ws;
        let first = ws.next().await.unwrap().unwrap();
        assert_eq!(first, Message::text("hello"));
        ws.send(Message::text("back")).await.unwrap();
        assert_eq!(server.await.unwrap()?, Message::text("back"));
        Ok(upgraded.subprotocol)
    }

    /// An answer naming no subprotocol (OpenChoreo's gateway) is a WebSocket without one: the
    /// agent speaks v1 on it. (tungstenite's own client fails it: `NoSubProtocol`.)
    #[tokio::test]
    async fn an_answer_naming_no_subprotocol_is_accepted() {
        assert_eq!(against_tungstenite(None).await, Ok(None));
    }

    #[tokio::test]
    async fn the_chosen_subprotocol_is_reported() {
        assert_eq!(
            against_tungstenite(Some("buildplane.tunnel.v2")).await,
            Ok(Some("buildplane.tunnel.v2".into()))
        );
    }

    #[tokio::test]
    async fn a_subprotocol_not_offered_is_refused() {
        let err = against_tungstenite(Some("something.else"))
            .await
            .unwrap_err();
        assert!(err.contains("not offered"), "{err}");
    }

    /// Answers `answer` to whatever request arrives; gives what the client got.
    async fn answer_with(
        answer: Vec<u8>,
    ) -> Result<Upgraded<tokio::io::DuplexStream>, UpgradeError> {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut request = vec![0; 4096];
            let _ = server.read(&mut request).await;
            let _ = server.write_all(&answer).await;
            // Hold the connection open a while, as a gateway would.
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let uri = uri();
        Upgrade {
            uri: &uri,
            offer: OFFER,
        }
        .run(client, |_| WebSocketConfig::default())
        .await
    }

    #[tokio::test]
    async fn a_refusal_keeps_its_status_headers_and_body() {
        let answer = b"HTTP/1.1 409 Conflict\r\nRetry-After: 3\r\nContent-Length: 17\r\n\r\nalready connected"
            .to_vec();
        match answer_with(answer).await {
            Err(UpgradeError::Refused {
                status,
                headers,
                body,
            }) => {
                assert_eq!(status, StatusCode::CONFLICT);
                assert_eq!(headers["retry-after"], "3");
                assert_eq!(body, "already connected");
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
    }

    #[tokio::test]
    async fn a_wrong_accept_key_is_refused() {
        let answer = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: bm90IHRoZSBrZXk=\r\n\r\n".to_vec();
        let err = answer_with(answer).await.err().expect("refused");
        assert!(err.to_string().contains("does not answer our key"), "{err}");
    }

    #[tokio::test]
    async fn garbage_and_endless_heads_are_clear_errors() {
        let err = answer_with(b"SSH-2.0-OpenSSH\r\n\r\n".to_vec())
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("not HTTP/1.1"), "{err}");
        let mut many = b"HTTP/1.1 101 Switching Protocols\r\n".to_vec();
        for _ in 0..=MAX_HEADERS {
            many.extend_from_slice(b"X-Filler: a\r\n");
        }
        many.extend_from_slice(b"\r\n");
        let err = answer_with(many).await.err().unwrap();
        assert!(err.to_string().contains("over 64 headers"), "{err}");
        let mut endless = b"HTTP/1.1 101 Switching Protocols\r\nX-Filler: ".to_vec();
        endless.resize(MAX_HEAD + 1024, b'a');
        let err = answer_with(endless).await.err().unwrap();
        assert!(err.to_string().contains("head is over"), "{err}");
    }

    /// A frame that arrives in the same read as the 101 is the WebSocket's first message.
    #[tokio::test]
    async fn bytes_after_the_head_are_not_lost() {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut request = vec![0; 4096];
            let n = server.read(&mut request).await.unwrap();
            let text = String::from_utf8_lossy(&request[..n]).into_owned();
            let key = text
                .lines()
                .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                .unwrap()
                .trim()
                .to_owned();
            let mut answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                derive_accept_key(key.as_bytes())
            )
            .into_bytes();
            // An unmasked text frame "hi", in the same write.
            answer.extend_from_slice(&[0x81, 0x02, b'h', b'i']);
            server.write_all(&answer).await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let uri = uri();
        let mut upgraded = Upgrade {
            uri: &uri,
            offer: OFFER,
        }
        .run(client, |_| WebSocketConfig::default())
        .await
        .map_err(|e| e.to_string())
        .unwrap();
        assert_eq!(upgraded.subprotocol, None);
        let first = upgraded.ws.next().await.unwrap().unwrap();
        assert_eq!(first, Message::text("hi"));
    }
}
