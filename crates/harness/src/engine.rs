//! The engine: runs one scenario's steps and operations against an environment.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backend::{AgentSpec, ComponentTarget, Environment, GatewayAccess, StopMode, SwarmSpec};
use crate::bindings::Bindings;
use crate::duration::Dur;
use crate::kube_ops::{Kube, KubeError, ObjectRef};
use crate::matcher;
use crate::proxy::Toxics;
use crate::result::{
    Evidence, Failure, LoadReport, LoadSample, OpResult, Series, Status, StepResult,
};
use crate::scenario::{
    ApplyOp, Args, AssertOp, ClusterName, CommandExpect, ComponentKind, ComponentOp, Count,
    FaultOp, LoadOp, MetricOp, Operation, OutputFormat, RecordSource, RequestOp, Step, TimeoutKind,
    Timeouts, WatchOp,
};

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

/// Which kind of apply.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ApplyMode {
    Apply,
    Create,
    Patch,
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

    /// Objects of an apply/assert, with bindings substituted.
    fn load_objects(
        &self,
        object: &Option<Value>,
        file: &Option<String>,
        bindings: &Bindings,
    ) -> Result<Vec<Value>, Failure> {
        let raw = match (object, file) {
            (Some(object), _) => vec![object.clone()],
            (None, Some(file)) => {
                let path = self.scenario_dir.join(self.text(file)?);
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| fail(format!("reading {}: {e}", path.display())))?;
                let mut docs = Vec::new();
                for doc in serde_yaml::Deserializer::from_str(&text) {
                    let value = serde_json::to_value(
                        serde::Deserialize::deserialize(doc)
                            .map(|v: serde_yaml::Value| v)
                            .map_err(|e| fail(format!("{}: {e}", path.display())))?,
                    )
                    .map_err(|e| fail(format!("{}: {e}", path.display())))?;
                    if !value.is_null() {
                        docs.push(value);
                    }
                }
                docs
            }
            (None, None) => return Err(fail("no object given")),
        };
        raw.iter()
            .map(|v| bindings.substitute(v).map_err(|e| fail(e.to_string())))
            .collect()
    }

    async fn apply(&mut self, op: &ApplyOp, mode: ApplyMode, timeout: Duration) -> OpResultT {
        let mut expanded: Vec<Value> = Vec::new();
        if let Some(for_each) = &op.for_each {
            let list = self
                .bindings
                .substitute_str(for_each)
                .map_err(|e| fail(e.to_string()))?;
            let Value::Array(items) = list else {
                return Err(fail(format!("forEach `{for_each}` is not a list")));
            };
            for (index, item) in items.into_iter().enumerate() {
                let mut bindings = self.bindings.clone();
                bindings.set("item", item);
                bindings.set("index", json!(index));
                expanded.extend(self.load_objects(&op.object, &op.file, &bindings)?);
            }
        } else if let Some(count) = &op.count {
            for index in 0..self.count(count)? {
                let mut bindings = self.bindings.clone();
                bindings.set("index", json!(index));
                expanded.extend(self.load_objects(&op.object, &op.file, &bindings)?);
            }
        } else {
            expanded = self.load_objects(&op.object, &op.file, &self.bindings)?;
        }
        let kube = self.kube(op.cluster).await?;
        for object in &expanded {
            if let Some(namespace) = object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                && mode != ApplyMode::Patch
            {
                self.ensure_namespace(op.cluster, namespace).await?;
            }
        }
        let deadline = Instant::now() + timeout;
        let results: Vec<(Value, Result<bool, KubeError>)> =
            futures::stream::iter(expanded.into_iter().map(|object| {
                let kube = kube.clone();
                async move {
                    let res = loop {
                        let res = match mode {
                            ApplyMode::Apply => kube.apply(&object).await,
                            ApplyMode::Create => kube.create(&object).await.map(|_| true),
                            ApplyMode::Patch => kube.patch(&object).await.map(|_| false),
                        };
                        // Transport errors (an API server restarting) are retried until the timeout.
                        match &res {
                            Err(KubeError::Client(_)) if Instant::now() < deadline => {
                                tokio::time::sleep(POLL).await
                            }
                            _ => break res,
                        }
                    };
                    (object, res)
                }
            }))
            .buffer_unordered(APPLY_CONCURRENCY)
            .collect()
            .await;
        let mut errors = Vec::new();
        for (object, res) in results {
            let reference = ObjectRef::of(&object).map_err(|e| fail(e.to_string()))?;
            match (res, &op.expect_error) {
                (Ok(created), None) => {
                    if created {
                        self.created.push(Created {
                            cluster: op.cluster,
                            reference,
                        });
                    }
                }
                (Ok(created), Some(wanted)) => {
                    if created {
                        self.created.push(Created {
                            cluster: op.cluster,
                            reference: reference.clone(),
                        });
                    }
                    errors.push(Failure {
                        message: format!("{reference}: the API server accepted the object"),
                        awaited: Some(format!("a rejection containing `{wanted}`")),
                        last_seen: Some(yaml(&object)),
                        diff: None,
                    });
                }
                (Err(err), Some(wanted)) if err.to_string().contains(wanted.as_str()) => {}
                (Err(err), Some(wanted)) => errors.push(Failure {
                    message: format!("{reference}: rejected, but not with the expected message"),
                    awaited: Some(format!("a rejection containing `{wanted}`")),
                    last_seen: Some(err.to_string()),
                    diff: None,
                }),
                (Err(err), None) => errors.push(fail(format!("{reference}: {err}"))),
            }
        }
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            n => {
                let mut first = errors.remove(0);
                first.message = format!("{} (and {} more objects failed)", first.message, n - 1);
                Err(first)
            }
        }
    }

    /// One check of an assertion: `Ok(None)` when it matches, else the closest object seen.
    async fn check_objects(
        &self,
        cluster: ClusterName,
        expected: &Value,
    ) -> Result<Result<Value, Option<Value>>, Failure> {
        let kube = self.kube(cluster).await?;
        let reference = ObjectRef::of(expected).map_err(|e| fail(e.to_string()))?;
        let candidates = if reference.name.is_some() {
            match kube.get(&reference).await {
                Ok(found) => found.into_iter().collect(),
                Err(KubeError::Client(err)) => return Ok(Err(Some(json!({"error": err})))),
                Err(err) => return Err(fail(format!("reading {reference}: {err}"))),
            }
        } else {
            let labels = expected
                .pointer("/metadata/labels")
                .and_then(Value::as_object)
                .map(|labels| {
                    labels
                        .iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            match kube.list(&reference, &labels).await {
                Ok(items) => items,
                Err(KubeError::Client(err)) => return Ok(Err(Some(json!({"error": err})))),
                Err(err) => return Err(fail(format!("listing {reference}: {err}"))),
            }
        };
        if let Some(found) = candidates.iter().find(|c| matcher::matches(expected, c)) {
            return Ok(Ok(found.clone()));
        }
        let closest = candidates
            .into_iter()
            .min_by_key(|c| matcher::mismatches(expected, c).len());
        Ok(Err(closest))
    }

    fn assertion_failure(
        what: &str,
        expected: &Value,
        closest: Option<Value>,
        timeout: Duration,
    ) -> Failure {
        let reference = ObjectRef::of(expected)
            .map(|r| r.to_string())
            .unwrap_or_default();
        match closest {
            Some(actual) if actual.get("error").is_none() || actual.get("kind").is_some() => {
                let mismatches = matcher::mismatches(expected, &actual);
                Failure {
                    message: format!(
                        "{reference} did not {what} within {}: {}",
                        crate::duration::pretty(timeout),
                        mismatches
                            .iter()
                            .take(3)
                            .map(|m| m.to_string())
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                    awaited: Some(format!("{reference} to {what}")),
                    last_seen: Some(yaml(&matcher::project(expected, &actual))),
                    diff: Some(matcher::diff(expected, &actual)),
                }
            }
            Some(error) => Failure {
                message: format!(
                    "{reference}: the API server could not be read within {}",
                    crate::duration::pretty(timeout)
                ),
                awaited: Some(format!("{reference} to {what}")),
                last_seen: Some(error.to_string()),
                diff: None,
            },
            None => Failure {
                message: format!(
                    "{reference} not found within {}",
                    crate::duration::pretty(timeout)
                ),
                awaited: Some(format!("{reference} to {what}")),
                last_seen: Some("no such object".into()),
                diff: None,
            },
        }
    }

    async fn assert(&self, op: &AssertOp, timeout: Duration, absent: bool) -> OpResultT {
        let expected = self.load_objects(&op.object, &op.file, &self.bindings)?;
        let deadline = Instant::now() + timeout;
        for expected in &expected {
            loop {
                let check = self.check_objects(op.cluster, expected).await?;
                match (check, absent) {
                    (Ok(_), false) | (Err(_), true) => break,
                    (Err(closest), false) => {
                        if Instant::now() >= deadline {
                            return Err(Self::assertion_failure(
                                "match", expected, closest, timeout,
                            ));
                        }
                    }
                    (Ok(found), true) => {
                        if Instant::now() >= deadline {
                            let reference = ObjectRef::of(expected)
                                .map(|r| r.to_string())
                                .unwrap_or_default();
                            return Err(Failure {
                                message: format!(
                                    "{reference} still matches after {}",
                                    crate::duration::pretty(timeout)
                                ),
                                awaited: Some(format!(
                                    "no {reference} matching the expected object"
                                )),
                                last_seen: Some(yaml(&found)),
                                diff: None,
                            });
                        }
                    }
                }
                tokio::time::sleep(POLL).await;
            }
        }
        Ok(())
    }

    async fn delete(
        &mut self,
        cluster: ClusterName,
        objects: Vec<Value>,
        wait: bool,
        timeout: Duration,
    ) -> OpResultT {
        let kube = self.kube(cluster).await?;
        let deadline = Instant::now() + timeout;
        for object in objects {
            let reference = ObjectRef::of(&object).map_err(|e| fail(e.to_string()))?;
            kube.delete(&reference)
                .await
                .map_err(|e| fail(format!("deleting {reference}: {e}")))?;
            self.created
                .retain(|c| !(c.cluster == cluster && c.reference == reference));
            if wait {
                loop {
                    match kube.get(&reference).await {
                        Ok(None) => break,
                        Ok(Some(found)) if Instant::now() >= deadline => {
                            return Err(Failure {
                                message: format!(
                                    "{reference} still exists {} after deletion",
                                    crate::duration::pretty(timeout)
                                ),
                                awaited: Some(format!("{reference} to be gone")),
                                last_seen: Some(yaml(&found)),
                                diff: None,
                            });
                        }
                        Err(err) if Instant::now() >= deadline => {
                            return Err(fail(format!("reading {reference}: {err}")));
                        }
                        _ => tokio::time::sleep(POLL).await,
                    }
                }
            }
        }
        Ok(())
    }

    fn command_env(&self) -> BTreeMap<String, String> {
        let text = |name: &str| {
            self.bindings
                .get(name)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        BTreeMap::from([
            ("KUBECONFIG".to_string(), self.env.kubeconfig_env()),
            ("CONTROL_CONTEXT".to_string(), text("controlContext")),
            ("BUILD_CONTEXT".to_string(), text("buildContext")),
            ("NAMESPACE".to_string(), text("namespace")),
            ("PLANE_ID".to_string(), text("planeID")),
        ])
    }

    #[allow(clippy::too_many_arguments)] // One call site per command-like operation.
    async fn run_command(
        &mut self,
        program: &str,
        args: Vec<String>,
        stdin: Option<String>,
        env: BTreeMap<String, String>,
        expect: &CommandExpect,
        output: &Option<String>,
        format: OutputFormat,
        timeout: Duration,
    ) -> OpResultT {
        use tokio::io::AsyncWriteExt;
        let shown = match (program, args.as_slice()) {
            ("sh", [flag, script]) if flag == "-c" => {
                let body = script.strip_prefix("set -e\n").unwrap_or(script);
                format!("script `{}`", first_line(body))
            }
            _ => format!("{program} {}", args.join(" ")),
        };
        let mut command = tokio::process::Command::new(program);
        command
            .args(&args)
            .envs(&env)
            .current_dir(&self.scenario_dir)
            .stdin(if stdin.is_some() {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            })
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .map_err(|e| fail(format!("running `{shown}`: {e}")))?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            let _ = pipe.write_all(text.as_bytes()).await;
        }
        let result = tokio::time::timeout(timeout, child.wait_with_output())
            .await
            .map_err(|_| {
                fail(format!(
                    "`{shown}` did not finish within {}",
                    crate::duration::pretty(timeout)
                ))
            })?
            .map_err(|e| fail(format!("running `{shown}`: {e}")))?;
        let stdout = String::from_utf8_lossy(&result.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&result.stderr).into_owned();
        let code = result.status.code().unwrap_or(-1);
        let wanted = expect.exit_code.unwrap_or(0);
        let seen = || {
            format!(
                "exit code {code}\nstdout:\n{}\nstderr:\n{}",
                tail_text(&stdout),
                tail_text(&stderr)
            )
        };
        if code != wanted {
            return Err(Failure {
                message: format!(
                    "`{shown}` exited with {code}, expected {wanted}: {}",
                    first_line(&stderr)
                ),
                awaited: None,
                last_seen: Some(seen()),
                diff: None,
            });
        }
        for (stream, text, needle) in [
            ("stdout", &stdout, &expect.stdout_contains),
            ("stderr", &stderr, &expect.stderr_contains),
        ] {
            if let Some(needle) = needle {
                let needle = self.text(needle)?;
                if !text.contains(&needle) {
                    return Err(Failure {
                        message: format!("`{shown}`: {stream} does not contain `{needle}`"),
                        awaited: None,
                        last_seen: Some(seen()),
                        diff: None,
                    });
                }
            }
        }
        if let Some(output) = output {
            let value = match format {
                OutputFormat::Text => Value::String(stdout),
                OutputFormat::Trimmed => Value::String(stdout.trim().to_string()),
                OutputFormat::Json => serde_json::from_str(&stdout)
                    .map_err(|e| fail(format!("stdout is not JSON: {e}")))?,
                OutputFormat::Yaml => serde_yaml::from_str(&stdout)
                    .map_err(|e| fail(format!("stdout is not YAML: {e}")))?,
                OutputFormat::Base64 => {
                    use base64::Engine as _;
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(stdout.trim())
                        .map_err(|e| fail(format!("stdout is not base64: {e}")))?;
                    Value::String(String::from_utf8_lossy(&bytes).into_owned())
                }
            };
            self.bindings.set(output.clone(), value);
        }
        Ok(())
    }

    fn target(op: &ComponentOp) -> Result<ComponentTarget, Failure> {
        let kind = op.component.ok_or_else(|| fail("missing `component`"))?;
        Ok(ComponentTarget {
            kind,
            name: op.name.clone(),
            cluster: op.cluster,
        })
    }

    async fn component(&mut self, op: &ComponentOp, action: &str) -> OpResultT {
        let mut target = Self::target(op)?;
        if let Some(name) = &target.name {
            target.name = Some(self.text(name)?);
        }
        let args = op
            .args
            .iter()
            .map(|a| self.text(a))
            .collect::<Result<Vec<_>, _>>()?;
        let env = self.env.clone();
        let res = match (action, target.kind) {
            ("start", ComponentKind::Agent) if op.plane_id.is_none() => {
                env.start(target.clone(), args).await
            }
            ("start", ComponentKind::Agent) => {
                let name = target.name.clone().unwrap_or_default();
                let namespace = self.text(
                    op.identity_namespace
                        .as_deref()
                        .unwrap_or(buildplane_api::names::AGENT_NAMESPACE),
                )?;
                let spec = AgentSpec {
                    name: name.clone(),
                    plane_id: self.text(op.plane_id.as_deref().unwrap_or_default())?,
                    identity_namespace: namespace.clone(),
                    protocol: op.protocol.clone(),
                    args,
                };
                self.agents.insert(name, namespace.clone());
                self.ensure_namespace(ClusterName::Build, &namespace)
                    .await?;
                env.start_agent(spec).await
            }
            ("start", ComponentKind::Swarm) => {
                let spec = SwarmSpec {
                    name: target.name.clone().unwrap_or_default(),
                    count: self.count(op.count.as_ref().unwrap_or(&Count::Literal(0)))?,
                    processes: self.count(op.processes.as_ref().unwrap_or(&Count::Literal(4)))?
                        as u32,
                    plane_id_prefix: self
                        .text(op.plane_id_prefix.as_deref().unwrap_or_default())?,
                    args,
                };
                let planes = env
                    .start_swarm(spec)
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                if let Some(output) = &op.output {
                    self.bindings.set(
                        output.clone(),
                        serde_json::to_value(planes).unwrap_or_default(),
                    );
                }
                Ok(())
            }
            ("start", _) => env.start(target.clone(), args).await,
            ("stop", _) => env.stop(target.clone(), StopMode::Graceful).await,
            ("kill", _) => env.stop(target.clone(), StopMode::Kill).await,
            (_, _) => {
                env.stop(target.clone(), StopMode::Graceful)
                    .await
                    .map_err(|e| fail(format!("restart {target}: {e}")))?;
                env.start(target.clone(), args).await
            }
        };
        if target.kind == ComponentKind::Apiserver {
            // A restarted API server may serve new credentials: reconnect on next use.
            self.kube
                .lock()
                .await
                .remove(&target.cluster.unwrap_or(ClusterName::Control));
        }
        res.map_err(|e| fail(format!("{action} {target}: {e}")))
    }

    fn toxics(op: &FaultOp) -> Toxics {
        Toxics {
            latency: op.latency.map(Duration::from).unwrap_or_default(),
            jitter: op.jitter.map(Duration::from).unwrap_or_default(),
            bandwidth_kbps: op.bandwidth_kbps.unwrap_or(0),
            blackhole: op.blackhole,
            reset: op.reset,
            slicer_size: op.slicer.as_ref().map_or(0, |s| s.size),
            slicer_delay: op
                .slicer
                .as_ref()
                .map(|s| s.delay.into())
                .unwrap_or_default(),
            partition: op.partition,
            direction: op.direction,
        }
    }

    fn gateway(&self) -> Result<GatewayAccess, Failure> {
        self.env.gateway().map_err(|e| fail(e.to_string()))
    }

    /// Substitutes bindings into a request.
    fn bound_request(&self, op: &RequestOp) -> Result<RequestOp, Failure> {
        let mut bound = op.clone();
        bound.path = self.text(&op.path)?;
        bound.body = op.body.as_ref().map(|b| self.sub(b)).transpose()?;
        bound.expect.body = op.expect.body.as_ref().map(|b| self.sub(b)).transpose()?;
        bound.expect.body_contains = op
            .expect
            .body_contains
            .as_ref()
            .map(|b| self.text(b))
            .transpose()?;
        Ok(bound)
    }

    async fn request(&mut self, op: &RequestOp, timeout: Duration) -> OpResultT {
        let bound = self.bound_request(op)?;
        let gateway = self.gateway()?;
        if let Some(name) = &op.background {
            let handle =
                tokio::spawn(
                    async move { request_until(&gateway, &bound, timeout).await.map(|_| ()) },
                );
            self.backgrounds
                .insert(name.clone(), Background { handle, stop: None });
            return Ok(());
        }
        let body = request_until(&gateway, &bound, timeout).await?;
        if let Some(output) = &op.output {
            self.bindings.set(output.clone(), body);
        }
        Ok(())
    }

    async fn load(&mut self, op: &LoadOp) -> OpResultT {
        let gateway = self.gateway()?;
        let paths = op
            .paths
            .iter()
            .map(|p| self.text(p))
            .collect::<Result<Vec<_>, _>>()?;
        let name = op.background.clone().unwrap_or_else(|| "load".to_string());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let load = op.clone();
        let started = self.started;
        let loads = self.loads.clone();
        let task = async move {
            let report = run_load(&gateway, &paths, &load, started, stop_rx, name).await;
            let verdict = check_load(&report, &load);
            loads.lock().unwrap_or_else(|e| e.into_inner()).push(report);
            verdict
        };
        match &op.background {
            Some(name) => {
                let handle = tokio::spawn(task);
                self.backgrounds.insert(
                    name.clone(),
                    Background {
                        handle,
                        stop: Some(stop_tx),
                    },
                );
                Ok(())
            }
            None => task.await,
        }
    }

    async fn await_background(&mut self, name: &str, timeout: Duration) -> OpResultT {
        let background = self
            .backgrounds
            .remove(name)
            .ok_or_else(|| fail(format!("no background operation `{name}`")))?;
        if let Some(stop) = &background.stop {
            let _ = stop.send(true);
        }
        let mut handle = background.handle;
        match tokio::time::timeout(timeout, &mut handle).await {
            Ok(Ok(res)) => res,
            Ok(Err(err)) => Err(fail(format!("background `{name}` panicked: {err}"))),
            Err(_) => {
                handle.abort();
                Err(Failure {
                    message: format!(
                        "background `{name}` did not finish within {}",
                        crate::duration::pretty(timeout)
                    ),
                    awaited: Some(format!("`{name}` to finish")),
                    ..Failure::default()
                })
            }
        }
    }

    async fn watch(&mut self, op: &WatchOp, timeout: Duration) -> OpResultT {
        let gateway = self.gateway()?;
        let mut path = self.text(&op.path)?;
        if !path.contains("watch=") {
            path.push(if path.contains('?') { '&' } else { '?' });
            path.push_str("watch=true");
        }
        let expected = op
            .events
            .iter()
            .map(|e| {
                Ok((
                    e.type_.clone(),
                    e.object.as_ref().map(|o| self.sub(o)).transpose()?,
                ))
            })
            .collect::<Result<Vec<_>, Failure>>()?;
        let task = async move { watch_until(&gateway, &path, &expected, timeout).await };
        match &op.background {
            Some(name) => {
                let handle = tokio::spawn(task);
                self.backgrounds
                    .insert(name.clone(), Background { handle, stop: None });
                Ok(())
            }
            None => task.await,
        }
    }

    async fn metric_value(&self, op: &MetricOp) -> Result<Option<f64>, String> {
        let target = ComponentTarget {
            kind: op.component,
            name: op.instance.clone(),
            cluster: None,
        };
        let labels = op
            .labels
            .iter()
            .map(|(name, value)| Ok((name.clone(), self.text(value)?)))
            .collect::<Result<BTreeMap<_, _>, Failure>>()
            .map_err(|failure| failure.message)?;
        let text = self.env.metrics(target).await.map_err(|e| e.to_string())?;
        Ok(prometheus_sum(&text, &op.name, &labels))
    }

    async fn metric_once(&self, op: &MetricOp) -> Result<(bool, String), Failure> {
        let wanted = self.text(&op.value)?;
        let (cmp, number) = matcher::parse_comparison(&wanted)
            .ok_or_else(|| fail(format!("`{wanted}` is not a comparison such as `>= 3`")))?;
        Ok(match self.metric_value(op).await {
            Ok(Some(value)) => (
                matcher::compare_number(cmp, value, number),
                format!("{} = {value}", op.name),
            ),
            Ok(None) => (false, format!("{} is not exposed", op.name)),
            Err(err) => (false, format!("scrape failed: {err}")),
        })
    }

    async fn metric(&self, op: &MetricOp, timeout: Duration) -> OpResultT {
        let deadline = Instant::now() + timeout;
        loop {
            let (ok, seen) = self.metric_once(op).await?;
            if ok {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Failure {
                    message: format!(
                        "metric {} did not reach `{}` within {}",
                        op.name,
                        op.value,
                        crate::duration::pretty(timeout)
                    ),
                    awaited: Some(format!(
                        "{} {} on {}",
                        op.name,
                        self.text(&op.value)?,
                        op.component.as_str()
                    )),
                    last_seen: Some(seen),
                    diff: None,
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn record(&mut self, op: &crate::scenario::RecordOp) -> OpResultT {
        let points = Arc::new(Mutex::new(Vec::new()));
        self.series.insert(op.name.clone(), points.clone());
        let interval: Duration = op.interval.unwrap_or(Dur::millis(250)).into();
        let started = self.started;
        let env = self.env.clone();
        let source = op.source;
        let component = op.component.unwrap_or(ComponentKind::Gateway);
        let metric = op.metric.clone().unwrap_or_default();
        let gateway = self.env.gateway().ok();
        self.samplers.push(tokio::spawn(async move {
            loop {
                let value = match source {
                    RecordSource::GatewayConnections => match &gateway {
                        Some(gateway) => connection_count(gateway).await,
                        None => None,
                    },
                    RecordSource::Metric => {
                        let target = ComponentTarget {
                            kind: component,
                            name: None,
                            cluster: None,
                        };
                        match env.metrics(target).await {
                            Ok(text) => prometheus_sum(&text, &metric, &BTreeMap::new()),
                            Err(_) => None,
                        }
                    }
                };
                // An unreachable gateway counts as zero connections (it is down).
                let value = value.unwrap_or(0.0);
                points
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((started.elapsed().as_secs_f64(), value));
                tokio::time::sleep(interval).await;
            }
        }));
        Ok(())
    }

    fn check_series(&self, op: &crate::scenario::CheckSeriesOp) -> OpResultT {
        let points = self
            .series
            .get(&op.name)
            .ok_or_else(|| fail(format!("no series `{}`", op.name)))?;
        let points = points.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(max_rise) = &op.max_rise_per_second {
            let max_rise = self.count(max_rise)? as f64;
            let rise = max_rise_per_second(&points);
            if rise > max_rise {
                return Err(Failure {
                    message: format!(
                        "series {} rose by {rise} within one second (limit {max_rise})",
                        op.name
                    ),
                    awaited: Some(format!("at most {max_rise} per second")),
                    last_seen: Some(format!("{} samples; max rise {rise}", points.len())),
                    diff: None,
                });
            }
        }
        if let Some(at_least) = &op.final_at_least {
            let wanted = self.count(at_least)? as f64;
            let last = points.last().map_or(0.0, |p| p.1);
            if last < wanted {
                return Err(Failure {
                    message: format!(
                        "series {} ended at {last}, expected at least {wanted}",
                        op.name
                    ),
                    awaited: Some(format!("at least {wanted}")),
                    last_seen: Some(format!("{last}")),
                    diff: None,
                });
            }
        }
        Ok(())
    }

    async fn agent_secret_ca(&self, agent: &str) -> Result<String, Failure> {
        let namespace = self
            .agents
            .get(agent)
            .cloned()
            .ok_or_else(|| fail(format!("no agent `{agent}` was started")))?;
        let kube = self.kube(ClusterName::Build).await?;
        let reference = ObjectRef {
            api_version: "v1".into(),
            kind: "Secret".into(),
            namespace: Some(namespace.clone()),
            name: Some(buildplane_api::names::AGENT_TLS_SECRET.into()),
        };
        let secret = kube
            .get(&reference)
            .await
            .map_err(|e| fail(format!("reading {reference}: {e}")))?
            .ok_or_else(|| fail(format!("{reference} does not exist")))?;
        let encoded = secret
            .pointer("/data/ca.crt")
            .and_then(Value::as_str)
            .unwrap_or_default();
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| fail(format!("{reference} ca.crt is not base64: {e}")))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    async fn agent_command(
        &mut self,
        agent: &str,
        args: Vec<String>,
        output: &Option<String>,
    ) -> OpResultT {
        let shown = args.join(" ");
        let res = self
            .env
            .agent_command(agent, args)
            .await
            .map_err(|e| fail(e.to_string()))?;
        if res.code != 0 {
            return Err(Failure {
                message: format!(
                    "`cluster-agent {shown}` for agent {agent} exited with {}: {}",
                    res.code,
                    first_line(&res.stderr)
                ),
                last_seen: Some(format!(
                    "stdout:\n{}\nstderr:\n{}",
                    tail_text(&res.stdout),
                    tail_text(&res.stderr)
                )),
                ..Failure::default()
            });
        }
        if let Some(output) = output {
            let ca = self.agent_secret_ca(agent).await?;
            self.bindings.set(output.clone(), Value::String(ca));
        }
        Ok(())
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

    /// Runs one operation.
    pub async fn run_op(&mut self, op: &Operation, timeouts: &Timeouts) -> OpResultT {
        let timeout: Duration = op
            .own_timeout()
            .or_else(|| timeouts.get(op.timeout_kind()))
            .unwrap_or(Dur::secs(30))
            .into();
        match op {
            Operation::Apply(o) => self.apply(o, ApplyMode::Apply, timeout).await,
            Operation::Create(o) => self.apply(o, ApplyMode::Create, timeout).await,
            Operation::Patch(o) => self.apply(o, ApplyMode::Patch, timeout).await,
            Operation::Assert(o) => self.assert(o, timeout, false).await,
            Operation::Error(o) => self.assert(o, timeout, true).await,
            Operation::Await(o) => self.await_background(&o.name, timeout).await,
            Operation::CheckSeries(o) => {
                let deadline = Instant::now() + o.within.map(Duration::from).unwrap_or_default();
                loop {
                    match self.check_series(o) {
                        Err(failure) if Instant::now() < deadline => {
                            let _ = failure;
                            tokio::time::sleep(Duration::from_millis(250)).await;
                        }
                        res => break res,
                    }
                }
            }
            Operation::Consistently(o) => self.consistently(o, timeouts).await,
            Operation::Delete(o) => {
                let objects = self.load_objects(&o.object, &o.file, &self.bindings)?;
                let res = self.delete(o.cluster, objects, o.wait, timeout).await;
                if o.continue_on_error { Ok(()) } else { res }
            }
            Operation::Exec(o) => {
                let mut command = o
                    .command
                    .iter()
                    .map(|a| self.text(a))
                    .collect::<Result<Vec<_>, _>>()?;
                if command.is_empty() {
                    return Err(fail("empty command"));
                }
                let program = command.remove(0);
                let mut env = self.command_env();
                env.extend(
                    o.env
                        .iter()
                        .map(|(k, v)| (k.clone(), self.text(v).unwrap_or_default())),
                );
                let res = self
                    .run_command(
                        &program,
                        command,
                        None,
                        env,
                        &o.expect,
                        &o.output,
                        o.output_format,
                        timeout,
                    )
                    .await;
                if o.continue_on_error { Ok(()) } else { res }
            }
            Operation::Fault(o) => self
                .env
                .set_faults(&self.text(&o.link)?, Self::toxics(o))
                .map_err(|e| fail(e.to_string())),
            Operation::Heal(o) => match (&o.link, &o.name) {
                (Some(link), _) => self
                    .env
                    .set_faults(&self.text(link)?, Toxics::default())
                    .map_err(|e| fail(e.to_string())),
                (None, Some(name)) => self
                    .env
                    .partition(&self.text(name)?, None)
                    .map_err(|e| fail(e.to_string())),
                (None, None) => Err(fail("heal needs `link`, or `component` and `name`")),
            },
            Operation::Partition(o) => self
                .env
                .partition(&self.text(&o.name)?, Some(o.from))
                .map_err(|e| fail(e.to_string())),
            Operation::Kill(o) => self.component(o, "kill").await,
            Operation::Restart(o) => self.component(o, "restart").await,
            Operation::Start(o) => self.component(o, "start").await,
            Operation::Stop(o) => self.component(o, "stop").await,
            Operation::Kubectl(o) => {
                let access = self.env.cluster(o.cluster);
                let mut args = vec![
                    "--kubeconfig".to_string(),
                    access.kubeconfig.display().to_string(),
                    "--context".into(),
                    access.context,
                ];
                match &o.args {
                    Args::Line(line) => args.extend(split_args(&self.text(line)?)),
                    Args::List(list) => {
                        for arg in list {
                            args.push(self.text(arg)?);
                        }
                    }
                }
                let stdin = o.stdin.as_ref().map(|s| self.text(s)).transpose()?;
                let env = self.command_env();
                let res = self
                    .run_command(
                        "kubectl",
                        args,
                        stdin,
                        env,
                        &o.expect,
                        &o.output,
                        o.output_format,
                        timeout,
                    )
                    .await;
                if o.continue_on_error { Ok(()) } else { res }
            }
            Operation::Load(o) => self.load(o).await,
            Operation::GenerateCa(o) => {
                let ca = crate::pki::TestCa::generate(&self.text(&o.common_name)?)
                    .map_err(|e| fail(e.to_string()))?;
                self.bindings
                    .set(o.output.clone(), Value::String(ca.cert_pem));
                Ok(())
            }
            Operation::Metric(o) => self.metric(o, timeout).await,
            Operation::Record(o) => self.record(o),
            Operation::RenewLeaf(o) => {
                self.agent_command(&o.agent, vec!["renew".into()], &None)
                    .await
            }
            Operation::Request(o) => self.request(o, timeout).await,
            Operation::RotateCa(o) => {
                let mut args = vec!["rotate-ca".to_string()];
                if o.finish {
                    args.push("--finish".into());
                }
                self.agent_command(&o.agent, args, &o.output).await
            }
            Operation::Script(o) => {
                let content = self.text(&o.content)?;
                let mut env = self.command_env();
                env.extend(
                    o.env
                        .iter()
                        .map(|(k, v)| (k.clone(), self.text(v).unwrap_or_default())),
                );
                let args = vec!["-c".to_string(), format!("set -e\n{content}")];
                let res = self
                    .run_command(
                        "sh",
                        args,
                        None,
                        env,
                        &o.expect,
                        &o.output,
                        o.output_format,
                        timeout,
                    )
                    .await;
                if o.continue_on_error { Ok(()) } else { res }
            }
            Operation::Sleep(o) => {
                tokio::time::sleep(o.duration.into()).await;
                Ok(())
            }
            Operation::Watch(o) => self.watch(o, timeout).await,
        }
    }

    async fn consistently(
        &mut self,
        op: &crate::scenario::ConsistentlyOp,
        timeouts: &Timeouts,
    ) -> OpResultT {
        let interval: Duration = op.interval.unwrap_or(Dur::millis(250)).into();
        let total: Duration = op.for_.into();
        let started = Instant::now();
        let request_timeout: Duration = timeouts
            .get(TimeoutKind::Request)
            .unwrap_or(Dur::secs(10))
            .into();
        let mut checks = 0u64;
        loop {
            let elapsed = started.elapsed();
            let broke = |failure: Failure| Failure {
                message: format!(
                    "stopped holding after {} (check {}, needed {}): {}",
                    crate::duration::pretty(elapsed),
                    checks + 1,
                    crate::duration::pretty(total),
                    failure.message
                ),
                ..failure
            };
            if let Some(assert) = &op.assert {
                let expected = self.load_objects(&assert.object, &assert.file, &self.bindings)?;
                for expected in &expected {
                    if let Err(closest) = self.check_objects(assert.cluster, expected).await? {
                        return Err(broke(Self::assertion_failure(
                            "keep matching",
                            expected,
                            closest,
                            elapsed,
                        )));
                    }
                }
            }
            if let Some(error) = &op.error {
                let expected = self.load_objects(&error.object, &error.file, &self.bindings)?;
                for expected in &expected {
                    if let Ok(found) = self.check_objects(error.cluster, expected).await? {
                        return Err(broke(Failure {
                            message: "an object matched that must not".into(),
                            last_seen: Some(yaml(&found)),
                            ..Failure::default()
                        }));
                    }
                }
            }
            if let Some(request) = &op.request {
                let bound = self.bound_request(request)?;
                let gateway = self.gateway()?;
                let timeout = request
                    .timeout
                    .map(Duration::from)
                    .unwrap_or(request_timeout);
                request_once(&gateway, &bound, timeout)
                    .await
                    .map_err(broke)?;
            }
            if let Some(metric) = &op.metric {
                let (ok, seen) = self.metric_once(metric).await?;
                if !ok {
                    return Err(broke(Failure {
                        message: format!("metric {} no longer {}", metric.name, metric.value),
                        last_seen: Some(seen),
                        ..Failure::default()
                    }));
                }
            }
            checks += 1;
            if started.elapsed() >= total {
                return Ok(());
            }
            tokio::time::sleep(interval).await;
        }
    }

    /// Runs a step: `try` until the first failure, then `catch` (on failure) and `finally`.
    pub async fn run_step(&mut self, step: &Step, timeouts: &Timeouts) -> StepResult {
        let started = Instant::now();
        for (name, value) in &step.bindings {
            match self.sub(value) {
                Ok(value) => self.bindings.set(name.clone(), value),
                Err(failure) => {
                    return StepResult {
                        name: step.name.clone(),
                        status: Status::Failed,
                        duration: started.elapsed(),
                        operations: vec![OpResult {
                            phase: "bindings",
                            kind: "bindings".into(),
                            summary: name.clone(),
                            at: self.started.elapsed().as_secs_f64(),
                            status: Status::Failed,
                            duration: Duration::ZERO,
                            failure: Some(failure),
                        }],
                    };
                }
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

    /// Collects evidence: logs, the gateway's connections, events and the created objects.
    pub async fn evidence(&self) -> Evidence {
        let mut evidence = Evidence {
            logs: self.env.logs(60),
            ..Evidence::default()
        };
        if let Ok(gateway) = self.env.gateway() {
            let url = format!("{}/api/v1/connections", gateway.base_url);
            evidence.connections = Some(
                match gateway
                    .client
                    .get(&url)
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await
                {
                    Ok(res) => {
                        let status = res.status();
                        let text = res.text().await.unwrap_or_default();
                        match serde_json::from_str::<Value>(&text) {
                            Ok(json) => format!("{status}\n{}", yaml(&json)),
                            Err(_) => format!("{status}\n{text}"),
                        }
                    }
                    Err(err) => format!("unreachable: {err}"),
                },
            );
        }
        let mut events = String::new();
        for (cluster, namespace) in &self.namespaces {
            let Ok(kube) = self.kube(*cluster).await else {
                continue;
            };
            // Core events and events.k8s.io (what kube-runtime's Recorder writes).
            for (api_version, object, message) in [
                ("v1", "involvedObject", "message"),
                ("events.k8s.io/v1", "regarding", "note"),
            ] {
                let reference = ObjectRef {
                    api_version: api_version.into(),
                    kind: "Event".into(),
                    namespace: Some(namespace.clone()),
                    name: None,
                };
                let Ok(items) = kube.list(&reference, "").await else {
                    continue;
                };
                for item in items {
                    let field = |p: &str| {
                        item.pointer(p)
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_string()
                    };
                    events.push_str(&format!(
                        "{} {}/{} {} {}: {}\n",
                        cluster.as_str(),
                        field(&format!("/{object}/kind")),
                        field(&format!("/{object}/name")),
                        field("/type"),
                        field("/reason"),
                        field(&format!("/{message}"))
                    ));
                }
            }
        }
        if !events.is_empty() {
            evidence.events = Some(events);
        }
        for created in self.created.iter().rev().take(20) {
            let Ok(kube) = self.kube(created.cluster).await else {
                continue;
            };
            let dump = match kube.get(&created.reference).await {
                Ok(Some(object)) => yaml(&object),
                Ok(None) => "gone".into(),
                Err(err) => format!("unreadable: {err}"),
            };
            evidence.objects.insert(
                format!("{} {}", created.cluster.as_str(), created.reference),
                dump,
            );
        }
        evidence
    }

    /// Stops samplers and background work, and returns the series and load reports.
    pub fn finish(&mut self) -> (Vec<Series>, Vec<LoadReport>) {
        for sampler in self.samplers.drain(..) {
            sampler.abort();
        }
        for (_, background) in self.backgrounds.drain() {
            if let Some(stop) = background.stop {
                let _ = stop.send(true);
            }
            background.handle.abort();
        }
        let series = self
            .series
            .iter()
            .map(|(name, points)| Series {
                name: name.clone(),
                points: points.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            })
            .collect();
        let loads = std::mem::take(&mut *self.loads.lock().unwrap_or_else(|e| e.into_inner()));
        (series, loads)
    }

    /// Deletes what the scenario created, newest first, waiting until each is gone.
    ///
    /// Consecutive objects of one kind on one cluster (a `forEach` of 1,000 BuildPlanes) are
    /// deleted together; groups are deleted in reverse order of creation.
    pub async fn cleanup(&mut self, timeout: Duration) -> Result<(), String> {
        let mut errors = Vec::new();
        let created = std::mem::take(&mut self.created);
        let mut groups: Vec<Vec<Created>> = Vec::new();
        for item in created.into_iter().rev() {
            match groups.last_mut() {
                Some(group)
                    if group[0].cluster == item.cluster
                        && group[0].reference.kind == item.reference.kind
                        && group[0].reference.api_version == item.reference.api_version =>
                {
                    group.push(item)
                }
                _ => groups.push(vec![item]),
            }
        }
        for group in groups {
            let cluster = group[0].cluster;
            let kube = match self.kube(cluster).await {
                Ok(kube) => kube,
                Err(failure) => {
                    errors.push(failure.message);
                    continue;
                }
            };
            // Every deletion is issued before any is awaited, so finalizers of a large group
            // (a storm's thousand BuildPlanes) run side by side, not sixteen at a time.
            let deadline = Instant::now() + timeout;
            let deleted: Vec<Result<ObjectRef, String>> =
                futures::stream::iter(group.into_iter().map(|item| {
                    let kube = kube.clone();
                    async move {
                        match kube.delete(&item.reference).await {
                            Ok(_) => Ok(item.reference),
                            Err(e) => Err(format!("deleting {}: {e}", item.reference)),
                        }
                    }
                }))
                .buffer_unordered(APPLY_CONCURRENCY)
                .collect()
                .await;
            let mut pending = Vec::new();
            for result in deleted {
                match result {
                    Ok(reference) => pending.push(reference),
                    Err(err) => errors.push(err),
                }
            }
            let results: Vec<Result<(), String>> =
                futures::stream::iter(pending.into_iter().map(|reference| {
                    let kube = kube.clone();
                    async move { wait_gone(&kube, &reference, deadline, timeout).await }
                }))
                .buffer_unordered(APPLY_CONCURRENCY)
                .collect()
                .await;
            errors.extend(results.into_iter().filter_map(Result::err));
        }
        let namespaces = std::mem::take(&mut self.namespaces);
        for (cluster, namespace) in namespaces.into_iter().rev() {
            let value =
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}});
            if let Err(failure) = self.delete(cluster, vec![value], false, timeout).await {
                errors.push(failure.message);
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

/// Waits until a deleted object is gone (finalizers done), until `deadline`.
async fn wait_gone(
    kube: &Kube,
    reference: &ObjectRef,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), String> {
    loop {
        match kube.get(reference).await {
            Ok(None) => return Ok(()),
            Ok(Some(found)) if Instant::now() >= deadline => {
                let finalizers = found
                    .pointer("/metadata/finalizers")
                    .map(|f| f.to_string())
                    .unwrap_or_default();
                return Err(format!(
                    "{reference} still exists {} after deletion (finalizers {finalizers})",
                    crate::duration::pretty(timeout)
                ));
            }
            Err(err) if Instant::now() >= deadline => {
                return Err(format!("reading {reference}: {err}"));
            }
            _ => tokio::time::sleep(POLL).await,
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

/// Sends one request and checks it; returns the body (JSON when it parses, else text).
async fn request_once(
    gateway: &GatewayAccess,
    op: &RequestOp,
    timeout: Duration,
) -> Result<Value, Failure> {
    let method = op
        .method
        .as_deref()
        .unwrap_or("GET")
        .parse::<reqwest::Method>()
        .map_err(|e| fail(e.to_string()))?;
    let url = format!("{}{}", gateway.base_url, op.path);
    let mut request = gateway
        .client
        .request(method.clone(), &url)
        .timeout(timeout);
    if let Some(body) = &op.body {
        request = request.json(body);
    }
    let started = Instant::now();
    let res = request.send().await;
    let res = match res {
        Err(err) if op.expect.connection_error => {
            let _ = err;
            return Ok(Value::Null);
        }
        Err(err) => {
            return Err(Failure {
                message: format!("{method} {}: no answer: {err}", op.path),
                awaited: op.expect.status.map(|s| format!("status {s}")),
                ..Failure::default()
            });
        }
        Ok(res) => res,
    };
    let status = res.status().as_u16();
    let text = match res.text().await {
        Ok(text) => text,
        Err(err) if op.expect.connection_error => {
            let _ = err;
            return Ok(Value::Null);
        }
        Err(err) => {
            return Err(fail(format!(
                "{method} {}: reading the body: {err}",
                op.path
            )));
        }
    };
    let elapsed = started.elapsed();
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|_| Value::String(text.clone()));
    let seen = || {
        format!(
            "status {status} after {}\n{}",
            crate::duration::pretty(elapsed),
            truncate(&text, 2000)
        )
    };
    if op.expect.connection_error {
        return Err(Failure {
            message: format!(
                "{method} {}: expected a connection error, got status {status}",
                op.path
            ),
            last_seen: Some(seen()),
            ..Failure::default()
        });
    }
    let wanted: Vec<u16> = match (&op.expect.status, op.expect.status_in.is_empty()) {
        (Some(one), _) => vec![*one],
        (None, false) => op.expect.status_in.clone(),
        (None, true) => vec![200],
    };
    if !wanted.contains(&status) {
        let wanted = wanted
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(" or ");
        return Err(Failure {
            message: format!("{method} {}: status {status}, expected {wanted}", op.path),
            awaited: Some(format!("status {wanted}")),
            last_seen: Some(seen()),
            diff: None,
        });
    }
    if let Some(expected) = &op.expect.body
        && !matcher::matches(expected, &body)
    {
        return Err(Failure {
            message: format!("{method} {}: body does not match", op.path),
            awaited: Some("the expected body".into()),
            last_seen: Some(seen()),
            diff: Some(matcher::diff(expected, &body)),
        });
    }
    if let Some(needle) = &op.expect.body_contains
        && !text.contains(needle.as_str())
    {
        return Err(Failure {
            message: format!("{method} {}: body does not contain `{needle}`", op.path),
            last_seen: Some(seen()),
            ..Failure::default()
        });
    }
    if let Some(max) = op.expect.max_duration
        && elapsed > max.0
    {
        return Err(Failure {
            message: format!(
                "{method} {}: took {}, limit {max}",
                op.path,
                crate::duration::pretty(elapsed)
            ),
            last_seen: Some(seen()),
            ..Failure::default()
        });
    }
    Ok(body)
}

/// `request_once`, retried until it passes when `eventually` is set.
async fn request_until(
    gateway: &GatewayAccess,
    op: &RequestOp,
    timeout: Duration,
) -> Result<Value, Failure> {
    if !op.eventually {
        return request_once(gateway, op, timeout).await;
    }
    let deadline = Instant::now() + timeout;
    loop {
        let per_try = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(500));
        match request_once(gateway, op, per_try.min(Duration::from_secs(10))).await {
            Ok(body) => return Ok(body),
            Err(failure) if Instant::now() >= deadline => {
                return Err(Failure {
                    message: format!(
                        "still failing after {}: {}",
                        crate::duration::pretty(timeout),
                        failure.message
                    ),
                    ..failure
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn truncate(text: &str, n: usize) -> &str {
    &text[..crate::duration::char_floor(text, n)]
}

async fn watch_until(
    gateway: &GatewayAccess,
    path: &str,
    expected: &[(String, Option<Value>)],
    timeout: Duration,
) -> OpResultT {
    let url = format!("{}{path}", gateway.base_url);
    let mut seen: Vec<String> = Vec::new();
    let mut next = 0usize;
    let work = async {
        let res = gateway
            .client
            .get(&url)
            .send()
            .await
            .map_err(|e| fail(format!("GET {path}: {e}")))?;
        if !res.status().is_success() {
            let status = res.status();
            let text = res.text().await.unwrap_or_default();
            return Err(Failure {
                message: format!("GET {path}: status {status}"),
                last_seen: Some(text),
                ..Failure::default()
            });
        }
        let mut stream = res.bytes_stream();
        let mut lines = buildplane_runtime::LineBuffer::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| fail(format!("watch stream broke: {e}")))?;
            lines.push(&chunk);
            while let Some(line) = lines.next_line() {
                let Ok(event) = serde_json::from_slice::<Value>(&line) else {
                    continue;
                };
                let kind = event
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                let name = event
                    .pointer("/object/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                seen.push(format!("{kind} {name}"));
                let (want_kind, want_object) = &expected[next];
                let object_ok = want_object.as_ref().is_none_or(|o| {
                    matcher::matches(o, event.get("object").unwrap_or(&Value::Null))
                });
                if *want_kind == kind && object_ok {
                    next += 1;
                    if next == expected.len() {
                        return Ok(());
                    }
                }
            }
        }
        Err(fail(
            "the watch stream ended before every expected event arrived",
        ))
    };
    let res = tokio::time::timeout(timeout, work).await;
    let describe = |failure: Failure| Failure {
        awaited: Some(format!(
            "events in order: {}",
            expected
                .iter()
                .map(|(k, _)| k.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
        last_seen: Some(format!(
            "matched {next} of {}; events seen: {}",
            expected.len(),
            seen.join(", ")
        )),
        ..failure
    };
    match res {
        Ok(Ok(())) => Ok(()),
        Ok(Err(failure)) => Err(describe(failure)),
        Err(_) => Err(describe(fail(format!(
            "not every event arrived within {}",
            crate::duration::pretty(timeout)
        )))),
    }
}

/// Runs request load until the duration passes or `stop` is set.
async fn run_load(
    gateway: &GatewayAccess,
    paths: &[String],
    op: &LoadOp,
    scenario_started: Instant,
    mut stop: tokio::sync::watch::Receiver<bool>,
    name: String,
) -> LoadReport {
    let ok_statuses: Vec<u16> = if op.ok_statuses.is_empty() {
        vec![200]
    } else {
        op.ok_statuses.clone()
    };
    let period = Duration::from_secs_f64(1.0 / op.rate.max(0.001));
    let semaphore = Arc::new(tokio::sync::Semaphore::new(op.concurrency.max(1) as usize));
    let samples = Arc::new(Mutex::new(Vec::<(LoadSample, Option<String>)>::new()));
    let started = Instant::now();
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tasks = Vec::new();
    let mut i = 0usize;
    loop {
        if op.duration.is_some_and(|d| started.elapsed() >= d.0) {
            break;
        }
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        let Ok(permit) = semaphore.clone().acquire_owned().await else {
            break;
        };
        let url = format!("{}{}", gateway.base_url, paths[i % paths.len()]);
        i += 1;
        let client = gateway.client.clone();
        let samples = samples.clone();
        let ok_statuses = ok_statuses.clone();
        let new_connection = op.new_connections;
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let mut request = client.get(&url).timeout(Duration::from_secs(10));
            if new_connection {
                request = request.header(reqwest::header::CONNECTION, "close");
            }
            let res = request.send().await;
            let error = match res {
                Ok(res) => {
                    let status = res.status().as_u16();
                    let body = res.bytes().await;
                    match body {
                        Ok(_) if ok_statuses.contains(&status) => None,
                        Ok(_) => Some(format!("status {status}")),
                        Err(err) => Some(format!("body: {err}")),
                    }
                }
                Err(err) => Some(format!(
                    "error: {}",
                    if err.is_timeout() {
                        "timeout".to_string()
                    } else {
                        err.to_string()
                    }
                )),
            };
            let sample = LoadSample {
                t: sent.duration_since(scenario_started).as_secs_f64(),
                latency_ms: sent.elapsed().as_secs_f64() * 1000.0,
                ok: error.is_none(),
            };
            samples
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((sample, error));
            drop(permit);
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|e| e.into_inner()));
    let mut report = LoadReport {
        name,
        ..LoadReport::default()
    };
    let mut latencies: Vec<f64> = samples.iter().map(|(s, _)| s.latency_ms).collect();
    latencies.sort_by(f64::total_cmp);
    let percentile = |p: f64| {
        if latencies.is_empty() {
            0.0
        } else {
            latencies[((latencies.len() as f64 - 1.0) * p).round() as usize]
        }
    };
    report.p50_ms = percentile(0.5);
    report.p90_ms = percentile(0.9);
    report.p99_ms = percentile(0.99);
    report.total = samples.len() as u64;
    for (sample, error) in samples {
        if let Some(error) = error {
            report.failed += 1;
            *report.errors.entry(error).or_default() += 1;
        }
        report.samples.push(sample);
    }
    report.samples.sort_by(|a, b| a.t.total_cmp(&b.t));
    report
}

fn check_load(report: &LoadReport, op: &LoadOp) -> OpResultT {
    let mut problems = Vec::new();
    let error_rate = if report.total == 0 {
        0.0
    } else {
        report.failed as f64 / report.total as f64
    };
    if error_rate > op.expect.max_error_rate {
        problems.push(format!(
            "error rate {:.4} > {}",
            error_rate, op.expect.max_error_rate
        ));
    }
    if let Some(min) = op.expect.min_requests
        && report.total < min
    {
        problems.push(format!("{} requests < {min}", report.total));
    }
    for (label, limit, value) in [
        ("p50", op.expect.p50, report.p50_ms),
        ("p90", op.expect.p90, report.p90_ms),
        ("p99", op.expect.p99, report.p99_ms),
    ] {
        if let Some(limit) = limit
            && value > limit.0.as_secs_f64() * 1000.0
        {
            problems.push(format!("{label} {value:.1}ms > {limit}"));
        }
    }
    if let Some(limit) = op.expect.max_failure_latency {
        let limit_ms = limit.0.as_secs_f64() * 1000.0;
        let slow: Vec<&LoadSample> = report
            .samples
            .iter()
            .filter(|s| !s.ok && s.latency_ms > limit_ms)
            .collect();
        if let Some(slowest) = slow
            .iter()
            .max_by(|a, b| a.latency_ms.total_cmp(&b.latency_ms))
        {
            problems.push(format!(
                "{} failed request(s) took longer than {limit} (the slowest {:.0}ms, sent at {:.1}s)",
                slow.len(),
                slowest.latency_ms,
                slowest.t
            ));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(Failure {
        message: format!("load `{}`: {}", report.name, problems.join(", ")),
        awaited: Some(format!("error rate <= {}", op.expect.max_error_rate)),
        last_seen: Some(format!(
            "{} requests, {} failed; p50 {:.1}ms p90 {:.1}ms p99 {:.1}ms; errors: {}",
            report.total,
            report.failed,
            report.p50_ms,
            report.p90_ms,
            report.p99_ms,
            report
                .errors
                .iter()
                .map(|(k, v)| format!("{k} x{v}"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        diff: None,
    })
}

/// Number of live connections in the gateway's `/api/v1/connections` answer.
async fn connection_count(gateway: &GatewayAccess) -> Option<f64> {
    let url = format!("{}/api/v1/connections", gateway.base_url);
    let res = gateway
        .client
        .get(&url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    let value: Value = res.json().await.ok()?;
    count_connections(&value)
}

/// Reads a connection count out of the connection table in its likely shapes.
pub fn count_connections(value: &Value) -> Option<f64> {
    match value {
        Value::Array(items) => Some(items.len() as f64),
        Value::Object(map) => {
            for key in ["connections", "items"] {
                if let Some(Value::Array(items)) = map.get(key) {
                    return Some(items.len() as f64);
                }
            }
            map.get("total").and_then(Value::as_f64)
        }
        _ => None,
    }
}

/// Sum of the samples of a metric (exact name, or with `_total`) whose labels match.
pub fn prometheus_sum(text: &str, name: &str, labels: &BTreeMap<String, String>) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, rest) = match line.find('{') {
            Some(open) => {
                let Some(close) = line.rfind('}') else {
                    continue;
                };
                (
                    &line[..open],
                    Some((&line[open + 1..close], line[close + 1..].trim())),
                )
            }
            None => (line.split_whitespace().next().unwrap_or_default(), None),
        };
        if series != name && series != format!("{name}_total") {
            continue;
        }
        let (label_text, value_text) = match rest {
            Some((labels, value)) => (labels, value),
            None => ("", line[series.len()..].trim()),
        };
        let parsed: BTreeMap<&str, &str> = label_text
            .split(',')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim().trim_matches('"')))
            .collect();
        if !labels
            .iter()
            .all(|(k, v)| parsed.get(k.as_str()) == Some(&v.as_str()))
        {
            continue;
        }
        let Some(value) = value_text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        *sum.get_or_insert(0.0) += value;
    }
    sum
}

/// The largest increase of a series within any one-second window (across a gap of more than
/// a second between samples, the increase divided by the gap).
pub fn max_rise_per_second(points: &[(f64, f64)]) -> f64 {
    let mut best = 0.0f64;
    for pair in points.windows(2) {
        let dt = pair[1].0 - pair[0].0;
        if dt > 1.0 {
            best = best.max((pair[1].1 - pair[0].1) / dt);
        }
    }
    let mut start = 0usize;
    for end in 0..points.len() {
        while points[end].0 - points[start].0 > 1.0 {
            start += 1;
        }
        let window_min = points[start..=end]
            .iter()
            .map(|p| p.1)
            .fold(f64::INFINITY, f64::min);
        best = best.max(points[end].1 - window_min);
    }
    best
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

    /// Metric sums follow names (with `_total`) and label filters.
    #[test]
    fn sums_prometheus_samples() {
        let text = "# HELP x\ngw_connections{plane=\"a\"} 3\ngw_connections{plane=\"b\"} 4\ngw_handshakes_total 10\n";
        assert_eq!(
            prometheus_sum(text, "gw_connections", &BTreeMap::new()),
            Some(7.0)
        );
        let filter = BTreeMap::from([("plane".to_string(), "b".to_string())]);
        assert_eq!(prometheus_sum(text, "gw_connections", &filter), Some(4.0));
        assert_eq!(
            prometheus_sum(text, "gw_handshakes", &BTreeMap::new()),
            Some(10.0)
        );
        assert_eq!(prometheus_sum(text, "missing", &BTreeMap::new()), None);
    }

    /// The rise per second looks at one-second windows, not the whole series.
    #[test]
    fn measures_rise_per_second() {
        let points = [
            (0.0, 0.0),
            (0.5, 50.0),
            (1.0, 100.0),
            (1.5, 120.0),
            (2.0, 130.0),
            (5.0, 1000.0),
        ];
        assert_eq!(max_rise_per_second(&points[..5]), 100.0);
        assert_eq!(max_rise_per_second(&points), 290.0);
    }

    /// Connection tables are counted in their likely shapes.
    #[test]
    fn counts_connections_in_any_shape() {
        assert_eq!(count_connections(&json!([1, 2])), Some(2.0));
        assert_eq!(count_connections(&json!({"connections": [1]})), Some(1.0));
        assert_eq!(count_connections(&json!({"total": 7})), Some(7.0));
    }
}
