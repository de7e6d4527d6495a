//! The controller's view of the cluster gateway: an mTLS client for `notify`, and a table of
//! connected agents per CR fed by the gateway's `/api/v1/events` stream.
//!
//! The table debounces drops to zero: when the last agent of a CR disconnects, the CR keeps its
//! count for [`ConnectionTable::grace`] so that an agent reconnecting (or HA agents restarting one
//! by one) does not flap the status to "disconnected" (OpenChoreo #2225). A drop that lasts longer
//! is reported once the grace period ends.

use std::{collections::HashMap, path::Path, sync::Arc, time::Duration};

use buildplane_api::CrKey;
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use parking_lot::Mutex;
use serde::Serialize;
use thiserror::Error;
use tokio::{sync::mpsc, time::Instant};

use crate::status::AgentView;

/// How long the event stream may stay silent (the gateway's keepalive is every 15 s).
pub const EVENT_STREAM_IDLE: Duration = Duration::from_secs(45);

/// Failures talking to the gateway.
#[derive(Debug, Error)]
pub enum GatewayError {
    /// The gateway could not be reached, timed out, or answered 5xx/429: retry.
    #[error("cluster gateway unavailable: {0}")]
    Transient(String),
    /// The gateway rejected the request (4xx other than 429): retrying will not help.
    #[error("cluster gateway rejected the request: {0}")]
    Permanent(String),
    /// The client could not be configured (certificate files).
    #[error("cluster gateway client configuration: {0}")]
    Config(String),
}

/// The body of `POST /api/v1/planes/notify`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Notify<'a> {
    plane_type: &'a str,
    #[serde(rename = "planeID")]
    plane_id: &'a str,
    event: &'a str,
    namespace: &'a str,
    name: &'a str,
}

pub use buildplane_api::events::{GatewayEvent, GatewayEventKind};

/// An mTLS client of the gateway's internal API.
#[derive(Clone)]
pub struct GatewayClient {
    http: reqwest::Client,
    streaming: reqwest::Client,
    base_url: String,
}

impl GatewayClient {
    /// Builds a client presenting `cert`/`key` and trusting `ca` (all PEM files).
    pub fn from_files(
        base_url: &str,
        cert: &Path,
        key: &Path,
        ca: &Path,
    ) -> Result<Self, GatewayError> {
        let read = |path: &Path| {
            std::fs::read(path)
                .map_err(|err| GatewayError::Config(format!("reading {}: {err}", path.display())))
        };
        let mut identity_pem = read(cert)?;
        identity_pem.push(b'\n');
        identity_pem.extend(read(key)?);
        Self::from_pem(base_url, &identity_pem, &read(ca)?)
    }

    /// Builds a client from an identity PEM (certificate chain followed by key) and a CA PEM.
    pub fn from_pem(
        base_url: &str,
        identity_pem: &[u8],
        ca_pem: &[u8],
    ) -> Result<Self, GatewayError> {
        let config_error = |err: reqwest::Error| GatewayError::Config(err.to_string());
        let builder = || {
            buildplane_runtime::internal_api_client(ca_pem, identity_pem)
                .map(|builder| builder.connect_timeout(Duration::from_secs(5)))
                .map_err(|err| GatewayError::Config(err.to_string()))
        };
        Ok(Self {
            http: builder()?
                .timeout(Duration::from_secs(10))
                .build()
                .map_err(config_error)?,
            streaming: builder()?.build().map_err(config_error)?,
            base_url: base_url.trim_end_matches('/').to_owned(),
        })
    }

    /// Tells the gateway that a CR was created, updated or deleted.
    pub async fn notify(
        &self,
        plane_id: &str,
        event: &str,
        cr: &CrKey,
    ) -> Result<(), GatewayError> {
        let body = Notify {
            plane_type: buildplane_api::names::PLANE_TYPE,
            plane_id,
            event,
            namespace: cr.namespace.as_deref().unwrap_or(""),
            name: &cr.name,
        };
        let res = self
            .http
            .post(format!("{}/api/v1/planes/notify", self.base_url))
            .json(&body)
            .send()
            .await
            .map_err(|err| GatewayError::Transient(err.to_string()))?;
        let status = res.status();
        if status.is_success() {
            return Ok(());
        }
        let text = res.text().await.unwrap_or_default();
        let message = format!("notify {event} for {cr}: HTTP {status}: {text}");
        if status.is_server_error() || status.as_u16() == 429 {
            Err(GatewayError::Transient(message))
        } else {
            Err(GatewayError::Permanent(message))
        }
    }

    /// Opens the event stream; yields one parsed event per line.
    pub async fn events(
        &self,
    ) -> Result<impl futures::Stream<Item = Result<GatewayEvent, GatewayError>> + use<>, GatewayError>
    {
        let res = self
            .streaming
            .get(format!("{}/api/v1/events", self.base_url))
            .send()
            .await
            .map_err(|err| GatewayError::Transient(err.to_string()))?;
        if !res.status().is_success() {
            return Err(GatewayError::Transient(format!(
                "events: HTTP {}",
                res.status()
            )));
        }
        let mut bytes = res.bytes_stream();
        Ok(async_stream_lines(
            move |tx: mpsc::Sender<Result<GatewayEvent, GatewayError>>| async move {
                let mut lines = buildplane_runtime::LineBuffer::new();
                loop {
                    // The gateway writes a keepalive line every 15 s; silence for longer means a
                    // dead peer that TCP has not noticed.
                    let chunk = match tokio::time::timeout(EVENT_STREAM_IDLE, bytes.next()).await {
                        Ok(Some(chunk)) => chunk,
                        Ok(None) => break,
                        Err(_) => {
                            let _ = tx
                                .send(Err(GatewayError::Transient(format!(
                                    "no event or keepalive for {EVENT_STREAM_IDLE:?}"
                                ))))
                                .await;
                            return;
                        }
                    };
                    let chunk = match chunk {
                        Ok(chunk) => chunk,
                        Err(err) => {
                            let _ = tx.send(Err(GatewayError::Transient(err.to_string()))).await;
                            return;
                        }
                    };
                    lines.push(&chunk);
                    while let Some(line) = lines.next_line() {
                        if line.iter().all(u8::is_ascii_whitespace) {
                            continue;
                        }
                        let event = serde_json::from_slice::<GatewayEvent>(&line).map_err(|err| {
                            GatewayError::Permanent(format!("malformed gateway event: {err}"))
                        });
                        if tx.send(event).await.is_err() {
                            return;
                        }
                    }
                }
                let _ = tx
                    .send(Err(GatewayError::Transient("event stream ended".into())))
                    .await;
            },
        ))
    }
}

/// Runs a producer task and exposes what it sends as a stream.
fn async_stream_lines<T, F, Fut>(producer: F) -> tokio_stream::wrappers::ReceiverStream<T>
where
    T: Send + 'static,
    F: FnOnce(mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(producer(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[derive(Debug, Clone, Default)]
struct CrEntry {
    /// What the gateway reported last.
    reported: u32,
    /// What the status shows (lags `reported` only during a drop to zero).
    shown: u32,
    /// When the reported count dropped to zero while `shown` was not.
    zero_since: Option<Instant>,
    last_seen: Option<Timestamp>,
}

/// How far the table can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Sync {
    /// No snapshot yet since the process started: statuses keep what they show (a restarted
    /// controller must not churn them while it connects).
    #[default]
    AwaitSnapshot,
    /// Following the stream.
    Following,
    /// The gateway has been unreachable for a while (or is not configured).
    Lost,
}

#[derive(Debug, Default)]
struct TableState {
    sync: Sync,
    entries: HashMap<CrKey, CrEntry>,
}

/// Connected agents per CR, as reported by the gateway, debounced.
#[derive(Debug, Clone)]
pub struct ConnectionTable {
    state: Arc<Mutex<TableState>>,
    grace: Duration,
}

impl ConnectionTable {
    /// An empty, unsynced table with the given grace period for drops to zero.
    pub fn new(grace: Duration) -> Self {
        Self {
            state: Arc::default(),
            grace,
        }
    }

    /// The grace period for drops to zero.
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// The view of one CR for its status.
    pub fn view(&self, cr: &CrKey) -> AgentView {
        let mut state = self.state.lock();
        match state.sync {
            Sync::AwaitSnapshot => return AgentView::Pending,
            Sync::Lost => return AgentView::Unknown,
            Sync::Following => {}
        }
        let grace = self.grace;
        let entry = state.entries.entry(cr.clone()).or_default();
        if let Some(since) = entry.zero_since
            && since.elapsed() >= grace
        {
            entry.shown = entry.reported;
            entry.zero_since = None;
        }
        AgentView::Known {
            connected_agents: entry.shown,
            last_seen: entry.last_seen,
        }
    }

    /// Marks the table unknown (the gateway is unreachable, or not configured).
    pub fn mark_unsynced(&self) {
        self.state.lock().sync = Sync::Lost;
    }

    /// Whether the gateway is marked unreachable.
    pub fn is_lost(&self) -> bool {
        self.state.lock().sync == Sync::Lost
    }

    /// Applies one event; returns the CRs whose view changed now, and those whose view may change
    /// once the grace period ends.
    pub fn apply(&self, event: &GatewayEvent) -> (Vec<CrKey>, Vec<CrKey>) {
        let mut state = self.state.lock();
        let now = Instant::now();
        let mut changed = Vec::new();
        let mut deferred = Vec::new();
        let mut counts: HashMap<CrKey, u32> = event
            .connected_agents_by_cr
            .iter()
            .filter_map(|(key, n)| {
                CrKey::parse(key).map(|key| (key, u32::try_from(*n).unwrap_or(u32::MAX)))
            })
            .collect();
        for key in event.crs.iter().filter_map(|key| CrKey::parse(key)) {
            counts.entry(key).or_insert(0);
        }
        let was_following = state.sync == Sync::Following;
        let snapshot = event.kind == GatewayEventKind::Snapshot;
        if snapshot {
            // A snapshot lists every CR with connections: every other CR has none.
            for (key, entry) in state.entries.iter() {
                if !counts.contains_key(key) && entry.reported > 0 {
                    deferred.push(key.clone());
                }
            }
            for key in &deferred {
                counts.insert(key.clone(), 0);
            }
            deferred.clear();
            state.sync = Sync::Following;
        }
        for (key, n) in counts {
            let entry = state.entries.entry(key.clone()).or_default();
            entry.reported = n;
            if n > 0 {
                // A snapshot's time is when it was taken, not when an agent was heard from:
                // using it would rewrite every status on each controller restart.
                if !snapshot {
                    entry.last_seen = event.time.parse().ok().or(entry.last_seen);
                }
                entry.zero_since = None;
                if entry.shown != n {
                    entry.shown = n;
                    changed.push(key);
                }
            } else if entry.shown > 0 && event.kind == GatewayEventKind::Revoked {
                // A revocation is deliberate (CR deleted or CA changed): no grace period.
                entry.shown = 0;
                entry.zero_since = None;
                changed.push(key);
            } else if entry.shown > 0 {
                entry.zero_since.get_or_insert(now);
                deferred.push(key);
            } else if !was_following {
                changed.push(key);
            }
        }
        (changed, deferred)
    }

    /// Every CR with an entry.
    pub fn known_crs(&self) -> Vec<CrKey> {
        self.state.lock().entries.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, counts: &[(&str, u32)]) -> GatewayEvent {
        GatewayEvent {
            kind: serde_json::from_value(serde_json::json!(kind)).expect("a kind"),
            time: String::new(),
            plane_type: "buildplane".into(),
            plane_id: String::new(),
            connection_id: 0,
            connected_agents_by_cr: counts
                .iter()
                .map(|(k, n)| ((*k).to_owned(), *n as usize))
                .collect(),
            crs: counts.iter().map(|(k, _)| (*k).to_owned()).collect(),
        }
    }

    fn agents(table: &ConnectionTable, key: &str) -> u32 {
        match table.view(&CrKey::parse(key).expect("key")) {
            AgentView::Known {
                connected_agents, ..
            } => connected_agents,
            AgentView::Pending | AgentView::Unknown => panic!("table should be synced"),
        }
    }

    /// Before the first snapshot the view is pending (statuses keep what they show), not
    /// "disconnected"; once the gateway is lost it is unknown.
    #[tokio::test(start_paused = true)]
    async fn unsynced_table_is_pending_then_lost_is_unknown() {
        let table = ConnectionTable::new(Duration::from_secs(2));
        assert_eq!(
            table.view(&CrKey::namespaced("org", "bp")),
            AgentView::Pending
        );
        table.apply(&event("snapshot", &[]));
        assert_eq!(agents(&table, "org/bp"), 0);
        table.mark_unsynced();
        assert!(table.is_lost());
        assert_eq!(
            table.view(&CrKey::namespaced("org", "bp")),
            AgentView::Unknown
        );
        table.apply(&event("snapshot", &[("org/bp", 1)]));
        assert_eq!(agents(&table, "org/bp"), 1, "a new snapshot follows again");
    }

    /// An agent reconnecting within the grace period never shows as disconnected (#2225).
    #[tokio::test(start_paused = true)]
    async fn reconnect_within_grace_does_not_flap() {
        let table = ConnectionTable::new(Duration::from_secs(2));
        table.apply(&event("snapshot", &[("org/bp", 1)]));
        assert_eq!(agents(&table, "org/bp"), 1);
        let (changed, deferred) = table.apply(&event("disconnected", &[("org/bp", 0)]));
        assert!(changed.is_empty());
        assert_eq!(deferred, vec![CrKey::namespaced("org", "bp")]);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(agents(&table, "org/bp"), 1, "still inside the grace period");
        table.apply(&event("connected", &[("org/bp", 1)]));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(agents(&table, "org/bp"), 1, "the agent came back: no flap");
    }

    /// A drop that outlasts the grace period is reported.
    #[tokio::test(start_paused = true)]
    async fn lasting_drop_is_reported_after_grace() {
        let table = ConnectionTable::new(Duration::from_secs(2));
        table.apply(&event("snapshot", &[("org/bp", 2)]));
        table.apply(&event("disconnected", &[("org/bp", 1)]));
        assert_eq!(
            agents(&table, "org/bp"),
            1,
            "HA: one of two left, shown at once"
        );
        table.apply(&event("disconnected", &[("org/bp", 0)]));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(agents(&table, "org/bp"), 0);
    }

    /// A revocation is shown at once: a re-created CR must not inherit a debounced count.
    #[tokio::test(start_paused = true)]
    async fn revocation_skips_the_grace_period() {
        let table = ConnectionTable::new(Duration::from_secs(2));
        table.apply(&event("snapshot", &[("org/bp", 1)]));
        let (changed, _) = table.apply(&event("revoked", &[("org/bp", 0)]));
        assert_eq!(changed, vec![CrKey::namespaced("org", "bp")]);
        assert_eq!(agents(&table, "org/bp"), 0);
    }

    /// A snapshot that omits a CR means that CR has no agents any more.
    #[tokio::test(start_paused = true)]
    async fn snapshot_clears_missing_crs() {
        let table = ConnectionTable::new(Duration::from_secs(2));
        table.apply(&event("snapshot", &[("org/bp", 1), ("/shared", 1)]));
        table.apply(&event("snapshot", &[("/shared", 1)]));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(agents(&table, "org/bp"), 0);
        assert_eq!(agents(&table, "/shared"), 1);
    }
}
