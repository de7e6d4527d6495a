//! The internal API (mTLS with the internal CA): the Kubernetes proxy, plane status, notify,
//! the connection table and the event stream.

use std::{collections::BTreeMap, convert::Infallible, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::Body,
    extract::{Path, Query, Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode},
    response::{IntoResponse, Response},
    routing::{any, get, post},
};
use buildplane_api::{
    CrKey,
    names::{PlaneType, UnknownPlaneType},
};
use buildplane_tunnel::{v1, v2::Frame};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;
use tracing::debug;

use crate::{
    Shared,
    registry::{Outbound, StreamEvent, Unavailable},
};

/// Largest proxied request body (OpenChoreo's limit).
pub const MAX_REQUEST_BODY: usize = 10 * 1024 * 1024;
/// How long a proxied request waits for the agent's response head.
pub const RESPONSE_HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// The internal API's routes.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/api/proxy/{plane_type}/{plane_id}/{namespace}/{name}/{target}/{*path}",
            any(proxy),
        )
        .route("/api/v1/planes/status", get(all_status))
        .route(
            "/api/v1/planes/{plane_type}/{plane_id}/status",
            get(plane_status),
        )
        .route("/api/v1/planes/notify", post(notify))
        .route(
            "/api/v1/planes/{plane_type}/{plane_id}/reconnect",
            post(reconnect),
        )
        .route(
            "/api/v1/connections",
            get(|State(shared): State<Arc<Shared>>| async move { Json(shared.registry.table()) }),
        )
        .route("/api/v1/events", get(events))
        .with_state(shared)
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": code, "message": message.into()})),
    )
        .into_response()
}

fn invalid_plane_type(err: &UnknownPlaneType) -> Response {
    error(StatusCode::BAD_REQUEST, "InvalidPlaneType", err.to_string())
}

async fn proxy(
    State(shared): State<Arc<Shared>>,
    Path((plane_type, plane_id, namespace, name, target, path)): Path<(
        String,
        String,
        String,
        String,
        String,
        String,
    )>,
    req: Request,
) -> Response {
    let started = tokio::time::Instant::now();
    let method = req.method().clone();
    if !matches!(
        method,
        Method::GET
            | Method::POST
            | Method::PUT
            | Method::PATCH
            | Method::DELETE
            | Method::HEAD
            | Method::OPTIONS
    ) {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("method {method} is not proxied"),
        );
    }
    if let Err(err) = plane_type.parse::<PlaneType>() {
        return invalid_plane_type(&err);
    }
    // OpenChoreo's validator accepts these targets; agents serve `k8s` and answer 404 otherwise.
    if !matches!(target.as_str(), "k8s" | "monitoring" | "logs") {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidTarget",
            format!("target {target:?} is not supported; expected k8s, monitoring or logs"),
        );
    }
    if req.headers().contains_key(http::header::UPGRADE) {
        return error(
            StatusCode::NOT_IMPLEMENTED,
            "UpgradeNotSupported",
            "connection upgrades (exec, attach, port-forward) are not proxied",
        );
    }
    let path = match shared.config.proxy_policy.check(&path) {
        Ok(normalised) => normalised,
        Err(refusal) => return error(refusal.status(), refusal.code(), refusal.to_string()),
    };
    let cr = CrKey::from_url_segments(&namespace, &name);
    let query = req.uri().query().unwrap_or("").to_owned();
    // OpenChoreo's request id: the caller's X-Request-ID, or `gw-` and 16 hex digits.
    let gateway_request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map_or_else(
            || format!("gw-{:016x}", rand::random::<u64>()),
            str::to_owned,
        );
    let streaming = query
        .split('&')
        .any(|p| p == "watch=true" || p == "watch=1" || p == "follow=true");
    let mut headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .filter(|(name, _)| {
            !matches!(
                name.as_str(),
                "authorization" | "host" | "connection" | "content-length" | "transfer-encoding"
            )
        })
        .filter_map(|(name, value)| {
            Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
        })
        .collect();
    if !headers.iter().any(|(name, _)| name == "x-request-id") {
        headers.push(("x-request-id".into(), gateway_request_id.clone()));
    }
    let body = match http_body_util::Limited::new(req.into_body(), MAX_REQUEST_BODY)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestTooLarge",
                format!("request bodies are limited to {MAX_REQUEST_BODY} bytes"),
            );
        }
    };
    let closed = || {
        error(
            StatusCode::BAD_GATEWAY,
            "AgentConnectionClosed",
            "the agent connection closed before the request was sent",
        )
    };
    // A GET or HEAD whose connection closed before the agent answered (a renewal or CA
    // rotation handing over: the old connection drains as the new one registers) is sent again
    // on another authorised connection; other methods get 502, as they may have run.
    let retriable = matches!(method, Method::GET | Method::HEAD);
    let mut attempt = 0;
    let mut closed_connection: Option<u64> = None;
    let (conn, rx, guard, v1_guard, _pending, head) = loop {
        attempt += 1;
        let conn = match shared.registry.pick(&plane_id, &cr) {
            Ok(conn) => conn,
            // Nothing to retry on: the caller learns the connection it was on closed.
            Err(_) if let Some(id) = closed_connection => {
                shared.metrics.proxy_failed("connection_closed");
                return error(
                    StatusCode::BAD_GATEWAY,
                    "AgentConnectionClosed",
                    format!(
                        "the agent connection (id {id}) closed before the agent answered; the request may or may not have run"
                    ),
                );
            }
            Err(Unavailable::NoAgentConnected) => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "NoAgentConnected",
                    format!("no agent is connected for planeID {plane_id:?}"),
                );
            }
            Err(Unavailable::NotAuthorized) => {
                return error(
                    StatusCode::FORBIDDEN,
                    "NotAuthorized",
                    format!("no connected agent of planeID {plane_id:?} is authorised for {cr}"),
                );
            }
        };
        let mut v1_guard = None;
        let (rx, guard) = if conn.version >= 2 {
            let Some((stream, rx, window)) = conn.open_stream() else {
                return closed();
            };
            let guard = StreamGuard {
                conn: conn.clone(),
                stream,
                window,
                done: false,
            };
            let end_stream = body.is_empty();
            let head = Frame::RequestHead {
                stream,
                method: method.to_string(),
                target: target.clone(),
                path: path.clone(),
                query: query.clone(),
                headers: headers.clone(),
                end_stream,
            };
            let mut ok = conn.outbound.send(Outbound::Frame(head)).await.is_ok();
            if !end_stream {
                for chunk in body.chunks(64 * 1024) {
                    ok &= conn
                        .outbound
                        .send(Outbound::Frame(Frame::Data {
                            stream,
                            chunk: chunk.to_vec(),
                        }))
                        .await
                        .is_ok();
                }
                ok &= conn
                    .outbound
                    .send(Outbound::Frame(Frame::End { stream }))
                    .await
                    .is_ok();
            }
            if !ok {
                return closed();
            }
            (rx, Some(guard))
        } else {
            if streaming {
                return error(
                    StatusCode::NOT_IMPLEMENTED,
                    "StreamingNotSupported",
                    "the agent speaks tunnel v1 (OpenChoreo JSON), which cannot stream watch or follow responses",
                );
            }
            let request_id = uuid::Uuid::new_v4().to_string();
            let gateway_request_id = gateway_request_id.clone();
            let Some(rx) = conn.open_v1(request_id.clone()) else {
                return closed();
            };
            v1_guard = Some(V1Guard {
                conn: conn.clone(),
                request_id: request_id.clone(),
            });
            let mut grouped: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (name, value) in headers.clone() {
                grouped.entry(name).or_default().push(value);
            }
            let request = v1::HttpTunnelRequest {
                request_id: request_id.clone(),
                gateway_request_id: Some(gateway_request_id),
                target: target.clone(),
                method: method.to_string(),
                path: path.clone(),
                query: (!query.is_empty()).then(|| query.clone()),
                headers: Some(grouped),
                body: (!body.is_empty()).then(|| body.to_vec()),
            };
            if conn
                .outbound
                .send(Outbound::Text(v1::encode(&v1::Message::Request(request))))
                .await
                .is_err()
            {
                return closed();
            }
            (rx, None)
        };
        let mut rx = rx;
        let pending = shared.metrics.pending_guard();
        let head = tokio::time::timeout(RESPONSE_HEAD_TIMEOUT, rx.recv()).await;
        if matches!(head, Ok(None)) && retriable && attempt < 3 {
            shared.metrics.proxy_failed("connection_closed_retried");
            closed_connection = Some(conn.id);
            drop((guard, v1_guard));
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        }
        break (conn, rx, guard, v1_guard, pending, head);
    };
    let (status, headers, end) = match head {
        Err(_) => {
            return error(
                StatusCode::GATEWAY_TIMEOUT,
                "AgentTimeout",
                "the agent did not answer in time",
            );
        }
        Ok(None) => {
            shared.metrics.proxy_failed("connection_closed");
            return error(
                StatusCode::BAD_GATEWAY,
                "AgentConnectionClosed",
                format!(
                    "the agent connection (id {}) closed before the agent answered; the request may or may not have run",
                    conn.id
                ),
            );
        }
        Ok(Some(StreamEvent::Reset { code, reason })) => {
            shared.metrics.proxy_failed("agent_reset");
            return agent_refused(code, &reason);
        }
        Ok(Some(StreamEvent::Head {
            status,
            headers,
            end,
        })) => (status, headers, end),
        Ok(Some(_)) => {
            return error(
                StatusCode::BAD_GATEWAY,
                "ProtocolError",
                "the agent sent a body before a response head",
            );
        }
    };
    drop(v1_guard);
    shared.metrics.proxied(started.elapsed());
    let mut response_headers = HeaderMap::new();
    for (name, value) in headers {
        if matches!(
            name.to_ascii_lowercase().as_str(),
            "content-length" | "transfer-encoding" | "connection"
        ) {
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            response_headers.append(name, value);
        }
    }
    let body = if end {
        Body::empty()
    } else {
        Body::from_stream(body_stream(rx, guard))
    };
    let mut res = Response::new(body);
    *res.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    *res.headers_mut() = response_headers;
    res
}

/// The answer to a stream the agent reset before its response head. The agent's code is an
/// HTTP status (400 invalid request, 502 the build cluster's API server failed, 503 at its
/// request limit) and the caller gets it, as a v1 agent's status reaches the caller; a 503
/// carries `Retry-After`, since the agent sheds load and a retry a moment later succeeds.
/// Codes outside 400..=599 are a protocol error of the agent's: 502.
fn agent_refused(code: u16, reason: &str) -> Response {
    let status = StatusCode::from_u16(code)
        .ok()
        .filter(|s| s.is_client_error() || s.is_server_error())
        .unwrap_or(StatusCode::BAD_GATEWAY);
    let mut res = error(
        status,
        "AgentError",
        format!("the agent failed the request ({code}): {reason}"),
    );
    if status == StatusCode::SERVICE_UNAVAILABLE {
        res.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    res
}

/// Owns a v2 stream on the proxy side: grants window credits as the caller consumes the body,
/// and when the caller goes away early (dropped body), resets the stream so the agent stops
/// (a watch ends on the build cluster too).
struct StreamGuard {
    conn: Arc<crate::registry::Connection>,
    stream: u32,
    window: Arc<parking_lot::Mutex<buildplane_tunnel::flow::ReceiveWindow>>,
    done: bool,
}

impl StreamGuard {
    fn consumed(&self, n: usize) {
        if let Some(credits) = self.window.lock().consume(n) {
            let _ = self
                .conn
                .outbound
                .try_send(Outbound::Frame(Frame::WindowUpdate {
                    stream: self.stream,
                    credits,
                }));
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if !self.done && self.conn.forget_stream(self.stream) {
            let _ = self.conn.outbound.try_send(Outbound::Frame(Frame::Reset {
                stream: self.stream,
                code: 499,
                reason: "the caller went away".into(),
            }));
        }
    }
}

/// Forgets a v1 request that was not answered (timeout, caller gone).
struct V1Guard {
    conn: Arc<crate::registry::Connection>,
    request_id: String,
}

impl Drop for V1Guard {
    fn drop(&mut self) {
        self.conn.pending_v1.lock().remove(&self.request_id);
    }
}

/// The body of a proxied response: chunks until End; a lost connection ends it with an error.
fn body_stream(
    rx: mpsc::UnboundedReceiver<StreamEvent>,
    guard: Option<StreamGuard>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    futures::stream::unfold(Some((rx, guard)), |state| async move {
        let (mut rx, mut guard) = state?;
        let finish = |guard: &mut Option<StreamGuard>| {
            if let Some(guard) = guard.as_mut() {
                guard.done = true;
            }
        };
        match rx.recv().await {
            Some(StreamEvent::Data(bytes)) => {
                if let Some(guard) = &guard {
                    guard.consumed(bytes.len());
                }
                Some((Ok(bytes), Some((rx, guard))))
            }
            Some(StreamEvent::End) => {
                finish(&mut guard);
                None
            }
            Some(StreamEvent::Reset { reason, .. }) => {
                finish(&mut guard);
                Some((
                    Err(std::io::Error::other(format!(
                        "agent reset the stream: {reason}"
                    ))),
                    None,
                ))
            }
            Some(StreamEvent::Head { .. }) => {
                Some((Err(std::io::Error::other("duplicate response head")), None))
            }
            None => {
                finish(&mut guard);
                Some((
                    Err(std::io::Error::other(
                        "agent connection closed mid-response",
                    )),
                    None,
                ))
            }
        }
    })
}

#[derive(Deserialize)]
struct CrQuery {
    namespace: Option<String>,
    name: Option<String>,
}

fn status_of(shared: &Shared, plane_id: &str, cr: Option<&CrKey>) -> serde_json::Value {
    let (n, last_seen) = shared.registry.count(plane_id, cr);
    let last_seen = (last_seen > 0).then(|| {
        chrono::DateTime::from_timestamp_millis(last_seen as i64)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
    });
    json!({"planeType": "buildplane", "planeID": plane_id, "connected": n > 0, "connectedAgents": n, "lastSeen": last_seen.flatten()})
}

async fn plane_status(
    State(shared): State<Arc<Shared>>,
    Path((plane_type, plane_id)): Path<(String, String)>,
    Query(q): Query<CrQuery>,
) -> Response {
    if let Err(err) = plane_type.parse::<PlaneType>() {
        return invalid_plane_type(&err);
    }
    let cr = q
        .name
        .map(|name| CrKey::from_url_segments(q.namespace.as_deref().unwrap_or(""), &name));
    Json(status_of(&shared, &plane_id, cr.as_ref())).into_response()
}

/// OpenChoreo's `reconnect`: closes every connection of the plane (agents come back with
/// backoff and are admitted afresh).
async fn reconnect(
    State(shared): State<Arc<Shared>>,
    Path((plane_type, plane_id)): Path<(String, String)>,
) -> Response {
    if let Err(err) = plane_type.parse::<PlaneType>() {
        return invalid_plane_type(&err);
    }
    let mut disconnected = 0;
    for conn in shared.registry.all() {
        if conn.plane_id == plane_id {
            let _ = conn
                .outbound
                .try_send(Outbound::Close("reconnect requested".into()));
            shared.registry.remove(&conn);
            disconnected += 1;
        }
    }
    Json(json!({"success": true, "disconnectedAgents": disconnected})).into_response()
}

async fn all_status(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let mut planes: Vec<String> = shared
        .registry
        .all()
        .iter()
        .map(|c| c.plane_id.clone())
        .collect();
    planes.extend(shared.trust.crs().into_iter().map(|(_, plane)| plane));
    planes.sort();
    planes.dedup();
    let statuses: Vec<serde_json::Value> =
        planes.iter().map(|p| status_of(&shared, p, None)).collect();
    Json(json!({"planes": statuses, "total": statuses.len()}))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Notify {
    #[serde(rename = "planeID")]
    plane_id: String,
    event: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    name: String,
}

async fn notify(State(shared): State<Arc<Shared>>, Json(body): Json<Notify>) -> Response {
    if !matches!(body.event.as_str(), "created" | "updated" | "deleted") {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidEvent",
            format!("event {:?} is not created, updated or deleted", body.event),
        );
    }
    let cr = CrKey::from_url_segments(&body.namespace, &body.name);
    debug!(plane_id = %body.plane_id, event = %body.event, %cr, "notify");
    let action = if body.event == "deleted" && !body.name.is_empty() {
        // Revoke this CR now, even if the reflector has not seen the deletion yet; its
        // siblings sharing the planeID are re-checked like everything else and stay.
        shared.trust.mark_deleted(&cr);
        "revoke"
    } else {
        "revalidate"
    };
    // The plane's connections now, so the answer says what changed; every other connection
    // (a planeID edit moves CRs between planes) follows through the reflectors' revalidation.
    let (granted, revoked) = crate::revalidate_planes(&shared, Some(&body.plane_id));
    Json(json!({"success": true, "action": action, "authorizationsGranted": granted, "authorizationsRevoked": revoked})).into_response()
}

async fn events(State(shared): State<Arc<Shared>>) -> Response {
    let mut events = shared.registry.subscribe();
    let snapshot = shared.registry.snapshot();
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(256);
    tokio::spawn(async move {
        let line = |value: &dyn erased::Line| Bytes::from(format!("{}\n", value.line()));
        if tx.send(Ok(line(&snapshot))).await.is_err() {
            return;
        }
        let mut keepalive = tokio::time::interval(Duration::from_secs(15));
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Ok(event) => if tx.send(Ok(line(&event))).await.is_err() { return },
                    // Lagging means lost events: end the stream so the client resyncs.
                    Err(_) => return,
                },
                _ = keepalive.tick() => if tx.send(Ok(Bytes::from_static(b"\n"))).await.is_err() { return },
            }
        }
    });
    let mut res = Response::new(Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ));
    res.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("application/x-ndjson"),
    );
    res
}

mod erased {
    /// A value written as one JSON line.
    pub(super) trait Line {
        fn line(&self) -> String;
    }

    impl<T: serde::Serialize> Line for T {
        fn line(&self) -> String {
            serde_json::to_string(self).unwrap_or_default()
        }
    }
}
