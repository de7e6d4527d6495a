//! What `--compare` runs: the benches of each round, interleaved bench by bench between A and B,
//! and the figures read from their output.

use std::{
    fmt,
    path::{Path, PathBuf},
    process::Command,
    time::SystemTime,
};

use serde_json::Value;

use super::{Problems, Side};
use crate::bench::{
    BenchFlags, Figures, REPLICAS, collect_cpu, collect_criterion, collect_fleet, collect_latency,
    collect_replica_storm, read_criterion, run_json,
};

/// What each side runs in a round.
pub(super) struct Plan {
    /// "pull-request" or "full".
    pub(super) name: &'static str,
    steps: Vec<Step>,
    /// Run the criterion benches with their quick sizes (`BUILDPLANE_BENCH_QUICK=1`).
    quick: bool,
}

/// One bench run, made on both sides, one right after the other, before the next.
enum Step {
    /// A criterion bench target, with a regular expression of benchmark ids (all if none).
    Criterion(&'static str, Option<&'static str>),
    /// `buildplane-bench` with these arguments, whose latency figures are read.
    Latency(Vec<String>),
    /// `buildplane-bench` with these arguments and `--bin-dir`, whose CPU figures are read.
    Cpu(Vec<String>),
    /// `buildplane-bench` with these arguments and `--bin-dir`, whose fleet figures are read;
    /// the smallest fleet comes first.
    Fleet(Vec<String>),
}

impl Plan {
    pub(super) fn of(flags: &BenchFlags) -> Plan {
        if flags.full {
            Plan::full(flags.storm_agents.unwrap_or(1000))
        } else {
            Plan::pull_request()
        }
    }

    /// The subset for a pull-request runner, about 30 s per side and round on 2 cores, of
    /// figures this repository's code decides: codec at 1 KiB and 64 KiB, end to end at c64
    /// over v1 and v2, gateway admission, latency at half of peak over v2, CPU per 1,000
    /// proxied 64 KiB responses over v1 and v2, and gateway memory per idle agent (100 agents). The baselines (direct, raw relay, raw rustls) are left out:
    /// the paired interval already measures the machine's noise, and each figure more widens
    /// every interval (`report::rows`).
    fn pull_request() -> Plan {
        Plan {
            name: "pull-request",
            steps: vec![
                Step::Criterion("codec", Some("^codec/v[12]_(en|de)code/(1024|65536)$")),
                Step::Criterion("e2e", Some("^e2e_(1KiB|64KiB)_c64/(v1|v2)$")),
                Step::Criterion("handshake", Some("^handshake/gateway_admission$")),
                Step::Latency(strings(&["latency", "--quick", "--only", "v2"])),
                Step::Cpu(strings(&["cpu", "--requests", "500"])),
                Step::Fleet(strings(&["fleet", "--count", "100", "--processes", "2"])),
            ],
            quick: true,
        }
    }

    /// What `cargo xtask bench` runs, at its full sizes.
    fn full(storm_agents: usize) -> Plan {
        let storm_agents = storm_agents.to_string();
        let replicas = REPLICAS.to_string();
        Plan {
            name: "full",
            steps: vec![
                Step::Criterion("codec", None),
                Step::Criterion("e2e", None),
                Step::Criterion("handshake", None),
                Step::Latency(strings(&["latency"])),
                Step::Cpu(strings(&["cpu", "--requests", "5000"])),
                Step::Fleet(strings(&[
                    "fleet",
                    "--count",
                    &storm_agents,
                    "--processes",
                    "2",
                    "--storm",
                ])),
                Step::Fleet(strings(&[
                    "fleet",
                    "--count",
                    "10000",
                    "--processes",
                    "4",
                    "--storm",
                ])),
                Step::Fleet(strings(&[
                    "fleet",
                    "--count",
                    &storm_agents,
                    "--processes",
                    "2",
                    "--replicas",
                    &replicas,
                    "--storm",
                ])),
                Step::Fleet(strings(&[
                    "fleet",
                    "--count",
                    "10000",
                    "--processes",
                    "4",
                    "--replicas",
                    &replicas,
                    "--storm",
                ])),
            ],
            quick: false,
        }
    }

    /// Runs `rounds` rounds and returns each side's figures, one entry per round. Each step
    /// runs on both sides before the next step, so the two runs of a figure are seconds apart;
    /// odd rounds run A first and even rounds B first, so that going second is no advantage.
    pub(super) fn measure(
        &self,
        sides: &[Side; 2],
        rounds: u32,
        dir: &Path,
        problems: &mut Problems,
    ) -> anyhow::Result<[Vec<Figures>; 2]> {
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        let mut runs: [Vec<Figures>; 2] = Default::default();
        for round in 1..=rounds {
            let order = if round % 2 == 1 { [0, 1] } else { [1, 0] };
            let mut outputs = sides
                .each_ref()
                .map(|side| Output::new(&dir.join(format!("{}-{round}", side.name))));
            for step in &self.steps {
                for i in order {
                    eprintln!("== round {round}/{rounds}, {step}: {}", sides[i].name);
                    step.run(&sides[i], self.quick, &mut outputs[i], problems);
                }
            }
            for (run, output) in runs.iter_mut().zip(&outputs) {
                run.push(output.figures()?);
            }
        }
        Ok(runs)
    }
}

impl Step {
    fn run(&self, side: &Side, quick: bool, output: &mut Output, problems: &mut Problems) {
        let bench = side.bin_dir.join("buildplane-bench");
        let bin_dir = strings(&["--bin-dir", &side.bin_dir.display().to_string()]);
        let mut json = |args: &[String]| {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_json(&bench, &args, &[])
                .map_err(|err| problems.report(side, format!("{err:#}")))
                .unwrap_or(Value::Null)
        };
        match self {
            Step::Criterion(name, filter) => {
                let mut command = Command::new(side.bin_dir.join(name));
                command
                    .args(["--bench", "--noplot"])
                    .args(filter)
                    .env("CRITERION_HOME", &output.criterion_home)
                    .stdout(std::io::stderr());
                if quick {
                    command.env("BUILDPLANE_BENCH_QUICK", "1");
                }
                match command.status() {
                    Ok(status) if status.success() => {}
                    Ok(status) => problems.report(side, format!("bench {name} failed: {status}")),
                    Err(err) => problems.report(side, format!("bench {name} did not run: {err}")),
                }
            }
            Step::Latency(args) => output.latency = json(args),
            Step::Cpu(args) => output.cpu = json(&[&args[..], &bin_dir].concat()),
            Step::Fleet(args) => output.fleets.push(json(&[&args[..], &bin_dir].concat())),
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Criterion(name, _) => f.write_str(name),
            Step::Latency(_) => f.write_str("latency"),
            Step::Cpu(_) => f.write_str("cpu"),
            Step::Fleet(args) => write!(f, "fleet {}", args.get(2).map_or("", String::as_str)),
        }
    }
}

/// What one side's steps of one round left behind.
struct Output {
    criterion_home: PathBuf,
    latency: Value,
    cpu: Value,
    /// One per fleet step, `Null` where it failed.
    fleets: Vec<Value>,
}

impl Output {
    fn new(dir: &Path) -> Output {
        Output {
            criterion_home: dir.join("criterion"),
            latency: Value::Null,
            cpu: Value::Null,
            fleets: Vec::new(),
        }
    }

    /// Read by `bench.rs`'s collectors, keeping the figures whose ratio means something.
    fn figures(&self) -> anyhow::Result<Figures> {
        let mut figures = Figures::default();
        let estimates = read_criterion(&self.criterion_home, SystemTime::UNIX_EPOCH)?;
        collect_criterion(&estimates, &mut figures);
        collect_latency(&self.latency, &mut figures);
        collect_cpu(&self.cpu, &mut figures);
        collect_fleet(
            self.fleets.first().unwrap_or(&Value::Null),
            self.fleets.get(1),
            &mut figures,
        );
        for fleet in &self.fleets {
            collect_replica_storm(fleet, &mut figures);
        }
        figures.0.retain(|name, figure| is_ratio(name, figure.unit));
        Ok(figures)
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|&arg| arg.to_owned()).collect()
}

/// Whether B/A of the figure means something. It does not for a difference (`added_p99`, which
/// may be negative), a share of failed requests (mostly 0), or the second view of one codec
/// measurement (per message besides MiB/s; only the empty body is counted per message).
fn is_ratio(name: &str, unit: &str) -> bool {
    if name.contains("added_p99") || unit == "%" {
        return false;
    }
    match name.strip_suffix(".per_msg") {
        Some(measurement) => measurement.ends_with(".0"),
        None => !(name.starts_with("codec.") && name.ends_with(".0")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Differences, failure shares and duplicate codec views are not compared as ratios.
    #[test]
    fn only_ratio_figures_are_compared() {
        let cases = [
            ("e2e.1KiB_c64.v2", "MiB/s", true),
            ("latency.v2.p99", "ms", true),
            ("latency.added_p99_v2", "ms", false),
            ("latency.v2.failed", "%", false),
            ("codec.v2_encode.1024", "MiB/s", true),
            ("codec.v2_encode.1024.per_msg", "msg/s", false),
            ("codec.v2_encode.0", "MiB/s", false),
            ("codec.v2_encode.0.per_msg", "msg/s", true),
        ];
        for (name, unit, expected) in cases {
            assert_eq!(is_ratio(name, unit), expected, "{name}");
        }
    }
}
