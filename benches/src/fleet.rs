//! Many agents against a gateway process: idle memory per agent and the restart storm.
//!
//! The gateway runs as `cluster-gateway` (so its RSS is its own) against an in-process kube-sim;
//! agents run in several `cluster-agent swarm` processes (at most a few thousand sockets each,
//! under the 20,000 open files per process). The swarms are stopped (SIGSTOP) while their
//! BuildPlanes are created, so the baseline RSS holds every CR and no connection. Idle memory
//! per agent is the slope between two fleet sizes (half the swarms, then all), each read after a
//! heartbeat period.
//!
//! With `--replicas N` (N > 1) the gateway is N `cluster-gateway` processes (`--replica-id
//! gateway-I --replicas N`) behind round-robin balancers (`buildplane-bench balance`, one process
//! beside each swarm process, which dials through it), and every agent holds one connection to
//! each replica. That run is the restart storm only: every replica is killed (SIGKILL) and
//! started again, and the storm's figures say when every agent held one connection again and
//! when it held all N, and what it cost in handshakes (admissions, 409s from a replica the agent
//! held already) and CPU.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use buildplane_benches::{Pki, fixture};
use futures::{StreamExt as _, TryStreamExt as _};
use tokio::time::Instant;
use tracing::info;

/// `buildplane-bench fleet`.
#[derive(clap::Args)]
pub(crate) struct FleetFlags {
    /// Agents.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Swarm processes the agents are spread over.
    #[arg(long, default_value_t = 2)]
    processes: usize,
    /// Directory holding `cluster-gateway` and `cluster-agent`.
    #[arg(long)]
    bin_dir: PathBuf,
    /// Kill and restart the gateway once every agent is connected.
    #[arg(long)]
    storm: bool,
    /// Give up waiting for agents after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
    /// Swarm backoff ceiling of the first retry.
    #[arg(long, default_value = "100ms")]
    backoff_base: String,
    /// Swarm backoff cap.
    #[arg(long, default_value = "5s")]
    backoff_cap: String,
    /// Keep the fleet connected and idle this many seconds before the storm, sampling the
    /// gateway's connections, RSS and CPU (the soak).
    #[arg(long, default_value_t = 0)]
    soak_secs: u64,
    /// Gateway replicas behind round-robin balancers, each agent holding one connection to
    /// every replica. Above 1, the run is the restart storm only (every replica killed and
    /// restarted): no memory, trust or soak figures.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    replicas: u32,
    /// Put the balancer in front of a single gateway too (implied with more than one replica).
    #[arg(long)]
    balancer: bool,
}

const NAMESPACE: &str = "fleet";

pub(crate) struct Ports {
    pub(crate) agent: u16,
    pub(crate) internal: u16,
    pub(crate) health: u16,
}

/// Child processes, killed when dropped.
pub(crate) struct Children(pub(crate) Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Which of these children have exited, and how, for an error that may come from it (a swarm
/// that died leaves its agents unconnected).
fn exited(groups: &mut [(&str, &mut Children)]) -> String {
    let mut gone = Vec::new();
    for (what, children) in groups.iter_mut() {
        for (i, child) in children.0.iter_mut().enumerate() {
            if let Ok(Some(status)) = child.try_wait() {
                gone.push(format!("{what} {i} exited ({status})"));
            }
        }
    }
    if gone.is_empty() {
        "every swarm and balancer process is running".into()
    } else {
        gone.join(", ")
    }
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub(crate) fn log_file(dir: &Path, name: &str) -> anyhow::Result<Stdio> {
    Ok(std::fs::File::create(dir.join(format!("{name}.log")))?.into())
}

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

pub(crate) fn signal(pids: &[u32], sig: &str) -> anyhow::Result<()> {
    for pid in pids {
        let status = Command::new("kill")
            .args([format!("-{sig}"), pid.to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -{sig} {pid} failed");
        }
    }
    Ok(())
}

/// A counter of the gateway's `/metrics` (0 before its first sample).
async fn gateway_counter(ports: &Ports, name: &str) -> anyhow::Result<u64> {
    let text = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/metrics", ports.health))
        .send()
        .await?
        .text()
        .await?;
    let prefix = format!("{name} ");
    Ok(text
        .lines()
        .find_map(|line| line.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or(0))
}

/// The gateway's count of re-verified connections.
async fn reverified(ports: &Ports) -> anyhow::Result<u64> {
    gateway_counter(ports, "cluster_gateway_reverified_connections_total").await
}

/// Trust changes with the whole fleet connected: what 20 changes of a Secret no BuildPlane reads
/// cost the gateway (connections re-verified, CPU), and the time from one BuildPlane's clientCA
/// change to its connection being re-verified.
async fn trust_changes(
    kube: &kube::Client,
    ports: &Ports,
    gateway_pid: u32,
    (plane, ca): &(String, String),
) -> anyhow::Result<serde_json::Value> {
    use k8s_openapi::{ByteString, api::core::v1::Secret};
    use kube::api::{Api, Patch, PatchParams};
    const CHANGES: usize = 20;
    let secrets: Api<Secret> = Api::namespaced(kube.clone(), NAMESPACE);
    let before = reverified(ports).await?;
    let cpu_before = crate::cpu::cpu_seconds(gateway_pid)?;
    for i in 0..CHANGES {
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some("unrelated".into()),
                ..Default::default()
            },
            data: Some([("token".to_owned(), ByteString(i.to_string().into_bytes()))].into()),
            ..Secret::default()
        };
        secrets
            .patch(
                "unrelated",
                &PatchParams::apply("buildplane-bench").force(),
                &Patch::Apply(&secret),
            )
            .await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let unrelated = reverified(ports).await? - before;
    let cpu_unrelated = crate::cpu::cpu_seconds(gateway_pid)? - cpu_before;

    let rotated = buildplane_pki::Ca::generate("fleet-rotated", Duration::from_secs(86_400))?;
    let bundle = format!("{ca}{}", rotated.cert_pem());
    let before = reverified(ports).await?;
    let started = Instant::now();
    fixture::apply_build_plane(kube, NAMESPACE, plane, plane, &bundle).await?;
    let ca_change_secs = loop {
        if reverified(ports).await? > before {
            break started.elapsed().as_secs_f64();
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("no connection re-verified within 30 s of a clientCA change");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(serde_json::json!({
        "unrelated_secret_changes": CHANGES,
        "reverified_after_unrelated": unrelated,
        "gateway_cpu_secs_unrelated": cpu_unrelated,
        "ca_change_reverify_secs": ca_change_secs,
        "reverified_after_ca_change": reverified(ports).await? - before,
    }))
}

/// The gateway's count of admitted connections: a rise while idle is a reconnect.
async fn admissions(ports: &Ports) -> anyhow::Result<u64> {
    gateway_counter(ports, "cluster_gateway_admissions_total").await
}

/// The fleet idle for `duration` with heartbeats: connections and RSS sampled every 10 s,
/// reconnects counted from the gateway's admissions, CPU read from `/proc`. The RSS growth is
/// the last sample against the first, which is taken one sampling period in (after every
/// connection has pinged).
async fn soak(
    http: &reqwest::Client,
    base: &str,
    ports: &Ports,
    gateway_pid: u32,
    count: usize,
    duration: Duration,
) -> anyhow::Result<serde_json::Value> {
    const EVERY: Duration = Duration::from_secs(10);
    info!(count, secs = duration.as_secs(), "soak: the fleet idles");
    let admitted_before = admissions(ports).await?;
    let cpu_before = crate::cpu::cpu_seconds(gateway_pid)?;
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut fewest = count;
    while started.elapsed() < duration {
        tokio::time::sleep(EVERY.min(duration.saturating_sub(started.elapsed()))).await;
        let connected = connections(http, base).await.unwrap_or(0);
        fewest = fewest.min(connected);
        let rss = rss_kib(gateway_pid)?;
        info!(
            t = started.elapsed().as_secs(),
            connected,
            rss_kib = rss,
            "soak sample"
        );
        samples.push(serde_json::json!({
            "t": started.elapsed().as_secs_f64(),
            "connections": connected,
            "rss_kib": rss,
        }));
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = crate::cpu::cpu_seconds(gateway_pid)? - cpu_before;
    let rss_of = |sample: &serde_json::Value| sample["rss_kib"].as_f64().unwrap_or(f64::NAN);
    let growth = match (samples.first(), samples.last()) {
        (Some(first), Some(last)) => (rss_of(last) / rss_of(first) - 1.0) * 100.0,
        _ => f64::NAN,
    };
    Ok(serde_json::json!({
        "secs": secs,
        "agents": count,
        "fewest_connections": fewest,
        "reconnects": admissions(ports).await? - admitted_before,
        "rss_growth_pct": growth,
        "gateway_cpu_secs": cpu,
        "cpu_us_per_agent_per_sec": cpu / secs / count as f64 * 1e6,
        "heartbeat_interval_secs": HEARTBEAT.as_secs(),
        "samples": samples,
    }))
}

/// The gateway's ping interval in the fleet: short, so a memory reading after one period sees
/// every connection after its pings.
const HEARTBEAT: Duration = Duration::from_secs(3);

/// Waits until `count` agents are connected to every replica (`bases`, their internal APIs);
/// returns how long it took (seconds).
async fn wait_connected(
    http: &reqwest::Client,
    bases: &[String],
    count: usize,
    within: Duration,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    loop {
        let mut fewest = usize::MAX;
        for base in bases {
            fewest = fewest.min(connections(http, base).await.unwrap_or(0));
        }
        if fewest >= count {
            return Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() > within {
            bail!(
                "only {fewest} of {count} agents connected (to the replica holding fewest of {}) within {within:?}",
                bases.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub(crate) fn spawn_gateway(
    bin_dir: &Path,
    dir: &Path,
    files: &fixture::PkiFiles,
    kubeconfig: &Path,
    ports: &Ports,
    generation: usize,
) -> anyhow::Result<Child> {
    spawn_replica(bin_dir, dir, files, kubeconfig, ports, None, generation)
}

/// One of `Replica::count` replicas (`--replica-id gateway-INDEX --replicas COUNT`), or a gateway
/// that says nothing of replicas (`None`, as OpenChoreo's).
#[derive(Clone, Copy)]
struct Replica {
    index: usize,
    count: u32,
}

fn spawn_replica(
    bin_dir: &Path,
    dir: &Path,
    files: &fixture::PkiFiles,
    kubeconfig: &Path,
    ports: &Ports,
    replica: Option<Replica>,
    generation: usize,
) -> anyhow::Result<Child> {
    let mut command = Command::new(bin_dir.join("cluster-gateway"));
    let log = match replica {
        Some(Replica { index, count }) => {
            command
                .args(["--replica-id", &format!("gateway-{index}")])
                .args(["--replicas", &count.to_string()]);
            format!("gateway-{index}-{generation}")
        }
        None => format!("gateway-{generation}"),
    };
    command
        .args(["--kubeconfig".as_ref(), kubeconfig.as_os_str()])
        .args(["--agent-listen", &format!("127.0.0.1:{}", ports.agent)])
        .args([
            "--internal-listen",
            &format!("127.0.0.1:{}", ports.internal),
        ])
        .args(["--health-listen", &format!("127.0.0.1:{}", ports.health)])
        .args(["--heartbeat-interval", &format!("{}s", HEARTBEAT.as_secs())])
        .args(["--server-cert".as_ref(), files.server_cert.as_os_str()])
        .args(["--server-key".as_ref(), files.server_key.as_os_str()])
        .args([
            "--internal-client-ca".as_ref(),
            files.internal_ca.as_os_str(),
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log_file(dir, &log)?)
        .spawn()
        .context("starting cluster-gateway (build it with cargo build -p cluster-gateway)")
}

pub(crate) async fn wait_ready(ports: &Ports, within: Duration) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{}/readyz", ports.health);
    let deadline = Instant::now() + within;
    loop {
        let ready = matches!(http.get(&url).send().await, Ok(res) if res.status().is_success());
        if ready
            && tokio::net::TcpStream::connect(("127.0.0.1", ports.agent))
                .await
                .is_ok()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the gateway was not ready within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn connections(http: &reqwest::Client, base: &str) -> anyhow::Result<usize> {
    let body: serde_json::Value = http
        .get(format!("{base}/api/v1/connections"))
        .send()
        .await?
        .json()
        .await?;
    Ok(body["total"].as_u64().unwrap_or(0) as usize)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// An in-process kube-sim with the CRDs and `namespace`, and its kubeconfig written in `dir` for
/// the gateway and agent processes.
pub(crate) async fn control_cluster(
    name: &str,
    namespace: &str,
    dir: &Path,
) -> anyhow::Result<(kube_sim::RunningServer, kube::Client, std::path::PathBuf)> {
    let control = kube_sim::Server::start(kube_sim::Config {
        name: name.into(),
        ..kube_sim::Config::default()
    })
    .await?;
    let kube = control.client().await?;
    fixture::install_crds(&kube).await?;
    fixture::create_namespace(&kube, namespace).await?;
    let kubeconfig = dir.join("control.kubeconfig");
    control.write_kubeconfig(&kubeconfig)?;
    Ok((control, kube, kubeconfig))
}

pub(crate) async fn run(flags: FleetFlags) -> anyhow::Result<serde_json::Value> {
    let count = flags.count.max(1);
    let processes = flags.processes.clamp(1, count);
    let within = Duration::from_secs(flags.timeout_secs);
    let replicas = flags.replicas;
    let balanced = flags.balancer || replicas > 1;
    if replicas > 1 && flags.soak_secs > 0 {
        bail!("the soak runs with one gateway (--replicas 1)");
    }
    let mut dir = tempfile::tempdir()?;
    // BUILDPLANE_BENCH_KEEP=1: the gateways', balancers' and swarms' logs stay.
    if std::env::var_os("BUILDPLANE_BENCH_KEEP").is_some() {
        dir.disable_cleanup(true);
        eprintln!("fleet: logs in {}", dir.path().display());
    }
    let pki = Pki::generate()?;
    let files = pki.write(dir.path())?;
    let (_control, kube, kubeconfig) =
        control_cluster("fleet-control", NAMESPACE, dir.path()).await?;
    let ports = (0..replicas)
        .map(|_| {
            Ok(Ports {
                agent: free_port()?,
                internal: free_port()?,
                health: free_port()?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let http = pki.http_client()?;
    let bases: Vec<String> = ports
        .iter()
        .map(|p| format!("https://127.0.0.1:{}", p.internal))
        .collect();
    let base = &bases[0];
    // One replica says nothing of replicas, as today's single gateway.
    let replica_of = |index: usize| {
        (replicas > 1).then_some(Replica {
            index,
            count: replicas,
        })
    };

    let mut gateway = Children(Vec::new());
    for (i, p) in ports.iter().enumerate() {
        gateway.0.push(spawn_replica(
            &flags.bin_dir,
            dir.path(),
            &files,
            &kubeconfig,
            p,
            replica_of(i),
            0,
        )?);
    }
    for p in &ports {
        wait_ready(p, Duration::from_secs(60)).await?;
    }
    let gateway_pids: Vec<u32> = gateway.0.iter().map(Child::id).collect();
    let gateway_pid = gateway_pids[0];
    let rss_started = rss_kib(gateway_pid)?;

    // Balancers: one process beside each swarm process, over every replica's agent listener.
    let mut balancers = Children(Vec::new());
    let mut agent_ports = Vec::new();
    for p in 0..processes {
        if !balanced {
            agent_ports.push(ports[0].agent);
            continue;
        }
        let port = free_port()?;
        let mut command = Command::new(std::env::current_exe()?);
        command
            .arg("balance")
            .args(["--listen", &format!("127.0.0.1:{port}")]);
        for replica in &ports {
            command.args(["--backend", &format!("127.0.0.1:{}", replica.agent)]);
        }
        balancers.0.push(
            command
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(log_file(dir.path(), &format!("balancer-{p}"))?)
                .spawn()
                .context("starting buildplane-bench balance")?,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("balancer {p} never listened on {port}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        agent_ports.push(port);
    }
    let balancer_pids: Vec<u32> = balancers.0.iter().map(Child::id).collect();

    // Swarms: each writes its CA, then dials (and is refused until its CRs exist).
    // BUILDPLANE_BENCH_SWARM_LOG: the swarms' RUST_LOG (errors only by default).
    let swarm_log = std::env::var("BUILDPLANE_BENCH_SWARM_LOG").ok();
    let mut swarms = Children(Vec::new());
    let mut planes = Vec::new();
    for (p, agent_port) in agent_ports.iter().enumerate() {
        let n = count / processes + usize::from(p < count % processes);
        let ca_out = dir.path().join(format!("swarm-{p}-ca.pem"));
        let prefix = format!("fleet-{p}");
        let child = Command::new(flags.bin_dir.join("cluster-agent"))
            .arg("swarm")
            .args(["--count", &n.to_string(), "--plane-id-prefix", &prefix])
            .args(["--server-url", &format!("wss://127.0.0.1:{agent_port}/ws")])
            .args(["--server-ca".as_ref(), files.server_ca.as_os_str()])
            .args(["--kubeconfig".as_ref(), kubeconfig.as_os_str()])
            .args(["--ca-out".as_ref(), ca_out.as_os_str()])
            .args(["--backoff-base", &flags.backoff_base])
            .args(["--backoff-cap", &flags.backoff_cap])
            .env("RUST_LOG", swarm_log.as_deref().unwrap_or("error"))
            // The agent logs to stdout.
            .stdout(match swarm_log {
                Some(_) => log_file(dir.path(), &format!("swarm-{p}.out"))?,
                None => Stdio::null(),
            })
            .stderr(log_file(dir.path(), &format!("swarm-{p}"))?)
            .spawn()
            .context("starting cluster-agent swarm")?;
        swarms.0.push(child);
        planes.push((prefix, n, ca_out));
    }
    let swarm_pids: Vec<u32> = swarms.0.iter().map(Child::id).collect();
    let mut cas = Vec::new();
    for (_, _, ca_out) in &planes {
        let deadline = Instant::now() + within;
        let ca = loop {
            match std::fs::read_to_string(ca_out) {
                Ok(ca) if ca.contains("END CERTIFICATE") => break ca,
                _ if Instant::now() > deadline => bail!("no swarm CA in {}", ca_out.display()),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        cas.push(ca);
    }
    signal(&swarm_pids, "STOP")?;
    let started = Instant::now();
    let crs: Vec<(String, String)> = planes
        .iter()
        .zip(&cas)
        .flat_map(|((prefix, n, _), ca)| {
            (0..*n).map(move |i| (format!("{prefix}-{i}"), ca.clone()))
        })
        .collect();
    futures::stream::iter(crs.iter().map(|(plane, ca)| {
        let kube = kube.clone();
        async move { fixture::apply_build_plane(&kube, NAMESPACE, plane, plane, ca).await }
    }))
    .buffer_unordered(16)
    .try_collect::<Vec<()>>()
    .await?;
    info!(
        count,
        secs = started.elapsed().as_secs_f64(),
        "BuildPlanes created"
    );
    // Let the gateway's reflectors take every CR in before the baseline.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_crs = rss_kib(gateway_pid)?;

    let mut report = if replicas > 1 {
        // The storm run: every swarm at once, until every agent holds every replica.
        signal(&swarm_pids, "CONT")?;
        let connect_secs = wait_connected(&http, &bases, count, within)
            .await
            .map_err(|err| {
                err.context(exited(&mut [
                    ("swarm", &mut swarms),
                    ("balancer", &mut balancers),
                ]))
            })?;
        serde_json::json!({
            "count": count,
            "processes": processes,
            "initial_connect_secs": connect_secs,
            "rss_connected_kib": gateway_pids.iter().map(|&pid| rss_kib(pid).ok()).collect::<Vec<_>>(),
        })
    } else {
        // Idle memory per agent is the slope between two fleet sizes, each read after a
        // heartbeat period (so every connection has sent and answered pings): the first half
        // of the swarms connects, then the rest. A single reading against the baseline would
        // also count what the allocator keeps from refused handshakes and what the first pings
        // allocate.
        let half = if processes >= 2 {
            processes / 2
        } else {
            processes
        };
        let first: usize = planes.iter().take(half).map(|(_, n, _)| *n).sum();
        let mut connect_secs = 0.0;
        signal(&swarm_pids[..half], "CONT")?;
        connect_secs += wait_connected(&http, &bases, first, within)
            .await
            .map_err(|err| {
                err.context(exited(&mut [
                    ("swarm", &mut swarms),
                    ("balancer", &mut balancers),
                ]))
            })?;
        tokio::time::sleep(HEARTBEAT + Duration::from_secs(1)).await;
        let rss_first = rss_kib(gateway_pid)?;
        signal(&swarm_pids[half..], "CONT")?;
        connect_secs += wait_connected(&http, &bases, count, within)
            .await
            .map_err(|err| {
                err.context(exited(&mut [
                    ("swarm", &mut swarms),
                    ("balancer", &mut balancers),
                ]))
            })?;
        tokio::time::sleep(HEARTBEAT + Duration::from_secs(1)).await;
        let rss_connected = rss_kib(gateway_pid)?;
        let per_agent_kib = if count > first {
            (rss_connected as f64 - rss_first as f64) / (count - first) as f64
        } else {
            (rss_connected as f64 - rss_crs as f64) / count as f64
        };
        let mut report = serde_json::json!({
            "count": count,
            "processes": processes,
            "rss_started_kib": rss_started,
            "rss_crs_kib": rss_crs,
            "rss_first_half_kib": rss_first,
            "agents_first_half": first,
            "rss_connected_kib": rss_connected,
            "rss_per_agent_kib": per_agent_kib,
            "rss_per_agent_from_baseline_kib": (rss_connected as f64 - rss_crs as f64) / count as f64,
            "rss_per_cr_kib": (rss_crs as f64 - rss_started as f64) / count as f64,
            "initial_connect_secs": connect_secs,
        });
        report["trust"] = trust_changes(&kube, &ports[0], gateway_pid, &crs[0]).await?;
        if flags.soak_secs > 0 {
            report["soak"] = soak(
                &http,
                base,
                &ports[0],
                gateway_pid,
                count,
                Duration::from_secs(flags.soak_secs),
            )
            .await?;
        }
        report
    };
    report["replicas"] = replicas.into();
    report["balancer"] = balanced.into();

    if flags.storm {
        let fleet = Fleet {
            flags: &flags,
            dir: dir.path(),
            files: &files,
            kubeconfig: &kubeconfig,
            ports: &ports,
            bases: &bases,
            http: &http,
            count,
            within,
            swarm_pids: &swarm_pids,
            balancer_pids: &balancer_pids,
        };
        report["storm"] = storm(&fleet, &mut gateway).await?;
    }
    let _ = signal(&swarm_pids, "TERM");
    drop(swarms);
    drop(balancers);
    drop(gateway);
    Ok(report)
}

/// What the storm needs of the running fleet.
struct Fleet<'a> {
    flags: &'a FleetFlags,
    dir: &'a Path,
    files: &'a fixture::PkiFiles,
    kubeconfig: &'a Path,
    ports: &'a [Ports],
    bases: &'a [String],
    http: &'a reqwest::Client,
    count: usize,
    within: Duration,
    swarm_pids: &'a [u32],
    balancer_pids: &'a [u32],
}

/// What one replica's event stream said, to the storm's count.
enum Heard {
    /// A restarted replica answered its event stream.
    Subscribed,
    /// Agents of these planeIDs are connected to the replica.
    Connected(usize, Vec<String>),
}

/// Follows replica `index`'s event stream from its restart on, reporting the planeIDs of every
/// connected agent (the snapshot's, then each `connected` event's) with the time from the kill.
async fn follow_events(
    http: reqwest::Client,
    base: String,
    index: usize,
    killed: Instant,
    deadline: Instant,
    heard: tokio::sync::mpsc::UnboundedSender<(Heard, f64)>,
) -> anyhow::Result<()> {
    // The internal API is bound right after the agent listener: subscribe as soon as it
    // answers; the stream's first line is a snapshot of what connected in between.
    let response = loop {
        match http.get(format!("{base}/api/v1/events")).send().await {
            Ok(res) if res.status().is_success() => break res,
            _ if Instant::now() > deadline => {
                bail!("restarted replica {index} never served events")
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let _ = heard.send((Heard::Subscribed, killed.elapsed().as_secs_f64()));
    let mut lines = response.bytes_stream();
    let mut buffer = buildplane_runtime::LineBuffer::new();
    while let Some(chunk) = lines.next().await {
        let chunk = chunk?;
        let now = killed.elapsed().as_secs_f64();
        buffer.push(&chunk);
        let mut planes = Vec::new();
        while let Some(line) = buffer.next_line() {
            let Ok(event) = serde_json::from_slice::<serde_json::Value>(&line) else {
                continue;
            };
            match event["type"].as_str() {
                Some("snapshot") => {
                    if let Some(by_cr) = event["connectedAgentsByCr"].as_object() {
                        for (cr, n) in by_cr {
                            if n.as_u64().unwrap_or(0) > 0 {
                                planes.push(cr.rsplit('/').next().unwrap_or(cr).to_owned());
                            }
                        }
                    }
                }
                Some("connected") => {
                    planes.push(event["planeID"].as_str().unwrap_or_default().to_owned());
                }
                _ => {}
            }
        }
        if !planes.is_empty() && heard.send((Heard::Connected(index, planes), now)).is_err() {
            return Ok(());
        }
    }
    bail!("replica {index}'s event stream ended")
}

/// User + system CPU seconds of these processes so far (0 for one that is gone).
fn cpu_total(pids: &[u32]) -> f64 {
    pids.iter()
        .map(|&pid| crate::cpu::cpu_seconds(pid).unwrap_or(0.0))
        .sum()
}

/// The gateway's refusals of agent connections so far, by reason.
fn refusals(metrics: &str) -> std::collections::BTreeMap<String, u64> {
    let prefix = "cluster_gateway_rejections_total{reason=\"";
    metrics
        .lines()
        .filter_map(|line| {
            let (reason, value) = line.strip_prefix(prefix)?.split_once("\"}")?;
            Some((reason.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// Every replica killed (SIGKILL) and started again on the same ports; times from the kill
/// until every agent holds one connection again and until it holds one to every replica, the
/// admission rate over the storm (mean from first to last admission, and the best second), and
/// what it cost: handshakes per agent at the replicas, CPU of the replicas, swarms and
/// balancers.
async fn storm(fleet: &Fleet<'_>, gateway: &mut Children) -> anyhow::Result<serde_json::Value> {
    let Fleet {
        flags,
        count,
        within,
        ports,
        ..
    } = *fleet;
    let replicas = ports.len();
    let swarm_cpu = cpu_total(fleet.swarm_pids);
    let balancer_cpu = cpu_total(fleet.balancer_pids);
    let killed = Instant::now();
    for old in &mut gateway.0 {
        let _ = old.kill();
    }
    for mut old in gateway.0.drain(..) {
        old.wait()?;
    }
    for (index, p) in ports.iter().enumerate() {
        let replica = (replicas > 1).then_some(Replica {
            index,
            count: replicas as u32,
        });
        gateway.0.push(spawn_replica(
            &flags.bin_dir,
            fleet.dir,
            fleet.files,
            fleet.kubeconfig,
            p,
            replica,
            1,
        )?);
    }
    let deadline = killed + within;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut followers = tokio::task::JoinSet::new();
    for (index, base) in fleet.bases.iter().enumerate() {
        followers.spawn(follow_events(
            fleet.http.clone(),
            base.clone(),
            index,
            killed,
            deadline,
            tx.clone(),
        ));
    }
    drop(tx);
    let full: u32 = (1u32 << replicas) - 1;
    // Per planeID, the replicas it is connected to (a bit each).
    let mut held: HashMap<String, u32> = HashMap::with_capacity(count);
    let mut subscribed = Vec::new();
    let mut admitted_at = Vec::with_capacity(count * replicas);
    let mut one_back = Vec::with_capacity(count);
    let mut all_back = Vec::with_capacity(count);
    while all_back.len() < count {
        let (heard, at) = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(heard)) => heard,
            Ok(None) => {
                while let Some(ended) = followers.join_next().await {
                    ended??;
                }
                bail!("every event stream ended");
            }
            Err(_) => bail!(
                "within {within:?} only {} of {count} agents held a connection again and {} held all {replicas}",
                one_back.len(),
                all_back.len()
            ),
        };
        match heard {
            Heard::Subscribed => subscribed.push(at),
            Heard::Connected(index, planes) => {
                for plane in planes {
                    let mask = held.entry(plane).or_default();
                    let bit = 1u32 << index;
                    if *mask & bit != 0 {
                        continue;
                    }
                    if *mask == 0 {
                        one_back.push(at);
                    }
                    *mask |= bit;
                    admitted_at.push(at);
                    if *mask == full {
                        all_back.push(at);
                    }
                }
            }
        }
    }
    followers.abort_all();
    let gateway_cpu = cpu_total(&gateway.0.iter().map(Child::id).collect::<Vec<_>>());
    let swarm_cpu = cpu_total(fleet.swarm_pids) - swarm_cpu;
    let balancer_cpu = cpu_total(fleet.balancer_pids) - balancer_cpu;
    // Handshakes the replicas finished since their restart: admitted, refused with 409 (a
    // replica the agent held already), or refused otherwise after the TLS handshake.
    let (mut admitted, mut held_refusals, mut other_refusals, mut silent) = (0u64, 0, 0, 0);
    let mut all_refusals = std::collections::BTreeMap::new();
    for p in ports {
        admitted += admissions(p).await?;
        let text = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/metrics", p.health))
            .send()
            .await?
            .text()
            .await?;
        for (reason, n) in refusals(&text) {
            match reason.as_str() {
                "replica_held" => held_refusals += n,
                // Before any TLS: sockets that had not sent their ClientHello.
                "hello_timeout" | "idle_evicted" | "idle_per_source" => silent += n,
                _ => other_refusals += n,
            }
            *all_refusals.entry(reason).or_insert(0u64) += n;
        }
    }
    admitted_at.sort_by(f64::total_cmp);
    one_back.sort_by(f64::total_cmp);
    all_back.sort_by(f64::total_cmp);
    let first = admitted_at[0];
    let last = admitted_at[admitted_at.len() - 1];
    // Peak admissions in any one-second window.
    let mut peak = 0;
    let mut lo = 0;
    for hi in 0..admitted_at.len() {
        while admitted_at[hi] - admitted_at[lo] > 1.0 {
            lo += 1;
        }
        peak = peak.max(hi - lo + 1);
    }
    subscribed.sort_by(f64::total_cmp);
    let per_agent = |n: u64| n as f64 / count as f64;
    Ok(serde_json::json!({
        "count": count,
        "replicas": replicas,
        "backoff_base": flags.backoff_base,
        "backoff_cap": flags.backoff_cap,
        "events_subscribed_secs": subscribed.first(),
        "all_subscribed_secs": subscribed.last(),
        "first_back_secs": first,
        // Every agent holds one connection again (with one replica: every agent is back).
        "one_back_secs": one_back[one_back.len() - 1],
        // Every agent holds a connection to every replica.
        "all_back_secs": last,
        "admissions": admitted_at.len(),
        "admission_rate_mean": if last > first { (admitted_at.len() - 1) as f64 / (last - first) } else { f64::NAN },
        "admission_rate_peak_1s": peak,
        "reconnect_p50_secs": percentile(&all_back, 0.50),
        "reconnect_p90_secs": percentile(&all_back, 0.90),
        "reconnect_p99_secs": percentile(&all_back, 0.99),
        "one_back_p50_secs": percentile(&one_back, 0.50),
        "one_back_p99_secs": percentile(&one_back, 0.99),
        "admitted_per_agent": per_agent(admitted),
        "held_refusals_per_agent": per_agent(held_refusals),
        "other_refusals_per_agent": per_agent(other_refusals),
        "handshakes_per_agent": per_agent(admitted + held_refusals + other_refusals),
        // Connections closed before their ClientHello (not handshakes).
        "silent_refusals_per_agent": per_agent(silent),
        "refusals": all_refusals,
        "gateway_cpu_secs": gateway_cpu,
        "swarm_cpu_secs": swarm_cpu,
        "balancer_cpu_secs": balancer_cpu,
    }))
}
