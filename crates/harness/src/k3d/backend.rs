//! [`K3dBackend`]: the harness's `Backend` on two k3d clusters.
//!
//! The clusters, images and shared components (gateway, controller, default agent) are set up
//! once by the `up` plan (or reused with [`Setup::Reuse`]); every scenario then gets an
//! environment whose agents are Deployments labelled with the environment's id, deleted when the
//! scenario ends. Scenarios share the clusters, so the backend is not `isolated`: a scenario that
//! stops the gateway or changes its flags affects the others, and the environment restores the
//! committed Deployments when it shuts down.
//!
//! Not supported on k3d (the scenario fails saying so): link faults (no fault proxy between the
//! clusters; run those scenarios with `--backend sim`) and stopping an API server.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use super::K3dError;
use super::config::Role;
use super::exec::{self, Executor, Output, System};
use super::pki::K3dPki;
use super::plan::{self, Action, Cmd, Layout, Plan, Step, StepKind};
use super::render::{self, AgentDeployment, SwarmProcess};
use super::values::{CONTROL_NAMESPACE, CONTROLLER_NAME, GATEWAY_NAME};
use crate::backend::{
    AgentSpec, Backend, BackendError, BoxFuture, ClusterAccess, CommandOutput, ComponentTarget,
    EnvSpec, Environment, GatewayAccess, Result, StopMode, SwarmPlane, SwarmSpec,
};
use crate::proxy::Toxics;
use crate::scenario::{ClusterName, ComponentKind};
use buildplane_api::names;

/// Label on every object an environment creates.
pub const ENV_LABEL: &str = "buildplane.openchoreo.dev/e2e-env";

/// How the backend gets its clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setup {
    /// Run the `up` plan: create the clusters unless they exist, build and import the images,
    /// deploy, register.
    Up,
    /// Use what `cargo xtask k3d up` left: only check that the gateway is deployed.
    Reuse,
}

/// Options of [`K3dBackend`].
#[derive(Clone)]
pub struct K3dBackendOptions {
    /// The repository root (commands run there).
    pub root: PathBuf,
    /// Values and paths (relative to `root`).
    pub layout: Layout,
    /// Up or reuse.
    pub setup: Setup,
    /// Progress lines.
    pub progress: Arc<dyn Fn(String) + Send + Sync>,
    /// Makes the executor of each plan: real processes ([`System`]), or a recorder in tests.
    pub executor: ExecutorFactory,
}

/// Makes an executor that runs commands from a directory.
pub type ExecutorFactory = Arc<dyn Fn(&Path) -> Box<dyn Executor + Send> + Send + Sync>;

impl K3dBackendOptions {
    /// Options that run real processes from `root`.
    pub fn new(
        root: PathBuf,
        layout: Layout,
        setup: Setup,
        progress: Arc<dyn Fn(String) + Send + Sync>,
    ) -> K3dBackendOptions {
        K3dBackendOptions {
            root,
            layout,
            setup,
            progress,
            executor: Arc::new(|dir: &Path| Box::new(System::new(dir)) as Box<dyn Executor + Send>),
        }
    }
}

/// The k3d backend.
pub struct K3dBackend {
    options: K3dBackendOptions,
    prepared: tokio::sync::OnceCell<std::result::Result<GatewayAccess, String>>,
}

fn other(err: impl std::fmt::Display) -> BackendError {
    BackendError::Other(err.to_string())
}

fn unsupported<T>(what: impl Into<String>) -> Result<T> {
    Err(BackendError::Unsupported {
        backend: "k3d",
        what: what.into(),
    })
}

/// Runs a plan on a blocking thread.
async fn run_plan(
    executor: ExecutorFactory,
    root: PathBuf,
    plan: Plan,
    progress: Arc<dyn Fn(String) + Send + Sync>,
) -> std::result::Result<exec::Vars, K3dError> {
    tokio::task::spawn_blocking(move || {
        let mut system = executor(&root);
        exec::execute(&plan, system.as_mut(), &|line| progress(line))
    })
    .await
    .unwrap_or_else(|join| {
        Err(K3dError::StepFailed {
            step: "run a plan".into(),
            command: String::new(),
            detail: join.to_string(),
        })
    })
}

/// Runs one command on a blocking thread and returns its output whatever the exit code.
async fn run_raw(executor: ExecutorFactory, root: PathBuf, cmd: Cmd) -> Result<Output> {
    tokio::task::spawn_blocking(move || {
        executor(&root)
            .run(&cmd, None)
            .map_err(|err| other(format!("{}: {err:?}", cmd.display())))
    })
    .await
    .map_err(other)?
}

impl K3dBackend {
    /// A backend; nothing runs until the first environment (or [`K3dBackend::prepare`]).
    pub fn new(options: K3dBackendOptions) -> K3dBackend {
        K3dBackend {
            options,
            prepared: tokio::sync::OnceCell::new(),
        }
    }

    /// The layout with absolute paths (for kubeconfig files handed to scenarios).
    fn absolute_layout(&self) -> Layout {
        let root = &self.options.root;
        let mut layout = self.options.layout.clone();
        layout.kubeconfig = root.join(&layout.kubeconfig);
        layout.pki_dir = root.join(&layout.pki_dir);
        layout
    }

    /// Sets up (or checks) the clusters once; later calls return the first outcome.
    pub async fn prepare(&self) -> Result<GatewayAccess> {
        let outcome = self
            .prepared
            .get_or_init(|| async { self.prepare_once().await.map_err(|e| e.to_string()) })
            .await;
        outcome.clone().map_err(BackendError::Other)
    }

    async fn prepare_once(&self) -> Result<GatewayAccess> {
        let options = &self.options;
        let layout = self.absolute_layout();
        let plan = match options.setup {
            Setup::Up => plan::up(&options.layout),
            Setup::Reuse => {
                let mut plan = plan::checks(true);
                plan.steps.push(Step {
                    about: "the gateway is deployed (`cargo xtask k3d up` ran)".into(),
                    kind: StepKind::Kubectl,
                    action: Action::Run {
                        cmd: options.layout.kubectl(
                            Role::Control,
                            [
                                "get",
                                "deployment",
                                GATEWAY_NAME,
                                "--namespace",
                                CONTROL_NAMESPACE,
                            ],
                        ),
                        stdin: None,
                    },
                    unless: None,
                    retry: None,
                    show_output: false,
                });
                plan
            }
        };
        run_plan(
            options.executor.clone(),
            options.root.clone(),
            plan,
            options.progress.clone(),
        )
        .await
        .map_err(other)?;
        let names: Vec<&str> = layout
            .values
            .cluster_gateway
            .tls
            .dns_names
            .iter()
            .map(String::as_str)
            .collect();
        let pki = K3dPki::load_or_generate(&layout.pki_dir, &names).map_err(other)?;
        let tls = pki.harness_tls().map_err(other)?;
        let base_url = format!(
            "https://127.0.0.1:{}",
            layout.values.cluster_gateway.internal_host_port
        );
        GatewayAccess::new(base_url, tls).map_err(other)
    }

    /// Deletes both clusters unless `keep`.
    pub async fn finish(&self, keep: bool) -> Result<()> {
        if keep {
            (self.options.progress)(format!(
                "keeping the k3d clusters; delete them with `cargo xtask k3d down` (kubeconfig {})",
                self.options.layout.kubeconfig.display()
            ));
            return Ok(());
        }
        run_plan(
            self.options.executor.clone(),
            self.options.root.clone(),
            plan::down(&self.options.layout),
            self.options.progress.clone(),
        )
        .await
        .map(|_| ())
        .map_err(other)
    }
}

impl Backend for K3dBackend {
    fn name(&self) -> &'static str {
        "k3d"
    }

    fn isolated(&self) -> bool {
        false
    }

    fn environment(&self, spec: EnvSpec) -> BoxFuture<'_, Result<Box<dyn Environment>>> {
        Box::pin(async move {
            let gateway = self.prepare().await?;
            let env = K3dEnv {
                root: self.options.root.clone(),
                layout: self.absolute_layout(),
                id: env_id(&spec.id),
                gateway,
                progress: self.options.progress.clone(),
                executor: self.options.executor.clone(),
                state: Mutex::new(EnvState::default()),
            };
            env.select_components(&spec).await?;
            Ok(Box::new(env) as Box<dyn Environment>)
        })
    }
}

/// A short, DNS-safe id of an environment (FNV-1a of its name).
fn env_id(id: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in id.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:08x}", hash as u32)
}

/// A DNS label `e2e-<id>-<name>`, at most 63 characters.
fn object_name(id: &str, name: &str) -> String {
    let clean: String = name
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let mut full = format!("e2e-{id}-{clean}");
    full.truncate(63);
    full.trim_end_matches('-').to_string()
}

#[derive(Default)]
struct EnvState {
    /// Agents by scenario name.
    agents: BTreeMap<String, AgentSpec>,
    /// Swarm Deployments by swarm name.
    swarms: BTreeMap<String, Vec<String>>,
    /// Shared components this environment changed (restored on shutdown).
    changed: BTreeSet<ComponentKind>,
    /// Extra flags of the shared components.
    args: BTreeMap<ComponentKind, Vec<String>>,
}

struct K3dEnv {
    root: PathBuf,
    layout: Layout,
    id: String,
    gateway: GatewayAccess,
    progress: Arc<dyn Fn(String) + Send + Sync>,
    executor: ExecutorFactory,
    state: Mutex<EnvState>,
}

fn step(about: impl Into<String>, kind: StepKind, action: Action) -> Step {
    Step {
        about: about.into(),
        kind,
        action,
        unless: None,
        retry: None,
        show_output: false,
    }
}

fn run_step(about: impl Into<String>, kind: StepKind, cmd: Cmd) -> Step {
    step(about, kind, Action::Run { cmd, stdin: None })
}

impl K3dEnv {
    fn lock(&self) -> std::sync::MutexGuard<'_, EnvState> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn run(&self, name: &str, steps: Vec<Step>) -> Result<exec::Vars> {
        let plan = Plan {
            name: name.to_string(),
            steps,
        };
        run_plan(
            self.executor.clone(),
            self.root.clone(),
            plan,
            self.progress.clone(),
        )
        .await
        .map_err(other)
    }

    fn kubectl<I, S>(&self, role: Role, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.layout.kubectl(role, args)
    }

    fn apply(&self, role: Role, about: &str, objects: Vec<Value>) -> Step {
        let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
        step(
            about,
            StepKind::Kubectl,
            Action::Run {
                cmd: self.kubectl(role, ["apply", "--filename=-"]),
                stdin: Some(serde_json::to_string_pretty(&list).expect("JSON serializes")),
            },
        )
    }

    fn rollout(&self, role: Role, namespace: &str, deployment: &str) -> Step {
        run_step(
            format!("wait for deployment/{deployment}"),
            StepKind::Wait,
            self.kubectl(
                role,
                [
                    "rollout",
                    "status",
                    &format!("deployment/{deployment}"),
                    "--namespace",
                    namespace,
                    "--timeout=180s",
                ],
            ),
        )
    }

    fn scale_down(
        &self,
        role: Role,
        namespace: &str,
        deployment: &str,
        mode: StopMode,
    ) -> Vec<Step> {
        let mut steps = vec![run_step(
            format!("scale deployment/{deployment} to 0"),
            StepKind::Kubectl,
            self.kubectl(
                role,
                [
                    "scale",
                    &format!("deployment/{deployment}"),
                    "--replicas=0",
                    "--namespace",
                    namespace,
                ],
            ),
        )];
        let selector = format!("--selector=app.kubernetes.io/name={deployment}");
        if mode == StopMode::Kill {
            steps.push(run_step(
                format!("kill the pods of {deployment} (no grace period)"),
                StepKind::Kubectl,
                self.kubectl(
                    role,
                    [
                        "delete",
                        "pods",
                        selector.as_str(),
                        "--namespace",
                        namespace,
                        "--grace-period=0",
                        "--force",
                        "--ignore-not-found",
                    ],
                ),
            ));
        }
        steps.push(run_step(
            format!("wait until the pods of {deployment} are gone"),
            StepKind::Wait,
            self.kubectl(
                role,
                [
                    "wait",
                    "--for=delete",
                    "pods",
                    selector.as_str(),
                    "--namespace",
                    namespace,
                    "--timeout=120s",
                ],
            ),
        ));
        steps
    }

    /// The shared component's Deployment with this environment's flags.
    fn shared_objects(&self, kind: ComponentKind) -> Vec<Value> {
        let args = self.lock().args.get(&kind).cloned().unwrap_or_default();
        match kind {
            ComponentKind::Gateway => render::gateway(&self.layout.values, &args),
            _ => render::controller(&self.layout.values, &args),
        }
    }

    fn shared_name(kind: ComponentKind) -> &'static str {
        match kind {
            ComponentKind::Gateway => GATEWAY_NAME,
            _ => CONTROLLER_NAME,
        }
    }

    /// Scales away the shared components a scenario does not want up front and applies its
    /// extra flags.
    async fn select_components(&self, spec: &EnvSpec) -> Result<()> {
        let mut steps = Vec::new();
        for kind in [ComponentKind::Gateway, ComponentKind::Controller] {
            let args = spec.component_args.get(&kind).cloned().unwrap_or_default();
            let name = Self::shared_name(kind);
            if !args.is_empty() {
                let mut state = self.lock();
                state.args.insert(kind, args);
                state.changed.insert(kind);
            }
            if spec.components.contains(&kind) {
                if self.lock().changed.contains(&kind) {
                    steps.push(self.apply(
                        Role::Control,
                        &format!("deploy {name} with the scenario's flags"),
                        self.shared_objects(kind),
                    ));
                    steps.push(self.rollout(Role::Control, CONTROL_NAMESPACE, name));
                }
            } else {
                self.lock().changed.insert(kind);
                steps.extend(self.scale_down(
                    Role::Control,
                    CONTROL_NAMESPACE,
                    name,
                    StopMode::Graceful,
                ));
            }
        }
        if steps.is_empty() {
            return Ok(());
        }
        self.run("select components", steps).await.map(|_| ())
    }

    fn agent_deployment(&self, spec: &AgentSpec) -> AgentDeployment {
        AgentDeployment {
            name: object_name(&self.id, &spec.name),
            plane_id: spec.plane_id.clone(),
            identity_namespace: spec.identity_namespace.clone(),
            protocol: spec
                .protocol
                .clone()
                .unwrap_or_else(|| self.layout.values.cluster_agent.protocol.clone()),
            replicas: 1,
            extra_args: spec.args.clone(),
            labels: vec![(ENV_LABEL.to_string(), self.id.clone())],
            swarm: None,
        }
    }

    /// A Role for the agent's Secrets in a namespace other than the default one.
    fn identity_access(&self, namespace: &str) -> Vec<Value> {
        if namespace == names::AGENT_NAMESPACE {
            return Vec::new();
        }
        let sa = &self.layout.values.cluster_agent.name;
        let name = format!("{sa}-identity");
        let labels = json!({ENV_LABEL: self.id});
        vec![
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}),
            json!({
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": name, "namespace": namespace, "labels": labels},
                "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch", "create", "update", "patch"]}],
            }),
            json!({
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": name, "namespace": namespace, "labels": labels},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": names::AGENT_NAMESPACE}],
            }),
        ]
    }

    fn agent_spec(&self, name: &str) -> Result<AgentSpec> {
        self.lock()
            .agents
            .get(name)
            .cloned()
            .ok_or_else(|| BackendError::Unknown {
                what: "agent",
                name: name.to_string(),
            })
    }

    async fn deploy_agent(&self, spec: &AgentSpec) -> Result<()> {
        let deployment = self.agent_deployment(spec);
        let mut objects = self.identity_access(&spec.identity_namespace);
        objects.push(render::agent_deployment(&self.layout.values, &deployment));
        let steps = vec![
            self.apply(
                Role::Build,
                &format!("deploy agent `{}`", spec.name),
                objects,
            ),
            // Not `rollout status`: an agent is ready only once admitted, and scenarios start
            // agents that must be rejected. Wait until the pod of the current template exists.
            run_step(
                format!("wait for a pod of deployment/{}", deployment.name),
                StepKind::Wait,
                self.kubectl(
                    Role::Build,
                    [
                        "wait",
                        &format!("deployment/{}", deployment.name),
                        "--for=jsonpath={.status.updatedReplicas}=1",
                        "--namespace",
                        names::AGENT_NAMESPACE,
                        "--timeout=120s",
                    ],
                ),
            ),
        ];
        self.run("start agent", steps).await.map(|_| ())
    }

    /// `(cluster, namespace, deployment names)` of a target.
    fn deployments(&self, target: &ComponentTarget) -> Result<(Role, String, Vec<String>)> {
        match target.kind {
            ComponentKind::Gateway => Ok((
                Role::Control,
                CONTROL_NAMESPACE.into(),
                vec![GATEWAY_NAME.into()],
            )),
            ComponentKind::Controller => Ok((
                Role::Control,
                CONTROL_NAMESPACE.into(),
                vec![CONTROLLER_NAME.into()],
            )),
            ComponentKind::Agent => {
                let name = target.name.clone().unwrap_or_default();
                self.agent_spec(&name)?;
                Ok((
                    Role::Build,
                    names::AGENT_NAMESPACE.into(),
                    vec![object_name(&self.id, &name)],
                ))
            }
            ComponentKind::Swarm => {
                let name = target.name.clone().unwrap_or_default();
                let deployments =
                    self.lock()
                        .swarms
                        .get(&name)
                        .cloned()
                        .ok_or(BackendError::Unknown {
                            what: "swarm",
                            name,
                        })?;
                Ok((Role::Build, names::AGENT_NAMESPACE.into(), deployments))
            }
            ComponentKind::Apiserver => unsupported(
                "stopping or starting an API server (every pod of a k3s node would stop with it); use --backend sim",
            ),
        }
    }

    /// The first pod of a Deployment.
    async fn pod_of(&self, role: Role, namespace: &str, deployment: &str) -> Result<String> {
        let vars = self
            .run(
                "find a pod",
                vec![step(
                    format!("find a pod of {deployment}"),
                    StepKind::Kubectl,
                    Action::Capture {
                        var: "POD".into(),
                        cmd: self.kubectl(
                            role,
                            [
                                "get",
                                "pods",
                                &format!("--selector=app.kubernetes.io/name={deployment}"),
                                "--namespace",
                                namespace,
                                "--field-selector=status.phase=Running",
                                "--output=jsonpath={.items[0].metadata.name}",
                            ],
                        ),
                        base64: false,
                    },
                )],
            )
            .await?;
        Ok(vars.get("POD").cloned().unwrap_or_default())
    }
}

impl Environment for K3dEnv {
    fn cluster(&self, cluster: ClusterName) -> ClusterAccess {
        let role = match cluster {
            ClusterName::Control => Role::Control,
            ClusterName::Build => Role::Build,
        };
        ClusterAccess {
            kubeconfig: self.layout.kubeconfig.clone(),
            context: self.layout.context(role).to_string(),
        }
    }

    fn kubeconfig_env(&self) -> String {
        self.layout.kubeconfig.display().to_string()
    }

    fn gateway(&self) -> Result<GatewayAccess> {
        Ok(self.gateway.clone())
    }

    fn start_agent(&self, spec: AgentSpec) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.lock().agents.insert(spec.name.clone(), spec.clone());
            self.deploy_agent(&spec).await
        })
    }

    fn start_swarm(&self, spec: SwarmSpec) -> BoxFuture<'_, Result<Vec<SwarmPlane>>> {
        Box::pin(async move {
            let n_processes = u64::from(spec.processes.max(1));
            let mut processes = Vec::new();
            for k in 0..n_processes {
                let count = spec.count / n_processes + u64::from(k < spec.count % n_processes);
                if count > 0 {
                    processes.push((k, count, format!("{}-{k}", spec.plane_id_prefix)));
                }
            }
            let mut objects = Vec::new();
            let mut names = Vec::new();
            for (k, count, prefix) in &processes {
                let name = object_name(&self.id, &format!("swarm-{}-{k}", spec.name));
                let deployment = AgentDeployment {
                    name: name.clone(),
                    plane_id: String::new(),
                    identity_namespace: names::AGENT_NAMESPACE.into(),
                    protocol: self.layout.values.cluster_agent.protocol.clone(),
                    replicas: 1,
                    extra_args: spec.args.clone(),
                    labels: vec![(ENV_LABEL.to_string(), self.id.clone())],
                    swarm: Some(SwarmProcess {
                        count: *count,
                        plane_id_prefix: prefix.clone(),
                    }),
                };
                objects.push(render::agent_deployment(&self.layout.values, &deployment));
                names.push(name);
            }
            self.lock().swarms.insert(spec.name.clone(), names.clone());
            let mut steps = vec![self.apply(
                Role::Build,
                &format!("deploy swarm `{}`", spec.name),
                objects,
            )];
            for (name, (_, _, prefix)) in names.iter().zip(&processes) {
                steps.push(self.rollout(Role::Build, names::AGENT_NAMESPACE, name));
                let mut read = step(
                    format!("read the CA of swarm process {name}"),
                    StepKind::Kubectl,
                    Action::Capture {
                        var: prefix.clone(),
                        cmd: self.kubectl(
                            Role::Build,
                            [
                                "exec",
                                &format!("deployment/{name}"),
                                "--namespace",
                                names::AGENT_NAMESPACE,
                                "--",
                                "cat",
                                render::SWARM_CA_PATH,
                            ],
                        ),
                        base64: false,
                    },
                );
                read.retry = Some(plan::Retry {
                    attempts: 30,
                    delay: Duration::from_secs(2),
                });
                steps.push(read);
            }
            let vars = self.run("start swarm", steps).await?;
            let mut planes = Vec::new();
            for (_, count, prefix) in processes {
                let ca = vars.get(&prefix).cloned().unwrap_or_default();
                planes.extend((0..count).map(|i| SwarmPlane {
                    plane_id: format!("{prefix}-{i}"),
                    ca: format!("{}\n", ca.trim_end()),
                }));
            }
            Ok(planes)
        })
    }

    fn start(&self, target: ComponentTarget, args: Vec<String>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            match target.kind {
                ComponentKind::Gateway | ComponentKind::Controller => {
                    {
                        let mut state = self.lock();
                        state.changed.insert(target.kind);
                        if !args.is_empty() {
                            state.args.insert(target.kind, args);
                        }
                    }
                    let name = Self::shared_name(target.kind);
                    let steps = vec![
                        self.apply(
                            Role::Control,
                            &format!("start {name}"),
                            self.shared_objects(target.kind),
                        ),
                        self.rollout(Role::Control, CONTROL_NAMESPACE, name),
                    ];
                    self.run("start", steps).await.map(|_| ())
                }
                ComponentKind::Agent => {
                    let name = target.name.clone().unwrap_or_default();
                    let mut spec = self.agent_spec(&name)?;
                    if !args.is_empty() {
                        spec.args = args;
                        self.lock().agents.insert(name, spec.clone());
                    }
                    self.deploy_agent(&spec).await
                }
                ComponentKind::Swarm => {
                    unsupported("restarting a swarm (its CAs would change); start a new one")
                }
                ComponentKind::Apiserver => {
                    self.deployments(&target)?;
                    Ok(())
                }
            }
        })
    }

    fn stop(&self, target: ComponentTarget, mode: StopMode) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let (role, namespace, deployments) = self.deployments(&target)?;
            if matches!(
                target.kind,
                ComponentKind::Gateway | ComponentKind::Controller
            ) {
                self.lock().changed.insert(target.kind);
            }
            let mut steps = Vec::new();
            for deployment in &deployments {
                steps.extend(self.scale_down(role, &namespace, deployment, mode));
            }
            self.run("stop", steps).await.map(|_| ())
        })
    }

    fn set_faults(&self, link: &str, _toxics: Toxics) -> BoxFuture<'_, Result<()>> {
        let link = link.to_string();
        Box::pin(async move {
            unsupported(format!(
                "faults on link `{link}` (there is no fault proxy between k3d clusters); use --backend sim"
            ))
        })
    }

    fn partition(
        &self,
        replica: &str,
        _from: Option<crate::scenario::PartitionFrom>,
    ) -> Result<()> {
        unsupported(format!(
            "partitioning gateway replica `{replica}` from the agents (the agents reach the replicas through k3s's service load balancer, which cannot hold one pod's connections while callers still reach it); use --backend sim"
        ))
    }

    fn metrics(&self, target: ComponentTarget) -> BoxFuture<'_, Result<String>> {
        Box::pin(async move {
            let (role, namespace, deployments) = self.deployments(&target)?;
            let port = match target.kind {
                ComponentKind::Gateway => self.layout.values.cluster_gateway.health_port,
                ComponentKind::Controller => self.layout.values.controller_manager.health_port,
                ComponentKind::Agent => self.layout.values.cluster_agent.health_port,
                _ => return unsupported(format!("metrics of {target}")),
            };
            let deployment = deployments.first().cloned().unwrap_or_default();
            let pod = self.pod_of(role, &namespace, &deployment).await?;
            let path = format!("/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy/metrics");
            let output = run_raw(
                self.executor.clone(),
                self.root.clone(),
                self.kubectl(role, ["get", "--raw", path.as_str()]),
            )
            .await?;
            if output.success() {
                Ok(output.stdout)
            } else {
                Err(other(format!(
                    "GET {path} through the API server: {}",
                    output.stderr.trim()
                )))
            }
        })
    }

    fn agent_command(
        &self,
        agent: &str,
        args: Vec<String>,
    ) -> BoxFuture<'_, Result<CommandOutput>> {
        let agent = agent.to_string();
        Box::pin(async move {
            let spec = self.agent_spec(&agent)?;
            let deployment = object_name(&self.id, &agent);
            let mut full = vec![
                "exec".to_string(),
                format!("deployment/{deployment}"),
                "--namespace".into(),
                names::AGENT_NAMESPACE.into(),
                "--".into(),
                "cluster-agent".into(),
            ];
            full.extend(args);
            full.extend([
                "--identity-namespace".to_string(),
                spec.identity_namespace.clone(),
                "--plane-id".into(),
                spec.plane_id.clone(),
            ]);
            let output = run_raw(
                self.executor.clone(),
                self.root.clone(),
                self.kubectl(Role::Build, full),
            )
            .await?;
            Ok(CommandOutput {
                code: output.code,
                stdout: output.stdout,
                stderr: output.stderr,
            })
        })
    }

    fn logs(&self, lines: usize) -> BTreeMap<String, String> {
        let mut commands = plan::logs(&self.layout, lines);
        let agents: Vec<String> = self.lock().agents.keys().cloned().collect();
        for agent in agents {
            let deployment = object_name(&self.id, &agent);
            commands.push((
                format!("agent-{agent}"),
                self.kubectl(
                    Role::Build,
                    [
                        "logs",
                        &format!("deployment/{deployment}"),
                        "--namespace",
                        names::AGENT_NAMESPACE,
                        "--all-containers",
                        &format!("--tail={lines}"),
                    ],
                ),
            ));
        }
        let mut system = (self.executor)(&self.root);
        commands
            .into_iter()
            .map(|(name, cmd)| {
                let text = match system.run(&cmd, None) {
                    Ok(output) if output.success() => output.stdout,
                    Ok(output) => format!("(`{}` failed: {})", cmd.display(), output.stderr.trim()),
                    Err(err) => format!("(`{}` could not run: {err:?})", cmd.display()),
                };
                (name, text)
            })
            .collect()
    }

    fn shutdown(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let selector = format!("--selector={ENV_LABEL}={}", self.id);
            let mut steps = vec![run_step(
                "delete this environment's agents and roles",
                StepKind::Kubectl,
                self.kubectl(
                    Role::Build,
                    [
                        "delete",
                        "deployments,roles,rolebindings",
                        selector.as_str(),
                        "--all-namespaces",
                        "--ignore-not-found",
                        "--wait=false",
                    ],
                ),
            )];
            let changed: Vec<ComponentKind> = {
                let mut state = self.lock();
                state.args.clear();
                std::mem::take(&mut state.changed).into_iter().collect()
            };
            for kind in changed {
                let name = Self::shared_name(kind);
                steps.push(self.apply(
                    Role::Control,
                    &format!("restore {name}"),
                    self.shared_objects(kind),
                ));
                steps.push(self.rollout(Role::Control, CONTROL_NAMESPACE, name));
            }
            self.run("shutdown", steps).await.map(|_| ())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Object names are DNS labels of at most 63 characters, distinct per environment.
    #[test]
    fn object_names_are_dns_labels() {
        let long = "an_Agent name that is far too long for a Kubernetes object name, really";
        let name = object_name(&env_id("scenario-a#1"), long);
        assert!(name.len() <= 63, "{name}");
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "{name}"
        );
        assert!(!name.ends_with('-'));
        assert_ne!(env_id("scenario-a#1"), env_id("scenario-a#2"));
    }

    /// Records every command (with `<<stdin` when it gets input) and answers like a healthy
    /// k3d setup: clusters missing, the agent's CA present, pods found.
    #[derive(Clone, Default)]
    struct Recorder {
        root: PathBuf,
        ran: Arc<Mutex<Vec<Ran>>>,
    }

    /// A command line and its standard input.
    type Ran = (String, Option<String>);

    impl Executor for Recorder {
        fn base_dir(&self) -> Option<&Path> {
            Some(&self.root)
        }

        fn run(
            &mut self,
            cmd: &Cmd,
            stdin: Option<&[u8]>,
        ) -> std::result::Result<Output, exec::SpawnError> {
            let line = cmd.display();
            let stdout = if line.contains("jsonpath={.data.ca") {
                "Q0EK".to_string()
            } else if line.contains("jsonpath={.items[0].metadata.name}") {
                "pod-0".to_string()
            } else {
                String::new()
            };
            let code = i32::from(line.starts_with("k3d cluster get"));
            self.ran
                .lock()
                .unwrap()
                .push((line, stdin.map(|s| String::from_utf8_lossy(s).into_owned())));
            Ok(Output {
                code,
                stdout,
                stderr: String::new(),
            })
        }
    }

    fn target(kind: ComponentKind, name: Option<&str>) -> ComponentTarget {
        ComponentTarget {
            kind,
            name: name.map(str::to_string),
            cluster: None,
        }
    }

    /// One scenario's environment on k3d, as commands: the gateway redeployed with the
    /// scenario's flags, the controller scaled away, an agent deployed into its own identity
    /// namespace and killed, then everything restored; link faults and API server stops are
    /// refused with the reason.
    #[tokio::test]
    async fn environment_runs_the_expected_commands() {
        let root = tempfile::tempdir().unwrap();
        let values =
            super::super::values::Values::committed(&super::super::project_root()).unwrap();
        let recorder = Recorder {
            root: root.path().to_path_buf(),
            ..Recorder::default()
        };
        let factory = recorder.clone();
        let mut options = K3dBackendOptions::new(
            root.path().to_path_buf(),
            Layout::new(values),
            Setup::Up,
            Arc::new(|_| {}),
        );
        options.executor =
            Arc::new(move |_dir: &Path| Box::new(factory.clone()) as Box<dyn Executor + Send>);
        let backend = K3dBackend::new(options);
        let gateway = backend.prepare().await.unwrap();
        assert_eq!(gateway.base_url, "https://127.0.0.1:38444");
        assert!(root.path().join("target/k3d/pki/harness.crt").is_file());
        // The plan's PKI step resolves against the executor's directory, not the test's cwd.
        assert!(
            !Path::new("target/k3d/pki").exists(),
            "PKI written to the cwd"
        );
        let up = std::mem::take(&mut *recorder.ran.lock().unwrap());
        let expected: usize = plan::up(&backend.options.layout)
            .steps
            .iter()
            .map(|step| {
                let commands = match step.action {
                    Action::Pipe { .. } => 2,
                    Action::GeneratePki { .. } => 0,
                    _ => 1,
                };
                commands + usize::from(step.unless.is_some())
            })
            .sum();
        assert_eq!(
            up.len(),
            expected,
            "the up plan ran once, command by command"
        );

        let spec = EnvSpec {
            id: "agent-registration-1".into(),
            components: vec![ComponentKind::Gateway],
            component_args: [(
                ComponentKind::Gateway,
                vec!["--heartbeat-interval=1s".to_string()],
            )]
            .into_iter()
            .collect(),
            work_dir: root.path().join("work"),
            gateway_replicas: 1,
        };
        let env = backend.environment(spec).await.unwrap();
        env.start_agent(AgentSpec {
            name: "agent_1".into(),
            plane_id: "plane-1".into(),
            identity_namespace: "org-a-agent".into(),
            protocol: Some("v1".into()),
            args: vec![],
        })
        .await
        .unwrap();
        env.stop(
            target(ComponentKind::Agent, Some("agent_1")),
            StopMode::Kill,
        )
        .await
        .unwrap();
        let faults = env
            .set_faults("agent_1", Toxics::default())
            .await
            .unwrap_err();
        assert!(faults.to_string().contains("--backend sim"), "{faults}");
        let partition = env
            .partition(
                "cluster-gateway-0",
                Some(crate::scenario::PartitionFrom::Agents),
            )
            .unwrap_err();
        assert!(
            partition.to_string().contains("--backend sim"),
            "{partition}"
        );
        let apiserver = env
            .stop(target(ComponentKind::Apiserver, None), StopMode::Graceful)
            .await
            .unwrap_err();
        assert!(
            apiserver.to_string().contains("--backend sim"),
            "{apiserver}"
        );
        let unknown = env
            .stop(target(ComponentKind::Agent, Some("nobody")), StopMode::Kill)
            .await
            .unwrap_err();
        assert!(matches!(unknown, BackendError::Unknown { .. }), "{unknown}");
        env.shutdown().await.unwrap();

        let ran = recorder.ran.lock().unwrap().clone();
        let stdin_of = |needle: &str| {
            ran.iter()
                .find(|(line, stdin)| {
                    line.contains("apply") && stdin.as_deref().is_some_and(|s| s.contains(needle))
                })
                .and_then(|(_, stdin)| stdin.clone())
                .unwrap_or_else(|| panic!("no apply with {needle:?}"))
        };
        assert!(stdin_of("--heartbeat-interval=1s").contains("\"name\": \"cluster-gateway\""));
        let agent = stdin_of("plane-1");
        assert!(
            agent.contains("org-a-agent") && agent.contains("--protocol=v1"),
            "{agent}"
        );
        assert!(agent.contains(ENV_LABEL), "{agent}");
        let restored = ran
            .iter()
            .rev()
            .filter_map(|(_, stdin)| stdin.as_deref())
            .find(|s| s.contains("\"name\": \"cluster-gateway\""))
            .unwrap();
        assert!(
            !restored.contains("--heartbeat-interval=1s"),
            "shutdown restores the flags"
        );
        let root_text = root.path().display().to_string();
        let script: String = ran
            .iter()
            .map(|(line, stdin)| {
                let line = line.replace(&root_text, "<root>");
                match stdin {
                    Some(_) => format!("{line} <<stdin\n"),
                    None => format!("{line}\n"),
                }
            })
            .collect();
        insta::assert_snapshot!("environment_commands", script);
    }
}
