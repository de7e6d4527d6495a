//! One connection to the gateway: dial (TCP, TLS with the client certificate, WebSocket upgrade
//! with subprotocol negotiation), then serve requests until the connection ends or is drained.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use buildplane_link::{
    Config as SessionConfig, Link, Moment, Read, RequestHead, ResponseHead, Role, Session,
    StreamHandle,
};
use buildplane_tunnel::SUBPROTOCOL_V2;
use buildplane_tunnel::session::CloseReason;
use bytes::Bytes;
use futures::TryStreamExt as _;
use http_body_util::BodyExt as _;
use hyper::body::Body as _;
use tokio::time::Instant;
use tracing::{debug, info};

use crate::{
    Agent,
    cluster::{RequestBody, whole},
    upgrade::{Upgrade, UpgradeError},
};

/// The subprotocols offered with `--protocol v2`, preferred first.
const OFFER_V2_V1: [&str; 2] = [SUBPROTOCOL_V2, buildplane_tunnel::SUBPROTOCOL_V1];

/// A response body up to this size, when its size is known, leaves with its head.
const SMALL_BODY: usize = 64 * 1024;
/// How long a draining connection waits for its in-flight requests.
const DRAIN_GRACE: Duration = Duration::from_secs(30);

/// Why a connection attempt or session ended.
#[derive(Debug)]
pub(crate) enum Ended {
    /// The gateway refused the upgrade with this status (and `Retry-After`).
    Refused {
        status: u16,
        retry_after: Option<Duration>,
        body: String,
    },
    /// No connection was made: the address, TCP, TLS or the upgrade failed.
    Unreachable(String),
    /// A connection that served for `lived` ended (`CloseReason::Drained`: the gateway drained
    /// it, an orderly goodbye).
    Closed {
        lived: Duration,
        reason: CloseReason,
    },
}

impl Ended {
    fn unreachable(reason: impl Into<String>) -> Self {
        Ended::Unreachable(reason.into())
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// What a gateway's 101 said about its replicas (nothing, from OpenChoreo's or an older one).
#[derive(Debug, Clone, Default)]
pub(crate) struct GatewayReplica {
    /// The replica that answered.
    pub(crate) id: Option<String>,
    /// How many replicas serve behind the address.
    pub(crate) count: Option<usize>,
}

/// A connected, not yet serving, WebSocket.
pub(crate) struct Connected {
    ws: Ws,
    version: u16,
    pub(crate) replica: GatewayReplica,
}

/// A serving connection: its tunnel [`Link`], whose acceptor runs each request on its own task.
pub(crate) struct SessionHandle {
    link: Arc<Link>,
    agent: Arc<Agent>,
    started: Instant,
}

impl SessionHandle {
    /// Waits for the connection to end.
    pub(crate) async fn wait(&self) -> Ended {
        self.link.finished().await;
        Ended::Closed {
            lived: self.started.elapsed(),
            reason: self
                .link
                .close_reason()
                .unwrap_or_else(|| CloseReason::Local("closed".to_owned())),
        }
    }

    /// Resolves when the gateway asks this connection to drain (`GoAway`), or it ends.
    pub(crate) async fn going_away(&self) {
        self.link.going_away().await
    }

    /// Whether the gateway asked this connection to drain.
    pub(crate) fn is_draining(&self) -> bool {
        !self.link.accepts_streams()
    }

    /// Stops taking new requests (`GoAway`), lets in-flight ones finish, then closes.
    pub(crate) async fn drain(self) {
        self.link.go_away("the agent is draining this connection");
        let _ =
            tokio::time::timeout(DRAIN_GRACE + Duration::from_secs(5), self.link.finished()).await;
    }
}

impl Drop for SessionHandle {
    fn drop(&mut self) {
        self.link.close("the agent dropped the connection");
        self.agent.connected.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Connected {
    /// Serves the connection: the session runs on the link's tasks, each request on its own.
    pub(crate) fn spawn(self, agent: Arc<Agent>) -> SessionHandle {
        agent.connected.fetch_add(1, Ordering::SeqCst);
        let n = agent.config.max_concurrent_requests.max(1);
        let config = SessionConfig {
            plane_id: agent.config.plane_id.clone(),
            heartbeat_interval: agent.config.ping_interval,
            idle_timeout: agent.config.read_deadline,
            drain_timeout: DRAIN_GRACE,
            // Beyond what the agent runs and queues (see `admit`), so the agent's own 503
            // answers first; the session's limit bounds what a gateway can make it hold.
            max_streams: n * 6 + 16,
            ..SessionConfig::new(Role::Agent, self.version)
        };
        let session = Session::new(config, Moment::default());
        let for_streams = agent.clone();
        let acceptor: buildplane_link::Acceptor = Box::new(move |stream| {
            tokio::spawn(serve_stream(for_streams.clone(), stream));
        });
        let counted = agent.clone();
        let on_ignored: buildplane_link::OnIgnored = Arc::new(move |_: &str| {
            counted.ignored.fetch_add(1, Ordering::Relaxed);
        });
        let link = Link::spawn_with(self.ws, session, Some(acceptor), Some(on_ignored));
        SessionHandle {
            link,
            agent,
            started: Instant::now(),
        }
    }
}

/// Dials the gateway: `wss://.../ws?planeID=..&planeType=..&agentID=..[&serves=..][&held=..]`
/// (`held`: the gateway replicas the agent's other connections hold, which answer 409). With
/// `--protocol v2` it offers v2 and v1; a gateway that upgrades without naming either
/// (OpenChoreo's, which speaks v1 and names no subprotocol) is spoken v1 to on the same
/// connection (see [`crate::upgrade`]). With `--protocol v1` nothing is offered, as
/// OpenChoreo's agent does.
pub(crate) async fn connect(agent: &Agent, held: &[String]) -> Result<Connected, Ended> {
    let config = &agent.config;
    let separator = if config.server_url.contains('?') {
        '&'
    } else {
        '?'
    };
    let mut url = format!(
        "{}{separator}planeID={}&planeType={}&agentID={}",
        config.server_url,
        encode_query(&config.plane_id),
        encode_query(&config.plane_type),
        encode_query(&config.agent_id)
    );
    if !config.served.is_any() {
        url.push_str("&serves=");
        url.push_str(&encode_query(&config.served.to_string()));
    }
    if !held.is_empty() {
        url.push('&');
        url.push_str(buildplane_api::names::HELD_REPLICAS_QUERY);
        url.push('=');
        url.push_str(&encode_query(&held.join(",")));
    }
    let uri: http::Uri = url
        .parse()
        .map_err(|err| Ended::unreachable(format!("invalid server URL {url}: {err}")))?;
    let Some(host) = uri.host().map(str::to_owned) else {
        return Err(Ended::unreachable(format!(
            "invalid server URL {url}: no host"
        )));
    };
    let port = uri.port_u16().unwrap_or(443);
    let tcp = match tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(err)) => return Err(Ended::unreachable(format!("connect: {err}"))),
        Err(_) => return Err(Ended::unreachable("connect timed out")),
    };
    let _ = tcp.set_nodelay(true);
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let server_name = rustls_pki_types::ServerName::try_from(host.clone())
        .map_err(|_| Ended::unreachable(format!("invalid server name {host}")))?;
    let tls = match tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(agent.tls()).connect(server_name, tcp),
    )
    .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => return Err(Ended::unreachable(format!("TLS: {err}"))),
        Err(_) => return Err(Ended::unreachable("TLS handshake timed out")),
    };
    let offer: &[&str] = if config.protocol >= 2 {
        &OFFER_V2_V1
    } else {
        &[]
    };
    let upgrade = Upgrade { uri: &uri, offer };
    // A v1 body travels whole in one message (see `websocket_config_v1`).
    let choose_config = |chosen: Option<&str>| {
        if chosen == Some(SUBPROTOCOL_V2) {
            buildplane_link::websocket_config()
        } else {
            buildplane_link::websocket_config_v1()
        }
    };
    let upgraded = match tokio::time::timeout(
        Duration::from_secs(10),
        upgrade.run(tls, choose_config),
    )
    .await
    {
        Ok(Ok(upgraded)) => upgraded,
        Ok(Err(UpgradeError::Refused {
            status,
            headers,
            body,
        })) => {
            let retry_after = headers
                .get("retry-after")
                .and_then(|v| crate::backoff::parse_retry_after(v.to_str().ok()?));
            return Err(Ended::Refused {
                status: status.as_u16(),
                retry_after,
                body,
            });
        }
        Ok(Err(err @ UpgradeError::Invalid(_))) => return Err(Ended::unreachable(err.to_string())),
        Err(_) => return Err(Ended::unreachable("WebSocket upgrade timed out")),
    };
    let version = match upgraded.subprotocol.as_deref() {
        Some(SUBPROTOCOL_V2) => 2,
        _ => 1,
    };
    if version == 1 && !offer.is_empty() && upgraded.subprotocol.is_none() {
        debug!(
            plane_id = %config.plane_id,
            "the gateway named no subprotocol (an OpenChoreo gateway); speaking v1 (OpenChoreo JSON) on this connection"
        );
    }
    let header = |name: &str| {
        upgraded
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let replica = GatewayReplica {
        id: header(buildplane_api::names::GATEWAY_REPLICA_HEADER),
        count: header(buildplane_api::names::GATEWAY_REPLICAS_HEADER)
            .and_then(|count| count.parse().ok()),
    };
    info!(plane_id = %config.plane_id, protocol = version, replica = ?replica.id, "connected to the gateway");
    Ok(Connected {
        ws: upgraded.ws,
        version,
        replica,
    })
}

fn encode_query(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A slot in the bounded queue in front of the concurrency limit.
struct Slot<'a> {
    agent: &'a Agent,
    streaming: bool,
}

impl Slot<'_> {
    /// Waits for a permit to run (the queue slot is released once running).
    async fn acquire(self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let semaphore = if self.streaming {
            self.agent.streams.clone()
        } else {
            self.agent.limit.clone()
        };
        semaphore.acquire_owned().await.ok()
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.agent.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Takes a queue slot, or `None` when the queue is full (the request is refused with 503).
fn admit(agent: &Agent, streaming: bool) -> Option<Slot<'_>> {
    let max_waiting = agent.config.max_concurrent_requests.max(1) * 4;
    if agent.waiting.fetch_add(1, Ordering::SeqCst) >= max_waiting {
        agent.waiting.fetch_sub(1, Ordering::SeqCst);
        return None;
    }
    Some(Slot { agent, streaming })
}

/// Watches and log follows hold their slot for long; they get their own limit so they never
/// starve ordinary requests.
fn is_streaming(query: &str) -> bool {
    query.split('&').any(|p| {
        matches!(
            p,
            "watch=true" | "watch=1" | "watch=True" | "follow=true" | "follow=1"
        )
    })
}

fn build_request(
    method: &str,
    path: &str,
    query: &str,
    headers: impl Iterator<Item = (String, String)>,
    body: RequestBody,
) -> anyhow::Result<http::Request<RequestBody>> {
    let uri = if query.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{query}")
    };
    let mut builder = http::Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        // The caller's credentials never reach the build cluster: the agent's own are used.
        if matches!(
            name.to_ascii_lowercase().as_str(),
            "authorization"
                | "proxy-authorization"
                | "cookie"
                | "host"
                | "content-length"
                | "connection"
                | "transfer-encoding"
                | "upgrade"
                | "te"
        ) || name.to_ascii_lowercase().starts_with("impersonate-")
        {
            continue;
        }
        builder = builder.header(name, value);
    }
    Ok(builder.body(body)?)
}

/// One request: admission, the build cluster's API server, the answer. The request body streams
/// from the tunnel into the API server under the stream's credits; the response body streams
/// back as the API server sends it. A gateway that resets the stream (its caller went away)
/// ends the request here too: a watch stops on the build cluster.
async fn serve_stream(agent: Arc<Agent>, stream: StreamHandle) {
    let head = match stream.read().await {
        Read::Request(head) => head,
        other => {
            debug!(?other, "a stream without a request head");
            return;
        }
    };
    if head.target != "k8s" {
        // OpenChoreo's agent routes `k8s` only and answers others with this error (in v1:
        // `statusCode` 404 and `error: {code: 404, message}`, no body).
        stream.reset(404, &format!("unknown target: {}", head.target));
        return;
    }
    let Some(slot) = admit(&agent, is_streaming(&head.query)) else {
        stream.reset(503, "the agent is at its request limit; retry later");
        return;
    };
    let Some(_permit) = slot.acquire().await else {
        return;
    };
    agent.requests.fetch_add(1, Ordering::Relaxed);
    let body = if stream.at_end() {
        whole(Bytes::new())
    } else {
        request_body(&stream)
    };
    let RequestHead {
        method,
        path,
        query,
        headers,
        ..
    } = head;
    let request = match build_request(&method, &path, &query, headers.into_iter(), body) {
        Ok(request) => request,
        Err(err) => {
            stream.reset(400, &format!("invalid request: {err}"));
            return;
        }
    };
    let response = tokio::select! {
        response = agent.cluster.send(request) => response,
        () = stream.abandoned() => return,
    };
    let response = match response {
        Ok(response) => response,
        Err(err) => {
            stream.reset(
                502,
                &format!("the build cluster's API server failed: {err}"),
            );
            return;
        }
    };
    let status = response.status().as_u16();
    if let Err(reason) = answer(&stream, response).await {
        debug!(status, %reason, "the answer did not complete");
        return;
    }
    debug!(status, "request done");
}

/// The request body as the API server reads it: chunks from the stream, each read granting
/// credit back to the gateway.
fn request_body(stream: &StreamHandle) -> RequestBody {
    let chunks = stream.body().map_ok(hyper::body::Frame::data);
    http_body_util::StreamBody::new(chunks).boxed_unsync()
}

/// Sends the API server's response: the head with the first chunk (and the end, for a small
/// body) in one message, then the rest as it comes, under the stream's credits.
async fn answer(
    stream: &StreamHandle,
    response: http::Response<crate::cluster::ResponseBody>,
) -> Result<(), String> {
    let head = response_head(response.status(), response.headers());
    let mut body = response.into_body();
    // A body of known, small size goes with the head in one message; any other (a watch, a
    // log follow, a chunked list) gets its head at once and its chunks as they come.
    let small = body
        .size_hint()
        .exact()
        .is_some_and(|n| n <= SMALL_BODY as u64);
    let first = if small && !body.is_end_stream() {
        match next_chunk(&mut body).await {
            Ok(chunk) => chunk.unwrap_or_default(),
            Err(reason) => {
                stream.reset(502, &reason);
                return Err(reason);
            }
        }
    } else {
        Bytes::new()
    };
    let end = body.is_end_stream();
    let rest = stream
        .respond_with(head, first, end)
        .map_err(|e| e.to_string())?;
    if !rest.is_empty() {
        stream.write(rest).await.map_err(|e| e.to_string())?;
        if end {
            stream.finish().map_err(|e| e.to_string())?;
        }
    }
    if end {
        return Ok(());
    }
    loop {
        let chunk = tokio::select! {
            chunk = next_chunk(&mut body) => chunk,
            () = stream.abandoned() => return Err("the gateway abandoned the stream".into()),
        };
        match chunk {
            Ok(Some(data)) => stream.write(data).await.map_err(|e| e.to_string())?,
            Ok(None) => return stream.finish().map_err(|e| e.to_string()),
            Err(reason) => {
                stream.reset(502, &reason);
                return Err(reason);
            }
        }
    }
}

/// The API server's status and headers as the tunnel carries them. Values past ASCII go through
/// as OpenChoreo's agent passes them (bytes that are not UTF-8 as U+FFFD: the tunnel carries
/// text).
fn response_head(status: http::StatusCode, headers: &http::HeaderMap) -> ResponseHead {
    ResponseHead {
        status: status.as_u16(),
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    }
}

/// The next data chunk of a response body (`None` at its end).
async fn next_chunk(body: &mut crate::cluster::ResponseBody) -> Result<Option<Bytes>, String> {
    loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data()
                    && !data.is_empty()
                {
                    return Ok(Some(data));
                }
            }
            Some(Err(err)) => return Err(format!("reading the response: {err}")),
            None => return Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The caller's credentials are never forwarded to the build cluster's API server.
    #[test]
    fn caller_credentials_are_dropped() {
        let request = build_request(
            "GET",
            "/api/v1/namespaces",
            "limit=1",
            [
                ("Authorization".to_owned(), "Bearer caller".to_owned()),
                ("Impersonate-User".to_owned(), "admin".to_owned()),
                ("Accept".to_owned(), "application/json".to_owned()),
            ]
            .into_iter(),
            whole(Bytes::new()),
        )
        .unwrap();
        assert!(request.headers().get("authorization").is_none());
        assert!(request.headers().get("impersonate-user").is_none());
        assert_eq!(request.headers()["accept"], "application/json");
        assert_eq!(request.uri(), "/api/v1/namespaces?limit=1");
    }

    /// Response header values past ASCII reach the gateway (before, `to_str` dropped them).
    #[test]
    fn response_headers_past_ascii_are_kept() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "x-display-name",
            http::HeaderValue::from_bytes("Café ☕".as_bytes()).unwrap(),
        );
        headers.insert(
            "x-latin1",
            http::HeaderValue::from_bytes(b"caf\xe9").unwrap(),
        );
        let head = response_head(http::StatusCode::OK, &headers);
        assert_eq!(head.status, 200);
        let value = |name: &str| {
            head.headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(value("x-display-name"), Some("Café ☕"));
        assert_eq!(value("x-latin1"), Some("caf\u{fffd}"));
    }

    /// The v2 offer names our two subprotocols, v2 first.
    #[test]
    fn the_offer_prefers_v2() {
        assert_eq!(
            OFFER_V2_V1,
            [SUBPROTOCOL_V2, buildplane_tunnel::SUBPROTOCOL_V1]
        );
    }

    /// Query values are percent-encoded in the dial URL.
    #[test]
    fn plane_ids_are_encoded_in_the_url() {
        assert_eq!(encode_query("a b&c"), "a%20b%26c");
        assert_eq!(encode_query("P-0.x_y~"), "P-0.x_y~");
    }
}
