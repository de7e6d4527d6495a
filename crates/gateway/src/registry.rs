//! Live agent connections: per plane, with the CRs each may serve, round-robin selection per CR,
//! pending streams owned by their connection, and the event stream the controller follows.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
};

use buildplane_api::CrKey;
use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use rustls_pki_types::CertificateDer;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

/// What an open stream receives from its agent.
#[derive(Debug)]
pub enum StreamEvent {
    /// Status and headers.
    Head {
        status: u16,
        headers: Vec<(String, String)>,
        end: bool,
    },
    /// A body chunk.
    Data(Bytes),
    /// The body is complete.
    End,
    /// The agent abandoned the stream.
    Reset { code: u16, reason: String },
}

/// A frame to send to the agent.
#[derive(Debug)]
pub enum Outbound {
    /// A v2 frame.
    Frame(buildplane_tunnel::v2::Frame),
    /// A v1 text message.
    Text(String),
    /// Close the connection with a reason.
    Close(String),
}

/// One admitted agent connection.
pub struct Connection {
    /// Unique id.
    pub id: u64,
    /// The planeID it connected for.
    pub plane_id: String,
    /// Protocol version (1 or 2).
    pub version: u16,
    /// The chain it presented (kept for re-verification when CAs change).
    pub chain: Vec<CertificateDer<'static>>,
    /// CRs it may serve now.
    pub crs: RwLock<BTreeSet<CrKey>>,
    /// Frames to send.
    pub outbound: mpsc::Sender<Outbound>,
    /// Streams waiting for the agent; dropped (failing them) when the connection ends.
    pub pending: Mutex<HashMap<u32, mpsc::Sender<StreamEvent>>>,
    /// v1 requests waiting for the agent, by request id.
    pub pending_v1: Mutex<HashMap<String, mpsc::Sender<StreamEvent>>>,
    next_stream: AtomicU32,
    /// When it connected (RFC 3339).
    pub connected_at: String,
    /// When the agent was last heard from (Unix milliseconds).
    pub last_seen_ms: AtomicU64,
    /// The leaf's SHA-256-free identity: the certificate bytes' length and tail, enough to tell
    /// an agent's reconnect from another agent in logs.
    pub identity: String,
}

impl Connection {
    /// A new connection.
    pub fn new(
        id: u64,
        plane_id: String,
        version: u16,
        chain: Vec<CertificateDer<'static>>,
        crs: BTreeSet<CrKey>,
        outbound: mpsc::Sender<Outbound>,
    ) -> Self {
        let identity = chain.first().map(|c| identity_of(c)).unwrap_or_default();
        Self {
            id,
            plane_id,
            version,
            chain,
            crs: RwLock::new(crs),
            outbound,
            pending: Mutex::new(HashMap::new()),
            pending_v1: Mutex::new(HashMap::new()),
            next_stream: AtomicU32::new(1),
            connected_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            last_seen_ms: AtomicU64::new(now_ms()),
            identity,
        }
    }

    /// Allocates a stream id (odd, gateway-initiated).
    pub fn open_stream(&self, events: mpsc::Sender<StreamEvent>) -> u32 {
        let id = self.next_stream.fetch_add(2, Ordering::Relaxed);
        self.pending.lock().insert(id, events);
        id
    }

    /// Marks the agent alive.
    pub fn touch(&self) {
        self.last_seen_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// Fails every pending request at once (the connection is gone).
    pub fn fail_pending(&self) {
        self.pending.lock().clear();
        self.pending_v1.lock().clear();
    }
}

/// A short identity for a leaf: the hex of its last 8 bytes (the signature's tail).
pub fn identity_of(cert: &CertificateDer<'_>) -> String {
    let bytes = cert.as_ref();
    bytes[bytes.len().saturating_sub(8)..]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Why no connection could serve a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unavailable {
    /// The plane has no connection at all (503).
    NoAgentConnected,
    /// Connections exist, but none is authorised for the CR (403).
    NotAuthorized,
}

/// A status event for the controller (`GatewayEvent` in CONTRACTS.md).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayEvent {
    /// `snapshot`, `connected`, `disconnected`, `authorized`, `revoked`, `replaced`.
    #[serde(rename = "type")]
    pub type_: String,
    /// RFC 3339.
    pub time: String,
    /// Always `buildplane`.
    pub plane_type: String,
    /// The plane.
    #[serde(rename = "planeID")]
    pub plane_id: String,
    /// The connection (0 for snapshots).
    #[serde(rename = "connectionID")]
    pub connection_id: u64,
    /// CRs touched.
    pub crs: Vec<String>,
    /// Connected agents of each touched CR after the event.
    pub connected_agents_by_cr: BTreeMap<String, usize>,
}

/// Every live connection.
pub struct Registry {
    connections: RwLock<Vec<Arc<Connection>>>,
    round_robin: AtomicUsize,
    next_id: AtomicU64,
    events: broadcast::Sender<GatewayEvent>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            connections: RwLock::new(Vec::new()),
            round_robin: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            events: broadcast::channel(4096).0,
        }
    }
}

impl Registry {
    /// A fresh connection id.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Subscribes to events.
    pub fn subscribe(&self) -> broadcast::Receiver<GatewayEvent> {
        self.events.subscribe()
    }

    /// Registers a connection; an older connection with the same identity and plane is replaced.
    pub fn add(&self, conn: Arc<Connection>) {
        let replaced: Vec<Arc<Connection>> = {
            let mut connections = self.connections.write();
            let old: Vec<Arc<Connection>> = connections
                .iter()
                .filter(|c| c.plane_id == conn.plane_id && c.identity == conn.identity)
                .cloned()
                .collect();
            connections.retain(|c| !(c.plane_id == conn.plane_id && c.identity == conn.identity));
            connections.push(conn.clone());
            old
        };
        for old in replaced {
            let _ = old.outbound.try_send(Outbound::Close(
                "replaced by a newer connection of the same agent".into(),
            ));
            old.fail_pending();
            self.emit("replaced", &old, old.crs.read().iter().cloned().collect());
        }
        let crs: Vec<CrKey> = conn.crs.read().iter().cloned().collect();
        self.emit("connected", &conn, crs);
    }

    /// Removes a connection (if still registered) and fails its pending requests.
    pub fn remove(&self, conn: &Arc<Connection>) {
        let removed = {
            let mut connections = self.connections.write();
            let before = connections.len();
            connections.retain(|c| c.id != conn.id);
            before != connections.len()
        };
        conn.fail_pending();
        if removed {
            let crs: Vec<CrKey> = conn.crs.read().iter().cloned().collect();
            self.emit("disconnected", conn, crs);
        }
    }

    /// Every connection.
    pub fn all(&self) -> Vec<Arc<Connection>> {
        self.connections.read().clone()
    }

    /// Picks a connection authorised for `cr` on `plane_id`, round-robin.
    pub fn pick(&self, plane_id: &str, cr: &CrKey) -> Result<Arc<Connection>, Unavailable> {
        let connections = self.connections.read();
        let on_plane: Vec<&Arc<Connection>> = connections
            .iter()
            .filter(|c| c.plane_id == plane_id)
            .collect();
        if on_plane.is_empty() {
            return Err(Unavailable::NoAgentConnected);
        }
        let authorised: Vec<&Arc<Connection>> = on_plane
            .into_iter()
            .filter(|c| c.crs.read().contains(cr))
            .collect();
        if authorised.is_empty() {
            return Err(Unavailable::NotAuthorized);
        }
        let i = self.round_robin.fetch_add(1, Ordering::Relaxed) % authorised.len();
        Ok(authorised[i].clone())
    }

    /// Connections of a plane authorised for `cr` (or all of the plane when `cr` is `None`).
    pub fn count(&self, plane_id: &str, cr: Option<&CrKey>) -> (usize, u64) {
        let connections = self.connections.read();
        let matching: Vec<&Arc<Connection>> = connections
            .iter()
            .filter(|c| c.plane_id == plane_id && cr.is_none_or(|cr| c.crs.read().contains(cr)))
            .collect();
        let last_seen = matching
            .iter()
            .map(|c| c.last_seen_ms.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        (matching.len(), last_seen)
    }

    /// Agents per CR key.
    pub fn agents_by_cr(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for conn in self.connections.read().iter() {
            for cr in conn.crs.read().iter() {
                *counts.entry(cr.to_string()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Sets a connection's CRs; emits authorized/revoked; returns (granted, revoked) counts.
    pub fn set_crs(&self, conn: &Arc<Connection>, crs: BTreeSet<CrKey>) -> (usize, usize) {
        let (granted, revoked) = {
            let mut current = conn.crs.write();
            let granted: Vec<CrKey> = crs.difference(&current).cloned().collect();
            let revoked: Vec<CrKey> = current.difference(&crs).cloned().collect();
            *current = crs;
            (granted, revoked)
        };
        if !granted.is_empty() {
            self.emit("authorized", conn, granted.clone());
        }
        if !revoked.is_empty() {
            self.emit("revoked", conn, revoked.clone());
        }
        (granted.len(), revoked.len())
    }

    fn emit(&self, type_: &str, conn: &Connection, crs: Vec<CrKey>) {
        let by_cr = self.agents_by_cr();
        let counts = crs
            .iter()
            .map(|cr| {
                (
                    cr.to_string(),
                    by_cr.get(&cr.to_string()).copied().unwrap_or(0),
                )
            })
            .collect();
        let _ = self.events.send(GatewayEvent {
            type_: type_.into(),
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            plane_type: buildplane_api::names::PLANE_TYPE.into(),
            plane_id: conn.plane_id.clone(),
            connection_id: conn.id,
            crs: crs.iter().map(ToString::to_string).collect(),
            connected_agents_by_cr: counts,
        });
    }

    /// The snapshot event: every CR with a connection.
    pub fn snapshot(&self) -> GatewayEvent {
        let by_cr = self.agents_by_cr();
        GatewayEvent {
            type_: "snapshot".into(),
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            plane_type: buildplane_api::names::PLANE_TYPE.into(),
            plane_id: String::new(),
            connection_id: 0,
            crs: by_cr.keys().cloned().collect(),
            connected_agents_by_cr: by_cr,
        }
    }

    /// The connection table (for operators and the harness).
    pub fn table(&self) -> Value {
        let connections: Vec<Value> = self
            .connections
            .read()
            .iter()
            .map(|c| {
                json!({
                    "id": c.id,
                    "planeID": c.plane_id,
                    "protocol": c.version,
                    "identity": c.identity,
                    "crs": c.crs.read().iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "connectedAt": c.connected_at,
                    "pendingStreams": c.pending.lock().len() + c.pending_v1.lock().len(),
                })
            })
            .collect();
        json!({"total": connections.len(), "connections": connections})
    }
}
