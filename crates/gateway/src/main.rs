//! `cluster-gateway`: admits cluster agents and proxies Kubernetes requests to them.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;

/// The control plane's end of the BuildPlane tunnel.
#[derive(Parser, Debug)]
#[command(version)]
struct Flags {
    /// Kubeconfig of the control cluster (in-cluster configuration when absent).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Agent listener (`/ws`).
    #[arg(long, default_value = "0.0.0.0:8443")]
    agent_listen: SocketAddr,
    /// Internal API listener (mTLS).
    #[arg(long, default_value = "0.0.0.0:8444")]
    internal_listen: SocketAddr,
    /// Health listener (plain HTTP).
    #[arg(long, default_value = "0.0.0.0:8080")]
    health_listen: SocketAddr,
    /// Agent listener certificate.
    #[arg(long, default_value = "/certs/tls.crt")]
    server_cert: PathBuf,
    /// Agent listener key.
    #[arg(long, default_value = "/certs/tls.key")]
    server_key: PathBuf,
    /// Internal API certificate (defaults to the agent listener's).
    #[arg(long)]
    internal_server_cert: Option<PathBuf>,
    /// Internal API key.
    #[arg(long)]
    internal_server_key: Option<PathBuf>,
    /// CA of the internal API's clients (controller, harness).
    #[arg(long, default_value = "/internal-ca/ca.crt")]
    internal_client_ca: PathBuf,
    /// Time between pings (`15s`, `500ms`, `1m`; a bare number is seconds).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    heartbeat_interval: Duration,
    /// Silence after which an agent is disconnected.
    #[arg(long, default_value = "45s", value_parser = parse_duration)]
    heartbeat_timeout: Duration,
    /// Concurrent TLS handshakes on the agent listener; excess connections are closed.
    #[arg(long, default_value_t = 256)]
    max_concurrent_handshakes: usize,
}

/// Parses `500ms`, `15s`, `2m`, `1h`, or a bare number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "invalid duration unit in {text:?}; use ms, s, m or h"
            ));
        }
    };
    if !seconds.is_finite() || seconds <= 0.0 {
        return Err(format!("duration {text:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(seconds))
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
    let internal_server_cert = match (flags.internal_server_cert, flags.internal_server_key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => anyhow::bail!("--internal-server-cert and --internal-server-key go together"),
    };
    let _gateway = cluster_gateway::start(cluster_gateway::GatewayConfig {
        kubeconfig: flags.kubeconfig,
        agent_listen: flags.agent_listen,
        internal_listen: flags.internal_listen,
        health_listen: flags.health_listen,
        server_cert: (flags.server_cert, flags.server_key),
        internal_server_cert,
        internal_client_ca: flags.internal_client_ca,
        heartbeat_interval: flags.heartbeat_interval,
        heartbeat_timeout: flags.heartbeat_timeout,
        max_concurrent_handshakes: flags.max_concurrent_handshakes,
    })
    .await?;
    tokio::signal::ctrl_c().await?;
    Ok(())
}
