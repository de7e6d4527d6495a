//! One connection to the gateway: dial (TCP, TLS with the client certificate, WebSocket upgrade
//! with subprotocol negotiation), then serve requests until the connection ends or is drained.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use buildplane_tunnel::{
    MAX_MESSAGE, SUBPROTOCOL_V1, SUBPROTOCOL_V2,
    flow::SendWindow,
    v1,
    v2::{self, Frame, Limits},
};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use parking_lot::Mutex;
use tokio::{
    sync::{Notify, mpsc},
    task::JoinHandle,
};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest, http::HeaderValue};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::Agent;

/// Largest body chunk sent in one `Data` frame.
const CHUNK: usize = 64 * 1024;
/// WebSocket read buffer. tungstenite zero-fills the whole buffer before every read, so its
/// default (128 KiB) is resident memory per connection; one TLS record (16 KiB) is enough.
const READ_BUFFER: usize = 16 * 1024;
/// Bytes of queued messages written before one flush.
const MAX_BATCH: usize = 256 * 1024;
/// How long a drained connection waits for its in-flight requests.
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
    /// The connection failed or closed after `lived`.
    Closed { lived: Duration, reason: String },
}

impl Ended {
    fn closed(reason: impl Into<String>) -> Self {
        Ended::Closed {
            lived: Duration::ZERO,
            reason: reason.into(),
        }
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A connected, not yet serving, WebSocket.
pub(crate) struct Connected {
    ws: Ws,
    version: u16,
}

/// A serving session.
pub(crate) struct SessionHandle {
    handle: Option<JoinHandle<Ended>>,
    drain: CancellationToken,
}

impl SessionHandle {
    /// Waits for the session to end.
    pub(crate) async fn wait(&mut self) -> Ended {
        match self.handle.as_mut() {
            Some(handle) => {
                let ended = handle.await.unwrap_or_else(|err| Ended::Closed {
                    lived: Duration::ZERO,
                    reason: format!("session task failed: {err}"),
                });
                self.handle = None;
                ended
            }
            None => std::future::pending().await,
        }
    }

    /// Stops taking new requests (`GoAway`), lets in-flight ones finish, then closes.
    pub(crate) async fn drain(mut self) {
        self.drain.cancel();
        if let Some(handle) = self.handle.take() {
            let _ = tokio::time::timeout(DRAIN_GRACE + Duration::from_secs(5), handle).await;
        }
    }
}

impl Connected {
    /// Serves the connection on its own task.
    pub(crate) fn spawn(self, agent: Arc<Agent>) -> SessionHandle {
        let drain = CancellationToken::new();
        let handle = tokio::spawn(serve(agent, self.ws, self.version, drain.clone()));
        SessionHandle {
            handle: Some(handle),
            drain,
        }
    }
}

/// Dials the gateway: `wss://.../ws?planeID=..&planeType=..&agentID=..`.
pub(crate) async fn connect(agent: &Agent) -> Result<Connected, Ended> {
    let config = &agent.config;
    let separator = if config.server_url.contains('?') {
        '&'
    } else {
        '?'
    };
    let url = format!(
        "{}{separator}planeID={}&planeType={}&agentID={}",
        config.server_url,
        encode_query(&config.plane_id),
        encode_query(&config.plane_type),
        encode_query(&config.agent_id)
    );
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|err| Ended::closed(format!("invalid server URL {url}: {err}")))?;
    let offer = if config.protocol >= 2 {
        format!("{SUBPROTOCOL_V2}, {SUBPROTOCOL_V1}")
    } else {
        SUBPROTOCOL_V1.to_owned()
    };
    if let Ok(value) = HeaderValue::from_str(&offer) {
        request
            .headers_mut()
            .insert("sec-websocket-protocol", value);
    }
    let host = request.uri().host().unwrap_or("localhost").to_owned();
    let port = request.uri().port_u16().unwrap_or(443);
    let tcp = match tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(err)) => return Err(Ended::closed(format!("connect: {err}"))),
        Err(_) => return Err(Ended::closed("connect timed out")),
    };
    let _ = tcp.set_nodelay(true);
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let server_name = rustls_pki_types::ServerName::try_from(host.clone())
        .map_err(|_| Ended::closed(format!("invalid server name {host}")))?;
    let tls = match tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(agent.tls.clone()).connect(server_name, tcp),
    )
    .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => return Err(Ended::closed(format!("TLS: {err}"))),
        Err(_) => return Err(Ended::closed("TLS handshake timed out")),
    };
    let config_ws = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let upgrade = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async_with_config(request, tls, Some(config_ws)),
    )
    .await
    .map_err(|_| Ended::closed("WebSocket upgrade timed out"))?;
    let (ws, response) = match upgrade {
        Ok(ok) => ok,
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| crate::backoff::parse_retry_after(v.to_str().ok()?));
            let body = response
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            return Err(Ended::Refused {
                status,
                retry_after,
                body,
            });
        }
        Err(err) => return Err(Ended::closed(format!("upgrade: {err}"))),
    };
    let version = match response
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
    {
        Some(SUBPROTOCOL_V2) => 2,
        _ => 1,
    };
    info!(plane_id = %config.plane_id, protocol = version, "connected to the gateway");
    Ok(Connected { ws, version })
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

/// The send window of one response stream, shared by the reader (grants) and the task that
/// streams the body (spends).
#[derive(Default)]
struct StreamWindow {
    window: Mutex<SendWindow>,
    granted: Notify,
}

struct Running {
    task: JoinHandle<()>,
    window: Arc<StreamWindow>,
}

async fn serve(agent: Arc<Agent>, ws: Ws, version: u16, drain: CancellationToken) -> Ended {
    let started = tokio::time::Instant::now();
    agent.connected.fetch_add(1, Ordering::SeqCst);
    let (mut sink, mut stream) = ws.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(1024);
    let writer = tokio::spawn(async move {
        // Everything already queued goes out in one flush: under load many small frames share
        // TLS records and syscalls instead of paying for one each.
        'write: while let Some(mut message) = out_rx.recv().await {
            let mut batched = 0;
            loop {
                let close = matches!(message, Message::Close(_));
                batched += message.len();
                if sink.feed(message).await.is_err() || close {
                    let _ = sink.flush().await;
                    break 'write;
                }
                if batched >= MAX_BATCH {
                    break;
                }
                match out_rx.try_recv() {
                    Ok(next) => message = next,
                    Err(_) => break,
                }
            }
            if sink.flush().await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    if version >= 2 {
        let hello = Frame::Hello {
            version: 2,
            plane_id: agent.config.plane_id.clone(),
        };
        let _ = out_tx.send(binary(&hello)).await;
    }
    let mut bodies: HashMap<u32, (Frame, Vec<u8>)> = HashMap::new();
    let mut running: HashMap<u32, Running> = HashMap::new();
    let mut v1_tasks: Vec<JoinHandle<()>> = Vec::new();
    let mut ping = tokio::time::interval(agent.config.ping_interval);
    ping.tick().await;
    let mut last_heard = tokio::time::Instant::now();
    let mut nonce = 0u64;
    let mut draining_since: Option<tokio::time::Instant> = None;
    let mut drain_check = tokio::time::interval(Duration::from_millis(100));
    let ended = loop {
        tokio::select! {
            () = drain.cancelled(), if draining_since.is_none() => {
                draining_since = Some(tokio::time::Instant::now());
                if version >= 2 {
                    let _ = out_tx.send(binary(&Frame::GoAway { reason: "agent draining".into() })).await;
                }
            }
            _ = drain_check.tick(), if draining_since.is_some() => {
                running.retain(|_, r| !r.task.is_finished());
                v1_tasks.retain(|t| !t.is_finished());
                let since = draining_since.map(|t| t.elapsed()).unwrap_or_default();
                // Wait a moment for requests already on the wire, then for the in-flight ones.
                let idle = running.is_empty() && v1_tasks.is_empty() && bodies.is_empty();
                if (idle && since >= Duration::from_millis(500)) || since >= DRAIN_GRACE {
                    let _ = out_tx.send(Message::Close(None)).await;
                    break Ended::Closed { lived: started.elapsed(), reason: "drained".into() };
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > agent.config.read_deadline {
                    break Ended::Closed { lived: started.elapsed(), reason: "gateway silent past the read deadline".into() };
                }
                nonce += 1;
                let message = if version >= 2 { binary(&Frame::Ping { nonce }) } else { Message::Ping(Bytes::new()) };
                let _ = out_tx.try_send(message);
            }
            message = stream.next() => {
                let message = match message {
                    Some(Ok(message)) => message,
                    Some(Err(err)) => break Ended::Closed { lived: started.elapsed(), reason: err.to_string() },
                    None => break Ended::Closed { lived: started.elapsed(), reason: "closed by the gateway".into() },
                };
                last_heard = tokio::time::Instant::now();
                match message {
                    Message::Binary(bytes) => {
                        let frame = match v2::decode(&bytes, Limits { max_frame: MAX_MESSAGE }) {
                            Ok(frame) => frame,
                            Err(err) => break Ended::Closed { lived: started.elapsed(), reason: format!("malformed frame: {err}") },
                        };
                        match frame {
                            Frame::RequestHead { stream, end_stream: true, .. } => {
                                running.retain(|_, r| !r.task.is_finished());
                                start_v2(&agent, &mut running, stream, frame, Vec::new(), &out_tx);
                            }
                            Frame::RequestHead { stream, .. } => {
                                bodies.insert(stream, (frame, Vec::new()));
                            }
                            Frame::Data { stream, chunk } => {
                                if let Some((_, body)) = bodies.get_mut(&stream) {
                                    if body.len() + chunk.len() > MAX_MESSAGE {
                                        bodies.remove(&stream);
                                        let _ = out_tx.try_send(binary(&Frame::Reset { stream, code: 413, reason: "request body too large".into() }));
                                    } else {
                                        body.extend_from_slice(&chunk);
                                    }
                                }
                            }
                            Frame::End { stream } => {
                                if let Some((head, body)) = bodies.remove(&stream) {
                                    running.retain(|_, r| !r.task.is_finished());
                                    start_v2(&agent, &mut running, stream, head, body, &out_tx);
                                }
                            }
                            Frame::Reset { stream, .. } => {
                                bodies.remove(&stream);
                                if let Some(r) = running.remove(&stream) {
                                    r.task.abort();
                                }
                            }
                            Frame::WindowUpdate { stream, credits } => {
                                if let Some(r) = running.get(&stream) {
                                    r.window.window.lock().grant(credits);
                                    r.window.granted.notify_one();
                                }
                            }
                            Frame::Ping { nonce } => {
                                let _ = out_tx.try_send(binary(&Frame::Pong { nonce }));
                            }
                            Frame::GoAway { reason } => {
                                break Ended::Closed { lived: started.elapsed(), reason: format!("gateway going away: {reason}") };
                            }
                            _ => {}
                        }
                    }
                    Message::Text(text) => match v1::decode(&text, MAX_MESSAGE) {
                        Ok(v1::Message::Request(request)) => {
                            v1_tasks.retain(|t| !t.is_finished());
                            let (agent, out) = (agent.clone(), out_tx.clone());
                            v1_tasks.push(tokio::spawn(async move {
                                let response = match admit(&agent, false) {
                                    Some(slot) => {
                                        let _permit = slot.acquire().await;
                                        execute_v1(&agent, request).await
                                    }
                                    None => busy_v1(&request.request_id),
                                };
                                let _ = out.send(Message::Text(v1::encode(&v1::Message::Response(response)).into())).await;
                            }));
                        }
                        Ok(_) => {}
                        Err(err) => break Ended::Closed { lived: started.elapsed(), reason: format!("malformed message: {err}") },
                    },
                    Message::Close(frame) => break Ended::Closed {
                        lived: started.elapsed(),
                        reason: format!("closed by the gateway: {}", frame.map(|f| f.reason.to_string()).unwrap_or_default()),
                    },
                    _ => {}
                }
            }
        }
    };
    agent.connected.fetch_sub(1, Ordering::SeqCst);
    for (_, r) in running {
        r.task.abort();
    }
    for task in v1_tasks {
        task.abort();
    }
    // Let the writer flush a Close; it ends once every sender is gone.
    drop(out_tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    ended
}

/// The body of the 404 for a target this agent does not serve (OpenChoreo's agent routes `k8s`
/// only).
fn unknown_target(target: &str) -> Vec<u8> {
    serde_json::json!({
        "error": "UnknownTarget",
        "message": format!("this agent serves target k8s, not {target:?}"),
    })
    .to_string()
    .into_bytes()
}

fn binary(frame: &Frame) -> Message {
    Message::Binary(Bytes::from(v2::to_vec(frame)))
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

fn busy_v1(request_id: &str) -> v1::HttpTunnelResponse {
    v1::HttpTunnelResponse {
        request_id: request_id.to_owned(),
        status_code: 503,
        headers: None,
        body: None,
        error: Some(v1::TunnelError {
            code: Some(503),
            message: "the agent is at its request limit; retry later".into(),
            details: None,
        }),
    }
}

fn start_v2(
    agent: &Arc<Agent>,
    running: &mut HashMap<u32, Running>,
    stream: u32,
    head: Frame,
    body: Vec<u8>,
    out: &mpsc::Sender<Message>,
) {
    let window = Arc::new(StreamWindow::default());
    let task = tokio::spawn(run_v2(
        agent.clone(),
        head,
        body,
        out.clone(),
        window.clone(),
    ));
    if let Some(old) = running.insert(stream, Running { task, window }) {
        old.task.abort();
    }
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
    body: Vec<u8>,
) -> anyhow::Result<http::Request<kube::client::Body>> {
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
    Ok(builder.body(kube::client::Body::from(body))?)
}

async fn run_v2(
    agent: Arc<Agent>,
    head: Frame,
    body: Vec<u8>,
    out: mpsc::Sender<Message>,
    window: Arc<StreamWindow>,
) {
    let Frame::RequestHead {
        stream,
        method,
        target,
        path,
        query,
        headers,
        ..
    } = head
    else {
        return;
    };
    let send = |frame: Frame| {
        let out = out.clone();
        async move { out.send(binary(&frame)).await.is_ok() }
    };
    if target != "k8s" {
        let body = unknown_target(&target);
        if send(Frame::ResponseHead {
            stream,
            status: 404,
            headers: vec![("content-type".into(), "application/json".into())],
            end_stream: false,
        })
        .await
        {
            send(Frame::Data {
                stream,
                chunk: body,
            })
            .await;
            send(Frame::End { stream }).await;
        }
        return;
    }
    let Some(slot) = admit(&agent, is_streaming(&query)) else {
        send(Frame::Reset {
            stream,
            code: 503,
            reason: "the agent is at its request limit; retry later".into(),
        })
        .await;
        return;
    };
    let Some(_permit) = slot.acquire().await else {
        return;
    };
    agent.requests.fetch_add(1, Ordering::Relaxed);
    let request = match build_request(&method, &path, &query, headers.into_iter(), body) {
        Ok(request) => request,
        Err(err) => {
            send(Frame::Reset {
                stream,
                code: 400,
                reason: format!("invalid request: {err}"),
            })
            .await;
            return;
        }
    };
    let response = match agent.cluster.send(request).await {
        Ok(response) => response,
        Err(err) => {
            send(Frame::Reset {
                stream,
                code: 502,
                reason: format!("the build cluster's API server failed: {err}"),
            })
            .await;
            return;
        }
    };
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    if !send(Frame::ResponseHead {
        stream,
        status,
        headers,
        end_stream: false,
    })
    .await
    {
        return;
    }
    let mut body = response.into_body();
    loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                let Ok(mut data) = frame.into_data() else {
                    continue;
                };
                while !data.is_empty() {
                    // Spend credits; wait for a WindowUpdate when the window is empty, so a slow
                    // caller holds back only this stream.
                    let n = window.window.lock().take(data.len().min(CHUNK));
                    if n == 0 {
                        window.granted.notified().await;
                        continue;
                    }
                    let chunk = data.split_to(n);
                    if !send(Frame::Data {
                        stream,
                        chunk: chunk.to_vec(),
                    })
                    .await
                    {
                        return;
                    }
                }
            }
            Some(Err(err)) => {
                send(Frame::Reset {
                    stream,
                    code: 502,
                    reason: format!("reading the response: {err}"),
                })
                .await;
                return;
            }
            None => break,
        }
    }
    send(Frame::End { stream }).await;
    debug!(stream, status, "request done");
}

async fn execute_v1(agent: &Agent, request: v1::HttpTunnelRequest) -> v1::HttpTunnelResponse {
    agent.requests.fetch_add(1, Ordering::Relaxed);
    let request_id = request.request_id.clone();
    let failed = |status: u16, message: String| v1::HttpTunnelResponse {
        request_id: request_id.clone(),
        status_code: status,
        headers: None,
        body: None,
        error: Some(v1::TunnelError {
            code: Some(i32::from(status)),
            message,
            details: None,
        }),
    };
    if request.target != "k8s" {
        return v1::HttpTunnelResponse {
            request_id: request_id.clone(),
            status_code: 404,
            headers: Some(BTreeMap::from([(
                "Content-Type".to_owned(),
                vec!["application/json".to_owned()],
            )])),
            body: Some(unknown_target(&request.target)),
            error: None,
        };
    }
    let headers = request
        .headers
        .unwrap_or_default()
        .into_iter()
        .flat_map(|(k, vs)| vs.into_iter().map(move |v| (k.clone(), v)));
    let http_request = match build_request(
        &request.method,
        &request.path,
        request.query.as_deref().unwrap_or(""),
        headers,
        request.body.unwrap_or_default(),
    ) {
        Ok(r) => r,
        Err(err) => return failed(400, format!("invalid request: {err}")),
    };
    let response = match agent.cluster.send(http_request).await {
        Ok(response) => response,
        Err(err) => {
            warn!(%err, "the build cluster's API server failed");
            return failed(502, format!("the build cluster's API server failed: {err}"));
        }
    };
    let status = response.status().as_u16();
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in response.headers() {
        if let Ok(v) = v.to_str() {
            headers
                .entry(k.as_str().to_owned())
                .or_default()
                .push(v.to_owned());
        }
    }
    match response.into_body().collect().await {
        Ok(body) => v1::HttpTunnelResponse {
            request_id,
            status_code: status,
            headers: Some(headers),
            body: Some(body.to_bytes().to_vec()),
            error: None,
        },
        Err(err) => failed(502, format!("reading the response: {err}")),
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
            Vec::new(),
        )
        .unwrap();
        assert!(request.headers().get("authorization").is_none());
        assert!(request.headers().get("impersonate-user").is_none());
        assert_eq!(request.headers()["accept"], "application/json");
        assert_eq!(request.uri(), "/api/v1/namespaces?limit=1");
    }

    /// Query values are percent-encoded in the dial URL.
    #[test]
    fn plane_ids_are_encoded_in_the_url() {
        assert_eq!(encode_query("a b&c"), "a%20b%26c");
        assert_eq!(encode_query("P-0.x_y~"), "P-0.x_y~");
    }
}
