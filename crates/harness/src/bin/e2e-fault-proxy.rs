//! `e2e-fault-proxy`: the harness's fault proxy in a process of its own, one beside each
//! `cluster-agent swarm` process of a scenario, so a swarm's links do not all hold their
//! sockets in the harness (see `buildplane_harness::proxy::remote`).

use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    // Two sockets per proxied connection.
    buildplane_runtime::raise_open_files_limit();
    buildplane_harness::proxy::remote::serve(buildplane_harness::proxy::remote::Flags::parse())
        .await
}
