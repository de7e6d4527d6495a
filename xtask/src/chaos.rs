//! `cargo xtask chaos`: a random fault schedule from a seed over a running environment with
//! steady load, the invariants checked, a failing schedule shrunk and written as a scenario.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use buildplane_harness::backend::sim::{ApiServers, SimBackend};
use buildplane_harness::build;
use buildplane_harness::chaos::{self, ChaosOptions, Invariant, schedule::Mix};
use buildplane_harness::result::SuiteResult;
use clap::{Args, ValueEnum};

use crate::project_root;

/// Flags of `cargo xtask chaos`.
#[derive(Args)]
pub(crate) struct ChaosFlags {
    /// Seed of the fault schedule (default: from the clock, printed so the run can be replayed).
    #[arg(long)]
    seed: Option<u64>,
    /// Length of the fault schedule, e.g. `60s` or `10m` (set-up and checks come on top).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Only tenant A's own faults (its agent, link, BuildPlane and CA), none of the shared parts.
    #[arg(long)]
    tenant_faults_only: bool,
    /// Do not shrink a failing schedule.
    #[arg(long)]
    no_shrink: bool,
    /// Most shrink trials (each runs a whole environment, about a minute).
    #[arg(long, default_value_t = 16)]
    max_trials: usize,
    /// Requests per second of each tenant's load.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Where the report, the work files and a shrunk scenario go.
    #[arg(long, default_value = "target/chaos")]
    out: PathBuf,
    /// Where the components run.
    #[arg(long, value_enum, default_value_t = ChaosBackend::Sim)]
    backend: ChaosBackend,
    /// Run a gateway built with a deliberate defect (the harness's self-test: chaos must find
    /// it). `skip-revocation`: a connection no CR admits any more is kept and keeps serving.
    #[arg(long, value_enum)]
    gateway_defect: Option<Defect>,
    /// Exit non-zero unless this invariant is broken (with `--gateway-defect`, the self-test).
    #[arg(long, value_parser = parse_invariant)]
    expect_violation: Option<Invariant>,
    /// Exit non-zero unless the shrunk schedule has at most this many faults.
    #[arg(long)]
    expect_at_most: Option<usize>,
    /// Do not build the component binaries.
    #[arg(long)]
    no_build: bool,
    /// Print the schedule and the scenario it becomes, and run nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum ChaosBackend {
    Sim,
    /// Real etcd, kube-apiserver and kube-controller-manager per cluster.
    Apiserver,
}

#[derive(Clone, Copy, ValueEnum)]
enum Defect {
    SkipRevocation,
}

impl Defect {
    fn feature(self) -> &'static str {
        match self {
            Defect::SkipRevocation => "chaos-defect-skip-revocation",
        }
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    match text.parse::<buildplane_harness::duration::Dur>() {
        Ok(d) if !d.0.is_zero() => Ok(d.0),
        Ok(_) => Err("the duration must be positive".into()),
        Err(err) => Err(err.to_string()),
    }
}

fn parse_invariant(text: &str) -> Result<Invariant, String> {
    Invariant::ALL
        .into_iter()
        .find(|i| i.as_str() == text)
        .ok_or_else(|| format!("unknown invariant `{text}`"))
}

/// Runs `cargo xtask chaos`.
pub(crate) fn run(flags: ChaosFlags) -> anyhow::Result<()> {
    let root = project_root();
    let seed = flags.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    });
    let out_dir = if flags.out.is_absolute() {
        flags.out.clone()
    } else {
        root.join(&flags.out)
    };
    let mix = Mix {
        shared: !flags.tenant_faults_only,
        api_servers: !flags.tenant_faults_only,
    };
    if flags.dry_run {
        let events = chaos::schedule::generate(seed, flags.duration, mix);
        let options = ChaosOptions {
            seed,
            duration: flags.duration,
            mix,
            shrink: false,
            max_trials: 0,
            out_dir,
            rate: flags.rate,
        };
        println!("# seed {seed}: {} faults", events.len());
        print!(
            "{}",
            chaos::scenario_yaml(&format!("chaos-{seed}"), &events, &options, None)
        );
        return Ok(());
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
    let cargo = std::env::var_os("CARGO")
        .map(PathBuf::from)
        .unwrap_or_else(|| "cargo".into());
    let mut binaries = if flags.no_build {
        build::Binaries::from_dir(build::default_bin_dir(&root, build::BuildProfile::Debug))
    } else {
        progress("building the component binaries".into());
        build::build_components(&cargo, &root, build::BuildProfile::Debug, &|line| {
            progress(line)
        })
    };
    if let Some(defect) = flags.gateway_defect {
        binaries = with_defective_gateway(&cargo, &root, &binaries, defect, &out_dir)?;
        progress(format!(
            "the gateway is built with `{}`: chaos must catch it",
            defect.feature()
        ));
    }
    let api_servers = match flags.backend {
        ChaosBackend::Apiserver => ApiServers::Real(buildplane_peers::ClusterPrograms::locate()?),
        ChaosBackend::Sim => ApiServers::KubeSim,
    };
    let backend = Arc::new(SimBackend::with_api_servers(binaries, api_servers));
    let options = ChaosOptions {
        seed,
        duration: flags.duration,
        mix,
        shrink: !flags.no_shrink,
        max_trials: flags.max_trials,
        out_dir: out_dir.clone(),
        rate: flags.rate,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime
        .block_on(crate::interrupt::unless_stopped(chaos::run(
            backend,
            &options,
            progress.clone(),
        )))?
        .context("chaos run")?;
    std::fs::create_dir_all(&out_dir)?;
    let json_path = chaos::report_path(&out_dir, seed);
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
    if let Some(result) = &report.result {
        // The first run's HTML report: the fault schedule on the load's time axis.
        let suite = SuiteResult {
            backend: "sim".into(),
            profile: format!("chaos seed {seed}"),
            started: format!("chaos run of seed {seed}"),
            duration: result.duration,
            scenarios: vec![result.clone()],
        };
        let html = out_dir.join(format!("chaos-{seed}.html"));
        std::fs::write(&html, buildplane_harness::report::html(&suite))?;
        progress(format!("report: {}", html.display()));
    }
    progress(format!("report: {}", json_path.display()));
    println!("chaos seed {seed}: {} faults", report.schedule.len());
    if report.violations.is_empty() {
        println!("every invariant held");
    }
    for violation in &report.violations {
        println!(
            "BROKEN {}: {} ({})",
            violation.invariant.as_str(),
            violation.detail,
            violation.invariant.promise()
        );
    }
    if let (Some(shrunk), Some(file)) = (&report.shrunk, &report.scenario_file) {
        println!(
            "shrunk to {} fault(s) in {} trials: {}",
            shrunk.len(),
            report.shrink_trials,
            file.display()
        );
    }
    match flags.expect_violation {
        Some(expected) => {
            if !report.violations.iter().any(|v| v.invariant == expected) {
                bail!(
                    "expected invariant `{}` to break; it held",
                    expected.as_str()
                );
            }
            if let (Some(most), Some(shrunk)) = (flags.expect_at_most, &report.shrunk)
                && shrunk.len() > most
            {
                bail!(
                    "the shrunk schedule has {} faults, more than {most}",
                    shrunk.len()
                );
            }
            println!("as expected, `{}` was broken", expected.as_str());
            Ok(())
        }
        None if report.violations.is_empty() => Ok(()),
        None => std::process::exit(1),
    }
}

/// A directory with the components of `binaries` and a gateway built with `defect`.
fn with_defective_gateway(
    cargo: &std::path::Path,
    root: &std::path::Path,
    binaries: &build::Binaries,
    defect: Defect,
    out_dir: &std::path::Path,
) -> anyhow::Result<build::Binaries> {
    let dir = out_dir.join("bin");
    std::fs::create_dir_all(&dir)?;
    for (_, binary) in build::COMPONENTS {
        let from = binaries.dir.join(binary);
        let to = dir.join(binary);
        let _ = std::fs::remove_file(&to);
        std::fs::copy(&from, &to).with_context(|| format!("copying {}", from.display()))?;
    }
    let status = build::cargo_command(cargo)
        .current_dir(root)
        .args([
            "build",
            "-p",
            "cluster-gateway",
            "--bin",
            "cluster-gateway",
            "--features",
            defect.feature(),
        ])
        .status()
        .context("cargo build of the defective gateway")?;
    if !status.success() {
        bail!("building the gateway with {} failed", defect.feature());
    }
    let built = binaries.dir.join("cluster-gateway");
    std::fs::copy(&built, dir.join("cluster-gateway"))?;
    // Put the sound gateway back where every other command expects it.
    let status = build::cargo_command(cargo)
        .current_dir(root)
        .args(["build", "-p", "cluster-gateway", "--bin", "cluster-gateway"])
        .status()?;
    if !status.success() {
        bail!("rebuilding the gateway without the defect failed");
    }
    Ok(build::Binaries::from_dir(dir))
}
