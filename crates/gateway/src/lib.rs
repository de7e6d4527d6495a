//! The cluster gateway: admits cluster agents by BuildPlane `clientCA` and planeID, keeps their
//! authorisations current as CRs and Secrets change, and proxies Kubernetes requests to them.
//!
//! Three listeners: the agent listener (`/ws`, TLS requesting a client certificate), the internal
//! API (mTLS against a separate internal CA, so agent certificates cannot call it) and a plain
//! health listener (`/healthz`, `/readyz`, `/metrics`).

pub mod agents;
pub mod caps;
pub mod events;
pub mod hello;
pub mod internal;
mod internal_listener;
pub mod metrics;
pub mod peers;
pub mod policy;
pub mod proxy;
pub mod rate;
pub mod registry;
pub mod trust;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use anyhow::Context as _;
use buildplane_pki::ReloadableCert;
use buildplane_runtime::{TaskEnded, Tasks};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    metrics::Metrics,
    policy::ProxyPolicy,
    registry::Registry,
    trust::{Trust, TrustChange},
};

/// Gateway settings.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Kubeconfig of the control cluster (in-cluster when `None`).
    pub kubeconfig: Option<PathBuf>,
    /// Agent listener address.
    pub agent_listen: SocketAddr,
    /// Internal API address.
    pub internal_listen: SocketAddr,
    /// Health listener address.
    pub health_listen: SocketAddr,
    /// Agent listener certificate and key (PEM files).
    pub server_cert: (PathBuf, PathBuf),
    /// Internal API certificate and key (PEM files); the agent listener's when `None`.
    pub internal_server_cert: Option<(PathBuf, PathBuf)>,
    /// CA of the internal API's clients (PEM file).
    pub internal_client_ca: PathBuf,
    /// Ping interval.
    pub heartbeat_interval: Duration,
    /// An agent silent for this long is disconnected.
    pub heartbeat_timeout: Duration,
    /// A connection that leaves a probe unanswered this long is silent: the proxy sends no
    /// request there, and stops waiting there, until the agent is heard again.
    pub liveness_timeout: Duration,
    /// The sibling replicas to forward a request to when no connection here can take it.
    pub peers: Option<peers::PeersConfig>,
    /// Concurrent TLS handshakes on the agent listener.
    pub max_concurrent_handshakes: usize,
    /// Live connections per agent key, planeID and clientCA (excess upgrades get 429).
    pub connection_caps: caps::ConnectionCaps,
    /// A connection silent this long before its first byte is closed.
    pub hello_timeout: Duration,
    /// Connections one source address may hold before their first byte.
    pub max_idle_per_source: usize,
    /// On shutdown, agent connections are told to drain (`GoAway`) spread over this long.
    pub shutdown_stagger: Duration,
    /// A draining connection's requests in flight get this long to finish.
    pub drain_timeout: Duration,
    /// A proxied body that makes no progress this long (no credit, or unread) is reset.
    pub stream_stall_timeout: Duration,
    /// How often certificate files are checked for changes.
    pub cert_reload_interval: Duration,
    /// The paths the proxy refuses (`--proxy-deny`).
    pub proxy_policy: ProxyPolicy,
    /// Verdicts the trust cache keeps (`--verdict-cache-size`; 0: none).
    pub verdict_cache_size: usize,
    /// This replica's id and the number of replicas behind the agent address.
    pub replica: Replica,
    /// The rate each planeID may send proxied requests at through this replica
    /// (`--plane-rate-limit`; `None`: no limit).
    pub plane_rate: Option<rate::PlaneRate>,
}

/// A gateway's place among its replicas, told to every agent in the upgrade's 101 so that an
/// agent of ours can hold one connection to each replica (`--replica-id`, `--replicas`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// Unique among the replicas (the pod name in Kubernetes).
    pub id: String,
    /// How many replicas serve behind the agents' address (at least 1).
    pub count: u32,
}

impl Default for Replica {
    fn default() -> Self {
        Self {
            id: "gateway-0".into(),
            count: 1,
        }
    }
}

impl GatewayConfig {
    /// Settings with the contract's defaults around the given files and addresses.
    pub fn new(
        kubeconfig: Option<PathBuf>,
        server_cert: (PathBuf, PathBuf),
        internal_client_ca: PathBuf,
    ) -> Self {
        Self {
            kubeconfig,
            agent_listen: ([0, 0, 0, 0], 8443).into(),
            internal_listen: ([0, 0, 0, 0], 8444).into(),
            health_listen: ([0, 0, 0, 0], 8080).into(),
            server_cert,
            internal_server_cert: None,
            internal_client_ca,
            heartbeat_interval: Duration::from_secs(30),
            heartbeat_timeout: Duration::from_secs(90),
            liveness_timeout: Duration::from_secs(3),
            peers: None,
            max_concurrent_handshakes: 256,
            connection_caps: caps::ConnectionCaps::default(),
            hello_timeout: Duration::from_secs(3),
            max_idle_per_source: 32,
            shutdown_stagger: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(30),
            stream_stall_timeout: Duration::from_secs(60),
            cert_reload_interval: Duration::from_secs(2),
            proxy_policy: ProxyPolicy::default(),
            verdict_cache_size: buildplane_pki::DEFAULT_VERDICT_CAPACITY,
            replica: Replica::default(),
            plane_rate: None,
        }
    }
}

/// State shared by the listeners.
pub struct Shared {
    /// Settings.
    pub config: GatewayConfig,
    /// Admission sources.
    pub trust: Trust,
    /// Live connections.
    pub registry: Registry,
    /// Agent listener TLS.
    pub agent_tls: Arc<rustls::ServerConfig>,
    /// Storm protection: permits for concurrent handshakes.
    pub handshakes: Arc<Semaphore>,
    /// Connections that have not sent their first byte yet (`hello`).
    pub idle: Arc<hello::IdleGate>,
    /// Metrics.
    pub metrics: Metrics,
    /// Token buckets per planeID (`--plane-rate-limit`).
    pub plane_rates: Option<rate::PlaneRates>,
    ready: AtomicBool,
    /// Set when this replica starts leaving (SIGTERM: the shutdown delay, then the drain):
    /// new agent connections are refused, and the internal API's HTTP/1 answers say
    /// `Connection: close`.
    pub draining: Arc<AtomicBool>,
    /// Cancelled when the drain starts: a second later the internal API's connections close,
    /// each once its requests in flight are answered; the event streams end at once.
    pub drain_started: CancellationToken,
    /// The internal API's connections, which a shutdown lets finish (up to the drain
    /// timeout).
    pub(crate) internal_connections: tokio_util::task::TaskTracker,
    /// When this replica started (see [`Shared::warming_up`]).
    pub started: tokio::time::Instant,
    /// Cancelled when the gateway stops: every listener and connection task ends.
    pub shutdown: CancellationToken,
    /// The sibling replicas (`--peer-service`), when configured.
    pub peers: Option<Arc<peers::Peers>>,
}

/// Spawns `fut`, ending it when `token` is cancelled.
pub(crate) fn spawn_until<F>(token: &CancellationToken, fut: F)
where
    F: std::future::Future + Send + 'static,
{
    let token = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = fut => {}
            () = token.cancelled() => {}
        }
    });
}

/// Re-verifies every live connection against the current CRs and Secrets; closes connections
/// authorised for nothing. Returns (granted, revoked).
pub fn revalidate(shared: &Shared) -> (usize, usize) {
    revalidate_scope(shared, &TrustChange::All)
}

/// [`revalidate`] for the connections of one planeID only (or all with `None`).
pub fn revalidate_planes(shared: &Shared, plane_id: Option<&str>) -> (usize, usize) {
    match plane_id {
        Some(plane_id) => revalidate_scope(
            shared,
            &TrustChange::Planes(std::iter::once(plane_id.to_owned()).collect()),
        ),
        None => revalidate(shared),
    }
}

/// [`revalidate`] for the connections a trust change may affect.
pub fn revalidate_scope(shared: &Shared, change: &TrustChange) -> (usize, usize) {
    shared.trust.prune_deleted();
    match change {
        TrustChange::All => {
            revalidate_connections(shared, &shared.trust.index(None), shared.registry.all())
        }
        TrustChange::Planes(planes) => planes.iter().fold((0, 0), |(g, r), plane| {
            let (pg, pr) = revalidate_connections(
                shared,
                &shared.trust.index(Some(plane)),
                shared.registry.on_plane(plane),
            );
            (g + pg, r + pr)
        }),
    }
}

fn revalidate_connections(
    shared: &Shared,
    index: &trust::TrustIndex,
    connections: Vec<Arc<registry::Connection>>,
) -> (usize, usize) {
    let (mut granted, mut revoked) = (0, 0);
    for conn in connections {
        if cfg!(feature = "chaos-defect-skip-revocation") {
            // The deliberate defect of the chaos harness's self-test: nothing is re-verified.
            continue;
        }
        shared.metrics.reverified();
        let admission = index.admit(&conn.plane_id, &conn.chain, &conn.served);
        if admission.granted.is_empty() {
            // Authorised for nothing: close it; its `disconnected` event carries the CRs it lost.
            revoked += conn.crs().len();
            info!(id = conn.id, plane_id = %conn.plane_id, "no CR admits this agent any more; closing");
            conn.close("certificate no longer valid for any CR");
            shared.registry.remove(&conn);
            continue;
        }
        let (g, r) = shared.registry.set_crs(&conn, admission.granted);
        granted += g;
        revoked += r;
    }
    (granted, revoked)
}

/// Drains every agent connection: `GoAway` to each, spread evenly over `stagger` so agents do
/// not all dial again in the same second; each connection's requests in flight finish (up to
/// the drain timeout) while its agent connects anew, then it closes. Returns once every
/// connection has closed or the drain timeout has passed after the last `GoAway`.
pub async fn drain(shared: &Shared, stagger: Duration) {
    shared
        .draining
        .store(true, std::sync::atomic::Ordering::SeqCst);
    shared.drain_started.cancel();
    let connections = shared.registry.all();
    if connections.is_empty() {
        return;
    }
    let step = stagger / u32::try_from(connections.len()).unwrap_or(u32::MAX);
    info!(
        n = connections.len(),
        stagger_ms = stagger.as_millis() as u64,
        "draining agent connections"
    );
    for conn in &connections {
        conn.go_away("the gateway is shutting down");
        tokio::time::sleep(step).await;
    }
    let all_closed = futures::future::join_all(connections.iter().map(|c| c.finished()));
    // The sessions close themselves at their drain deadline; a second on top covers the Close.
    let deadline = shared.config.drain_timeout + Duration::from_secs(1);
    if tokio::time::timeout(deadline, all_closed).await.is_err() {
        warn!("agent connections still open after the drain timeout");
    }
}

/// Polls certificate files and swaps them into the running listeners when they change.
fn watch_cert(
    tasks: &mut Tasks,
    paths: (PathBuf, PathBuf),
    cert: Arc<ReloadableCert>,
    every: Duration,
) {
    let name = format!("certificate reload of {}", paths.0.display());
    tasks.spawn(name, looping(async move {
        let read = |paths: &(PathBuf, PathBuf)| {
            Some((
                std::fs::read_to_string(&paths.0).ok()?,
                std::fs::read_to_string(&paths.1).ok()?,
            ))
        };
        let mut current = read(&paths);
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let fresh = read(&paths);
            if fresh.is_none() || fresh == current {
                continue;
            }
            if let Some((chain, key)) = &fresh {
                match cert.replace_from_pem(chain, key) {
                    Ok(()) => info!(cert = %paths.0.display(), "reloaded a certificate"),
                    // Often a half-written pair (cert before key): try again next tick.
                    Err(err) => {
                        debug!(cert = %paths.0.display(), %err, "certificate files not loadable yet");
                        continue;
                    }
                }
            }
            current = fresh;
        }
    }));
}

/// Every agent connection does a full handshake: a resumed TLS session would carry the chain of
/// the session it resumes, so a renewed or rotated leaf would go unseen (and a revoked one could
/// come back through an old ticket).
pub(crate) fn without_resumption(config: Arc<rustls::ServerConfig>) -> Arc<rustls::ServerConfig> {
    let mut config = (*config).clone();
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Arc::new(config)
}

fn load_cert(paths: &(PathBuf, PathBuf)) -> anyhow::Result<Arc<ReloadableCert>> {
    let cert = std::fs::read_to_string(&paths.0)
        .with_context(|| format!("reading {}", paths.0.display()))?;
    let key = std::fs::read_to_string(&paths.1)
        .with_context(|| format!("reading {}", paths.1.display()))?;
    Ok(ReloadableCert::from_pem(&cert, &key)?)
}

/// A running gateway.
pub struct RunningGateway {
    /// Shared state (registry, trust).
    pub shared: Arc<Shared>,
    /// Bound agent listener address.
    pub agent_addr: SocketAddr,
    /// Bound internal API address.
    pub internal_addr: SocketAddr,
    /// Bound health address.
    pub health_addr: SocketAddr,
    tasks: Tasks,
}

/// Starts the gateway's listeners and background tasks.
pub async fn start(config: GatewayConfig) -> anyhow::Result<RunningGateway> {
    buildplane_pki::install_crypto_provider();
    let client = buildplane_runtime::kube_client(config.kubeconfig.as_deref()).await?;
    let agent_cert = load_cert(&config.server_cert)?;
    let shutdown = CancellationToken::new();
    // Every long-lived task is supervised: one that ends before shutdown (a panic, an error)
    // surfaces in `RunningGateway::run_until`, and the process exits instead of serving on
    // half its tasks with /healthz still OK.
    let mut tasks = Tasks::new();
    watch_cert(
        &mut tasks,
        config.server_cert.clone(),
        agent_cert.clone(),
        config.cert_reload_interval,
    );
    let internal_cert = match &config.internal_server_cert {
        Some(paths) if paths != &config.server_cert => {
            let cert = load_cert(paths)?;
            watch_cert(
                &mut tasks,
                paths.clone(),
                cert.clone(),
                config.cert_reload_interval,
            );
            cert
        }
        _ => agent_cert.clone(),
    };
    let client_ca = std::fs::read(&config.internal_client_ca)
        .with_context(|| format!("reading {}", config.internal_client_ca.display()))?;
    let (internal_tls, _) = tokio::sync::watch::channel(internal_listener::InternalTls::new(
        internal_cert.clone(),
        &client_ca,
    )?);
    internal_listener::watch_client_ca(
        &mut tasks,
        config.internal_client_ca.clone(),
        client_ca,
        internal_cert,
        internal_tls.clone(),
        config.cert_reload_interval,
    );
    let peers = match &config.peers {
        Some(peers) => {
            let cert = load_cert(&peers.client_cert)?;
            watch_cert(
                &mut tasks,
                peers.client_cert.clone(),
                cert.clone(),
                config.cert_reload_interval,
            );
            let peers = Arc::new(peers::Peers::new(
                peers.clone(),
                config.replica.id.clone(),
                cert,
            )?);
            peers.watch(client.clone(), &mut tasks);
            Some(peers)
        }
        None => None,
    };
    let (changed_tx, mut changed_rx) = tokio::sync::mpsc::unbounded_channel();
    let trust =
        Trust::start(client, changed_tx, &mut tasks).with_verdict_cache(config.verdict_cache_size);
    let shared = Arc::new(Shared {
        agent_tls: without_resumption(buildplane_pki::agent_listener_config(agent_cert)?),
        handshakes: Arc::new(Semaphore::new(config.max_concurrent_handshakes.max(1))),
        idle: hello::IdleGate::new(
            config.max_idle_per_source,
            config.max_concurrent_handshakes.max(1).saturating_mul(4),
        ),
        config: config.clone(),
        trust,
        registry: Registry::default(),
        metrics: Metrics::default(),
        plane_rates: config
            .plane_rate
            .map(|rate| rate::PlaneRates::new(rate, rate::DEFAULT_CAPACITY)),
        ready: AtomicBool::new(false),
        draining: Arc::new(AtomicBool::new(false)),
        internal_connections: tokio_util::task::TaskTracker::new(),
        drain_started: CancellationToken::new(),
        started: tokio::time::Instant::now(),
        shutdown: shutdown.clone(),
        peers,
    });

    // Trust changes: re-verify the connections of the planes they affect, coalescing bursts,
    // on a blocking thread (a plane of thousands of connections is thousands of signature
    // checks).
    let revalidator = shared.clone();
    tasks.spawn("trust revalidation", async move {
        while let Some(first) = changed_rx.recv().await {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let mut change = first;
            while let Ok(more) = changed_rx.try_recv() {
                change = change.merge(more);
            }
            let shared = revalidator.clone();
            let pass = tokio::task::spawn_blocking(move || revalidate_scope(&shared, &change));
            match pass.await {
                Ok((granted, revoked)) if granted + revoked > 0 => {
                    info!(granted, revoked, "authorisations changed");
                }
                Ok(_) => {}
                Err(err) => return Err(anyhow::anyhow!("revalidation pass failed: {err}")),
            }
        }
        Ok(())
    });

    let health = TcpListener::bind(config.health_listen)
        .await
        .with_context(|| format!("binding {}", config.health_listen))?;
    let health_addr = health.local_addr()?;
    tasks.spawn("health listener", metrics::serve(health, shared.clone()));

    // One waiter on the stores (a second concurrent waiter has been seen to miss the wake-up);
    // start() waits for it through a watch channel, up to 30 s, then serves anyway (readyz
    // stays 503 until the stores sync).
    let (synced_tx, mut synced_rx) = tokio::sync::watch::channel(false);
    let ready = shared.clone();
    spawn_until(&shutdown, async move {
        ready.trust.ready().await;
        ready.ready.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = synced_tx.send(true);
        info!("trust sources synced");
    });
    let _ = tokio::time::timeout(
        Duration::from_secs(30),
        synced_rx.wait_for(|synced| *synced),
    )
    .await;

    let agents = bind_agent_listener(config.agent_listen)
        .with_context(|| format!("binding {}", config.agent_listen))?;
    let agent_addr = agents.local_addr()?;
    tasks.spawn("agent listener", agents::serve(agents, shared.clone()));

    let internal = TcpListener::bind(config.internal_listen)
        .await
        .with_context(|| format!("binding {}", config.internal_listen))?;
    let internal_addr = internal.local_addr()?;
    tasks.spawn(
        "internal listener",
        internal_listener::serve(internal, shared.clone(), internal_tls),
    );
    info!(%agent_addr, %internal_addr, %health_addr, "cluster gateway listening");
    Ok(RunningGateway {
        shared,
        agent_addr,
        internal_addr,
        health_addr,
        tasks,
    })
}

impl RunningGateway {
    /// Waits for `signal`; returns early with the reason when a long-lived task ends first (a
    /// panic, an error, a listener that stopped).
    pub async fn run_until(
        &mut self,
        signal: impl std::future::Future<Output = ()>,
    ) -> Result<(), TaskEnded> {
        self.tasks.run_until(signal).await
    }

    /// Stops the gateway: closes agent connections (staggered over `stagger`), then every
    /// listener and task; the ports are free when this returns.
    pub async fn shutdown(self, stagger: Duration) -> Result<(), TaskEnded> {
        // The internal API's callers get their answers while the agents drain.
        let internal = self.shared.internal_connections.clone();
        internal.close();
        let deadline = self.shared.config.drain_timeout + Duration::from_secs(1);
        let ((), internal_closed) = tokio::join!(
            drain(&self.shared, stagger),
            tokio::time::timeout(deadline, internal.wait()),
        );
        match internal_closed {
            Ok(()) => debug!("internal API connections closed"),
            Err(_) => warn!("internal API connections still open after the drain timeout"),
        }
        self.shared.shutdown.cancel();
        self.tasks.shutdown(Duration::from_secs(1)).await
    }
}

/// How long a young replica of several holds a request for a plane none of whose agents has
/// connected to it yet: its agents reconnect within their backoff after a restart.
pub const WARM_UP: Duration = Duration::from_secs(10);

impl Shared {
    /// Whether the trust sources have synced and the gateway is not draining (`/readyz`: a
    /// draining replica leaves its Service's endpoints, so callers go to the others).
    pub fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::SeqCst) && !self.is_leaving()
    }

    /// Whether this replica has started leaving (the shutdown delay or the drain): it takes no
    /// new agent connection.
    pub fn is_leaving(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Reports not ready from now on (the start of a shutdown) and takes no new agent
    /// connection; live connections and the internal API serve as before until the drain.
    pub fn not_ready(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// While this replica (one of several) is younger than [`WARM_UP`]: how long a request
    /// may wait, at most `within`, for a plane's agent to reach it (its agents are
    /// reconnecting). `None` for a single replica or one past its warm-up.
    pub fn warm_up_deadline(&self, within: Duration) -> Option<tokio::time::Instant> {
        let now = tokio::time::Instant::now();
        let warm_until = self.started + WARM_UP;
        (self.config.replica.count > 1 && now < warm_until).then(|| warm_until.min(now + within))
    }
}

/// Connections waiting for a handshake slot queue in the kernel (see `agents::serve`); the
/// queue is as long as the system allows (`net.core.somaxconn` caps it, 4096 on current
/// kernels), not the 1024 of `TcpListener::bind`, so a reconnect storm waits instead of
/// having its SYNs dropped and retried a second later.
const AGENT_ACCEPT_BACKLOG: u32 = 4096;

fn bind_agent_listener(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restarted gateway rebinds while old sockets sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(AGENT_ACCEPT_BACKLOG)
}

/// Gives a long-lived loop the output `()` that supervision expects (an `async` block whose
/// `loop` never breaks would otherwise have the output `!`).
pub(crate) fn looping(
    task: impl std::future::Future<Output = ()> + Send + 'static,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    task
}
