//! `buildplane-controller`: reconciles BuildPlane and ClusterBuildPlane resources.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use buildplane_controller::{Config, DEFAULT_DISCONNECT_GRACE, leader::LeaseConfig};
use buildplane_runtime::parse_positive_duration;
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
    /// How long a standby waits, after it last saw the Lease change, before taking over.
    #[arg(long, default_value = "15s", value_parser = parse_positive_duration)]
    leader_election_lease_duration: Duration,
    /// The leader stops reconciling when it could not renew the Lease for this long (shorter
    /// than the lease duration).
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    leader_election_renew_deadline: Duration,
    /// How often the leader renews the Lease and a standby retries.
    #[arg(long, default_value = "2s", value_parser = parse_positive_duration)]
    leader_election_retry_period: Duration,
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
    let leader = lease_config(&flags)?;
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

/// The Lease settings, unless leader election is off.
fn lease_config(flags: &Flags) -> anyhow::Result<Option<LeaseConfig>> {
    if flags.no_leader_election {
        return Ok(None);
    }
    let identity = flags.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let lease = LeaseConfig {
        duration: flags.leader_election_lease_duration,
        renew_deadline: flags.leader_election_renew_deadline,
        renew_every: flags.leader_election_retry_period,
        ..LeaseConfig::new(
            flags.leader_election_namespace.clone(),
            "buildplane-controller",
            identity,
        )
    };
    lease.validate().map_err(anyhow::Error::msg)?;
    Ok(Some(lease))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Result<Flags, clap::Error> {
        Flags::try_parse_from(std::iter::once("buildplane-controller").chain(extra.iter().copied()))
    }

    /// Lease timings refuse zero at the command line, and a renew deadline that is not shorter
    /// than the lease duration (two leaders could overlap).
    #[test]
    fn lease_flags_are_validated() {
        let err = parse(&["--leader-election-retry-period", "0s"]).expect_err("zero");
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(err.to_string().contains("too short"), "{err}");

        let flags = parse(&[]).unwrap();
        let lease = lease_config(&flags)
            .unwrap()
            .expect("leader election by default");
        assert_eq!(
            (lease.duration, lease.renew_deadline, lease.renew_every),
            (
                Duration::from_secs(15),
                Duration::from_secs(10),
                Duration::from_secs(2)
            )
        );

        let flags = parse(&["--leader-election-renew-deadline", "15s"]).unwrap();
        let err = lease_config(&flags).expect_err("deadline = duration");
        assert!(err.to_string().contains("renew deadline"), "{err}");
        let flags = parse(&[
            "--no-leader-election",
            "--leader-election-renew-deadline",
            "1m",
        ]);
        assert!(lease_config(&flags.unwrap()).unwrap().is_none());
    }
}
