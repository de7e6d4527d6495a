//! `buildplane-bench`: the measurements criterion cannot make, each printing one JSON object on
//! stdout for `cargo xtask bench`.
//!
//! - `latency`: peak request rate of 1 KiB over v2 at concurrency 64, then open-loop latency at
//!   half that rate (or `--rate`) for every path (direct, relay, v1, v2, rathole when
//!   `BUILDPLANE_RATHOLE` names its binary, and the null: direct again), in interleaved rounds
//!   pooled per path, after one thrown-away window.
//! - `cpu`: CPU of the gateway and agent processes per 1,000 proxied responses, v1 against v2,
//!   and the raw TLS relay over the same hops (`relay-hop` processes) as the floor.
//! - `fleet`: a gateway process and N agents in `cluster-agent swarm` processes: gateway RSS per
//!   idle agent, and with `--storm` the gateway killed (SIGKILL) and restarted: time until every
//!   agent is back, admission rate and reconnect delay percentiles; with `--replicas N` the
//!   gateway is N replicas behind balancers and the storm kills and restarts all of them.
//! - `balance`: a TCP round-robin balancer in front of gateway replicas, as a process.

#[global_allocator]
static GLOBAL: buildplane_runtime::Allocator = buildplane_runtime::Allocator;

mod cpu;
mod fleet;

use std::time::Duration;

use anyhow::Context as _;
use buildplane_benches::{Backend, KIB, Peer, Pki, Rathole, Relay, Tunnel, load};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "buildplane-bench")]
struct Flags {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Added latency at half of peak load.
    Latency {
        /// Shorter runs (CI smoke).
        #[arg(long)]
        quick: bool,
        /// The open-loop rate as a fraction of the closed-loop peak.
        #[arg(long, default_value_t = 0.5)]
        fraction: f64,
        /// The open-loop rate in requests per second, instead of a fraction of the peak (to
        /// compare builds or settings at the same load: the peak varies by a third from run
        /// to run on a shared machine).
        #[arg(long)]
        rate: Option<f64>,
        /// Measure only these paths (direct, relay, v1, v2, rathole, null: direct once more,
        /// the bench's resolution); all by default.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Gateway memory per idle agent, optionally a restart storm.
    Fleet(fleet::FleetFlags),
    /// CPU of gateway and agent per 1,000 proxied responses, v1 against v2.
    Cpu(cpu::CpuFlags),
    /// One hop of the raw TLS relay, until killed (the `cpu` bench's floor).
    #[command(hide = true)]
    RelayHop(cpu::RelayHopFlags),
    /// A TCP round-robin balancer until SIGTERM; then its counts.
    Balance {
        /// Where to listen.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// A backend (repeat for each).
        #[arg(long = "backend", required = true)]
        backends: Vec<std::net::SocketAddr>,
    },
}

fn main() -> anyhow::Result<()> {
    buildplane_benches::init();
    let flags = Flags::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = match flags.command {
        Command::Latency {
            quick,
            fraction,
            rate,
            only,
        } => rt.block_on(latency(quick, fraction, rate, &only))?,
        Command::Fleet(flags) => rt.block_on(fleet::run(flags))?,
        Command::Cpu(flags) => rt.block_on(cpu::run(flags))?,
        Command::RelayHop(flags) => rt.block_on(cpu::relay_hop(flags))?,
        Command::Balance { listen, backends } => serde_json::to_value(
            rt.block_on(buildplane_benches::balancer::serve(listen, backends))?,
        )?,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

async fn latency(
    quick: bool,
    fraction: f64,
    rate: Option<f64>,
    only: &[String],
) -> anyhow::Result<serde_json::Value> {
    let pki = Pki::generate()?;
    let backend = Backend::start().await?;
    let relay = Relay::start(&pki, backend.addr).await?;
    let tunnel = Tunnel::start(&pki, &backend).await?;
    let rathole = match Rathole::from_env(&pki, backend.addr).await? {
        Peer::Running(rathole) => Some(rathole),
        Peer::Skipped(reason) => {
            eprintln!("rathole: skipped: {reason}");
            None
        }
    };
    let client = pki.http_client()?;
    let size = KIB;
    let mut paths = vec![
        ("direct", backend.url(size)),
        ("relay", relay.url(size)),
        ("v1", tunnel.url(1, size)),
        ("v2", tunnel.url(2, size)),
    ];
    if let Some(rathole) = &rathole {
        paths.push(("rathole", rathole.url(size)));
    }
    // The null: the direct path once more, as a path of its own. What it adds over direct is
    // the bench's own resolution on this machine: no difference between two paths smaller than
    // that can be told from noise.
    paths.push(("null", backend.url(size)));
    for (_, url) in &paths {
        load::round(&client, url, 64, size).await?;
    }
    let peak_for = Duration::from_millis(if quick { 500 } else { 3000 });
    let (rounds, window) = if quick {
        (2, Duration::from_millis(500))
    } else {
        (3, Duration::from_millis(5000))
    };
    let peak = load::peak_rate(&client, &paths[3].1, 64, peak_for).await?;
    let rate = rate.unwrap_or(peak * fraction);
    let mut report = serde_json::json!({
        "size": size,
        "peak_concurrency": 64,
        "open_loop_connections": 64,
        "peak_rps_v2": peak,
        "rate": rate,
        "rounds": rounds,
        "window_secs": window.as_secs_f64(),
    });
    paths.retain(|(name, _)| only.is_empty() || only.iter().any(|o| o == name));
    // One window of direct first, thrown away: the first open loop of a process runs cold
    // (its heap grows, its pages fault in), and whichever path came first paid for it (direct,
    // until 2026-12-07: its p99 1 to 3 ms above the same path measured again later).
    load::open_loop(&pki.http_client()?, &backend.url(size), rate, window, 64).await?;
    // Interleaved: every round measures every path once, each round in an order rotated by
    // one, and the windows of a path pool into one distribution, so the machine's drift
    // during the run falls on all paths alike.
    let mut samples: Vec<load::Samples> = paths.iter().map(|_| load::Samples::default()).collect();
    for round in 0..rounds {
        for k in 0..paths.len() {
            let i = (k + round) % paths.len();
            let url = &paths[i].1;
            // A fresh connection pool per window, warmed with one round: a path that shed load
            // leaves hundreds of connections behind, which must not weigh on the next one.
            let client = pki.http_client()?;
            load::round(&client, url, 64, size).await?;
            samples[i].merge(load::open_loop(&client, url, rate, window, 64).await?);
        }
    }
    for ((name, _), samples) in paths.iter().zip(samples) {
        let latency = samples.summary().with_context(|| format!("path {name}"))?;
        report[*name] = serde_json::to_value(latency)?;
    }
    let p99 = |name: &str| report[name]["p99_ms"].as_f64().unwrap_or(f64::NAN);
    let (direct, relay, v2, peer, null) = (
        p99("direct"),
        p99("relay"),
        p99("v2"),
        p99("rathole"),
        p99("null"),
    );
    report["added_p99_ms_v2"] = (v2 - direct).into();
    report["added_p99_ms_relay"] = (relay - direct).into();
    if rathole.is_some() {
        report["added_p99_ms_rathole"] = (peer - direct).into();
    }
    report["added_p99_ms_null"] = (null - direct).into();
    drop(tunnel);
    Ok(report)
}
