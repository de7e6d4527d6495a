//! Leader election with a `coordination.k8s.io/v1` Lease, so two replicas can run safely: only
//! the holder reconciles; a standby takes over once the holder stops renewing.
//!
//! Timing follows client-go's `leaderelection`, so two replicas never lead at once as long as
//! their clocks run at about the same rate (their readings may differ by any amount):
//! - A standby judges expiry by its own clock: the lease expires a lease duration after the
//!   standby first observed the current record (its resourceVersion), never by comparing the
//!   holder's `renewTime` with the local time.
//! - The holder stops leading when it could not renew within the renew deadline (shorter than
//!   the lease duration), counted from the start of its last successful renewal: it stops before
//!   any standby can have seen its lease expire.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use tokio::time::Instant;
use tracing::{debug, info};

/// Lease timing.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (pod name).
    pub identity: String,
    /// How long a standby waits, after it last saw the record change, before taking over.
    pub duration: Duration,
    /// How long the holder keeps leading without a successful renewal (shorter than
    /// `duration`: the difference absorbs clock rate differences and request latency).
    pub renew_deadline: Duration,
    /// How often the holder renews (and a standby retries); shorter than `renew_deadline`.
    pub renew_every: Duration,
}

impl LeaseConfig {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry period.
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        identity: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            renew_every: Duration::from_secs(2),
        }
    }

    /// Checks `renew_every < renew_deadline < duration`.
    pub fn validate(&self) -> Result<(), String> {
        if self.renew_deadline >= self.duration {
            return Err(format!(
                "the renew deadline ({:?}) must be shorter than the lease duration ({:?})",
                self.renew_deadline, self.duration
            ));
        }
        if self.renew_every >= self.renew_deadline {
            return Err(format!(
                "the retry period ({:?}) must be shorter than the renew deadline ({:?})",
                self.renew_every, self.renew_deadline
            ));
        }
        Ok(())
    }
}

/// Whether this replica holds the lease after one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// This replica holds the lease.
    Held,
    /// Another replica holds a valid lease.
    HeldByOther,
}

/// The record last observed, and when (client-go's `observedRecord` and `observedTime`).
#[derive(Debug, Clone)]
struct Observed {
    resource_version: Option<String>,
    at: Instant,
}

/// One replica's side of the election.
#[derive(Debug)]
pub struct Elector {
    config: LeaseConfig,
    observed: Option<Observed>,
    /// When the last successful acquisition or renewal started.
    renewed: Option<Instant>,
}

impl Elector {
    /// An elector that has observed nothing yet.
    pub fn new(config: LeaseConfig) -> Self {
        Self {
            config,
            observed: None,
            renewed: None,
        }
    }

    /// The settings.
    pub fn config(&self) -> &LeaseConfig {
        &self.config
    }

    /// Tries once to acquire or renew the lease.
    pub async fn try_acquire_or_renew(&mut self, client: &Client) -> Result<Attempt, kube::Error> {
        let started = Instant::now();
        let config = &self.config;
        let api: Api<Lease> = Api::namespaced(client.clone(), &config.namespace);
        let now = Timestamp::now();
        let duration_seconds = i32::try_from(config.duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = api.get_opt(&config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(config.name.clone()),
                    namespace: Some(config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(config.identity.clone()),
                    lease_duration_seconds: Some(duration_seconds),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(created) => Ok(self.won(&created, started)),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(Attempt::HeldByOther),
                Err(err) => Err(err),
            };
        };
        // Observed time, not the holder's renewTime, decides expiry: the holder's clock may
        // differ from ours by any amount.
        let resource_version = lease.metadata.resource_version.clone();
        if self
            .observed
            .as_ref()
            .is_none_or(|o| o.resource_version != resource_version)
        {
            self.observed = Some(Observed {
                resource_version,
                at: started,
            });
        }
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        if holder != config.identity && !holder.is_empty() {
            let valid_for = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(config.duration, Duration::from_secs);
            let observed_at = self.observed.as_ref().map_or(started, |o| o.at);
            if started < observed_at + valid_for {
                debug!(%holder, "lease held by another replica");
                return Ok(Attempt::HeldByOther);
            }
        }
        if holder != config.identity {
            info!(previous = %holder, "taking over the leader lease");
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(config.identity.clone());
        spec.lease_duration_seconds = Some(duration_seconds);
        spec.renew_time = Some(MicroTime(now));
        // `replace` carries the resourceVersion we read: a racing replica gets 409 and stays
        // standby.
        match api
            .replace(&config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(replaced) => Ok(self.won(&replaced, started)),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(Attempt::HeldByOther),
            Err(err) => Err(err),
        }
    }

    fn won(&mut self, lease: &Lease, started: Instant) -> Attempt {
        self.observed = Some(Observed {
            resource_version: lease.metadata.resource_version.clone(),
            at: started,
        });
        self.renewed = Some(started);
        Attempt::Held
    }

    /// Waits until this replica holds the lease.
    pub async fn acquire(&mut self, client: &Client) {
        loop {
            let limit = self.config.renew_deadline;
            match tokio::time::timeout(limit, self.try_acquire_or_renew(client)).await {
                Ok(Ok(Attempt::Held)) => {
                    info!(identity = %self.config.identity, "acquired the leader lease");
                    return;
                }
                Ok(Ok(Attempt::HeldByOther)) => {}
                Ok(Err(err)) => debug!(%err, "leader election attempt failed"),
                Err(_) => debug!("leader election attempt timed out"),
            }
            tokio::time::sleep(self.config.renew_every).await;
        }
    }

    /// Renews the lease every `renew_every` and returns when it could not renew within
    /// `renew_deadline` of the start of the last successful renewal, or another replica holds
    /// it (the caller must stop reconciling then: a standby may take over).
    pub async fn hold(&mut self, client: &Client) {
        let mut renewed = self.renewed.unwrap_or_else(Instant::now);
        loop {
            let deadline = renewed + self.config.renew_deadline;
            tokio::time::sleep_until((Instant::now() + self.config.renew_every).min(deadline))
                .await;
            let started = Instant::now();
            match tokio::time::timeout_at(deadline, self.try_acquire_or_renew(client)).await {
                Ok(Ok(Attempt::Held)) => renewed = started,
                Ok(Ok(Attempt::HeldByOther)) => {
                    info!("leader lease taken by another replica");
                    return;
                }
                Ok(Err(err)) => debug!(%err, "lease renewal failed"),
                Err(_) => debug!("lease renewal timed out"),
            }
            if Instant::now() >= renewed + self.config.renew_deadline {
                info!(
                    renew_deadline = ?self.config.renew_deadline,
                    "could not renew the leader lease within the renew deadline"
                );
                return;
            }
        }
    }

    /// Gives the lease up (empty holder), so a standby takes over without waiting for expiry.
    pub async fn release(&mut self, client: &Client) -> Result<(), kube::Error> {
        let config = &self.config;
        let api: Api<Lease> = Api::namespaced(client.clone(), &config.namespace);
        let Some(mut lease) = api.get_opt(&config.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        api.replace(&config.name, &PostParams::default(), &lease)
            .await?;
        self.renewed = None;
        info!(identity = %config.identity, "released the leader lease");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    };

    use kube::client::Body;
    use parking_lot::Mutex;
    use tokio::time::Instant;

    use k8s_openapi::jiff::SignedDuration;

    use super::*;

    const NS: &str = "ns";
    const NAME: &str = "lease";

    /// How a replica's requests reach the fake API server.
    #[derive(Clone, Copy, PartialEq, Eq)]
    #[repr(u8)]
    enum Link {
        Up,
        /// Every request gets 503.
        Failing,
        /// No request is ever answered.
        Hanging,
    }

    /// An in-memory Lease API (get, create, replace with resourceVersion preconditions).
    #[derive(Clone, Default)]
    struct LeaseStore {
        lease: Arc<Mutex<Option<Lease>>>,
        version: Arc<Mutex<u64>>,
    }

    impl LeaseStore {
        /// A client whose requests go through `link`.
        fn client(&self, link: Arc<AtomicU8>) -> Client {
            let store = self.clone();
            let service = tower::service_fn(move |req: http::Request<Body>| {
                let store = store.clone();
                let link = link.load(Ordering::SeqCst);
                async move {
                    if link == Link::Hanging as u8 {
                        std::future::pending::<()>().await;
                    }
                    if link == Link::Failing as u8 {
                        return Ok::<_, std::convert::Infallible>(status(
                            503,
                            "ServiceUnavailable",
                        ));
                    }
                    Ok(store.handle(req).await)
                }
            });
            Client::new(service, NS)
        }

        async fn handle(&self, req: http::Request<Body>) -> http::Response<Body> {
            let method = req.method().clone();
            let body = req.into_body().collect_bytes().await.unwrap();
            let mut stored = self.lease.lock();
            match method {
                http::Method::GET => match &*stored {
                    Some(lease) => json(200, lease),
                    None => status(404, "NotFound"),
                },
                http::Method::POST | http::Method::PUT => {
                    let mut lease: Lease = serde_json::from_slice(&body).unwrap();
                    let current = stored
                        .as_ref()
                        .and_then(|l| l.metadata.resource_version.clone());
                    let conflict = match method {
                        http::Method::POST => stored.is_some(),
                        _ => current != lease.metadata.resource_version,
                    };
                    if conflict {
                        return status(409, "Conflict");
                    }
                    let mut version = self.version.lock();
                    *version += 1;
                    lease.metadata.resource_version = Some(version.to_string());
                    *stored = Some(lease.clone());
                    json(
                        if method == http::Method::POST {
                            201
                        } else {
                            200
                        },
                        &lease,
                    )
                }
                _ => status(405, "MethodNotAllowed"),
            }
        }

        /// Stores a Lease as another replica would have written it.
        fn put(&self, holder: &str, renew_time: Timestamp, duration_seconds: i32) {
            let mut version = self.version.lock();
            *version += 1;
            *self.lease.lock() = Some(Lease {
                metadata: ObjectMeta {
                    name: Some(NAME.into()),
                    namespace: Some(NS.into()),
                    resource_version: Some(version.to_string()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(holder.into()),
                    lease_duration_seconds: Some(duration_seconds),
                    renew_time: Some(MicroTime(renew_time)),
                    ..LeaseSpec::default()
                }),
            });
        }

        fn holder(&self) -> Option<String> {
            self.lease
                .lock()
                .as_ref()?
                .spec
                .as_ref()?
                .holder_identity
                .clone()
        }
    }

    fn json<T: serde::Serialize>(code: u16, value: &T) -> http::Response<Body> {
        http::Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(value).unwrap()))
            .unwrap()
    }

    fn status(code: u16, reason: &str) -> http::Response<Body> {
        let status = serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": reason, "reason": reason, "code": code,
        });
        json(code, &status)
    }

    fn config(identity: &str) -> LeaseConfig {
        LeaseConfig {
            namespace: NS.into(),
            name: NAME.into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            renew_every: Duration::from_secs(2),
        }
    }

    fn link(state: Link) -> Arc<AtomicU8> {
        Arc::new(AtomicU8::new(state as u8))
    }

    /// A candidate judges the holder's lease by when it observed the record, not by the
    /// holder's renewTime: a holder whose clock runs an hour behind is not overthrown while it
    /// renews, and a silent one is after a full lease duration of the record unchanged.
    #[tokio::test(start_paused = true)]
    async fn candidate_judges_expiry_by_its_own_observation() {
        let store = LeaseStore::default();
        let skewed = Timestamp::now() - SignedDuration::from_hours(1);
        store.put("other", skewed, 15);
        let client = store.client(link(Link::Up));
        let mut elector = Elector::new(config("me"));
        assert_eq!(
            elector.try_acquire_or_renew(&client).await.unwrap(),
            Attempt::HeldByOther,
            "a renewTime in the past says nothing about the holder's liveness"
        );
        tokio::time::sleep(Duration::from_secs(10)).await;
        // The holder renews (with its skewed clock): the record changed, observation restarts.
        store.put("other", skewed + SignedDuration::from_secs(10), 15);
        assert_eq!(
            elector.try_acquire_or_renew(&client).await.unwrap(),
            Attempt::HeldByOther
        );
        tokio::time::sleep(Duration::from_secs(14)).await;
        assert_eq!(
            elector.try_acquire_or_renew(&client).await.unwrap(),
            Attempt::HeldByOther
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            elector.try_acquire_or_renew(&client).await.unwrap(),
            Attempt::Held,
            "the record stayed unchanged for a lease duration"
        );
        assert_eq!(store.holder().as_deref(), Some("me"));
    }

    /// A leader that cannot renew stops leading within the renew deadline (10 s), not when
    /// its lease has already expired (15 s), whether renewals fail or hang.
    #[tokio::test(start_paused = true)]
    async fn leader_steps_down_within_the_renew_deadline() {
        for broken in [Link::Failing, Link::Hanging] {
            let store = LeaseStore::default();
            let state = link(Link::Up);
            let client = store.client(state.clone());
            let mut elector = Elector::new(config("me"));
            let start = Instant::now();
            elector.acquire(&client).await;
            state.store(broken as u8, Ordering::SeqCst);
            tokio::time::timeout(Duration::from_secs(60), elector.hold(&client))
                .await
                .expect("the leader stepped down");
            assert!(
                start.elapsed() <= Duration::from_secs(10),
                "stepped down after {:?}",
                start.elapsed()
            );
        }
    }

    /// A leader cut off from the API server stops leading before a standby that still reaches
    /// it takes over: never two leaders at once.
    #[tokio::test(start_paused = true)]
    async fn partitioned_leader_stops_before_the_standby_takes_over() {
        let store = LeaseStore::default();
        let leader_link = link(Link::Up);
        let leader_client = store.client(leader_link.clone());
        let standby_client = store.client(link(Link::Up));
        let mut leader = Elector::new(config("leader"));
        leader.acquire(&leader_client).await;
        let mut standby = Elector::new(config("standby"));
        let standby = tokio::spawn(async move {
            standby.acquire(&standby_client).await;
            Instant::now()
        });
        tokio::time::sleep(Duration::from_secs(7)).await;
        leader_link.store(Link::Failing as u8, Ordering::SeqCst);
        leader.hold(&leader_client).await;
        let stopped = Instant::now();
        let took_over = standby.await.unwrap();
        assert!(
            stopped < took_over,
            "the leader stopped {:?} after the standby took over",
            stopped.saturating_duration_since(took_over)
        );
        assert_eq!(store.holder().as_deref(), Some("standby"));
    }
}
