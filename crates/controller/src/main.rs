//! `buildplane-controller`: reconciles BuildPlane and ClusterBuildPlane resources.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use buildplane_controller::{Config, DEFAULT_DISCONNECT_GRACE, leader::LeaseConfig};
use clap::Parser;

/// Reconciles BuildPlanes: CA resolution, conditions, agent connection status, events.
#[derive(Parser, Debug)]
#[command(version)]
struct Flags {
    /// Kubeconfig of the control cluster (in-cluster configuration when absent).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Base URL of the cluster gateway's internal API.
    #[arg(long, env = "CLUSTER_GATEWAY_URL")]
    cluster_gateway_url: Option<String>,
    /// Client certificate for the gateway's internal mTLS.
    #[arg(long)]
    gateway_client_cert: Option<PathBuf>,
    /// Client key for the gateway's internal mTLS.
    #[arg(long)]
    gateway_client_key: Option<PathBuf>,
    /// CA that signed the gateway's internal serving certificate.
    #[arg(long)]
    gateway_ca: Option<PathBuf>,
    /// Address of `/healthz`, `/readyz` and `/metrics`.
    #[arg(long, default_value = "0.0.0.0:8082")]
    health_listen: SocketAddr,
    /// Namespace of the leader-election Lease.
    #[arg(long, default_value = "openchoreo-control-plane")]
    leader_election_namespace: String,
    /// Disable leader election (a single replica).
    #[arg(long)]
    no_leader_election: bool,
    /// This replica's identity in the Lease (defaults to the host name and process id).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Milliseconds a drop to zero agents is held back before status reports it.
    #[arg(long, default_value_t = DEFAULT_DISCONNECT_GRACE.as_millis() as u64)]
    disconnect_grace_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let flags = Flags::parse();
    let gateway_tls = match (
        flags.gateway_client_cert,
        flags.gateway_client_key,
        flags.gateway_ca,
    ) {
        (Some(cert), Some(key), Some(ca)) => Some((cert, key, ca)),
        (None, None, None) => None,
        _ => anyhow::bail!(
            "--gateway-client-cert, --gateway-client-key and --gateway-ca go together"
        ),
    };
    let identity = flags.identity.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let leader = (!flags.no_leader_election).then(|| LeaseConfig {
        namespace: flags.leader_election_namespace,
        name: "buildplane-controller".into(),
        identity,
        duration: Duration::from_secs(15),
        renew_every: Duration::from_secs(2),
    });
    buildplane_controller::run(Config {
        kubeconfig: flags.kubeconfig,
        gateway_url: flags.cluster_gateway_url,
        gateway_tls,
        health_listen: Some(flags.health_listen),
        leader,
        disconnect_grace: Duration::from_millis(flags.disconnect_grace_ms),
    })
    .await
}
