//! The internal API (mTLS with the internal CA): the Kubernetes proxy, plane status, notify,
//! the connection table and the event stream.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::Body,
    extract::{Path, Query, State},
    http::{HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    routing::{any, get, post},
};
use buildplane_api::{
    CrKey,
    names::{PlaneType, UnknownPlaneType},
};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;
use tracing::debug;

use crate::{Shared, proxy::error};

pub use crate::proxy::{MAX_REQUEST_BODY, RESPONSE_HEAD_TIMEOUT};

/// The internal API's routes.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/api/proxy/{plane_type}/{plane_id}/{namespace}/{name}/{target}/{*path}",
            any(crate::proxy::proxy),
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

fn invalid_plane_type(err: &UnknownPlaneType) -> Response {
    error(StatusCode::BAD_REQUEST, "InvalidPlaneType", err.to_string())
}

#[derive(Deserialize)]
struct CrQuery {
    namespace: Option<String>,
    name: Option<String>,
}

fn status_of(
    shared: &Shared,
    plane_type: PlaneType,
    plane_id: &str,
    cr: Option<&CrKey>,
) -> serde_json::Value {
    let (n, last_seen) = shared.registry.count(plane_id, cr);
    let last_seen = (last_seen > 0).then(|| {
        chrono::DateTime::from_timestamp_millis(last_seen as i64)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
    });
    json!({"planeType": plane_type.as_str(), "planeID": plane_id, "connected": n > 0, "connectedAgents": n, "lastSeen": last_seen.flatten()})
}

async fn plane_status(
    State(shared): State<Arc<Shared>>,
    Path((plane_type, plane_id)): Path<(String, String)>,
    Query(q): Query<CrQuery>,
) -> Response {
    let plane_type = match plane_type.parse::<PlaneType>() {
        Ok(plane_type) => plane_type,
        Err(err) => return invalid_plane_type(&err),
    };
    let cr = q
        .name
        .map(|name| CrKey::from_url_segments(q.namespace.as_deref().unwrap_or(""), &name));
    // A replica of several that has just started tells what it knows once the plane's agents
    // had their chance to reach it (they reconnect within their backoff), not before.
    if let Some(until) = shared.warm_up_deadline(Duration::from_secs(5)) {
        while shared.registry.count(&plane_id, cr.as_ref()).0 == 0
            && tokio::time::Instant::now() < until
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Json(status_of(&shared, plane_type, &plane_id, cr.as_ref())).into_response()
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
    // A drain, not a cut: requests in flight finish while each agent connects anew.
    let mut disconnected = 0;
    for conn in shared.registry.all() {
        if conn.plane_id == plane_id && conn.accepts_streams() {
            conn.go_away("reconnect requested");
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
    let statuses: Vec<serde_json::Value> = planes
        .iter()
        .map(|p| status_of(&shared, PlaneType::BuildPlane, p, None))
        .collect();
    Json(json!({"planes": statuses, "total": statuses.len()}))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Notify {
    /// OpenChoreo's controller sends it; when given it must be a plane type this gateway serves.
    #[serde(default)]
    plane_type: Option<String>,
    #[serde(rename = "planeID")]
    plane_id: String,
    event: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    name: String,
}

async fn notify(State(shared): State<Arc<Shared>>, Json(body): Json<Notify>) -> Response {
    if let Some(plane_type) = &body.plane_type
        && let Err(err) = plane_type.parse::<PlaneType>()
    {
        return invalid_plane_type(&err);
    }
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
    // A draining replica ends its streams, so the controller follows another one.
    let drain_started = shared.drain_started.clone();
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
                () = drain_started.cancelled() => return,
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
