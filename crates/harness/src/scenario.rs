//! The scenario file model: one YAML file describes one scenario (steps of operations).
//!
//! The types here are the single source of truth: the JSON Schema (`cargo xtask e2e schema`)
//! is generated from them, and `cargo xtask e2e lint` parses with them.
//! Scenario files name targets (`cluster: control|build`, component and agent names), never
//! ports or processes, so the same file runs on every backend.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::duration::Dur;
pub use crate::load::CpuPriority;

/// One end-to-end scenario.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Scenario {
    /// Unique name; by convention the file name without `.yaml`.
    pub name: String,
    /// What the scenario guards, and how it was seen to fail when that behaviour is broken.
    pub description: String,
    /// Free labels; `fast` scenarios also run under `cargo test`, `slow` ones only via xtask.
    #[serde(default)]
    pub labels: Vec<String>,
    /// Whether the scenario may run at the same time as others (default true).
    /// Non-concurrent scenarios run first, one at a time.
    #[serde(default = "default_true")]
    pub concurrent: bool,
    /// Default timeouts for the scenario's operations (overriding the suite's).
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Components deployed before the first step (default: gateway and controller).
    #[serde(default = "default_components")]
    pub components: Vec<ComponentKind>,
    /// Extra command-line flags for deployed components, by component (for example
    /// `gateway: ["--heartbeat-interval", "1s"]`).
    #[serde(default)]
    pub component_args: BTreeMap<ComponentKind, Vec<String>>,
    /// Gateway replicas behind one address (default 1). With more than one, the replicas are
    /// `gateway-0`, `gateway-1`, ... (the `name` of a gateway `start`/`stop`/`kill`; without a
    /// name, all of them), behind a round-robin balancer for agents and one for callers, and
    /// the scenario must require `gatewayReplicas`.
    #[serde(default = "default_replicas", skip_serializing_if = "is_one")]
    pub gateway_replicas: u32,
    /// Bindings available to every step as `$(name)`.
    #[serde(default)]
    pub bindings: BTreeMap<String, Value>,
    /// Per-profile overrides of `bindings` (for example `full: {agents: 10000}`).
    #[serde(default)]
    pub profiles: BTreeMap<String, BTreeMap<String, Value>>,
    /// What the backend must be able to do (the linter checks that the operations need no
    /// more); on a backend without one, the scenario is skipped with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<Capability>,
    /// The steps, run in order.
    pub steps: Vec<Step>,
}

/// Something a scenario needs that not every backend can do.
#[derive(
    Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq, PartialOrd, Ord, Hash,
)]
#[serde(rename_all = "camelCase")]
pub enum Capability {
    /// Faults on an agent's link (`fault`, `heal`): a fault proxy between the clusters.
    LinkFaults,
    /// Stopping and starting a cluster's API server (`kill`/`stop`/`start`/`restart` of
    /// `apiserver`).
    ApiServerLifecycle,
    /// Several gateway replicas behind one address (`gatewayReplicas` above 1).
    GatewayReplicas,
    /// Cutting one gateway replica off from the agents while callers still reach it
    /// (`partition`, and `heal` of a replica): its paths held, nothing closed.
    ReplicaPartitions,
}

impl Capability {
    /// The name as written in scenario files.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LinkFaults => "linkFaults",
            Self::ApiServerLifecycle => "apiServerLifecycle",
            Self::GatewayReplicas => "gatewayReplicas",
            Self::ReplicaPartitions => "replicaPartitions",
        }
    }
}

impl std::fmt::Display for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Scenario {
    /// The capabilities the scenario's operations need.
    pub fn needed_capabilities(&self) -> std::collections::BTreeSet<Capability> {
        let mut needed: std::collections::BTreeSet<Capability> = self
            .steps
            .iter()
            .flat_map(|step| step.try_.iter().chain(&step.catch).chain(&step.finally))
            .filter_map(Operation::needs)
            .collect();
        if self.gateway_replicas > 1 {
            needed.insert(Capability::GatewayReplicas);
        }
        needed
    }
}

fn default_true() -> bool {
    true
}

fn default_replicas() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

fn default_components() -> Vec<ComponentKind> {
    vec![ComponentKind::Gateway, ComponentKind::Controller]
}

/// Timeouts per kind of operation; unset ones are inherited suite → scenario → step → operation.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Timeouts {
    /// apply, create and patch.
    pub apply: Option<Dur>,
    /// assert, error, metric waits, awaits.
    pub assert: Option<Dur>,
    /// delete (waiting until the object is gone).
    pub delete: Option<Dur>,
    /// kubectl, script, exec.
    pub exec: Option<Dur>,
    /// Component start/stop/restart (until ready).
    pub component: Option<Dur>,
    /// One request through the gateway.
    pub request: Option<Dur>,
    /// Automatic cleanup at the end of the scenario.
    pub cleanup: Option<Dur>,
}

/// The kinds of timeouts, for inheritance lookups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeoutKind {
    /// See [`Timeouts::apply`].
    Apply,
    /// See [`Timeouts::assert`].
    Assert,
    /// See [`Timeouts::delete`].
    Delete,
    /// See [`Timeouts::exec`].
    Exec,
    /// See [`Timeouts::component`].
    Component,
    /// See [`Timeouts::request`].
    Request,
    /// See [`Timeouts::cleanup`].
    Cleanup,
}

impl Timeouts {
    /// The suite defaults (Chainsaw's, with longer waits for reconnecting agents).
    pub fn suite_defaults() -> Timeouts {
        Timeouts {
            apply: Some(Dur::secs(10)),
            // Long enough for an agent's reconnect backoff (capped at 30 s) plus a reconcile.
            assert: Some(Dur::secs(60)),
            delete: Some(Dur::secs(15)),
            exec: Some(Dur::secs(15)),
            component: Some(Dur::secs(30)),
            request: Some(Dur::secs(60)),
            cleanup: Some(Dur::secs(30)),
        }
    }

    /// The timeout of one kind, if set at this level.
    pub fn get(&self, kind: TimeoutKind) -> Option<Dur> {
        match kind {
            TimeoutKind::Apply => self.apply,
            TimeoutKind::Assert => self.assert,
            TimeoutKind::Delete => self.delete,
            TimeoutKind::Exec => self.exec,
            TimeoutKind::Component => self.component,
            TimeoutKind::Request => self.request,
            TimeoutKind::Cleanup => self.cleanup,
        }
    }

    /// Returns `self` with every unset value taken from `parent`.
    pub fn inherit(&self, parent: &Timeouts) -> Timeouts {
        Timeouts {
            apply: self.apply.or(parent.apply),
            assert: self.assert.or(parent.assert),
            delete: self.delete.or(parent.delete),
            exec: self.exec.or(parent.exec),
            component: self.component.or(parent.component),
            request: self.request.or(parent.request),
            cleanup: self.cleanup.or(parent.cleanup),
        }
    }
}

/// One step: `try` runs in order and stops at the first failure; then `catch` runs if it
/// failed; `finally` always runs. catch and finally run every operation even if one fails.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Step {
    /// Short name shown in progress and reports.
    pub name: String,
    /// Timeouts for this step's operations.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Bindings added for this step (and later ones).
    #[serde(default)]
    pub bindings: BTreeMap<String, Value>,
    /// The operations.
    #[serde(rename = "try")]
    pub try_: Vec<Operation>,
    /// Run when an operation of `try` failed.
    #[serde(default)]
    pub catch: Vec<Operation>,
    /// Always run.
    #[serde(default)]
    pub finally: Vec<Operation>,
}

/// A cluster of the environment.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    Deserialize,
    Serialize,
    JsonSchema,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum ClusterName {
    /// The control plane cluster (BuildPlane CRs, gateway, controller).
    #[default]
    Control,
    /// The build cluster (agents).
    Build,
}

impl ClusterName {
    /// The name as written in scenario files.
    pub fn as_str(self) -> &'static str {
        match self {
            ClusterName::Control => "control",
            ClusterName::Build => "build",
        }
    }
}

/// A deployable or controllable component.
#[derive(
    Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum ComponentKind {
    /// The cluster-agent (needs `name`).
    Agent,
    /// A cluster's API server (needs `cluster`).
    Apiserver,
    /// The buildplane-controller.
    Controller,
    /// The cluster-gateway.
    Gateway,
    /// Many agents in a few processes (`cluster-agent swarm`; needs `name`).
    Swarm,
}

impl ComponentKind {
    /// The name as written in scenario files.
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentKind::Agent => "agent",
            ComponentKind::Apiserver => "apiserver",
            ComponentKind::Controller => "controller",
            ComponentKind::Gateway => "gateway",
            ComponentKind::Swarm => "swarm",
        }
    }
}

/// A number written literally or as a binding (`$(agents)`).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(untagged)]
pub enum Count {
    /// A literal number.
    Literal(u64),
    /// A string with bindings that resolves to a number.
    Bound(String),
}

/// One operation of a step (exactly one key per list item).
///
/// Deserialised by hand from a one-key map (`- apply: {..}`), because serde_yaml 0.9 reads
/// externally tagged enums only from YAML tags; the hand-written visitor keeps line numbers.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[allow(clippy::large_enum_variant)] // Parsed once per file; boxing would only add noise.
pub enum Operation {
    /// Create the objects, or merge-patch them when they exist; deleted at cleanup.
    Apply(ApplyOp),
    /// Assert (eventually, within the timeout) that objects match partially.
    Assert(AssertOp),
    /// Wait for a background operation (`request`, `load`, `watch` with `background`) and check it.
    Await(AwaitOp),
    /// Check a recorded series (for example the reconnect rate during a storm).
    CheckSeries(CheckSeriesOp),
    /// Assert that a check stays true for a duration.
    Consistently(ConsistentlyOp),
    /// Create the objects; fails if one exists; deleted at cleanup.
    Create(ApplyOp),
    /// Delete objects and wait until they are gone.
    Delete(DeleteOp),
    /// Assert (eventually) that no object matches.
    Error(AssertOp),
    /// Run a program (no shell).
    Exec(ExecOp),
    /// Generate a throw-away CA (PEM) into a binding, for CRs that must not match an agent.
    GenerateCa(GenerateCaOp),
    /// Inject a fault on a link (agent → gateway).
    Fault(FaultOp),
    /// Remove every fault from a link, or heal a partitioned gateway replica.
    Heal(HealOp),
    /// Kill a component (SIGKILL, no graceful shutdown).
    Kill(ComponentOp),
    /// Run the real kubectl against a cluster.
    Kubectl(KubectlOp),
    /// Run requests through the gateway for a duration and check error rate and latency.
    Load(LoadOp),
    /// Wait until a Prometheus metric of a component satisfies a comparison.
    Metric(MetricOp),
    /// Cut a gateway replica off from the agents (callers still reach it) until `heal`.
    Partition(PartitionOp),
    /// Merge-patch existing objects (not deleted at cleanup).
    Patch(ApplyOp),
    /// Sample a value over time into a named series (plotted in the HTML report).
    Record(RecordOp),
    /// Renew an agent's leaf certificate now (`cluster-agent renew`).
    RenewLeaf(AgentCommandOp),
    /// Send one request through the gateway's internal API and check the answer.
    Request(RequestOp),
    /// Restart a component (graceful stop, then start with the same identity).
    Restart(ComponentOp),
    /// Start or finish an agent's CA rotation (`cluster-agent rotate-ca`).
    RotateCa(RotateCaOp),
    /// Run a shell script (`sh -c`), with `KUBECONFIG` holding both clusters' contexts.
    Script(ScriptOp),
    /// Wait for a fixed time (prefer assert/consistently).
    Sleep(SleepOp),
    /// Start a component.
    Start(ComponentOp),
    /// Stop a component gracefully (SIGTERM).
    Stop(ComponentOp),
    /// Open a watch through the gateway and wait for events (in the background if named).
    Watch(WatchOp),
}

impl Operation {
    /// The capability this operation needs from the backend, if any.
    pub fn needs(&self) -> Option<Capability> {
        match self {
            Operation::Partition(_) => Some(Capability::ReplicaPartitions),
            Operation::Heal(op) if op.component.is_some() => Some(Capability::ReplicaPartitions),
            Operation::Fault(_) | Operation::Heal(_) => Some(Capability::LinkFaults),
            Operation::Kill(op)
            | Operation::Restart(op)
            | Operation::Start(op)
            | Operation::Stop(op)
                if op.component == Some(ComponentKind::Apiserver) =>
            {
                Some(Capability::ApiServerLifecycle)
            }
            _ => None,
        }
    }

    /// The operation's key as written in YAML.
    pub fn kind(&self) -> &'static str {
        match self {
            Operation::Apply(_) => "apply",
            Operation::Assert(_) => "assert",
            Operation::Await(_) => "await",
            Operation::CheckSeries(_) => "checkSeries",
            Operation::Consistently(_) => "consistently",
            Operation::Create(_) => "create",
            Operation::Delete(_) => "delete",
            Operation::Error(_) => "error",
            Operation::Exec(_) => "exec",
            Operation::GenerateCa(_) => "generateCa",
            Operation::Fault(_) => "fault",
            Operation::Heal(_) => "heal",
            Operation::Kill(_) => "kill",
            Operation::Kubectl(_) => "kubectl",
            Operation::Load(_) => "load",
            Operation::Metric(_) => "metric",
            Operation::Partition(_) => "partition",
            Operation::Patch(_) => "patch",
            Operation::Record(_) => "record",
            Operation::RenewLeaf(_) => "renewLeaf",
            Operation::Request(_) => "request",
            Operation::Restart(_) => "restart",
            Operation::RotateCa(_) => "rotateCa",
            Operation::Script(_) => "script",
            Operation::Sleep(_) => "sleep",
            Operation::Start(_) => "start",
            Operation::Stop(_) => "stop",
            Operation::Watch(_) => "watch",
        }
    }

    /// The operation's own description, if any.
    pub fn description(&self) -> Option<&str> {
        let description = match self {
            Operation::Apply(op) | Operation::Create(op) | Operation::Patch(op) => &op.description,
            Operation::Assert(op) | Operation::Error(op) => &op.description,
            Operation::Request(op) => &op.description,
            Operation::Kubectl(op) => &op.description,
            Operation::Script(op) => &op.description,
            Operation::Exec(op) => &op.description,
            Operation::Consistently(op) => &op.description,
            Operation::Load(op) => &op.description,
            Operation::Delete(op) => &op.description,
            Operation::Watch(op) => &op.description,
            Operation::Metric(op) => &op.description,
            Operation::Fault(op) => &op.description,
            Operation::Heal(op) => &op.description,
            Operation::Partition(op) => &op.description,
            Operation::Kill(op)
            | Operation::Restart(op)
            | Operation::Start(op)
            | Operation::Stop(op) => &op.description,
            _ => &None,
        };
        description.as_deref()
    }

    /// The timeout written on the operation itself.
    pub fn own_timeout(&self) -> Option<Dur> {
        match self {
            Operation::Apply(op) | Operation::Create(op) | Operation::Patch(op) => op.timeout,
            Operation::Assert(op) | Operation::Error(op) => op.timeout,
            Operation::Await(op) => op.timeout,
            Operation::Delete(op) => op.timeout,
            Operation::Exec(op) => op.timeout,
            Operation::Kubectl(op) => op.timeout,
            Operation::Script(op) => op.timeout,
            Operation::Kill(op)
            | Operation::Restart(op)
            | Operation::Start(op)
            | Operation::Stop(op) => op.timeout,
            Operation::Metric(op) => op.timeout,
            Operation::Request(op) => op.timeout,
            Operation::Watch(op) => op.timeout,
            Operation::RotateCa(op) => op.timeout,
            Operation::RenewLeaf(op) => op.timeout,
            _ => None,
        }
    }

    /// Which inherited timeout applies when the operation sets none.
    pub fn timeout_kind(&self) -> TimeoutKind {
        match self {
            Operation::Apply(_) | Operation::Create(_) | Operation::Patch(_) => TimeoutKind::Apply,
            Operation::Delete(_) => TimeoutKind::Delete,
            Operation::Exec(_) | Operation::Kubectl(_) | Operation::Script(_) => TimeoutKind::Exec,
            Operation::RotateCa(_) | Operation::RenewLeaf(_) => TimeoutKind::Exec,
            Operation::Kill(_)
            | Operation::Restart(_)
            | Operation::Start(_)
            | Operation::Stop(_) => TimeoutKind::Component,
            Operation::Request(_) => TimeoutKind::Request,
            _ => TimeoutKind::Assert,
        }
    }

    /// Whether a failure of this operation is tolerated.
    pub fn continue_on_error(&self) -> bool {
        match self {
            Operation::Kubectl(op) => op.continue_on_error,
            Operation::Script(op) => op.continue_on_error,
            Operation::Exec(op) => op.continue_on_error,
            Operation::Delete(op) => op.continue_on_error,
            _ => false,
        }
    }
}

macro_rules! operation_keys {
    ($($key:literal => $variant:ident($ty:ty),)*) => {
        const OPERATION_KEYS: &[&str] = &[$($key),*];

        struct OperationVisitor;

        impl<'de> serde::de::Visitor<'de> for OperationVisitor {
            type Value = Operation;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "an operation: a map with exactly one key of {}", OPERATION_KEYS.join(", "))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Operation, A::Error> {
                use serde::de::Error as _;
                let key: String = map
                    .next_key()?
                    .ok_or_else(|| A::Error::custom("empty operation; expected one key"))?;
                let operation = match key.as_str() {
                    $($key => Operation::$variant(map.next_value::<$ty>()?),)*
                    other => return Err(A::Error::unknown_variant(other, OPERATION_KEYS)),
                };
                if let Some(extra) = map.next_key::<String>()? {
                    return Err(A::Error::custom(format!(
                        "an operation has exactly one key; found `{key}` and `{extra}` (write them as two list items)"
                    )));
                }
                Ok(operation)
            }
        }
    };
}

operation_keys! {
    "apply" => Apply(ApplyOp),
    "assert" => Assert(AssertOp),
    "await" => Await(AwaitOp),
    "checkSeries" => CheckSeries(CheckSeriesOp),
    "consistently" => Consistently(ConsistentlyOp),
    "create" => Create(ApplyOp),
    "delete" => Delete(DeleteOp),
    "error" => Error(AssertOp),
    "exec" => Exec(ExecOp),
    "generateCa" => GenerateCa(GenerateCaOp),
    "fault" => Fault(FaultOp),
    "heal" => Heal(HealOp),
    "kill" => Kill(ComponentOp),
    "kubectl" => Kubectl(KubectlOp),
    "load" => Load(LoadOp),
    "metric" => Metric(MetricOp),
    "partition" => Partition(PartitionOp),
    "patch" => Patch(ApplyOp),
    "record" => Record(RecordOp),
    "renewLeaf" => RenewLeaf(AgentCommandOp),
    "request" => Request(RequestOp),
    "restart" => Restart(ComponentOp),
    "rotateCa" => RotateCa(RotateCaOp),
    "script" => Script(ScriptOp),
    "sleep" => Sleep(SleepOp),
    "start" => Start(ComponentOp),
    "stop" => Stop(ComponentOp),
    "watch" => Watch(WatchOp),
}

impl<'de> Deserialize<'de> for Operation {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Operation, D::Error> {
        deserializer.deserialize_map(OperationVisitor)
    }
}

/// Objects given inline or from a file (relative to the scenario file; multi-document YAML).
/// Strings in either go through binding substitution.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ApplyOp {
    /// Human description shown in reports.
    pub description: Option<String>,
    /// Target cluster (default control).
    #[serde(default)]
    pub cluster: ClusterName,
    /// The object (apiVersion, kind, metadata, ...).
    pub object: Option<Value>,
    /// A YAML file with one or more objects.
    pub file: Option<String>,
    /// Apply once per element of this list binding (`$(swarm.planes)`), binding it as `$(item)`
    /// and its position as `$(index)`.
    pub for_each: Option<String>,
    /// Apply `count` copies, binding `$(index)` from 0.
    pub count: Option<Count>,
    /// Expect the API server to reject the object with a message containing this text.
    pub expect_error: Option<String>,
    /// Operation timeout.
    pub timeout: Option<Dur>,
}

/// Partial-match assertion on objects (also used by `error`, which asserts absence).
///
/// The expected object is a subset of the actual one: maps match key by key, lists match by
/// key (`type` for conditions, `name` otherwise) or, without keys, element by element in any
/// order. Strings of the form `(op value)` compare: `(> 0)`, `(>= 3)`, `(< 5)`, `(<= 5)`,
/// `(!= x)`, `(~ regex)`, `(exists)`, `(absent)`.
/// Without `metadata.name`, the assertion passes when any object of the kind (in the namespace,
/// with the labels) matches.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AssertOp {
    /// Human description shown in reports.
    pub description: Option<String>,
    /// Target cluster (default control).
    #[serde(default)]
    pub cluster: ClusterName,
    /// The expected (partial) object.
    pub object: Option<Value>,
    /// A YAML file with the expected object.
    pub file: Option<String>,
    /// How long to keep polling.
    pub timeout: Option<Dur>,
}

/// Delete objects named by reference or by an object.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DeleteOp {
    /// Human description shown in reports.
    pub description: Option<String>,
    /// Target cluster (default control).
    #[serde(default)]
    pub cluster: ClusterName,
    /// The object to delete (apiVersion, kind, metadata.name, metadata.namespace).
    pub object: Option<Value>,
    /// A YAML file with the objects.
    pub file: Option<String>,
    /// Wait until the object is gone (default true).
    #[serde(default = "default_true")]
    pub wait: bool,
    /// Tolerate failure.
    #[serde(default)]
    pub continue_on_error: bool,
    /// Operation timeout.
    pub timeout: Option<Dur>,
}

/// Expected outcome of a command.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CommandExpect {
    /// Expected exit code (default 0).
    pub exit_code: Option<i32>,
    /// Text stdout must contain.
    pub stdout_contains: Option<String>,
    /// Text stderr must contain.
    pub stderr_contains: Option<String>,
}

/// How a command's stdout is stored into a binding.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// The text as is.
    #[default]
    Text,
    /// The text with surrounding whitespace trimmed.
    Trimmed,
    /// Parsed as JSON.
    Json,
    /// Parsed as YAML.
    Yaml,
    /// Base64-decoded to text (for `-o jsonpath={.data.x}` of a Secret).
    Base64,
}

/// Command-line arguments, as a list or as one string split like a shell would (quotes kept together).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Args {
    /// One string, split on whitespace outside quotes.
    Line(String),
    /// Explicit list.
    List(Vec<String>),
}

/// Run the real kubectl against one cluster: `kubectl --kubeconfig K --context C ARGS`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct KubectlOp {
    /// Human description shown in reports.
    pub description: Option<String>,
    /// Target cluster (default control).
    #[serde(default)]
    pub cluster: ClusterName,
    /// The arguments after the cluster selection.
    pub args: Args,
    /// Text fed to stdin (for `apply -f -`).
    pub stdin: Option<String>,
    /// Binding that receives stdout.
    pub output: Option<String>,
    /// How stdout is stored.
    #[serde(default)]
    pub output_format: OutputFormat,
    /// Expected outcome (default exit code 0).
    #[serde(default)]
    pub expect: CommandExpect,
    /// Tolerate failure.
    #[serde(default)]
    pub continue_on_error: bool,
    /// Operation timeout.
    pub timeout: Option<Dur>,
}

/// Run a shell script with `sh -c`. `KUBECONFIG` lists every cluster; the contexts are in the
/// bindings `$(controlContext)` and `$(buildContext)`, also exported as `CONTROL_CONTEXT`
/// and `BUILD_CONTEXT`. Shell `$(cmd args)` with spaces is left alone; write `$$(x)` for a
/// literal `$(x)`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ScriptOp {
    /// Human description shown in reports.
    pub description: Option<String>,
    /// The script.
    pub content: String,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Binding that receives stdout.
    pub output: Option<String>,
    /// How stdout is stored.
    #[serde(default)]
    pub output_format: OutputFormat,
    /// Expected outcome (default exit code 0).
    #[serde(default)]
    pub expect: CommandExpect,
    /// Tolerate failure.
    #[serde(default)]
    pub continue_on_error: bool,
    /// Operation timeout.
    pub timeout: Option<Dur>,
}

/// Run a program directly.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExecOp {
    /// Human description shown in reports.
    pub description: Option<String>,
    /// Program and arguments.
    pub command: Vec<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Binding that receives stdout.
    pub output: Option<String>,
    /// How stdout is stored.
    #[serde(default)]
    pub output_format: OutputFormat,
    /// Expected outcome (default exit code 0).
    #[serde(default)]
    pub expect: CommandExpect,
    /// Tolerate failure.
    #[serde(default)]
    pub continue_on_error: bool,
    /// Operation timeout.
    pub timeout: Option<Dur>,
}

/// A throw-away CA certificate (valid for a year) bound as PEM text.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GenerateCaOp {
    /// The CA's common name.
    pub common_name: String,
    /// Binding that receives the certificate (PEM).
    pub output: String,
}

/// Start, stop, kill or restart a component.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ComponentOp {
    /// Human description shown in reports.
    pub description: Option<String>,
    /// Which component.
    pub component: Option<ComponentKind>,
    /// The agent's or swarm's name (also the name of its link for faults).
    pub name: Option<String>,
    /// The API server's cluster (for `apiserver`).
    pub cluster: Option<ClusterName>,
    /// The agent's planeID.
    #[serde(rename = "planeID")]
    pub plane_id: Option<String>,
    /// The agent's identity namespace (default `openchoreo-build-plane`).
    pub identity_namespace: Option<String>,
    /// Tunnel protocol of the agent (`v1` or `v2`).
    pub protocol: Option<String>,
    /// Extra command-line flags (start/restart).
    #[serde(default)]
    pub args: Vec<String>,
    /// Swarm: number of agents.
    pub count: Option<Count>,
    /// Swarm: number of processes the agents are spread over (default 4).
    pub processes: Option<Count>,
    /// Swarm: planeID prefix (each process `k` uses `PREFIX-k`).
    #[serde(rename = "planeIDPrefix")]
    pub plane_id_prefix: Option<String>,
    /// Swarm: binding that receives `[{planeID, ca}]`, one entry per agent.
    pub output: Option<String>,
    /// Operation timeout.
    pub timeout: Option<Dur>,
}

/// Direction of a fault on a link.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Both directions.
    #[default]
    Both,
    /// Agent → gateway.
    Upstream,
    /// Gateway → agent.
    Downstream,
}

/// Slicer: split data into small chunks with a delay between them.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SlicerSpec {
    /// Chunk size in bytes.
    pub size: usize,
    /// Delay between chunks.
    pub delay: Dur,
}

/// Faults on the link between an agent (or swarm) and the gateway. Several may be combined;
/// a new `fault` on the same link replaces the previous set.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultOp {
    /// Human description shown in reports.
    pub description: Option<String>,
    /// The link: an agent's or swarm's name, or `*` for every link.
    pub link: String,
    /// Added latency per chunk.
    pub latency: Option<Dur>,
    /// Random extra latency in `[0, jitter]`.
    pub jitter: Option<Dur>,
    /// Bandwidth cap in KiB per second.
    pub bandwidth_kbps: Option<u64>,
    /// Accept data and drop it; connections stay open but silent.
    #[serde(default)]
    pub blackhole: bool,
    /// Reset every connection now (RST via SO_LINGER 0) and every new one while set.
    #[serde(default)]
    pub reset: bool,
    /// Split data into small chunks.
    pub slicer: Option<SlicerSpec>,
    /// Hold all data and new connections until `heal` (data then flows again).
    #[serde(default)]
    pub partition: bool,
    /// Which direction the latency, bandwidth, blackhole and slicer apply to.
    #[serde(default)]
    pub direction: Direction,
}

/// Remove all faults from a link (`link`), or heal a gateway replica's partition
/// (`component: gateway` and `name`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HealOp {
    /// Human description shown in reports.
    pub description: Option<String>,
    /// The link (agent or swarm name, or `*`).
    pub link: Option<String>,
    /// `gateway`, to heal a replica's partition (with `name`).
    pub component: Option<ComponentKind>,
    /// The partitioned replica (`gateway-1`).
    pub name: Option<String>,
}

/// Whom a gateway replica is cut off from.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum PartitionFrom {
    /// The agents: their connections to the replica, live and new, carry nothing either way
    /// and nothing closes them; callers (the internal API) and the control cluster still
    /// reach it.
    #[default]
    Agents,
}

impl PartitionFrom {
    /// The name as written in scenario files.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Agents => "agents",
        }
    }
}

/// Cut one gateway replica off (until `heal` with the same `component` and `name`).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PartitionOp {
    /// Human description shown in reports.
    pub description: Option<String>,
    /// `gateway`.
    pub component: ComponentKind,
    /// The replica (`gateway-1`).
    pub name: String,
    /// Whom it is cut off from.
    #[serde(default)]
    pub from: PartitionFrom,
}

/// Expected answer of a request.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestExpect {
    /// Expected HTTP status.
    pub status: Option<u16>,
    /// Any of these statuses (when `status` is unset), e.g. `[403, 503]` for "refused, either
    /// as not authorised or as no agent".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub status_in: Vec<u16>,
    /// Partial match on the JSON body.
    pub body: Option<Value>,
    /// Text the body must contain.
    pub body_contains: Option<String>,
    /// Upper bound on the request's duration (for "fails fast").
    pub max_duration: Option<Dur>,
    /// A connection error (no HTTP answer) is the expected outcome.
    #[serde(default)]
    pub connection_error: bool,
}

/// One request to the gateway's internal API (mTLS), for example a proxied Kubernetes call
/// `/api/proxy/buildplane/$(planeID)/$(namespace)/NAME/k8s/api/v1/namespaces`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestOp {
    /// Human description shown in reports.
    pub description: Option<String>,
    /// HTTP method (default GET).
    pub method: Option<String>,
    /// Path on the internal listener.
    pub path: String,
    /// JSON body.
    pub body: Option<Value>,
    /// Expected answer.
    #[serde(default)]
    pub expect: RequestExpect,
    /// Retry until the expectation holds or the timeout passes (default: one attempt).
    #[serde(default)]
    pub eventually: bool,
    /// Run in the background under this name; check it later with `await`.
    pub background: Option<String>,
    /// Binding that receives the JSON body.
    pub output: Option<String>,
    /// Operation timeout.
    pub timeout: Option<Dur>,
}

/// Limits a load run must respect.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadExpect {
    /// Largest tolerated fraction of failed requests (default 0).
    #[serde(default)]
    pub max_error_rate: f64,
    /// Smallest number of requests that must have been sent.
    pub min_requests: Option<u64>,
    /// Upper bound on the median latency.
    pub p50: Option<Dur>,
    /// Upper bound on the 90th percentile.
    pub p90: Option<Dur>,
    /// Upper bound on the 99th percentile.
    pub p99: Option<Dur>,
    /// Upper bound on the time any failed request took: a failure must come fast (a request
    /// that hangs until the client gives up breaks it).
    pub max_failure_latency: Option<Dur>,
    /// Upper bound on the p99 relative to an earlier load of the same scenario (a noisy
    /// neighbour's effect on a quiet tenant).
    pub p99_within: Option<P99Within>,
}

/// `p99Within: {of: quiet-alone, increase: 0.2}`: this load's p99 at most 20 % above the p99
/// of the finished load `quiet-alone`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct P99Within {
    /// The earlier load (its `background` name, or `load`).
    pub of: String,
    /// The largest increase as a share (0.2 is 20 %).
    pub increase: f64,
}

/// Request load through the gateway.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadOp {
    /// Human description shown in reports.
    pub description: Option<String>,
    /// Paths requested in turn (GET).
    pub paths: Vec<String>,
    /// Requests per second in total.
    pub rate: f64,
    /// Requests in flight at most.
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// How long to send for; with `background`, until `await` when unset.
    pub duration: Option<Dur>,
    /// Statuses counted as success (default 200).
    #[serde(default)]
    pub ok_statuses: Vec<u16>,
    /// Run in the background under this name.
    pub background: Option<String>,
    /// Each request on a new connection (`Connection: close`), so a balancer in front of
    /// several gateway replicas spreads the requests over them as it would many callers'
    /// (otherwise the few pooled connections each stay on one replica).
    #[serde(default)]
    pub new_connections: bool,
    /// The CPU priority of the load's callers (`lowest`: nice 19, standing in for callers on
    /// machines of their own; see [`CpuPriority`]). Applies to a load in an `e2e-load`
    /// process; a load on a thread of the harness keeps the harness's priority and its report
    /// says so.
    #[serde(default)]
    pub cpu_priority: CpuPriority,
    /// Limits checked at the end.
    #[serde(default)]
    pub expect: LoadExpect,
}

fn default_concurrency() -> u32 {
    4
}

/// Wait for a background operation and apply its checks.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AwaitOp {
    /// The `background` name.
    pub name: String,
    /// How long to wait.
    pub timeout: Option<Dur>,
}

/// What to sample.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum RecordSource {
    /// Live agent connections at the gateway (`/api/v1/connections`).
    GatewayConnections,
    /// A Prometheus metric (`metric`) of a component (`component`), summed over its series.
    Metric,
}

/// Sample a value every `interval` until the scenario ends.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RecordOp {
    /// Series name (shown in the report).
    pub name: String,
    /// What to sample.
    pub source: RecordSource,
    /// Component to scrape (for `source: metric`).
    pub component: Option<ComponentKind>,
    /// Metric name (for `source: metric`).
    pub metric: Option<String>,
    /// Sampling interval (default 250ms).
    pub interval: Option<Dur>,
}

/// Checks on a recorded series.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CheckSeriesOp {
    /// Series name.
    pub name: String,
    /// Largest rise of the value within any one second.
    pub max_rise_per_second: Option<Count>,
    /// The last sample must be at least this.
    pub final_at_least: Option<Count>,
    /// Keep checking `finalAtLeast` until it holds or this time passes.
    pub within: Option<Dur>,
}

/// Poll a Prometheus metric.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MetricOp {
    /// Human description shown in reports.
    pub description: Option<String>,
    /// Component exposing `/metrics`.
    pub component: ComponentKind,
    /// Agent name when component is `agent`.
    pub instance: Option<String>,
    /// Metric name (samples with this name, summed over series matching `labels`).
    pub name: String,
    /// Label filter.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Comparison such as `>= 1000`, `== 0`, `< 5` (bindings allowed).
    pub value: String,
    /// How long to keep polling.
    pub timeout: Option<Dur>,
}

/// An expected event of a watch.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WatchEvent {
    /// ADDED, MODIFIED or DELETED.
    #[serde(rename = "type")]
    pub type_: String,
    /// Partial match on the event's object.
    pub object: Option<Value>,
}

/// Open a watch (`?watch=true`) through the gateway and wait for the events, in order.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WatchOp {
    /// Human description shown in reports.
    pub description: Option<String>,
    /// Path on the internal listener (watch query added when missing).
    pub path: String,
    /// Events that must arrive, in order (other events may come in between).
    pub events: Vec<WatchEvent>,
    /// Run in the background under this name.
    pub background: Option<String>,
    /// How long to wait for all events.
    pub timeout: Option<Dur>,
}

/// CA rotation of an agent.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RotateCaOp {
    /// The agent's name.
    pub agent: String,
    /// Finish the rotation (drop the old CA) instead of starting it.
    #[serde(default)]
    pub finish: bool,
    /// Binding that receives the agent's CA bundle (`ca.crt`) after the command.
    pub output: Option<String>,
    /// Operation timeout.
    pub timeout: Option<Dur>,
}

/// An agent command without options.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AgentCommandOp {
    /// The agent's name.
    pub agent: String,
    /// Operation timeout.
    pub timeout: Option<Dur>,
}

/// A check that must hold for a whole duration (exactly one of the fields besides `for`).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConsistentlyOp {
    /// Human description shown in reports.
    pub description: Option<String>,
    /// How long the check must keep holding.
    #[serde(rename = "for")]
    pub for_: Dur,
    /// Time between checks (default 250ms).
    pub interval: Option<Dur>,
    /// Objects keep matching.
    pub assert: Option<AssertOp>,
    /// No object matches.
    pub error: Option<AssertOp>,
    /// Requests keep getting the expected answer.
    pub request: Option<RequestOp>,
    /// A metric keeps satisfying the comparison.
    pub metric: Option<MetricOp>,
}

/// A fixed wait.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SleepOp {
    /// How long.
    pub duration: Dur,
}

/// The JSON Schema of scenario files, pretty-printed.
pub fn json_schema() -> String {
    let schema = schemars::schema_for!(Scenario);
    // Invariant: a schemars schema is always serialisable.
    serde_json::to_string_pretty(&schema).expect("schema serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Scenario {
        serde_yaml::from_str(text).unwrap()
    }

    const SCENARIO: &str = "\
name: t
description: fails when broken
timeouts: {assert: 20s}
steps:
  - name: s
    timeouts: {apply: 3s}
    try:
      - assert: {timeout: 7s, object: {apiVersion: v1, kind: ConfigMap}}
      - assert: {object: {apiVersion: v1, kind: ConfigMap}}
      - apply: {object: {apiVersion: v1, kind: ConfigMap}}
      - delete: {object: {apiVersion: v1, kind: ConfigMap}}
";

    /// Timeouts resolve operation → step → scenario → suite.
    #[test]
    fn timeouts_inherit_from_operation_to_suite() {
        let scenario = parse(SCENARIO);
        let suite = Timeouts::suite_defaults();
        let step = &scenario.steps[0];
        let effective = step.timeouts.inherit(&scenario.timeouts.inherit(&suite));
        let resolve = |op: &Operation| {
            op.own_timeout()
                .or_else(|| effective.get(op.timeout_kind()))
                .unwrap()
        };
        assert_eq!(resolve(&step.try_[0]), Dur::secs(7), "the operation's own");
        assert_eq!(resolve(&step.try_[1]), Dur::secs(20), "the scenario's");
        assert_eq!(resolve(&step.try_[2]), Dur::secs(3), "the step's");
        assert_eq!(resolve(&step.try_[3]), suite.delete.unwrap(), "the suite's");
    }

    /// Defaults: concurrent, gateway and controller deployed.
    #[test]
    fn defaults_are_concurrent_with_gateway_and_controller() {
        let scenario = parse(SCENARIO);
        assert!(scenario.concurrent);
        assert_eq!(
            scenario.components,
            vec![ComponentKind::Gateway, ComponentKind::Controller]
        );
    }

    /// Two keys in one list item are rejected with both names.
    #[test]
    fn rejects_two_operations_in_one_item() {
        let text = SCENARIO.replace(
            "      - apply: {object: {apiVersion: v1, kind: ConfigMap}}",
            "      - apply: {object: {apiVersion: v1, kind: ConfigMap}}\n        sleep: {duration: 1s}",
        );
        let err = serde_yaml::from_str::<Scenario>(&text)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`apply` and `sleep`"), "{err}");
    }

    /// The committed schema is what the types generate (`cargo xtask e2e schema --out ...`).
    #[test]
    fn committed_schema_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../scenarios/scenario.schema.json");
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed.trim_end() == json_schema().trim_end(),
            "{} is stale; run `cargo xtask e2e schema --out scenarios/scenario.schema.json`",
            path.display()
        );
    }
}
