//! `cargo xtask`: the project's automation (code generation, tidy checks, e2e, benches, k3d,
//! real peers).

mod bench;
mod chaos;
mod codegen;
mod e2e;
mod interrupt;
mod k3d;
mod peers;
mod tidy;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "buildplane project automation")]
struct Flags {
    #[command(subcommand)]
    subcommand: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Regenerate committed artefacts (CRD YAML); with --check, fail if any is stale.
    Codegen {
        /// Only check that the committed files are current.
        #[arg(long)]
        check: bool,
    },
    /// Check repository conventions (module docs, the tunnel crate's dependencies).
    Tidy,
    /// Run the end-to-end scenarios (see crates/harness/README.md).
    E2e(Box<e2e::E2eFlags>),
    /// Random fault schedules with steady load over two tenants; invariants checked; a failing
    /// schedule shrunk to a scenario file (crates/harness/README.md, "Chaos").
    Chaos(Box<chaos::ChaosFlags>),
    /// Create, deploy, inspect or delete the k3d clusters; render k3d/ from k3d/values.yaml.
    K3d(k3d::K3dFlags),
    /// Run the benchmarks and write BENCHMARKS.md (see the README's Benchmarks section).
    Bench(bench::BenchFlags),
    /// Build the real peers (kube-apiserver, kube-controller-manager, OpenChoreo's gateway and
    /// agent) pinned in peers/ into a cache outside the checkout; show their status (PEERS.md).
    Peers(peers::PeersFlags),
}

fn main() -> anyhow::Result<()> {
    let flags = Flags::parse();
    match flags.subcommand {
        Command::Codegen { check } => codegen::run(check),
        Command::Tidy => tidy::run(),
        Command::E2e(flags) => e2e::run(*flags),
        Command::Chaos(flags) => chaos::run(*flags),
        Command::K3d(flags) => k3d::run(flags),
        Command::Bench(flags) => bench::run(flags),
        Command::Peers(flags) => peers::run(flags),
    }
}

/// The repository root (the parent of `xtask/`).
pub(crate) fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the root")
        .to_path_buf()
}
