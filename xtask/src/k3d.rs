//! `cargo xtask k3d`: renders the k3d layout and creates, deploys, inspects and deletes the two
//! k3d clusters (control and build) with the components.
//!
//! Every subcommand is a plan of commands (crates/harness/src/k3d/plan.rs); `--dry-run` prints
//! it as a shell script instead of running it.

use anyhow::{bail, format_err};
use buildplane_harness::k3d::exec::{self, System};
use buildplane_harness::k3d::plan::{self, Layout, Plan};
use buildplane_harness::k3d::{render, values::Values};
use clap::{Args, Subcommand};

use crate::project_root;

/// Flags of `cargo xtask k3d`.
#[derive(Args)]
pub(crate) struct K3dFlags {
    #[command(subcommand)]
    command: K3dCommand,
    /// Print the commands instead of running them.
    #[arg(long, global = true)]
    dry_run: bool,
    /// k3s image of both clusters (default: `clusters.k3sImage` of k3d/values.yaml, or K3S_IMAGE).
    #[arg(long, global = true, env = "K3S_IMAGE")]
    k3s_image: Option<String>,
}

#[derive(Subcommand)]
enum K3dCommand {
    /// Create both clusters (reused when they exist), build and import the images, deploy, register.
    Up,
    /// Build and import the images, deploy and register on existing clusters.
    Deploy,
    /// Delete both clusters.
    Down,
    /// Show the clusters, the components and the BuildPlanes.
    Status,
    /// Write k3d/clusters and k3d/manifests/{control,build} from k3d/values.yaml.
    Render {
        /// Only check that the committed files are current.
        #[arg(long)]
        check: bool,
    },
}

/// The layout from the committed values, with an optional k3s image override.
pub(crate) fn layout(k3s_image: Option<String>) -> anyhow::Result<Layout> {
    let values = Values::committed(&project_root())?;
    let mut layout = Layout::new(values);
    layout.k3s_image = k3s_image;
    Ok(layout)
}

/// Runs a plan from the repository root, printing progress to stderr.
pub(crate) fn execute(plan: &Plan) -> anyhow::Result<()> {
    let mut system = System::new(&project_root());
    exec::execute(plan, &mut system, &|line| eprintln!("{line}"))?;
    Ok(())
}

/// Runs `cargo xtask k3d`.
pub(crate) fn run(flags: K3dFlags) -> anyhow::Result<()> {
    let layout = layout(flags.k3s_image)?;
    let plan = match flags.command {
        K3dCommand::Render { check } => return render_files(&layout.values, check),
        K3dCommand::Up => plan::up(&layout),
        K3dCommand::Deploy => plan::deploy(&layout),
        K3dCommand::Down => plan::down(&layout),
        K3dCommand::Status => plan::status(&layout),
    };
    let stale = render::stale_files(&project_root(), &layout.values);
    if !stale.is_empty() && plan.name != "down" && plan.name != "status" {
        bail!(
            "k3d files are stale vs k3d/values.yaml ({}); run `cargo xtask k3d render`",
            stale
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if flags.dry_run {
        print!("{}", plan.script());
        return Ok(());
    }
    execute(&plan)
}

fn render_files(values: &Values, check: bool) -> anyhow::Result<()> {
    let root = project_root();
    if check {
        let stale = render::stale_files(&root, values);
        if stale.is_empty() {
            println!("k3d files are current");
            return Ok(());
        }
        return Err(format_err!(
            "stale k3d files (run `cargo xtask k3d render`): {}",
            stale
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for path in render::write_all(&root, values)? {
        println!("wrote {}", path.display());
    }
    Ok(())
}
