//! Many agents against a gateway process: idle memory per agent and the restart storm.
//!
//! The gateway runs as `cluster-gateway` (so its RSS is its own) against an in-process kube-sim;
//! agents run in several `cluster-agent swarm` processes (at most a few thousand sockets each,
//! under the 20,000 open files per process). The swarms are stopped (SIGSTOP) while their
//! BuildPlanes are created, so the baseline RSS holds every CR and no connection. Idle memory
//! per agent is the slope between two fleet sizes (half the swarms, then all), each read after a
//! heartbeat period.

use std::{
    collections::HashSet,
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

/// Waits until `count` agents are connected; returns how long it took (seconds).
async fn wait_connected(
    http: &reqwest::Client,
    base: &str,
    count: usize,
    within: Duration,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    loop {
        let n = connections(http, base).await.unwrap_or(0);
        if n >= count {
            return Ok(started.elapsed().as_secs_f64());
        }
        if started.elapsed() > within {
            bail!("only {n} of {count} agents connected within {within:?}");
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
    Command::new(bin_dir.join("cluster-gateway"))
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
        .stderr(log_file(dir, &format!("gateway-{generation}"))?)
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
    let dir = tempfile::tempdir()?;
    let pki = Pki::generate()?;
    let files = pki.write(dir.path())?;
    let (_control, kube, kubeconfig) =
        control_cluster("fleet-control", NAMESPACE, dir.path()).await?;
    let ports = Ports {
        agent: free_port()?,
        internal: free_port()?,
        health: free_port()?,
    };
    let http = pki.http_client()?;
    let base = format!("https://127.0.0.1:{}", ports.internal);

    let mut gateway = Children(vec![spawn_gateway(
        &flags.bin_dir,
        dir.path(),
        &files,
        &kubeconfig,
        &ports,
        0,
    )?]);
    wait_ready(&ports, Duration::from_secs(60)).await?;
    let gateway_pid = gateway.0[0].id();
    let rss_started = rss_kib(gateway_pid)?;

    // Swarms: each writes its CA, then dials (and is refused until its CRs exist).
    let mut swarms = Children(Vec::new());
    let mut planes = Vec::new();
    for p in 0..processes {
        let n = count / processes + usize::from(p < count % processes);
        let ca_out = dir.path().join(format!("swarm-{p}-ca.pem"));
        let prefix = format!("fleet-{p}");
        let child = Command::new(flags.bin_dir.join("cluster-agent"))
            .arg("swarm")
            .args(["--count", &n.to_string(), "--plane-id-prefix", &prefix])
            .args([
                "--server-url",
                &format!("wss://127.0.0.1:{}/ws", ports.agent),
            ])
            .args(["--server-ca".as_ref(), files.server_ca.as_os_str()])
            .args(["--kubeconfig".as_ref(), kubeconfig.as_os_str()])
            .args(["--ca-out".as_ref(), ca_out.as_os_str()])
            .args(["--backoff-base", &flags.backoff_base])
            .args(["--backoff-cap", &flags.backoff_cap])
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
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

    // Idle memory per agent is the slope between two fleet sizes, each read after a heartbeat
    // period (so every connection has sent and answered pings): the first half of the swarms
    // connects, then the rest. A single reading against the baseline would also count what the
    // allocator keeps from refused handshakes and what the first pings allocate.
    let half = if processes >= 2 {
        processes / 2
    } else {
        processes
    };
    let first: usize = planes.iter().take(half).map(|(_, n, _)| *n).sum();
    let mut connect_secs = 0.0;
    signal(&swarm_pids[..half], "CONT")?;
    connect_secs += wait_connected(&http, &base, first, within).await?;
    tokio::time::sleep(HEARTBEAT + Duration::from_secs(1)).await;
    let rss_first = rss_kib(gateway_pid)?;
    signal(&swarm_pids[half..], "CONT")?;
    connect_secs += wait_connected(&http, &base, count, within).await?;
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
    report["trust"] = trust_changes(&kube, &ports, gateway_pid, &crs[0]).await?;
    if flags.soak_secs > 0 {
        report["soak"] = soak(
            &http,
            &base,
            &ports,
            gateway_pid,
            count,
            Duration::from_secs(flags.soak_secs),
        )
        .await?;
    }

    if flags.storm {
        report["storm"] = storm(
            &flags,
            dir.path(),
            &files,
            &kubeconfig,
            &ports,
            &mut gateway,
            &http,
            &base,
            count,
            within,
        )
        .await?;
    }
    let _ = signal(&swarm_pids, "TERM");
    drop(swarms);
    drop(gateway);
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
async fn storm(
    flags: &FleetFlags,
    dir: &Path,
    files: &fixture::PkiFiles,
    kubeconfig: &Path,
    ports: &Ports,
    gateway: &mut Children,
    http: &reqwest::Client,
    base: &str,
    count: usize,
    within: Duration,
) -> anyhow::Result<serde_json::Value> {
    let mut old = gateway.0.remove(0);
    let killed = Instant::now();
    let _ = old.kill();
    old.wait()?;
    gateway.0.push(spawn_gateway(
        &flags.bin_dir,
        dir,
        files,
        kubeconfig,
        ports,
        1,
    )?);
    // The internal API is bound right after the agent listener: subscribe as soon as it answers;
    // the stream's first line is a snapshot of what connected in between.
    let deadline = killed + within;
    let response = loop {
        match http.get(format!("{base}/api/v1/events")).send().await {
            Ok(res) if res.status().is_success() => break res,
            _ if Instant::now() > deadline => bail!("the restarted gateway never served events"),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let subscribed = killed.elapsed().as_secs_f64();
    let mut back: HashSet<String> = HashSet::new();
    let mut delays = Vec::with_capacity(count);
    let mut lines = response.bytes_stream();
    let mut buffer = buildplane_runtime::LineBuffer::new();
    while back.len() < count {
        let chunk = match tokio::time::timeout_at(deadline, lines.next()).await {
            Ok(Some(chunk)) => chunk?,
            Ok(None) => bail!("the event stream ended with {} of {count} back", back.len()),
            Err(_) => bail!(
                "only {} of {count} agents back within {within:?}",
                back.len()
            ),
        };
        let now = killed.elapsed().as_secs_f64();
        buffer.push(&chunk);
        while let Some(line) = buffer.next_line() {
            let Ok(event) = serde_json::from_slice::<serde_json::Value>(&line) else {
                continue;
            };
            match event["type"].as_str() {
                Some("snapshot") => {
                    if let Some(by_cr) = event["connectedAgentsByCr"].as_object() {
                        for (cr, n) in by_cr {
                            let plane = cr.rsplit('/').next().unwrap_or(cr).to_owned();
                            if n.as_u64().unwrap_or(0) > 0 && back.insert(plane) {
                                delays.push(now);
                            }
                        }
                    }
                }
                Some("connected") => {
                    let plane = event["planeID"].as_str().unwrap_or_default().to_owned();
                    if back.insert(plane) {
                        delays.push(now);
                    }
                }
                _ => {}
            }
        }
    }
    delays.sort_by(f64::total_cmp);
    let first = delays[0];
    let last = delays[delays.len() - 1];
    // Peak admissions in any one-second window.
    let mut peak = 0;
    let mut lo = 0;
    for hi in 0..delays.len() {
        while delays[hi] - delays[lo] > 1.0 {
            lo += 1;
        }
        peak = peak.max(hi - lo + 1);
    }
    Ok(serde_json::json!({
        "count": count,
        "backoff_base": flags.backoff_base,
        "backoff_cap": flags.backoff_cap,
        "events_subscribed_secs": subscribed,
        "first_back_secs": first,
        "all_back_secs": last,
        "admission_rate_mean": if last > first { (count - 1) as f64 / (last - first) } else { f64::NAN },
        "admission_rate_peak_1s": peak,
        "reconnect_p50_secs": percentile(&delays, 0.50),
        "reconnect_p90_secs": percentile(&delays, 0.90),
        "reconnect_p99_secs": percentile(&delays, 0.99),
    }))
}
