//! `cluster-agent`: the build cluster's end of the BuildPlane tunnel.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use cluster_agent::{AgentConfig, backoff::Backoff};

#[derive(Parser)]
#[command(
    version,
    about = "Connects a build cluster to the OpenChoreo control plane"
)]
struct Flags {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Common {
    /// Kubeconfig of the build cluster (in-cluster configuration when absent).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Namespace of the identity Secrets.
    #[arg(long, default_value = "openchoreo-build-plane")]
    identity_namespace: String,
    /// Validity of a client certificate, in hours.
    #[arg(long, default_value_t = 24)]
    leaf_validity_hours: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Connect and serve until interrupted.
    Run {
        #[command(flatten)]
        common: Common,
        /// Gateway URL.
        #[arg(
            long,
            env = "SERVER_URL",
            default_value = "wss://cluster-gateway:8443/ws"
        )]
        server_url: String,
        /// The planeID this agent serves.
        #[arg(long, env = "PLANE_ID")]
        plane_id: String,
        /// The plane type.
        #[arg(long, env = "PLANE_TYPE", default_value = "buildplane")]
        plane_type: String,
        /// The gateway's serving CA.
        #[arg(long, env = "SERVER_CA", default_value = "/ca-certs/ca.crt")]
        server_ca: PathBuf,
        /// Renew the client certificate this many seconds before it expires.
        #[arg(long, default_value_t = 8 * 3600)]
        renew_before_seconds: u64,
        /// First backoff ceiling, in milliseconds.
        #[arg(long, default_value_t = 500)]
        backoff_base_ms: u64,
        /// Largest backoff ceiling, in milliseconds.
        #[arg(long, default_value_t = 30_000)]
        backoff_cap_ms: u64,
        /// Tunnel protocol: v2 (binary, streaming) or v1 (OpenChoreo JSON).
        #[arg(long, default_value = "v2")]
        protocol: String,
        /// Health listener (`/healthz`, `/readyz`).
        #[arg(long, default_value = "0.0.0.0:8081")]
        health_listen: SocketAddr,
        /// Requests run at once.
        #[arg(long, default_value_t = 64)]
        max_concurrent_requests: usize,
        /// Instance id (defaults to the pod name, else a random id per process).
        #[arg(long, env = "POD_NAME")]
        agent_id: Option<String>,
    },
    /// Rotate the agent CA: publish old+new CA and switch the leaf; with --finish, drop the old CA.
    RotateCa {
        #[command(flatten)]
        common: Common,
        /// The planeID (the leaf's common name).
        #[arg(long, env = "PLANE_ID", default_value = "")]
        plane_id: String,
        /// Drop the old CA from the published bundle.
        #[arg(long)]
        finish: bool,
    },
    /// Issue a new client certificate under the current CA now.
    Renew {
        #[command(flatten)]
        common: Common,
        /// The planeID (the leaf's common name).
        #[arg(long, env = "PLANE_ID", default_value = "")]
        plane_id: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    buildplane_pki::install_crypto_provider();
    match Flags::parse().command {
        Command::Run {
            common,
            server_url,
            plane_id,
            plane_type,
            server_ca,
            renew_before_seconds,
            backoff_base_ms,
            backoff_cap_ms,
            protocol,
            health_listen,
            max_concurrent_requests,
            agent_id,
        } => {
            let protocol = match protocol.as_str() {
                "v1" | "1" => 1,
                "v2" | "2" => 2,
                other => anyhow::bail!("--protocol must be v1 or v2, not {other:?}"),
            };
            cluster_agent::run(AgentConfig {
                server_url,
                plane_id,
                plane_type,
                kubeconfig: common.kubeconfig,
                server_ca,
                identity_namespace: common.identity_namespace,
                leaf_validity: Duration::from_secs(common.leaf_validity_hours * 3600),
                renew_before: Duration::from_secs(renew_before_seconds),
                backoff: Backoff::new(
                    Duration::from_millis(backoff_base_ms),
                    Duration::from_millis(backoff_cap_ms),
                ),
                protocol,
                health_listen: Some(health_listen),
                max_concurrent_requests,
                agent_id: agent_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            })
            .await
        }
        Command::RotateCa {
            common,
            plane_id,
            finish,
        } => {
            let client = cluster_agent::kube_client(common.kubeconfig.as_ref()).await?;
            let bundle = cluster_agent::identity::rotate_ca(
                &client,
                &common.identity_namespace,
                &plane_id,
                finish,
                Duration::from_secs(common.leaf_validity_hours * 3600),
            )
            .await?;
            print!("{bundle}");
            Ok(())
        }
        Command::Renew { common, plane_id } => {
            let client = cluster_agent::kube_client(common.kubeconfig.as_ref()).await?;
            let ca = cluster_agent::identity::load_ca(&client, &common.identity_namespace).await?;
            cluster_agent::identity::renew(
                &client,
                &common.identity_namespace,
                &plane_id,
                &ca,
                Duration::from_secs(common.leaf_validity_hours * 3600),
            )
            .await?;
            Ok(())
        }
    }
}
