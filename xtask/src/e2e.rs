//! `cargo xtask e2e`: builds the component binaries, runs the scenarios and writes the reports.
//!
//! `cargo xtask e2e lint` checks the scenario files, `cargo xtask e2e schema` prints (or with
//! `--check` verifies) their JSON Schema.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail, format_err};
use buildplane_harness::backend::Backend;
use buildplane_harness::backend::k3d::{K3dBackend, K3dBackendOptions, Setup};
use buildplane_harness::backend::kubeconfig::KubeconfigBackend;
use buildplane_harness::backend::sim::{ApiServers, SimBackend};
use buildplane_harness::pass_rate::{self, pass_rates};
use buildplane_harness::runner::{RunOptions, run_suite, summary_table};
use buildplane_harness::{build, lint, report, scenario};
use clap::{Args, Subcommand, ValueEnum};

use crate::project_root;

/// Flags of `cargo xtask e2e`.
#[derive(Args)]
pub(crate) struct E2eFlags {
    #[command(subcommand)]
    command: Option<E2eCommand>,
    /// Only scenarios whose name matches this regex.
    #[arg(long)]
    filter: Option<String>,
    /// Only scenarios with this label (repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Skip scenarios with this label (repeatable).
    #[arg(long = "skip-label")]
    skip_labels: Vec<String>,
    /// Run every selected scenario N times; the summary gives each one's pass rate with a 95 %
    /// (Wilson) interval.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    repeat: u32,
    /// Pass when every scenario's pass rate over its runs reaches this share (0 to 1; `0.66`
    /// lets one run in three fail), instead of failing on any failed run. Flaky scenarios are
    /// reported in the summary and as JUnit `flakyFailure`s either way.
    #[arg(long, value_parser = parse_rate)]
    min_pass_rate: Option<f64>,
    /// Keep the objects and files of failed scenarios for inspection.
    #[arg(long)]
    keep_on_failure: bool,
    /// `default` (1,000-agent storm) or `full` (10,000).
    #[arg(long, value_enum, default_value_t = Profile::Default)]
    profile: Profile,
    /// Where the scenarios run.
    #[arg(long, value_enum, default_value_t = BackendKind::Sim)]
    backend: BackendKind,
    /// Report directory (JUnit, JSON, HTML).
    #[arg(long, default_value = "target/e2e-report")]
    report_dir: PathBuf,
    /// Scenarios running at once.
    #[arg(long, default_value_t = 3)]
    jobs: usize,
    /// Scenario directory.
    #[arg(long, default_value = "scenarios")]
    scenarios: PathBuf,
    /// Do not build the component binaries (use what is in the target directory).
    #[arg(long)]
    no_build: bool,
    /// Build and run the components' release binaries (`target/release`) instead of the dev
    /// ones: for figures of time under CPU contention, which a debug build inflates.
    #[arg(long)]
    release: bool,
    /// k3d backend: keep the clusters after the run (delete them later with `cargo xtask k3d down`).
    #[arg(long)]
    keep: bool,
    /// k3d backend: print the commands that set up and tear down the clusters instead of running.
    #[arg(long)]
    dry_run: bool,
    /// k3d backend: k3s image of both clusters (default: k3d/values.yaml, or K3S_IMAGE).
    #[arg(long, env = "K3S_IMAGE")]
    k3s_image: Option<String>,
    /// kubeconfig backend: the kubeconfig file.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// kubeconfig backend: context of the control cluster.
    #[arg(long)]
    control_context: Option<String>,
    /// kubeconfig backend: context of the build cluster.
    #[arg(long)]
    build_context: Option<String>,
}

#[derive(Subcommand)]
enum E2eCommand {
    /// Check every scenario file (file, line and field of each mistake).
    Lint,
    /// Print the JSON Schema of scenario files (committed as scenarios/scenario.schema.json).
    Schema {
        /// Write it to this file instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Fail if scenarios/scenario.schema.json is not current.
        #[arg(long)]
        check: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Profile {
    Default,
    Full,
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendKind {
    Sim,
    /// Real etcd, kube-apiserver and kube-controller-manager per cluster (`cargo xtask peers build`).
    Apiserver,
    K3d,
    Kubeconfig,
}

fn load(dir: &std::path::Path) -> anyhow::Result<Vec<lint::LoadedScenario>> {
    let (scenarios, errors) = lint::load_dir(dir);
    if !errors.is_empty() {
        for error in &errors {
            eprintln!("{error}");
        }
        bail!("{} problem(s) in scenario files", errors.len());
    }
    Ok(scenarios)
}

/// Runs `cargo xtask e2e`.
pub(crate) fn run(flags: E2eFlags) -> anyhow::Result<()> {
    let root = project_root();
    let scenario_dir = root.join(&flags.scenarios);
    match flags.command {
        Some(E2eCommand::Lint) => {
            let scenarios = load(&scenario_dir)?;
            println!("{} scenario files OK", scenarios.len());
            return Ok(());
        }
        Some(E2eCommand::Schema { out, check }) => {
            let schema = scenario::json_schema();
            if check {
                let path = scenario_dir.join("scenario.schema.json");
                let committed = std::fs::read_to_string(&path).unwrap_or_default();
                if committed.trim_end() != schema.trim_end() {
                    bail!(
                        "{} is stale; run `cargo xtask e2e schema --out {}`",
                        path.display(),
                        path.display()
                    );
                }
                println!("{} is current", path.display());
                return Ok(());
            }
            match out {
                Some(path) => std::fs::write(&path, schema)
                    .with_context(|| format!("writing {}", path.display()))?,
                None => println!("{schema}"),
            }
            return Ok(());
        }
        None => {}
    }
    let started = tokio::time::Instant::now();
    let progress: Arc<dyn Fn(String) + Send + Sync> = Arc::new(move |line: String| {
        let elapsed = started.elapsed().as_secs_f64();
        for (i, part) in line.lines().enumerate() {
            if i == 0 {
                eprintln!("[{elapsed:7.1}s] {part}");
            } else {
                eprintln!("           {part}");
            }
        }
    });
    let scenarios = load(&scenario_dir)?;
    progress(format!("{} scenario files checked", scenarios.len()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut k3d_backend = None;
    let backend: Arc<dyn Backend> = match flags.backend {
        BackendKind::Sim | BackendKind::Apiserver => {
            let api_servers = match flags.backend {
                BackendKind::Apiserver => {
                    ApiServers::Real(buildplane_peers::ClusterPrograms::locate()?)
                }
                _ => ApiServers::KubeSim,
            };
            let profile = if flags.release {
                build::BuildProfile::Release
            } else {
                build::BuildProfile::Debug
            };
            let binaries = if flags.no_build {
                build::Binaries::from_dir(build::default_bin_dir(&root, profile))
            } else {
                let cargo = std::env::var_os("CARGO")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| "cargo".into());
                progress("building the component binaries".into());
                build::build_components(&cargo, &root, profile, &|line| progress(line))
            };
            Arc::new(SimBackend::with_api_servers(binaries, api_servers))
        }
        BackendKind::K3d => {
            let layout = crate::k3d::layout(flags.k3s_image.clone())?;
            if flags.dry_run {
                print!("{}", buildplane_harness::k3d::plan::up(&layout).script());
                if !flags.keep {
                    print!("{}", buildplane_harness::k3d::plan::down(&layout).script());
                }
                return Ok(());
            }
            let backend = Arc::new(K3dBackend::new(K3dBackendOptions::new(
                root.clone(),
                layout,
                Setup::Up,
                progress.clone(),
            )));
            // Set up once before any scenario, so missing tools give one message, not one per
            // scenario.
            runtime.block_on(backend.prepare())?;
            k3d_backend = Some(backend.clone());
            backend
        }
        BackendKind::Kubeconfig => Arc::new(KubeconfigBackend {
            kubeconfig: flags
                .kubeconfig
                .clone()
                .ok_or_else(|| format_err!("--backend kubeconfig needs --kubeconfig"))?,
            control_context: flags
                .control_context
                .clone()
                .ok_or_else(|| format_err!("--backend kubeconfig needs --control-context"))?,
            build_context: flags
                .build_context
                .clone()
                .ok_or_else(|| format_err!("--backend kubeconfig needs --build-context"))?,
            gateway: None,
        }),
    };
    let report_dir = if flags.report_dir.is_absolute() {
        flags.report_dir.clone()
    } else {
        root.join(&flags.report_dir)
    };
    let options = RunOptions {
        filter: flags
            .filter
            .as_deref()
            .map(regex::Regex::new)
            .transpose()
            .context("--filter")?,
        labels: flags.labels.clone(),
        skip_labels: flags.skip_labels.clone(),
        repeat: flags.repeat,
        keep_on_failure: flags.keep_on_failure,
        keep_files: false,
        profile: match flags.profile {
            Profile::Default => "default".into(),
            Profile::Full => "full".into(),
        },
        jobs: flags.jobs,
        work_dir: report_dir.join("work"),
        verbose: true,
    };
    let suite = runtime.block_on(crate::interrupt::unless_stopped(run_suite(
        backend,
        scenarios,
        options,
        progress.clone(),
    )));
    if let Some(k3d) = k3d_backend
        && let Err(err) = runtime.block_on(k3d.finish(flags.keep))
    {
        progress(format!("tearing down the k3d clusters failed: {err}"));
    }
    let suite = suite?;
    let paths = report::write_all(&suite, &report_dir).context("writing the reports")?;
    for path in paths {
        progress(format!("report: {}", path.display()));
    }
    println!("{}", summary_table(&suite));
    let rates = pass_rates(&suite.scenarios);
    print!("{}", pass_rate::table(&rates, flags.min_pass_rate));
    if suite.scenarios.is_empty() {
        bail!("no scenario selected");
    }
    let passes = match flags.min_pass_rate {
        Some(min) => {
            let below: Vec<&str> = rates
                .iter()
                .filter(|r| !r.meets(min))
                .map(|r| r.scenario.as_str())
                .collect();
            if below.is_empty() {
                println!(
                    "every scenario's pass rate reaches {}",
                    pass_rate::percent(min)
                );
            } else {
                println!(
                    "below --min-pass-rate {}: {}",
                    pass_rate::percent(min),
                    below.join(", ")
                );
            }
            below.is_empty()
        }
        None => suite.failed() == 0,
    };
    if !passes {
        std::process::exit(1);
    }
    Ok(())
}

/// A share in `[0, 1]`.
fn parse_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if (0.0..=1.0).contains(&rate) => Ok(rate),
        _ => Err(format!(
            "`{text}` is not a rate between 0 and 1 (e.g. 0.66)"
        )),
    }
}
