//! `cargo xtask bench`: runs the criterion benches of `benches/` and `buildplane-bench` (latency,
//! CPU per response, idle memory, restart storm), writes `BENCHMARKS.md` and `target/bench/bench.json`, and
//! compares with a saved baseline.
//!
//! Peers: rathole (pinned, built once from `benches/peers/rathole` into `target/peers/`) runs as
//! one more path of the end-to-end and latency benches. When it cannot be built here, its figures
//! and targets are reported as skipped with the reason, never as met.
//!
//! Gateway replicas (issue #15): every fleet's restart storm runs with one gateway and again
//! with three replicas behind balancers (all three killed), and the end-to-end bench runs 1 KiB
//! at c64 through one and three replicas behind a balancer; both against one gateway of the
//! same run.
//!
//! `--quick` is the CI smoke: the dev profile (no release build), short runs, 100 agents, the
//! report under `target/bench/`; it checks that every figure was produced and never fails on a
//! wall-clock figure or a target.
//!
//! `--compare REV` builds REV and the working tree and runs them interleaved (`compare.rs`).

mod compare;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::SystemTime,
};

use anyhow::{Context as _, bail, format_err};
use clap::Args;
use serde_json::{Value, json};

use buildplane_harness::build::cargo_command;

use crate::project_root;

/// Flags of `cargo xtask bench`.
#[derive(Args)]
pub(crate) struct BenchFlags {
    /// CI smoke: dev profile, short runs, small fleet; never fails on timings.
    #[arg(long)]
    quick: bool,
    /// Save this run as baseline NAME (`target/bench/baselines/NAME.json`).
    #[arg(long, value_name = "NAME")]
    save_baseline: Option<String>,
    /// Compare with baseline NAME; exit non-zero if a figure regressed beyond --threshold.
    #[arg(long, value_name = "NAME")]
    baseline: Option<String>,
    /// Build git revision REV (A) and the working tree (B), run their benches interleaved
    /// (A, B, then B, A, …) and report B/A per figure; exit non-zero only on a significant
    /// regression beyond --threshold.
    #[arg(long, value_name = "REV", conflicts_with_all = ["baseline", "save_baseline"])]
    compare: Option<String>,
    /// Rounds of --compare; each round runs every bench on both sides.
    #[arg(long, default_value_t = 10, requires = "compare", value_parser = clap::value_parser!(u32).range(2..))]
    rounds: u32,
    /// With --compare: every figure of `cargo xtask bench`, not only the pull-request subset.
    #[arg(long, requires = "compare", conflicts_with = "quick")]
    full: bool,
    /// Regression threshold in percent: 20 against a --baseline, 10 with --compare.
    #[arg(long, value_parser = positive_percent)]
    threshold: Option<f64>,
    /// Agents of the storm (and of the first memory point).
    #[arg(long)]
    storm_agents: Option<usize>,
    /// Only the soak: 10,000 idle agents (`--soak-agents`) for 10 minutes (`--soak-secs`):
    /// disconnects, gateway RSS growth and CPU per idle agent; writes `target/bench/soak.json`.
    #[arg(long, conflicts_with_all = ["compare", "quick"])]
    soak: bool,
    /// Agents of the soak.
    #[arg(long, default_value_t = 10_000, requires = "soak")]
    soak_agents: usize,
    /// Length of the soak in seconds.
    #[arg(long, default_value_t = 600, requires = "soak")]
    soak_secs: u64,
}

fn positive_percent(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(percent) if percent > 0.0 && percent.is_finite() => Ok(percent),
        _ => Err(format!("expected a positive number of percent, got {text}")),
    }
}

/// The executables every bench run needs: the gateway, the agent and `buildplane-bench`.
pub(crate) const BENCH_BINARIES: &[&str] = &[
    "-p",
    "cluster-gateway",
    "-p",
    "cluster-agent",
    "-p",
    "buildplane-benches",
    "--bins",
];

/// Gateway replicas of the high-availability figures (issue #15), against one gateway.
const REPLICAS: u32 = 3;

/// The rathole version `benches/peers/rathole` pins (a test checks that the two agree).
const RATHOLE_VERSION: &str = "0.5.0";

/// Names the rathole binary for the benches (`buildplane_benches::rathole::RATHOLE_ENV`).
const RATHOLE_ENV: &str = "BUILDPLANE_RATHOLE";

/// The rathole the benches run.
struct RatholePeer {
    binary: PathBuf,
    /// Its TLS library, as the report names it.
    tls: String,
}

/// Higher or lower is better.
#[derive(Clone, Copy, PartialEq)]
enum Better {
    Higher,
    Lower,
}

struct Figure {
    value: f64,
    unit: &'static str,
    better: Better,
}

#[derive(Default)]
struct Figures(BTreeMap<String, Figure>);

impl Figures {
    fn put(&mut self, name: impl Into<String>, value: f64, unit: &'static str, better: Better) {
        if value.is_finite() {
            self.0.insert(
                name.into(),
                Figure {
                    value,
                    unit,
                    better,
                },
            );
        }
    }

    fn get(&self, name: &str) -> Option<f64> {
        self.0.get(name).map(|f| f.value)
    }
}

/// A JSON number, NaN when absent (`Figures::put` skips it).
fn number(value: &Value) -> f64 {
    value.as_f64().unwrap_or(f64::NAN)
}

/// One criterion result.
struct Estimate {
    group: String,
    function: String,
    value: Option<String>,
    mean_ns: f64,
    /// Bytes or elements per iteration.
    per_iter: f64,
}

pub(crate) fn run(flags: BenchFlags) -> anyhow::Result<()> {
    if let Some(rev) = &flags.compare {
        return compare::run(rev, &flags);
    }
    let threshold = flags.threshold.unwrap_or(20.0);
    let root = project_root();
    let started = SystemTime::now();
    let target = target_dir(&root)?;
    let (profile_args, profile_dir): (&[&str], &str) = if flags.quick {
        (&["--profile", "dev"], "debug")
    } else {
        (&["--release"], "release")
    };
    let bin_dir = target.join(profile_dir);
    let out_dir = target.join("bench");
    std::fs::create_dir_all(&out_dir)?;

    eprintln!("== building the gateway, the agent and buildplane-bench");
    cargo(
        &root,
        &[&["build"], profile_args, BENCH_BINARIES].concat(),
        flags.quick,
        &[],
    )?;

    if flags.soak {
        return soak(&flags, &bin_dir, &out_dir);
    }

    eprintln!("== rathole {RATHOLE_VERSION}, the peer measured beside the tunnel");
    let rathole = rathole(&root, &target);
    match &rathole {
        Ok(peer) => eprintln!("rathole: {}", peer.binary.display()),
        Err(reason) => eprintln!("rathole: skipped: {reason}"),
    }
    let peer_env: Vec<(&str, &Path)> = match &rathole {
        Ok(peer) => vec![(RATHOLE_ENV, peer.binary.as_path())],
        Err(_) => Vec::new(),
    };

    eprintln!("== criterion benches (codec, e2e, handshake)");
    let bench_profile: &[&str] = if flags.quick {
        &["--profile", "dev"]
    } else {
        &[]
    };
    cargo(
        &root,
        &[
            &["bench"],
            bench_profile,
            &[
                "-p",
                "buildplane-benches",
                "--bench",
                "codec",
                "--bench",
                "e2e",
            ],
            &["--bench", "handshake", "--", "--noplot"],
        ]
        .concat(),
        flags.quick,
        &peer_env,
    )?;
    let estimates = read_criterion(&target.join("criterion"), started)?;

    let bench = bin_dir.join("buildplane-bench");
    eprintln!("== latency at half of peak load");
    let latency = run_json(
        &bench,
        &[
            &["latency"][..],
            if flags.quick { &["--quick"] } else { &[] },
        ]
        .concat(),
        &peer_env,
    )?;

    let bin = bin_dir.display().to_string();
    eprintln!("== CPU of gateway and agent per 1,000 proxied 64 KiB responses, v1 and v2");
    let cpu_requests = if flags.quick { "200" } else { "5000" };
    let cpu = run_json(
        &bench,
        &["cpu", "--bin-dir", &bin, "--requests", cpu_requests],
        &[],
    )?;

    let storm_agents = flags
        .storm_agents
        .unwrap_or(if flags.quick { 100 } else { 1000 });
    // The single-replica storm figures (`storm.*`) come from the largest fleet: with 1,000
    // agents the peak admission window measures how fast 1,000 agents arrive (at most
    // 1,000/s), not what the gateway can admit. Every fleet storms, so that each size has its
    // single-replica figure beside the three replicas' of the same run.
    let storm_count = storm_agents.to_string();
    let small_args = [
        "fleet",
        "--count",
        &storm_count,
        "--processes",
        "2",
        "--bin-dir",
        &bin,
        "--storm",
    ];
    eprintln!("== fleet of {storm_agents} agents: idle memory, then a gateway restart storm");
    let fleet_small = run_json(&bench, &small_args, &[])?;
    let fleet_large = if flags.quick {
        None
    } else {
        eprintln!("== fleet of 10000 agents: idle memory, then a gateway restart storm");
        Some(run_json(
            &bench,
            &[
                "fleet",
                "--count",
                "10000",
                "--processes",
                "4",
                "--bin-dir",
                &bin,
                "--storm",
            ],
            &[],
        )?)
    };
    // The same fleets with three replicas (issue #15): every agent holds one connection to each
    // through a balancer beside its swarm process, and the storm kills all three.
    let replicas = REPLICAS.to_string();
    let mut replica_fleets = Vec::new();
    for (count, processes) in [(storm_count.as_str(), "2"), ("10000", "4")] {
        if flags.quick && count == "10000" {
            continue;
        }
        eprintln!(
            "== {REPLICAS} gateway replicas behind balancers, {count} agents: restart storm of every replica"
        );
        replica_fleets.push(run_json(
            &bench,
            &[
                "fleet",
                "--count",
                count,
                "--processes",
                processes,
                "--replicas",
                &replicas,
                "--bin-dir",
                &bin,
                "--storm",
            ],
            &[],
        )?);
    }

    let mut figures = Figures::default();
    collect_criterion(&estimates, &mut figures);
    collect_latency(&latency, &mut figures);
    collect_cpu(&cpu, &mut figures);
    collect_fleet(&fleet_small, fleet_large.as_ref(), &mut figures);
    for fleet in [Some(&fleet_small), fleet_large.as_ref()]
        .into_iter()
        .flatten()
        .chain(&replica_fleets)
    {
        collect_replica_storm(fleet, &mut figures);
    }
    let rathole_skipped = rathole.as_ref().err().cloned();
    let missing = missing_figures(&figures, flags.quick, rathole_skipped.is_none());
    let targets = targets(&figures, flags.quick, rathole_skipped.as_deref());
    let machine = machine();
    let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    let report = json!({
        "date": date,
        "quick": flags.quick,
        "machine": machine,
        "figures": figures.0.iter().map(|(k, f)| (k.clone(), json!({"value": f.value, "unit": f.unit, "better": if f.better == Better::Higher { "higher" } else { "lower" }}))).collect::<serde_json::Map<_, _>>(),
        "targets": targets.iter().map(|t| json!({"name": t.name, "value": t.value, "target": t.target, "met": t.verdict.met(), "skipped": t.verdict.skipped()})).collect::<Vec<_>>(),
        "peers": {"rathole": match &rathole {
            Ok(peer) => json!({"version": RATHOLE_VERSION, "binary": peer.binary, "tls": peer.tls}),
            Err(reason) => json!({"version": RATHOLE_VERSION, "skipped": reason}),
        }},
        "raw": {"latency": latency, "cpu": cpu, "fleet": fleet_small, "fleet_10k": fleet_large, "fleet_replicas": replica_fleets},
    });
    let json_path = out_dir.join(if flags.quick {
        "bench-quick.json"
    } else {
        "bench.json"
    });
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
    let markdown_path = if flags.quick {
        out_dir.join("BENCHMARKS.md")
    } else {
        root.join("BENCHMARKS.md")
    };
    let notes = std::fs::read_to_string(root.join("BENCHMARKS.md"))
        .ok()
        .and_then(|text| text.find(NOTES_MARKER).map(|at| text[at..].to_owned()));
    std::fs::write(
        &markdown_path,
        markdown(&report, &figures, &targets, notes.as_deref()),
    )?;
    eprintln!(
        "wrote {} and {}",
        markdown_path.display(),
        json_path.display()
    );
    if flags.quick {
        eprintln!(
            "--quick: dev profile, short samples and {storm_agents} agents (a storm of {storm_agents} cannot admit more than {storm_agents}/s), so these verdicts are a smoke check; the release run's are in BENCHMARKS.md"
        );
    }
    for t in &targets {
        eprintln!(
            "target {:<48} {:>10.3} vs {:<10} {}",
            t.name,
            t.value,
            t.target,
            match &t.verdict {
                Verdict::Met => "met".to_owned(),
                Verdict::Missed => "NOT MET".to_owned(),
                Verdict::Skipped(reason) => format!("skipped: {reason}"),
            }
        );
    }

    let mut failed = Vec::new();
    if !missing.is_empty() {
        failed.push(format!("figures not produced: {}", missing.join(", ")));
    }
    if let Some(name) = &flags.save_baseline {
        let dir = out_dir.join("baselines");
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(&json_path, dir.join(format!("{name}.json")))?;
        eprintln!("saved baseline {name}");
    }
    if let Some(name) = &flags.baseline {
        let path = out_dir.join("baselines").join(format!("{name}.json"));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading baseline {}", path.display()))?;
        let baseline: Value = serde_json::from_str(&text)?;
        let regressions = compare_baseline(&baseline, &figures, threshold);
        if regressions.is_empty() {
            eprintln!(
                "no figure regressed by more than {}% against {name}",
                threshold
            );
        } else if flags.quick {
            eprintln!(
                "--quick does not fail on timings; {} figure(s) worse than {name} by more than {}%:\n  {}",
                regressions.len(),
                threshold,
                regressions.join("\n  ")
            );
        } else {
            failed.push(format!(
                "{} figure(s) regressed by more than {}% against baseline {name}:\n  {}",
                regressions.len(),
                threshold,
                regressions.join("\n  ")
            ));
        }
    }
    if !failed.is_empty() {
        bail!("{}", failed.join("\n"));
    }
    Ok(())
}

const NOTES_MARKER: &str = "<!-- notes: kept across runs -->";

/// Builds rathole from `benches/peers/rathole` (its pinned lock file and its own release
/// profile, in `--quick` too: one binary, the one its users get) into
/// `target/peers/rathole-VERSION`; once built, cargo finds it fresh in about a second.
/// `Err` says why it cannot run on this machine.
fn rathole(root: &Path, target: &Path) -> Result<RatholePeer, String> {
    // rathole's TLS is native-tls, OpenSSL on Linux: the library it links and the command that
    // packs its PKCS#12 identity come together.
    let openssl = command_output("openssl", &["version"])
        .filter(|v| !v.is_empty())
        .ok_or("the `openssl` command is missing (it packs rathole's PKCS#12 identity)")?;
    let dir = target
        .join("peers")
        .join(format!("rathole-{RATHOLE_VERSION}"));
    let binary = dir.join("release").join("rathole");
    if !binary.is_file() {
        eprintln!(
            "building rathole {RATHOLE_VERSION} once, with its release profile (LTO; about 5 minutes on 2 cores)"
        );
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = cargo_command(cargo)
        .args(["build", "--release", "--locked", "--manifest-path"])
        .arg(root.join("benches/peers/rathole/Cargo.toml"))
        .arg("--target-dir")
        .arg(&dir)
        .current_dir(root)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|err| format!("could not run cargo to build rathole: {err}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        eprintln!("{}", lines[lines.len().saturating_sub(30)..].join("\n"));
        let first_error = lines
            .iter()
            .find(|l| l.starts_with("error"))
            .unwrap_or(&"no error line");
        return Err(format!(
            "building rathole {RATHOLE_VERSION} failed ({}): {first_error}",
            output.status
        ));
    }
    if !binary.is_file() {
        return Err(format!(
            "cargo built rathole {RATHOLE_VERSION} but {} is missing",
            binary.display()
        ));
    }
    // "OpenSSL 3.0.19 27 Jan 2026 (Library: ...)": the name and version are enough.
    let openssl: Vec<&str> = openssl.split_whitespace().take(2).collect();
    Ok(RatholePeer {
        binary,
        tls: format!("native-tls over {}", openssl.join(" ")),
    })
}

fn target_dir(root: &Path) -> anyhow::Result<PathBuf> {
    let output = cargo_command(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .current_dir(root)
        .output()?;
    let metadata: Value = serde_json::from_slice(&output.stdout)?;
    metadata["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .ok_or_else(|| format_err!("cargo metadata has no target_directory"))
}

fn cargo(root: &Path, args: &[&str], quick: bool, envs: &[(&str, &Path)]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = cargo_command(cargo);
    command
        .args(args)
        .current_dir(root)
        .envs(envs.iter().copied());
    if quick {
        command.env("BUILDPLANE_BENCH_QUICK", "1");
    }
    let status = command.status()?;
    if !status.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    Ok(())
}

fn run_json(bin: &Path, args: &[&str], envs: &[(&str, &Path)]) -> anyhow::Result<Value> {
    let output = Command::new(bin)
        .args(args)
        .envs(envs.iter().copied())
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !output.status.success() {
        bail!("{} {} failed", bin.display(), args.join(" "));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| format_err!("{} printed no JSON", bin.display()))?;
    Ok(serde_json::from_str(line)?)
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    Some(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Every `new/benchmark.json` under `dir` written since `since`, with its estimates.
fn read_criterion(dir: &Path, since: SystemTime) -> anyhow::Result<Vec<Estimate>> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let fresh = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|m| m >= since);
            if !fresh
                || path.file_name().is_none_or(|n| n != "benchmark.json")
                || path
                    .parent()
                    .and_then(Path::file_name)
                    .is_none_or(|n| n != "new")
            {
                continue;
            }
            let benchmark: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
            let estimates: Value = serde_json::from_str(&std::fs::read_to_string(
                path.with_file_name("estimates.json"),
            )?)?;
            let throughput = &benchmark["throughput"];
            let per_iter = throughput["Bytes"]
                .as_f64()
                .or_else(|| throughput["BytesDecimal"].as_f64())
                .or_else(|| throughput["Elements"].as_f64())
                .unwrap_or(1.0);
            found.push(Estimate {
                group: benchmark["group_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                function: benchmark["function_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                value: benchmark["value_str"].as_str().map(str::to_owned),
                mean_ns: estimates["mean"]["point_estimate"]
                    .as_f64()
                    .unwrap_or(f64::NAN),
                per_iter,
            });
        }
    }
    Ok(found)
}

fn collect_criterion(estimates: &[Estimate], figures: &mut Figures) {
    const MIB: f64 = 1024.0 * 1024.0;
    for e in estimates {
        let per_sec = e.per_iter / (e.mean_ns * 1e-9);
        if e.group == "codec" {
            let size = e.value.clone().unwrap_or_default();
            figures.put(
                format!("codec.{}.{size}", e.function),
                per_sec / MIB,
                "MiB/s",
                Better::Higher,
            );
            figures.put(
                format!("codec.{}.{size}.per_msg", e.function),
                1e9 / e.mean_ns,
                "msg/s",
                Better::Higher,
            );
        } else if let Some(case) = e.group.strip_prefix("e2e_") {
            figures.put(
                format!("e2e.{case}.{}", e.function),
                per_sec / MIB,
                "MiB/s",
                Better::Higher,
            );
        } else if e.group == "handshake" {
            figures.put(
                format!("handshake.{}", e.function),
                per_sec,
                "1/s",
                Better::Higher,
            );
        }
    }
}

/// The figures of `buildplane-bench latency`.
fn collect_latency(latency: &Value, figures: &mut Figures) {
    figures.put(
        "latency.peak_rps_v2",
        number(&latency["peak_rps_v2"]),
        "req/s",
        Better::Higher,
    );
    for path in ["direct", "relay", "v1", "v2", "rathole", "null"] {
        figures.put(
            format!("latency.{path}.p50"),
            number(&latency[path]["p50_ms"]),
            "ms",
            Better::Lower,
        );
        figures.put(
            format!("latency.{path}.p99"),
            number(&latency[path]["p99_ms"]),
            "ms",
            Better::Lower,
        );
        let (failed, started) = (
            number(&latency[path]["failed"]),
            number(&latency[path]["n"]),
        );
        if started > 0.0 {
            figures.put(
                format!("latency.{path}.failed"),
                failed / started * 100.0,
                "%",
                Better::Lower,
            );
        }
    }
    figures.put(
        "latency.added_p99_v2",
        number(&latency["added_p99_ms_v2"]),
        "ms",
        Better::Lower,
    );
    figures.put(
        "latency.added_p99_relay",
        number(&latency["added_p99_ms_relay"]),
        "ms",
        Better::Lower,
    );
    figures.put(
        "latency.added_p99_rathole",
        number(&latency["added_p99_ms_rathole"]),
        "ms",
        Better::Lower,
    );
    figures.put(
        "latency.added_p99_null",
        number(&latency["added_p99_ms_null"]),
        "ms",
        Better::Lower,
    );
}

/// `--soak`: the fleet idles for `--soak-secs`; the verdicts are the issue's: no disconnect,
/// gateway RSS growth under 5 %.
fn soak(flags: &BenchFlags, bin_dir: &Path, out_dir: &Path) -> anyhow::Result<()> {
    let bench = bin_dir.join("buildplane-bench");
    let bin = bin_dir.display().to_string();
    let agents = flags.soak_agents.to_string();
    let secs = flags.soak_secs.to_string();
    // At most about 2,500 agents per swarm process (open files).
    let processes = flags.soak_agents.div_ceil(2_500).max(1).to_string();
    eprintln!("== soak: {agents} agents idle for {secs} s ({processes} swarm processes)");
    let fleet = run_json(
        &bench,
        &[
            "fleet",
            "--count",
            &agents,
            "--processes",
            &processes,
            "--bin-dir",
            &bin,
            "--soak-secs",
            &secs,
            "--timeout-secs",
            "600",
        ],
        &[],
    )?;
    let soak = &fleet["soak"];
    let path = out_dir.join("soak.json");
    std::fs::write(&path, serde_json::to_string_pretty(&fleet)?)?;
    let reconnects = soak["reconnects"].as_u64().unwrap_or(u64::MAX);
    let fewest = soak["fewest_connections"].as_u64().unwrap_or(0);
    let growth = number(&soak["rss_growth_pct"]);
    println!(
        "soak: {} agents for {:.0} s: fewest connected {fewest}, reconnects {reconnects}, gateway RSS growth {growth:.2} %, CPU {:.2} µs per agent per second (heartbeat every {} s); {}",
        soak["agents"],
        number(&soak["secs"]),
        number(&soak["cpu_us_per_agent_per_sec"]),
        soak["heartbeat_interval_secs"],
        path.display()
    );
    let mut problems = Vec::new();
    if reconnects > 0 || fewest < flags.soak_agents as u64 {
        problems.push(format!(
            "agents disconnected: {reconnects} reconnects, {fewest} connected at the lowest"
        ));
    }
    if growth.is_nan() || growth >= 5.0 {
        problems.push(format!("gateway RSS grew {growth:.2} % (limit 5 %)"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("soak failed: {}", problems.join("; "))
    }
}

/// The figures of `buildplane-bench cpu`: CPU seconds of gateway and agent per 1,000 responses.
fn collect_cpu(cpu: &Value, figures: &mut Figures) {
    for protocol in ["v1", "v2", "relay"] {
        figures.put(
            format!("cpu.{protocol}.per_1000"),
            number(&cpu[protocol]["cpu_seconds_per_1000"]),
            "s",
            Better::Lower,
        );
    }
}

/// The figures of `buildplane-bench fleet`: idle memory of each fleet, and the storm of the
/// largest.
fn collect_fleet(fleet: &Value, fleet_large: Option<&Value>, figures: &mut Figures) {
    let count = fleet["count"].as_u64().unwrap_or(0);
    figures.put(
        format!("memory.per_agent.{count}"),
        number(&fleet["rss_per_agent_kib"]),
        "KiB",
        Better::Lower,
    );
    figures.put(
        format!("memory.per_cr.{count}"),
        number(&fleet["rss_per_cr_kib"]),
        "KiB",
        Better::Lower,
    );
    if let Some(large) = fleet_large {
        let count = large["count"].as_u64().unwrap_or(0);
        figures.put(
            format!("memory.per_agent.{count}"),
            number(&large["rss_per_agent_kib"]),
            "KiB",
            Better::Lower,
        );
        figures.put(
            format!("memory.per_cr.{count}"),
            number(&large["rss_per_cr_kib"]),
            "KiB",
            Better::Lower,
        );
        figures.put(
            format!("fleet.initial_connect.{count}"),
            number(&large["initial_connect_secs"]),
            "s",
            Better::Lower,
        );
    }
    let storm = &fleet_large.unwrap_or(fleet)["storm"];
    figures.put(
        "storm.all_back",
        number(&storm["all_back_secs"]),
        "s",
        Better::Lower,
    );
    figures.put(
        "storm.gateway_restart",
        number(&storm["events_subscribed_secs"]),
        "s",
        Better::Lower,
    );
    figures.put(
        "storm.admission_rate_peak",
        number(&storm["admission_rate_peak_1s"]),
        "1/s",
        Better::Higher,
    );
    figures.put(
        "storm.admission_rate_mean",
        number(&storm["admission_rate_mean"]),
        "1/s",
        Better::Higher,
    );
    for q in ["p50", "p90", "p99"] {
        figures.put(
            format!("storm.reconnect_{q}"),
            number(&storm[format!("reconnect_{q}_secs")]),
            "s",
            Better::Lower,
        );
    }
    let trust = &fleet_large.unwrap_or(fleet)["trust"];
    figures.put(
        "trust.ca_change_reverify",
        number(&trust["ca_change_reverify_secs"]),
        "s",
        Better::Lower,
    );
    figures.put(
        "trust.reverified_after_unrelated_secrets",
        number(&trust["reverified_after_unrelated"]),
        "connections",
        Better::Lower,
    );
    figures.put(
        "trust.cpu_unrelated_secrets",
        number(&trust["gateway_cpu_secs_unrelated"]),
        "s",
        Better::Lower,
    );
}

/// The restart storm of a fleet as `storm.{agents}.replicas{N}.*`: one gateway (N = 1) and
/// N replicas behind balancers, each size measured both ways in the same run.
fn collect_replica_storm(fleet: &Value, figures: &mut Figures) {
    let storm = &fleet["storm"];
    let (Some(count), Some(replicas)) = (storm["count"].as_u64(), storm["replicas"].as_u64())
    else {
        return;
    };
    let name = |figure: &str| format!("storm.{count}.replicas{replicas}.{figure}");
    for (figure, key, unit, better) in [
        ("serving", "all_subscribed_secs", "s", Better::Lower),
        ("one_back", "one_back_secs", "s", Better::Lower),
        ("all_back", "all_back_secs", "s", Better::Lower),
        (
            "admission_rate_mean",
            "admission_rate_mean",
            "1/s",
            Better::Higher,
        ),
        (
            "admission_rate_peak",
            "admission_rate_peak_1s",
            "1/s",
            Better::Higher,
        ),
        ("reconnect_p50", "reconnect_p50_secs", "s", Better::Lower),
        ("reconnect_p99", "reconnect_p99_secs", "s", Better::Lower),
        (
            "handshakes_per_agent",
            "handshakes_per_agent",
            "handshakes",
            Better::Lower,
        ),
        (
            "held_refusals_per_agent",
            "held_refusals_per_agent",
            "handshakes",
            Better::Lower,
        ),
        (
            "silent_refusals_per_agent",
            "silent_refusals_per_agent",
            "connections",
            Better::Lower,
        ),
        ("gateway_cpu", "gateway_cpu_secs", "s", Better::Lower),
        ("swarm_cpu", "swarm_cpu_secs", "s", Better::Lower),
        ("balancer_cpu", "balancer_cpu_secs", "s", Better::Lower),
    ] {
        figures.put(name(figure), number(&storm[key]), unit, better);
    }
}

/// The agents of the largest fleet whose storm was measured both with one gateway and with
/// [`REPLICAS`] replicas.
fn replica_storm_agents(figures: &Figures) -> Option<u64> {
    figures
        .0
        .keys()
        .filter_map(|k| {
            k.strip_prefix("storm.")?
                .strip_suffix(&format!(".replicas{REPLICAS}.all_back"))?
                .parse::<u64>()
                .ok()
        })
        .filter(|count| {
            figures
                .get(&format!("storm.{count}.replicas1.all_back"))
                .is_some()
        })
        .max()
}

/// Figures every run must produce (a missing one means a bench silently did not run); rathole's
/// too when it was built.
fn missing_figures(figures: &Figures, quick: bool, rathole: bool) -> Vec<String> {
    let mut expected = vec![
        "codec.v1_encode.65536".to_owned(),
        "codec.v2_decode.1048576".into(),
        "handshake.raw_rustls".into(),
        "handshake.gateway_admission".into(),
        "latency.added_p99_v2".into(),
        "cpu.v2.per_1000".into(),
        "cpu.relay.per_1000".into(),
        "trust.ca_change_reverify".into(),
        "storm.all_back".into(),
        "storm.admission_rate_peak".into(),
    ];
    for path in ["direct", "relay", "v1", "v2"] {
        expected.push(format!("e2e.1KiB_c64.{path}"));
        expected.push(format!("e2e.64KiB_c64.{path}"));
    }
    for path in ["direct", "relay", "v2"] {
        expected.push(format!("e2e.16MiB_c{}.{path}", if quick { 1 } else { 64 }));
    }
    for path in ["v2_lb1", "v2_lb3"] {
        expected.push(format!("e2e.1KiB_c64.{path}"));
    }
    if !quick {
        expected.push("memory.per_agent.10000".into());
        for replicas in [1, REPLICAS] {
            expected.push(format!("storm.10000.replicas{replicas}.all_back"));
            expected.push(format!("storm.10000.replicas{replicas}.one_back"));
        }
    }
    if rathole {
        expected.push("e2e.1KiB_c64.rathole".into());
        expected.push("e2e.64KiB_c64.rathole".into());
        // Its failure share, which exists whenever it was measured (a p99 among failures is
        // infinite and not a figure).
        expected.push("latency.rathole.failed".into());
    }
    expected.retain(|name| figures.get(name).is_none());
    if replica_storm_agents(figures).is_none() {
        expected.push(format!(
            "storm.AGENTS.replicas{REPLICAS}.all_back beside storm.AGENTS.replicas1.all_back"
        ));
    }
    expected
}

struct Target {
    name: String,
    value: f64,
    target: String,
    verdict: Verdict,
}

/// How a target came out. No target fails the run; `Skipped` is neither met nor missed.
#[derive(Debug, PartialEq)]
enum Verdict {
    Met,
    Missed,
    /// Not measured on this machine, with the reason.
    Skipped(String),
}

impl Verdict {
    /// For the JSON report: `null` when skipped.
    fn met(&self) -> Option<bool> {
        match self {
            Verdict::Met => Some(true),
            Verdict::Missed => Some(false),
            Verdict::Skipped(_) => None,
        }
    }

    fn skipped(&self) -> Option<&str> {
        match self {
            Verdict::Skipped(reason) => Some(reason),
            _ => None,
        }
    }
}

/// The targets; those comparing with rathole are skipped with `rathole_skipped` when it is set.
fn targets(figures: &Figures, quick: bool, rathole_skipped: Option<&str>) -> Vec<Target> {
    let ratio = |a: &str, b: &str| match (figures.get(a), figures.get(b)) {
        (Some(a), Some(b)) if b > 0.0 => a / b,
        _ => f64::NAN,
    };
    let large = if quick { "16MiB_c1" } else { "16MiB_c64" };
    let memory = figures
        .0
        .iter()
        .filter(|(k, _)| k.starts_with("memory.per_agent."))
        .max_by_key(|(k, _)| k.rsplit('.').next().and_then(|n| n.parse::<u64>().ok()))
        .map(|(k, f)| (k.clone(), f.value));
    let (memory_name, memory_value) = memory.unwrap_or(("memory.per_agent".into(), f64::NAN));
    let mut targets = vec![
        (
            "v2 / raw TLS relay, 1 KiB, c64".to_owned(),
            ratio("e2e.1KiB_c64.v2", "e2e.1KiB_c64.relay"),
            ">= 0.7",
            0.7,
            true,
            None,
        ),
        (
            format!("v2 / raw TLS relay, 16 MiB, {}", &large[6..]),
            ratio(&format!("e2e.{large}.v2"), &format!("e2e.{large}.relay")),
            ">= 0.6",
            0.6,
            true,
            None,
        ),
        (
            // By CPU, not by loopback throughput, which the relay bounds (issue #17; the
            // throughput ratio stays in the end-to-end table).
            "v1 / v2, CPU per 64 KiB response".into(),
            ratio("cpu.v1.per_1000", "cpu.v2.per_1000"),
            ">= 3",
            3.0,
            true,
            None,
        ),
        (
            // A run that failed requests does not meet it, however short its p99.
            "added p99 latency at half of peak (ms), no request failed".into(),
            match figures.get("latency.v2.failed") {
                Some(failed) if failed > 0.0 => f64::INFINITY,
                _ => figures.get("latency.added_p99_v2").unwrap_or(f64::NAN),
            },
            "<= 2",
            2.0,
            false,
            None,
        ),
        (
            // The mean from the first admission to the last, not the best second.
            "storm admission rate (mean) / raw handshakes".into(),
            ratio("storm.admission_rate_mean", "handshake.raw_rustls"),
            ">= 0.5",
            0.5,
            true,
            None,
        ),
        (
            format!(
                "gateway KiB per idle agent ({})",
                memory_name.rsplit('.').next().unwrap_or("")
            ),
            memory_value,
            "<= 48",
            48.0,
            false,
            None,
        ),
    ];
    // Gateway replicas (issue #15), against one gateway in the same run. The storm: all three
    // replicas restart on the same two cores as the agents, so holding every replica again is
    // three admissions per agent where one gateway needs one; within 3x means the 409s of a
    // slot reaching a replica it holds cost no more than that. Holding one connection again
    // (every agent reachable) should cost hardly more than one gateway's storm.
    let storm_agents = replica_storm_agents(figures);
    let storm = |figure: &str, replicas: u32| {
        storm_agents.map_or(String::new(), |count| {
            format!("storm.{count}.replicas{replicas}.{figure}")
        })
    };
    let agents = storm_agents.map_or("?".to_owned(), |count| count.to_string());
    targets.push((
        format!("storm, {REPLICAS} replicas: all agents hold all {REPLICAS} / 1 replica all back ({agents} agents)"),
        ratio(&storm("all_back", REPLICAS), &storm("all_back", 1)),
        "<= 3",
        3.0,
        false,
        None,
    ));
    targets.push((
        format!(
            "storm, {REPLICAS} replicas: all agents hold one / 1 replica all back ({agents} agents)"
        ),
        ratio(&storm("one_back", REPLICAS), &storm("all_back", 1)),
        "<= 1.5",
        1.5,
        false,
        None,
    ));
    // 1 KiB through three replicas behind a balancer against one gateway without it: the
    // balancer adds a relay before the gateway and one between gateway and agent.
    targets.push((
        format!("v2, {REPLICAS} replicas behind a balancer / 1 gateway, 1 KiB, c64"),
        ratio(&format!("e2e.1KiB_c64.v2_lb{REPLICAS}"), "e2e.1KiB_c64.v2"),
        ">= 0.8",
        0.8,
        true,
        None,
    ));
    for size in ["1KiB", "64KiB"] {
        targets.push((
            format!("v2 / rathole, {}, c64", size.replace("KiB", " KiB")),
            ratio(
                &format!("e2e.{size}_c64.v2"),
                &format!("e2e.{size}_c64.rathole"),
            ),
            ">= 1",
            1.0,
            true,
            rathole_skipped,
        ));
    }
    targets
        .drain(..)
        .map(|(name, value, target, limit, higher, skipped)| Target {
            verdict: match skipped {
                Some(reason) => Verdict::Skipped(reason.to_owned()),
                None if (higher && value >= limit) || (!higher && value <= limit) => Verdict::Met,
                None => Verdict::Missed,
            },
            name,
            value,
            target: target.into(),
        })
        .collect()
}

/// Figures worse than the baseline's by more than `threshold` percent.
fn compare_baseline(baseline: &Value, figures: &Figures, threshold: f64) -> Vec<String> {
    let mut regressions = Vec::new();
    let Some(old) = baseline["figures"].as_object() else {
        return vec!["the baseline has no figures".into()];
    };
    for (name, figure) in &figures.0 {
        let Some(before) = old.get(name).and_then(|f| f["value"].as_f64()) else {
            continue;
        };
        if before == 0.0 {
            continue;
        }
        let change = (figure.value - before) / before.abs() * 100.0;
        let worse = match figure.better {
            Better::Higher => -change,
            Better::Lower => change,
        };
        // Sub-millisecond latencies and tiny memory deltas are noise-dominated: compare those
        // only when the absolute change is material too.
        let material = match figure.unit {
            "ms" => (figure.value - before).abs() > 0.5,
            "KiB" => (figure.value - before).abs() > 4.0,
            "%" => (figure.value - before).abs() > 1.0,
            _ => true,
        };
        if worse > threshold && material {
            regressions.push(format!(
                "{name}: {before:.3} -> {:.3} {} ({worse:+.1}% worse)",
                figure.value, figure.unit
            ));
        }
    }
    regressions
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map(|kib| format!("{:.1} GiB", kib as f64 / 1024.0 / 1024.0))
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let rustc = command_output("rustc", &["--version"]).unwrap_or_default();
    json!({"cpu": model, "cpus": cpus, "memory": memory, "kernel": kernel, "rustc": rustc})
}

fn fmt(value: Option<f64>) -> String {
    match value {
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) if v >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
        None => "–".into(),
    }
}

fn markdown(report: &Value, figures: &Figures, targets: &[Target], notes: Option<&str>) -> String {
    use std::fmt::Write as _;
    let mut md = String::new();
    let m = &report["machine"];
    let quick = report["quick"].as_bool().unwrap_or(false);
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Generated by `cargo xtask bench{}` on {}.",
        if quick { " --quick" } else { "" },
        report["date"].as_str().unwrap_or("")
    );
    let _ = writeln!(
        md,
        "Machine: {} × {} (/proc/cpuinfo), {} RAM, Linux {}, {}.",
        m["cpus"],
        m["cpu"].as_str().unwrap_or(""),
        m["memory"].as_str().unwrap_or(""),
        m["kernel"].as_str().unwrap_or(""),
        m["rustc"].as_str().unwrap_or("")
    );
    let _ = writeln!(
        md,
        "Everything runs on this one machine over 127.0.0.1: load generator, gateway, agents and backend share its cores, so ratios measured in the same run matter more than absolute figures.\n"
    );
    if quick {
        let _ = writeln!(
            md,
            "**Quick (CI smoke) run: dev profile, short samples; the figures are not representative.**\n"
        );
    }
    let _ = writeln!(md, "## Targets\n");
    let _ = writeln!(md, "| target | measured | goal | |");
    let _ = writeln!(md, "|---|---|---|---|");
    for t in targets {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            t.name,
            fmt(t.value.is_finite().then_some(t.value)),
            t.target,
            match &t.verdict {
                Verdict::Met => "met".to_owned(),
                Verdict::Missed => "**not met**".to_owned(),
                Verdict::Skipped(reason) => format!("skipped: {reason}"),
            }
        );
    }
    let _ = writeln!(md, "\n## End to end (MiB/s of response bodies)\n");
    let _ = writeln!(
        md,
        "Client → gateway internal API (mTLS, HTTP/1.1) → tunnel (WebSocket over TLS) → agent → backend (HTTP/1.1), against the same client straight to the backend and a raw TLS byte relay with the same hops (client → relay → TLS → relay → backend). One iteration is one round of `c` concurrent requests.\n"
    );
    let rathole = &report["peers"]["rathole"];
    match rathole["skipped"].as_str() {
        Some(reason) => {
            let _ = writeln!(
                md,
                "rathole {}: skipped: {reason}.\n",
                rathole["version"].as_str().unwrap_or("")
            );
        }
        None => {
            let _ = writeln!(
                md,
                "rathole {} (a reverse tunnel a user could pick instead; crates.io, its own release profile) with its TLS transport: client → rathole server (plain TCP, as rathole serves its callers) → one TLS data channel per caller connection, dialed by the rathole client → rathole client → backend. Its TLS is {}; ours is rustls with ring. Server and client run as two processes; the other paths run in the bench's process.\n",
                rathole["version"].as_str().unwrap_or(""),
                rathole["tls"].as_str().unwrap_or("")
            );
        }
    }
    let _ = writeln!(
        md,
        "| body, concurrency | direct | raw relay | v1 | v2 | rathole | v2/relay | v2/v1 | v2/rathole |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
    for case in [
        "1KiB_c1",
        "1KiB_c64",
        "1KiB_c256",
        "64KiB_c1",
        "64KiB_c64",
        "64KiB_c256",
        "16MiB_c1",
        "16MiB_c64",
    ] {
        let get = |p: &str| figures.get(&format!("e2e.{case}.{p}"));
        if get("v2").is_none() {
            continue;
        }
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            case.replace('_', ", "),
            fmt(get("direct")),
            fmt(get("relay")),
            if case.starts_with("16MiB") {
                "n/a¹".into()
            } else {
                fmt(get("v1"))
            },
            fmt(get("v2")),
            fmt(get("rathole")),
            fmt(ratio(get("v2"), get("relay"))),
            fmt(ratio(get("v2"), get("v1"))),
            fmt(ratio(get("v2"), get("rathole"))),
        );
    }
    let _ = writeln!(
        md,
        "\n¹ v1 carries a body base64-encoded in one JSON text message; 16 MiB becomes about 21 MiB, over the 16 MiB message limit. 16 MiB at c256 is not run (4 GiB per round).\n"
    );
    let _ = writeln!(md, "## Latency at half of peak load (1 KiB)\n");
    let _ = writeln!(
        md,
        "Peak over v2 at c64: {} req/s; open-loop load at half of it, latency from each request's scheduled start. Interleaved: 3 rounds (2 with `--quick`), each measuring every path for 5 s (0.5 s) in an order rotated by one per round, a path's windows pooled; one window of direct before them thrown away (a process's first open loop runs cold). `null` is direct once more, as a path of its own: what it adds over direct is this run's resolution.\n",
        fmt(figures.get("latency.peak_rps_v2"))
    );
    let _ = writeln!(md, "| path | p50 ms | p99 ms | failed % |");
    let _ = writeln!(md, "|---|---|---|---|");
    for path in ["direct", "relay", "v1", "v2", "rathole", "null"] {
        if figures.get(&format!("latency.{path}.p99")).is_none() && path == "rathole" {
            continue;
        }
        let _ = writeln!(
            md,
            "| {path} | {} | {} | {} |",
            fmt(figures.get(&format!("latency.{path}.p50"))),
            fmt(figures.get(&format!("latency.{path}.p99"))),
            fmt(figures.get(&format!("latency.{path}.failed")))
        );
    }
    let _ = writeln!(
        md,
        "\nA path that cannot sustain the rate sheds load (the agent answers 503 past its queue of 4 × its concurrency limit); failed requests are counted, not timed."
    );
    let _ = writeln!(
        md,
        "\nAdded p99 (v2 − direct): {} ms; raw relay − direct: {} ms; rathole − direct: {} ms; the null (direct − direct): {} ms.\n",
        fmt(figures.get("latency.added_p99_v2")),
        fmt(figures.get("latency.added_p99_relay")),
        fmt(figures.get("latency.added_p99_rathole")),
        fmt(figures.get("latency.added_p99_null"))
    );
    let _ = writeln!(md, "## CPU per 1,000 proxied 64 KiB responses\n");
    let _ = writeln!(
        md,
        "User + system time of the `cluster-gateway` process and of the `cluster-agent swarm` process (one agent per protocol) from `/proc/PID/stat`, 8 requests at once for a ConfigMap of about 64 KiB from kube-sim. The floor: the same GETs through the raw TLS relay over the same hops, one `buildplane-bench relay-hop` process per hop (the caller's mTLS in, mutual TLS between the hops, TLS to the API server; nothing parsed). No tunnel over these hops costs less, so v1 / relay is the most v1 / v2 can be.\n"
    );
    let _ = writeln!(
        md,
        "| v1 (s) | v2 (s) | raw relay (s) | v1 / v2 | v2 / relay | v1 / relay |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    let (cpu_v1, cpu_v2, cpu_relay) = (
        figures.get("cpu.v1.per_1000"),
        figures.get("cpu.v2.per_1000"),
        figures.get("cpu.relay.per_1000"),
    );
    let over = |a: Option<f64>, b: Option<f64>| fmt(a.zip(b).map(|(a, b)| a / b));
    let _ = writeln!(
        md,
        "| {} | {} | {} | {} | {} | {} |\n",
        fmt(cpu_v1),
        fmt(cpu_v2),
        fmt(cpu_relay),
        over(cpu_v1, cpu_v2),
        over(cpu_v2, cpu_relay),
        over(cpu_v1, cpu_relay),
    );
    let _ = writeln!(md, "## Handshakes\n");
    let _ = writeln!(
        md,
        "Full mTLS handshakes (ECDSA P-256, TLS 1.3, no resumption, ring), 32 in flight, client and server on the same machine.\n"
    );
    let _ = writeln!(md, "| | per second |");
    let _ = writeln!(md, "|---|---|");
    let _ = writeln!(
        md,
        "| raw rustls (same server config) | {} |",
        fmt(figures.get("handshake.raw_rustls"))
    );
    let _ = writeln!(
        md,
        "| gateway admission (TLS + upgrade + admit + register) | {} |",
        fmt(figures.get("handshake.gateway_admission"))
    );
    let storm_fleet = if report["raw"]["fleet_10k"].is_object() {
        &report["raw"]["fleet_10k"]
    } else {
        &report["raw"]["fleet"]
    };
    let storm = &storm_fleet["storm"];
    let _ = writeln!(md, "\n## Restart storm\n");
    let _ = writeln!(
        md,
        "{} agents in {} `cluster-agent swarm` processes (backoff base {}, cap {}, full jitter); the gateway process is killed (SIGKILL) and started again on the same ports. Times from the kill.\n",
        storm["count"],
        storm_fleet["processes"],
        storm["backoff_base"].as_str().unwrap_or(""),
        storm["backoff_cap"].as_str().unwrap_or("")
    );
    let _ = writeln!(md, "| figure | value |");
    let _ = writeln!(md, "|---|---|");
    for (label, name, unit) in [
        ("gateway serving again", "storm.gateway_restart", "s"),
        ("all agents back", "storm.all_back", "s"),
        (
            "admission rate, peak 1 s window",
            "storm.admission_rate_peak",
            "/s",
        ),
        (
            "admission rate, mean first → last",
            "storm.admission_rate_mean",
            "/s",
        ),
        ("reconnect delay p50", "storm.reconnect_p50", "s"),
        ("reconnect delay p90", "storm.reconnect_p90", "s"),
        ("reconnect delay p99", "storm.reconnect_p99", "s"),
    ] {
        let _ = writeln!(md, "| {label} | {} {unit} |", fmt(figures.get(name)));
    }
    replicas_markdown(&mut md, report, figures);
    let _ = writeln!(md, "\n## Idle memory\n");
    let _ = writeln!(
        md,
        "Gateway VmRSS with every agent connected and idle, minus VmRSS with every BuildPlane loaded and no connection, per agent.\n"
    );
    let _ = writeln!(
        md,
        "| agents | KiB per agent | KiB per BuildPlane (reflector) |"
    );
    let _ = writeln!(md, "|---|---|---|");
    for (name, _) in figures
        .0
        .iter()
        .filter(|(k, _)| k.starts_with("memory.per_agent."))
    {
        let count = name.rsplit('.').next().unwrap_or("");
        let _ = writeln!(
            md,
            "| {count} | {} | {} |",
            fmt(figures.get(name)),
            fmt(figures.get(&format!("memory.per_cr.{count}")))
        );
    }
    let _ = writeln!(md, "\n## Trust changes with the fleet connected\n");
    let _ = writeln!(
        md,
        "One BuildPlane's clientCA changed: {} s until its connection was re-verified (the gateway coalesces changes for 50 ms). 20 changes of a Secret no BuildPlane reads: {} connections re-verified, {} s of gateway CPU.",
        fmt(figures.get("trust.ca_change_reverify")),
        fmt(figures.get("trust.reverified_after_unrelated_secrets")),
        fmt(figures.get("trust.cpu_unrelated_secrets"))
    );
    let _ = writeln!(md, "\n## Codec (one response message)\n");
    let _ = writeln!(
        md,
        "v1: `HTTPTunnelResponse` JSON with a base64 body; v2: `ResponseHead`, one `Data`, `End` (a fresh buffer per frame). MiB/s of body (0 B: messages/s).\n"
    );
    let _ = writeln!(
        md,
        "| body | v1 encode | v1 decode | v2 encode | v2 decode |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|");
    for (label, size) in [
        ("0 B", "0"),
        ("1 KiB", "1024"),
        ("64 KiB", "65536"),
        ("1 MiB", "1048576"),
    ] {
        let get = |f: &str| {
            if size == "0" {
                figures.get(&format!("codec.{f}.{size}.per_msg"))
            } else {
                figures.get(&format!("codec.{f}.{size}"))
            }
        };
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {} | {} |",
            fmt(get("v1_encode")),
            fmt(get("v1_decode")),
            fmt(get("v2_encode")),
            fmt(get("v2_decode"))
        );
    }
    let _ = writeln!(md, "\n## Running\n");
    let _ = writeln!(
        md,
        "`cargo xtask bench` (about 9 minutes on 2 cores once the release build is done, of which the three-replica fleets take 4) writes this file and `target/bench/bench.json`; `--save-baseline NAME` stores the run, `--baseline NAME` fails if a figure is more than 20% (`--threshold`) worse. `--quick` is the CI smoke (dev profile, report in `target/bench/`, never fails on timings). `--compare REV` builds REV and the working tree and runs them interleaved (report in `target/bench/compare.md`; see \"Comparing two revisions\" in the notes). rathole is built once into `target/peers/` with its own release profile, in `--quick` too (about 5 minutes on 2 cores the first time).\n"
    );
    match notes {
        Some(notes) => md.push_str(notes),
        None => {
            let _ = writeln!(md, "{NOTES_MARKER}\n## Notes\n");
        }
    }
    md
}

/// The section of the gateway replicas' figures (issue #15): each restart storm with one
/// gateway and with [`REPLICAS`] replicas, and 1 KiB through replicas behind a balancer.
fn replicas_markdown(md: &mut String, report: &Value, figures: &Figures) {
    use std::fmt::Write as _;
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let _ = writeln!(md, "\n## Gateway replicas\n");
    let _ = writeln!(
        md,
        "{REPLICAS} `cluster-gateway` processes (`--replicas {REPLICAS}`) behind a TCP round-robin balancer (a user-space relay that skips a replica refusing connections; one balancer process beside each swarm process), every agent holding one connection to each replica, against one gateway without a balancer, measured in the same run. Everything shares the same cores, so {REPLICAS} replicas do {REPLICAS} times the admissions of one on the same CPU.\n"
    );
    let fleets = report["raw"]["fleet_replicas"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut counts: Vec<u64> = fleets
        .iter()
        .filter_map(|f| f["storm"]["count"].as_u64())
        .collect();
    counts.sort_unstable();
    counts.dedup();
    for count in counts {
        let get = |replicas: u32, figure: &str| {
            figures.get(&format!("storm.{count}.replicas{replicas}.{figure}"))
        };
        let processes = fleets
            .iter()
            .find(|f| f["storm"]["count"].as_u64() == Some(count))
            .map_or(Value::Null, |f| f["processes"].clone());
        let _ = writeln!(
            md,
            "### Restart storm, {count} agents\n\n{count} agents in {processes} swarm processes; every gateway process killed (SIGKILL) and started again on the same ports. Times from the kill; the admission rate counts every connection admitted (one per agent with one gateway, {REPLICAS} with {REPLICAS} replicas), mean from the first to the last. Handshakes per agent are those the gateways finished after the restart: admissions, 409s (the balancer gave a slot a replica the agent held already) and other refusals.\n"
        );
        let _ = writeln!(
            md,
            "| figure | 1 gateway | {REPLICAS} replicas | {REPLICAS} / 1 |"
        );
        let _ = writeln!(md, "|---|---|---|---|");
        for (label, one, many, unit) in [
            (
                "gateway serving again (the last replica)",
                "serving",
                "serving",
                " s",
            ),
            (
                "every agent holds a connection",
                "one_back",
                "one_back",
                " s",
            ),
            (
                "every agent holds a connection to every replica",
                "all_back",
                "all_back",
                " s",
            ),
            (
                "admission rate, mean first → last",
                "admission_rate_mean",
                "admission_rate_mean",
                " /s",
            ),
            (
                "admission rate, peak 1 s window",
                "admission_rate_peak",
                "admission_rate_peak",
                " /s",
            ),
            (
                "agent back (all its connections), p50",
                "reconnect_p50",
                "reconnect_p50",
                " s",
            ),
            (
                "agent back (all its connections), p99",
                "reconnect_p99",
                "reconnect_p99",
                " s",
            ),
            (
                "handshakes per agent",
                "handshakes_per_agent",
                "handshakes_per_agent",
                "",
            ),
            (
                "of which refused with 409 (replica held)",
                "held_refusals_per_agent",
                "held_refusals_per_agent",
                "",
            ),
            (
                "connections closed before their ClientHello, per agent",
                "silent_refusals_per_agent",
                "silent_refusals_per_agent",
                "",
            ),
            (
                "CPU of the gateways until all back",
                "gateway_cpu",
                "gateway_cpu",
                " s",
            ),
            ("CPU of the swarms", "swarm_cpu", "swarm_cpu", " s"),
            ("CPU of the balancers", "balancer_cpu", "balancer_cpu", " s"),
        ] {
            let (a, b) = (get(1, one), get(REPLICAS, many));
            let with_unit = |v: Option<f64>| match v {
                Some(_) => format!("{}{unit}", fmt(v)),
                None => fmt(v),
            };
            let _ = writeln!(
                md,
                "| {label} | {} | {} | {} |",
                with_unit(a),
                with_unit(b),
                fmt(ratio(b, a))
            );
        }
        let _ = writeln!(md);
    }
    let e2e = |path: &str| figures.get(&format!("e2e.1KiB_c64.{path}"));
    let lb = format!("v2_lb{REPLICAS}");
    let _ = writeln!(md, "### 1 KiB at c64 through replicas (MiB/s)\n");
    let _ = writeln!(
        md,
        "The end-to-end bench's v2 path with the gateways behind balancers: callers reach the internal API of a replica through one, the agent reaches every replica through another, so a request crosses two more relays than through one gateway, whatever the number of replicas. All in the bench's process, as the other paths.\n"
    );
    let _ = writeln!(
        md,
        "| 1 gateway | 1 replica behind the balancer | {REPLICAS} replicas behind the balancer | {REPLICAS} replicas / 1 gateway | 1 behind the balancer / 1 gateway |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|");
    let _ = writeln!(
        md,
        "| {} | {} | {} | {} | {} |\n",
        fmt(e2e("v2")),
        fmt(e2e("v2_lb1")),
        fmt(e2e(&lb)),
        fmt(ratio(e2e(&lb), e2e("v2"))),
        fmt(ratio(e2e("v2_lb1"), e2e("v2"))),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Figures of the end-to-end bench at c64 for 1 KiB and 64 KiB: v2 and, when given, rathole.
    fn e2e_figures(v2: f64, rathole: Option<f64>) -> Figures {
        let mut figures = Figures::default();
        for size in ["1KiB", "64KiB"] {
            figures.put(format!("e2e.{size}_c64.v2"), v2, "MiB/s", Better::Higher);
            if let Some(rathole) = rathole {
                figures.put(
                    format!("e2e.{size}_c64.rathole"),
                    rathole,
                    "MiB/s",
                    Better::Higher,
                );
            }
        }
        figures
    }

    fn rathole_verdicts(targets: &[Target]) -> Vec<&Verdict> {
        targets
            .iter()
            .filter(|t| t.name.contains("rathole"))
            .map(|t| &t.verdict)
            .collect()
    }

    /// The storm of 1 gateway and of 3 replicas, as `buildplane-bench fleet` reports them.
    fn storm_fleet(count: u64, replicas: u64, one_back: f64, all_back: f64) -> Value {
        json!({"storm": {
            "count": count,
            "replicas": replicas,
            "one_back_secs": one_back,
            "all_back_secs": all_back,
            "admission_rate_mean": count as f64 * replicas as f64 / all_back,
            "handshakes_per_agent": replicas as f64 + 1.0,
        }})
    }

    fn verdict_of<'a>(targets: &'a [Target], contains: &str) -> (&'a Verdict, &'a str) {
        let target = targets
            .iter()
            .find(|t| t.name.contains(contains))
            .unwrap_or_else(|| panic!("no target {contains}"));
        (&target.verdict, &target.name)
    }

    /// The replica targets compare the largest fleet measured both ways; without the pair the
    /// storm figures are missing and the targets missed, never met.
    #[test]
    fn replica_storm_targets_use_the_largest_pair_of_the_run() {
        let mut figures = Figures::default();
        for fleet in [
            storm_fleet(1000, 1, 1.0, 1.0),
            storm_fleet(1000, 3, 5.0, 9.0),
            storm_fleet(10_000, 1, 4.0, 4.0),
            storm_fleet(10_000, 3, 7.0, 11.0),
        ] {
            collect_replica_storm(&fleet, &mut figures);
        }
        assert_eq!(replica_storm_agents(&figures), Some(10_000));
        let targets = targets(&figures, false, None);
        let (verdict, name) = verdict_of(&targets, "hold all 3");
        assert_eq!(verdict, &Verdict::Met, "11 / 4 <= 3: {name}");
        assert!(name.contains("10000 agents"), "{name}");
        let (verdict, _) = verdict_of(&targets, "hold one");
        assert_eq!(verdict, &Verdict::Missed, "7 / 4 > 1.5");
    }

    #[test]
    fn replica_storm_targets_are_missed_without_a_pair() {
        let mut figures = Figures::default();
        collect_replica_storm(&storm_fleet(1000, 3, 1.0, 2.0), &mut figures);
        assert_eq!(replica_storm_agents(&figures), None);
        let targets = targets(&figures, true, None);
        assert_eq!(verdict_of(&targets, "hold all 3").0, &Verdict::Missed);
        assert_eq!(
            verdict_of(&targets, "behind a balancer").0,
            &Verdict::Missed
        );
        let missing = missing_figures(&figures, true, false);
        assert!(
            missing.iter().any(|m| m.contains("replicas3.all_back")),
            "{missing:?}"
        );
    }

    /// The version xtask names is the one the peer crate pins and its lock file resolves.
    #[test]
    fn rathole_version_is_the_one_the_peer_crate_pins() {
        let dir = project_root().join("benches/peers/rathole");
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        assert!(
            manifest.contains(&format!("rathole = \"={RATHOLE_VERSION}\"")),
            "benches/peers/rathole/Cargo.toml does not pin rathole {RATHOLE_VERSION}"
        );
        let lock = std::fs::read_to_string(dir.join("Cargo.lock")).unwrap();
        assert!(
            lock.contains(&format!(
                "name = \"rathole\"\nversion = \"{RATHOLE_VERSION}\""
            )),
            "benches/peers/rathole/Cargo.lock does not resolve rathole {RATHOLE_VERSION}"
        );
    }

    /// Without rathole its targets are skipped with the reason (neither met nor missed) and its
    /// figures are not demanded; with it they are.
    #[test]
    fn rathole_targets_are_skipped_with_the_reason_when_it_was_not_built() {
        let figures = e2e_figures(100.0, None);
        let targets = targets(&figures, false, Some("no openssl"));
        assert_eq!(
            rathole_verdicts(&targets),
            [&Verdict::Skipped("no openssl".into()); 2]
        );
        let missing = missing_figures(&figures, false, false);
        assert!(
            !missing.iter().any(|m| m.contains("rathole")),
            "{missing:?}"
        );
        let missing = missing_figures(&figures, false, true);
        assert!(
            missing.contains(&"e2e.1KiB_c64.rathole".to_owned())
                && missing.contains(&"e2e.64KiB_c64.rathole".to_owned())
                && missing.contains(&"latency.rathole.failed".to_owned()),
            "{missing:?}"
        );
    }

    /// v2 must be at or above rathole at 1 KiB and at 64 KiB; a missing rathole figure (built
    /// but not measured) is missed, never met.
    #[test]
    fn v2_meets_the_rathole_target_only_at_or_above_it() {
        let check = |v2: f64, rathole: Option<f64>, expect: Verdict| {
            let targets = targets(&e2e_figures(v2, rathole), false, None);
            assert_eq!(
                rathole_verdicts(&targets),
                [&expect, &expect],
                "v2 {v2}, rathole {rathole:?}"
            );
        };
        check(20.0, Some(10.0), Verdict::Met);
        check(10.0, Some(10.0), Verdict::Met);
        check(10.0, Some(20.0), Verdict::Missed);
        check(10.0, None, Verdict::Missed);
    }
}
