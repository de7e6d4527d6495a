//! The Kubernetes proxy (`/api/proxy/{planeType}/{planeID}/{namespace}/{name}/{target}/{path}`)
//! in four steps: [`Call::validate`] checks the request and shapes its head, [`exchange`]
//! chooses an authorised connection, opens a stream on it and sends the body (trying another
//! connection when one closed before the agent answered a GET or HEAD), and [`relay`] turns the
//! stream's answer into the HTTP response, its body read under flow-control credits as the
//! caller consumes it. Dropping the response (the caller went away) resets the stream, so the
//! agent stops too: a watch ends on the build cluster.
//!
//! A connection whose agent has gone silent (a probe unanswered past the liveness timeout: a
//! partition between this replica and the agents) takes no request, and a request waiting
//! there for its head stops waiting: a GET or HEAD goes elsewhere, any other method gets 504
//! `AgentUnresponsive` (it may have run). When no connection of this replica can take a request
//! that was never sent (or may be sent again), [`forward`] sends it once to a sibling replica
//! (`peers`), marked `x-buildplane-forwarded-by`, which never forwards it again.

use std::{sync::Arc, time::Duration};

use axum::{
    Json,
    body::Body,
    extract::{Path, Request, State},
    http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode},
    response::{IntoResponse, Response},
};
use buildplane_api::{CrKey, names::PlaneType};
use buildplane_link::{Read, RequestHead, ResponseHead, StreamError, StreamHandle};
use buildplane_tunnel::session::RESET_DRAINING;
use bytes::Bytes;
use http_body_util::BodyExt as _;
use serde::Deserialize;
use serde_json::json;

use crate::{
    Shared,
    peers::{Peer, Peers},
    rate::Throttled,
    registry::Unavailable,
};

/// Largest proxied request body (OpenChoreo's limit).
pub const MAX_REQUEST_BODY: usize = 10 * 1024 * 1024;
/// How long a proxied request waits for the agent's response head.
pub const RESPONSE_HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a request waits for an agent whose every connection is draining to connect anew.
const RECONNECT_WAIT: Duration = Duration::from_secs(5);
/// Connections a GET or HEAD is tried on when each closes before its agent answers.
const ATTEMPTS: usize = 3;
/// Marks a request a sibling replica forwarded (its value: that replica's id); such a request
/// is never forwarded again.
pub const FORWARDED_BY: &str = "x-buildplane-forwarded-by";
/// Names the sibling replica that answered a forwarded request (on the response).
pub const FORWARDED_TO: &str = "x-buildplane-forwarded-to";
/// How long a forwarded request waits for the sibling's response head: the sibling's own wait
/// for its agent, and a margin.
const FORWARD_HEAD_TIMEOUT: Duration = Duration::from_secs(35);

/// The proxy route's path segments.
#[derive(Debug, Deserialize)]
pub struct ProxyPath {
    plane_type: String,
    plane_id: String,
    namespace: String,
    name: String,
    target: String,
    path: String,
}

/// The proxy handler.
pub async fn proxy(
    State(shared): State<Arc<Shared>>,
    Path(segments): Path<ProxyPath>,
    req: Request,
) -> Response {
    let started = tokio::time::Instant::now();
    let (call, body) = match Call::validate(&shared, segments, req) {
        Ok(call) => call,
        Err(refusal) => return refusal,
    };
    if let Err(throttled) = admit(&shared, &call) {
        shared.metrics.proxy_failed("plane_rate_limited");
        return too_many(&throttled);
    }
    let upload = match Upload::prepare(&call, body).await {
        Ok(upload) => upload,
        Err(failure) => return failure.into_response(),
    };
    let _pending = shared.metrics.pending_guard();
    match exchange(&shared, &call, upload).await {
        Ok((head, stream)) => {
            shared.metrics.proxied(started.elapsed());
            relay(head, stream, ByteCharge::of(&shared, &call))
        }
        Err(Unserved { failure, upload }) => {
            if let Some(label) = failure.metric() {
                shared.metrics.proxy_failed(label);
            }
            match (upload, &shared.peers) {
                (Some(upload), Some(peers))
                    if failure.forwardable() && call.arrival.forwardable() =>
                {
                    forward(&shared, peers, &call, upload, failure).await
                }
                _ => failure.into_response(),
            }
        }
    }
}

/// Takes the request's token from its planeID's bucket (`--plane-rate-limit`). A request a
/// sibling forwarded was counted where it arrived.
fn admit(shared: &Shared, call: &Call) -> Result<(), Throttled> {
    match &shared.plane_rates {
        Some(rates) if call.arrival.counted_here() => {
            rates.admit(&call.plane_id, tokio::time::Instant::now())
        }
        _ => Ok(()),
    }
}

/// Charges a relayed response's bytes to its planeID's bucket as they pass
/// (`--plane-rate-request-bytes`), where the request was counted.
struct ByteCharge {
    shared: Arc<Shared>,
    plane_id: String,
}

impl ByteCharge {
    fn of(shared: &Arc<Shared>, call: &Call) -> Option<ByteCharge> {
        let rates = shared.plane_rates.as_ref()?;
        (rates.charges_bytes() && call.arrival.counted_here()).then(|| ByteCharge {
            shared: shared.clone(),
            plane_id: call.plane_id.clone(),
        })
    }

    fn charge(&self, bytes: usize) {
        if let Some(rates) = &self.shared.plane_rates {
            rates.charge(&self.plane_id, bytes, tokio::time::Instant::now());
        }
    }
}

/// 429 with the seconds until the planeID's next token.
fn too_many(throttled: &Throttled) -> Response {
    let res = error(
        StatusCode::TOO_MANY_REQUESTS,
        "PlaneRateLimited",
        throttled.to_string(),
    );
    retry_after(res, throttled.retry_after_secs())
}

/// Who is calling the internal API, known from the client certificate of its connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InternalCaller {
    /// A sibling replica ([`crate::peers::Peers::is_sibling`]).
    pub sibling: bool,
}

impl InternalCaller {
    /// The caller that presented `chain` (leaf first), to a replica with `peers` (none: no
    /// sibling can call).
    pub fn of(
        peers: Option<&crate::peers::Peers>,
        chain: &[rustls::pki_types::CertificateDer<'_>],
    ) -> InternalCaller {
        let sibling = match (peers, chain.first()) {
            (Some(peers), Some(leaf)) => peers.is_sibling(leaf),
            _ => false,
        };
        InternalCaller { sibling }
    }
}

/// How a proxy request reached this replica.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Arrival {
    /// From a caller: counted against its planeID's rate here, and forwarded to a sibling
    /// when no connection of this replica can take it.
    Caller,
    /// Forwarded by a sibling replica (`x-buildplane-forwarded-by`, sent over a connection
    /// whose certificate is a sibling's): counted where it arrived, never forwarded again.
    Sibling,
    /// Marked `x-buildplane-forwarded-by` by a caller that is not a sibling: counted as any
    /// caller's request (the header buys no exemption from the rate limit), and not forwarded
    /// (the mark still ends any chain of forwards, should siblings' certificates disagree for a
    /// while).
    Claimed,
}

impl Arrival {
    /// A request marked `x-buildplane-forwarded-by` or not, from `caller`.
    fn of(marked: bool, caller: InternalCaller) -> Arrival {
        match (marked, caller.sibling) {
            (false, _) => Arrival::Caller,
            (true, true) => Arrival::Sibling,
            (true, false) => Arrival::Claimed,
        }
    }

    /// Counted against the planeID's rate at this replica.
    fn counted_here(&self) -> bool {
        !matches!(self, Arrival::Sibling)
    }

    /// May be forwarded to a sibling.
    fn forwardable(&self) -> bool {
        matches!(self, Arrival::Caller)
    }
}

/// A validated proxy request: where it goes and the head the agent gets.
#[derive(Debug)]
struct Call {
    /// As the caller named it (`buildplane` or `workflowplane`: one planeID space).
    plane_type: PlaneType,
    plane_id: String,
    cr: CrKey,
    head: RequestHead,
    /// A GET or HEAD: safe to send again when its connection closed before the agent answered.
    retriable: bool,
    /// A watch or log follow (v1 agents cannot stream one).
    streaming: bool,
    /// The request declares no body.
    bodiless: bool,
    /// The path and query as the caller sent them (what a sibling replica is asked).
    uri: String,
    /// From a caller or forwarded by a sibling.
    arrival: Arrival,
}

impl Call {
    /// Checks the method, planeType, target, upgrade and path policy; keeps the caller's
    /// headers except its credentials and hop-by-hop ones; names the request
    /// (`X-Request-ID`, OpenChoreo's `gw-` form when the caller sent none).
    // The refusal is the response itself.
    #[allow(clippy::result_large_err)]
    fn validate(
        shared: &Shared,
        segments: ProxyPath,
        req: Request,
    ) -> Result<(Call, Body), Response> {
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
            return Err(error(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("method {method} is not proxied"),
            ));
        }
        let plane_type = match segments.plane_type.parse::<PlaneType>() {
            Ok(plane_type) => plane_type,
            Err(err) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "InvalidPlaneType",
                    err.to_string(),
                ));
            }
        };
        // OpenChoreo's validator accepts these targets; agents serve `k8s` and answer 404
        // otherwise.
        if !matches!(segments.target.as_str(), "k8s" | "monitoring" | "logs") {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "InvalidTarget",
                format!(
                    "target {:?} is not supported; expected k8s, monitoring or logs",
                    segments.target
                ),
            ));
        }
        if req.headers().contains_key(http::header::UPGRADE) {
            return Err(error(
                StatusCode::NOT_IMPLEMENTED,
                "UpgradeNotSupported",
                "connection upgrades (exec, attach, port-forward) are not proxied",
            ));
        }
        // As OpenChoreo's validator: a declared length over the limit is refused before any
        // byte is read or sent (a streamed body over it is cut in `send_streamed`).
        let declared = req
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_REQUEST_BODY as u64) {
            return Err(Failure::RequestTooLarge.into_response());
        }
        let path = shared
            .config
            .proxy_policy
            .check(&segments.path)
            .map_err(|refusal| error(refusal.status(), refusal.code(), refusal.to_string()))?;
        let query = req.uri().query().unwrap_or("").to_owned();
        let streaming = query
            .split('&')
            .any(|p| p == "watch=true" || p == "watch=1" || p == "follow=true");
        let bodiless = declares_no_body(req.headers());
        let uri = req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned());
        let arrival = Arrival::of(
            req.headers().contains_key(FORWARDED_BY),
            req.extensions()
                .get::<InternalCaller>()
                .copied()
                .unwrap_or_default(),
        );
        let (parts, body) = req.into_parts();
        let head = RequestHead {
            method: method.to_string(),
            target: segments.target,
            path,
            query,
            headers: forwarded_headers(&parts.headers),
        };
        let call = Call {
            plane_type,
            plane_id: segments.plane_id,
            cr: CrKey::from_url_segments(&segments.namespace, &segments.name),
            head,
            retriable: matches!(method, Method::GET | Method::HEAD),
            streaming,
            bodiless,
            uri,
            arrival,
        };
        Ok((call, body))
    }
}

/// No `Content-Length` above zero and no `Transfer-Encoding`: HTTP/1.1 says no body follows.
fn declares_no_body(headers: &HeaderMap) -> bool {
    let length = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    !headers.contains_key(http::header::TRANSFER_ENCODING) && length.unwrap_or(0) == 0
}

/// The caller's headers as the agent gets them: no credentials, no hop-by-hop headers, and an
/// `X-Request-ID` (the caller's, or OpenChoreo's `gw-` and 16 hex digits).
fn forwarded_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    let mut forwarded: Vec<(String, String)> = headers
        .iter()
        .filter(|(name, _)| {
            !matches!(
                name.as_str(),
                "authorization"
                    | "host"
                    | "connection"
                    | "content-length"
                    | "transfer-encoding"
                    | FORWARDED_BY
            )
        })
        // A value with bytes past ASCII (UTF-8 text, as OpenChoreo forwards it) goes through;
        // the tunnel carries text, so bytes that are not UTF-8 arrive as U+FFFD, as they do in
        // OpenChoreo's JSON.
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    let has_id = forwarded
        .iter()
        .any(|(name, value)| name == "x-request-id" && !value.is_empty());
    if !has_id {
        forwarded.retain(|(name, _)| name != "x-request-id");
        forwarded.push((
            "x-request-id".into(),
            format!("gw-{:016x}", rand::random::<u64>()),
        ));
    }
    forwarded
}

/// The request body as it will be sent.
enum Upload {
    /// No body: the head ends the request.
    Empty,
    /// Collected (bounded): a GET or HEAD with a body, which a retry must be able to send again.
    Whole(Bytes),
    /// Streamed to the agent under its credits as the caller sends it.
    Streamed(Body),
}

impl Upload {
    async fn prepare(call: &Call, body: Body) -> Result<Upload, Failure> {
        if call.bodiless {
            return Ok(Upload::Empty);
        }
        if !call.retriable {
            return Ok(Upload::Streamed(body));
        }
        match http_body_util::Limited::new(body, MAX_REQUEST_BODY)
            .collect()
            .await
        {
            Ok(body) => {
                let bytes = body.to_bytes();
                Ok(if bytes.is_empty() {
                    Upload::Empty
                } else {
                    Upload::Whole(bytes)
                })
            }
            Err(err) if err.is::<http_body_util::LengthLimitError>() => {
                Err(Failure::RequestTooLarge)
            }
            Err(err) => Err(Failure::CallerBody(err.to_string())),
        }
    }

    fn is_empty(&self) -> bool {
        matches!(self, Upload::Empty)
    }

    /// The same upload for another attempt (a streamed body cannot be sent twice).
    fn again(&self) -> Option<Upload> {
        match self {
            Upload::Empty => Some(Upload::Empty),
            Upload::Whole(bytes) => Some(Upload::Whole(bytes.clone())),
            Upload::Streamed(_) => None,
        }
    }
}

/// Why a proxied request got no answer from an agent.
#[derive(Debug)]
enum Failure {
    Unavailable(Unavailable, String, CrKey, PlaneType),
    /// The connection closed before the agent answered (the request may have run).
    Lost(u64),
    /// The connection went silent before the agent answered a request that is not sent again
    /// (it may have run).
    Silent {
        id: u64,
        method: String,
    },
    /// The stream could not be opened (connection closed or at its stream limit).
    Open(StreamError),
    /// The agent reset the stream before its head.
    Refused {
        code: u16,
        reason: String,
    },
    Timeout,
    StreamingUnsupported,
    RequestTooLarge,
    CallerBody(String),
    Protocol(&'static str),
}

/// A request no connection of this replica answered, and its body when it may still be sent
/// elsewhere (it was never sent, or it is a GET or HEAD that may be sent again).
struct Unserved {
    failure: Failure,
    upload: Option<Upload>,
}

impl From<Failure> for Unserved {
    fn from(failure: Failure) -> Self {
        Unserved {
            failure,
            upload: None,
        }
    }
}

/// An error answer: status, code, message, and whether it says when to retry.
struct Answer {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_later: bool,
}

impl Answer {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Answer {
        Answer {
            status,
            code,
            message: message.into(),
            retry_later: false,
        }
    }

    fn retry_later(mut self) -> Answer {
        self.retry_later = true;
        self
    }

    fn into_response(self) -> Response {
        let res = error(self.status, self.code, self.message);
        if self.retry_later {
            retry_later(res)
        } else {
            res
        }
    }
}

impl Failure {
    fn metric(&self) -> Option<&'static str> {
        match self {
            Failure::Lost(_) => Some("connection_closed"),
            Failure::Silent { .. } => Some("connection_silent"),
            Failure::Refused { .. } => Some("agent_reset"),
            Failure::Timeout => Some("timeout"),
            Failure::Open(_) => Some("open_failed"),
            Failure::Protocol(_) => Some("protocol"),
            _ => None,
        }
    }

    /// Whether a sibling replica may do better: this replica has no connection that can take
    /// the request now (none, all draining, all silent, or the one it was on closed).
    fn forwardable(&self) -> bool {
        matches!(
            self,
            Failure::Unavailable(
                Unavailable::NoAgentConnected | Unavailable::Draining | Unavailable::Silent,
                ..
            ) | Failure::Lost(_)
        )
    }

    fn into_response(self) -> Response {
        match self {
            // A refusal carries the agent's own status.
            Failure::Refused { code, reason } => agent_refused(code, &reason),
            other => other.answer().into_response(),
        }
    }

    fn answer(self) -> Answer {
        match self {
            // OpenChoreo answers 502 `proxy request failed: no agents found for plane <t>/<id>`;
            // we keep 503 (nothing failed upstream; no agent is there yet), and its words, so
            // logs and people searching for them find this (CONTRACTS.md).
            Failure::Unavailable(Unavailable::NoAgentConnected, plane_id, _, plane_type) => Answer::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "NoAgentConnected",
                format!(
                    "proxy request failed: no agents found for plane {plane_type}/{plane_id}: no agent is connected for planeID {plane_id:?}"
                ),
            ),
            Failure::Unavailable(Unavailable::NotAuthorized, plane_id, cr, _) => Answer::new(
                StatusCode::FORBIDDEN,
                "NotAuthorized",
                format!("no connected agent of planeID {plane_id:?} is authorised for {cr}"),
            ),
            Failure::Unavailable(Unavailable::Draining, plane_id, _, _) => Answer::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "AgentReconnecting",
                format!(
                    "every agent connection of planeID {plane_id:?} is draining while its agent reconnects"
                ),
            )
            .retry_later(),
            Failure::Unavailable(Unavailable::Silent, plane_id, cr, _) => Answer::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "AgentUnresponsive",
                format!(
                    "every agent connection of planeID {plane_id:?} authorised for {cr} has gone silent at this gateway replica (a probe went unanswered past the liveness timeout): the agents cannot be reached from here now"
                ),
            )
            .retry_later(),
            Failure::Lost(id) => Answer::new(
                StatusCode::BAD_GATEWAY,
                "AgentConnectionClosed",
                format!(
                    "the agent connection (id {id}) closed before the agent answered; the request may or may not have run"
                ),
            ),
            Failure::Silent { id, method } => Answer::new(
                StatusCode::GATEWAY_TIMEOUT,
                "AgentUnresponsive",
                format!(
                    "the agent connection (id {id}) went silent before the agent answered (a probe went unanswered past the liveness timeout); the request may or may not have run, and a {method} is not sent again"
                ),
            ),
            Failure::Open(StreamError::Limit(n)) => Answer::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "AgentBusy",
                format!("the agent connection has {n} requests in flight; retry later"),
            )
            .retry_later(),
            Failure::Open(StreamError::Head(reason)) => Answer::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "RequestHeadTooLarge",
                format!("the request head cannot cross the tunnel: {reason}"),
            ),
            Failure::Open(err) => Answer::new(
                StatusCode::BAD_GATEWAY,
                "AgentConnectionClosed",
                format!("the request could not be sent: {err}"),
            ),
            Failure::Refused { code, reason } => Answer::new(
                StatusCode::BAD_GATEWAY,
                "AgentError",
                format!("the agent failed the request ({code}): {reason}"),
            ),
            Failure::Timeout => Answer::new(
                StatusCode::GATEWAY_TIMEOUT,
                "AgentTimeout",
                "the agent did not answer in time",
            ),
            Failure::StreamingUnsupported => Answer::new(
                StatusCode::NOT_IMPLEMENTED,
                "StreamingNotSupported",
                "the agent speaks tunnel v1 (OpenChoreo JSON), which cannot stream watch or follow responses",
            ),
            Failure::RequestTooLarge => Answer::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestTooLarge",
                format!("request bodies are limited to {MAX_REQUEST_BODY} bytes"),
            ),
            Failure::CallerBody(reason) => Answer::new(
                StatusCode::BAD_REQUEST,
                "RequestBodyFailed",
                format!("reading the request body failed: {reason}"),
            ),
            Failure::Protocol(what) => {
                Answer::new(StatusCode::BAD_GATEWAY, "ProtocolError", what)
            }
        }
    }
}

/// Chooses a connection, opens a stream, sends the body and waits for the response head. A GET
/// or HEAD whose connection closed or went silent before its agent answered (a renewal or CA
/// rotation handing over, a partition) goes to another authorised connection; other methods get
/// 502 or 504, as they may have run. When no connection can take it, the body comes back with
/// the failure if it may still be sent elsewhere (never sent, or a GET or HEAD).
async fn exchange(
    shared: &Shared,
    call: &Call,
    upload: Upload,
) -> Result<(ResponseHead, StreamHandle), Unserved> {
    let mut upload = Some(upload);
    let mut lost_on: Option<u64> = None;
    for attempt in 1..=ATTEMPTS {
        let conn = match pick(shared, call).await {
            Ok(conn) => conn,
            // Nothing to retry on: the caller learns the connection it was on closed.
            Err(_) if let Some(id) = lost_on => {
                return Err(Unserved {
                    failure: Failure::Lost(id),
                    upload,
                });
            }
            Err(why) => {
                return Err(Unserved {
                    failure: Failure::Unavailable(
                        why,
                        call.plane_id.clone(),
                        call.cr.clone(),
                        call.plane_type,
                    ),
                    upload,
                });
            }
        };
        if call.streaming && conn.version() < 2 {
            return Err(Failure::StreamingUnsupported.into());
        }
        let this = upload.take().ok_or(Failure::Lost(conn.id))?;
        let again = this.again();
        let stream = match conn.open(call.head.clone(), this.is_empty()) {
            Ok(stream) => stream,
            // The connection started draining or closed since it was picked: nothing was sent,
            // so any method may go to another connection.
            Err(StreamError::Draining | StreamError::Closed(_)) if attempt < ATTEMPTS => {
                upload = Some(this);
                continue;
            }
            Err(err) => return Err(Failure::Open(err).into()),
        };
        let answer = tokio::select! {
            biased;
            answer = send_and_await_head(&stream, this) => answer?,
            // A partition: the agent will not answer here (or not in time to matter).
            () = conn.silent() => {
                stream.reset(504, "the gateway stopped waiting: the connection went silent");
                if call.retriable && again.is_some() {
                    shared.metrics.proxy_failed("connection_silent_retried");
                    lost_on = Some(conn.id);
                    upload = again;
                    continue;
                }
                return Err(Failure::Silent {
                    id: conn.id,
                    method: call.head.method.clone(),
                }
                .into());
            }
            () = tokio::time::sleep(RESPONSE_HEAD_TIMEOUT) => return Err(Failure::Timeout.into()),
        };
        match answer {
            Read::Response(head) => return Ok((head, stream)),
            Read::Lost {
                before_head: true, ..
            } if call.retriable && again.is_some() => {
                shared.metrics.proxy_failed("connection_closed_retried");
                lost_on = Some(conn.id);
                upload = again;
            }
            Read::Lost { .. } => return Err(Failure::Lost(conn.id).into()),
            // Refused before any work by an agent draining this connection: any method may go
            // to another connection.
            Read::Reset {
                code: RESET_DRAINING,
                ..
            } if attempt < ATTEMPTS && again.is_some() => {
                shared.metrics.proxy_failed("draining_retried");
                upload = again;
            }
            Read::Reset {
                code: RESET_DRAINING,
                reason,
            } => {
                return Err(Failure::Refused { code: 503, reason }.into());
            }
            Read::Reset { code, reason } => return Err(Failure::Refused { code, reason }.into()),
            Read::Data(_) | Read::End | Read::Request(_) => {
                return Err(
                    Failure::Protocol("the agent sent a body before a response head").into(),
                );
            }
        }
    }
    Err(Unserved {
        failure: Failure::Lost(lost_on.unwrap_or_default()),
        upload,
    })
}

/// Sends a request no connection of this replica could take to a sibling replica, once (the
/// sibling does not forward it again), trying the next sibling while one cannot be reached
/// and the body can still be sent. The sibling's answer, whatever it is, is the caller's; when
/// no sibling answers, the caller gets this replica's own failure, saying so.
async fn forward(
    shared: &Shared,
    peers: &Peers,
    call: &Call,
    upload: Upload,
    local: Failure,
) -> Response {
    let siblings = peers.rotation();
    if siblings.is_empty() {
        shared.metrics.forwarded("no_sibling");
        return local.into_response();
    }
    let method = match Method::from_bytes(call.head.method.as_bytes()) {
        Ok(method) => method,
        Err(_) => return local.into_response(),
    };
    let mut headers = HeaderMap::new();
    for (name, value) in &call.head.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value.as_bytes()),
        ) {
            headers.append(name, value);
        }
    }
    if let Ok(own) = HeaderValue::from_str(peers.own_id()) {
        headers.insert(FORWARDED_BY, own);
    }
    let mut tried = Vec::new();
    let mut upload = Some(upload);
    let last = siblings.len().saturating_sub(1);
    for (k, peer) in siblings.into_iter().enumerate() {
        let Some(this) = upload.take() else {
            break;
        };
        let again = this.again();
        let client = match peers.client(&peer) {
            Ok(client) => client,
            Err(err) => {
                tried.push(format!("{}: {err}", peer.id));
                upload = Some(this);
                continue;
            }
        };
        let request = client
            .request(method.clone(), peers.url(&peer, &call.uri))
            .headers(headers.clone());
        let request = match this {
            Upload::Empty => request,
            Upload::Whole(bytes) => request.body(bytes),
            Upload::Streamed(body) => {
                request.body(reqwest::Body::wrap_stream(body.into_data_stream()))
            }
        };
        match tokio::time::timeout(FORWARD_HEAD_TIMEOUT, request.send()).await {
            // The sibling could not serve it either and sent it to no agent (it has no live
            // connection of the plane): the next sibling may have one (an OpenChoreo agent
            // holds one connection, to one replica). The last sibling's answer is the caller's.
            Ok(Ok(res))
                if res.status() == StatusCode::SERVICE_UNAVAILABLE
                    && k < last
                    && again.is_some() =>
            {
                let (answer, unserved) = buffered(res, &peer).await;
                match unserved {
                    Some(code) => {
                        tried.push(format!("{}: {code}", peer.id));
                        upload = again;
                    }
                    None => {
                        shared.metrics.forwarded("answered");
                        return answer;
                    }
                }
            }
            Ok(Ok(res)) => {
                shared.metrics.forwarded("answered");
                tracing::debug!(peer = %peer.id, status = res.status().as_u16(), "forwarded a request to a sibling replica");
                return forwarded_response(res, &peer);
            }
            // Not reached: nothing was sent, the next sibling may take it.
            Ok(Err(err)) if err.is_connect() => {
                tried.push(format!("{} ({}): {err}", peer.id, peer.addr));
                upload = again;
            }
            Ok(Err(err)) => {
                tried.push(format!("{} ({}): {err}", peer.id, peer.addr));
                if call.retriable {
                    upload = again;
                }
            }
            Err(_) => {
                tried.push(format!("{} ({}): no answer in time", peer.id, peer.addr));
                if call.retriable {
                    upload = again;
                }
            }
        }
    }
    shared.metrics.forwarded("unreachable");
    tracing::warn!(tried = ?tried, "no sibling replica answered a forwarded request");
    let mut answer = local.answer();
    answer.message = format!(
        "{}; no sibling gateway replica answered either ({})",
        answer.message,
        tried.join("; ")
    );
    answer.into_response()
}

/// A sibling's 503, read whole (an error body is small), and its error code when it says the
/// sibling had no connection to send the request on (`NoAgentConnected`, `AgentUnresponsive`,
/// `AgentReconnecting`): nothing ran there.
async fn buffered(res: reqwest::Response, peer: &Peer) -> (Response, Option<&'static str>) {
    let status = res.status();
    let mut headers = res.headers().clone();
    let bytes = res.bytes().await.unwrap_or_default();
    let code = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned));
    let unserved = match code.as_deref() {
        Some("NoAgentConnected") => Some("NoAgentConnected"),
        Some("AgentUnresponsive") => Some("AgentUnresponsive"),
        Some("AgentReconnecting") => Some("AgentReconnecting"),
        _ => None,
    };
    for name in [
        http::header::CONTENT_LENGTH,
        http::header::TRANSFER_ENCODING,
        http::header::CONNECTION,
    ] {
        headers.remove(name);
    }
    if let Ok(id) = HeaderValue::from_str(&peer.id) {
        headers.insert(FORWARDED_TO, id);
    }
    let mut out = Response::new(Body::from(bytes));
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    (out, unserved)
}

/// A sibling's answer as the caller gets it: status, headers (without the framing ones) and
/// the body as it streams, with [`FORWARDED_TO`] naming the sibling.
fn forwarded_response(res: reqwest::Response, peer: &Peer) -> Response {
    let mut headers = res.headers().clone();
    for name in [
        http::header::CONTENT_LENGTH,
        http::header::TRANSFER_ENCODING,
        http::header::CONNECTION,
    ] {
        headers.remove(name);
    }
    if let Ok(id) = HeaderValue::from_str(&peer.id) {
        headers.insert(FORWARDED_TO, id);
    }
    let status = res.status();
    let mut out = Response::new(Body::from_stream(res.bytes_stream()));
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

/// Picks a connection for the call. When every authorised connection is draining (their agents
/// were told to connect anew: a reconnect, a shutdown, a renewal), waits up to
/// [`RECONNECT_WAIT`] for a new one, so a drain costs callers a short wait, not a 503; so does
/// a replica of several in its [`crate::WARM_UP`] that no agent of the plane has reached yet.
/// A replica that is leaving itself takes no agent connection: nothing comes back to it, and
/// the request goes to a sibling (or gets its 503) at once.
async fn pick(
    shared: &Shared,
    call: &Call,
) -> Result<Arc<crate::registry::Connection>, Unavailable> {
    let deadline = tokio::time::Instant::now() + RECONNECT_WAIT;
    let warm_until = shared.warm_up_deadline(RECONNECT_WAIT);
    loop {
        let now = tokio::time::Instant::now();
        match shared.registry.pick(&call.plane_id, &call.cr) {
            Err(Unavailable::Draining) if now < deadline && !shared.is_leaving() => {}
            // A replica that has just started: the plane's agents are reconnecting to it.
            Err(Unavailable::NoAgentConnected) if warm_until.is_some_and(|until| now < until) => {}
            other => return other,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends the body while waiting for the head: an agent may answer (an error, say) before it
/// has read the whole body. A body the caller fails to send, or one over the limit, ends the
/// exchange with its own failure; a write the stream refuses (the agent reset it, the
/// connection ended) leaves the answer to the stream.
async fn send_and_await_head(stream: &StreamHandle, upload: Upload) -> Result<Read, Failure> {
    let sending = async {
        match upload {
            Upload::Empty => Ok(()),
            Upload::Whole(bytes) => {
                // A refused write shows in what the stream reads next.
                if stream.write(bytes).await.is_ok() {
                    let _ = stream.finish();
                }
                Ok(())
            }
            Upload::Streamed(body) => send_streamed(stream, body).await,
        }
    };
    let head = stream.read();
    tokio::pin!(sending, head);
    tokio::select! {
        biased;
        sent = &mut sending => match sent {
            Ok(()) => Ok(head.await),
            Err(failure) => Err(failure),
        },
        head = &mut head => Ok(head),
    }
}

/// Streams a caller's body frame by frame under the stream's credits, bounded by
/// [`MAX_REQUEST_BODY`]; a body over it, or one the caller fails to send, resets the stream.
async fn send_streamed(stream: &StreamHandle, mut body: Body) -> Result<(), Failure> {
    let mut sent = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(err) => {
                stream.reset(499, "the caller's body failed");
                return Err(Failure::CallerBody(err.to_string()));
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        sent += data.len();
        if sent > MAX_REQUEST_BODY {
            stream.reset(413, "the request body is too large");
            return Err(Failure::RequestTooLarge);
        }
        if stream.write(data).await.is_err() {
            return Ok(());
        }
    }
    let _ = stream.finish();
    Ok(())
}

/// The HTTP response for an answered stream. A body that has arrived whole goes to hyper as
/// bytes (the caller gets its length); any other reads the stream as the caller does. Each
/// chunk is charged to the planeID's rate (`charge`) as it passes.
fn relay(head: ResponseHead, stream: StreamHandle, charge: Option<ByteCharge>) -> Response {
    use futures::TryStreamExt as _;
    let headers = response_headers(head.headers);
    let body = match stream.take_whole_body() {
        // Arrived whole (a small response: head, data and end in one message): hyper gets
        // the bytes, so the caller gets a Content-Length, not a chunked body, and no stream is
        // polled for them.
        Some(whole) => {
            if let Some(charge) = &charge {
                charge.charge(whole.len());
            }
            Body::from(whole)
        }
        None => match charge {
            Some(charge) => Body::from_stream(
                stream
                    .into_body()
                    .inspect_ok(move |chunk| charge.charge(chunk.len())),
            ),
            None => Body::from_stream(stream.into_body()),
        },
    };
    let mut res = Response::new(body);
    *res.status_mut() = StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY);
    *res.headers_mut() = headers;
    res
}

/// The answer to a stream the agent reset before its response head. The agent's code is an
/// HTTP status (400 invalid request, 502 the build cluster's API server failed, 503 at its
/// request limit or draining) and the caller gets it, as a v1 agent's status reaches the
/// caller; a 503 carries `Retry-After`, since the agent sheds load and a retry a moment later
/// succeeds. Codes outside 400..=599 are a protocol error of the agent's: 502.
fn agent_refused(code: u16, reason: &str) -> Response {
    let status = StatusCode::from_u16(code)
        .ok()
        .filter(|s| s.is_client_error() || s.is_server_error())
        .unwrap_or(StatusCode::BAD_GATEWAY);
    let res = error(
        status,
        "AgentError",
        format!("the agent failed the request ({code}): {reason}"),
    );
    if status == StatusCode::SERVICE_UNAVAILABLE {
        retry_later(res)
    } else {
        res
    }
}

/// The agent's response headers as the caller gets them, without the framing ones (hyper sets
/// its own).
fn response_headers(agent_headers: Vec<(String, String)>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in agent_headers {
        if matches!(
            name.to_ascii_lowercase().as_str(),
            "content-length" | "transfer-encoding" | "connection"
        ) {
            continue;
        }
        // As bytes: UTF-8 past ASCII is valid in a header value (obs-text), and OpenChoreo
        // passes such values on.
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value.as_bytes()),
        ) {
            headers.append(name, value);
        }
    }
    headers
}

fn retry_later(res: Response) -> Response {
    retry_after(res, 1)
}

/// `Retry-After` in whole seconds.
fn retry_after(mut res: Response, secs: u64) -> Response {
    res.headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
    res
}

/// A JSON error body (`{"error": code, "message": ...}`), as every internal API error is.
pub(crate) fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": code, "message": message.into()})),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The caller's credentials and hop-by-hop headers stay at the gateway; a request id is
    /// added when the caller sent none (or an empty one), and kept when it sent one.
    #[test]
    fn forwarded_headers_drop_credentials_and_name_the_request() {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", HeaderValue::from_static("Bearer x"));
        headers.insert("accept", HeaderValue::from_static("application/json"));
        headers.insert("x-request-id", HeaderValue::from_static(""));
        let forwarded = forwarded_headers(&headers);
        assert!(!forwarded.iter().any(|(n, _)| n == "authorization"));
        let ids: Vec<&String> = forwarded
            .iter()
            .filter(|(n, _)| n == "x-request-id")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(ids.len(), 1);
        assert!(ids[0].starts_with("gw-") && ids[0].len() == 19, "{ids:?}");
        headers.insert("x-request-id", HeaderValue::from_static("mine"));
        assert!(
            forwarded_headers(&headers)
                .iter()
                .any(|(n, v)| n == "x-request-id" && v == "mine")
        );
    }

    /// Header values past ASCII are forwarded both ways, as OpenChoreo does: UTF-8 as it is,
    /// other bytes as U+FFFD (what Go's JSON makes of them).
    #[test]
    fn header_values_past_ascii_are_forwarded() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-display-name",
            HeaderValue::from_bytes("Café ☕".as_bytes()).unwrap(),
        );
        headers.insert("x-latin1", HeaderValue::from_bytes(b"caf\xe9").unwrap());
        let forwarded = forwarded_headers(&headers);
        let value = |name: &str| {
            forwarded
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(value("x-display-name"), Some("Café ☕"));
        assert_eq!(value("x-latin1"), Some("caf\u{fffd}"));

        let headers = response_headers(vec![
            ("x-display-name".into(), "Café ☕".into()),
            ("content-length".into(), "12".into()),
        ]);
        assert_eq!(headers["x-display-name"].as_bytes(), "Café ☕".as_bytes());
        assert!(!headers.contains_key("content-length"));
    }

    /// A body is expected exactly when Content-Length is above zero or Transfer-Encoding is set.
    #[test]
    fn bodiless_requests_are_told_by_their_headers() {
        let mut headers = HeaderMap::new();
        assert!(declares_no_body(&headers));
        headers.insert("content-length", HeaderValue::from_static("0"));
        assert!(declares_no_body(&headers));
        headers.insert("content-length", HeaderValue::from_static("12"));
        assert!(!declares_no_body(&headers));
        headers.remove("content-length");
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        assert!(!declares_no_body(&headers));
    }

    /// An agent's reset code becomes the caller's status when it is an HTTP error; a 503 says
    /// when to retry; anything else is the agent's protocol error.
    #[test]
    fn agent_refusals_map_to_statuses() {
        assert_eq!(agent_refused(404, "x").status(), StatusCode::NOT_FOUND);
        let busy = agent_refused(503, "busy");
        assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(busy.headers()[http::header::RETRY_AFTER], "1");
        assert_eq!(agent_refused(200, "x").status(), StatusCode::BAD_GATEWAY);
        assert_eq!(agent_refused(0, "x").status(), StatusCode::BAD_GATEWAY);
    }
}
