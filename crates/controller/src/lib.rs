//! The BuildPlane controller: reconciles `BuildPlane` and `ClusterBuildPlane` status (CA
//! resolution, conditions, live agent connections) and tells the cluster gateway about changes.
//!
//! Changes reach a CR's status within a second from three sources: watches of the CRs, a watch
//! of Secrets mapped to the CRs that reference them (so editing the CA Secret is a rotation), and
//! the gateway's `/api/v1/events` stream of agent connections.

pub mod ca;
pub mod gateway;
pub mod leader;
pub mod metrics;
pub mod reconcile;
pub mod status;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use buildplane_api::{BuildPlane, ClusterBuildPlane, CrKey, PlaneCr};
use buildplane_runtime::Tasks;
use futures::{FutureExt as _, StreamExt, future};
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, Client,
    runtime::{
        Controller,
        events::Reporter,
        reflector::{ObjectRef, Store},
        watcher,
    },
};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::{sync::CancellationToken, task::AbortOnDropHandle};
use tracing::{error, info, warn};

use crate::{
    gateway::{ConnectionTable, GatewayClient},
    leader::{Elector, LeaseConfig},
    metrics::Metrics,
    reconcile::{Context, PlaneApi, error_policy, reconcile},
};

/// How long a drop to zero agents is held back before status reports it (OpenChoreo #2225).
pub const DEFAULT_DISCONNECT_GRACE: Duration = Duration::from_secs(2);

/// Everything the controller needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Kubeconfig of the control cluster; in-cluster configuration when `None`.
    pub kubeconfig: Option<PathBuf>,
    /// Base URL of the gateway's internal API, e.g. `https://127.0.0.1:8444`.
    pub gateway_url: Option<String>,
    /// Client certificate, key and CA for the gateway's internal mTLS.
    pub gateway_tls: Option<(PathBuf, PathBuf, PathBuf)>,
    /// Where `/healthz`, `/readyz` and `/metrics` listen.
    pub health_listen: Option<SocketAddr>,
    /// Leader election; `None` runs without it.
    pub leader: Option<LeaseConfig>,
    /// Grace period for drops to zero agents.
    pub disconnect_grace: Duration,
}

/// How long [`RunningController::shutdown`] waits for in-flight work.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A controller started in this process.
pub struct RunningController {
    /// Where `/healthz`, `/readyz` and `/metrics` listen, if configured.
    pub health_addr: Option<SocketAddr>,
    /// The controller's metrics (and leadership).
    pub metrics: Metrics,
    tasks: Tasks,
}

impl RunningController {
    /// Whether this replica holds the leader lease and reconciles.
    pub fn is_leader(&self) -> bool {
        self.metrics.is_leader()
    }

    /// Stops reconciling (in-flight reconciles finish), releases the lease, and waits, at most
    /// [`SHUTDOWN_GRACE`]; past it the remaining work is aborted (a standby then waits for the
    /// lease to expire instead of taking over at once).
    pub async fn shutdown(self) -> anyhow::Result<()> {
        Ok(self.tasks.shutdown(SHUTDOWN_GRACE).await?)
    }

    /// Waits until the controller stops by itself: the loss of the lease, a fatal error, or a
    /// task (health server, controller) that ended; the error names it.
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        Ok(self.tasks.run_until(std::future::pending()).await?)
    }
}

/// Starts the controller: binds the health listener, then elects and reconciles in a task.
pub async fn start(config: Config) -> anyhow::Result<RunningController> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = buildplane_runtime::kube_client(config.kubeconfig.as_deref()).await?;
    // The Lease has a client of its own (its own connection and request queue): renewals never
    // wait behind a burst of status writes, which cost the lease in a 1,000-agent storm.
    let lease_client = buildplane_runtime::kube_client(config.kubeconfig.as_deref()).await?;
    let metrics = Metrics::default();
    let mut tasks = Tasks::new();
    let health_addr = match config.health_listen {
        Some(listen) => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding the health listener {listen}"))?;
            let addr = listener.local_addr()?;
            tasks.spawn("health server", metrics::serve(listener, metrics.clone()));
            Some(addr)
        }
        None => None,
    };
    let gateway = match (&config.gateway_url, &config.gateway_tls) {
        (Some(url), Some((cert, key, ca))) => Some(GatewayClient::from_files(url, cert, key, ca)?),
        (Some(_), None) => anyhow::bail!(
            "--cluster-gateway-url needs --gateway-client-cert, --gateway-client-key and --gateway-ca"
        ),
        (None, _) => {
            warn!("no --cluster-gateway-url: agent connection status stays Unknown");
            None
        }
    };
    metrics.set_ready();
    let leading = metrics.clone();
    tasks.spawn_graceful("controller", |shutdown| {
        lead_and_reconcile(
            Clients {
                client,
                lease_client,
            },
            config,
            gateway,
            leading,
            shutdown,
        )
    });
    Ok(RunningController {
        health_addr,
        metrics,
        tasks,
    })
}

/// Runs the controller until SIGINT/SIGTERM, the loss of leadership or the end of a task.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let mut running = start(config).await?;
    let res = tokio::select! {
        res = running.wait() => res,
        () = buildplane_runtime::shutdown_signal() => Ok(()),
    };
    match &res {
        Ok(()) => info!("shutting down"),
        Err(err) => error!(%err, "stopping"),
    }
    let stopped = running.shutdown().await;
    res.and(stopped)
}

/// The controller's API clients: one for the reconcilers, one for the leader Lease alone.
struct Clients {
    client: Client,
    lease_client: Client,
}

/// Waits for the lease (when configured), then runs both controllers until `shutdown` or the
/// loss of the lease; releases the lease on a clean shutdown so a standby takes over at once.
async fn lead_and_reconcile(
    Clients {
        client,
        lease_client,
    }: Clients,
    config: Config,
    gateway: Option<GatewayClient>,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut elector = config.leader.clone().map(Elector::new);
    if let Some(elector) = &mut elector {
        info!(identity = %elector.config().identity, "waiting for the leader lease");
        tokio::select! {
            () = elector.acquire(&lease_client) => {}
            () = shutdown.cancelled() => return Ok(()),
        }
    }
    metrics.set_leader(true);

    let connections = ConnectionTable::new(config.disconnect_grace);
    if gateway.is_none() {
        connections.mark_unsynced();
    }
    let ctx = Arc::new(Context {
        client: client.clone(),
        gateway: gateway.clone(),
        connections: connections.clone(),
        metrics: metrics.clone(),
        reporter: Reporter {
            controller: "buildplane-controller".into(),
            instance: config.leader.as_ref().map(|l| l.identity.clone()),
        },
        failures: parking_lot::Mutex::default(),
    });
    let (namespaced_tx, namespaced_rx) = mpsc::channel(1024);
    let (cluster_tx, cluster_rx) = mpsc::channel(1024);
    let (namespaced_all_tx, namespaced_all_rx) = mpsc::channel(4);
    let (cluster_all_tx, cluster_all_rx) = mpsc::channel(4);
    let follower = gateway.map(|gateway| {
        tokio::spawn(follow_gateway(
            gateway,
            connections,
            Triggers {
                namespaced: namespaced_tx,
                cluster: cluster_tx,
                namespaced_all: namespaced_all_tx,
                cluster_all: cluster_all_tx,
            },
        ))
    });
    let stopped = |shutdown: &CancellationToken| {
        let (tx, rx) = futures::channel::oneshot::channel::<()>();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            let _ = tx.send(());
        });
        rx.map(|_| ())
    };
    let namespaced = run_controller::<BuildPlane>(
        client.clone(),
        ctx.clone(),
        namespaced_rx,
        namespaced_all_rx,
        stopped(&shutdown),
    );
    let cluster = run_controller::<ClusterBuildPlane>(
        client.clone(),
        ctx,
        cluster_rx,
        cluster_all_rx,
        stopped(&shutdown),
    );
    let controllers = future::join(namespaced, cluster);
    let reconciling = async {
        match &mut elector {
            Some(elector) => {
                let stopped = tokio::select! {
                    _ = controllers => true,
                    () = elector.hold(&lease_client) => false,
                };
                if !stopped {
                    return Err(anyhow::format_err!(
                        "lost the leader lease; exiting so a fresh replica can stand by"
                    ));
                }
                if let Err(err) = elector.release(&lease_client).await {
                    warn!(%err, "could not release the leader lease");
                }
                Ok(())
            }
            None => {
                controllers.await;
                Ok(())
            }
        }
    };
    // The event follower runs as long as the controllers: if it ends, statuses would freeze.
    let mut follower = follower.map(AbortOnDropHandle::new);
    let follower_ended = async {
        match follower.as_mut() {
            Some(handle) => handle.await,
            None => std::future::pending().await,
        }
    };
    let res = tokio::select! {
        res = reconciling => res,
        ended = follower_ended => Err(match ended {
            Ok(()) => anyhow::format_err!("the gateway event follower stopped"),
            Err(err) => anyhow::format_err!("the gateway event follower failed: {err}"),
        }),
    };
    metrics.set_leader(false);
    res
}

/// Runs one kind's controller, triggered by the CRs, the Secrets they reference and `triggers`.
async fn run_controller<K>(
    client: Client,
    ctx: Arc<Context>,
    triggers: mpsc::Receiver<ObjectRef<K>>,
    resync_all: mpsc::Receiver<()>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) where
    K: PlaneCr
        + PlaneApi
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let controller = Controller::new(Api::<K>::all(client.clone()), watcher::Config::default());
    let store: Store<K> = controller.store();
    controller
        .watches(
            Api::<Secret>::all(client),
            watcher::Config::default(),
            move |secret: Secret| {
                let namespace = secret.metadata.namespace.clone();
                let name = secret.metadata.name.clone().unwrap_or_default();
                store
                    .state()
                    .into_iter()
                    .filter(|cr| {
                        cr.client_ca_secret().is_some_and(|(ns, secret_name, _)| {
                            ns == namespace && secret_name == name
                        })
                    })
                    .map(|cr| ObjectRef::from_obj(&*cr))
                    .collect::<Vec<_>>()
            },
        )
        .reconcile_on(ReceiverStream::new(triggers))
        .reconcile_all_on(ReceiverStream::new(resync_all))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| {
            if let Err(err) = res {
                tracing::debug!(%err, "reconcile error");
            }
            future::ready(())
        })
        .await;
}

/// Where gateway events send reconcile requests.
struct Triggers {
    namespaced: mpsc::Sender<ObjectRef<BuildPlane>>,
    cluster: mpsc::Sender<ObjectRef<ClusterBuildPlane>>,
    namespaced_all: mpsc::Sender<()>,
    cluster_all: mpsc::Sender<()>,
}

impl Triggers {
    fn one(&self, key: &CrKey) {
        match &key.namespace {
            Some(namespace) => {
                let _ = self
                    .namespaced
                    .try_send(ObjectRef::new(&key.name).within(namespace));
            }
            None => {
                let _ = self.cluster.try_send(ObjectRef::new(&key.name));
            }
        }
    }

    /// Every CR of both kinds (a full channel already holds a pending "all").
    fn all(&self) {
        let _ = self.namespaced_all.try_send(());
        let _ = self.cluster_all.try_send(());
    }
}

/// How long the event stream may stay down before statuses say the gateway is unreachable.
pub const GATEWAY_LOST_AFTER: Duration = Duration::from_secs(5);

/// Follows the gateway's event stream forever, updating `connections` and triggering the CRs
/// whose agent count changed; after each (re)connection's snapshot, and when the gateway is
/// lost, every CR is reconciled.
async fn follow_gateway(gateway: GatewayClient, connections: ConnectionTable, triggers: Triggers) {
    let triggers = Arc::new(triggers);
    let mut delay = Duration::from_millis(200);
    let mut down_since: Option<tokio::time::Instant> = None;
    loop {
        match gateway.events().await {
            Ok(mut events) => {
                info!("following the gateway's event stream");
                while let Some(event) = events.next().await {
                    let event = match event {
                        Ok(event) => event,
                        Err(err) => {
                            warn!(%err, "gateway event stream interrupted");
                            break;
                        }
                    };
                    down_since = None;
                    delay = Duration::from_millis(200);
                    let (changed, deferred) = connections.apply(&event);
                    for key in &changed {
                        triggers.one(key);
                    }
                    if event.kind == gateway::GatewayEventKind::Snapshot {
                        triggers.all();
                    }
                    if !deferred.is_empty() {
                        let grace = connections.grace();
                        let triggers = triggers.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(grace + Duration::from_millis(50)).await;
                            for key in &deferred {
                                triggers.one(key);
                            }
                        });
                    }
                }
            }
            Err(err) => tracing::debug!(%err, "gateway event stream unavailable"),
        }
        let since = *down_since.get_or_insert_with(tokio::time::Instant::now);
        if since.elapsed() >= GATEWAY_LOST_AFTER && !connections.is_lost() {
            warn!("cluster gateway unreachable; agent status becomes Unknown");
            connections.mark_unsynced();
            triggers.all();
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
