//! The agent listener: TLS that requests a client certificate, admission on the WebSocket
//! upgrade (`/ws?planeID=..&planeType=buildplane`), and one task pair per connection.

use std::{sync::Arc, time::Duration};

use buildplane_api::{
    names::{self, PlaneType},
    served::ServedCrs,
};
use buildplane_link::{Config as SessionConfig, Link, Moment, OnIgnored, Role, Session};
use buildplane_tunnel::negotiate;
use parking_lot::Mutex;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        handshake::server::{ErrorResponse, Request, Response},
        http::{HeaderValue, StatusCode},
    },
};
use tracing::{debug, info};

use crate::{
    GatewayConfig, Shared,
    caps::Candidate,
    hello,
    registry::{Connection, public_key_of},
};

/// The body of every 401 for a certificate no CR admits, whatever the reason (logged instead).
pub const NOT_ACCEPTED: &str = "certificate not accepted for this planeID";

fn reject(status: StatusCode, message: String) -> ErrorResponse {
    let mut res = ErrorResponse::new(Some(message));
    *res.status_mut() = status;
    res
}

/// How long a TLS handshake and WebSocket upgrade may take once the first byte is in.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts agents until the listener fails.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        // Storm protection: at most `max_concurrent_handshakes` handshakes run at once, and the
        // next connection is accepted only when a slot is free. The rest wait in the kernel's
        // accept queue, where waiting costs no CPU and, unlike a refused connection, sends no
        // agent into a longer backoff: a reconnect storm drains at the handshake rate. The
        // loop does not hold the slot while it waits in `accept`: a connection whose first
        // byte arrives later (`hello`) queues for the same slots and must not starve behind it.
        match shared.handshakes.acquire().await {
            Ok(free) => drop(free),
            Err(_) => return,
        }
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
        if shared.is_leaving() {
            drop(tcp);
            continue;
        }
        let shared = shared.clone();
        let (tcp, ready) = match hello::has_first_record(tcp) {
            Ok(checked) => checked,
            Err(err) => {
                debug!(%peer, %err, "connection lost while looking for its ClientHello");
                continue;
            }
        };
        if ready {
            // Taken here when free, so the loop cannot run ahead of the slots.
            let permit = shared.handshakes.clone().try_acquire_owned().ok();
            tokio::spawn(with_slot(tcp, peer, permit, shared));
            continue;
        }
        // No whole ClientHello yet: the socket waits for it without a slot (`hello`).
        match shared.idle.enter(peer.ip()) {
            Ok(idle) => {
                tokio::spawn(after_hello(tcp, peer, idle, shared));
            }
            Err(refusal) => {
                shared.metrics.rejected(refusal.reason());
                debug!(%peer, %refusal, "connection closed before its first byte");
            }
        }
    }
}

/// An idle connection: waits for its first byte (or its timeout, or eviction by a newer idle
/// connection), then for a slot.
async fn after_hello(
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    idle: hello::IdleSlot,
    shared: Arc<Shared>,
) {
    let hello_timeout = shared.config.hello_timeout;
    tokio::select! {
        () = hello::first_record(&tcp) => {}
        () = tokio::time::sleep(hello_timeout) => {
            shared.metrics.rejected("hello_timeout");
            debug!(%peer, ?hello_timeout, "no ClientHello in time");
            return;
        }
        () = idle.evicted() => {
            shared.metrics.rejected("idle_evicted");
            debug!(%peer, "idle connection evicted by a newer one");
            return;
        }
    }
    drop(idle);
    with_slot(tcp, peer, None, shared).await;
}

/// A connection that has spoken: its handshake under `permit`, or under the next free slot.
async fn with_slot(
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    shared: Arc<Shared>,
) {
    let permit = match permit {
        Some(permit) => permit,
        None => match shared.handshakes.clone().acquire_owned().await {
            Ok(permit) => permit,
            Err(_) => return,
        },
    };
    handshake(tcp, peer, permit, shared).await;
}

/// One connection from its first byte: the handshake under its slot, then the session.
async fn handshake(
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    permit: tokio::sync::OwnedSemaphorePermit,
    shared: Arc<Shared>,
) {
    let started = tokio::time::Instant::now();
    let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, accept(tcp, &shared)).await;
    drop(permit);
    match accepted {
        Ok(Ok(Some((ws, admitted)))) => {
            shared.metrics.handshake(started.elapsed());
            run_connection(ws, admitted, shared).await
        }
        Ok(Ok(None)) => {}
        Ok(Err(err)) => debug!(%peer, %err, "agent handshake failed"),
        Err(_) => debug!(%peer, "agent handshake timed out"),
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>;

/// What the admission callback decided for an upgrade it accepted.
struct Verdict {
    plane_id: String,
    version: u16,
    agent_id: String,
    served: ServedCrs,
}

/// The upgrade's query: `planeID` (required), `planeType` (`buildplane` or `workflowplane`),
/// `agentID` (optional), `serves` (optional, the CRs the agent serves; see
/// [`buildplane_api::served`]). Values are percent-decoded; unknown parameters are ignored.
#[derive(Debug)]
struct UpgradeQuery {
    plane_id: String,
    agent_id: String,
    served: ServedCrs,
    /// Gateway replicas the agent already holds a connection to.
    held: Vec<String>,
}

impl UpgradeQuery {
    /// The query, or the reason for a 400.
    fn parse(query: &str) -> Result<Self, String> {
        let (mut plane_id, mut plane_type, mut agent_id, mut serves, mut held) =
            (None, None, None, None, None);
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            let slot = match name.as_ref() {
                "planeID" => &mut plane_id,
                "planeType" => &mut plane_type,
                "agentID" => &mut agent_id,
                "serves" => &mut serves,
                names::HELD_REPLICAS_QUERY => &mut held,
                _ => continue,
            };
            // The first of a repeated parameter counts, as Go's `Query().Get`.
            slot.get_or_insert(value.into_owned());
        }
        let plane_id = plane_id
            .filter(|p| !p.is_empty())
            .ok_or("missing planeID query parameter")?;
        plane_type
            .unwrap_or_default()
            .parse::<PlaneType>()
            .map_err(|err| err.to_string())?;
        let served = ServedCrs::parse_list(serves.as_deref().unwrap_or(""))
            .map_err(|err| format!("serves: {err}"))?;
        let held = held
            .unwrap_or_default()
            .split(',')
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
            .collect();
        Ok(Self {
            plane_id,
            agent_id: agent_id.unwrap_or_default(),
            served,
            held,
        })
    }
}

/// Tells the agent which replica answered and how many there are.
fn insert_replica_headers(
    headers: &mut tokio_tungstenite::tungstenite::http::HeaderMap,
    replica: &crate::Replica,
) {
    if let Ok(id) = HeaderValue::from_str(&replica.id) {
        headers.insert(names::GATEWAY_REPLICA_HEADER, id);
    }
    headers.insert(
        names::GATEWAY_REPLICAS_HEADER,
        HeaderValue::from(replica.count),
    );
}

// The callback's error type is tungstenite's; its size is not ours to choose.
#[allow(clippy::result_large_err)]
async fn accept(
    tcp: tokio::net::TcpStream,
    shared: &Arc<Shared>,
) -> anyhow::Result<Option<(Ws, Admitted)>> {
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
    let caps = shared.config.connection_caps;
    let replica = shared.config.replica.clone();
    let verdict_in = verdict.clone();
    let callback = move |req: &Request, mut res: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() != "/ws" {
            return Err(reject(
                StatusCode::NOT_FOUND,
                format!("no such path {}; agents connect to /ws", req.uri().path()),
            ));
        }
        let UpgradeQuery {
            plane_id,
            agent_id,
            served,
            held,
        } = match UpgradeQuery::parse(req.uri().query().unwrap_or("")) {
            Ok(query) => query,
            Err(reason) => {
                metrics.rejected("bad_request");
                return Err(reject(StatusCode::BAD_REQUEST, reason));
            }
        };
        if held.contains(&replica.id) {
            // The agent reached, through the load balancer, a replica it is connected to
            // already: it dials again for another. Nothing is verified or registered, and its
            // live connection here stays.
            metrics.rejected("replica_held");
            let mut res = reject(
                StatusCode::CONFLICT,
                format!(
                    "the agent holds a connection to gateway replica {:?} already",
                    replica.id
                ),
            );
            insert_replica_headers(res.headers_mut(), &replica);
            return Err(res);
        }
        if chain.is_empty() {
            metrics.rejected("no_certificate");
            return Err(reject(
                StatusCode::UNAUTHORIZED,
                "client certificate required".into(),
            ));
        }
        let admission = trust.admit(&plane_id, &chain, &served);
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
        let public_key = chain.first().map(public_key_of).unwrap_or_default();
        let candidate = Candidate {
            plane_id: &plane_id,
            public_key: &public_key,
            agent_id: &agent_id,
            cas: &admission.cas,
        };
        if let Err(exceeded) = registry.registry.check_caps(&caps, &candidate) {
            metrics.rejected(exceeded.reason());
            info!(%plane_id, %exceeded, "agent refused at a connection cap");
            let mut res = reject(StatusCode::TOO_MANY_REQUESTS, exceeded.to_string());
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
        insert_replica_headers(res.headers_mut(), &replica);
        *verdict_in.lock() = Some(Verdict {
            plane_id,
            version,
            agent_id,
            served,
        });
        Ok(res)
    };
    let config = buildplane_link::websocket_config();
    let ws =
        match tokio_tungstenite::accept_hdr_async_with_config(tls, callback, Some(config)).await {
            Ok(ws) => ws,
            Err(err) => {
                debug!(%err, "upgrade refused");
                return Ok(None);
            }
        };
    let Some(verdict) = verdict.lock().take() else {
        return Ok(None);
    };
    let chain = ws
        .get_ref()
        .get_ref()
        .1
        .peer_certificates()
        .map(<[_]>::to_vec)
        .unwrap_or_default();
    Ok(Some((ws, Admitted { verdict, chain })))
}

/// An upgrade the admission callback accepted, not yet registered.
struct Admitted {
    verdict: Verdict,
    chain: Vec<CertificateDer<'static>>,
}

/// The tunnel session settings of one agent connection.
fn session_config(config: &GatewayConfig, version: u16) -> SessionConfig {
    SessionConfig {
        heartbeat_interval: config.heartbeat_interval,
        idle_timeout: config.heartbeat_timeout,
        stall_timeout: config.stream_stall_timeout,
        drain_timeout: config.drain_timeout,
        // A request waiting on a connection quiet for a second probes it; no answer within
        // the liveness timeout marks it silent and the proxy stops using it (a partition).
        liveness_timeout: Some(config.liveness_timeout),
        // v1 agents echo the request id; a random prefix keeps ids unique across connections.
        v1_request_prefix: format!("{:016x}-", rand::random::<u64>()),
        ..SessionConfig::new(Role::Gateway, version)
    }
}

async fn run_connection(ws: Ws, admitted: Admitted, shared: Arc<Shared>) {
    let Admitted {
        verdict:
            Verdict {
                plane_id,
                version,
                agent_id,
                served,
            },
        chain,
    } = admitted;
    // Trust may have changed since the upgrade was admitted; decide again now that the
    // connection becomes visible to revalidation, so no change falls between the two.
    let admission = shared.trust.admit(&plane_id, &chain, &served);
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
    // A v1 body travels whole in one message: read messages up to the v1 limit, so one over the
    // session's limit fails its own request, not the connection. By RFC 6455 the agent sends
    // nothing before our 101, so tungstenite holds no unread bytes here.
    let ws = if version == buildplane_tunnel::version::V1 {
        WebSocketStream::from_raw_socket(
            ws.into_inner(),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            Some(buildplane_link::websocket_config_v1()),
        )
        .await
    } else {
        ws
    };
    let session = Session::new(session_config(&shared.config, version), Moment::default());
    let metrics = shared.metrics.clone();
    let on_ignored: OnIgnored = Arc::new(move |_: &str| metrics.ignored());
    let link = Link::spawn_with(ws, session, None, Some(on_ignored));
    // HA replicas share a certificate; the instance id tells a reconnect from a sibling.
    let conn = Arc::new(
        Connection::new(
            shared.registry.next_id(),
            plane_id,
            chain,
            admission.granted,
            link,
        )
        .with_agent_id(agent_id)
        .with_served(served)
        .with_cas(admission.cas),
    );
    // The callback checked the caps; concurrent handshakes may have filled them since, and
    // the registry checks again under its lock. The upgrade is done, so the refusal is a close.
    if let Err(exceeded) = shared
        .registry
        .try_add(conn.clone(), &shared.config.connection_caps)
    {
        shared.metrics.rejected(exceeded.reason());
        info!(plane_id = %conn.plane_id, %exceeded, "agent refused at a connection cap");
        conn.close(&exceeded.to_string());
        return;
    }
    info!(id = conn.id, plane_id = %conn.plane_id, identity = %conn.identity, protocol = version, crs = ?conn.crs(), "agent connected");
    shared.metrics.admitted();
    tokio::select! {
        () = conn.finished() => {}
        () = shared.shutdown.cancelled() => conn.close("the gateway stopped"),
    }
    shared.registry.remove(&conn);
    let reason = conn
        .close_reason()
        .map_or_else(|| "stopped".to_owned(), |r| r.to_string());
    info!(id = conn.id, plane_id = %conn.plane_id, %reason, "agent disconnected");
}

#[cfg(test)]
mod tests {
    use buildplane_api::CrKey;

    use super::UpgradeQuery;

    #[test]
    fn the_upgrade_query_is_decoded_and_checked() {
        let query = UpgradeQuery::parse(
            "planeID=p1&planeType=workflowplane&agentID=a%2Fb&serves=org1%2Fbp%2C_cluster/*&x=y",
        )
        .unwrap();
        assert_eq!(query.plane_id, "p1");
        assert_eq!(query.agent_id, "a/b");
        assert!(query.served.allows(&CrKey::namespaced("org1", "bp")));
        assert!(query.served.allows(&CrKey::cluster("any")));
        assert!(!query.served.allows(&CrKey::namespaced("org2", "bp")));

        let open = UpgradeQuery::parse("planeID=p1&planeType=buildplane").unwrap();
        assert!(open.served.is_any());
        assert_eq!(open.agent_id, "");
        assert!(open.held.is_empty());
        let held =
            UpgradeQuery::parse("planeID=p1&planeType=buildplane&held=gateway-0%2Cgateway-2,")
                .unwrap();
        assert_eq!(held.held, ["gateway-0", "gateway-2"]);
        // The first of a repeated parameter counts.
        let first = UpgradeQuery::parse("planeID=a&planeID=b&planeType=buildplane").unwrap();
        assert_eq!(first.plane_id, "a");

        for (query, reason) in [
            ("planeType=buildplane", "missing planeID"),
            ("planeID=&planeType=buildplane", "missing planeID"),
            ("planeID=p1", "planeType"),
            ("planeID=p1&planeType=dataplane", "dataplane"),
            ("planeID=p1&planeType=buildplane&serves=bp", "serves"),
        ] {
            let err = UpgradeQuery::parse(query).expect_err(query);
            assert!(err.contains(reason), "{query}: {err}");
        }
    }
}
