//! The reconciler shared by BuildPlane and ClusterBuildPlane.

use std::{collections::HashMap, fmt::Debug, sync::Arc, time::Duration};

use buildplane_api::{BuildPlaneStatus, PlaneCr, names};
use k8s_openapi::{api::core::v1::Secret, jiff::Timestamp};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
    },
};
use parking_lot::Mutex;
use serde::{Serialize, de::DeserializeOwned};
use thiserror::Error;
use tracing::{info, warn};

use crate::{
    ca::{self, CaCheck, CaSource},
    gateway::{ConnectionTable, GatewayClient, GatewayError},
    metrics::Metrics,
    status::{Observed, desired_status},
};

/// How long the finalizer waits for the gateway to acknowledge a deletion before giving up.
pub const DELETE_NOTIFY_DEADLINE: Duration = Duration::from_secs(300);
/// Requeue interval of a healthy CR (a safety net; changes arrive as watch and gateway events).
pub const RESYNC: Duration = Duration::from_secs(300);
/// Requeue interval of a CR whose CA cannot be used.
pub const RETRY_FAILED_CA: Duration = Duration::from_secs(30);

/// Reconcile failures.
#[derive(Debug, Error)]
pub enum Error {
    /// The Kubernetes API failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The gateway could not be told about a change.
    #[error(transparent)]
    Gateway(#[from] GatewayError),
}

impl Error {
    /// A short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Gateway(GatewayError::Transient(_)) => "gateway_unavailable",
            Error::Gateway(_) => "gateway_rejected",
        }
    }
}

/// Shared state of the reconcilers.
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// The gateway client, if configured.
    pub gateway: Option<GatewayClient>,
    /// Connected agents per CR.
    pub connections: ConnectionTable,
    /// Metrics.
    pub metrics: Metrics,
    /// Event reporter identity.
    pub reporter: Reporter,
    /// Consecutive failed reconciles per CR, for exponential backoff.
    pub failures: Mutex<HashMap<String, u32>>,
}

/// The backoff after `n_failures` consecutive failures: 500 ms doubling up to a minute.
pub fn backoff(n_failures: u32) -> Duration {
    let exponent = n_failures.saturating_sub(1).min(7);
    (Duration::from_millis(500) * 2u32.pow(exponent)).min(MAX_BACKOFF)
}

/// The longest wait between retries of a failing CR.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

fn failure_key<K: Resource<DynamicType = ()>>(cr: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        cr.meta().namespace.as_deref().unwrap_or(""),
        cr.meta().name.as_deref().unwrap_or("")
    )
}

/// The API handle for one CR of a kind: namespaced or cluster-wide.
pub trait PlaneApi: Resource<DynamicType = ()> + Sized {
    /// The handle through which `cr` is patched.
    fn api_for(client: &Client, cr: &Self) -> Api<Self>;
}

impl PlaneApi for buildplane_api::BuildPlane {
    fn api_for(client: &Client, cr: &Self) -> Api<Self> {
        Api::namespaced(client.clone(), &cr.namespace().unwrap_or_default())
    }
}

impl PlaneApi for buildplane_api::ClusterBuildPlane {
    fn api_for(client: &Client, _cr: &Self) -> Api<Self> {
        Api::all(client.clone())
    }
}

/// Resolves and checks the CR's `clientCA`.
pub async fn resolve_ca<K: PlaneCr>(client: &Client, cr: &K) -> Result<CaCheck, kube::Error> {
    let now = Timestamp::now().as_second();
    if let Err(err) = cr.validate() {
        return Ok(CaCheck {
            usable: false,
            reason: names::reason::INVALID_SPEC,
            message: err.to_string(),
        });
    }
    if let Some(value) = cr.client_ca().value.as_deref() {
        return Ok(ca::check_pem(value.as_bytes(), CaSource::Inline, now));
    }
    let Some((namespace, name, key)) = cr.client_ca_secret() else {
        return Ok(CaCheck {
            usable: false,
            reason: names::reason::INVALID_SPEC,
            message: "clientCA has neither value nor secretRef".into(),
        });
    };
    let secret = match namespace.as_deref() {
        Some(namespace) => {
            Api::<Secret>::namespaced(client.clone(), namespace)
                .get_opt(&name)
                .await?
        }
        None => None,
    };
    Ok(ca::from_secret(
        secret.as_ref(),
        namespace.as_deref(),
        &name,
        &key,
        now,
    ))
}

/// Reconciles one plane CR.
pub async fn reconcile<K>(cr: Arc<K>, ctx: Arc<Context>) -> Result<Action, Error>
where
    K: PlaneCr + PlaneApi + Clone + DeserializeOwned + Serialize + Debug + Send + Sync + 'static,
{
    let started = tokio::time::Instant::now();
    let res = reconcile_inner(&*cr, &ctx).await;
    if res.is_ok() {
        ctx.failures.lock().remove(&failure_key(&*cr));
    }
    ctx.metrics
        .observe_reconcile(K::kind(&()).as_ref(), started.elapsed(), res.as_ref().err());
    res
}

async fn reconcile_inner<K>(cr: &K, ctx: &Context) -> Result<Action, Error>
where
    K: PlaneCr + PlaneApi + Clone + DeserializeOwned + Serialize + Debug,
{
    let api = K::api_for(&ctx.client, cr);
    let key = cr.cr_key();
    let plane_id = cr.effective_plane_id();
    let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
    let object_ref = cr.object_ref(&());

    if cr.meta().deletion_timestamp.is_some() {
        if !cr.finalizers().iter().any(|f| f == names::FINALIZER) {
            return Ok(Action::await_change());
        }
        if let Some(gateway) = &ctx.gateway {
            match gateway.notify(&plane_id, "deleted", &key).await {
                Ok(()) | Err(GatewayError::Permanent(_)) => {}
                Err(err) => {
                    let deleted_at = cr.meta().deletion_timestamp.as_ref().map(|t| t.0);
                    let waited = deleted_at
                        .map(|t| Timestamp::now().as_second() - t.as_second())
                        .unwrap_or(0);
                    if waited < DELETE_NOTIFY_DEADLINE.as_secs() as i64 {
                        warn!(%key, %err, "gateway not told about deletion yet; retrying");
                        return Err(err.into());
                    }
                    let note = format!(
                        "gave up telling the cluster gateway after {}s: {err}; its agents lose this CR at the next reconnect",
                        DELETE_NOTIFY_DEADLINE.as_secs()
                    );
                    publish(
                        &recorder,
                        &object_ref,
                        EventType::Warning,
                        "GatewayUnreachable",
                        &note,
                    )
                    .await;
                }
            }
        }
        let finalizers: Vec<String> = cr
            .finalizers()
            .iter()
            .filter(|f| *f != names::FINALIZER)
            .cloned()
            .collect();
        let patch = serde_json::json!({"metadata": {"finalizers": finalizers}});
        match api
            .patch(
                &cr.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => info!(%key, "finalizer removed"),
            // Already gone (a stale event of an object whose finalizer this replica removed).
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(err) => return Err(err.into()),
        }
        return Ok(Action::await_change());
    }

    if !cr.finalizers().iter().any(|f| f == names::FINALIZER) {
        let mut finalizers = cr.finalizers().to_vec();
        finalizers.push(names::FINALIZER.to_owned());
        let patch = serde_json::json!({"metadata": {"finalizers": finalizers}});
        api.patch(
            &cr.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
        // The update triggers the next reconcile.
        return Ok(Action::await_change());
    }

    let ca = resolve_ca(&ctx.client, cr).await?;
    let current = cr.plane_status();
    let generation = cr.meta().generation;
    let mut notify_failed = None;
    if current.and_then(|s| s.observed_generation) != generation
        && let Some(gateway) = &ctx.gateway
    {
        match gateway.notify(&plane_id, "updated", &key).await {
            Ok(()) => {}
            Err(GatewayError::Permanent(message)) => {
                warn!(%key, %message, "gateway rejected notify")
            }
            Err(err) => notify_failed = Some(err),
        }
    }
    let observed = Observed {
        generation,
        ca: ca.clone(),
        agents: ctx.connections.view(&key),
    };
    let desired = desired_status(current, &observed, Timestamp::now());
    let previous_ca_reason = condition_reason(current, names::condition::CLIENT_CA_RESOLVED);
    if Some(&desired) != current {
        write_status(&api, cr, &desired).await?;
        let was = condition_status(current, names::condition::AGENT_CONNECTED);
        let now = condition_status(Some(&desired), names::condition::AGENT_CONNECTED);
        if was.is_some() && was != now {
            let message = desired
                .agent_connection
                .as_ref()
                .and_then(|c| c.message.clone())
                .unwrap_or_default();
            match now.as_deref() {
                Some("True") => {
                    publish(
                        &recorder,
                        &object_ref,
                        EventType::Normal,
                        "AgentConnected",
                        &message,
                    )
                    .await
                }
                Some("False") => {
                    publish(
                        &recorder,
                        &object_ref,
                        EventType::Warning,
                        "AgentDisconnected",
                        &message,
                    )
                    .await
                }
                _ => {}
            }
        }
        if previous_ca_reason.as_deref() != Some(ca.reason) {
            let (kind, reason) = if ca.usable && ca.reason == names::reason::RESOLVED {
                (EventType::Normal, "ClientCAResolved")
            } else {
                (EventType::Warning, ca.reason)
            };
            publish(&recorder, &object_ref, kind, reason, &ca.message).await;
        }
    }
    if let Some(err) = notify_failed {
        // The status is written; retry the notify with backoff.
        return Err(err.into());
    }
    Ok(if ca.usable && ca.reason == names::reason::RESOLVED {
        Action::requeue(RESYNC)
    } else {
        Action::requeue(RETRY_FAILED_CA)
    })
}

fn condition_status(status: Option<&BuildPlaneStatus>, type_: &str) -> Option<String> {
    status?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.clone())
}

fn condition_reason(status: Option<&BuildPlaneStatus>, type_: &str) -> Option<String> {
    status?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.reason.clone())
}

async fn write_status<K>(api: &Api<K>, cr: &K, status: &BuildPlaneStatus) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    // A merge patch of the whole status: no resourceVersion, so no conflicts with spec writers.
    let patch = serde_json::json!({"status": status});
    api.patch_status(
        &cr.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

async fn publish(
    recorder: &Recorder,
    object_ref: &k8s_openapi::api::core::v1::ObjectReference,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note.to_owned()),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    if let Err(err) = recorder.publish(&event, object_ref).await {
        warn!(%err, reason, "could not publish event");
    }
}

/// Backoff after a failed reconcile: exponential per CR (see [`backoff`]).
pub fn error_policy<K: Resource<DynamicType = ()>>(
    cr: Arc<K>,
    err: &Error,
    ctx: Arc<Context>,
) -> Action {
    let key = failure_key(&*cr);
    let n_failures = {
        let mut failures = ctx.failures.lock();
        let n = failures.entry(key.clone()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = backoff(n_failures);
    warn!(cr = %key, %err, n_failures, ?delay, "reconcile failed; retrying");
    Action::requeue(delay)
}
