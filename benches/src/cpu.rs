//! CPU of the tunnel itself, v1 against v2: a `cluster-gateway` process and one `cluster-agent
//! swarm` process per protocol (one agent each) against an in-process kube-sim, N proxied GETs of
//! a ConfigMap of about 64 KiB through each, and the user + system CPU time the gateway and that
//! agent's process spent on them, read from `/proc/PID/stat` before and after. Loopback
//! throughput cannot tell the protocols apart once the relay bounds it; CPU can.
//!
//! The floor beside them: the same GETs through the raw TLS relay with the same hops, each hop a
//! `buildplane-bench relay-hop` process (the caller's mTLS terminated in the control plane's
//! role, mutual TLS to the build cluster's role, TLS to the API server), nothing parsed. No
//! tunnel over these hops can cost less, so `v1 / relay` is the most `v1 / v2` can reach.

use std::{net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use anyhow::{Context as _, bail};
use clap::Args;
use futures::{StreamExt as _, TryStreamExt as _};
use tokio::time::Instant;

use crate::fleet::{
    Children, Ports, control_cluster, free_port, log_file, spawn_gateway, wait_ready,
};
use buildplane_benches::{Pki, fixture};

const NAMESPACE: &str = "cpu";

/// Flags of `buildplane-bench cpu`.
#[derive(Args)]
pub(crate) struct CpuFlags {
    /// Directory holding `cluster-gateway` and `cluster-agent`.
    #[arg(long)]
    bin_dir: PathBuf,
    /// Proxied requests per protocol.
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    /// Requests at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Approximate response body size (the ConfigMap's data).
    #[arg(long, default_value_t = 64 * 1024)]
    size: usize,
}

/// Flags of `buildplane-bench relay-hop`: one hop of the raw TLS relay, as a process of its own.
#[derive(Args)]
pub(crate) struct RelayHopFlags {
    /// Where to listen.
    #[arg(long)]
    listen: SocketAddr,
    /// Serving certificate (PEM).
    #[arg(long)]
    cert: PathBuf,
    /// Its key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// The CA a client's certificate must chain to (mutual TLS).
    #[arg(long)]
    client_ca: PathBuf,
    /// The next hop, dialed over TLS (127.0.0.1).
    #[arg(long)]
    upstream: SocketAddr,
    /// The CA the next hop's certificate chains to.
    #[arg(long)]
    upstream_ca: PathBuf,
    /// The client certificate presented to the next hop (PEM).
    #[arg(long, requires = "upstream_key")]
    upstream_cert: Option<PathBuf>,
    /// Its key (PEM).
    #[arg(long, requires = "upstream_cert")]
    upstream_key: Option<PathBuf>,
}

/// Runs one relay hop until the process is killed.
pub(crate) async fn relay_hop(flags: RelayHopFlags) -> anyhow::Result<serde_json::Value> {
    let read = |path: &PathBuf| {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    };
    let cert = buildplane_pki::ReloadableCert::from_pem(&read(&flags.cert)?, &read(&flags.key)?)?;
    let server = buildplane_pki::mtls_server_config(cert, read(&flags.client_ca)?.as_bytes())?;
    let identity = match (&flags.upstream_cert, &flags.upstream_key) {
        (Some(cert), Some(key)) => Some(buildplane_pki::ReloadableCert::from_pem(
            &read(cert)?,
            &read(key)?,
        )?),
        _ => None,
    };
    let client = buildplane_pki::client_config(read(&flags.upstream_ca)?.as_bytes(), identity)?;
    let listener = tokio::net::TcpListener::bind(flags.listen).await?;
    fixture::relay_hop(
        listener,
        server,
        fixture::Upstream::Tls {
            addr: flags.upstream,
            config: client,
        },
    )
    .await;
    Ok(serde_json::Value::Null)
}

/// User + system CPU time of a process so far, in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces; the fields after its closing parenthesis do not.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("malformed /proc/PID/stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .context("short /proc/PID/stat")?
            .parse::<f64>()?)
    };
    // After the name: state is field 3 of the file, index 0 here; utime 14 → 11, stime 15 → 12.
    Ok((ticks(11)? + ticks(12)?) / clock_ticks_per_second())
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

pub(crate) async fn run(flags: CpuFlags) -> anyhow::Result<serde_json::Value> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::generate()?;
    let files = pki.write(dir.path())?;
    let (control, kube, kubeconfig) = control_cluster("cpu-control", NAMESPACE, dir.path()).await?;
    let body: String = "x".repeat(flags.size);
    let configmaps: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(kube.clone(), NAMESPACE);
    configmaps
        .create(
            &kube::api::PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": "big"},
                "data": {"body": body},
            }))?,
        )
        .await?;
    let ports = Ports {
        agent: free_port()?,
        internal: free_port()?,
        health: free_port()?,
    };
    let gateway = Children(vec![spawn_gateway(
        &flags.bin_dir,
        dir.path(),
        &files,
        &kubeconfig,
        &ports,
        0,
    )?]);
    wait_ready(&ports, Duration::from_secs(60)).await?;
    let gateway_pid = gateway.0[0].id();
    let http = pki.http_client()?;
    let base = format!("https://127.0.0.1:{}", ports.internal);
    let mut report = serde_json::json!({
        "requests": flags.requests,
        "concurrency": flags.concurrency,
        "size": flags.size,
    });
    let mut agents = Children(Vec::new());
    for protocol in ["v1", "v2"] {
        let prefix = format!("cpu-{protocol}");
        let ca_out = dir.path().join(format!("{prefix}-ca.pem"));
        let child = Command::new(flags.bin_dir.join("cluster-agent"))
            .arg("swarm")
            .args(["--count", "1", "--plane-id-prefix", &prefix])
            .args(["--protocol", protocol])
            .args([
                "--server-url",
                &format!("wss://127.0.0.1:{}/ws", ports.agent),
            ])
            .args(["--server-ca".as_ref(), files.server_ca.as_os_str()])
            .args(["--kubeconfig".as_ref(), kubeconfig.as_os_str()])
            .args(["--ca-out".as_ref(), ca_out.as_os_str()])
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null())
            .stderr(log_file(dir.path(), &prefix)?)
            .spawn()
            .context("starting cluster-agent swarm")?;
        let agent_pid = child.id();
        agents.0.push(child);
        let ca = wait_for_file(&ca_out, Duration::from_secs(60)).await?;
        let plane = format!("{prefix}-0");
        fixture::apply_build_plane(&kube, NAMESPACE, &plane, &plane, &ca).await?;
        let url = format!(
            "{base}/api/proxy/buildplane/{plane}/{NAMESPACE}/{plane}/k8s/api/v1/namespaces/{NAMESPACE}/configmaps/big"
        );
        wait_for_200(&http, &url, None, Duration::from_secs(60)).await?;
        report[protocol] = measure(&http, &url, None, &flags, &[gateway_pid, agent_pid]).await?;
    }
    // The floor: the raw TLS relay over the same hops, one process per hop.
    let relay = relay_processes(dir.path(), &pki, &files, &control)?;
    let url = format!(
        "https://127.0.0.1:{}/api/v1/namespaces/{NAMESPACE}/configmaps/big",
        relay.port
    );
    let token = Some(control.token());
    wait_for_200(&http, &url, token, Duration::from_secs(60)).await?;
    report["relay"] = measure(&http, &url, token, &flags, &relay.pids()).await?;
    let of = |p: &str| {
        report[p]["cpu_seconds_per_1000"]
            .as_f64()
            .unwrap_or(f64::NAN)
    };
    let (v1, v2, floor) = (of("v1"), of("v2"), of("relay"));
    report["v1_over_v2"] = (v1 / v2).into();
    report["v1_over_relay"] = (v1 / floor).into();
    report["v2_over_relay"] = (v2 / floor).into();
    drop(relay);
    drop(agents);
    drop(gateway);
    Ok(report)
}

/// Warms `url` up, then fetches it `flags.requests` times and charges the CPU the processes
/// `pids` spent meanwhile.
async fn measure(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    flags: &CpuFlags,
    pids: &[u32],
) -> anyhow::Result<serde_json::Value> {
    let cpu = || -> anyhow::Result<f64> { pids.iter().map(|&pid| cpu_seconds(pid)).sum() };
    fetch_all(http, url, token, 50, flags.concurrency).await?;
    let before = cpu()?;
    let started = Instant::now();
    let bytes = fetch_all(http, url, token, flags.requests, flags.concurrency).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let per_1000 = (cpu()? - before) / flags.requests as f64 * 1000.0;
    Ok(serde_json::json!({
        "cpu_seconds_per_1000": per_1000,
        "body_bytes": bytes / flags.requests,
        "wall_seconds": elapsed,
    }))
}

/// The two hops of the raw relay as processes, and the control plane's hop's port.
struct RelayProcesses {
    port: u16,
    hops: Children,
}

impl RelayProcesses {
    fn pids(&self) -> Vec<u32> {
        self.hops.0.iter().map(std::process::Child::id).collect()
    }
}

/// Starts the build cluster's hop (mutual TLS from the agent CA's leaf in, TLS to the API
/// server out) and the control plane's (the internal API's mTLS in, the agent leaf out).
fn relay_processes(
    dir: &std::path::Path,
    pki: &Pki,
    files: &buildplane_benches::fixture::PkiFiles,
    control: &kube_sim::RunningServer,
) -> anyhow::Result<RelayProcesses> {
    let write = |name: &str, text: &str| -> anyhow::Result<PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    };
    let agent_ca = write("relay-agent-ca.crt", pki.agent_ca.cert_pem())?;
    let agent_cert = write("relay-agent.crt", &pki.agent.cert_pem)?;
    let agent_key = write("relay-agent.key", &pki.agent.key_pem)?;
    let api_ca = write("relay-api-ca.crt", control.ca_pem())?;
    let exe = std::env::current_exe().context("the bench's own binary")?;
    let hop = |name: &str, listen: u16, args: &[&std::ffi::OsStr]| -> anyhow::Result<_> {
        Command::new(&exe)
            .arg("relay-hop")
            .args(["--listen", &format!("127.0.0.1:{listen}")])
            .args(["--cert".as_ref(), files.server_cert.as_os_str()])
            .args(["--key".as_ref(), files.server_key.as_os_str()])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(log_file(dir, name)?)
            .spawn()
            .with_context(|| format!("starting {name}"))
    };
    let (build_port, control_port) = (free_port()?, free_port()?);
    let build = hop(
        "relay-build",
        build_port,
        &[
            "--client-ca".as_ref(),
            agent_ca.as_os_str(),
            "--upstream".as_ref(),
            control.addr().to_string().as_ref(),
            "--upstream-ca".as_ref(),
            api_ca.as_os_str(),
        ],
    )?;
    let mut hops = Children(vec![build]);
    let control_hop = hop(
        "relay-control",
        control_port,
        &[
            "--client-ca".as_ref(),
            files.internal_ca.as_os_str(),
            "--upstream".as_ref(),
            format!("127.0.0.1:{build_port}").as_ref(),
            "--upstream-ca".as_ref(),
            files.server_ca.as_os_str(),
            "--upstream-cert".as_ref(),
            agent_cert.as_os_str(),
            "--upstream-key".as_ref(),
            agent_key.as_os_str(),
        ],
    )?;
    hops.0.push(control_hop);
    Ok(RelayProcesses {
        port: control_port,
        hops,
    })
}

async fn wait_for_file(path: &std::path::Path, within: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + within;
    loop {
        match std::fs::read_to_string(path) {
            Ok(text) if text.contains("END CERTIFICATE") => return Ok(text),
            _ if Instant::now() > deadline => bail!("nothing in {}", path.display()),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn wait_for_200(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if matches!(get(http, url, token).send().await, Ok(res) if res.status() == 200) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{url} never answered 200 within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `n` GETs, `concurrency` at once; every one must be a 200. Returns the body bytes received.
async fn fetch_all(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<usize> {
    let sizes: Vec<usize> = futures::stream::iter(0..n)
        .map(|_| async move {
            let res = get(http, url, token).send().await?;
            anyhow::ensure!(res.status() == 200, "{url} answered {}", res.status());
            Ok(res.bytes().await?.len())
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect()
        .await?;
    Ok(sizes.iter().sum())
}

/// A GET of `url`, with the API server's bearer token when the path reaches it unproxied.
fn get(http: &reqwest::Client, url: &str, token: Option<&str>) -> reqwest::RequestBuilder {
    match token {
        Some(token) => http.get(url).bearer_auth(token),
        None => http.get(url),
    }
}
