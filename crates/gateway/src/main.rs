//! `cluster-gateway`: admits cluster agents and proxies Kubernetes requests to them.

#[global_allocator]
static GLOBAL: buildplane_runtime::Allocator = buildplane_runtime::Allocator;

use std::{net::SocketAddr, num::NonZeroU32, path::PathBuf, time::Duration};

use buildplane_runtime::parse_positive_duration;
use clap::Parser;

/// The control plane's end of the BuildPlane tunnel.
#[derive(Parser, Debug)]
#[command(version)]
struct Flags {
    /// Kubeconfig of the control cluster (in-cluster configuration when absent).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Agent listener (`/ws`); `AGENT_SERVER_PORT` sets only its port.
    #[arg(long)]
    agent_listen: Option<SocketAddr>,
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
    #[arg(long, default_value = "30s", value_parser = parse_positive_duration)]
    heartbeat_interval: Duration,
    /// Silence after which an agent is disconnected.
    #[arg(long, default_value = "90s", value_parser = parse_positive_duration)]
    heartbeat_timeout: Duration,
    /// A connection whose agent leaves a probe unanswered this long is silent: no request goes
    /// there, and requests waiting there stop waiting, until the agent is heard again (a probe
    /// goes out when a request waits on a connection quiet for a second).
    #[arg(long, default_value = "3s", value_parser = parse_positive_duration)]
    liveness_timeout: Duration,
    /// The gateway's Service, `<namespace>/<name>`: its EndpointSlices list the sibling
    /// replicas, to which a request goes (once) when no connection of this replica can take it.
    #[arg(long, requires_all = ["peer_client_cert", "peer_client_key", "peer_ca"])]
    peer_service: Option<String>,
    /// The name of the internal API's port in the Service's EndpointSlices.
    #[arg(long, default_value = "internal")]
    peer_port_name: String,
    /// The name the siblings' internal certificate is checked against (default
    /// `<name>.<namespace>.svc` of `--peer-service`).
    #[arg(long)]
    peer_server_name: Option<String>,
    /// Client certificate (of `--internal-client-ca`) presented to sibling replicas.
    #[arg(long)]
    peer_client_cert: Option<PathBuf>,
    /// Key of `--peer-client-cert`.
    #[arg(long)]
    peer_client_key: Option<PathBuf>,
    /// CA that signed the sibling replicas' internal API certificate.
    #[arg(long)]
    peer_ca: Option<PathBuf>,
    /// Concurrent TLS handshakes on the agent listener; further connections wait in the kernel's
    /// accept queue until one finishes.
    #[arg(long, default_value_t = 256)]
    max_concurrent_handshakes: usize,
    /// Live connections one agent certificate (leaf public key) may hold; excess get 429
    /// (0: no cap).
    #[arg(long, default_value_t = 4)]
    max_connections_per_identity: usize,
    /// Live connections one planeID may hold; excess get 429 (0: no cap).
    #[arg(long, default_value_t = 64)]
    max_connections_per_plane: usize,
    /// Live connections the agents of one clientCA may hold, over all planeIDs; excess get 429
    /// (0: no cap).
    #[arg(long, default_value_t = 10_000)]
    max_connections_per_ca: usize,
    /// A connection that sends no TLS ClientHello within this long is closed; until its first
    /// byte it holds no handshake slot.
    #[arg(long, default_value = "3s", value_parser = parse_positive_duration)]
    hello_timeout: Duration,
    /// Connections one source address may hold open before they send their first byte; more
    /// are closed at once.
    #[arg(long, default_value_t = 32)]
    max_idle_per_source: usize,
    /// On shutdown, agent connections are told to drain (`GoAway`) spread over this long.
    #[arg(long, default_value = "1s", value_parser = parse_positive_duration)]
    shutdown_stagger: Duration,
    /// Requests in flight on a draining connection (shutdown, reconnect) get this long to
    /// finish before the connection closes.
    #[arg(long, default_value = "30s", value_parser = parse_positive_duration)]
    drain_timeout: Duration,
    /// A proxied body that makes no progress this long (the agent grants no credit, or the
    /// caller reads nothing) is reset with an error.
    #[arg(long, default_value = "60s", value_parser = parse_positive_duration)]
    stream_stall_timeout: Duration,
    /// Verdicts of chain verification remembered by (presented chain, clientCA bundle), so a
    /// relist or an agent reconnecting with the same leaf costs no signature check; 0 turns the
    /// cache off.
    #[arg(long, default_value_t = buildplane_pki::DEFAULT_VERDICT_CAPACITY)]
    verdict_cache_size: usize,
    /// This replica's id among the gateway replicas (in Kubernetes, the pod name), told to
    /// agents in the upgrade's 101; default: the host name.
    #[arg(long, env = "POD_NAME")]
    replica_id: Option<String>,
    /// On SIGTERM, report not ready (leaving the Service's endpoints) and keep serving this
    /// long before the drain begins.
    #[arg(long, default_value = "0s", value_parser = buildplane_runtime::parse_duration)]
    shutdown_delay: Duration,
    /// How many gateway replicas serve behind the agents' address: an agent of ours holds one
    /// connection to each, so any replica can route any request.
    #[arg(long, env = "GATEWAY_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    replicas: u32,
    /// A path the proxy refuses with 403 (repeatable): `/`-separated segments, `*` for any one
    /// segment, denying the path and everything below it (`/api/v1/namespaces/*/configmaps`).
    /// Without the flag the defaults apply (Secrets cluster-wide and in kube-system, the
    /// serviceaccounts/NAME/token subresource); `default` stands for them among other rules.
    #[arg(long = "proxy-deny", value_name = "RULE")]
    proxy_deny: Vec<String>,
    /// Proxied requests per second one planeID may send through this replica; more get 429
    /// with `Retry-After`, before their body is read (0: no limit). A watch counts once.
    #[arg(long, default_value_t = 0)]
    plane_rate_limit: u32,
    /// Requests one planeID may send at once after a quiet spell (default: one second's worth
    /// of `--plane-rate-limit`).
    #[arg(long, requires = "plane_rate_limit")]
    plane_rate_burst: Option<NonZeroU32>,
    /// Response bytes that cost one more of the planeID's requests under
    /// `--plane-rate-limit`, so a 600 KiB list costs about ten requests, not one (0: every
    /// request costs one, whatever it returns).
    #[arg(long, default_value_t = cluster_gateway::rate::DEFAULT_BYTES_PER_TOKEN)]
    plane_rate_request_bytes: u32,
}

/// The `--plane-rate-*` flags as a rate, or none.
fn plane_rate(flags: &Flags) -> Option<cluster_gateway::rate::PlaneRate> {
    let per_second = NonZeroU32::new(flags.plane_rate_limit)?;
    Some(cluster_gateway::rate::PlaneRate {
        per_second,
        burst: flags.plane_rate_burst.unwrap_or(per_second),
        bytes_per_token: NonZeroU32::new(flags.plane_rate_request_bytes),
    })
}

/// The agent listener address: `--agent-listen`, else `0.0.0.0:$AGENT_SERVER_PORT`, else
/// `0.0.0.0:8443`.
fn agent_listen(flag: Option<SocketAddr>) -> anyhow::Result<SocketAddr> {
    if let Some(addr) = flag {
        return Ok(addr);
    }
    let port = match std::env::var("AGENT_SERVER_PORT") {
        Ok(port) if !port.is_empty() => port
            .parse::<u16>()
            .map_err(|_| anyhow::anyhow!("AGENT_SERVER_PORT={port:?} is not a port number"))?,
        _ => 8443,
    };
    Ok(SocketAddr::from(([0, 0, 0, 0], port)))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    // Every agent holds a socket: thousands of agents need more than the usual 1,024.
    buildplane_runtime::raise_open_files_limit();
    let flags = Flags::parse();
    let plane_rate = plane_rate(&flags);
    let internal_server_cert = match (flags.internal_server_cert, flags.internal_server_key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => anyhow::bail!("--internal-server-cert and --internal-server-key go together"),
    };
    let proxy_policy = cluster_gateway::policy::ProxyPolicy::from_flags(&flags.proxy_deny)?;
    let peers = match (
        &flags.peer_service,
        flags.peer_client_cert,
        flags.peer_client_key,
        flags.peer_ca,
    ) {
        (Some(service), Some(cert), Some(key), Some(ca)) => {
            let mut peers = cluster_gateway::peers::PeersConfig::new(service, (cert, key), ca)?;
            peers.port_name = flags.peer_port_name;
            if let Some(name) = flags.peer_server_name {
                peers.server_name = name;
            }
            Some(peers)
        }
        _ => None,
    };
    let mut gateway = cluster_gateway::start(cluster_gateway::GatewayConfig {
        kubeconfig: flags.kubeconfig,
        agent_listen: agent_listen(flags.agent_listen)?,
        internal_listen: flags.internal_listen,
        health_listen: flags.health_listen,
        server_cert: (flags.server_cert, flags.server_key),
        internal_server_cert,
        internal_client_ca: flags.internal_client_ca,
        heartbeat_interval: flags.heartbeat_interval,
        heartbeat_timeout: flags.heartbeat_timeout,
        liveness_timeout: flags.liveness_timeout,
        peers,
        max_concurrent_handshakes: flags.max_concurrent_handshakes,
        connection_caps: cluster_gateway::caps::ConnectionCaps {
            per_identity: flags.max_connections_per_identity,
            per_plane: flags.max_connections_per_plane,
            per_ca: flags.max_connections_per_ca,
        },
        hello_timeout: flags.hello_timeout,
        max_idle_per_source: flags.max_idle_per_source,
        shutdown_stagger: flags.shutdown_stagger,
        drain_timeout: flags.drain_timeout,
        stream_stall_timeout: flags.stream_stall_timeout,
        verdict_cache_size: flags.verdict_cache_size,
        replica: cluster_gateway::Replica {
            id: match flags.replica_id.filter(|id| !id.is_empty()) {
                Some(id) => id,
                None => host_name(),
            },
            count: flags.replicas,
        },
        cert_reload_interval: Duration::from_secs(2),
        proxy_policy,
        plane_rate,
    })
    .await?;
    let ended = gateway
        .run_until(buildplane_runtime::shutdown_signal())
        .await;
    match &ended {
        Ok(()) => {
            if !flags.shutdown_delay.is_zero() {
                tracing::info!(
                    delay_ms = flags.shutdown_delay.as_millis() as u64,
                    "not ready; serving on until the endpoints have moved, then draining"
                );
                gateway.shared.not_ready();
                tokio::time::sleep(flags.shutdown_delay).await;
            }
            tracing::info!("shutting down");
        }
        Err(err) => tracing::error!(%err, "a gateway task ended; shutting down"),
    }
    let stopped = gateway.shutdown(flags.shutdown_stagger).await;
    ended.and(stopped)?;
    Ok(())
}

/// The host name (`/proc/sys/kernel/hostname`), or `gateway-0`.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "gateway-0".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Interval flags refuse zero and values that overflow a deadline (the old parser panicked
    /// in `Duration::from_secs_f64`) with a message, and take the same units as every binary.
    #[test]
    fn interval_flags_are_bounded() {
        let parse =
            |flag: &str, value: &str| Flags::try_parse_from(["cluster-gateway", flag, value]);
        let err = parse("--heartbeat-interval", "0s").expect_err("zero");
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(err.to_string().contains("too short"), "{err}");
        let err = parse("--heartbeat-timeout", "99999999999999999999999s").expect_err("huge");
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(err.to_string().contains("too long"), "{err}");
        let flags = parse("--shutdown-stagger", "1d").expect("days");
        assert_eq!(flags.shutdown_stagger, Duration::from_secs(86_400));
    }

    /// Forwarding to siblings needs the client identity and the siblings' CA with the Service;
    /// the liveness timeout is a duration like the others.
    #[test]
    fn peer_flags_go_together() {
        let err = Flags::try_parse_from(["cluster-gateway", "--peer-service", "ns/gw"])
            .expect_err("no client identity");
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let flags = Flags::try_parse_from([
            "cluster-gateway",
            "--peer-service",
            "ns/gw",
            "--peer-client-cert",
            "c",
            "--peer-client-key",
            "k",
            "--peer-ca",
            "ca",
            "--liveness-timeout",
            "500ms",
        ])
        .expect("all given");
        assert_eq!(flags.liveness_timeout, Duration::from_millis(500));
        assert_eq!(flags.peer_port_name, "internal");
        let err = Flags::try_parse_from(["cluster-gateway", "--liveness-timeout", "0s"])
            .expect_err("zero");
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
    }

    /// No limit by default; the burst defaults to one second's worth and is never zero;
    /// 64 KiB of response cost one request unless told otherwise, 0 turns that off.
    #[test]
    fn plane_rate_flags() {
        let rate = |args: &[&str]| {
            let flags = Flags::try_parse_from([&["cluster-gateway"], args].concat())?;
            Ok::<_, clap::Error>(plane_rate(&flags))
        };
        assert_eq!(rate(&[]).unwrap(), None);
        assert_eq!(rate(&["--plane-rate-limit", "0"]).unwrap(), None);
        let limited = rate(&["--plane-rate-limit", "50"])
            .unwrap()
            .expect("a rate");
        assert_eq!((limited.per_second.get(), limited.burst.get()), (50, 50));
        assert_eq!(
            limited.bytes_per_token.map(NonZeroU32::get),
            Some(64 * 1024)
        );
        let by_requests = rate(&[
            "--plane-rate-limit",
            "50",
            "--plane-rate-request-bytes",
            "0",
        ])
        .unwrap()
        .expect("a rate");
        assert_eq!(by_requests.bytes_per_token, None);
        let burst = rate(&["--plane-rate-limit", "50", "--plane-rate-burst", "200"])
            .unwrap()
            .expect("a rate");
        assert_eq!(burst.burst.get(), 200);
        let err = rate(&["--plane-rate-limit", "5", "--plane-rate-burst", "0"]).expect_err("zero");
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
    }
}
