//! Results of a run: per scenario, step and operation, with failures, evidence and series.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// Outcome of one unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// It passed.
    Passed,
    /// It failed.
    Failed,
    /// It did not run because something before it failed.
    Skipped,
}

/// Why something failed, in the terms a reader needs: what was awaited, what was seen last.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Failure {
    /// One-line summary.
    pub message: String,
    /// What the operation waited for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub awaited: Option<String>,
    /// The last state observed (YAML or text).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    /// Expected → actual diff.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diff: Option<String>,
}

impl Failure {
    /// A failure with only a message.
    pub fn msg(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            ..Failure::default()
        }
    }

    /// The failure as indented text for the terminal.
    pub fn render(&self) -> String {
        let mut out = self.message.clone();
        if let Some(awaited) = &self.awaited {
            out.push_str(&format!("\n  awaited: {awaited}"));
        }
        if let Some(last) = &self.last_seen {
            out.push_str("\n  last seen:\n");
            out.push_str(&indent(last, 4));
        }
        if let Some(diff) = &self.diff {
            out.push_str("\n  diff (- expected, + actual):\n");
            out.push_str(&indent(diff, 4));
        }
        out
    }
}

/// Indents every line of `text`.
pub fn indent(text: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    text.lines()
        .map(|line| format!("{pad}{line}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One operation's result.
#[derive(Clone, Debug, Serialize)]
pub struct OpResult {
    /// `try`, `catch` or `finally`.
    pub phase: &'static str,
    /// The operation key (`apply`, `assert`, ...).
    pub kind: String,
    /// A one-line summary of what it did.
    pub summary: String,
    /// When it started, in seconds since the scenario's first step (the time axis of series and
    /// load samples).
    pub at: f64,
    /// Outcome.
    pub status: Status,
    /// How long it took.
    #[serde(with = "secs")]
    pub duration: Duration,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
}

/// One step's result.
#[derive(Clone, Debug, Serialize)]
pub struct StepResult {
    /// Step name.
    pub name: String,
    /// Outcome.
    pub status: Status,
    /// How long it took.
    #[serde(with = "secs")]
    pub duration: Duration,
    /// The operations run.
    pub operations: Vec<OpResult>,
}

/// A sampled series (time in seconds since the scenario started).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Series {
    /// Name.
    pub name: String,
    /// `(t, value)` samples.
    pub points: Vec<(f64, f64)>,
}

/// One request of a load run.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct LoadSample {
    /// Seconds since the scenario started.
    pub t: f64,
    /// Latency in milliseconds.
    pub latency_ms: f64,
    /// Whether it counted as a success.
    pub ok: bool,
}

/// A load run's samples and summary.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LoadReport {
    /// The background name or `load`.
    pub name: String,
    /// Every request.
    pub samples: Vec<LoadSample>,
    /// Requests sent.
    pub total: u64,
    /// Requests that failed.
    pub failed: u64,
    /// Latency percentiles in ms.
    pub p50_ms: f64,
    /// See `p50_ms`.
    pub p90_ms: f64,
    /// See `p50_ms`.
    pub p99_ms: f64,
    /// Failure messages by kind (status code or error), with counts.
    pub errors: BTreeMap<String, u64>,
    /// Where the requests came from.
    pub generator: crate::load::Generator,
}

/// Evidence collected when a scenario fails.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Evidence {
    /// Tails of component logs.
    pub logs: BTreeMap<String, String>,
    /// The gateway's connection table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<String>,
    /// Kubernetes events of the scenario's namespaces.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<String>,
    /// Current state of the objects the scenario created.
    pub objects: BTreeMap<String, String>,
}

/// One scenario's result.
#[derive(Clone, Debug, Serialize)]
pub struct ScenarioResult {
    /// Scenario name.
    pub name: String,
    /// Repetition (0-based) when `--repeat` is used.
    pub attempt: u32,
    /// Labels from the file.
    pub labels: Vec<String>,
    /// Overall outcome (a failed cleanup fails the scenario).
    pub status: Status,
    /// Wall time.
    #[serde(with = "secs")]
    pub duration: Duration,
    /// The first failure, for summaries.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    /// Steps.
    pub steps: Vec<StepResult>,
    /// Cleanup problems.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cleanup_error: Option<String>,
    /// Evidence (on failure).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evidence: Option<Evidence>,
    /// Recorded series.
    pub series: Vec<Series>,
    /// Load runs.
    pub loads: Vec<LoadReport>,
    /// Where the environment's files were kept, if kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept: Option<String>,
    /// Why it was skipped (status `skipped`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

/// The whole run.
#[derive(Clone, Debug, Serialize)]
pub struct SuiteResult {
    /// Backend name.
    pub backend: String,
    /// Profile name.
    pub profile: String,
    /// Start time (RFC 3339).
    pub started: String,
    /// Wall time.
    #[serde(with = "secs")]
    pub duration: Duration,
    /// Scenario results in completion order.
    pub scenarios: Vec<ScenarioResult>,
}

impl SuiteResult {
    /// Number of passed scenarios.
    pub fn passed(&self) -> usize {
        self.scenarios
            .iter()
            .filter(|s| s.status == Status::Passed)
            .count()
    }

    /// Number of failed scenarios.
    pub fn failed(&self) -> usize {
        self.scenarios
            .iter()
            .filter(|s| s.status == Status::Failed)
            .count()
    }

    /// Scenarios skipped (each with its reason).
    pub fn skipped(&self) -> usize {
        self.scenarios
            .iter()
            .filter(|s| s.status == Status::Skipped)
            .count()
    }
}

mod secs {
    use std::time::Duration;

    use serde::Serializer;

    pub(super) fn serialize<S: Serializer>(
        duration: &Duration,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64((duration.as_secs_f64() * 1000.0).round() / 1000.0)
    }
}
