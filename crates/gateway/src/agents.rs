//! The agent listener: TLS that requests a client certificate, admission on the WebSocket
//! upgrade (`/ws?planeID=..&planeType=buildplane`), and one task pair per connection.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use buildplane_api::names::PlaneType;
use buildplane_tunnel::{
    MAX_MESSAGE, negotiate, v1,
    v2::{self, Frame, Limits},
};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use parking_lot::Mutex;
use rustls_pki_types::CertificateDer;
use tokio::{net::TcpListener, sync::mpsc};
use tokio_tungstenite::tungstenite::{
    Message,
    handshake::server::{ErrorResponse, Request, Response},
    http::{HeaderValue, StatusCode},
};
use tracing::{debug, info, warn};

use crate::{
    Shared,
    registry::{Connection, Delivery, Outbound, StreamEvent, public_key_of},
};

/// WebSocket read buffer. tungstenite zero-fills the whole buffer before every read, so its
/// default (128 KiB) is resident memory per idle agent; one TLS record (16 KiB) is enough.
const READ_BUFFER: usize = 16 * 1024;
/// Bytes of queued messages written before one flush.
const MAX_BATCH: usize = 256 * 1024;

/// The body of every 401 for a certificate no CR admits, whatever the reason (logged instead).
pub const NOT_ACCEPTED: &str = "certificate not accepted for this planeID";

fn reject(status: StatusCode, message: String) -> ErrorResponse {
    let mut res = ErrorResponse::new(Some(message));
    *res.status_mut() = status;
    res
}

/// Accepts agents until the listener fails.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        // Storm protection: at most `max_concurrent_handshakes` handshakes run at once, and the
        // next connection is accepted only when one finishes. The rest wait in the kernel's
        // accept queue, where waiting costs no CPU and, unlike a refused connection, sends no
        // agent into a longer backoff: a reconnect storm drains at the handshake rate.
        let Ok(permit) = shared.handshakes.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                debug!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Tunnel frames are small and latency-bound: no Nagle delay behind a delayed ACK.
        let _ = tcp.set_nodelay(true);
        if shared.draining.load(std::sync::atomic::Ordering::SeqCst) {
            drop(tcp);
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let accepted =
                tokio::time::timeout(Duration::from_secs(10), accept(tcp, &shared)).await;
            drop(permit);
            match accepted {
                Ok(Ok(Some((ws, conn)))) => {
                    shared.metrics.handshake(started.elapsed());
                    run_connection(ws, conn, shared).await
                }
                Ok(Ok(None)) => {}
                Ok(Err(err)) => debug!(%peer, %err, "agent handshake failed"),
                Err(_) => debug!(%peer, "agent handshake timed out"),
            }
        });
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>;

/// The planeID, protocol version and CRs an upgrade was admitted with.
type Verdict = (String, u16, BTreeSet<buildplane_api::CrKey>, String);

// The callback's error type is tungstenite's; its size is not ours to choose.
#[allow(clippy::result_large_err)]
async fn accept(
    tcp: tokio::net::TcpStream,
    shared: &Arc<Shared>,
) -> anyhow::Result<Option<(Ws, Arc<Connection>)>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(shared.agent_tls.clone());
    let tls = acceptor.accept(tcp).await?;
    let chain: Vec<CertificateDer<'static>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(<[_]>::to_vec)
        .unwrap_or_default();
    let verdict: Arc<Mutex<Option<Verdict>>> = Arc::default();
    let trust = shared.trust.clone();
    let metrics = shared.metrics.clone();
    let registry = shared.clone();
    let max_per_identity = shared.config.max_connections_per_identity.max(1);
    let verdict_in = verdict.clone();
    let callback = move |req: &Request, mut res: Response| -> Result<Response, ErrorResponse> {
        let query = req.uri().query().unwrap_or("");
        let param = |name: &str| {
            query
                .split('&')
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_owned())
        };
        if req.uri().path() != "/ws" {
            return Err(reject(
                StatusCode::NOT_FOUND,
                format!("no such path {}; agents connect to /ws", req.uri().path()),
            ));
        }
        let plane_type = param("planeType").unwrap_or_default();
        let Some(plane_id) = param("planeID").filter(|p| !p.is_empty()) else {
            metrics.rejected("bad_request");
            return Err(reject(
                StatusCode::BAD_REQUEST,
                "missing planeID query parameter".into(),
            ));
        };
        if let Err(err) = plane_type.parse::<PlaneType>() {
            metrics.rejected("bad_request");
            return Err(reject(StatusCode::BAD_REQUEST, err.to_string()));
        }
        if chain.is_empty() {
            metrics.rejected("no_certificate");
            return Err(reject(
                StatusCode::UNAUTHORIZED,
                "client certificate required".into(),
            ));
        }
        let admission = trust.admit(&plane_id, &chain);
        if admission.granted.is_empty() {
            metrics.rejected(if admission.refused.is_empty() {
                "unknown_plane"
            } else {
                "not_authorized"
            });
            let reasons = if admission.refused.is_empty() {
                format!("no BuildPlane or ClusterBuildPlane has planeID {plane_id:?}")
            } else {
                admission
                    .refused
                    .iter()
                    .map(|(cr, why)| format!("{cr}: {why}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            // The caller is not authenticated: the CRs sharing the planeID, their Secrets and
            // whether the planeID exists at all are for the gateway's log, not for it.
            info!(%plane_id, %reasons, "agent certificate not accepted");
            return Err(reject(StatusCode::UNAUTHORIZED, NOT_ACCEPTED.into()));
        }
        let agent_id = param("agentID").unwrap_or_default();
        let public_key = chain.first().map(public_key_of).unwrap_or_default();
        if registry
            .registry
            .count_identity(&public_key, &plane_id, &agent_id)
            >= max_per_identity
        {
            metrics.rejected("identity_cap");
            let mut res = reject(
                StatusCode::TOO_MANY_REQUESTS,
                format!("this certificate already has {max_per_identity} connections; retry later"),
            );
            res.headers_mut()
                .insert("retry-after", HeaderValue::from_static("5"));
            return Err(res);
        }
        let offered = req
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok());
        let (version, subprotocol) = negotiate(offered);
        if let Some(subprotocol) = subprotocol {
            res.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_static(subprotocol),
            );
        }
        *verdict_in.lock() = Some((plane_id, version, admission.granted, agent_id));
        Ok(res)
    };
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    let ws =
        match tokio_tungstenite::accept_hdr_async_with_config(tls, callback, Some(config)).await {
            Ok(ws) => ws,
            Err(err) => {
                debug!(%err, "upgrade refused");
                return Ok(None);
            }
        };
    let Some((plane_id, version, crs, agent_id)) = verdict.lock().take() else {
        return Ok(None);
    };
    let chain = ws
        .get_ref()
        .get_ref()
        .1
        .peer_certificates()
        .map(<[_]>::to_vec)
        .unwrap_or_default();
    let (tx, rx) = mpsc::channel(1024);
    // HA replicas share a certificate; the instance id tells a reconnect from a sibling.
    let conn = Arc::new(
        Connection::new(shared.registry.next_id(), plane_id, version, chain, crs, tx)
            .with_agent_id(agent_id),
    );
    shared.outbound_rx.lock().insert(conn.id, rx);
    Ok(Some((ws, conn)))
}

async fn run_connection(ws: Ws, conn: Arc<Connection>, shared: Arc<Shared>) {
    let Some(mut rx) = shared.outbound_rx.lock().remove(&conn.id) else {
        return;
    };
    // Trust may have changed since the upgrade was admitted; decide again now that the
    // connection becomes visible to revalidation, so no change falls between the two.
    let admission = shared.trust.admit(&conn.plane_id, &conn.chain);
    if admission.granted.is_empty() {
        let mut ws = ws;
        let _ = ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Policy,
                reason: "certificate no longer valid for any CR".into(),
            }))
            .await;
        return;
    }
    *conn.crs.write() = admission.granted;
    info!(id = conn.id, plane_id = %conn.plane_id, identity = %conn.identity, protocol = conn.version, crs = ?conn.crs.read(), "agent connected");
    shared.metrics.admitted();
    shared.registry.add(conn.clone());
    let (mut sink, mut stream) = ws.split();
    let heartbeat = shared.config.heartbeat_interval;
    let timeout = shared.config.heartbeat_timeout;
    let writer_conn = conn.clone();
    let writer = tokio::spawn(async move {
        let mut ping = tokio::time::interval(heartbeat);
        ping.tick().await;
        let mut nonce = 0u64;
        loop {
            tokio::select! {
                out = rx.recv() => {
                    // Everything already queued goes out in one flush, so under load small
                    // frames share TLS records and syscalls.
                    let mut out = out;
                    let mut batched = 0;
                    loop {
                        let message = match out {
                            Some(Outbound::Frame(frame)) => Message::Binary(Bytes::from(v2::to_vec(&frame))),
                            Some(Outbound::Text(text)) => Message::Text(text.into()),
                            Some(Outbound::Close(reason)) => {
                                let _ = sink.send(Message::Close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                                    code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Policy,
                                    reason: reason.into(),
                                }))).await;
                                return;
                            }
                            None => {
                                let _ = sink.flush().await;
                                return;
                            }
                        };
                        batched += message.len();
                        if sink.feed(message).await.is_err() { return; }
                        if batched >= MAX_BATCH { break; }
                        match rx.try_recv() {
                            Ok(next) => out = Some(next),
                            Err(_) => break,
                        }
                    }
                    if sink.flush().await.is_err() { return; }
                }
                _ = ping.tick() => {
                    nonce += 1;
                    let message = if writer_conn.version >= 2 {
                        Message::Binary(Bytes::from(v2::to_vec(&Frame::Ping { nonce })))
                    } else {
                        Message::Ping(Bytes::from_static(b"gw"))
                    };
                    if sink.send(message).await.is_err() { return; }
                }
            }
        }
    });
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout(timeout, stream.next()) => next,
            () = shared.shutdown.cancelled() => break,
        };
        let message = match next {
            Err(_) => {
                warn!(
                    id = conn.id,
                    "agent silent past the heartbeat timeout; closing"
                );
                break;
            }
            Ok(None) | Ok(Some(Err(_))) => break,
            Ok(Some(Ok(message))) => message,
        };
        conn.touch();
        match message {
            Message::Binary(bytes) => match v2::decode(
                &bytes,
                Limits {
                    max_frame: MAX_MESSAGE,
                },
            ) {
                Ok(frame) => on_frame(&conn, frame),
                Err(err) => {
                    warn!(id = conn.id, %err, "malformed frame; closing the connection");
                    break;
                }
            },
            Message::Text(text) => match v1::decode(&text, MAX_MESSAGE) {
                Ok(v1::Message::Response(response)) => {
                    let waiter = conn.pending_v1.lock().remove(&response.request_id);
                    if let Some(waiter) = waiter {
                        let status = response.status_code;
                        let headers = response
                            .headers
                            .unwrap_or_default()
                            .into_iter()
                            .flat_map(|(k, vs)| vs.into_iter().map(move |v| (k.clone(), v)))
                            .collect();
                        let _ = waiter.send(StreamEvent::Head {
                            status,
                            headers,
                            end: false,
                        });
                        if let Some(error) = response.error.filter(|_| response.body.is_none()) {
                            let _ = waiter.send(StreamEvent::Data(Bytes::from(serde_json::json!({"error": "AgentError", "message": error.message, "details": error.details}).to_string())));
                        }
                        if let Some(body) = response.body {
                            let _ = waiter.send(StreamEvent::Data(Bytes::from(body)));
                        }
                        let _ = waiter.send(StreamEvent::End);
                    }
                }
                Ok(_) => debug!(id = conn.id, "ignoring a v1 request from an agent"),
                Err(err) => {
                    warn!(id = conn.id, %err, "malformed v1 message; closing the connection");
                    break;
                }
            },
            Message::Close(_) => break,
            _ => {}
        }
    }
    writer.abort();
    shared.registry.remove(&conn);
    info!(id = conn.id, plane_id = %conn.plane_id, "agent disconnected");
}

/// Routes one frame from the agent. Never waits: body chunks are queued per stream within the
/// stream's window, so a slow caller never stalls the other streams of the connection.
fn on_frame(conn: &Arc<Connection>, frame: Frame) {
    let (stream, event) = match frame {
        Frame::ResponseHead {
            stream,
            status,
            headers,
            end_stream,
        } => (
            stream,
            StreamEvent::Head {
                status,
                headers,
                end: end_stream,
            },
        ),
        Frame::Data { stream, chunk } => (stream, StreamEvent::Data(Bytes::from(chunk))),
        Frame::End { stream } => (stream, StreamEvent::End),
        Frame::Reset {
            stream,
            code,
            reason,
        } => (stream, StreamEvent::Reset { code, reason }),
        Frame::Ping { nonce } => {
            let _ = conn
                .outbound
                .try_send(Outbound::Frame(Frame::Pong { nonce }));
            return;
        }
        Frame::GoAway { reason } => {
            info!(id = conn.id, %reason, "agent draining this connection");
            conn.draining
                .store(true, std::sync::atomic::Ordering::SeqCst);
            return;
        }
        _ => return,
    };
    let reset = |code: u16, reason: &str| {
        let _ = conn.outbound.try_send(Outbound::Frame(Frame::Reset {
            stream,
            code,
            reason: reason.into(),
        }));
    };
    let is_end = matches!(event, StreamEvent::End | StreamEvent::Reset { .. });
    match conn.deliver(stream, event) {
        Delivery::Delivered => {}
        // A frame for a stream nobody waits for: tell the agent to stop (unless it just did).
        Delivery::NoStream if !is_end => reset(499, "caller went away"),
        Delivery::NoStream => {}
        Delivery::Overrun => {
            warn!(
                id = conn.id,
                stream, "agent overran the stream window; resetting it"
            );
            reset(400, "flow-control window exceeded");
        }
    }
}
