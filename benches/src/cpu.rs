//! CPU of the tunnel itself, v1 against v2: a `cluster-gateway` process and one `cluster-agent
//! swarm` process per protocol (one agent each) against an in-process kube-sim, N proxied GETs of
//! a ConfigMap of about 64 KiB through each, and the user + system CPU time the gateway and that
//! agent's process spent on them, read from `/proc/PID/stat` before and after. Loopback
//! throughput cannot tell the protocols apart once the relay bounds it; CPU can.

use std::{path::PathBuf, process::Command, time::Duration};

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
    let (_control, kube, kubeconfig) =
        control_cluster("cpu-control", NAMESPACE, dir.path()).await?;
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
        wait_for_agent(&http, &url, Duration::from_secs(60)).await?;
        fetch_all(&http, &url, 50, flags.concurrency).await?;
        let before = cpu_seconds(gateway_pid)? + cpu_seconds(agent_pid)?;
        let started = Instant::now();
        let bytes = fetch_all(&http, &url, flags.requests, flags.concurrency).await?;
        let elapsed = started.elapsed().as_secs_f64();
        let after = cpu_seconds(gateway_pid)? + cpu_seconds(agent_pid)?;
        let per_1000 = (after - before) / flags.requests as f64 * 1000.0;
        report[protocol] = serde_json::json!({
            "cpu_seconds_per_1000": per_1000,
            "body_bytes": bytes / flags.requests,
            "wall_seconds": elapsed,
        });
    }
    let of = |p: &str| {
        report[p]["cpu_seconds_per_1000"]
            .as_f64()
            .unwrap_or(f64::NAN)
    };
    report["v1_over_v2"] = (of("v1") / of("v2")).into();
    drop(agents);
    drop(gateway);
    Ok(report)
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

async fn wait_for_agent(http: &reqwest::Client, url: &str, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if matches!(http.get(url).send().await, Ok(res) if res.status() == 200) {
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
    n: usize,
    concurrency: usize,
) -> anyhow::Result<usize> {
    let sizes: Vec<usize> = futures::stream::iter(0..n)
        .map(|_| async move {
            let res = http.get(url).send().await?;
            anyhow::ensure!(res.status() == 200, "{url} answered {}", res.status());
            Ok(res.bytes().await?.len())
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect()
        .await?;
    Ok(sizes.iter().sum())
}
