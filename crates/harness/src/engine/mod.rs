//! The engine: runs one scenario's steps and operations against an environment.
//!
//! This module holds the [`Engine`], the step runner and the dispatch of operations; each
//! family of operations lives in its own module, with its execution and its lint rules
//! (methods of `crate::lint::Linter` that `lint.rs` dispatches to):
//!
//! | module | operations |
//! |---|---|
//! | `objects` | `apply`, `create`, `patch`, `delete`, `assert`, `error`, `kubectl`, `exec`, `script` |
//! | `components` | `start`, `stop`, `kill`, `restart`, `fault`, `heal`, `partition`, `rotateCa`, `renewLeaf`, `generateCa` |
//! | `http` | `request`, `load`, `await` |
//! | `watches` | `watch`, `record`, `checkSeries`, `metric`, `consistently` |
//! | `evidence` | evidence of a failed scenario, `finish` and cleanup |
//!
//! Adding an operation: its type and key in `scenario.rs`, its execution and lint rule in its
//! family's module, one arm in [`Engine::run_op`] and one in `Linter::operation`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backend::Environment;
use crate::bindings::Bindings;
use crate::duration::Dur;
use crate::kube_ops::{Kube, ObjectRef};
use crate::result::{Failure, LoadReport, OpResult, Status, StepResult};
use crate::scenario::{Args, ClusterName, Count, Operation, Step, Timeouts};

mod components;
mod evidence;
mod http;
mod objects;
mod watches;

use objects::ApplyMode;
pub use watches::{count_connections, max_rise_per_second, prometheus_sum};

/// Poll interval of eventual checks.
const POLL: Duration = Duration::from_millis(100);
/// Objects applied at once by `forEach`/`count`.
const APPLY_CONCURRENCY: usize = 16;

type OpResultT = Result<(), Failure>;

/// Samples of a recorded series, shared with its sampler task.
type SeriesPoints = Arc<Mutex<Vec<(f64, f64)>>>;

/// A background operation.
struct Background {
    handle: JoinHandle<OpResultT>,
    stop: Option<tokio::sync::watch::Sender<bool>>,
}

/// An object the scenario created, deleted at cleanup.
#[derive(Clone, Debug)]
struct Created {
    cluster: ClusterName,
    reference: ObjectRef,
}

/// One scenario's running state.
pub struct Engine {
    env: Arc<dyn Environment>,
    kube: tokio::sync::Mutex<BTreeMap<ClusterName, Arc<Kube>>>,
    /// Bindings in scope.
    pub bindings: Bindings,
    scenario_dir: PathBuf,
    created: Vec<Created>,
    namespaces: BTreeSet<(ClusterName, String)>,
    /// Namespaces known to exist that the scenario did not create.
    existing_namespaces: BTreeSet<(ClusterName, String)>,
    backgrounds: HashMap<String, Background>,
    series: BTreeMap<String, SeriesPoints>,
    samplers: Vec<JoinHandle<()>>,
    loads: Arc<Mutex<Vec<LoadReport>>>,
    agents: BTreeMap<String, String>,
    started: Instant,
    /// Called with a line of progress.
    progress: Arc<dyn Fn(String) + Send + Sync>,
}

fn fail(message: impl Into<String>) -> Failure {
    Failure::msg(message)
}

fn yaml(value: &Value) -> String {
    serde_yaml::to_string(value).unwrap_or_else(|_| value.to_string())
}

impl Engine {
    /// A new engine for one scenario.
    pub fn new(
        env: Arc<dyn Environment>,
        bindings: Bindings,
        scenario_dir: PathBuf,
        progress: Arc<dyn Fn(String) + Send + Sync>,
    ) -> Engine {
        Engine {
            env,
            kube: tokio::sync::Mutex::new(BTreeMap::new()),
            bindings,
            scenario_dir,
            created: Vec::new(),
            namespaces: BTreeSet::new(),
            existing_namespaces: BTreeSet::new(),
            backgrounds: HashMap::new(),
            series: BTreeMap::new(),
            samplers: Vec::new(),
            loads: Arc::new(Mutex::new(Vec::new())),
            agents: BTreeMap::new(),
            started: Instant::now(),
            progress,
        }
    }

    async fn kube(&self, cluster: ClusterName) -> Result<Arc<Kube>, Failure> {
        let mut clients = self.kube.lock().await;
        if let Some(kube) = clients.get(&cluster) {
            return Ok(kube.clone());
        }
        let kube = Arc::new(
            crate::kube_ops::client(&self.env.cluster(cluster))
                .await
                .map_err(|e| {
                    fail(format!(
                        "connecting to the {} cluster: {e}",
                        cluster.as_str()
                    ))
                })?,
        );
        clients.insert(cluster, kube.clone());
        Ok(kube)
    }

    fn sub(&self, value: &Value) -> Result<Value, Failure> {
        self.bindings
            .substitute(value)
            .map_err(|e| fail(e.to_string()))
    }

    fn text(&self, text: &str) -> Result<String, Failure> {
        self.bindings
            .interpolate(text)
            .map_err(|e| fail(e.to_string()))
    }

    fn count(&self, count: &Count) -> Result<u64, Failure> {
        match count {
            Count::Literal(n) => Ok(*n),
            Count::Bound(text) => {
                let value = self
                    .bindings
                    .substitute_str(text)
                    .map_err(|e| fail(e.to_string()))?;
                match &value {
                    Value::Number(n) => n.as_u64(),
                    Value::String(s) => s.trim().parse().ok(),
                    _ => None,
                }
                .ok_or_else(|| fail(format!("`{text}` is `{value}`, not a count")))
            }
        }
    }

    /// Creates the namespace (in a cluster) if missing and remembers it for cleanup.
    pub async fn ensure_namespace(
        &mut self,
        cluster: ClusterName,
        namespace: &str,
    ) -> Result<(), Failure> {
        let key = (cluster, namespace.to_string());
        if self.namespaces.contains(&key) || self.existing_namespaces.contains(&key) {
            return Ok(());
        }
        let kube = self.kube(cluster).await?;
        let object =
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}});
        match kube.create(&object).await {
            Ok(_) => {
                self.namespaces.insert((cluster, namespace.to_string()));
                Ok(())
            }
            Err(err) if err.code() == Some(409) => {
                self.existing_namespaces.insert(key);
                Ok(())
            }
            Err(err) => Err(fail(format!(
                "creating namespace {namespace} in the {} cluster: {err}",
                cluster.as_str()
            ))),
        }
    }

    /// A one-line summary of an operation for progress and reports.
    pub fn summary(&self, op: &Operation) -> String {
        let summary = self.raw_summary(op);
        self.text(&summary).unwrap_or(summary)
    }

    fn raw_summary(&self, op: &Operation) -> String {
        if let Some(description) = op.description() {
            return description.to_string();
        }
        let object = |o: &Option<Value>, f: &Option<String>| match (o, f) {
            (Some(o), _) => {
                let reference = ObjectRef::of(o).map(|r| r.to_string()).unwrap_or_default();
                self.text(&reference).unwrap_or(reference)
            }
            (None, Some(f)) => f.clone(),
            _ => String::new(),
        };
        match op {
            Operation::Apply(o) | Operation::Create(o) | Operation::Patch(o) => {
                format!("{} {}", o.cluster.as_str(), object(&o.object, &o.file))
            }
            Operation::Assert(o) | Operation::Error(o) => {
                format!("{} {}", o.cluster.as_str(), object(&o.object, &o.file))
            }
            Operation::Kubectl(o) => match &o.args {
                Args::Line(line) => format!("kubectl {line}"),
                Args::List(list) => format!("kubectl {}", list.join(" ")),
            },
            Operation::Script(o) => first_line(&o.content).to_string(),
            Operation::Exec(o) => o.command.join(" "),
            Operation::GenerateCa(o) => o.common_name.clone(),
            Operation::Start(o)
            | Operation::Stop(o)
            | Operation::Kill(o)
            | Operation::Restart(o) => Self::target(o).map(|t| t.to_string()).unwrap_or_default(),
            Operation::Fault(o) => format!("link {}", o.link),
            Operation::Heal(o) => match (&o.link, o.component, &o.name) {
                (Some(link), ..) => format!("link {link}"),
                (None, Some(component), Some(name)) => format!("{} {name}", component.as_str()),
                _ => String::new(),
            },
            Operation::Partition(o) => format!(
                "{} {} from {}",
                o.component.as_str(),
                o.name,
                o.from.as_str()
            ),
            Operation::Request(o) => format!("{} {}", o.method.as_deref().unwrap_or("GET"), o.path),
            Operation::Load(o) => format!("{} req/s on {}", o.rate, o.paths.join(", ")),
            Operation::Await(o) => o.name.clone(),
            Operation::Watch(o) => o.path.clone(),
            Operation::Metric(o) => format!("{} {} {}", o.component.as_str(), o.name, o.value),
            Operation::Record(o) => o.name.clone(),
            Operation::CheckSeries(o) => o.name.clone(),
            Operation::RotateCa(o) => format!(
                "agent {}{}",
                o.agent,
                if o.finish { " --finish" } else { "" }
            ),
            Operation::RenewLeaf(o) => format!("agent {}", o.agent),
            Operation::Sleep(o) => o.duration.to_string(),
            Operation::Delete(o) => object(&o.object, &o.file),
            Operation::Consistently(o) => format!("for {}", o.for_),
        }
    }

    /// Runs one operation (each family's module has its execution).
    pub async fn run_op(&mut self, op: &Operation, timeouts: &Timeouts) -> OpResultT {
        let timeout: Duration = op
            .own_timeout()
            .or_else(|| timeouts.get(op.timeout_kind()))
            .unwrap_or(Dur::secs(30))
            .into();
        match op {
            // objects.rs
            Operation::Apply(o) => self.apply(o, ApplyMode::Apply, timeout).await,
            Operation::Create(o) => self.apply(o, ApplyMode::Create, timeout).await,
            Operation::Patch(o) => self.apply(o, ApplyMode::Patch, timeout).await,
            Operation::Assert(o) => self.assert(o, timeout, false).await,
            Operation::Error(o) => self.assert(o, timeout, true).await,
            Operation::Delete(o) => self.delete_op(o, timeout).await,
            Operation::Exec(o) => self.exec(o, timeout).await,
            Operation::Kubectl(o) => self.kubectl(o, timeout).await,
            Operation::Script(o) => self.script(o, timeout).await,
            // components.rs
            Operation::Start(o) => self.component(o, "start").await,
            Operation::Stop(o) => self.component(o, "stop").await,
            Operation::Kill(o) => self.component(o, "kill").await,
            Operation::Restart(o) => self.component(o, "restart").await,
            Operation::Fault(o) => self.fault(o).await,
            Operation::Heal(o) => self.heal(o).await,
            Operation::Partition(o) => self.partition(o),
            Operation::GenerateCa(o) => self.generate_ca(o),
            Operation::RotateCa(o) => self.rotate_ca(o).await,
            Operation::RenewLeaf(o) => {
                self.agent_command(&o.agent, vec!["renew".into()], &None)
                    .await
            }
            // http.rs
            Operation::Request(o) => self.request(o, timeout).await,
            Operation::Load(o) => self.load(o).await,
            Operation::Await(o) => self.await_background(&o.name, timeout).await,
            // watches.rs
            Operation::Watch(o) => self.watch(o, timeout).await,
            Operation::Record(o) => self.record(o),
            Operation::CheckSeries(o) => self.check_series_within(o).await,
            Operation::Metric(o) => self.metric(o, timeout).await,
            Operation::Consistently(o) => self.consistently(o, timeouts).await,
            Operation::Sleep(o) => {
                tokio::time::sleep(o.duration.into()).await;
                Ok(())
            }
        }
    }

    /// Runs a step: `try` until the first failure, then `catch` (on failure) and `finally`.
    pub async fn run_step(&mut self, step: &Step, timeouts: &Timeouts) -> StepResult {
        let started = Instant::now();
        for (name, value) in &step.bindings {
            match self.sub(value) {
                Ok(value) => self.bindings.set(name.clone(), value),
                Err(failure) => return self.bindings_failed(step, name, started, failure),
            }
        }
        let timeouts = step.timeouts.inherit(timeouts);
        let mut operations = Vec::new();
        let mut failed = false;
        for op in &step.try_ {
            if failed {
                operations.push(self.skipped("try", op));
                continue;
            }
            let result = self.timed("try", op, &timeouts).await;
            failed = result.status == Status::Failed;
            operations.push(result);
        }
        if failed {
            for op in &step.catch {
                operations.push(self.timed("catch", op, &timeouts).await);
            }
        }
        for op in &step.finally {
            operations.push(self.timed("finally", op, &timeouts).await);
        }
        let status = if operations.iter().any(|o| o.status == Status::Failed) {
            Status::Failed
        } else {
            Status::Passed
        };
        StepResult {
            name: step.name.clone(),
            status,
            duration: started.elapsed(),
            operations,
        }
    }

    /// The result of a step whose binding `name` could not be substituted.
    fn bindings_failed(
        &self,
        step: &Step,
        name: &str,
        started: Instant,
        failure: Failure,
    ) -> StepResult {
        StepResult {
            name: step.name.clone(),
            status: Status::Failed,
            duration: started.elapsed(),
            operations: vec![OpResult {
                phase: "bindings",
                kind: "bindings".into(),
                summary: name.to_string(),
                at: self.started.elapsed().as_secs_f64(),
                status: Status::Failed,
                duration: Duration::ZERO,
                failure: Some(failure),
            }],
        }
    }

    fn skipped(&self, phase: &'static str, op: &Operation) -> OpResult {
        OpResult {
            phase,
            kind: op.kind().into(),
            summary: self.summary(op),
            at: self.started.elapsed().as_secs_f64(),
            status: Status::Skipped,
            duration: Duration::ZERO,
            failure: None,
        }
    }

    async fn timed(
        &mut self,
        phase: &'static str,
        op: &Operation,
        timeouts: &Timeouts,
    ) -> OpResult {
        let summary = self.summary(op);
        (self.progress)(format!("  {} {summary}", op.kind()));
        let started = Instant::now();
        let at = self.started.elapsed().as_secs_f64();
        let res = self.run_op(op, timeouts).await;
        let res = if op.continue_on_error() { Ok(()) } else { res };
        OpResult {
            phase,
            kind: op.kind().into(),
            summary,
            at,
            status: if res.is_ok() {
                Status::Passed
            } else {
                Status::Failed
            },
            duration: started.elapsed(),
            failure: res.err(),
        }
    }
}

fn first_line(text: &str) -> &str {
    text.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
}

fn tail_text(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn truncate(text: &str, n: usize) -> &str {
    &text[..crate::duration::char_floor(text, n)]
}

/// Splits a command line on whitespace, keeping quoted parts together (quotes removed).
pub fn split_args(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => current.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                any = true;
            }
            (None, c) if c.is_whitespace() => {
                if any || !current.is_empty() {
                    out.push(std::mem::take(&mut current));
                    any = false;
                }
            }
            (None, c) => current.push(c),
        }
    }
    if any || !current.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Quoted arguments stay together, quotes are removed (like a shell).
    #[test]
    fn splits_arguments_like_a_shell() {
        assert_eq!(
            split_args(r#"get secret x -o jsonpath='{.data.ca\.crt}' "a b""#),
            vec![
                "get",
                "secret",
                "x",
                "-o",
                r"jsonpath={.data.ca\.crt}",
                "a b"
            ]
        );
    }
}
