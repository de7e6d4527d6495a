//! Gateway metrics (Prometheus text format via `prometheus-client`) and the plain health listener.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::net::TcpListener;

use crate::Shared;

type Labels = Vec<(String, String)>;

/// The gateway's metrics. Cheap to clone (shared handles).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<parking_lot::Mutex<Registry>>,
    admissions: Counter,
    rejections: Family<Labels, Counter>,
    handshake_seconds: Histogram,
    proxied: Counter,
    proxy_failures: Family<Labels, Counter>,
    request_seconds: Histogram,
    pending: Gauge,
    connections: Family<Labels, Gauge>,
    silent_connections: Family<Labels, Gauge>,
    forwarded: Family<Labels, Counter>,
    peers: Gauge,
    cached_secrets: Gauge,
    replaced: Counter,
    replaced_seen: Arc<AtomicU64>,
    reverified: Counter,
    ignored: Counter,
    verdict_hits: Counter,
    verdict_misses: Counter,
    verdicts_seen: Arc<parking_lot::Mutex<(u64, u64)>>,
    verdict_entries: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("cluster_gateway");
        let admissions = Counter::default();
        registry.register(
            "admissions",
            "Agent connections admitted",
            admissions.clone(),
        );
        let rejections = Family::<Labels, Counter>::default();
        registry.register(
            "rejections",
            "Agent connections refused, by reason",
            rejections.clone(),
        );
        let handshake_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register(
            "handshake_seconds",
            "TLS handshake, WebSocket upgrade and admission of one agent connection",
            handshake_seconds.clone(),
        );
        let proxied = Counter::default();
        registry.register(
            "proxied_requests",
            "Proxied requests answered by an agent",
            proxied.clone(),
        );
        let proxy_failures = Family::<Labels, Counter>::default();
        registry.register(
            "proxy_failures",
            "Proxied requests that failed at the agent or its connection, or were refused by a planeID rate limit (plane_rate_limited), by reason",
            proxy_failures.clone(),
        );
        let request_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "request_seconds",
            "Time from a proxied request to the agent's response head",
            request_seconds.clone(),
        );
        let pending = Gauge::default();
        registry.register(
            "pending_requests",
            "Proxied requests waiting for their response head",
            pending.clone(),
        );
        let connections = Family::<Labels, Gauge>::default();
        registry.register(
            "connections",
            "Live agent connections by planeID",
            connections.clone(),
        );
        let silent_connections = Family::<Labels, Gauge>::default();
        registry.register(
            "silent_connections",
            "Agent connections by planeID that left a probe unanswered past the liveness timeout (no request goes there until the agent is heard again)",
            silent_connections.clone(),
        );
        let forwarded = Family::<Labels, Counter>::default();
        registry.register(
            "forwarded_requests",
            "Proxied requests this replica forwarded to a sibling replica because none of its own connections could take them, by outcome",
            forwarded.clone(),
        );
        let peers = Gauge::default();
        registry.register(
            "peers",
            "Sibling replicas known from the gateway Service's EndpointSlices",
            peers.clone(),
        );
        let cached_secrets = Gauge::default();
        registry.register(
            "cached_secrets",
            "Secrets whose data the gateway holds: those a CR's clientCA.secretRef names",
            cached_secrets.clone(),
        );
        let replaced = Counter::default();
        registry.register(
            "replaced_connections",
            "Connections replaced by a newer connection of the same agent",
            replaced.clone(),
        );
        let reverified = Counter::default();
        registry.register(
            "reverified_connections",
            "Connections re-verified after a change of CRs or Secrets",
            reverified.clone(),
        );
        let ignored = Counter::default();
        registry.register(
            "ignored_messages",
            "Tunnel messages from agents that were ignored (undecodable, too large, or a kind this gateway does not serve); the connection stays",
            ignored.clone(),
        );
        let verdict_hits = Counter::default();
        registry.register(
            "verdict_cache_hits",
            "Chain verifications answered from the verdict cache (same chain, same clientCA bundle, no certificate past a validity boundary since)",
            verdict_hits.clone(),
        );
        let verdict_misses = Counter::default();
        registry.register(
            "verdict_cache_misses",
            "Chain verifications that ran (not in the verdict cache)",
            verdict_misses.clone(),
        );
        let verdict_entries = Gauge::default();
        registry.register(
            "verdict_cache_entries",
            "Verdicts held by the verdict cache",
            verdict_entries.clone(),
        );
        Self {
            registry: Arc::new(parking_lot::Mutex::new(registry)),
            admissions,
            rejections,
            handshake_seconds,
            proxied,
            proxy_failures,
            request_seconds,
            pending,
            connections,
            silent_connections,
            forwarded,
            peers,
            cached_secrets,
            replaced,
            replaced_seen: Arc::default(),
            reverified,
            ignored,
            verdict_hits,
            verdict_misses,
            verdicts_seen: Arc::default(),
            verdict_entries,
        }
    }
}

/// Decrements the pending gauge when dropped.
pub struct PendingGuard(Gauge);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    /// A live connection was verified again after a trust change.
    pub fn reverified(&self) {
        self.reverified.inc();
    }

    /// A tunnel message from an agent was ignored.
    pub fn ignored(&self) {
        self.ignored.inc();
    }

    /// An agent was admitted after `handshake` (TLS + upgrade + admission).
    pub fn admitted(&self) {
        self.admissions.inc();
    }

    /// Time spent from accept to admission.
    pub fn handshake(&self, elapsed: Duration) {
        self.handshake_seconds.observe(elapsed.as_secs_f64());
    }

    /// An agent was rejected for `reason`.
    pub fn rejected(&self, reason: &'static str) {
        self.rejections
            .get_or_create(&vec![("reason".into(), reason.into())])
            .inc();
    }

    /// A proxied request got its response head after `elapsed`.
    pub fn proxied(&self, elapsed: Duration) {
        self.proxied.inc();
        self.request_seconds.observe(elapsed.as_secs_f64());
    }

    /// A proxied request failed at the agent side for `reason`.
    pub fn proxy_failed(&self, reason: &'static str) {
        self.proxy_failures
            .get_or_create(&vec![("reason".into(), reason.into())])
            .inc();
    }

    /// A request was forwarded to a sibling replica (`outcome`: `answered`, `unreachable`,
    /// `no_sibling`).
    pub fn forwarded(&self, outcome: &'static str) {
        self.forwarded
            .get_or_create(&vec![("outcome".into(), outcome.into())])
            .inc();
    }

    /// Counts a request as pending until the guard drops.
    pub fn pending_guard(&self) -> PendingGuard {
        self.pending.inc();
        PendingGuard(self.pending.clone())
    }

    /// Renders every metric, refreshing the gauges derived from the registry first.
    pub fn render(&self, shared: &Shared) -> String {
        self.connections.clear();
        for (plane, n) in shared.registry.by_plane() {
            self.connections
                .get_or_create(&vec![("plane_id".into(), plane)])
                .set(n as i64);
        }
        self.silent_connections.clear();
        for (plane, n) in shared.registry.silent_by_plane() {
            self.silent_connections
                .get_or_create(&vec![("plane_id".into(), plane)])
                .set(n as i64);
        }
        self.peers
            .set(shared.peers.as_ref().map_or(0, |p| p.len()) as i64);
        self.cached_secrets
            .set(shared.trust.cached_secrets() as i64);
        let total = shared.registry.replaced_total();
        let seen = self.replaced_seen.swap(total, Ordering::Relaxed);
        self.replaced.inc_by(total.saturating_sub(seen));
        let verdicts = shared.trust.verdict_stats();
        {
            let mut seen = self.verdicts_seen.lock();
            self.verdict_hits
                .inc_by(verdicts.hits.saturating_sub(seen.0));
            self.verdict_misses
                .inc_by(verdicts.misses.saturating_sub(seen.1));
            *seen = (verdicts.hits, verdicts.misses);
        }
        self.verdict_entries.set(verdicts.entries as i64);
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry.lock());
        out
    }
}

/// Serves `/healthz`, `/readyz` and `/metrics`.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(shared): State<Arc<Shared>>| async move {
                if shared.is_ready() {
                    (StatusCode::OK, "ok")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "trust sources not synced")
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(shared): State<Arc<Shared>>| async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    shared.metrics.render(&shared),
                )
                    .into_response()
            }),
        )
        .with_state(shared);
    let _ = axum::serve(listener, app).await;
}
