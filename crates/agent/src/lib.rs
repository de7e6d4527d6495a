//! The cluster agent: owns its identity, dials the gateway over WebSocket with mutual TLS, runs
//! the Kubernetes requests the control plane sends against its local API server, and reconnects
//! with exponential backoff and full jitter.
//!
//! [`run`] is the `cluster-agent run` process: identity from the build cluster's Secrets, leaf
//! renewal, one supervised connection. [`Agent::supervise`] is the connection loop on its own, so
//! [`swarm`] can run thousands of agents (each with its own identity and planeID) in one process.

pub mod backoff;
pub mod cluster;
pub mod identity;
mod session;
pub mod swarm;
mod upgrade;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use buildplane_api::served::ServedCrs;
use buildplane_pki::ReloadableCert;
use buildplane_runtime::Tasks;
use buildplane_tunnel::session::CloseReason;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use crate::cluster::BuildCluster;
use crate::{
    backoff::Backoff,
    session::{Ended, SessionHandle, connect},
};

/// Connections an agent holds at most, whatever replica count a gateway tells.
pub const MAX_GATEWAY_REPLICAS: usize = 16;

/// Backoff between dials that reached a gateway replica the agent holds already (409): full
/// jitter from this base, doubling up to [`CONFLICT_BACKOFF_CAP`].
pub const CONFLICT_BACKOFF_BASE: Duration = Duration::from_millis(200);
/// See [`CONFLICT_BACKOFF_BASE`].
pub const CONFLICT_BACKOFF_CAP: Duration = Duration::from_secs(2);

/// The gateway replicas an agent is connected to, by connection slot, and how many the
/// gateways say there are.
#[derive(Debug, Default)]
struct Replicas {
    held: std::collections::BTreeMap<usize, String>,
    count: usize,
}

impl Replicas {
    /// The connection slots wanted: one per replica, at least one, at most
    /// [`MAX_GATEWAY_REPLICAS`].
    fn wanted(&self) -> usize {
        self.count.clamp(1, MAX_GATEWAY_REPLICAS)
    }
}

/// Agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `wss://host:port/ws`.
    pub server_url: String,
    /// The planeID this agent serves.
    pub plane_id: String,
    /// `buildplane`.
    pub plane_type: String,
    /// Kubeconfig of the build cluster (in-cluster when `None`).
    pub kubeconfig: Option<PathBuf>,
    /// The gateway's serving CA (PEM file).
    pub server_ca: PathBuf,
    /// Namespace of the identity Secrets.
    pub identity_namespace: String,
    /// Validity of a client leaf.
    pub leaf_validity: Duration,
    /// Renew the leaf this long before it expires.
    pub renew_before: Duration,
    /// Reconnect backoff.
    pub backoff: Backoff,
    /// `2` (binary, streaming) or `1` (OpenChoreo JSON).
    pub protocol: u16,
    /// Health listener.
    pub health_listen: Option<SocketAddr>,
    /// Requests run at once; up to four times as many wait, more are refused (503).
    pub max_concurrent_requests: usize,
    /// Time between pings to the gateway.
    pub ping_interval: Duration,
    /// A gateway silent this long is considered dead and the connection is dropped.
    pub read_deadline: Duration,
    /// This process's instance id: a reconnect with the same certificate and id replaces the
    /// older connection at the gateway; HA replicas sharing a certificate differ by it.
    pub agent_id: String,
    /// The plane CRs this agent serves (`--serve`), sent on every upgrade; the gateway grants
    /// it no other CR, whatever CA a CR holds. Empty: every CR that admits its certificate.
    pub served: ServedCrs,
}

impl AgentConfig {
    /// Settings with the contract's defaults for one planeID.
    pub fn new(server_url: impl Into<String>, plane_id: impl Into<String>) -> Self {
        Self {
            server_url: server_url.into(),
            plane_id: plane_id.into(),
            plane_type: buildplane_api::names::PLANE_TYPE.into(),
            kubeconfig: None,
            server_ca: PathBuf::from("/ca-certs/ca.crt"),
            identity_namespace: buildplane_api::names::AGENT_NAMESPACE.into(),
            leaf_validity: Duration::from_secs(24 * 3600),
            renew_before: Duration::from_secs(8 * 3600),
            backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(30)),
            protocol: 2,
            health_listen: None,
            max_concurrent_requests: 64,
            ping_interval: Duration::from_secs(15),
            read_deadline: Duration::from_secs(45),
            agent_id: uuid::Uuid::new_v4().to_string(),
            served: ServedCrs::any(),
        }
    }
}

/// The build cluster for the kubeconfig or the in-cluster configuration: a client and the
/// path for proxied requests.
pub async fn build_cluster(kubeconfig: Option<&PathBuf>) -> anyhow::Result<BuildCluster> {
    let config = buildplane_runtime::kube_config(kubeconfig.map(PathBuf::as_path)).await?;
    Ok(BuildCluster::from_config(config)?)
}

/// One agent: its settings, the build cluster's API, its TLS identity and its counters. Shared
/// by the supervisor and the sessions it runs.
pub struct Agent {
    /// Settings.
    pub config: AgentConfig,
    /// The build cluster's API server: its client for the agent's own objects, and the path
    /// for the requests the agent runs.
    pub cluster: BuildCluster,
    /// Client TLS (gateway CA + [`Agent::cert`]); [`Agent::set_server_ca`] swaps it.
    tls: parking_lot::RwLock<Arc<rustls::ClientConfig>>,
    /// The client certificate in use; replacing it takes effect on the next connection.
    pub cert: Arc<ReloadableCert>,
    /// Bumped after [`Agent::cert`] changed ([`Agent::certificate_renewed`]): each connection
    /// slot opens a new connection, then drains its old one.
    renewed: tokio::sync::watch::Sender<u64>,
    /// Live sessions (one per gateway replica; one more while a slot hands over).
    pub connected: AtomicUsize,
    /// The gateway replicas this agent holds a connection to, by connection slot.
    replicas: parking_lot::Mutex<Replicas>,
    /// Notified when a gateway told a different replica count.
    replica_count_changed: Notify,
    /// Held by a slot from its dial until it records the replica it reached, so two slots
    /// never dial at once and each dial names every replica the others hold (otherwise two
    /// slots can reach the same replica together, and the newer replaces the older there).
    dialing: tokio::sync::Mutex<()>,
    /// Requests executed (for tests and the swarm's summary).
    pub requests: AtomicUsize,
    /// Tunnel messages ignored: undecodable, too large, or a kind this agent does not serve
    /// (OpenChoreo's exec and Hubble streams); the connection stays.
    pub ignored: AtomicUsize,
    pub(crate) limit: Arc<Semaphore>,
    pub(crate) streams: Arc<Semaphore>,
    pub(crate) waiting: AtomicUsize,
}

impl Agent {
    /// The agent's counters in the Prometheus text format (`/metrics` on the health listener):
    /// per replica, so a test can tell that requests reach every replica.
    pub fn metrics_text(&self) -> String {
        let requests = self.requests.load(Ordering::Relaxed);
        let connections = self.connected.load(Ordering::Relaxed);
        let ignored = self.ignored.load(Ordering::Relaxed);
        format!(
            "# HELP cluster_agent_requests Requests this agent ran against its cluster.\n\
             # TYPE cluster_agent_requests counter\n\
             cluster_agent_requests_total {requests}\n\
             # HELP cluster_agent_connections Live connections to the gateway.\n\
             # TYPE cluster_agent_connections gauge\n\
             cluster_agent_connections {connections}\n\
             # HELP cluster_agent_ignored_messages Tunnel messages from the gateway that were ignored (undecodable, too large, or a kind this agent does not serve).\n\
             # TYPE cluster_agent_ignored_messages counter\n\
             cluster_agent_ignored_messages_total {ignored}\n"
        )
    }

    /// An agent that connects with `cert`, trusting `server_ca_pem` for the gateway.
    pub fn new(
        config: AgentConfig,
        cluster: BuildCluster,
        server_ca_pem: &[u8],
        cert: Arc<ReloadableCert>,
    ) -> anyhow::Result<Arc<Self>> {
        let tls = client_tls(server_ca_pem, &cert)?;
        let n = config.max_concurrent_requests.max(1);
        Ok(Arc::new(Self {
            config,
            cluster,
            tls: parking_lot::RwLock::new(tls),
            cert,
            renewed: tokio::sync::watch::Sender::new(0),
            connected: AtomicUsize::new(0),
            replicas: parking_lot::Mutex::new(Replicas::default()),
            replica_count_changed: Notify::new(),
            dialing: tokio::sync::Mutex::new(()),
            requests: AtomicUsize::new(0),
            ignored: AtomicUsize::new(0),
            limit: Arc::new(Semaphore::new(n)),
            streams: Arc::new(Semaphore::new(n)),
            waiting: AtomicUsize::new(0),
        }))
    }

    /// The client TLS configuration the next connection uses.
    pub fn tls(&self) -> Arc<rustls::ClientConfig> {
        self.tls.read().clone()
    }

    /// Trusts `pem` (a bundle, during a rotation of the gateway's CA) for the gateway from the
    /// next connection on; the live connection keeps the session it has. An unusable bundle is
    /// refused and the CA in force stays.
    pub fn set_server_ca(&self, pem: &[u8]) -> anyhow::Result<()> {
        let tls = client_tls(pem, &self.cert)?;
        *self.tls.write() = tls;
        Ok(())
    }

    /// Whether a session is connected.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst) > 0
    }

    /// The certificate in [`Agent::cert`] changed: every connection is replaced, new before
    /// old.
    pub fn certificate_renewed(&self) {
        self.renewed.send_modify(|generation| *generation += 1);
    }

    /// The gateway replicas this agent holds a connection to.
    pub fn held_replicas(&self) -> Vec<String> {
        self.replicas.lock().held.values().cloned().collect()
    }

    /// Connects, serves and reconnects until `shutdown`; then drains in-flight work.
    ///
    /// One connection slot to begin with; when a gateway's 101 says there are N replicas
    /// behind the address, N slots, each dialing (through whatever balances the address)
    /// until it holds a replica the others do not (the replicas it holds already answer 409).
    /// A slot above the count retires at its next reconnect.
    pub async fn supervise(self: Arc<Self>, shutdown: CancellationToken) {
        let mut slots = tokio::task::JoinSet::new();
        slots.spawn(self.clone().supervise_slot(0, shutdown.clone()));
        loop {
            tokio::select! {
                () = self.replica_count_changed.notified() => {
                    let wanted = self.replicas.lock().wanted();
                    while slots.len() < wanted {
                        let slot = slots.len();
                        info!(plane_id = %self.config.plane_id, slot, wanted, "opening a connection to another gateway replica");
                        slots.spawn(self.clone().supervise_slot(slot, shutdown.clone()));
                    }
                }
                ended = slots.join_next() => {
                    if let Some(Err(err)) = ended && err.is_panic() {
                        std::panic::resume_unwind(err.into_panic());
                    }
                    if slots.is_empty() {
                        return;
                    }
                }
            }
        }
    }

    /// Whether `slot` is above the replica count (slot 0 always stays).
    fn slot_retired(&self, slot: usize) -> bool {
        slot > 0 && slot >= self.replicas.lock().wanted()
    }

    /// Records what a connection's 101 said: the slot holds that replica, and the count.
    fn hold(&self, slot: usize, replica: &session::GatewayReplica) {
        let changed = {
            let mut replicas = self.replicas.lock();
            if let Some(id) = &replica.id {
                replicas.held.insert(slot, id.clone());
            }
            let count = replica.count.unwrap_or(1);
            std::mem::replace(&mut replicas.count, count) != count
        };
        if changed {
            self.replica_count_changed.notify_one();
        }
    }

    /// Dials for `slot`, naming the replicas the other slots hold, and records the replica
    /// reached; one slot at a time.
    async fn dial_for(&self, slot: usize) -> Result<session::Connected, Ended> {
        let _dialing = self.dialing.lock().await;
        let connected = connect(self, &self.held_elsewhere(slot)).await?;
        self.hold(slot, &connected.replica);
        Ok(connected)
    }

    fn release(&self, slot: usize) {
        self.replicas.lock().held.remove(&slot);
    }

    /// The replicas the other slots hold: a new connection of `slot` must reach another one.
    fn held_elsewhere(&self, slot: usize) -> Vec<String> {
        let replicas = self.replicas.lock();
        replicas
            .held
            .iter()
            .filter(|(other, _)| **other != slot)
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// One connection slot: connects, serves and reconnects until `shutdown` (then drains) or
    /// until the replica count falls below it.
    async fn supervise_slot(self: Arc<Self>, slot: usize, shutdown: CancellationToken) {
        let mut backoff = self.config.backoff.clone();
        // Reaching a replica another slot holds (409) is no sign of trouble: the next dial
        // may reach a free one. It backs off on its own short scale, not the failure backoff
        // (which would grow to its cap over a few unlucky draws and leave a replica without
        // this agent for minutes after a storm).
        let mut conflicts = Backoff::new(CONFLICT_BACKOFF_BASE, CONFLICT_BACKOFF_CAP);
        let mut renewals = self.renewed.subscribe();
        loop {
            if self.slot_retired(slot) {
                info!(plane_id = %self.config.plane_id, slot, "fewer gateway replicas now; closing this connection slot");
                return;
            }
            let attempt = tokio::select! {
                attempt = self.dial_for(slot) => attempt,
                () = shutdown.cancelled() => return,
            };
            let delay = match attempt {
                Err(Ended::Refused { status: 409, .. }) => {
                    tracing::debug!(plane_id = %self.config.plane_id, slot, "reached a gateway replica held already");
                    conflicts.next_delay()
                }
                Err(ended) => self.delay_after(&mut backoff, ended, false),
                Ok(session) => {
                    conflicts.reset();
                    backoff.admitted();
                    renewals.mark_unchanged();
                    let mut current = session.spawn(self.clone());
                    // Whether the current connection's drain (the gateway's GoAway) was handled.
                    let mut handed_over = false;
                    // When to connect with the renewed certificate (again, after a failed try).
                    let mut retry_renewal: Option<tokio::time::Instant> = None;
                    let ended = loop {
                        let retry_at = retry_renewal;
                        tokio::select! {
                            biased;
                            ended = current.wait() => break ended,
                            () = shutdown.cancelled() => {
                                self.release(slot);
                                current.drain().await;
                                return;
                            }
                            () = current.going_away(), if !handed_over => {
                                // The gateway drains this connection (it is shutting down, or
                                // rebalancing): connect anew first, then let the old one finish
                                // its requests. When no gateway takes a new connection yet, the
                                // old one drains and the backoff takes over.
                                handed_over = true;
                                if current.is_draining() && self.hand_over(slot, &mut current, "the gateway is draining the connection").await {
                                    handed_over = false;
                                }
                            }
                            changed = renewals.changed() => {
                                if changed.is_err() {
                                    continue;
                                }
                                // New before old (below, at once): the old connection only
                                // drains once the renewed one is up, so requests keep flowing.
                                retry_renewal = Some(tokio::time::Instant::now());
                            }
                            () = async { tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)).await }, if retry_at.is_some() => {
                                retry_renewal = None;
                                if self.hand_over(slot, &mut current, "connected with the renewed certificate").await {
                                    handed_over = false;
                                } else {
                                    retry_renewal = Some(tokio::time::Instant::now() + Duration::from_secs(5));
                                }
                            }
                        }
                    };
                    self.release(slot);
                    // The gateway drained this connection (a restart, a rebalance): an orderly
                    // goodbye, not a flapping connection, whether the drain completed or its
                    // deadline closed the connection after the agent acted on the GoAway.
                    let drained = handed_over
                        || matches!(
                            &ended,
                            Ended::Closed {
                                reason: CloseReason::Drained,
                                ..
                            }
                        );
                    self.delay_after(&mut backoff, ended, drained)
                }
            };
            tracing::debug!(
                plane_id = %self.config.plane_id,
                slot,
                delay_ms = delay.as_millis() as u64,
                "reconnecting after backoff"
            );
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Connects anew and, once connected, swaps the new connection in and drains the old one
    /// on its own task. False when the new connection could not be made (the old one stays).
    async fn hand_over(
        self: &Arc<Self>,
        slot: usize,
        current: &mut SessionHandle,
        why: &str,
    ) -> bool {
        match self.dial_for(slot).await {
            Ok(next) => {
                info!(plane_id = %self.config.plane_id, "{why}; connected anew, draining the old connection");
                let old = std::mem::replace(current, next.spawn(self.clone()));
                tokio::spawn(old.drain());
                true
            }
            Err(ended) => {
                warn!(plane_id = %self.config.plane_id, ?ended, "{why}; a new connection could not be made yet, keeping the current one");
                false
            }
        }
    }

    /// The delay before the next dial after `ended`; `drained`: the gateway drained the
    /// connection (see [`Backoff::after_close`]).
    fn delay_after(&self, backoff: &mut Backoff, ended: Ended, drained: bool) -> Duration {
        match ended {
            Ended::Refused {
                status,
                retry_after,
                body,
            } => {
                warn!(plane_id = %self.config.plane_id, status, %body, "the gateway refused the connection");
                backoff.after_refusal(status, retry_after)
            }
            Ended::Unreachable(reason) => {
                info!(plane_id = %self.config.plane_id, %reason, "could not connect");
                backoff.next_delay()
            }
            Ended::Closed { lived, reason } => {
                info!(plane_id = %self.config.plane_id, %reason, lived_ms = lived.as_millis() as u64, "connection ended");
                backoff.after_close(lived, drained)
            }
        }
    }
}

/// Runs the agent until SIGINT/SIGTERM: identity from the build cluster's Secrets (created when
/// missing), leaf renewal before expiry, one supervised connection, health listener.
/// The agent's client TLS: `server_ca_pem` for the gateway, `cert` as its identity.
fn client_tls(
    server_ca_pem: &[u8],
    cert: &Arc<ReloadableCert>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    // No session resumption: a resumed session would present the previous leaf, so a renewed
    // or rotated certificate would never reach the gateway.
    let mut tls = (*buildplane_pki::client_config(server_ca_pem, Some(cert.clone()))?).clone();
    tls.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(tls))
}

/// How often the gateway CA file (`--server-ca`) is checked for changes.
const SERVER_CA_RELOAD: Duration = Duration::from_secs(2);

/// Follows the gateway CA file: a changed file is trusted from the next connection on; an
/// unusable one is logged and the CA in force stays (retried while the file changes).
async fn follow_server_ca(agent: Arc<Agent>, mut current: Vec<u8>) {
    let path = agent.config.server_ca.clone();
    let mut tick = tokio::time::interval(SERVER_CA_RELOAD);
    loop {
        tick.tick().await;
        let Ok(fresh) = std::fs::read(&path) else {
            continue;
        };
        if fresh == current {
            continue;
        }
        match agent.set_server_ca(&fresh) {
            Ok(()) => {
                info!(path = %path.display(), "gateway CA reloaded; the next connection trusts it")
            }
            Err(err) => {
                warn!(path = %path.display(), %err, "the new gateway CA file is unusable; keeping the previous one")
            }
        }
        current = fresh;
    }
}

pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    buildplane_pki::install_crypto_provider();
    let cluster = build_cluster(config.kubeconfig.as_ref()).await?;
    let identity = identity::ensure(
        &cluster.client,
        &config.identity_namespace,
        &config.plane_id,
        config.leaf_validity,
        config.renew_before,
    )
    .await?;
    let cert = ReloadableCert::from_pem(&identity.leaf.cert_pem, &identity.leaf.key_pem)?;
    let server_ca = std::fs::read(&config.server_ca)
        .with_context(|| format!("reading the gateway CA {}", config.server_ca.display()))?;
    let agent = Agent::new(config.clone(), cluster, &server_ca, cert.clone())?;
    let server_ca_follower = follow_server_ca(agent.clone(), server_ca);
    let agent_for_serve = agent.clone();
    let health = match config.health_listen {
        Some(listen) => Some(
            tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?,
        ),
        None => None,
    };
    let followers = async move {
        tokio::select! {
            res = follow_identity(agent) => res,
            () = server_ca_follower => Ok(()),
        }
    };
    serve(
        agent_for_serve,
        health,
        followers,
        buildplane_runtime::shutdown_signal(),
    )
    .await
}

/// Runs the agent's long-lived tasks (connection supervisor, identity follower, health server)
/// until `shutdown`, then drains for up to 30 s. A task that ends before is an error naming it:
/// the process exits instead of answering `/healthz` with half of it dead.
pub(crate) async fn serve<F>(
    agent: Arc<Agent>,
    health_listener: Option<tokio::net::TcpListener>,
    identity_follower: F,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + buildplane_runtime::tasks::TaskOutput,
{
    let mut tasks = Tasks::new();
    if let Some(listener) = health_listener {
        tasks.spawn("health server", health(listener, agent.clone()));
    }
    tasks.spawn("identity follower", identity_follower);
    let supervisor = agent.clone();
    tasks.spawn_graceful("connection supervisor", |shutdown| {
        supervisor.supervise(shutdown)
    });
    let res = tasks.run_until(shutdown).await;
    match &res {
        Ok(()) => info!("shutting down; draining in-flight requests"),
        Err(ended) => error!(%ended, "a long-lived task ended; shutting down"),
    }
    let stopped = tasks.shutdown(Duration::from_secs(30)).await;
    Ok(res.and(stopped)?)
}

/// Follows the identity Secrets ([`identity::follow`]: a watch, renewal scheduled
/// `renew_before` ahead of expiry) and, when the leaf changed (renewed here, or written by
/// another process, e.g. `cluster-agent renew` or `rotate-ca`), swaps it into [`Agent::cert`]
/// and tells the supervisor to reconnect new-before-old. Runs until the watch ends.
pub async fn follow_identity(agent: Arc<Agent>) -> anyhow::Result<()> {
    let config = &agent.config;
    identity::follow(
        &agent.cluster.client,
        &config.identity_namespace,
        &config.plane_id,
        config.leaf_validity,
        config.renew_before,
        |identity| {
            let current = agent.cert.leaf();
            let fresh = buildplane_pki::parse_cert_bundle(identity.leaf.cert_pem.as_bytes())
                .ok()
                .and_then(|c| c.into_iter().next());
            if fresh.is_none_or(|fresh| fresh == current) {
                return;
            }
            if let Err(err) = agent
                .cert
                .replace_from_pem(&identity.leaf.cert_pem, &identity.leaf.key_pem)
            {
                warn!(%err, "could not load the renewed certificate");
                return;
            }
            info!("client certificate renewed");
            agent.certificate_renewed();
        },
    )
    .await
}

async fn health(listener: tokio::net::TcpListener, agent: Arc<Agent>) -> std::io::Result<()> {
    let metrics = agent.clone();
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route(
            "/metrics",
            axum::routing::get(move || {
                let text = metrics.metrics_text();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        text,
                    )
                }
            }),
        )
        .route(
            "/readyz",
            axum::routing::get(move || {
                let agent = agent.clone();
                async move {
                    if agent.is_connected() {
                        (axum::http::StatusCode::OK, "connected")
                    } else {
                        (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            "not connected to the gateway",
                        )
                    }
                }
            }),
        );
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch_broke() {
        panic!("the identity watch broke")
    }

    /// A long-lived task that panics ends the agent with an error naming the task, and the
    /// health listener goes with it: no process whose `/healthz` says OK while half of it is
    /// dead.
    #[tokio::test]
    async fn panicking_task_ends_the_agent() {
        buildplane_pki::install_crypto_provider();
        // Nothing listens on port 9 (discard): the supervisor just keeps backing off.
        let kube_config = kube::Config::new("https://127.0.0.1:9".parse().unwrap());
        let cluster = BuildCluster::from_config(kube_config).unwrap();
        let ca = buildplane_pki::Ca::generate("agent-ca", Duration::from_secs(3600)).unwrap();
        let leaf = ca.issue_client("p", Duration::from_secs(3600)).unwrap();
        let cert = ReloadableCert::from_pem(&leaf.cert_pem, &leaf.key_pem).unwrap();
        let config = AgentConfig::new("wss://127.0.0.1:9/ws", "p");
        let agent = Agent::new(config, cluster, ca.cert_pem().as_bytes(), cert).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let health_addr = listener.local_addr().unwrap();
        let follower = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            watch_broke();
        };
        let res = tokio::time::timeout(
            Duration::from_secs(10),
            serve(agent, Some(listener), follower, std::future::pending()),
        )
        .await
        .expect("the agent noticed its dead task and stopped");
        let err = res.expect_err("a dead task is an error");
        assert!(err.to_string().contains("identity follower"), "{err:#}");
        assert!(
            tokio::net::TcpStream::connect(health_addr).await.is_err(),
            "the health listener is closed"
        );
    }

    /// `--server-ca` is followed: a changed file is trusted from the next connection on, and an
    /// unusable one keeps the CA in force. (Before, the file was read once at start, so a
    /// rotated gateway CA needed an agent restart.)
    #[tokio::test(start_paused = true)]
    async fn a_changed_gateway_ca_file_is_trusted_from_the_next_connection() {
        buildplane_pki::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let day = Duration::from_secs(86_400);
        let (old_ca, new_ca) = (
            buildplane_pki::Ca::generate("gateway-ca", day).unwrap(),
            buildplane_pki::Ca::generate("gateway-ca-2", day).unwrap(),
        );
        let path = dir.path().join("ca.crt");
        std::fs::write(&path, old_ca.cert_pem()).unwrap();
        let kube_config = kube::Config::new("https://127.0.0.1:9".parse().unwrap());
        let cluster = BuildCluster::from_config(kube_config).unwrap();
        let agent_ca = buildplane_pki::Ca::generate("agent-ca", day).unwrap();
        let leaf = agent_ca.issue_client("p", day).unwrap();
        let cert = ReloadableCert::from_pem(&leaf.cert_pem, &leaf.key_pem).unwrap();
        let mut config = AgentConfig::new("wss://127.0.0.1:9/ws", "p");
        config.server_ca = path.clone();
        let agent = Agent::new(config, cluster, old_ca.cert_pem().as_bytes(), cert).unwrap();
        let before = agent.tls();
        tokio::spawn(follow_server_ca(
            agent.clone(),
            old_ca.cert_pem().as_bytes().to_vec(),
        ));

        std::fs::write(&path, "not a certificate").unwrap();
        tokio::time::sleep(SERVER_CA_RELOAD * 3).await;
        assert!(
            Arc::ptr_eq(&before, &agent.tls()),
            "an unusable file changes nothing"
        );

        std::fs::write(&path, format!("{}{}", old_ca.cert_pem(), new_ca.cert_pem())).unwrap();
        tokio::time::sleep(SERVER_CA_RELOAD * 3).await;
        assert!(
            !Arc::ptr_eq(&before, &agent.tls()),
            "the new bundle is in force"
        );
    }
}
