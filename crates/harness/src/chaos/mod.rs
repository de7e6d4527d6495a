//! `cargo xtask chaos`: random fault schedules over a running environment with steady load,
//! invariants checked during and after, and a failing schedule shrunk to a small scenario file.
//!
//! A schedule ([`schedule::generate`]) becomes an ordinary scenario ([`scenario_yaml`]): two
//! tenants (agents `a` and `b`, each with its BuildPlane), steady load on both, the faults at their
//! times, then heal, convergence and leak checks. The runner runs it like any scenario; the
//! invariants ([`Invariant`]) are read from its result: the scenario's own checks, the load
//! samples against the fault windows, and the panic scan every scenario gets. A schedule that
//! breaks one is shrunk ([`shrink::ddmin`] over its faults, then its timing) to the smallest
//! that still breaks the same invariant, and written as a scenario file with the seed and the
//! invariant in its description.

pub mod schedule;
pub mod shrink;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};

use crate::backend::Backend;
use crate::lint::LoadedScenario;
use crate::result::{ScenarioResult, Status};
use crate::runner::{Progress, RunOptions, run_scenario};
use crate::scenario::Timeouts;
use schedule::{Fault, FaultEvent, LinkFault};

/// How long a failed request may take, from its start, before it counts as hanging: the
/// gateway's heartbeat timeout in a chaos environment (3 s) makes a dead link detectable,
/// plus 2 s to fail the request and answer.
pub const FAIL_FAST: Duration = Duration::from_secs(5);

/// Time after a shared fault recovers in which tenant B's failures are still its doing
/// (agents reconnect with backoff).
const SHARED_GRACE: Duration = Duration::from_secs(10);

/// Time after a revocation starts in which requests already admitted may still succeed.
const REVOCATION_GRACE: Duration = Duration::from_secs(1);

/// The invariants a chaos run checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Invariant {
    /// Every request succeeds or fails within [`FAIL_FAST`].
    FailFast,
    /// Faults of tenant A never fail tenant B's requests.
    Isolation,
    /// No request for tenant A succeeds while its BuildPlane admits no agent.
    Revocation,
    /// BuildPlane status and routing converge to the truth after the faults heal.
    Convergence,
    /// No pending request or extra connection is left at the gateway.
    Leak,
    /// No component panics.
    NoPanic,
    /// Every fault and its recovery complete (components start again, deletions finish).
    Recovery,
}

impl Invariant {
    /// Every invariant, in the order reports list them.
    pub const ALL: [Invariant; 7] = [
        Invariant::FailFast,
        Invariant::Isolation,
        Invariant::Revocation,
        Invariant::Convergence,
        Invariant::Leak,
        Invariant::NoPanic,
        Invariant::Recovery,
    ];

    /// Its name on the command line and in files.
    pub fn as_str(self) -> &'static str {
        match self {
            Invariant::FailFast => "fail-fast",
            Invariant::Isolation => "isolation",
            Invariant::Revocation => "revocation",
            Invariant::Convergence => "convergence",
            Invariant::Leak => "leak",
            Invariant::NoPanic => "no-panic",
            Invariant::Recovery => "recovery",
        }
    }

    /// What it promises, in one sentence.
    pub fn promise(self) -> &'static str {
        match self {
            Invariant::FailFast => {
                "every request succeeds or fails with a clear error within 5 s (3 s to detect a dead link, 2 s to answer)"
            }
            Invariant::Isolation => "tenant A's faults never fail tenant B's requests",
            Invariant::Revocation => {
                "no request for tenant A succeeds while its BuildPlane admits no agent"
            }
            Invariant::Convergence => {
                "BuildPlane status and routing converge to the truth within 60 s of the last fault"
            }
            Invariant::Leak => {
                "no pending request and no extra agent connection is left at the gateway"
            }
            Invariant::NoPanic => "no component panics",
            Invariant::Recovery => {
                "every fault and its recovery complete: stopped components start again, objects are deleted and re-created"
            }
        }
    }
}

/// A broken invariant, with what showed it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Violation {
    /// Which one.
    pub invariant: Invariant,
    /// What was seen.
    pub detail: String,
    /// When it was seen, in seconds on the schedule's axis (from the first fault operation's
    /// start), when a request showed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<f64>,
}

/// Options of a chaos run.
#[derive(Clone, Debug)]
pub struct ChaosOptions {
    /// Seed of the schedule.
    pub seed: u64,
    /// Length of the fault schedule (setup and checks come on top).
    pub duration: Duration,
    /// Which faults may be drawn.
    pub mix: schedule::Mix,
    /// Shrink a failing schedule.
    pub shrink: bool,
    /// Upper bound on shrink trials (each is a whole environment run).
    pub max_trials: usize,
    /// Where work files and the shrunk scenario go.
    pub out_dir: PathBuf,
    /// Requests per second of each tenant's load.
    pub rate: f64,
}

/// What a chaos run found.
#[derive(Clone, Debug, Serialize)]
pub struct ChaosReport {
    /// The seed.
    pub seed: u64,
    /// The schedule run.
    pub schedule: Vec<FaultEvent>,
    /// Violations of the first run (empty: every invariant held).
    pub violations: Vec<Violation>,
    /// The shrunk schedule, when a violation was shrunk.
    pub shrunk: Option<Vec<FaultEvent>>,
    /// Trials the shrink ran.
    pub shrink_trials: usize,
    /// The scenario file written for the shrunk schedule.
    pub scenario_file: Option<PathBuf>,
    /// Each tenant's requests in the first run, with their failures by kind.
    pub loads: Vec<LoadTally>,
    /// The first run's result (for the report).
    #[serde(skip)]
    pub result: Option<ScenarioResult>,
}

/// One tenant's requests in a run: how many failed, and how (a status, or the error's
/// causes), so that a reader tells an outage of the tenant's own from one of the shared parts.
#[derive(Clone, Debug, Serialize)]
pub struct LoadTally {
    /// `tenant-a` or `tenant-b`.
    pub name: String,
    /// Requests sent.
    pub total: u64,
    /// Requests that failed.
    pub failed: u64,
    /// Failures by kind, with counts.
    pub errors: std::collections::BTreeMap<String, u64>,
}

impl LoadTally {
    fn of(result: &ScenarioResult) -> Vec<LoadTally> {
        result
            .loads
            .iter()
            .map(|load| LoadTally {
                name: load.name.clone(),
                total: load.total,
                failed: load.failed,
                errors: load.errors.clone(),
            })
            .collect()
    }
}

impl std::fmt::Display for LoadTally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} of {} failed", self.name, self.failed, self.total)?;
        for (kind, count) in &self.errors {
            write!(f, "; {count} × {kind}")?;
        }
        Ok(())
    }
}

/// Runs a chaos session: the seed's schedule, then (if it breaks an invariant) the shrink.
pub async fn run(
    backend: Arc<dyn Backend>,
    options: &ChaosOptions,
    progress: Progress,
) -> Result<ChaosReport, ChaosError> {
    let events = schedule::generate(options.seed, options.duration, options.mix);
    progress(format!(
        "seed {}: {} faults over {:?}",
        options.seed,
        events.len(),
        options.duration
    ));
    for event in &events {
        progress(format!(
            "  at {:>6} ms: {}",
            event.at.as_millis(),
            event.fault.describe()
        ));
    }
    let (result, violations) =
        trial(backend.clone(), options, &events, 0, progress.clone()).await?;
    let loads = LoadTally::of(&result);
    for load in &loads {
        progress(load.to_string());
    }
    let mut report = ChaosReport {
        seed: options.seed,
        schedule: events.clone(),
        violations: violations.clone(),
        shrunk: None,
        shrink_trials: 0,
        scenario_file: None,
        loads,
        result: Some(result),
    };
    let Some(first) = violations.first().cloned() else {
        progress("every invariant held".into());
        return Ok(report);
    };
    progress(format!(
        "invariant `{}` broken: {}",
        first.invariant.as_str(),
        first.detail
    ));
    let mut minimal = events.clone();
    if options.shrink
        && let Some(seen_at) = first.at
    {
        // A fault planned to start after the violation was seen cannot have caused it (an
        // operation only ever runs later than planned): one trial confirms, then ddmin works on
        // what is left.
        let before: Vec<FaultEvent> = events
            .iter()
            .filter(|e| e.at.as_secs_f64() <= seen_at)
            .cloned()
            .collect();
        if before.len() < events.len() && !before.is_empty() {
            progress(format!(
                "shrink: {} of the faults started before the violation at {seen_at:.1} s",
                before.len()
            ));
            report.shrink_trials += 1;
            let still = trial(backend.clone(), options, &before, 1000, progress.clone())
                .await
                .is_ok_and(|(_, found)| found.iter().any(|v| v.invariant == first.invariant));
            if still {
                minimal = before;
            }
        }
    }
    if options.shrink {
        let mut counter = 0u32;
        let shrunk = shrink::ddmin(minimal.clone(), options.max_trials, |subset| {
            counter += 1;
            let (backend, progress) = (backend.clone(), progress.clone());
            let attempt = counter;
            async move {
                progress(format!(
                    "shrink trial {attempt}: {} of the faults",
                    subset.len()
                ));
                let again = match trial(backend, options, &subset, attempt, progress.clone()).await
                {
                    Ok((_, found)) => found.iter().any(|v| v.invariant == first.invariant),
                    Err(err) => {
                        progress(format!("shrink trial {attempt}: {err}"));
                        false
                    }
                };
                progress(format!(
                    "shrink trial {attempt}: {}",
                    if again { "still broken" } else { "holds" }
                ));
                again
            }
        })
        .await;
        report.shrink_trials += shrunk.trials;
        minimal = shrunk.items;
        // Then the timing: each fault as early as the one before it allows, while it breaks.
        if !shrunk.budget_exhausted && minimal.len() > 1 {
            let packed = pack(&minimal);
            if packed != minimal {
                report.shrink_trials += 1;
                let packed_breaks = trial(
                    backend.clone(),
                    options,
                    &packed,
                    counter + 1,
                    progress.clone(),
                )
                .await
                .is_ok_and(|(_, found)| found.iter().any(|v| v.invariant == first.invariant));
                if packed_breaks {
                    minimal = packed;
                }
            }
        }
        progress(format!(
            "shrunk to {} fault(s) in {} trials",
            minimal.len(),
            report.shrink_trials
        ));
    }
    let name = format!("chaos-{}-{}", options.seed, first.invariant.as_str());
    let text = scenario_yaml(
        &name,
        &minimal,
        options,
        Some((&first, events.len(), report.shrink_trials)),
    );
    let path = options.out_dir.join(format!("{name}.yaml"));
    match std::fs::create_dir_all(&options.out_dir).and_then(|()| std::fs::write(&path, text)) {
        Ok(()) => {
            progress(format!("wrote {}", path.display()));
            report.scenario_file = Some(path);
        }
        Err(err) => progress(format!("writing {} failed: {err}", path.display())),
    }
    report.shrunk = Some(minimal);
    Ok(report)
}

/// Each fault moved to start right after the previous one on the timeline recovered (plus a
/// second), keeping the order: shorter schedules are easier to read.
fn pack(events: &[FaultEvent]) -> Vec<FaultEvent> {
    let mut at = Duration::from_millis(500);
    events
        .iter()
        .map(|e| {
            let moved = FaultEvent {
                at: at.min(e.at),
                fault: e.fault.clone(),
            };
            at = moved.at + e.fault.span() + Duration::from_secs(1);
            moved
        })
        .collect()
}

/// Runs one schedule as a scenario and reads the invariants from its result.
async fn trial(
    backend: Arc<dyn Backend>,
    options: &ChaosOptions,
    events: &[FaultEvent],
    attempt: u32,
    progress: Progress,
) -> Result<(ScenarioResult, Vec<Violation>), ChaosError> {
    let name = format!("chaos-{}", options.seed);
    let text = scenario_yaml(&name, events, options, None);
    let dir = options.out_dir.join("work");
    std::fs::create_dir_all(&dir).map_err(|e| ChaosError::Io(dir.clone(), e))?;
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, &text).map_err(|e| ChaosError::Io(path.clone(), e))?;
    let scenario = crate::lint::parse(&path, &text).map_err(|errors| {
        ChaosError::Generator(
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;
    let loaded = LoadedScenario { scenario, path };
    let run_options = RunOptions {
        work_dir: dir.join("env"),
        keep_files: true,
        ..RunOptions::default()
    };
    let result = run_scenario(
        backend.as_ref(),
        &loaded,
        attempt,
        &Timeouts::suite_defaults(),
        &run_options,
        progress,
    )
    .await;
    let violations = violations(&result, events).map_err(ChaosError::Setup)?;
    Ok((result, violations))
}

/// Why a chaos run could not judge the product.
#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    /// The environment or the tenants' set-up failed before any fault.
    #[error("the environment did not come up, so nothing was judged: {0}")]
    Setup(String),
    /// The generated scenario is invalid (a defect of the generator).
    #[error("the chaos generator wrote an invalid scenario: {0}")]
    Generator(String),
    /// A work file could not be written.
    #[error("writing {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

/// The invariants broken in one run, one violation per invariant, or why the run says nothing
/// (its environment or set-up failed before any fault).
pub fn violations(
    result: &ScenarioResult,
    events: &[FaultEvent],
) -> Result<Vec<Violation>, String> {
    let mut found = Vec::new();
    let marks = fault_marks(result, events);
    for load in &result.loads {
        let tenant_b = load.name == "tenant-b";
        for sample in &load.samples {
            // `t` is when the request was sent.
            let (sent, done) = (sample.t, sample.t + sample.latency_ms / 1000.0);
            if !sample.ok && sample.latency_ms > FAIL_FAST.as_secs_f64() * 1000.0 {
                found.push(Violation {
                    invariant: Invariant::FailFast,
                    at: Some(sent - marks.origin),
                    detail: format!(
                        "a {} request sent at {sent:.1} s failed after {:.0} ms",
                        load.name, sample.latency_ms
                    ),
                });
            }
            if tenant_b
                && !sample.ok
                && !marks
                    .shared
                    .iter()
                    .any(|(from, to)| sent <= to + SHARED_GRACE.as_secs_f64() && done >= *from)
            {
                found.push(Violation {
                    invariant: Invariant::Isolation,
                    at: Some(sent - marks.origin),
                    detail: format!(
                        "a tenant-b request sent at {sent:.1} s failed while no shared part was faulted"
                    ),
                });
            }
            if !tenant_b
                && sample.ok
                && marks
                    .revoked
                    .iter()
                    .any(|(from, to)| sent >= from + REVOCATION_GRACE.as_secs_f64() && done <= *to)
            {
                found.push(Violation {
                    invariant: Invariant::Revocation,
                    at: Some(sent - marks.origin),
                    detail: format!(
                        "a tenant-a request sent at {sent:.1} s succeeded while its BuildPlane admitted no agent"
                    ),
                });
            }
        }
    }
    if result.status == Status::Failed {
        let message = result
            .failure
            .as_ref()
            .map(|f| f.message.clone())
            .unwrap_or_default();
        if message.contains("step `two tenants`")
            || message.contains("step `steady load`")
            || message.starts_with("environment setup failed")
        {
            return Err(message);
        }
        let invariant = if message.starts_with("a component panicked") {
            Some(Invariant::NoPanic)
        } else if message.contains("step `status converges`") {
            Some(Invariant::Convergence)
        } else if message.contains("step `nothing leaked`") {
            Some(Invariant::Leak)
        } else if message.contains("step `fault schedule`, request") {
            Some(Invariant::Revocation)
        } else if message.contains("step `heal`, await") && !found.is_empty() {
            // A load's own checks failed: the samples above already name the invariant.
            None
        } else {
            Some(Invariant::Recovery)
        };
        if let Some(invariant) = invariant {
            found.push(Violation {
                invariant,
                detail: message.lines().next().unwrap_or_default().to_owned(),
                at: None,
            });
        }
    }
    // One of each kind, the first seen.
    let mut seen = std::collections::BTreeSet::new();
    found.retain(|v| seen.insert(v.invariant));
    Ok(found)
}

/// Time windows (seconds on the scenario's axis) of the faults that ran.
#[derive(Default)]
struct Marks {
    /// When the schedule's first operation started (the schedule's zero on the run's axis).
    origin: f64,
    /// Shared data-path faults: from injection to recovery.
    shared: Vec<(f64, f64)>,
    /// Tenant A admits nothing: from injection to recovery.
    revoked: Vec<(f64, f64)>,
}

fn fault_marks(result: &ScenarioResult, events: &[FaultEvent]) -> Marks {
    let mut marks = Marks::default();
    let Some(step) = result.steps.iter().find(|s| s.name == "fault schedule") else {
        return marks;
    };
    let ran: Vec<(f64, f64)> = step
        .operations
        .iter()
        .map(|o| (o.at, o.at + o.duration.as_secs_f64()))
        .collect();
    marks.origin = ran.first().map_or(0.0, |r| r.0);
    let end_of_run = result.duration.as_secs_f64();
    let timeline = plan(events);
    for planned in &timeline {
        let Action::Inject(event) = planned.action else {
            continue;
        };
        let Some(&(start, _)) = ran.get(planned.first_op) else {
            continue;
        };
        // A fault ends when its recovery's last operation does (a restart: its own).
        let last_op = timeline
            .iter()
            .find(|p| p.action == Action::Recover(event))
            .map_or(planned.last_op, |p| p.last_op);
        let recovered = ran.get(last_op).map_or(end_of_run, |&(_, end)| end);
        let fault = &events[event].fault;
        if fault.shared_data_path() {
            marks.shared.push((start, recovered));
        }
        if fault.revokes_tenant_a() {
            marks.revoked.push((start, recovered));
        }
    }
    marks
}

/// A point of the timeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Inject(usize),
    Recover(usize),
}

/// One action and the operations it renders to (indices in the `fault schedule` step).
struct Planned {
    action: Action,
    first_op: usize,
    last_op: usize,
    ops: Vec<Value>,
}

/// The timeline of `events`: injections and recoveries in time order (a recovery before an
/// injection at the same time), each with its operations and their indices, sleeps between.
fn plan(events: &[FaultEvent]) -> Vec<Planned> {
    let mut points: Vec<(Duration, Action)> = Vec::new();
    for (i, event) in events.iter().enumerate() {
        points.push((event.at, Action::Inject(i)));
        if has_recovery(&event.fault) {
            points.push((event.at + event.fault.span(), Action::Recover(i)));
        }
    }
    points.sort_by_key(|(at, action)| (*at, matches!(action, Action::Inject(_))));
    let mut out = Vec::new();
    let mut clock = Duration::ZERO;
    let mut index = 0;
    for (at, action) in points {
        let mut ops = Vec::new();
        if at > clock {
            ops.push(json!({"sleep": {"duration": format!("{}ms", (at - clock).as_millis())}}));
            clock = at;
        }
        // The sleep belongs to no fault; count it before the action's first operation.
        index += ops.len();
        let own = match action {
            Action::Inject(i) => inject(&events[i].fault),
            Action::Recover(i) => recover(&events[i].fault),
        };
        let first_op = index;
        index += own.len();
        ops.extend(own);
        out.push(Planned {
            action,
            first_op,
            last_op: index - 1,
            ops,
        });
    }
    out
}

fn has_recovery(fault: &Fault) -> bool {
    !matches!(fault, Fault::RestartAgent | Fault::RestartGateway)
}

const PATH_A: &str =
    "/api/proxy/buildplane/$(planeA)/$(namespace)/a/k8s/api/v1/namespaces/$(namespace)-a";
const PATH_B: &str =
    "/api/proxy/buildplane/$(planeB)/$(namespace)/b/k8s/api/v1/namespaces/$(namespace)-b";

fn buildplane(name: &str, plane: &str, ca: Value) -> Value {
    json!({"apiVersion": "openchoreo.dev/v1alpha1", "kind": "BuildPlane",
        "metadata": {"name": name, "namespace": "$(namespace)"},
        "spec": {"planeID": plane, "clusterAgent": {"clientCA": ca}}})
}

fn buildplane_a() -> Value {
    buildplane(
        "a",
        "$(planeA)",
        json!({"secretRef": {"name": "ca-a", "key": "ca.crt"}}),
    )
}

fn ca_secret(ca: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "ca-a", "namespace": "$(namespace)"},
        "stringData": {"ca.crt": ca}})
}

fn inject(fault: &Fault) -> Vec<Value> {
    match fault {
        Fault::KillAgent { .. } => vec![json!({"kill": {"component": "agent", "name": "a"}})],
        Fault::RestartAgent => vec![json!({"restart": {"component": "agent", "name": "a"}})],
        Fault::Link { link, .. } => {
            let fault = match link {
                LinkFault::Latency { ms, jitter_ms } => {
                    json!({"link": "a", "latency": format!("{ms}ms"), "jitter": format!("{jitter_ms}ms")})
                }
                LinkFault::Bandwidth { kbps } => json!({"link": "a", "bandwidthKbps": kbps}),
                LinkFault::Blackhole => json!({"link": "a", "blackhole": true}),
                LinkFault::Reset => json!({"link": "a", "reset": true}),
                LinkFault::Slicer { size, delay_ms } => {
                    json!({"link": "a", "slicer": {"size": size, "delay": format!("{delay_ms}ms")}})
                }
                LinkFault::Partition => json!({"link": "a", "partition": true}),
            };
            vec![json!({ "fault": fault })]
        }
        Fault::RecreateBuildPlane { .. } => vec![
            json!({"delete": {"object": buildplane_a()}}),
            json!({"request": {"path": PATH_A, "eventually": true, "timeout": "5s",
                "expect": {"statusIn": [403, 503]}}}),
        ],
        Fault::EditCaSecret { .. } => vec![
            json!({"apply": {"object": ca_secret("$(otherCa)")}}),
            json!({"request": {"path": PATH_A, "eventually": true, "timeout": "5s",
                "expect": {"statusIn": [403, 503]}}}),
        ],
        Fault::KillGateway { .. } => vec![json!({"kill": {"component": "gateway"}})],
        Fault::RestartGateway => vec![json!({"restart": {"component": "gateway"}})],
        Fault::KillController { .. } => vec![json!({"kill": {"component": "controller"}})],
        Fault::StopControlApiServer { .. } => {
            vec![json!({"stop": {"component": "apiserver", "cluster": "control"}})]
        }
        Fault::StopBuildApiServer { .. } => {
            vec![json!({"stop": {"component": "apiserver", "cluster": "build"}})]
        }
    }
}

fn recover(fault: &Fault) -> Vec<Value> {
    match fault {
        Fault::KillAgent { .. } => vec![json!({"start": {"component": "agent", "name": "a"}})],
        Fault::Link { .. } => vec![json!({"heal": {"link": "a"}})],
        Fault::RecreateBuildPlane { .. } => vec![json!({"apply": {"object": buildplane_a()}})],
        Fault::EditCaSecret { .. } => vec![json!({"apply": {"object": ca_secret("$(caA)")}})],
        Fault::KillGateway { .. } => vec![json!({"start": {"component": "gateway"}})],
        Fault::KillController { .. } => vec![json!({"start": {"component": "controller"}})],
        Fault::StopControlApiServer { .. } => {
            vec![json!({"start": {"component": "apiserver", "cluster": "control"}})]
        }
        Fault::StopBuildApiServer { .. } => {
            vec![json!({"start": {"component": "apiserver", "cluster": "build"}})]
        }
        Fault::RestartAgent | Fault::RestartGateway => Vec::new(),
    }
}

/// The scenario of a schedule, as YAML. `finding` (the violation, the schedule's original
/// length and the shrink trials) goes into the description of a shrunk file.
pub fn scenario_yaml(
    name: &str,
    events: &[FaultEvent],
    options: &ChaosOptions,
    finding: Option<(&Violation, usize, usize)>,
) -> String {
    let shared = events.iter().any(|e| e.fault.shared_data_path());
    let mut description = format!(
        "Generated by `cargo xtask chaos --seed {} --duration {}s`: two tenants (agents a and b, \
         BuildPlanes a and b) under steady load while tenant A and the shared components take \
         the faults below; afterwards both BuildPlanes converge and nothing leaks.\n",
        options.seed,
        options.duration.as_secs()
    );
    for event in events {
        description.push_str(&format!(
            "- at {} ms: {}\n",
            event.at.as_millis(),
            event.fault.describe()
        ));
    }
    match finding {
        Some((violation, original, trials)) => description.push_str(&format!(
            "Seen to fail: invariant `{}` ({}): {}. Shrunk from {original} faults in {trials} trials.\n",
            violation.invariant.as_str(),
            violation.invariant.promise(),
            violation.detail
        )),
        None => description.push_str(
            "Seen to fail: the chaos self-test runs it against a gateway built to skip revocation.\n",
        ),
    }
    let load = |name: &str, path: &str, strict: bool| {
        json!({"load": {"background": name, "paths": [path], "rate": options.rate, "concurrency": 4,
            "expect": {"maxErrorRate": if strict { 0.0 } else { 1.0 }, "minRequests": 5,
                "maxFailureLatency": format!("{}s", FAIL_FAST.as_secs())}}})
    };
    let connected = |name: &str| {
        json!({"assert": {"timeout": "60s", "object": {"apiVersion": "openchoreo.dev/v1alpha1",
            "kind": "BuildPlane", "metadata": {"name": name, "namespace": "$(namespace)"},
            "status": {"agentConnection": {"connected": true, "connectedAgents": 1}}}}})
    };
    let routes = |path: &str| json!({"request": {"path": path, "eventually": true, "timeout": "60s", "expect": {"status": 200}}});
    let agent_ca = |agent: &str, output: &str| {
        json!({"kubectl": {"cluster": "build",
            "args": format!("get secret cluster-agent-tls -n $(namespace)-{agent} -o jsonpath={{.data.ca\\.crt}}"),
            "output": output, "outputFormat": "base64"}})
    };
    let identity = |agent: &str| {
        json!({"assert": {"cluster": "build", "object": {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "cluster-agent-tls", "namespace": format!("$(namespace)-{agent}")},
            "data": {"ca.crt": "(exists)"}}}})
    };
    let schedule: Vec<Value> = plan(events).into_iter().flat_map(|p| p.ops).collect();
    let mut steps = vec![
        json!({"name": "two tenants", "try": [
            {"start": {"component": "agent", "name": "a", "planeID": "$(planeA)", "identityNamespace": "$(namespace)-a"}},
            {"start": {"component": "agent", "name": "b", "planeID": "$(planeB)", "identityNamespace": "$(namespace)-b"}},
            identity("a"), identity("b"),
            agent_ca("a", "caA"), agent_ca("b", "caB"),
            {"generateCa": {"commonName": "not-agent-a", "output": "otherCa"}},
            {"apply": {"object": ca_secret("$(caA)")}},
            {"apply": {"object": buildplane_a()}},
            {"apply": {"object": buildplane("b", "$(planeB)", json!({"value": "$(caB)"}))}},
            connected("a"), connected("b"), routes(PATH_A), routes(PATH_B),
        ]}),
        json!({"name": "steady load", "try": [
            load("tenant-a", PATH_A, false),
            load("tenant-b", PATH_B, !shared),
        ]}),
    ];
    if !schedule.is_empty() {
        steps.push(json!({"name": "fault schedule", "try": schedule}));
    }
    steps.extend([
        json!({"name": "heal", "try": [
            {"heal": {"link": "a"}},
            {"sleep": {"duration": "1s"}},
            {"await": {"name": "tenant-a", "timeout": "60s"}},
            {"await": {"name": "tenant-b", "timeout": "60s"}},
        ]}),
        json!({"name": "status converges", "try": [connected("a"), connected("b"), routes(PATH_A), routes(PATH_B)]}),
        json!({"name": "nothing leaked", "try": [
            {"metric": {"description": "no proxied request pending at the gateway", "component": "gateway",
                "name": "cluster_gateway_pending_requests", "value": "== 0", "timeout": "15s"}},
            {"metric": {"description": "agent a holds one connection", "component": "gateway",
                "name": "cluster_gateway_connections", "labels": {"plane_id": "$(planeA)"}, "value": "== 1", "timeout": "15s"}},
            {"metric": {"description": "agent b holds one connection", "component": "gateway",
                "name": "cluster_gateway_connections", "labels": {"plane_id": "$(planeB)"}, "value": "== 1", "timeout": "15s"}},
        ]}),
    ]);
    let needs_api = events.iter().any(|e| {
        matches!(
            e.fault,
            Fault::StopControlApiServer { .. } | Fault::StopBuildApiServer { .. }
        )
    });
    let mut requires = vec!["linkFaults"];
    if needs_api {
        requires.push("apiServerLifecycle");
    }
    let scenario = json!({
        "name": name,
        "description": description,
        "labels": ["chaos", "faults"],
        "requires": requires,
        "componentArgs": {"gateway": ["--heartbeat-interval", "1s", "--heartbeat-timeout", "3s"]},
        "bindings": {"planeA": "$(planeID)-a", "planeB": "$(planeID)-b"},
        "steps": steps,
    });
    let yaml = serde_yaml::to_string(&scenario).unwrap_or_default();
    format!("# yaml-language-server: $schema=scenario.schema.json\n{yaml}")
}

/// The file a chaos run's report goes to.
pub fn report_path(out_dir: &Path, seed: u64) -> PathBuf {
    out_dir.join(format!("chaos-{seed}.json"))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::result::{LoadReport, LoadSample, OpResult, StepResult};

    fn options() -> ChaosOptions {
        ChaosOptions {
            seed: 7,
            duration: Duration::from_secs(40),
            mix: schedule::Mix::default(),
            shrink: true,
            max_trials: 10,
            out_dir: PathBuf::from("target/chaos"),
            rate: 10.0,
        }
    }

    /// Every seed's schedule renders to a scenario the parser and linter accept, with one
    /// operation in the `fault schedule` step per planned operation.
    #[test]
    fn every_schedule_renders_to_a_valid_scenario() {
        for seed in 0..100 {
            let events = schedule::generate(seed, Duration::from_secs(40), Default::default());
            let text = scenario_yaml("chaos-7", &events, &options(), None);
            let scenario = crate::lint::parse(Path::new("chaos-7.yaml"), &text)
                .unwrap_or_else(|e| panic!("seed {seed}: {e:?}\n{text}"));
            let step = scenario
                .steps
                .iter()
                .find(|s| s.name == "fault schedule")
                .expect("schedule step");
            let planned: usize = plan(&events).iter().map(|p| p.ops.len()).sum();
            assert_eq!(step.try_.len(), planned, "seed {seed}");
            let last = plan(&events).last().map(|p| p.last_op);
            assert_eq!(last, Some(planned - 1), "seed {seed}");
        }
    }

    fn sample(t: f64, latency_ms: f64, ok: bool) -> LoadSample {
        LoadSample { t, latency_ms, ok }
    }

    fn op(at: f64, secs: f64) -> OpResult {
        OpResult {
            phase: "try",
            kind: "op".into(),
            summary: String::new(),
            at,
            status: Status::Passed,
            duration: Duration::from_secs_f64(secs),
            failure: None,
        }
    }

    fn result(loads: Vec<LoadReport>, schedule_ops: Vec<OpResult>) -> ScenarioResult {
        ScenarioResult {
            name: "chaos-7".into(),
            attempt: 0,
            labels: vec![],
            status: Status::Passed,
            duration: Duration::from_secs(60),
            failure: None,
            steps: vec![StepResult {
                name: "fault schedule".into(),
                status: Status::Passed,
                duration: Duration::from_secs(10),
                operations: schedule_ops,
            }],
            cleanup_error: None,
            evidence: None,
            series: vec![],
            loads,
            kept: None,
            skipped: None,
        }
    }

    fn load(name: &str, samples: Vec<LoadSample>) -> LoadReport {
        LoadReport {
            name: name.into(),
            samples,
            ..LoadReport::default()
        }
    }

    /// Tenant B's failures count against isolation only outside shared faults; a slow failure
    /// breaks fail-fast; a tenant A success inside a revocation breaks revocation.
    #[test]
    fn invariants_are_read_from_samples_against_fault_windows() {
        // A gateway kill at 1 s (sleep op 0, kill op 1), started again at 3 s (sleep 2, start 3).
        let gateway = vec![FaultEvent {
            at: Duration::from_secs(1),
            fault: Fault::KillGateway {
                down: Duration::from_secs(2),
            },
        }];
        let ops = vec![op(10.0, 1.0), op(11.0, 0.1), op(11.1, 1.9), op(13.0, 0.5)];
        let during = result(
            vec![load("tenant-b", vec![sample(12.0, 20.0, false)])],
            ops.clone(),
        );
        assert_eq!(violations(&during, &gateway), Ok(vec![]));
        let long_after = result(
            vec![load("tenant-b", vec![sample(40.0, 20.0, false)])],
            ops.clone(),
        );
        assert_eq!(
            violations(&long_after, &gateway).expect("judged")[0].invariant,
            Invariant::Isolation
        );
        let hanging = result(
            vec![load("tenant-a", vec![sample(12.0, 30_000.0, false)])],
            ops,
        );
        assert_eq!(
            violations(&hanging, &gateway).expect("judged")[0].invariant,
            Invariant::FailFast
        );
        // The CA Secret replaced at 1 s (sleep 0, apply 1, request 2), restored at 4 s.
        let edit = vec![FaultEvent {
            at: Duration::from_secs(1),
            fault: Fault::EditCaSecret {
                hold: Duration::from_secs(3),
            },
        }];
        let ops = vec![
            op(10.0, 1.0),
            op(11.0, 0.1),
            op(11.1, 0.5),
            op(11.6, 2.4),
            op(14.0, 0.1),
        ];
        let served = result(
            vec![load("tenant-a", vec![sample(12.5, 5.0, true)])],
            ops.clone(),
        );
        assert_eq!(
            violations(&served, &edit).expect("judged")[0].invariant,
            Invariant::Revocation
        );
        let before = result(vec![load("tenant-a", vec![sample(11.05, 5.0, true)])], ops);
        assert_eq!(violations(&before, &edit), Ok(vec![]), "inside the grace");
    }

    /// A failed step names its invariant; a failed set-up judges nothing.
    #[test]
    fn failed_steps_map_to_invariants() {
        let failed = |message: &str| {
            let mut r = result(vec![], vec![]);
            r.status = Status::Failed;
            r.failure = Some(crate::result::Failure::msg(message));
            violations(&r, &[])
        };
        let invariant = |message: &str| failed(message).expect("judged")[0].invariant;
        assert_eq!(
            invariant("step `status converges`, assert x: timed out"),
            Invariant::Convergence
        );
        assert_eq!(
            invariant("step `nothing leaked`, metric y: == 0"),
            Invariant::Leak
        );
        assert_eq!(
            invariant("a component panicked: gateway: thread panicked at"),
            Invariant::NoPanic
        );
        assert_eq!(
            invariant("step `fault schedule`, request GET /api: status 200"),
            Invariant::Revocation
        );
        assert_eq!(
            invariant("step `fault schedule`, start gateway: exited"),
            Invariant::Recovery
        );
        assert!(failed("step `two tenants`, start agent a: exited").is_err());
    }

    /// Packing keeps the order and the spans and never starts a fault later than before.
    #[test]
    fn packing_moves_faults_earlier_only() {
        let events = schedule::generate(3, Duration::from_secs(60), Default::default());
        let packed = pack(&events);
        assert_eq!(packed.len(), events.len());
        for (a, b) in events.iter().zip(&packed) {
            assert!(b.at <= a.at);
            assert_eq!(a.fault, b.fault);
        }
    }
}
