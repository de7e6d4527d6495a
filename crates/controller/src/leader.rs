//! Leader election with a `coordination.k8s.io/v1` Lease, so two replicas can run safely: only
//! the holder reconciles; a standby takes over once the holder stops renewing.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::{SignedDuration, Timestamp},
};
use kube::{Api, Client, api::PostParams};
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
    /// How long a lease is valid without renewal.
    pub duration: Duration,
    /// How often the holder renews (and a standby retries).
    pub renew_every: Duration,
}

/// Whether this replica holds the lease after one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// This replica holds the lease.
    Held,
    /// Another replica holds a valid lease.
    HeldByOther,
}

/// Tries once to acquire or renew the lease.
pub async fn try_acquire(client: &Client, config: &LeaseConfig) -> Result<Attempt, kube::Error> {
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
            Ok(_) => Ok(Attempt::Held),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(Attempt::HeldByOther),
            Err(err) => Err(err),
        };
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let expired = spec.renew_time.as_ref().is_none_or(|renewed| {
        let valid_for = spec.lease_duration_seconds.unwrap_or(duration_seconds);
        renewed.0 + SignedDuration::from_secs(i64::from(valid_for)) < now
    });
    if holder != config.identity && !holder.is_empty() && !expired {
        debug!(%holder, "lease held by another replica");
        return Ok(Attempt::HeldByOther);
    }
    if holder != config.identity {
        info!(previous = %holder, "taking over the leader lease");
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.holder_identity = Some(config.identity.clone());
    spec.lease_duration_seconds = Some(duration_seconds);
    spec.renew_time = Some(MicroTime(now));
    // `replace` carries the resourceVersion we read: a racing replica gets 409 and stays standby.
    match api
        .replace(&config.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(Attempt::Held),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(Attempt::HeldByOther),
        Err(err) => Err(err),
    }
}

/// Waits until this replica holds the lease.
pub async fn acquire(client: &Client, config: &LeaseConfig) {
    loop {
        match try_acquire(client, config).await {
            Ok(Attempt::Held) => {
                info!(identity = %config.identity, "acquired the leader lease");
                return;
            }
            Ok(Attempt::HeldByOther) => {}
            Err(err) => debug!(%err, "leader election attempt failed"),
        }
        tokio::time::sleep(config.renew_every).await;
    }
}

/// Renews the lease until renewal fails for longer than the lease duration; then returns (the
/// caller must stop reconciling: another replica may take over).
pub async fn hold(client: &Client, config: &LeaseConfig) {
    let mut last_renewed = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(config.renew_every).await;
        match try_acquire(client, config).await {
            Ok(Attempt::Held) => last_renewed = tokio::time::Instant::now(),
            Ok(Attempt::HeldByOther) => {
                info!("leader lease taken by another replica");
                return;
            }
            Err(err) => {
                debug!(%err, "lease renewal failed");
                if last_renewed.elapsed() >= config.duration {
                    info!("could not renew the leader lease in time");
                    return;
                }
            }
        }
    }
}

/// Gives the lease up (empty holder), so a standby takes over without waiting for expiry.
pub async fn release(client: &Client, config: &LeaseConfig) -> Result<(), kube::Error> {
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
    info!(identity = %config.identity, "released the leader lease");
    Ok(())
}
