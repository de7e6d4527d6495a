//! Runs the `fast` scenarios of `scenarios/` as tests (libtest-mimic), on the sim backend.
//!
//! Each scenario file labelled `fast` becomes one trial, so `cargo test` filters apply
//! (`cargo test -p buildplane-harness --test scenarios -- agent-registration`). The component
//! binaries are built first with the cargo running the tests; a component that does not build
//! makes the scenarios that need it fail with the reason, never pass silently.
//! Slow scenarios (the reconnect storm) run only through `cargo xtask e2e`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use buildplane_harness::backend::sim::{Binaries, SimBackend};
use buildplane_harness::lint::{LoadedScenario, load_dir};
use buildplane_harness::report;
use buildplane_harness::result::{Status, SuiteResult};
use buildplane_harness::runner::{RunOptions, run_scenario};
use buildplane_harness::scenario::Timeouts;
use libtest_mimic::{Arguments, Failed, Trial};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace root exists")
}

fn binaries() -> &'static Binaries {
    static BINARIES: OnceLock<Binaries> = OnceLock::new();
    BINARIES.get_or_init(|| {
        let root = root();
        if std::env::var_os("BUILDPLANE_E2E_NO_BUILD").is_some() {
            // The test binary lives in <target>/debug/deps.
            let exe = std::env::current_exe().expect("the test knows its path");
            let dir = exe
                .parent()
                .and_then(Path::parent)
                .map(Path::to_path_buf)
                .unwrap_or_default();
            return Binaries::from_dir(dir);
        }
        let cargo = std::env::var_os("CARGO")
            .map(PathBuf::from)
            .unwrap_or_else(|| "cargo".into());
        buildplane_harness::build::build_components(&cargo, &root, Default::default(), &|line| {
            eprintln!("scenarios: {line}")
        })
    })
}

fn run(loaded: LoadedScenario) -> Result<(), Failed> {
    let backend = SimBackend::new(binaries().clone());
    let work_dir = binaries().dir.join("e2e-test-work");
    let options = RunOptions {
        work_dir: work_dir.clone(),
        verbose: false,
        ..RunOptions::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failed::from(e.to_string()))?;
    let quiet: buildplane_harness::runner::Progress = Arc::new(|_| {});
    let result = runtime.block_on(run_scenario(
        &backend,
        &loaded,
        0,
        &Timeouts::suite_defaults(),
        &options,
        quiet,
    ));
    if result.status == Status::Passed {
        return Ok(());
    }
    // Keep a report of the failure beside the work directory.
    let name = result.name.clone();
    let suite = SuiteResult {
        backend: "sim".into(),
        profile: "default".into(),
        started: String::new(),
        duration: result.duration,
        scenarios: vec![result.clone()],
    };
    let report_dir = work_dir.join(format!("report-{name}"));
    let _ = report::write_all(&suite, &report_dir);
    let mut message = result
        .failure
        .map(|f| f.render())
        .unwrap_or_else(|| "failed".into());
    if let Some(evidence) = &result.evidence {
        for (component, log) in &evidence.logs {
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(15)..].join("\n    ");
            message.push_str(&format!("\n  --- {component} log (tail) ---\n    {tail}"));
        }
    }
    message.push_str(&format!(
        "\n  full report: {}",
        report_dir.join("report.html").display()
    ));
    Err(message.into())
}

fn main() {
    let mut args = Arguments::from_args();
    // Scenarios mostly wait on reconnects and timeouts: run more than one per core.
    args.test_threads.get_or_insert(4);
    let (scenarios, errors) = load_dir(&root().join("scenarios"));
    let mut trials = Vec::new();
    if !errors.is_empty() {
        let text = errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n");
        trials.push(Trial::test("lint", move || Err(text.into())));
    } else {
        trials.push(Trial::test("lint", || Ok(())));
    }
    for loaded in scenarios {
        if !loaded.scenario.labels.iter().any(|l| l == "fast") {
            continue;
        }
        let name = loaded.scenario.name.clone();
        trials.push(Trial::test(name, move || run(loaded)));
    }
    libtest_mimic::run(&args, trials).exit();
}
