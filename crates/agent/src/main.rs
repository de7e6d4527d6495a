//! `cluster-agent`: the build cluster's end of the BuildPlane tunnel.

#[global_allocator]
static GLOBAL: buildplane_runtime::Allocator = buildplane_runtime::Allocator;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use buildplane_api::{names::PlaneType, served::ServedCr};
use buildplane_runtime::parse_positive_duration;
use clap::{Args, Parser, Subcommand};
use cluster_agent::{AgentConfig, backoff::Backoff, swarm::SwarmConfig};

#[derive(Parser)]
#[command(
    version,
    about = "Connects a build cluster to the OpenChoreo control plane"
)]
struct Flags {
    #[command(subcommand)]
    command: Command,
}

/// Flags shared by every subcommand.
#[derive(Args, Clone)]
struct Common {
    /// Kubeconfig of the build cluster (in-cluster configuration when absent).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Namespace of the identity Secrets.
    #[arg(long, default_value = "openchoreo-build-plane")]
    identity_namespace: String,
    /// Validity of a client certificate (`24h`, `90m`, ...).
    #[arg(long, default_value = "24h", value_parser = parse_positive_duration)]
    leaf_validity: Duration,
}

/// Flags of the connection (run and swarm).
#[derive(Args, Clone)]
struct Connection {
    /// Gateway URL.
    #[arg(
        long,
        env = "SERVER_URL",
        default_value = "wss://cluster-gateway:8443/ws"
    )]
    server_url: String,
    /// The plane type: `buildplane`, or `workflowplane` (OpenChoreo v1.x's name for it).
    #[arg(long, env = "PLANE_TYPE", default_value = "buildplane")]
    plane_type: PlaneType,
    /// The gateway's serving CA.
    #[arg(long, env = "SERVER_CA", default_value = "/ca-certs/ca.crt")]
    server_ca: PathBuf,
    /// First backoff ceiling.
    #[arg(long, default_value = "500ms", value_parser = parse_positive_duration)]
    backoff_base: Duration,
    /// Largest backoff ceiling.
    #[arg(long, default_value = "30s", value_parser = parse_positive_duration)]
    backoff_cap: Duration,
    /// Tunnel protocol: v2 (binary, streaming) or v1 (OpenChoreo JSON).
    #[arg(long, default_value = "v2")]
    protocol: String,
    /// Requests run at once (up to four times as many wait; more get 503).
    #[arg(long, default_value_t = 64)]
    max_concurrent_requests: usize,
    /// Time between pings to the gateway.
    #[arg(long, default_value = "15s", value_parser = parse_positive_duration)]
    ping_interval: Duration,
    /// A gateway silent this long is considered gone; the agent reconnects.
    #[arg(long, default_value = "45s", value_parser = parse_positive_duration)]
    read_deadline: Duration,
}

#[derive(Subcommand)]
enum Command {
    /// Connect and serve until interrupted.
    Run {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        connection: Connection,
        /// The planeID this agent serves.
        #[arg(long, env = "PLANE_ID")]
        plane_id: String,
        /// Renew the client certificate this long before it expires.
        #[arg(long, default_value = "8h", value_parser = parse_positive_duration)]
        renew_before: Duration,
        /// Health listener (`/healthz`, `/readyz`).
        #[arg(long, default_value = "0.0.0.0:8081")]
        health_listen: SocketAddr,
        /// Instance id (defaults to the pod name, else a random id per process).
        #[arg(long, env = "POD_NAME")]
        agent_id: Option<String>,
        /// The plane CRs this agent serves: `<namespace>/<name>`, `<namespace>/*`,
        /// `_cluster/<name>` or `_cluster/*` (repeatable, or comma-separated). The gateway
        /// grants no other CR, even one holding this agent's CA. Default: every CR that admits
        /// the agent's certificate.
        #[arg(long = "serve", env = "SERVE", value_delimiter = ',')]
        serve: Vec<ServedCr>,
    },
    /// Run N agents in one process (planeIDs PREFIX-0..PREFIX-(N-1)) sharing one generated CA.
    Swarm {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        connection: Connection,
        /// Number of agents.
        #[arg(long)]
        count: usize,
        /// planeID prefix.
        #[arg(long)]
        plane_id_prefix: String,
        /// Where to write the shared CA certificate (PEM).
        #[arg(long)]
        ca_out: Option<PathBuf>,
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

fn agent_config(
    common: &Common,
    connection: Connection,
    plane_id: String,
) -> anyhow::Result<AgentConfig> {
    let protocol = match connection.protocol.as_str() {
        "v1" | "1" => 1,
        "v2" | "2" => 2,
        other => anyhow::bail!("--protocol must be v1 or v2, not {other:?}"),
    };
    if connection.backoff_base.is_zero() || connection.backoff_cap < connection.backoff_base {
        anyhow::bail!("--backoff-base must be positive and at most --backoff-cap");
    }
    let mut config = AgentConfig::new(connection.server_url, plane_id);
    config.plane_type = connection.plane_type.as_str().to_owned();
    config.kubeconfig = common.kubeconfig.clone();
    config.server_ca = connection.server_ca;
    config.identity_namespace = common.identity_namespace.clone();
    config.leaf_validity = common.leaf_validity;
    config.backoff = Backoff::new(connection.backoff_base, connection.backoff_cap);
    config.protocol = protocol;
    config.max_concurrent_requests = connection.max_concurrent_requests;
    config.ping_interval = connection.ping_interval.max(Duration::from_millis(100));
    config.read_deadline = connection.read_deadline;
    Ok(config)
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
    // A swarm holds one socket per agent.
    buildplane_runtime::raise_open_files_limit();
    match Flags::parse().command {
        Command::Run {
            common,
            connection,
            plane_id,
            renew_before,
            health_listen,
            agent_id,
            serve,
        } => {
            if plane_id.is_empty() {
                anyhow::bail!("--plane-id must not be empty");
            }
            if renew_before >= common.leaf_validity {
                anyhow::bail!("--renew-before must be shorter than --leaf-validity");
            }
            let mut config = agent_config(&common, connection, plane_id)?;
            config.renew_before = renew_before;
            config.health_listen = Some(health_listen);
            if let Some(agent_id) = agent_id {
                config.agent_id = agent_id;
            }
            config.served = serve.into_iter().collect();
            cluster_agent::run(config).await
        }
        Command::Swarm {
            common,
            connection,
            count,
            plane_id_prefix,
            ca_out,
        } => {
            let server_ca = connection.server_ca.clone();
            let agent = agent_config(&common, connection, String::new())?;
            cluster_agent::swarm::run(
                SwarmConfig {
                    count,
                    plane_id_prefix,
                    agent,
                    ca_out,
                },
                server_ca,
            )
            .await
        }
        Command::RotateCa {
            common,
            plane_id,
            finish,
        } => {
            let client = buildplane_runtime::kube_client(common.kubeconfig.as_deref()).await?;
            let bundle = cluster_agent::identity::rotate_ca(
                &client,
                &common.identity_namespace,
                &plane_id,
                finish,
                common.leaf_validity,
            )
            .await?;
            print!("{bundle}");
            Ok(())
        }
        Command::Renew { common, plane_id } => {
            let client = buildplane_runtime::kube_client(common.kubeconfig.as_deref()).await?;
            let ca = cluster_agent::identity::load_ca(&client, &common.identity_namespace).await?;
            cluster_agent::identity::renew(
                &client,
                &common.identity_namespace,
                &plane_id,
                &ca,
                common.leaf_validity,
            )
            .await?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plane_type_of(args: &[&str]) -> Result<String, String> {
        let argv = ["cluster-agent", "run", "--plane-id", "p"]
            .iter()
            .chain(args)
            .copied();
        match Flags::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .command
        {
            Command::Run { connection, .. } => Ok(connection.plane_type.to_string()),
            _ => Err("not run".into()),
        }
    }

    /// `--plane-type` takes `buildplane` (the default) and `workflowplane`, and refuses any
    /// other plane type when the flags are parsed (issue #19), not at the gateway's 400.
    #[test]
    fn plane_type_flag_accepts_only_build_plane_names() {
        assert_eq!(plane_type_of(&[]).as_deref(), Ok("buildplane"));
        assert_eq!(
            plane_type_of(&["--plane-type", "workflowplane"]).as_deref(),
            Ok("workflowplane")
        );
        for other in ["dataplane", "observabilityplane", ""] {
            let err = plane_type_of(&["--plane-type", other]).expect_err(other);
            assert!(
                err.contains("expected buildplane or workflowplane"),
                "{err}"
            );
        }
    }

    fn run_flags(extra: &[&str]) -> Result<Flags, clap::Error> {
        let mut args = vec!["cluster-agent", "run", "--plane-id", "p"];
        args.extend_from_slice(extra);
        Flags::try_parse_from(args)
    }

    /// Interval and timeout flags refuse zero at the command line (a zero read deadline drops
    /// every connection at once; a zero interval panics `tokio::time::interval`), and accept
    /// days.
    #[test]
    fn interval_flags_refuse_zero() {
        for flag in ["--read-deadline", "--ping-interval", "--renew-before"] {
            let err = run_flags(&[flag, "0s"]).err().expect(flag);
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{flag}"
            );
            assert!(err.to_string().contains("too short"), "{flag}: {err}");
        }
        let huge = run_flags(&["--leaf-validity", "99999999999999999999999s"])
            .err()
            .expect("huge");
        assert!(huge.to_string().contains("too long"), "{huge}");
        assert!(run_flags(&["--leaf-validity", "30d"]).is_ok());
    }
}
