//! Live agent connections: per plane, with the CRs each may serve, round-robin selection per CR,
//! and the connection caps. Streams belong to each connection's tunnel session (`link`); what
//! happened goes out on the event bus (`events`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    hash::{Hash as _, Hasher as _},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use buildplane_api::{
    CrKey,
    events::{GatewayEvent, GatewayEventKind},
    served::ServedCrs,
};
use buildplane_link::{Link, RequestHead, StreamError, StreamHandle};
use buildplane_pki::CaId;
use parking_lot::RwLock;
use rustls_pki_types::CertificateDer;
use serde_json::{Value, json};
use tokio::sync::broadcast;

use crate::{
    caps::{Candidate, CapExceeded, ConnectionCaps, Counts, ReplacedCounts},
    events::{ConnectionEvent, EventBus},
};

/// One admitted agent connection: who it is, what it may serve, and its tunnel [`Link`] (the
/// session owns the streams; closing the link fails every stream in flight at once).
pub struct Connection {
    /// Unique id.
    pub id: u64,
    /// The planeID it connected for.
    pub plane_id: String,
    /// The chain it presented (kept for re-verification when CAs change).
    pub chain: Vec<CertificateDer<'static>>,
    crs: RwLock<BTreeSet<CrKey>>,
    link: Arc<Link>,
    /// When it connected (RFC 3339).
    pub connected_at: String,
    /// The leaf's public key (DER SubjectPublicKeyInfo): an agent's identity across renewals of
    /// the same key and across reconnects. CN and SAN are not identity.
    pub public_key: Vec<u8>,
    /// The agent's instance id (`agentID` query parameter; HA replicas sharing one certificate
    /// differ by it). Empty for OpenChoreo agents.
    pub agent_id: String,
    /// Short printable identity: a hash of the public key, then `/agentID` when given.
    pub identity: String,
    /// The clientCAs that verified its chain at admission (the caps per CA count by them).
    pub cas: BTreeSet<CaId>,
    /// The CRs the agent said it serves (`serves` query parameter); every re-verification
    /// honours it.
    pub served: ServedCrs,
}

impl Connection {
    /// A new connection over `link`.
    pub fn new(
        id: u64,
        plane_id: String,
        chain: Vec<CertificateDer<'static>>,
        crs: BTreeSet<CrKey>,
        link: Arc<Link>,
    ) -> Self {
        let public_key = chain.first().map(|c| public_key_of(c)).unwrap_or_default();
        let identity = short_hash(&public_key);
        Self {
            id,
            plane_id,
            chain,
            crs: RwLock::new(crs),
            link,
            connected_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            agent_id: String::new(),
            public_key,
            identity,
            cas: BTreeSet::new(),
            served: ServedCrs::any(),
        }
    }

    /// Sets the CRs the agent serves.
    pub fn with_served(mut self, served: ServedCrs) -> Self {
        self.served = served;
        self
    }

    /// Sets the clientCAs that verified its chain.
    pub fn with_cas(mut self, cas: BTreeSet<CaId>) -> Self {
        self.cas = cas;
        self
    }

    /// Sets the agent instance id (from the `agentID` query parameter).
    pub fn with_agent_id(mut self, agent_id: String) -> Self {
        if !agent_id.is_empty() {
            self.identity = format!("{}/{agent_id}", self.identity);
        }
        self.agent_id = agent_id;
        self
    }

    /// Whether this and `other` are the same agent instance (same key, same instance id). An
    /// agent that sends no instance id (OpenChoreo's) is never the same instance as another
    /// connection: replicas sharing one certificate are siblings, and a stale connection goes
    /// by its heartbeat.
    pub fn same_instance(&self, other: &Connection) -> bool {
        !self.agent_id.is_empty()
            && self.plane_id == other.plane_id
            && self.public_key == other.public_key
            && self.agent_id == other.agent_id
    }

    /// The protocol version (1 or 2).
    pub fn version(&self) -> u16 {
        self.link.version()
    }

    /// The CRs it may serve now.
    pub fn crs(&self) -> BTreeSet<CrKey> {
        self.crs.read().clone()
    }

    /// Whether it may serve `cr`.
    pub fn serves(&self, cr: &CrKey) -> bool {
        self.crs.read().contains(cr)
    }

    /// Opens a stream to the agent.
    pub fn open(&self, head: RequestHead, end: bool) -> Result<StreamHandle, StreamError> {
        self.link.open(head, end)
    }

    /// Whether new streams can go on it (open and not draining).
    pub fn accepts_streams(&self) -> bool {
        self.link.accepts_streams()
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.link.is_closed()
    }

    /// Whether the agent has gone silent: a probe went unanswered past the liveness timeout and
    /// nothing has arrived since (a partition, most likely). No request is sent here then.
    pub fn is_silent(&self) -> bool {
        self.link.is_silent()
    }

    /// Resolves when the agent goes silent (at once if it is).
    pub async fn silent(&self) {
        self.link.silent().await
    }

    /// Starts a drain: `GoAway`, streams in flight finish, then it closes.
    pub fn go_away(&self, reason: &str) {
        self.link.go_away(reason);
    }

    /// Closes it now: every stream in flight fails at once.
    pub fn close(&self, reason: &str) {
        self.link.close(reason);
    }

    /// Resolves when the connection's socket is done.
    pub async fn finished(&self) {
        self.link.finished().await
    }

    /// Streams in flight.
    pub fn pending_count(&self) -> usize {
        self.link.open_streams()
    }

    /// When the agent was last heard from (Unix milliseconds).
    pub fn last_seen_ms(&self) -> u64 {
        self.link.last_heard_ms()
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<buildplane_link::CloseReason> {
        self.link.close_reason()
    }

    /// Whether it ended other than by a drain (lost, refused, closed by the gateway).
    fn is_closed_abruptly(&self) -> bool {
        self.close_reason()
            .is_some_and(|reason| reason != buildplane_link::CloseReason::Drained)
    }
}

/// The leaf's DER SubjectPublicKeyInfo (the whole certificate when it does not parse, which
/// cannot happen after a TLS handshake proved possession of its key).
pub fn public_key_of(cert: &CertificateDer<'_>) -> Vec<u8> {
    match x509_parser::parse_x509_certificate(cert.as_ref()) {
        Ok((_, parsed)) => parsed.tbs_certificate.subject_pki.raw.to_vec(),
        Err(_) => cert.as_ref().to_vec(),
    }
}

/// 16 hex digits naming some bytes in logs and tables (not a security boundary).
pub fn short_hash(bytes: &[u8]) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How long after a plane's last connection ended in a drain its agents count as reconnecting.
pub const RECONNECTING_FOR: std::time::Duration = std::time::Duration::from_secs(5);

/// Why no connection could serve a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unavailable {
    /// The plane has no connection at all (503).
    NoAgentConnected,
    /// Connections exist, but none is authorised for the CR (403).
    NotAuthorized,
    /// The authorised connections are all draining, or the plane's last one ended in a drain
    /// moments ago: their agents are reconnecting (503 with `Retry-After` once the proxy has
    /// waited for them).
    Draining,
    /// The authorised connections that take streams have all gone silent (a probe unanswered
    /// past the liveness timeout): this replica cannot reach the agents now.
    Silent,
}

/// Every live connection, grouped by planeID: admission, routing and the connection events look
/// at one plane's connections, never at all of them, so a storm of N agents costs O(N) in
/// total, not O(N²). (A CR serves one planeID, so its agents are all on that plane.)
pub struct Registry {
    table: RwLock<Table>,
    round_robin: AtomicUsize,
    next_id: AtomicU64,
    replaced: AtomicU64,
    events: EventBus,
}

#[derive(Default)]
struct Table {
    by_plane: HashMap<String, Vec<Arc<Connection>>>,
    /// Planes whose last connection ended in a drain, and when: their agents are reconnecting,
    /// so for [`RECONNECTING_FOR`] a request waits for them instead of failing.
    drained: HashMap<String, tokio::time::Instant>,
    /// Live connections per leaf public key and per CA (the caps).
    counts: Counts,
}

impl Table {
    /// Checks the caps for `candidate`, whose earlier instance (if any) it would replace.
    fn check(&self, caps: &ConnectionCaps, candidate: &Candidate<'_>) -> Result<(), CapExceeded> {
        let plane = self.by_plane.get(candidate.plane_id);
        let mut replaced = ReplacedCounts::default();
        for c in plane.into_iter().flatten() {
            if c.public_key == candidate.public_key && c.agent_id == candidate.agent_id {
                replaced.identity += 1;
                // Only a named instance is replaced; unnamed siblings stay (`same_instance`).
                if !candidate.agent_id.is_empty() {
                    replaced.plane += 1;
                    for ca in &c.cas {
                        *replaced.cas.entry(ca.clone()).or_insert(0) += 1;
                    }
                }
            }
        }
        caps.check(
            &self.counts,
            candidate,
            plane.map_or(0, Vec::len),
            &replaced,
        )
    }

    fn iter(&self) -> impl Iterator<Item = &Arc<Connection>> {
        self.by_plane.values().flatten()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            table: RwLock::new(Table::default()),
            round_robin: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            replaced: AtomicU64::new(0),
            events: EventBus::default(),
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

    /// Connections replaced by a newer one of the same agent instance so far.
    pub fn replaced_total(&self) -> u64 {
        self.replaced.load(Ordering::Relaxed)
    }

    /// Live connections presenting `public_key`, not counting the instance `agent_id` on
    /// `plane_id` (which a new connection would replace rather than add to).
    pub fn count_identity(&self, public_key: &[u8], plane_id: &str, agent_id: &str) -> usize {
        let table = self.table.read();
        let all = table.counts.identity(public_key);
        let same_instance = table
            .by_plane
            .get(plane_id)
            .into_iter()
            .flatten()
            .filter(|c| c.public_key == public_key && c.agent_id == agent_id)
            .count();
        all - same_instance
    }

    /// Whether a connection of `candidate` would be within `caps` now.
    pub fn check_caps(
        &self,
        caps: &ConnectionCaps,
        candidate: &Candidate<'_>,
    ) -> Result<(), CapExceeded> {
        self.table.read().check(caps, candidate)
    }

    /// Registers a connection if it is within `caps` (checked under the same lock, so
    /// concurrent admissions cannot together exceed a cap); see [`add`](Self::add).
    pub fn try_add(&self, conn: Arc<Connection>, caps: &ConnectionCaps) -> Result<(), CapExceeded> {
        self.add_checked(conn, Some(caps))
    }

    /// Registers a connection; an older connection of the same agent instance (same planeID,
    /// leaf public key and instance id) is replaced: newest wins.
    pub fn add(&self, conn: Arc<Connection>) {
        let _ = self.add_checked(conn, None);
    }

    fn add_checked(
        &self,
        conn: Arc<Connection>,
        caps: Option<&ConnectionCaps>,
    ) -> Result<(), CapExceeded> {
        let replaced: Vec<Arc<Connection>> = {
            let mut table = self.table.write();
            if let Some(caps) = caps {
                table.check(
                    caps,
                    &Candidate {
                        plane_id: &conn.plane_id,
                        public_key: &conn.public_key,
                        agent_id: &conn.agent_id,
                        cas: &conn.cas,
                    },
                )?;
            }
            let plane = table.by_plane.entry(conn.plane_id.clone()).or_default();
            let mut old = Vec::new();
            plane.retain(|c| {
                let same = c.same_instance(&conn);
                if same {
                    old.push(c.clone());
                }
                !same
            });
            plane.push(conn.clone());
            table.drained.remove(&conn.plane_id);
            for o in &old {
                table.counts.remove(&o.public_key, &o.cas);
            }
            table.counts.add(&conn.public_key, &conn.cas);
            old
        };
        for old in replaced {
            self.replaced.fetch_add(1, Ordering::Relaxed);
            // A drain, not a cut: the agent connects anew before its old connection finishes
            // (a renewal, a reconnect), so requests in flight there still complete. A stale
            // connection that never answers closes at its drain or idle timeout.
            old.go_away("replaced by a newer connection of the same agent");
            self.emit(
                GatewayEventKind::Replaced,
                &old,
                old.crs().into_iter().collect(),
            );
        }
        let crs: Vec<CrKey> = conn.crs().into_iter().collect();
        self.emit(GatewayEventKind::Connected, &conn, crs);
        Ok(())
    }

    /// Removes a connection (if still registered) and fails its pending requests.
    pub fn remove(&self, conn: &Arc<Connection>) {
        let removed = {
            let mut table = self.table.write();
            let removed = match table.by_plane.get_mut(&conn.plane_id) {
                Some(plane) => {
                    let before = plane.len();
                    plane.retain(|c| c.id != conn.id);
                    let removed = before != plane.len();
                    if plane.is_empty() {
                        table.by_plane.remove(&conn.plane_id);
                        if !conn.accepts_streams() && !conn.is_closed_abruptly() {
                            table
                                .drained
                                .insert(conn.plane_id.clone(), tokio::time::Instant::now());
                        }
                    }
                    removed
                }
                None => false,
            };
            if removed {
                table.counts.remove(&conn.public_key, &conn.cas);
            }
            removed
        };
        conn.close("the connection was removed");
        if removed {
            let crs: Vec<CrKey> = conn.crs().into_iter().collect();
            self.emit(GatewayEventKind::Disconnected, conn, crs);
        }
    }

    /// The connections of one planeID.
    pub fn on_plane(&self, plane_id: &str) -> Vec<Arc<Connection>> {
        self.table
            .read()
            .by_plane
            .get(plane_id)
            .cloned()
            .unwrap_or_default()
    }

    /// Every connection.
    pub fn all(&self) -> Vec<Arc<Connection>> {
        self.table.read().iter().cloned().collect()
    }

    /// Picks a connection authorised for `cr` on `plane_id` that takes new streams and has not
    /// gone silent, round-robin.
    pub fn pick(&self, plane_id: &str, cr: &CrKey) -> Result<Arc<Connection>, Unavailable> {
        let table = self.table.read();
        let Some(plane) = table.by_plane.get(plane_id).filter(|p| !p.is_empty()) else {
            let reconnecting = table
                .drained
                .get(plane_id)
                .is_some_and(|at| at.elapsed() < RECONNECTING_FOR);
            return Err(if reconnecting {
                Unavailable::Draining
            } else {
                Unavailable::NoAgentConnected
            });
        };
        let authorised: Vec<&Arc<Connection>> = plane.iter().filter(|c| c.serves(cr)).collect();
        if authorised.is_empty() {
            return Err(Unavailable::NotAuthorized);
        }
        let open: Vec<&Arc<Connection>> = authorised
            .into_iter()
            .filter(|c| c.accepts_streams())
            .collect();
        if open.is_empty() {
            return Err(Unavailable::Draining);
        }
        let live: Vec<&Arc<Connection>> = open.into_iter().filter(|c| !c.is_silent()).collect();
        if live.is_empty() {
            return Err(Unavailable::Silent);
        }
        let i = self.round_robin.fetch_add(1, Ordering::Relaxed) % live.len();
        Ok(live[i].clone())
    }

    /// Connections of a plane authorised for `cr` (or all of the plane when `cr` is `None`),
    /// and when the newest of them last heard from its agent (Unix ms, 0 when none).
    pub fn count(&self, plane_id: &str, cr: Option<&CrKey>) -> (usize, u64) {
        let table = self.table.read();
        let matching: Vec<&Arc<Connection>> = table
            .by_plane
            .get(plane_id)
            .into_iter()
            .flatten()
            .filter(|c| cr.is_none_or(|cr| c.serves(cr)))
            .collect();
        let last_seen = matching.iter().map(|c| c.last_seen_ms()).max().unwrap_or(0);
        (matching.len(), last_seen)
    }

    /// Live connections per planeID.
    pub fn by_plane(&self) -> BTreeMap<String, usize> {
        self.table
            .read()
            .by_plane
            .iter()
            .map(|(plane, conns)| (plane.clone(), conns.len()))
            .collect()
    }

    /// Silent connections per planeID (every plane with a connection).
    pub fn silent_by_plane(&self) -> BTreeMap<String, usize> {
        self.table
            .read()
            .by_plane
            .iter()
            .map(|(plane, conns)| {
                (
                    plane.clone(),
                    conns.iter().filter(|c| c.is_silent()).count(),
                )
            })
            .collect()
    }

    /// Agents per CR key (every CR with a connection; for the snapshot event).
    pub fn agents_by_cr(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for conn in self.table.read().iter() {
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
            self.emit(GatewayEventKind::Authorized, conn, granted.clone());
        }
        if !revoked.is_empty() {
            self.emit(GatewayEventKind::Revoked, conn, revoked.clone());
        }
        (granted.len(), revoked.len())
    }

    /// Sends one event; its counts come from the connection's own plane only.
    fn emit(&self, kind: GatewayEventKind, conn: &Connection, crs: Vec<CrKey>) {
        let counts = {
            let table = self.table.read();
            let plane = table.by_plane.get(&conn.plane_id);
            crs.iter()
                .map(|cr| {
                    let n = plane.into_iter().flatten().filter(|c| c.serves(cr)).count();
                    (cr.to_string(), n)
                })
                .collect()
        };
        self.events.send(ConnectionEvent {
            kind,
            plane_id: &conn.plane_id,
            connection_id: conn.id,
            crs: &crs,
            connected_agents_by_cr: counts,
        });
    }

    /// The snapshot event: every CR with a connection.
    pub fn snapshot(&self) -> GatewayEvent {
        EventBus::snapshot(self.agents_by_cr())
    }

    /// The connection table (for operators and the harness), oldest connection first.
    pub fn table(&self) -> Value {
        let mut all = self.all();
        all.sort_by_key(|c| c.id);
        let connections: Vec<Value> = all
            .iter()
            .map(|c| {
                json!({
                    "id": c.id,
                    "planeID": c.plane_id,
                    "protocol": c.version(),
                    "identity": c.identity,
                    "crs": c.crs.read().iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "connectedAt": c.connected_at,
                    "pendingStreams": c.pending_count(),
                    "silent": c.is_silent(),
                })
            })
            .collect();
        json!({"total": connections.len(), "connections": connections})
    }
}

#[cfg(test)]
mod tests {
    use buildplane_link::{Config, Read, Role};

    use super::*;

    /// A connection whose link runs over an in-memory socket to an agent session that accepts
    /// nothing (kept alive for the test).
    async fn conn(
        registry: &Registry,
        plane: &str,
        key: &[u8],
        agent: &str,
        crs: &[CrKey],
    ) -> Arc<Connection> {
        let (link, peer) = buildplane_link::loopback_pair(
            Config::new(Role::Gateway, 2),
            Config::new(Role::Agent, 2),
            None,
        )
        .await;
        std::mem::forget(peer);
        let mut c = Connection::new(
            registry.next_id(),
            plane.into(),
            Vec::new(),
            crs.iter().cloned().collect(),
            link,
        )
        .with_agent_id(agent.into());
        c.public_key = key.to_vec();
        Arc::new(c)
    }

    /// No connection on the plane is 503-worthy; connections that serve other CRs only are
    /// 403-worthy; requests spread round-robin over the authorised ones; draining ones take
    /// nothing new.
    #[tokio::test]
    async fn pick_distinguishes_unavailable_from_unauthorised_and_round_robins() {
        let registry = Registry::default();
        let a = CrKey::namespaced("org-a", "bp");
        let b = CrKey::namespaced("org-b", "bp");
        assert_eq!(
            registry.pick("p", &a).err(),
            Some(Unavailable::NoAgentConnected)
        );
        let one = conn(&registry, "p", b"k1", "x", std::slice::from_ref(&b)).await;
        registry.add(one.clone());
        assert_eq!(
            registry.pick("p", &a).err(),
            Some(Unavailable::NotAuthorized)
        );
        let two = conn(&registry, "p", b"k2", "y", &[a.clone(), b.clone()]).await;
        let three = conn(&registry, "p", b"k3", "z", &[a.clone(), b.clone()]).await;
        registry.add(two.clone());
        registry.add(three.clone());
        let picks: BTreeSet<u64> = (0..6).map(|_| registry.pick("p", &a).unwrap().id).collect();
        assert_eq!(picks, BTreeSet::from([two.id, three.id]));
        let picks: BTreeSet<u64> = (0..9).map(|_| registry.pick("p", &b).unwrap().id).collect();
        assert_eq!(picks.len(), 3);
        two.go_away("test");
        three.go_away("test");
        assert_eq!(registry.pick("p", &a).err(), Some(Unavailable::Draining));
        assert_eq!(registry.pick("p", &b).unwrap().id, one.id);
    }

    /// The same agent instance (key and instance id) reconnecting replaces its old connection;
    /// a replica with the same key but another instance id is a sibling, and so are replicas
    /// that send no instance id at all (OpenChoreo's agents).
    #[tokio::test]
    async fn newest_wins_for_the_same_instance_only() {
        let registry = Registry::default();
        let cr = CrKey::namespaced("org", "bp");
        let mut events = registry.subscribe();
        let old = conn(&registry, "p", b"key", "pod-1", std::slice::from_ref(&cr)).await;
        registry.add(old.clone());
        let sibling = conn(&registry, "p", b"key", "pod-2", std::slice::from_ref(&cr)).await;
        registry.add(sibling.clone());
        assert_eq!(registry.all().len(), 2);
        assert_eq!(registry.count_identity(b"key", "p", "pod-1"), 1);
        let new = conn(&registry, "p", b"key", "pod-1", std::slice::from_ref(&cr)).await;
        registry.add(new.clone());
        let ids: BTreeSet<u64> = registry.all().iter().map(|c| c.id).collect();
        assert_eq!(ids, BTreeSet::from([sibling.id, new.id]));
        assert!(
            !old.accepts_streams(),
            "the replaced connection takes no new streams; its requests in flight finish"
        );
        assert_eq!(registry.replaced_total(), 1);
        let kinds: Vec<GatewayEventKind> = std::iter::from_fn(|| events.try_recv().ok())
            .map(|e| e.kind)
            .collect();
        use GatewayEventKind::{Connected, Replaced};
        assert_eq!(kinds, [Connected, Connected, Replaced, Connected]);
        let first = conn(&registry, "q", b"shared", "", std::slice::from_ref(&cr)).await;
        let second = conn(&registry, "q", b"shared", "", std::slice::from_ref(&cr)).await;
        registry.add(first.clone());
        registry.add(second.clone());
        assert!(!first.is_closed(), "no agentID: replicas are siblings");
        assert_eq!(registry.count("q", Some(&cr)).0, 2);
    }

    /// Streams belong to their connection: removing it ends every waiter at once with `Lost`,
    /// and no stream can be opened on it afterwards.
    #[tokio::test]
    async fn closing_a_connection_fails_its_pending_streams() {
        let registry = Registry::default();
        let c = conn(&registry, "p", b"k", "", &[]).await;
        let stream = c
            .open(
                RequestHead {
                    method: "GET".into(),
                    ..RequestHead::default()
                },
                true,
            )
            .unwrap();
        registry.add(c.clone());
        registry.remove(&c);
        assert!(matches!(
            stream.read().await,
            Read::Lost {
                before_head: true,
                ..
            }
        ));
        assert!(c.open(RequestHead::default(), true).is_err());
    }

    /// Connections are grouped by planeID: the identity count spans planes, events count a CR's
    /// agents on its own plane, and a plane's entry goes with its last connection.
    #[tokio::test]
    async fn planes_group_connections_and_counts_follow() {
        let registry = Registry::default();
        let mut events = registry.subscribe();
        let cr1 = CrKey::namespaced("org", "bp1");
        let cr2 = CrKey::namespaced("org", "bp2");
        let a = conn(&registry, "p1", b"key", "a", std::slice::from_ref(&cr1)).await;
        let b = conn(&registry, "p2", b"key", "b", std::slice::from_ref(&cr2)).await;
        let c = conn(&registry, "p1", b"other", "c", std::slice::from_ref(&cr1)).await;
        registry.add(a.clone());
        registry.add(b.clone());
        registry.add(c.clone());
        assert_eq!(registry.count_identity(b"key", "p3", "x"), 2);
        assert_eq!(
            registry.count_identity(b"key", "p1", "a"),
            1,
            "a would be replaced"
        );
        assert_eq!(registry.count_identity(b"other", "p1", "c"), 0);
        let counts: Vec<usize> = std::iter::from_fn(|| events.try_recv().ok())
            .map(|e| e.connected_agents_by_cr.values().sum())
            .collect();
        assert_eq!(counts, [1, 1, 2], "p1's CR counts p1's connections only");
        assert_eq!(registry.by_plane().get("p1"), Some(&2));
        assert_eq!(registry.agents_by_cr().get("org/bp1"), Some(&2));
        registry.remove(&b);
        registry.remove(&b);
        assert_eq!(registry.by_plane().get("p2"), None);
        assert_eq!(registry.count_identity(b"key", "p3", "x"), 1);
        assert_eq!(registry.count("p1", Some(&cr1)).0, 2);
        assert!(matches!(
            registry.pick("p2", &cr2),
            Err(Unavailable::NoAgentConnected)
        ));
        assert_eq!(registry.all().len(), 2);
        assert_eq!(registry.table()["total"], 2);
    }

    /// `try_add` refuses, under its lock, what would exceed a cap, registers nothing then, and
    /// lets the instance it would replace go without counting it.
    #[tokio::test]
    async fn try_add_holds_the_caps_and_counts_replacements_out() {
        let registry = Registry::default();
        let caps = ConnectionCaps {
            per_identity: 0,
            per_plane: 2,
            per_ca: 0,
        };
        let cr = CrKey::namespaced("org", "bp");
        let crs = std::slice::from_ref(&cr);
        let a = conn(&registry, "p", b"ka", "a", crs).await;
        let b = conn(&registry, "p", b"kb", "b", crs).await;
        let c = conn(&registry, "p", b"kc", "c", crs).await;
        assert_eq!(registry.try_add(a, &caps), Ok(()));
        assert_eq!(registry.try_add(b, &caps), Ok(()));
        assert_eq!(registry.try_add(c, &caps), Err(CapExceeded::Plane(2)));
        assert_eq!(registry.count("p", Some(&cr)).0, 2, "c was not registered");
        let a_again = conn(&registry, "p", b"ka", "a", crs).await;
        assert_eq!(
            registry.try_add(a_again, &caps),
            Ok(()),
            "a reconnect replaces its instance"
        );
        assert_eq!(registry.count("p", Some(&cr)).0, 2);
        assert_eq!(registry.replaced_total(), 1);
    }
}
