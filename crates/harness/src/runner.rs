//! The runner: selects scenarios, runs them (in parallel where allowed), prints progress and
//! returns results for the reports.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::backend::{Backend, EnvSpec, Environment};
use crate::bindings::Bindings;
use crate::engine::Engine;
use crate::lint::LoadedScenario;
use crate::result::{Failure, ScenarioResult, Status, StepResult, SuiteResult};
use crate::scenario::{ClusterName, Scenario, TimeoutKind, Timeouts};

/// How to run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Only scenarios whose name matches (regex).
    pub filter: Option<regex::Regex>,
    /// Only scenarios with every one of these labels.
    pub labels: Vec<String>,
    /// Skip scenarios with any of these labels.
    pub skip_labels: Vec<String>,
    /// Run each scenario this many times.
    pub repeat: u32,
    /// Keep objects and files of failed scenarios.
    pub keep_on_failure: bool,
    /// Keep every environment's files (logs, data), passed or not: `cargo xtask chaos` judges
    /// a run after the runner is done with it.
    pub keep_files: bool,
    /// `default` or `full`.
    pub profile: String,
    /// Scenarios running at once.
    pub jobs: usize,
    /// Where environments keep their files.
    pub work_dir: PathBuf,
    /// Print progress lines.
    pub verbose: bool,
}

impl Default for RunOptions {
    fn default() -> RunOptions {
        RunOptions {
            filter: None,
            labels: Vec::new(),
            skip_labels: Vec::new(),
            repeat: 1,
            keep_on_failure: false,
            keep_files: false,
            profile: "default".into(),
            jobs: 3,
            work_dir: std::env::temp_dir().join("buildplane-e2e"),
            verbose: true,
        }
    }
}

/// Progress output (one line per call).
pub type Progress = Arc<dyn Fn(String) + Send + Sync>;

/// Whether a scenario is selected by the options.
pub fn selected(scenario: &Scenario, options: &RunOptions) -> bool {
    options
        .filter
        .as_ref()
        .is_none_or(|re| re.is_match(&scenario.name))
        && options.labels.iter().all(|l| scenario.labels.contains(l))
        && !options
            .skip_labels
            .iter()
            .any(|l| scenario.labels.contains(l))
}

fn short_id() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..5)
        .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.random_range(0..36)]))
        .collect()
}

/// A DNS label: lowercase, `[a-z0-9-]`, at most `max` characters, no trailing hyphen.
fn dns_label(text: &str, max: usize) -> String {
    let mut out: String = text
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(max)
        .collect();
    while out.ends_with('-') {
        out.pop();
    }
    out
}

/// The bindings a scenario starts with.
fn initial_bindings(
    scenario: &Scenario,
    env: &dyn Environment,
    run: &str,
    profile: &str,
) -> Result<Bindings, Failure> {
    let mut bindings = Bindings::new();
    let base = dns_label(&scenario.name, 40);
    bindings.set("run", json!(run));
    bindings.set("namespace", json!(format!("e2e-{base}-{run}")));
    bindings.set("planeID", json!(format!("{base}-{run}")));
    bindings.set(
        "controlContext",
        json!(env.cluster(ClusterName::Control).context),
    );
    bindings.set(
        "buildContext",
        json!(env.cluster(ClusterName::Build).context),
    );
    bindings.set("kubeconfig", json!(env.kubeconfig_env()));
    bindings.set("profile", json!(profile));
    let overrides = scenario.profiles.get(profile);
    for (name, value) in &scenario.bindings {
        let value = overrides.and_then(|o| o.get(name)).unwrap_or(value);
        let value = bindings
            .substitute(value)
            .map_err(|e| Failure::msg(format!("binding `{name}`: {e}")))?;
        bindings.set(name.clone(), value);
    }
    Ok(bindings)
}

fn failed_result(
    scenario: &Scenario,
    attempt: u32,
    started: Instant,
    failure: Failure,
) -> ScenarioResult {
    ScenarioResult {
        name: scenario.name.clone(),
        attempt,
        labels: scenario.labels.clone(),
        status: Status::Failed,
        duration: started.elapsed(),
        failure: Some(failure),
        steps: Vec::new(),
        cleanup_error: None,
        evidence: None,
        series: Vec::new(),
        loads: Vec::new(),
        kept: None,
        skipped: None,
    }
}

/// Why `backend` cannot run `scenario`, if it cannot: a capability the scenario requires.
pub fn unsupported_by(scenario: &Scenario, backend: &dyn Backend) -> Option<String> {
    let missing: Vec<&str> = scenario
        .requires
        .iter()
        .filter(|c| !backend.capabilities().contains(c))
        .map(|c| c.as_str())
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "needs {}, which the {} backend lacks",
            missing.join(", "),
            backend.name()
        )
    })
}

/// Runs one scenario in its own environment.
pub async fn run_scenario(
    backend: &dyn Backend,
    loaded: &LoadedScenario,
    attempt: u32,
    suite_timeouts: &Timeouts,
    options: &RunOptions,
    progress: Progress,
) -> ScenarioResult {
    crate::install_crypto_provider();
    let scenario = &loaded.scenario;
    let started = Instant::now();
    if let Some(reason) = unsupported_by(scenario, backend) {
        return ScenarioResult {
            status: Status::Skipped,
            skipped: Some(reason),
            ..failed_result(scenario, attempt, started, Failure::default())
        };
    }
    let run = short_id();
    let work_dir = options.work_dir.join(format!("{}-{run}", scenario.name));
    let spec = EnvSpec {
        id: format!("{}-{run}", scenario.name),
        components: scenario.components.clone(),
        component_args: scenario.component_args.clone(),
        work_dir: work_dir.clone(),
        gateway_replicas: scenario.gateway_replicas,
    };
    let name = scenario.name.clone();
    let say = {
        let progress = progress.clone();
        move |line: String| progress(format!("{name}: {line}"))
    };
    say(format!("setting up the {} environment", backend.name()));
    let env: Arc<dyn Environment> = match backend.environment(spec).await {
        Ok(env) => Arc::from(env),
        Err(err) => {
            let failure = Failure {
                message: format!("environment setup failed: {err}"),
                awaited: Some(format!("clusters with {:?} deployed", scenario.components)),
                ..Failure::default()
            };
            let mut result = failed_result(scenario, attempt, started, failure);
            result.kept = Some(work_dir.display().to_string());
            return result;
        }
    };
    let bindings = match initial_bindings(scenario, env.as_ref(), &run, &options.profile) {
        Ok(bindings) => bindings,
        Err(failure) => {
            let _ = env.shutdown().await;
            return failed_result(scenario, attempt, started, failure);
        }
    };
    let scenario_dir = loaded.path.parent().map(PathBuf::from).unwrap_or_default();
    let step_progress: Progress = {
        let say = say.clone();
        Arc::new(say)
    };
    let mut engine = Engine::new(env.clone(), bindings, scenario_dir, step_progress);
    let timeouts = scenario.timeouts.inherit(suite_timeouts);
    let namespace = engine
        .bindings
        .get("namespace")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let mut steps: Vec<StepResult> = Vec::new();
    let mut failure = None;
    for cluster in [ClusterName::Control, ClusterName::Build] {
        if let Err(f) = engine.ensure_namespace(cluster, &namespace).await {
            failure = Some(f);
        }
    }
    let n_steps = scenario.steps.len();
    for (i, step) in scenario.steps.iter().enumerate() {
        if failure.is_some() {
            steps.push(StepResult {
                name: step.name.clone(),
                status: Status::Skipped,
                duration: Duration::ZERO,
                operations: Vec::new(),
            });
            continue;
        }
        say(format!("step {}/{n_steps} {}", i + 1, step.name));
        let result = engine.run_step(step, &timeouts).await;
        if result.status == Status::Failed {
            let first = result.operations.iter().find_map(|o| {
                o.failure
                    .clone()
                    .map(|f| (o.kind.clone(), o.summary.clone(), f))
            });
            if let Some((kind, summary, mut f)) = first {
                f.message = format!("step `{}`, {kind} {summary}: {}", step.name, f.message);
                failure = Some(f);
            }
        }
        steps.push(result);
    }
    // Every scenario also holds this: no component panicked, whatever its steps checked (a
    // panicking task may leave a process up and looking healthy).
    if failure.is_none() {
        failure = panicked(env.as_ref());
    }
    let evidence = if failure.is_some() {
        Some(engine.evidence().await)
    } else {
        None
    };
    let (series, loads) = engine.finish();
    let keep = failure.is_some() && options.keep_on_failure;
    let cleanup_timeout: Duration = timeouts
        .get(TimeoutKind::Cleanup)
        .unwrap_or(crate::duration::Dur::secs(30))
        .into();
    let cleanup_error = if keep {
        None
    } else {
        say("cleaning up".into());
        engine.cleanup(cleanup_timeout).await.err()
    };
    if let Err(err) = env.shutdown().await
        && failure.is_none()
    {
        failure = Some(Failure::msg(format!("environment shutdown failed: {err}")));
    }
    if failure.is_none()
        && let Some(err) = &cleanup_error
    {
        failure = Some(Failure::msg(format!("cleanup failed: {err}")));
    }
    let kept = if keep {
        Some(work_dir.display().to_string())
    } else {
        if failure.is_none() && !options.keep_files {
            let _ = std::fs::remove_dir_all(&work_dir);
        }
        (failure.is_some() || options.keep_files).then(|| work_dir.display().to_string())
    };
    ScenarioResult {
        name: scenario.name.clone(),
        attempt,
        labels: scenario.labels.clone(),
        status: if failure.is_some() {
            Status::Failed
        } else {
            Status::Passed
        },
        duration: started.elapsed(),
        failure,
        steps,
        cleanup_error,
        evidence,
        series,
        loads,
        kept,
        skipped: None,
    }
}

/// The marker Rust's panic hook prints.
const PANIC_MARKER: &str = "panicked at";

/// A failure naming every component whose log shows a panic, with the panic's line.
fn panicked(env: &dyn Environment) -> Option<Failure> {
    let found = panics_in(&env.logs(usize::MAX));
    (!found.is_empty()).then(|| Failure {
        message: format!("a component panicked: {}", found.join("; ")),
        awaited: Some("no `panicked at` in any component's log".into()),
        ..Failure::default()
    })
}

/// `component: line` for each log line with a panic.
fn panics_in(logs: &std::collections::BTreeMap<String, String>) -> Vec<String> {
    logs.iter()
        .flat_map(|(component, text)| {
            text.lines()
                .filter(|line| line.contains(PANIC_MARKER))
                .map(move |line| format!("{component}: {}", line.trim()))
        })
        .collect()
}

/// Runs the selected scenarios: non-concurrent ones first, alone; then the rest `jobs` at a time.
pub async fn run_suite(
    backend: Arc<dyn Backend>,
    scenarios: Vec<LoadedScenario>,
    options: RunOptions,
    progress: Progress,
) -> SuiteResult {
    let started_at = chrono::Utc::now().to_rfc3339();
    let started = Instant::now();
    let suite_timeouts = Timeouts::suite_defaults();
    let selected: Vec<LoadedScenario> = scenarios
        .into_iter()
        .filter(|s| selected(&s.scenario, &options))
        .collect();
    let mut runs = Vec::new();
    for attempt in 0..options.repeat.max(1) {
        for loaded in &selected {
            runs.push((loaded.clone(), attempt));
        }
    }
    let (serial, parallel): (Vec<_>, Vec<_>) =
        runs.into_iter().partition(|(l, _)| !l.scenario.concurrent);
    let mut results = Vec::new();
    let report = |result: &ScenarioResult| {
        let verdict = match result.status {
            Status::Passed => "PASS",
            Status::Failed => "FAIL",
            Status::Skipped => "SKIP",
        };
        let mut line = format!(
            "{verdict} {} ({})",
            result.name,
            crate::duration::pretty(result.duration)
        );
        if let Some(reason) = &result.skipped {
            line.push_str(&format!(": {reason}"));
        }
        if let Some(failure) = &result.failure {
            line.push('\n');
            line.push_str(&crate::result::indent(&failure.render(), 2));
        }
        line
    };
    for (loaded, attempt) in serial {
        let result = run_scenario(
            backend.as_ref(),
            &loaded,
            attempt,
            &suite_timeouts,
            &options,
            progress.clone(),
        )
        .await;
        progress(report(&result));
        results.push(result);
    }
    let semaphore = Arc::new(tokio::sync::Semaphore::new(options.jobs.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for (loaded, attempt) in parallel {
        let backend = backend.clone();
        let options = options.clone();
        let progress = progress.clone();
        let semaphore = semaphore.clone();
        let suite_timeouts = suite_timeouts.clone();
        tasks.spawn(async move {
            let _permit = semaphore.acquire_owned().await;
            run_scenario(
                backend.as_ref(),
                &loaded,
                attempt,
                &suite_timeouts,
                &options,
                progress,
            )
            .await
        });
    }
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(result) => {
                progress(report(&result));
                results.push(result);
            }
            Err(err) => progress(format!("FAIL a scenario task panicked: {err}")),
        }
    }
    SuiteResult {
        backend: backend.name().to_string(),
        profile: options.profile.clone(),
        started: started_at,
        duration: started.elapsed(),
        scenarios: results,
    }
}

/// The closing table and the `N passed, N failed` line.
pub fn summary_table(suite: &SuiteResult) -> String {
    let width = suite
        .scenarios
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(8)
        .max(8);
    let mut out = format!(
        "{:<width$}  {:<6}  {:>9}\n",
        "scenario", "result", "duration"
    );
    let mut sorted: Vec<_> = suite.scenarios.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name).then(a.attempt.cmp(&b.attempt)));
    for result in sorted {
        let verdict = match result.status {
            Status::Passed => "pass",
            Status::Failed => "FAIL",
            Status::Skipped => "skip",
        };
        out.push_str(&format!(
            "{:<width$}  {:<6}  {:>9}\n",
            result.name,
            verdict,
            crate::duration::pretty(result.duration)
        ));
    }
    // Failures again, one line each, next to the closing line: a CI log shows its tail, and
    // the full rendering printed when the scenario ended may be far above it.
    let failed: Vec<_> = suite
        .scenarios
        .iter()
        .filter(|s| s.status == Status::Failed)
        .collect();
    if !failed.is_empty() {
        out.push_str("failures:\n");
        for result in failed {
            let reason = result
                .failure
                .as_ref()
                .map_or("(no reason recorded)", |f| f.message.as_str());
            out.push_str(&format!(
                "  {}: {}\n",
                result.name,
                reason.lines().next().unwrap_or_default()
            ));
        }
    }
    out.push_str(&format!(
        "total wall time {} (backend {}, profile {})\n",
        crate::duration::pretty(suite.duration),
        suite.backend,
        suite.profile
    ));
    let skipped: Vec<_> = suite
        .scenarios
        .iter()
        .filter_map(|s| Some((&s.name, s.skipped.as_ref()?)))
        .collect();
    if !skipped.is_empty() {
        out.push_str("skipped:\n");
        for (name, reason) in &skipped {
            out.push_str(&format!("  {name}: {reason}\n"));
        }
    }
    out.push_str(&format!(
        "{} passed, {} failed, {} skipped",
        suite.passed(),
        suite.failed(),
        suite.skipped()
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Backend, BackendError, BoxFuture, EnvSpec, Environment};

    /// A backend that never provides an environment.
    struct Unavailable;

    impl Backend for Unavailable {
        fn name(&self) -> &'static str {
            "unavailable"
        }

        fn isolated(&self) -> bool {
            false
        }

        fn environment(
            &self,
            _spec: EnvSpec,
        ) -> BoxFuture<'_, crate::backend::Result<Box<dyn Environment>>> {
            Box::pin(async {
                Err(BackendError::NotImplemented {
                    backend: "unavailable",
                    issue: "no issue (a test backend)",
                })
            })
        }
    }

    fn scenario(name: &str, labels: &[&str]) -> LoadedScenario {
        let text = format!(
            "name: {name}\ndescription: fails when broken\nlabels: [{}]\nsteps:\n  - name: s\n    try:\n      - sleep: {{duration: 1ms}}\n",
            labels.join(", ")
        );
        LoadedScenario {
            scenario: serde_yaml::from_str(&text).unwrap(),
            path: PathBuf::from(format!("{name}.yaml")),
        }
    }

    /// A backend that cannot provide an environment fails the scenario with its reason, and
    /// the closing line counts it (never a silent pass).
    #[tokio::test]
    async fn unavailable_backend_fails_scenarios_with_the_reason() {
        let quiet: Progress = Arc::new(|_| {});
        let options = RunOptions {
            work_dir: std::env::temp_dir().join("harness-runner-test"),
            ..RunOptions::default()
        };
        let suite = run_suite(
            Arc::new(Unavailable),
            vec![scenario("a", &["fast"])],
            options,
            quiet,
        )
        .await;
        assert_eq!(suite.failed(), 1);
        let message = &suite.scenarios[0].failure.as_ref().unwrap().message;
        assert!(
            message.contains("not implemented in this build"),
            "{message}"
        );
        let table = summary_table(&suite);
        assert!(table.ends_with("0 passed, 1 failed, 0 skipped"), "{table}");
        assert!(
            table.contains("failures:\n  a: ") && table.contains("not implemented in this build"),
            "{table}"
        );
    }

    /// A scenario that requires what the backend lacks is skipped with the reason (listed above
    /// the closing line and in JUnit), not run into a failure and not counted as passed.
    #[tokio::test]
    async fn scenario_needing_a_missing_capability_is_skipped_with_the_reason() {
        let quiet: Progress = Arc::new(|_| {});
        let options = RunOptions {
            work_dir: std::env::temp_dir().join("harness-runner-test"),
            ..RunOptions::default()
        };
        let mut faults = scenario("faults", &["fast"]);
        faults.scenario.requires = vec![crate::scenario::Capability::LinkFaults];
        let suite = run_suite(Arc::new(Unavailable), vec![faults], options, quiet).await;
        assert_eq!((suite.passed(), suite.failed(), suite.skipped()), (0, 0, 1));
        let reason = suite.scenarios[0].skipped.as_deref().unwrap_or_default();
        assert_eq!(
            reason,
            "needs linkFaults, which the unavailable backend lacks"
        );
        let table = summary_table(&suite);
        assert!(
            table.contains("skipped:\n  faults: needs linkFaults"),
            "{table}"
        );
        assert!(table.ends_with("0 passed, 0 failed, 1 skipped"), "{table}");
        let junit = crate::report::junit(&suite);
        assert!(
            junit.contains(
                "<skipped message=\"needs linkFaults, which the unavailable backend lacks\"/>"
            ),
            "{junit}"
        );
    }

    /// Filters and labels select scenarios; repeat multiplies them.
    #[tokio::test]
    async fn selects_by_filter_and_labels_and_repeats() {
        let quiet: Progress = Arc::new(|_| {});
        let options = RunOptions {
            filter: Some(regex::Regex::new("^a|^b").unwrap()),
            skip_labels: vec!["slow".into()],
            repeat: 2,
            work_dir: std::env::temp_dir().join("harness-runner-test"),
            ..RunOptions::default()
        };
        let scenarios = vec![
            scenario("a", &["fast"]),
            scenario("b", &["slow"]),
            scenario("c", &["fast"]),
        ];
        let suite = run_suite(Arc::new(Unavailable), scenarios, options, quiet).await;
        let mut names: Vec<_> = suite
            .scenarios
            .iter()
            .map(|s| (s.name.clone(), s.attempt))
            .collect();
        names.sort();
        assert_eq!(names, vec![("a".to_string(), 0), ("a".to_string(), 1)]);
    }

    /// Generated names are valid DNS labels.
    /// A panic anywhere in a component's log is found with its component; other lines are not.
    #[test]
    fn finds_panics_in_component_logs() {
        let logs: std::collections::BTreeMap<String, String> = [
            (
                "gateway-0".to_owned(),
                "INFO started\nthread 'tokio-runtime-worker' panicked at crates/gateway/src/proxy.rs:10:5:\nboom\n".to_owned(),
            ),
            ("agent-a".to_owned(), "WARN reconnecting after a panic-free error\n".to_owned()),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            panics_in(&logs),
            [
                "gateway-0: thread 'tokio-runtime-worker' panicked at crates/gateway/src/proxy.rs:10:5:"
            ]
        );
        assert!(panics_in(&std::collections::BTreeMap::new()).is_empty());
    }

    #[test]
    fn makes_dns_labels() {
        assert_eq!(dns_label("CA_rotation.v2--", 63), "ca-rotation-v2");
        assert_eq!(dns_label("abcdef", 3), "abc");
    }
}
