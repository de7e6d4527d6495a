//! `kube-sim serve`: runs an embedded Kubernetes API server and writes its kubeconfig.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    version,
    about = "An embedded Kubernetes API server for tests and local runs"
)]
struct Flags {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve until interrupted.
    Serve {
        /// Address to listen on (port 0 picks a free port).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Where to write the kubeconfig once listening.
        #[arg(long)]
        kubeconfig_out: PathBuf,
        /// Keep objects, certificates and token here, so a restart keeps them.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Cluster, context and user name in the kubeconfig.
        #[arg(long, default_value = "kube-sim")]
        name: String,
        /// The kubeconfig user's credential: kube-sim's bearer token, or the admin client
        /// certificate (`CN=kubernetes-admin`, `O=system:masters`, as kind and k3d write it).
        /// The server accepts both either way.
        #[arg(long, value_enum, default_value = "token")]
        kubeconfig_auth: KubeconfigAuth,
    },
}

/// `--kubeconfig-auth`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum KubeconfigAuth {
    Token,
    ClientCertificate,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // Every watch holds a connection.
    buildplane_runtime::raise_open_files_limit();
    let Command::Serve {
        listen,
        kubeconfig_out,
        data_dir,
        name,
        kubeconfig_auth,
    } = Flags::parse().command;
    let server = kube_sim::Server::start(kube_sim::Config {
        name,
        listen,
        data_dir,
        kubeconfig_auth: match kubeconfig_auth {
            KubeconfigAuth::Token => kube_sim::KubeconfigAuth::Token,
            KubeconfigAuth::ClientCertificate => kube_sim::KubeconfigAuth::ClientCertificate,
        },
    })
    .await?;
    server.write_kubeconfig(&kubeconfig_out)?;
    println!("listening on {}", server.url());
    buildplane_runtime::shutdown_signal().await;
    server.shutdown().await;
    Ok(())
}
