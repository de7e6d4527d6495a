//! `cargo xtask bench --compare REV`: builds revision REV (A) and the working tree (B), runs
//! their benchmarks interleaved (A, B, B, A, A, B, …) and reports each figure's ratio B/A with a
//! confidence interval, as a Markdown table (stdout and `target/bench/compare.md`) and as JSON
//! (`target/bench/compare.json`); it fails only on a significant regression beyond the threshold.
//!
//! - Builds. A is checked out as a detached git worktree in `target/compare/<sha>/`, kept for
//!   the next comparison with the same revision; B is the working tree as it is, uncommitted
//!   changes included. Both build with the cargo that runs xtask, B into the working tree's
//!   target directory and A into its own, `target/compare/target/`, which stays for the next
//!   comparison whatever its revision. One shared directory would save A a build of the
//!   dependencies once, but cargo names a workspace crate's artifacts by its path relative to
//!   the workspace root, so the two sides' crates would share names and overwrite each other,
//!   and B's binaries would then be as good as cargo's freshness checks. Each side's executables
//!   are copied to `target/compare/{A,B}/`.
//! - Figures (`plan.rs`). By default a pull-request subset: release executables, the benches'
//!   quick sizes, and the figures this repository's code decides. `--full` runs what
//!   `cargo xtask bench` runs. Both sides' output is read by `bench.rs`'s collectors. A round
//!   runs each bench on both sides before the next bench, so the two runs of a figure are
//!   seconds apart, and every other round starts with B, so going second is no advantage.
//! - Statistics (`stats.rs`). Each round gives one pair of values per figure.
//!   B/A is the geometric mean of the per-round ratios, with Student's t interval on their
//!   logarithms (n − 1 degrees of freedom). Pairing by round cancels the machine's drift between
//!   rounds. With 2 to 20 rounds a bootstrap has too few distinct resamples to be trusted, while
//!   t is exact for normal log ratios and honestly wide when n is small. The intervals hold
//!   together (Bonferroni: each at 1 − 5 % / m for m figures): 20 intervals at 95 % each would
//!   let an unchanged build fail in up to 40 % of runs (1 − 0.975²⁰) on a noisy machine.
//! - Verdict. Regressed when the whole interval is worse than the threshold (criterion decides
//!   its own "regressed" the same way), improved when it is wholly better, unchanged when it
//!   lies within ± the threshold, inconclusive otherwise. A figure only one side produced is
//!   "missing in A" or "missing in B" and never fails the run; a bench of B that fails to build
//!   or run does.

mod plan;
mod report;
mod stats;

use std::{
    fmt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use buildplane_harness::build::cargo_command;

use super::{BenchFlags, target_dir};
use crate::project_root;
use plan::Plan;
use report::{Comparison, rows};

pub(super) fn run(rev: &str, flags: &BenchFlags) -> anyhow::Result<()> {
    let started = SystemTime::now();
    let root = project_root();
    let target = target_dir(&root)?;
    let out_dir = target.join("bench");
    for stale in ["compare.md", "compare.json"] {
        // A report left by an earlier run must not pass for this one's.
        let _ = std::fs::remove_file(out_dir.join(stale));
    }
    let dir = target.join("compare");
    let base = Revision::resolve(&root, rev)?;
    let worktree = worktree(&root, &base, &dir)?;
    let sides = [
        Side::new("A", base, &worktree, &dir.join("target"), &dir),
        Side::new("B", Revision::working_tree(&root)?, &root, &target, &dir),
    ];
    let profile = if flags.quick {
        Profile::Dev
    } else {
        Profile::Release
    };
    let mut problems = build(&sides, profile)?;
    let built = elapsed(started);
    let plan = Plan::of(flags);
    let runs = plan.measure(&sides, flags.rounds, &dir.join("runs"), &mut problems)?;

    let threshold = flags.threshold.unwrap_or(10.0);
    let (rows, confidence) = rows(&runs[0], &runs[1], threshold);
    let [a, b] = sides;
    let comparison = Comparison {
        rows,
        confidence,
        a: a.revision,
        b: b.revision,
        rounds: flags.rounds,
        threshold,
        subset: plan.name,
        profile,
        problems,
        built,
        measured: elapsed(started).saturating_sub(built),
    };
    comparison.write(&out_dir)?;
    comparison.exit(flags.quick)
}

/// Builds B, then A; B failing to build fails the run, A failing is a note (and every figure is
/// then missing in A).
fn build(sides: &[Side; 2], profile: Profile) -> anyhow::Result<Problems> {
    let mut problems = Problems::default();
    for side in sides.iter().rev() {
        if let Err(err) = side.build(profile) {
            problems.report(side, format!("build failed: {err:#}"));
            if side.is_candidate() {
                bail!("{}", problems.errors.join("\n"));
            }
        }
    }
    Ok(problems)
}

/// The cargo profile both sides build with.
#[derive(Clone, Copy)]
enum Profile {
    /// `--quick`: a smoke test of the comparison itself; never fails on timings.
    Dev,
    Release,
}

impl Profile {
    fn args(self) -> &'static [&'static str] {
        match self {
            Profile::Dev => &["--profile", "dev"],
            Profile::Release => &["--release"],
        }
    }
}

/// A revision as the report names it.
struct Revision {
    /// What the user asked for (`main`, `HEAD~1`), or "working tree".
    name: String,
    /// The commit; for the working tree, its HEAD.
    sha: String,
    /// The working tree differs from its HEAD.
    dirty: bool,
}

impl Revision {
    fn resolve(repo: &Path, rev: &str) -> anyhow::Result<Revision> {
        let sha = stdout_of(git(repo).args(["rev-parse", "--verify", &format!("{rev}^{{commit}}")]))
            .with_context(|| format!("--compare {rev}: not a commit of this repository (a shallow clone needs `fetch-depth: 0`)"))?;
        Ok(Revision {
            name: rev.to_owned(),
            sha,
            dirty: false,
        })
    }

    fn working_tree(repo: &Path) -> anyhow::Result<Revision> {
        let sha = stdout_of(git(repo).args(["rev-parse", "HEAD"]))?;
        let status = stdout_of(git(repo).args(["status", "--porcelain", "--untracked-files=no"]))?;
        Ok(Revision {
            name: "working tree".into(),
            sha,
            dirty: !status.is_empty(),
        })
    }

    fn short(&self) -> &str {
        &self.sha[..self.sha.len().min(10)]
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}", self.name, self.short())?;
        if self.dirty {
            write!(f, " + uncommitted changes")?;
        }
        write!(f, ")")
    }
}

fn git(repo: &Path) -> Command {
    let mut command = Command::new("git");
    command.current_dir(repo);
    command
}

/// Runs `command` and returns its trimmed stdout; its stderr is in the error.
fn stdout_of(command: &mut Command) -> anyhow::Result<String> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Checks the revision out as a detached worktree at `dir/<sha>` and returns its path. A clean
/// worktree an earlier comparison left there is reused, so its build is still fresh (cargo goes
/// by file times); worktrees of other revisions under `dir` are removed, so at most one stays.
fn worktree(repo: &Path, revision: &Revision, dir: &Path) -> anyhow::Result<PathBuf> {
    let (sha, path) = (&revision.sha, dir.join(revision.short()));
    let list = stdout_of(git(repo).args(["worktree", "list", "--porcelain"]))?;
    for other in list.lines().filter_map(|l| l.strip_prefix("worktree ")) {
        if Path::new(other).starts_with(dir) && Path::new(other) != path {
            stdout_of(git(repo).args(["worktree", "remove", "--force", other]))?;
        }
    }
    if path.exists() {
        let head = stdout_of(git(&path).args(["rev-parse", "HEAD"]));
        let status = stdout_of(git(&path).args(["status", "--porcelain"]));
        if head.is_ok_and(|head| &head == sha) && status.is_ok_and(|s| s.is_empty()) {
            eprintln!("== reusing the worktree of A at {}", path.display());
            return Ok(path);
        }
        let _ = stdout_of(git(repo).args(["worktree", "remove", "--force"]).arg(&path));
        if path.exists() {
            std::fs::remove_dir_all(&path)?;
        }
    }
    stdout_of(git(repo).args(["worktree", "prune"]))?;
    stdout_of(
        git(repo)
            .args(["worktree", "add", "--detach", "--quiet"])
            .arg(&path)
            .arg(sha),
    )?;
    Ok(path)
}

/// One side of the comparison: a revision, where it is checked out and built, and its
/// executables.
struct Side {
    /// "A" (the revision given) or "B" (the working tree).
    name: &'static str,
    revision: Revision,
    workspace: PathBuf,
    target: PathBuf,
    bin_dir: PathBuf,
}

impl Side {
    fn new(
        name: &'static str,
        revision: Revision,
        workspace: &Path,
        target: &Path,
        dir: &Path,
    ) -> Side {
        Side {
            name,
            revision,
            workspace: workspace.to_path_buf(),
            target: target.to_path_buf(),
            bin_dir: dir.join(name),
        }
    }

    /// B is the candidate: its problems fail the run, A's are notes.
    fn is_candidate(&self) -> bool {
        self.name == "B"
    }

    /// Builds the gateway, the agent, `buildplane-bench` and the criterion benches, and copies
    /// each executable to `bin_dir` as soon as its build is done.
    fn build(&self, profile: Profile) -> anyhow::Result<()> {
        eprintln!("== building {}: {}", self.name, self.revision);
        if self.bin_dir.exists() {
            std::fs::remove_dir_all(&self.bin_dir)?;
        }
        std::fs::create_dir_all(&self.bin_dir)?;
        // `--benches` and not `--bench NAME`: a revision that lacks a bench still builds.
        let benches = ["-p", "buildplane-benches", "--benches"];
        for targets in [crate::bench::BENCH_BINARIES, &benches[..]] {
            let args = [profile.args(), targets].concat();
            for (name, path) in cargo_executables(&self.workspace, &self.target, &args)? {
                std::fs::copy(&path, self.bin_dir.join(&name))
                    .with_context(|| format!("copying {}", path.display()))?;
            }
        }
        Ok(())
    }
}

/// Runs `cargo build ARGS` in `workspace` and returns the executables it produced, by name.
fn cargo_executables(
    workspace: &Path,
    target: &Path,
    args: &[&str],
) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = cargo_command(cargo);
    command
        .arg("build")
        .args(args)
        .arg("--message-format=json-render-diagnostics")
        .current_dir(workspace)
        .env("CARGO_TARGET_DIR", target)
        .stderr(std::process::Stdio::inherit());
    let output = command.output()?;
    if !output.status.success() {
        bail!("cargo build {} failed", args.join(" "));
    }
    Ok(executables(&String::from_utf8_lossy(&output.stdout)))
}

/// The executables in cargo's JSON messages (only artifacts have one), by target name.
fn executables(messages: &str) -> Vec<(String, PathBuf)> {
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter_map(|message| {
            let name = message["target"]["name"].as_str()?;
            let path = message["executable"].as_str()?;
            Some((name.to_owned(), PathBuf::from(path)))
        })
        .collect()
}

/// What went wrong: A's problems are notes, B's are errors that fail the run.
#[derive(Default)]
struct Problems {
    notes: Vec<String>,
    errors: Vec<String>,
}

impl Problems {
    fn report(&mut self, side: &Side, problem: String) {
        let problem = format!("{}: {problem}", side.name);
        eprintln!("{problem}");
        let list = if side.is_candidate() {
            &mut self.errors
        } else {
            &mut self.notes
        };
        // The same problem recurs every round.
        if !list.contains(&problem) {
            list.push(problem);
        }
    }
}

fn elapsed(since: SystemTime) -> Duration {
    since.elapsed().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cargo's JSON messages give each executable by target name; libraries have none.
    #[test]
    fn reads_executables_from_cargo_messages() {
        let messages = r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"buildplane_benches"},"executable":null}
{"reason":"compiler-artifact","target":{"kind":["bench"],"name":"codec"},"executable":"/t/release/deps/codec-0f1e"}
{"reason":"build-finished","success":true}
{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"cluster-agent"},"executable":"/t/release/cluster-agent"}"#;
        assert_eq!(
            executables(messages),
            [
                (
                    "codec".to_owned(),
                    PathBuf::from("/t/release/deps/codec-0f1e")
                ),
                (
                    "cluster-agent".to_owned(),
                    PathBuf::from("/t/release/cluster-agent")
                ),
            ]
        );
    }
}
