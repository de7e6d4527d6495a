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
use futures::{StreamExt, future};
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
use tracing::{info, warn};

use crate::{
    gateway::{ConnectionTable, GatewayClient},
    leader::LeaseConfig,
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

/// Builds a client for the kubeconfig or the in-cluster configuration.
pub async fn kube_client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .context("loading kubeconfig")?
        }
        None => kube::Config::infer()
            .await
            .context("inferring Kubernetes configuration")?,
    };
    Client::try_from(config).context("building Kubernetes client")
}

/// Runs the controller until a termination signal or the loss of leadership.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = kube_client(config.kubeconfig.as_ref()).await?;
    let metrics = Metrics::default();
    if let Some(listen) = config.health_listen {
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(err) = metrics::serve(listen, metrics).await {
                warn!(%err, "health server stopped");
            }
        });
    }
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

    if let Some(lease) = &config.leader {
        info!(identity = %lease.identity, "waiting for the leader lease");
        leader::acquire(&client, lease).await;
    }
    metrics.set_leader(true);

    let connections = ConnectionTable::new(config.disconnect_grace);
    let ctx = Arc::new(Context {
        client: client.clone(),
        gateway: gateway.clone(),
        connections: connections.clone(),
        metrics: metrics.clone(),
        reporter: Reporter {
            controller: "buildplane-controller".into(),
            instance: config.leader.as_ref().map(|l| l.identity.clone()),
        },
    });
    let (namespaced_tx, namespaced_rx) = mpsc::channel(1024);
    let (cluster_tx, cluster_rx) = mpsc::channel(1024);
    if let Some(gateway) = gateway {
        tokio::spawn(follow_gateway(
            gateway,
            connections,
            namespaced_tx,
            cluster_tx,
        ));
    }
    let namespaced = run_controller::<BuildPlane>(client.clone(), ctx.clone(), namespaced_rx);
    let cluster = run_controller::<ClusterBuildPlane>(client.clone(), ctx, cluster_rx);
    let controllers = future::join(namespaced, cluster);
    match &config.leader {
        Some(lease) => {
            tokio::select! {
                _ = controllers => Ok(()),
                () = leader::hold(&client, lease) => {
                    metrics.set_leader(false);
                    anyhow::bail!("lost the leader lease; exiting so a fresh replica can stand by")
                }
            }
        }
        None => {
            controllers.await;
            Ok(())
        }
    }
}

/// Runs one kind's controller, triggered by the CRs, the Secrets they reference and `triggers`.
async fn run_controller<K>(
    client: Client,
    ctx: Arc<Context>,
    triggers: mpsc::Receiver<ObjectRef<K>>,
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
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| {
            if let Err(err) = res {
                tracing::debug!(%err, "reconcile error");
            }
            future::ready(())
        })
        .await;
}

/// Follows the gateway's event stream forever, updating `connections` and triggering the CRs
/// whose agent count changed.
async fn follow_gateway(
    gateway: GatewayClient,
    connections: ConnectionTable,
    namespaced: mpsc::Sender<ObjectRef<BuildPlane>>,
    cluster: mpsc::Sender<ObjectRef<ClusterBuildPlane>>,
) {
    let trigger = move |key: &CrKey| match &key.namespace {
        Some(namespace) => {
            let _ = namespaced.try_send(ObjectRef::new(&key.name).within(namespace));
        }
        None => {
            let _ = cluster.try_send(ObjectRef::new(&key.name));
        }
    };
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
                    let resync = event.type_ == "snapshot";
                    for key in &changed {
                        trigger(key);
                    }
                    if resync {
                        for key in connections.known_crs() {
                            trigger(&key);
                        }
                    }
                    if !deferred.is_empty() {
                        let grace = connections.grace();
                        let trigger = trigger.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(grace + Duration::from_millis(50)).await;
                            for key in &deferred {
                                trigger(key);
                            }
                        });
                    }
                }
            }
            Err(err) => tracing::debug!(%err, "gateway event stream unavailable"),
        }
        let since = *down_since.get_or_insert_with(tokio::time::Instant::now);
        if since.elapsed() >= Duration::from_secs(5) {
            connections.mark_unsynced();
            for key in connections.known_crs() {
                trigger(&key);
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
