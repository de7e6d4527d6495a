//! Backends: where scenarios run. One trait, four implementations (`sim`, `apiserver`,
//! `kubeconfig`, `k3d`).
//!
//! A [`Backend`] hands each scenario an [`Environment`]: two clusters (control and build) reached
//! through kubeconfig contexts, the gateway and controller deployed, and operations to start
//! agents, stop or restart components, inject faults on agent → gateway links, talk to the
//! gateway's internal API and collect evidence. Nothing here assumes processes or ports: the
//! sim backend uses local processes, a k3d backend would use Deployments and Services.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;

use crate::proxy::Toxics;
use crate::scenario::{ClusterName, ComponentKind, PartitionFrom};

pub mod k3d;
pub mod kubeconfig;
pub mod sim;

/// A boxed future (the traits are used as trait objects).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Errors of backends and environments.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The backend exists in name only in this build.
    #[error("backend `{backend}` is not implemented in this build; see {issue}")]
    NotImplemented {
        /// Backend name.
        backend: &'static str,
        /// Where the work is tracked.
        issue: &'static str,
    },
    /// The backend cannot do this operation.
    #[error("backend `{backend}` does not support {what}")]
    Unsupported {
        /// Backend name.
        backend: &'static str,
        /// The operation.
        what: String,
    },
    /// A component cannot run (binary missing, exited at start, never became ready).
    #[error("component `{component}` is not available: {reason}")]
    ComponentUnavailable {
        /// Which component.
        component: String,
        /// Why, with the log tail when there is one.
        reason: String,
    },
    /// No component or link of that name.
    #[error("no {what} named `{name}` in this environment")]
    Unknown {
        /// Kind of thing.
        what: &'static str,
        /// The name asked for.
        name: String,
    },
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// `Result` with [`BackendError`].
pub type Result<T, E = BackendError> = std::result::Result<T, E>;

/// How to reach one cluster with kubectl or kube-rs.
#[derive(Clone, Debug)]
pub struct ClusterAccess {
    /// A kubeconfig file that contains the context.
    pub kubeconfig: PathBuf,
    /// The context to use.
    pub context: String,
}

/// What a scenario asks of its environment before the first step.
#[derive(Clone, Debug)]
pub struct EnvSpec {
    /// Unique id (scenario name plus a run suffix).
    pub id: String,
    /// Components deployed up front.
    pub components: Vec<ComponentKind>,
    /// Extra flags per component.
    pub component_args: BTreeMap<ComponentKind, Vec<String>>,
    /// Directory for files of this environment (logs, certificates, kubeconfigs).
    pub work_dir: PathBuf,
    /// Gateway replicas behind one address (1: a single `gateway`).
    pub gateway_replicas: u32,
}

/// A component instance: kind plus name (agents, swarms) or cluster (API servers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ComponentTarget {
    /// Which component.
    pub kind: ComponentKind,
    /// Agent or swarm name.
    pub name: Option<String>,
    /// API server's cluster.
    pub cluster: Option<ClusterName>,
}

impl std::fmt::Display for ComponentTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.kind.as_str())?;
        if let Some(name) = &self.name {
            write!(f, " {name}")?;
        }
        if let Some(cluster) = self.cluster {
            write!(f, " ({})", cluster.as_str())?;
        }
        Ok(())
    }
}

/// How to start an agent.
#[derive(Clone, Debug)]
pub struct AgentSpec {
    /// Agent name (also its link's name).
    pub name: String,
    /// planeID it announces.
    pub plane_id: String,
    /// Namespace of its Secrets in the build cluster.
    pub identity_namespace: String,
    /// `v1` or `v2` when forced.
    pub protocol: Option<String>,
    /// Extra flags.
    pub args: Vec<String>,
}

/// How to start a swarm of agents.
#[derive(Clone, Debug)]
pub struct SwarmSpec {
    /// Swarm name (also its link's name).
    pub name: String,
    /// Total number of agents.
    pub count: u64,
    /// Number of processes the agents are spread over.
    pub processes: u32,
    /// planeID prefix; process `k` uses `PREFIX-k`.
    pub plane_id_prefix: String,
    /// Extra flags.
    pub args: Vec<String>,
}

/// One agent of a swarm: its planeID and the CA (PEM) that signed its certificate.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SwarmPlane {
    /// The agent's planeID.
    #[serde(rename = "planeID")]
    pub plane_id: String,
    /// The CA bundle to put in the BuildPlane's `clientCA.value`.
    pub ca: String,
}

/// How to stop a component.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// SIGTERM (or a Pod deletion) and a grace period.
    Graceful,
    /// SIGKILL: no cleanup.
    Kill,
}

/// The gateway's internal API as the harness reaches it (mTLS with the harness's certificate).
#[derive(Clone, Debug)]
pub struct GatewayAccess {
    /// For example `https://127.0.0.1:40123`.
    pub base_url: String,
    /// A client presenting the harness's certificate and trusting the gateway's CA.
    pub client: reqwest::Client,
    /// The client's TLS, for [`GatewayAccess::apart`].
    tls: rustls::ClientConfig,
    /// The same identity as PEM, for a load generator in a process of its own.
    pub credentials: Option<crate::load::LoadCredentials>,
}

impl GatewayAccess {
    /// Access to `base_url` with the harness's TLS client configuration.
    pub fn new(base_url: String, tls: rustls::ClientConfig) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls.clone())
            .build()?;
        Ok(GatewayAccess {
            base_url,
            client,
            tls,
            credentials: None,
        })
    }

    /// The same access, with its identity as PEM too (see [`GatewayAccess::credentials`]).
    pub fn with_credentials(self, credentials: crate::load::LoadCredentials) -> Self {
        GatewayAccess {
            credentials: Some(credentials),
            ..self
        }
    }

    /// The same access through another client with its own connection pool: what a second
    /// caller (another tenant) would be. Keeps the shared client if one cannot be built.
    pub fn apart(&self) -> GatewayAccess {
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(self.tls.clone())
            .build()
            .unwrap_or_else(|_| self.client.clone());
        GatewayAccess {
            client,
            ..self.clone()
        }
    }
}

/// Output of a command run for an agent.
#[derive(Clone, Debug)]
pub struct CommandOutput {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Captured stdout.
    pub stdout: String,
    /// Captured stderr.
    pub stderr: String,
}

/// One scenario's clusters and components.
pub trait Environment: Send + Sync {
    /// How to reach a cluster.
    fn cluster(&self, cluster: ClusterName) -> ClusterAccess;

    /// A `KUBECONFIG` value naming every cluster (for scripts and kubectl).
    fn kubeconfig_env(&self) -> String;

    /// The gateway's internal API.
    fn gateway(&self) -> Result<GatewayAccess>;

    /// The `e2e-load` binary that runs a load in a process of its own, when there is one.
    fn load_generator(&self) -> Option<std::path::PathBuf> {
        None
    }

    /// Starts an agent with its own link.
    fn start_agent(&self, spec: AgentSpec) -> BoxFuture<'_, Result<()>>;

    /// Starts a swarm and returns every agent's planeID and CA.
    fn start_swarm(&self, spec: SwarmSpec) -> BoxFuture<'_, Result<Vec<SwarmPlane>>>;

    /// Starts a stopped component again (same identity, same addresses).
    fn start(&self, target: ComponentTarget, args: Vec<String>) -> BoxFuture<'_, Result<()>>;

    /// Stops a component.
    fn stop(&self, target: ComponentTarget, mode: StopMode) -> BoxFuture<'_, Result<()>>;

    /// Sets the faults of a link (`*`: every link); they hold when the future completes.
    fn set_faults(&self, link: &str, toxics: Toxics) -> BoxFuture<'_, Result<()>>;

    /// Cuts gateway replica `replica` off from `from` (its paths hold their bytes, nothing is
    /// closed, callers still reach it), or heals every partition of it (`None`).
    fn partition(&self, replica: &str, from: Option<PartitionFrom>) -> Result<()>;

    /// Scrapes a component's Prometheus metrics.
    fn metrics(&self, target: ComponentTarget) -> BoxFuture<'_, Result<String>>;

    /// Runs the agent binary for a named agent (`rotate-ca`, `renew-leaf`), with the agent's
    /// cluster and identity flags appended.
    fn agent_command(&self, agent: &str, args: Vec<String>)
    -> BoxFuture<'_, Result<CommandOutput>>;

    /// The last `lines` lines of every component's log, by component.
    fn logs(&self, lines: usize) -> BTreeMap<String, String>;

    /// Stops everything.
    fn shutdown(&self) -> BoxFuture<'_, Result<()>>;
}

/// Provides environments.
pub trait Backend: Send + Sync {
    /// `sim`, `kubeconfig` or `k3d`.
    fn name(&self) -> &'static str;

    /// Whether every scenario gets its own clusters (then all scenarios may run in parallel;
    /// otherwise only `concurrent` ones do).
    fn isolated(&self) -> bool;

    /// What it can do of what some scenarios need (`requires`); a scenario needing more is
    /// skipped with the reason.
    fn capabilities(&self) -> &'static [crate::scenario::Capability] {
        &[]
    }

    /// Prepares an environment for one scenario.
    fn environment(&self, spec: EnvSpec) -> BoxFuture<'_, Result<Box<dyn Environment>>>;
}
