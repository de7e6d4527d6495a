//! Gateway metrics and the plain health listener.

use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use parking_lot::Mutex;
use tokio::net::TcpListener;

use crate::Shared;

/// Counters exported at `/metrics` in the Prometheus text format.
#[derive(Clone, Default)]
pub struct Metrics {
    admissions: Arc<AtomicU64>,
    rejections: Arc<Mutex<std::collections::BTreeMap<&'static str, u64>>>,
    proxied: Arc<AtomicU64>,
    proxy_micros: Arc<AtomicU64>,
}

impl Metrics {
    /// An agent was admitted.
    pub fn admitted(&self) {
        self.admissions.fetch_add(1, Ordering::Relaxed);
    }

    /// An agent was rejected for `reason`.
    pub fn rejected(&self, reason: &'static str) {
        *self.rejections.lock().entry(reason).or_insert(0) += 1;
    }

    /// A proxied request got its response head after `elapsed`.
    pub fn proxied(&self, elapsed: Duration) {
        self.proxied.fetch_add(1, Ordering::Relaxed);
        self.proxy_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, shared: &Shared) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# TYPE cluster_gateway_admissions_total counter\ncluster_gateway_admissions_total {}",
            self.admissions.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# TYPE cluster_gateway_rejections_total counter");
        for (reason, n) in self.rejections.lock().iter() {
            let _ = writeln!(
                out,
                "cluster_gateway_rejections_total{{reason=\"{reason}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# TYPE cluster_gateway_proxied_requests_total counter\ncluster_gateway_proxied_requests_total {}",
            self.proxied.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE cluster_gateway_proxy_head_seconds_sum counter\ncluster_gateway_proxy_head_seconds_sum {}",
            self.proxy_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let connections = shared.registry.all();
        let _ = writeln!(
            out,
            "# TYPE cluster_gateway_connections gauge\ncluster_gateway_connections {}",
            connections.len()
        );
        let pending: usize = connections
            .iter()
            .map(|c| c.pending.lock().len() + c.pending_v1.lock().len())
            .sum();
        let _ = writeln!(
            out,
            "# TYPE cluster_gateway_pending_requests gauge\ncluster_gateway_pending_requests {pending}"
        );
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
            get(|State(shared): State<Arc<Shared>>| async move { shared.metrics.render(&shared) }),
        )
        .with_state(shared);
    let _ = axum::serve(listener, app).await;
}
