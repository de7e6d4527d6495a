//! The `sim` and `apiserver` backends: every scenario gets two clusters (control and build), the
//! real `cluster-gateway` and `buildplane-controller` binaries, agents as `cluster-agent`
//! processes, and a fault proxy on every agent → gateway link, all local processes.
//! An agent's link is proxied in the harness; a swarm's links are proxied by one
//! `e2e-fault-proxy` process beside each swarm process (`Link`).
//!
//! The clusters are what differs ([`ApiServers`]): a `kube-sim` process each (`sim`), or a real
//! etcd, kube-apiserver and kube-controller-manager each (`apiserver`, set up by
//! [`buildplane_peers::RealCluster`]). etcd keeps the data across an API server restart, as a
//! kube-sim data directory does.
//!
//! Environments are cheap (a handful of processes; a real cluster is ready in about 4 s), so
//! each scenario has its own and scenarios run in parallel without sharing a gateway they might
//! restart, or a cluster whose BuildPlanes another scenario's controller would reconcile.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use super::{
    AgentSpec, Backend, BackendError, BoxFuture, ClusterAccess, CommandOutput, ComponentTarget,
    EnvSpec, Environment, GatewayAccess, Result, StopMode, SwarmPlane, SwarmSpec,
};
use buildplane_peers::{ClusterPorts, ClusterPrograms, RealCluster};

use crate::pki::EnvPki;
use crate::process::{Proc, free_port, tail};
use crate::proxy::remote::RemoteProxy;
use crate::proxy::{FaultProxy, Toxics};
use crate::scenario::{Capability, ClusterName, ComponentKind, PartitionFrom};

/// How long a component may take to become ready. A gateway restarted under the full
/// profile's storm reports ready once it has listed 10,000 BuildPlanes while 10,000 agents
/// dial it: 79 s was measured on 2 cores. A component that exits fails at once regardless.
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// Grace period of a graceful stop.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Log lines quoted when a component fails to start.
const TAIL_LINES: usize = 30;

/// Where the component binaries are.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// Directory holding `kube-sim`, `cluster-gateway`, `cluster-agent`, `buildplane-controller`.
    pub dir: PathBuf,
    /// Build failures by binary name, reported when a scenario needs that binary.
    pub build_errors: BTreeMap<String, String>,
}

impl Binaries {
    /// Binaries already built into `dir`.
    pub fn from_dir(dir: PathBuf) -> Binaries {
        Binaries {
            dir,
            build_errors: BTreeMap::new(),
        }
    }

    fn path(&self, binary: &str) -> Result<PathBuf> {
        let path = self.dir.join(binary);
        // A failed build may leave an older binary behind: do not run it.
        if path.is_file() && !self.build_errors.contains_key(binary) {
            return Ok(path);
        }
        let reason = match self.build_errors.get(binary) {
            Some(err) => format!(
                "binary {} is missing because its build failed:\n{err}",
                path.display()
            ),
            None => format!(
                "binary {} is missing; it is built by `cargo xtask e2e` (or `cargo build -p {}`)",
                path.display(),
                package_of(binary)
            ),
        };
        Err(BackendError::ComponentUnavailable {
            component: binary.to_string(),
            reason,
        })
    }
}

/// The cargo package of a component binary.
pub fn package_of(binary: &str) -> &str {
    match binary {
        "cluster-gateway" => "cluster-gateway",
        "cluster-agent" => "cluster-agent",
        "buildplane-controller" => "buildplane-controller",
        "e2e-fault-proxy" | "e2e-load" => "buildplane-harness",
        _ => "kube-sim",
    }
}

/// What answers as each cluster's Kubernetes API.
#[derive(Clone, Debug)]
pub enum ApiServers {
    /// One kube-sim process per cluster.
    KubeSim,
    /// A real etcd, kube-apiserver and kube-controller-manager per cluster.
    Real(ClusterPrograms),
}

/// The sim backend, or with real API servers the apiserver backend.
#[derive(Clone, Debug)]
pub struct SimBackend {
    binaries: Binaries,
    api_servers: ApiServers,
}

impl SimBackend {
    /// The sim backend, using the binaries in `binaries.dir`.
    pub fn new(binaries: Binaries) -> SimBackend {
        SimBackend::with_api_servers(binaries, ApiServers::KubeSim)
    }

    /// The same with other API servers (`apiserver` backend with [`ApiServers::Real`]).
    pub fn with_api_servers(binaries: Binaries, api_servers: ApiServers) -> SimBackend {
        SimBackend {
            binaries,
            api_servers,
        }
    }
}

impl Backend for SimBackend {
    fn name(&self) -> &'static str {
        match self.api_servers {
            ApiServers::KubeSim => "sim",
            ApiServers::Real(_) => "apiserver",
        }
    }

    fn isolated(&self) -> bool {
        true
    }

    fn capabilities(&self) -> &'static [Capability] {
        &[
            Capability::LinkFaults,
            Capability::ApiServerLifecycle,
            Capability::GatewayReplicas,
            Capability::ReplicaPartitions,
        ]
    }

    fn environment(&self, spec: EnvSpec) -> BoxFuture<'_, Result<Box<dyn Environment>>> {
        Box::pin(async move {
            let env = SimEnv::start(self.binaries.clone(), self.api_servers.clone(), spec).await?;
            Ok(Box::new(env) as Box<dyn Environment>)
        })
    }
}

/// What "ready" means for a starting process.
enum Probe {
    /// GET returns 2xx.
    Http(String),
    /// A kubeconfig file with a current context exists.
    Kubeconfig(PathBuf),
    /// A PEM file with a certificate exists.
    Pem(PathBuf),
    /// A TCP connection to 127.0.0.1 on this port succeeds.
    Tcp(u16),
    /// GET with this client (its own roots and client certificate) returns 2xx.
    Https(String, reqwest::Client),
}

impl Probe {
    async fn ready(&self, client: &reqwest::Client) -> bool {
        match self {
            Probe::Http(url) => client
                .get(url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success()),
            Probe::Kubeconfig(path) => current_context(path).is_some(),
            Probe::Pem(path) => {
                std::fs::read_to_string(path).is_ok_and(|t| t.contains("END CERTIFICATE"))
            }
            Probe::Tcp(port) => tokio::net::TcpStream::connect(("127.0.0.1", *port))
                .await
                .is_ok(),
            Probe::Https(url, client) => client
                .get(url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success()),
        }
    }
}

struct ApiServer {
    port: u16,
    kubeconfig: PathBuf,
    data_dir: PathBuf,
    context: String,
    /// The real cluster's files and flags (`apiserver` backend).
    real: Option<RealCluster>,
}

struct AgentInfo {
    spec: AgentSpec,
    health_port: u16,
}

#[derive(Default)]
struct State {
    procs: BTreeMap<String, Proc>,
    logs: BTreeMap<String, PathBuf>,
    agents: BTreeMap<String, AgentInfo>,
    swarms: BTreeMap<String, Vec<String>>,
    args: BTreeMap<ComponentKind, Vec<String>>,
    links: BTreeMap<String, Link>,
}

/// The fault proxies of a named link.
#[derive(Clone)]
enum Link {
    /// An agent's: a proxy in the harness.
    Local(Arc<FaultProxy>),
    /// A swarm's: one proxy process per swarm process. In the harness, a 10,000-agent swarm's
    /// links would hold 20,000 sockets, past a hard open-files limit of 20,000.
    Remote(Vec<RemoteProxy>),
}

impl Link {
    /// Sets the toxics of every proxy of the link; they hold when this returns.
    async fn set_toxics(&self, toxics: &Toxics) -> Result<()> {
        match self {
            Link::Local(proxy) => proxy.set_toxics(toxics.clone()),
            Link::Remote(proxies) => {
                futures::future::try_join_all(
                    proxies.iter().map(|proxy| proxy.set_toxics(toxics.clone())),
                )
                .await
                .map_err(io_err("setting the faults of a swarm's link"))?;
            }
        }
        Ok(())
    }
}

struct SimEnv {
    binaries: Binaries,
    api_servers: ApiServers,
    work: PathBuf,
    pki: EnvPki,
    control: ApiServer,
    build: ApiServer,
    /// Where agents dial the gateway (its agent listener, or the balancer of the replicas').
    agent_port: u16,
    /// Where callers reach the internal API (the gateway's, or the replicas' balancer).
    internal_port: u16,
    gateways: GatewayReplicas,
    controller_health_port: u16,
    gateway: GatewayAccess,
    state: Mutex<State>,
}

/// The ports of one gateway replica.
#[derive(Clone, Copy, Debug)]
struct ReplicaPorts {
    agent: u16,
    internal: u16,
    health: u16,
}

/// The namespace and name of the gateway's Service: its EndpointSlices (one per replica, since
/// the replicas' ports differ) list the replicas to each other (`--peer-service`).
const GATEWAY_SERVICE: (&str, &str) = ("openchoreo-control-plane", "cluster-gateway");

/// The gateway replicas of an environment: one `gateway` on the environment's ports, or
/// `gateway-0`, `gateway-1`, ... on their own ports behind two balancers (agents, callers) on
/// the environment's ports, as a Kubernetes Service would put them.
struct GatewayReplicas {
    ports: Vec<ReplicaPorts>,
    balancers: Vec<crate::balancer::Balancer>,
}

impl GatewayReplicas {
    async fn new(
        replicas: u32,
        agent_port: u16,
        internal_port: u16,
        port: impl Fn() -> Result<u16>,
    ) -> Result<GatewayReplicas> {
        if replicas <= 1 {
            return Ok(GatewayReplicas {
                ports: vec![ReplicaPorts {
                    agent: agent_port,
                    internal: internal_port,
                    health: port()?,
                }],
                balancers: Vec::new(),
            });
        }
        let ports = (0..replicas)
            .map(|_| {
                Ok(ReplicaPorts {
                    agent: port()?,
                    internal: port()?,
                    health: port()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let local = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let mut balancers = Vec::new();
        for (front, back) in [
            (
                agent_port,
                ports.iter().map(|p| local(p.agent)).collect::<Vec<_>>(),
            ),
            (
                internal_port,
                ports.iter().map(|p| local(p.internal)).collect::<Vec<_>>(),
            ),
        ] {
            balancers.push(
                crate::balancer::Balancer::start(local(front), &back)
                    .await
                    .map_err(io_err("starting a gateway balancer"))?,
            );
        }
        Ok(GatewayReplicas { ports, balancers })
    }

    /// The process name of replica `index`.
    fn name(&self, index: usize) -> String {
        if self.ports.len() == 1 {
            "gateway".into()
        } else {
            format!("gateway-{index}")
        }
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        (0..self.ports.len()).find(|&i| self.name(i) == name)
    }

    /// The index of the replica named `name`, or an error naming it.
    fn replica(&self, name: &str) -> Result<usize> {
        self.index_of(name).ok_or_else(|| BackendError::Unknown {
            what: "gateway replica",
            name: name.to_string(),
        })
    }

    fn set_in_rotation(&self, index: usize, in_rotation: bool) {
        for balancer in &self.balancers {
            balancer.set_in_rotation(index, in_rotation);
        }
    }

    /// Cuts replica `index` off from `from` (`None`: heals it): the agents' balancer (the
    /// first) holds that replica's relays; the callers' balancer is left alone.
    fn set_partitioned(&self, index: usize, from: Option<PartitionFrom>) {
        if let Some(agents) = self.balancers.first() {
            agents.set_partitioned(index, from == Some(PartitionFrom::Agents));
        }
    }

    /// The EndpointSlice Kubernetes would keep for replica `index` of the gateway's Service:
    /// its internal API's address and port, its name as the endpoint's `targetRef`, ready or
    /// not.
    fn endpoint_slice(&self, index: usize, ready: bool) -> serde_json::Value {
        let (namespace, service) = GATEWAY_SERVICE;
        let name = self.name(index);
        serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{service}-{name}"),
                "namespace": namespace,
                "labels": {
                    "kubernetes.io/service-name": service,
                    "endpointslice.kubernetes.io/managed-by": "buildplane-e2e-harness",
                },
            },
            // A real API server refuses loopback addresses in an IPv4 slice, and an FQDN of
            // one label; the replicas listen on loopback here, so the slice names them under
            // `localhost` (RFC 6761: loopback, as the gateway resolves it).
            "addressType": "FQDN",
            "ports": [{"name": "internal", "port": self.ports[index].internal, "protocol": "TCP"}],
            "endpoints": [{
                "addresses": [format!("{name}.localhost")],
                "conditions": {"ready": ready, "serving": ready, "terminating": !ready},
                "targetRef": {"kind": "Pod", "name": name, "namespace": namespace},
            }],
        })
    }
}

fn io_err(what: &str) -> impl FnOnce(std::io::Error) -> BackendError + '_ {
    move |err| BackendError::Other(format!("{what}: {err}"))
}

fn component_env() -> BTreeMap<String, String> {
    let level = std::env::var("E2E_COMPONENT_LOG").unwrap_or_else(|_| "info".to_string());
    BTreeMap::from([
        ("RUST_LOG".to_string(), level),
        ("NO_COLOR".to_string(), "1".to_string()),
    ])
}

/// Open files `connections` relayed connections cost a process: two sockets each (the
/// agent's and the gateway's), plus room for clients, logs and watches. The components
/// inherit the same limit and need at most one per connection.
fn open_files_needed(connections: u64) -> u64 {
    connections.saturating_mul(2).saturating_add(512)
}

/// Raises this process's open-files soft limit to the hard one, then fails before the swarm
/// starts, with the fix, if it still cannot relay `connections` (the agents' balancer of
/// several replicas; otherwise the storm would fail minutes later with agents that never
/// connect).
fn open_files_suffice(connections: u64) -> Result<()> {
    let needed = open_files_needed(connections);
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    match rlimit::Resource::NOFILE.get() {
        Ok((soft, hard)) if soft < needed => Err(BackendError::Other(format!(
            "a swarm's {connections} connections through the balancer need about {needed} open \
             files in the harness, but the limit is {soft} (hard limit {hard}); raise it \
             (`ulimit -n {needed}`, or LimitNOFILE for a service) or run fewer agents"
        ))),
        _ => Ok(()),
    }
}

/// Fails before a swarm starts if one of its link's proxy processes, which raises its soft
/// limit to this hard limit, could not relay `connections` (its swarm process's share).
fn proxy_files_suffice(connections: u64) -> Result<()> {
    let needed = open_files_needed(connections);
    match rlimit::Resource::NOFILE.get() {
        Ok((_, hard)) if hard < needed => Err(BackendError::Other(format!(
            "each fault proxy process of this swarm relays {connections} connections and \
             needs about {needed} open files, over the hard limit {hard}; spread the swarm \
             over more `processes`"
        ))),
        _ => Ok(()),
    }
}

/// An HTTP client for a real cluster's API server: trusts its CA and presents the admin's
/// client certificate, both read from the admin kubeconfig.
fn admin_client(real: &RealCluster) -> std::result::Result<reqwest::Client, String> {
    let text = std::fs::read_to_string(&real.kubeconfig).map_err(|e| e.to_string())?;
    let config: serde_yaml::Value = serde_yaml::from_str(&text).map_err(|e| e.to_string())?;
    let decode = |value: &serde_yaml::Value| -> std::result::Result<String, String> {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(value.as_str().unwrap_or_default())
            .map_err(|e| e.to_string())?;
        String::from_utf8(bytes).map_err(|e| e.to_string())
    };
    let user = &config["users"][0]["user"];
    let client = crate::pki::Pem {
        cert: decode(&user["client-certificate-data"])?,
        key: decode(&user["client-key-data"])?,
    };
    let ca = decode(&config["clusters"][0]["cluster"]["certificate-authority-data"])?;
    let tls = crate::pki::client_tls(&ca, &client)?;
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(2))
        .build()
        .map_err(|e| e.to_string())
}

fn unavailable(component: &str, reason: impl Into<String>) -> BackendError {
    BackendError::ComponentUnavailable {
        component: component.to_string(),
        reason: reason.into(),
    }
}

/// The signal that stops a process gracefully: kube-sim waits for SIGINT (Ctrl-C), the
/// components for SIGTERM (what Kubernetes sends).
fn stop_signal(name: &str) -> &'static str {
    if name.starts_with("apiserver") {
        "INT"
    } else {
        "TERM"
    }
}

/// The context a kube-sim kubeconfig selects.
fn current_context(kubeconfig: &Path) -> Option<String> {
    let text = std::fs::read_to_string(kubeconfig).ok()?;
    let value: serde_yaml::Value = serde_yaml::from_str(&text).ok()?;
    value.get("current-context")?.as_str().map(str::to_string)
}

impl SimEnv {
    async fn start(binaries: Binaries, api_servers: ApiServers, spec: EnvSpec) -> Result<SimEnv> {
        let work = spec.work_dir.clone();
        std::fs::create_dir_all(work.join("logs"))
            .map_err(io_err("creating the work directory"))?;
        let pki =
            EnvPki::generate(&work.join("pki")).map_err(|e| BackendError::Other(e.to_string()))?;
        let tls = pki
            .harness_tls()
            .map_err(|e| BackendError::Other(format!("harness TLS: {e}")))?;
        let port = || free_port().map_err(io_err("choosing a port"));
        let api_server = |name: &str| -> Result<ApiServer> {
            let port = port()?;
            let real = match &api_servers {
                ApiServers::KubeSim => None,
                ApiServers::Real(_) => {
                    let ports = ClusterPorts {
                        etcd_client: free_port().map_err(io_err("choosing a port"))?,
                        etcd_peer: free_port().map_err(io_err("choosing a port"))?,
                        apiserver: port,
                    };
                    let real = RealCluster::prepare(&work.join(name), name, ports)
                        .map_err(|e| BackendError::Other(format!("cluster {name}: {e}")))?;
                    Some(real)
                }
            };
            Ok(ApiServer {
                port,
                kubeconfig: real.as_ref().map_or_else(
                    || work.join(format!("{name}.kubeconfig")),
                    |real| real.kubeconfig.clone(),
                ),
                data_dir: work.join(format!("{name}-data")),
                context: name.to_string(),
                real,
            })
        };
        let internal_port = port()?;
        let agent_port = port()?;
        let gateways =
            GatewayReplicas::new(spec.gateway_replicas, agent_port, internal_port, port).await?;
        let env = SimEnv {
            api_servers: api_servers.clone(),
            control: api_server("control")?,
            build: api_server("build")?,
            agent_port,
            internal_port,
            gateways,
            controller_health_port: port()?,
            gateway: GatewayAccess::new(format!("https://127.0.0.1:{internal_port}"), tls)
                .map_err(|e| BackendError::Other(format!("harness HTTP client: {e}")))?
                .with_credentials(crate::load::LoadCredentials {
                    server_ca: pki.server_ca_pem.clone(),
                    cert: pki.harness.cert.clone(),
                    key: pki.harness.key.clone(),
                }),
            binaries,
            work,
            pki,
            state: Mutex::new(State {
                args: spec.component_args.clone(),
                ..State::default()
            }),
        };
        let (control, build) = tokio::join!(
            env.start_api_server(ClusterName::Control),
            env.start_api_server(ClusterName::Build)
        );
        control?;
        build?;
        env.install_crds().await?;
        if spec.components.contains(&ComponentKind::Gateway) {
            env.start_gateway().await?;
        }
        if spec.components.contains(&ComponentKind::Controller) {
            env.start_controller().await?;
        }
        Ok(env)
    }

    fn api_server(&self, cluster: ClusterName) -> &ApiServer {
        match cluster {
            ClusterName::Control => &self.control,
            ClusterName::Build => &self.build,
        }
    }

    async fn spawn(&self, name: &str, binary: &str, args: Vec<String>) -> Result<()> {
        let program = self.binaries.path(binary)?;
        self.spawn_program(name, &program, args).await
    }

    /// Whether a process of that name runs (and has not exited).
    async fn running(&self, name: &str) -> bool {
        let mut state = self.state.lock().await;
        state
            .procs
            .get_mut(name)
            .is_some_and(|proc| proc.exited().is_none())
    }

    async fn spawn_program(&self, name: &str, program: &Path, args: Vec<String>) -> Result<()> {
        let log = self.work.join("logs").join(format!("{name}.log"));
        let proc = Proc::spawn(name, program, &args, &component_env(), &log)
            .map_err(|err| unavailable(name, err.to_string()))?;
        let mut state = self.state.lock().await;
        state.logs.insert(name.to_string(), log);
        if let Some(mut old) = state.procs.insert(name.to_string(), proc) {
            old.kill().await;
        }
        Ok(())
    }

    /// Fails with the log tail if the process has exited.
    async fn check_alive(&self, name: &str) -> Result<()> {
        let mut state = self.state.lock().await;
        let Some(proc) = state.procs.get_mut(name) else {
            return Err(unavailable(name, "not running"));
        };
        if let Some(status) = proc.exited() {
            let log = tail(proc.log(), TAIL_LINES);
            return Err(unavailable(
                name,
                format!("exited with {status} at start; last log lines:\n{log}"),
            ));
        }
        Ok(())
    }

    async fn wait_ready(&self, name: &str, what: &str, probe: Probe) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| BackendError::Other(e.to_string()))?;
        loop {
            self.check_alive(name).await?;
            if probe.ready(&client).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let log = self
                    .state
                    .lock()
                    .await
                    .logs
                    .get(name)
                    .map(|p| tail(p, TAIL_LINES))
                    .unwrap_or_default();
                return Err(unavailable(
                    name,
                    format!(
                        "not ready after {READY_TIMEOUT:?} (waited for {what}); last log lines:\n{log}"
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_http_ok(&self, name: &str, port: u16, path: &str) -> Result<()> {
        let url = format!("http://127.0.0.1:{port}{path}");
        self.wait_ready(name, &format!("200 from {url}"), Probe::Http(url.clone()))
            .await
    }

    async fn start_api_server(&self, cluster: ClusterName) -> Result<()> {
        let server = self.api_server(cluster);
        if let (ApiServers::Real(programs), Some(real)) = (&self.api_servers, &server.real) {
            return self.start_real_cluster(cluster, programs, real).await;
        }
        let _ = std::fs::remove_file(&server.kubeconfig);
        let name = format!("apiserver-{}", cluster.as_str());
        let args = vec![
            "serve".into(),
            "--listen".into(),
            format!("127.0.0.1:{}", server.port),
            "--kubeconfig-out".into(),
            server.kubeconfig.display().to_string(),
            "--data-dir".into(),
            server.data_dir.display().to_string(),
            "--name".into(),
            server.context.clone(),
        ];
        self.spawn(&name, "kube-sim", args).await?;
        let kubeconfig = server.kubeconfig.clone();
        self.wait_ready(
            &name,
            &format!("kubeconfig {}", kubeconfig.display()),
            Probe::Kubeconfig(kubeconfig.clone()),
        )
        .await?;
        let context = current_context(&kubeconfig).unwrap_or_default();
        if context != server.context {
            return Err(unavailable(
                &name,
                format!(
                    "kubeconfig {} selects context `{context}`, expected `{}`",
                    kubeconfig.display(),
                    server.context
                ),
            ));
        }
        Ok(())
    }

    /// Starts what is not running of a real cluster's etcd, kube-apiserver and
    /// kube-controller-manager, and waits for the API server's `/readyz` (with the admin's
    /// client certificate: the kubeconfig is checked at the same time).
    async fn start_real_cluster(
        &self,
        cluster: ClusterName,
        programs: &ClusterPrograms,
        real: &RealCluster,
    ) -> Result<()> {
        let suffix = cluster.as_str();
        let etcd = format!("etcd-{suffix}");
        if !self.running(&etcd).await {
            self.spawn_program(&etcd, &programs.etcd, real.etcd_args())
                .await?;
        }
        let apiserver = format!("apiserver-{suffix}");
        self.spawn_program(&apiserver, &programs.kube_apiserver, real.apiserver_args())
            .await?;
        let client = admin_client(real)
            .map_err(|e| unavailable(&apiserver, format!("admin client: {e}")))?;
        let url = format!("{}/readyz", real.server_url());
        self.wait_ready(
            &apiserver,
            &format!("200 from {url}"),
            Probe::Https(url.clone(), client),
        )
        .await?;
        let manager = format!("controller-manager-{suffix}");
        if !self.running(&manager).await {
            self.spawn_program(
                &manager,
                &programs.kube_controller_manager,
                real.controller_manager_args(),
            )
            .await?;
        }
        Ok(())
    }

    async fn install_crds(&self) -> Result<()> {
        let access = self.cluster(ClusterName::Control);
        let client = crate::kube_ops::client(&access)
            .await
            .map_err(|e| BackendError::Other(e.to_string()))?;
        for crd in buildplane_api::crds() {
            let value =
                serde_json::to_value(&crd).map_err(|e| BackendError::Other(e.to_string()))?;
            crate::kube_ops::create_or_update(&client, &value)
                .await
                .map_err(|e| {
                    unavailable("apiserver-control", format!("installing the CRDs: {e}"))
                })?;
        }
        // The controller's leader-election Lease lives here.
        let namespace = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "openchoreo-control-plane"},
        });
        match client.create(&namespace).await {
            Ok(_) => Ok(()),
            Err(err) if err.code() == Some(409) => Ok(()),
            Err(err) => Err(unavailable(
                "apiserver-control",
                format!("creating openchoreo-control-plane: {err}"),
            )),
        }
    }

    async fn extra_args(&self, kind: ComponentKind) -> Vec<String> {
        self.state
            .lock()
            .await
            .args
            .get(&kind)
            .cloned()
            .unwrap_or_default()
    }

    /// Starts every gateway replica.
    async fn start_gateway(&self) -> Result<()> {
        for index in 0..self.gateways.ports.len() {
            self.start_gateway_replica(index).await?;
        }
        Ok(())
    }

    /// Starts one gateway replica and, once it is ready, puts it in the balancers' rotation.
    async fn start_gateway_replica(&self, index: usize) -> Result<()> {
        let pki = &self.pki;
        let ports = self.gateways.ports[index];
        let name = self.gateways.name(index);
        let mut args = vec![
            "--kubeconfig".to_string(),
            self.control.kubeconfig.display().to_string(),
            "--agent-listen".into(),
            format!("127.0.0.1:{}", ports.agent),
            "--internal-listen".into(),
            format!("127.0.0.1:{}", ports.internal),
            "--health-listen".into(),
            format!("127.0.0.1:{}", ports.health),
            "--server-cert".into(),
            pki.server_cert.display().to_string(),
            "--server-key".into(),
            pki.server_key.display().to_string(),
            "--internal-server-cert".into(),
            pki.server_cert.display().to_string(),
            "--internal-server-key".into(),
            pki.server_key.display().to_string(),
            "--internal-client-ca".into(),
            pki.internal_client_ca.display().to_string(),
            "--replica-id".into(),
            name.clone(),
            "--replicas".into(),
            self.gateways.ports.len().to_string(),
        ];
        if self.gateways.ports.len() > 1 {
            let (namespace, service) = GATEWAY_SERVICE;
            args.extend([
                "--peer-service".into(),
                format!("{namespace}/{service}"),
                "--peer-client-cert".into(),
                pki.gateway_peer_cert.display().to_string(),
                "--peer-client-key".into(),
                pki.gateway_peer_key.display().to_string(),
                "--peer-ca".into(),
                pki.server_ca.display().to_string(),
            ]);
        }
        args.extend(self.extra_args(ComponentKind::Gateway).await);
        self.spawn(&name, "cluster-gateway", args).await?;
        self.wait_http_ok(&name, ports.health, "/readyz").await?;
        // Readiness alone has been seen to come before the other listeners are bound.
        for (what, port) in [("agent", ports.agent), ("internal", ports.internal)] {
            self.wait_ready(
                &name,
                &format!("the {what} listener on port {port}"),
                Probe::Tcp(port),
            )
            .await?;
        }
        self.gateways.set_in_rotation(index, true);
        self.publish_endpoint(index, true).await
    }

    /// Writes replica `index`'s EndpointSlice into the control cluster, as Kubernetes keeps
    /// the Service's endpoints (with several replicas only: one needs no sibling).
    async fn publish_endpoint(&self, index: usize, ready: bool) -> Result<()> {
        if self.gateways.ports.len() <= 1 {
            return Ok(());
        }
        let client = crate::kube_ops::client(&self.cluster(ClusterName::Control))
            .await
            .map_err(|e| BackendError::Other(e.to_string()))?;
        let slice = self.gateways.endpoint_slice(index, ready);
        // A ready endpoint's transport error is retried (a starting replica must be listed):
        // after the full profile's storm, the control cluster's API server has been seen to
        // take over 30 s to accept a connection. A stopping replica's is written once.
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match crate::kube_ops::create_or_update(&client, &slice).await {
                Err(crate::kube_ops::KubeError::Client(_))
                    if ready && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                res => {
                    return res.map(|_| ()).map_err(|e| {
                        unavailable(
                            &self.gateways.name(index),
                            format!("writing its EndpointSlice: {e}"),
                        )
                    });
                }
            }
        }
    }

    async fn start_controller(&self) -> Result<()> {
        let pki = &self.pki;
        let mut args = vec![
            "--kubeconfig".to_string(),
            self.control.kubeconfig.display().to_string(),
            "--cluster-gateway-url".into(),
            format!("https://127.0.0.1:{}", self.internal_port),
            "--gateway-client-cert".into(),
            pki.controller_cert.display().to_string(),
            "--gateway-client-key".into(),
            pki.controller_key.display().to_string(),
            "--gateway-ca".into(),
            pki.server_ca.display().to_string(),
            "--health-listen".into(),
            format!("127.0.0.1:{}", self.controller_health_port),
            "--identity".into(),
            "buildplane-controller-0".into(),
        ];
        args.extend(self.extra_args(ComponentKind::Controller).await);
        self.spawn("controller", "buildplane-controller", args)
            .await?;
        self.wait_http_ok("controller", self.controller_health_port, "/healthz")
            .await
    }

    /// An agent's link, started on first use.
    async fn link(&self, name: &str) -> Result<Arc<FaultProxy>> {
        let mut state = self.state.lock().await;
        match state.links.get(name) {
            Some(Link::Local(proxy)) => return Ok(proxy.clone()),
            Some(Link::Remote(_)) => {
                return Err(BackendError::Other(format!(
                    "`{name}` is a swarm's link; an agent needs a name of its own"
                )));
            }
            None => {}
        }
        let upstream = SocketAddr::from(([127, 0, 0, 1], self.agent_port));
        let proxy = Arc::new(
            FaultProxy::start(upstream)
                .await
                .map_err(io_err("starting a fault proxy"))?,
        );
        state
            .links
            .insert(name.to_string(), Link::Local(proxy.clone()));
        Ok(proxy)
    }

    /// Starts the fault proxy process `name` in front of the agents' gateway address.
    async fn start_link_process(&self, name: &str) -> Result<RemoteProxy> {
        let local = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let listen = local(free_port().map_err(io_err("choosing a port"))?);
        let control = local(free_port().map_err(io_err("choosing a port"))?);
        let args = vec![
            "--listen".to_string(),
            listen.to_string(),
            "--upstream".into(),
            local(self.agent_port).to_string(),
            "--control".into(),
            control.to_string(),
        ];
        self.spawn(name, "e2e-fault-proxy", args).await?;
        self.wait_ready(
            name,
            &format!("its control port {}", control.port()),
            Probe::Tcp(control.port()),
        )
        .await?;
        Ok(RemoteProxy::new(listen, control))
    }

    /// Spawns process `k` of a swarm, `count` agents dialing through `link`; returns its
    /// process name, the file its CA goes to, and its planeID prefix.
    async fn spawn_swarm_process(
        &self,
        spec: &SwarmSpec,
        k: u64,
        count: u64,
        link: &RemoteProxy,
    ) -> Result<(String, PathBuf, String)> {
        let proc_name = format!("swarm-{}-{k}", spec.name);
        let ca_out = self.work.join(format!("{proc_name}-ca.pem"));
        let _ = std::fs::remove_file(&ca_out);
        let prefix = format!("{}-{k}", spec.plane_id_prefix);
        let mut args = vec![
            "swarm".to_string(),
            "--count".into(),
            count.to_string(),
            "--plane-id-prefix".into(),
            prefix.clone(),
            "--server-url".into(),
            format!("wss://localhost:{}/ws", link.addr().port()),
            "--server-ca".into(),
            self.pki.server_ca.display().to_string(),
            "--kubeconfig".into(),
            self.build.kubeconfig.display().to_string(),
            "--ca-out".into(),
            ca_out.display().to_string(),
        ];
        args.extend(spec.args.iter().cloned());
        self.spawn(&proc_name, "cluster-agent", args).await?;
        Ok((proc_name, ca_out, prefix))
    }

    fn agent_args(&self, link: SocketAddr, spec: &AgentSpec, health_port: u16) -> Vec<String> {
        let mut args = vec![
            "run".to_string(),
            "--server-url".into(),
            format!("wss://localhost:{}/ws", link.port()),
            "--plane-id".into(),
            spec.plane_id.clone(),
            "--kubeconfig".into(),
            self.build.kubeconfig.display().to_string(),
            "--server-ca".into(),
            self.pki.server_ca.display().to_string(),
            "--identity-namespace".into(),
            spec.identity_namespace.clone(),
            "--health-listen".into(),
            format!("127.0.0.1:{health_port}"),
        ];
        if let Some(protocol) = &spec.protocol {
            args.extend(["--protocol".to_string(), protocol.clone()]);
        }
        args.extend(spec.args.iter().cloned());
        args
    }

    async fn spawn_agent(&self, name: &str) -> Result<()> {
        let link = self.link(name).await?;
        let (spec, health_port) = {
            let state = self.state.lock().await;
            let info = state
                .agents
                .get(name)
                .ok_or_else(|| BackendError::Unknown {
                    what: "agent",
                    name: name.to_string(),
                })?;
            (info.spec.clone(), info.health_port)
        };
        let proc_name = format!("agent-{name}");
        self.spawn(
            &proc_name,
            "cluster-agent",
            self.agent_args(link.addr(), &spec, health_port),
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.check_alive(&proc_name).await
    }

    async fn proc_names(&self, target: &ComponentTarget) -> Result<Vec<String>> {
        let state = self.state.lock().await;
        let names = match target.kind {
            ComponentKind::Gateway => match &target.name {
                Some(name) => {
                    self.gateways.replica(name)?;
                    vec![name.clone()]
                }
                None => (0..self.gateways.ports.len())
                    .map(|i| self.gateways.name(i))
                    .collect(),
            },
            ComponentKind::Controller => vec!["controller".to_string()],
            ComponentKind::Apiserver => {
                vec![format!(
                    "apiserver-{}",
                    target.cluster.unwrap_or(ClusterName::Control).as_str()
                )]
            }
            ComponentKind::Agent => {
                let name = target.name.clone().unwrap_or_default();
                if !state.agents.contains_key(&name) {
                    return Err(BackendError::Unknown {
                        what: "agent",
                        name,
                    });
                }
                vec![format!("agent-{name}")]
            }
            ComponentKind::Swarm => {
                let name = target.name.clone().unwrap_or_default();
                state
                    .swarms
                    .get(&name)
                    .cloned()
                    .ok_or(BackendError::Unknown {
                        what: "swarm",
                        name,
                    })?
            }
        };
        Ok(names)
    }

    async fn health_port(&self, target: &ComponentTarget) -> Result<u16> {
        match target.kind {
            ComponentKind::Gateway => {
                let index = match &target.name {
                    Some(name) => self.gateways.replica(name)?,
                    None => 0,
                };
                Ok(self.gateways.ports[index].health)
            }
            ComponentKind::Controller => Ok(self.controller_health_port),
            ComponentKind::Agent => {
                let name = target.name.clone().unwrap_or_default();
                let state = self.state.lock().await;
                state
                    .agents
                    .get(&name)
                    .map(|a| a.health_port)
                    .ok_or(BackendError::Unknown {
                        what: "agent",
                        name,
                    })
            }
            _ => Err(BackendError::Unsupported {
                backend: "sim",
                what: format!("metrics of {target}"),
            }),
        }
    }
}

impl Environment for SimEnv {
    fn cluster(&self, cluster: ClusterName) -> ClusterAccess {
        let server = self.api_server(cluster);
        ClusterAccess {
            kubeconfig: server.kubeconfig.clone(),
            context: server.context.clone(),
        }
    }

    fn kubeconfig_env(&self) -> String {
        format!(
            "{}:{}",
            self.control.kubeconfig.display(),
            self.build.kubeconfig.display()
        )
    }

    fn gateway(&self) -> Result<GatewayAccess> {
        Ok(self.gateway.clone())
    }

    fn load_generator(&self) -> Option<PathBuf> {
        self.binaries.path("e2e-load").ok()
    }

    fn start_agent(&self, spec: AgentSpec) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let name = spec.name.clone();
            let health_port = free_port().map_err(io_err("choosing a port"))?;
            self.state
                .lock()
                .await
                .agents
                .insert(name.clone(), AgentInfo { spec, health_port });
            self.spawn_agent(&name).await
        })
    }

    fn start_swarm(&self, spec: SwarmSpec) -> BoxFuture<'_, Result<Vec<SwarmPlane>>> {
        Box::pin(async move {
            // Each agent holds a connection per gateway replica. Its link's proxy process holds
            // two sockets per connection; with several replicas, the connection also crosses
            // the agents' balancer here (two more sockets in the harness).
            let replicas = self.gateways.ports.len() as u64;
            if replicas > 1 {
                open_files_suffice(spec.count.saturating_mul(replicas))?;
            }
            let n_processes = spec.processes.max(1) as u64;
            proxy_files_suffice(spec.count.div_ceil(n_processes).saturating_mul(replicas))?;
            if self.state.lock().await.links.contains_key(&spec.name) {
                return Err(BackendError::Other(format!(
                    "a link named `{}` exists; a new swarm needs a name of its own",
                    spec.name
                )));
            }
            let mut names = Vec::new();
            let mut links = Vec::new();
            let mut ca_files = Vec::new();
            for k in 0..n_processes {
                let count = spec.count / n_processes + u64::from(k < spec.count % n_processes);
                if count == 0 {
                    continue;
                }
                let link = self
                    .start_link_process(&format!("link-{}-{k}", spec.name))
                    .await?;
                let (proc_name, ca_out, prefix) =
                    self.spawn_swarm_process(&spec, k, count, &link).await?;
                links.push(link);
                names.push(proc_name.clone());
                ca_files.push((proc_name, ca_out, prefix, count));
            }
            {
                let mut state = self.state.lock().await;
                state.swarms.insert(spec.name.clone(), names);
                state.links.insert(spec.name.clone(), Link::Remote(links));
            }
            let mut planes = Vec::new();
            for (proc_name, ca_out, prefix, count) in ca_files {
                self.wait_ready(
                    &proc_name,
                    &format!("CA file {}", ca_out.display()),
                    Probe::Pem(ca_out.clone()),
                )
                .await?;
                let ca =
                    std::fs::read_to_string(&ca_out).map_err(io_err("reading the swarm CA"))?;
                planes.extend((0..count).map(|i| SwarmPlane {
                    plane_id: format!("{prefix}-{i}"),
                    ca: ca.clone(),
                }));
            }
            Ok(planes)
        })
    }

    fn start(&self, target: ComponentTarget, args: Vec<String>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            if !args.is_empty() {
                self.state
                    .lock()
                    .await
                    .args
                    .insert(target.kind, args.clone());
            }
            match target.kind {
                ComponentKind::Gateway => match &target.name {
                    Some(name) => {
                        let index = self.gateways.replica(name)?;
                        self.start_gateway_replica(index).await
                    }
                    None => self.start_gateway().await,
                },
                ComponentKind::Controller => self.start_controller().await,
                ComponentKind::Apiserver => {
                    self.start_api_server(target.cluster.unwrap_or(ClusterName::Control))
                        .await
                }
                ComponentKind::Agent => {
                    let name = target.name.clone().unwrap_or_default();
                    if !args.is_empty()
                        && let Some(info) = self.state.lock().await.agents.get_mut(&name)
                    {
                        info.spec.args = args;
                    }
                    self.spawn_agent(&name).await
                }
                ComponentKind::Swarm => Err(BackendError::Unsupported {
                    backend: "sim",
                    what: "restarting a swarm (its CAs would change); start a new one".into(),
                }),
            }
        })
    }

    fn stop(&self, target: ComponentTarget, mode: StopMode) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let names = self.proc_names(&target).await?;
            // As a Service does for a terminating pod: no new connection goes to a replica
            // being stopped (killed: the balancer finds it refusing and skips it).
            if target.kind == ComponentKind::Gateway && mode == StopMode::Graceful {
                for name in &names {
                    if let Some(index) = self.gateways.index_of(name) {
                        self.gateways.set_in_rotation(index, false);
                    }
                }
            }
            // And its endpoint is no longer ready: its siblings stop forwarding to it. Best
            // effort: with the control cluster down, a stopped replica refuses connections and
            // its siblings try the next one.
            if target.kind == ComponentKind::Gateway {
                for name in &names {
                    if let Some(index) = self.gateways.index_of(name) {
                        let _ = self.publish_endpoint(index, false).await;
                    }
                }
            }
            let mut procs = Vec::new();
            {
                let mut state = self.state.lock().await;
                for name in &names {
                    if let Some(proc) = state.procs.remove(name) {
                        procs.push(proc);
                    }
                }
            }
            if procs.is_empty() {
                return Err(BackendError::Other(format!("{target} is not running")));
            }
            futures::future::join_all(procs.iter_mut().map(|proc| async move {
                match mode {
                    StopMode::Graceful => proc.stop(stop_signal(proc.name()), STOP_GRACE).await,
                    StopMode::Kill => proc.kill().await,
                }
            }))
            .await;
            Ok(())
        })
    }

    fn partition(&self, replica: &str, from: Option<PartitionFrom>) -> Result<()> {
        let index = self.gateways.replica(replica)?;
        if self.gateways.balancers.is_empty() {
            return Err(BackendError::Unsupported {
                backend: "sim",
                what: format!(
                    "partitioning `{replica}`: a single gateway is reached through each agent's own link (use `fault: {{link: ..., partition: true}}`), or set gatewayReplicas above 1"
                ),
            });
        }
        self.gateways.set_partitioned(index, from);
        Ok(())
    }

    fn set_faults(&self, link: &str, toxics: Toxics) -> BoxFuture<'_, Result<()>> {
        let link = link.to_string();
        Box::pin(async move {
            let links: Vec<Link> = {
                let state = self.state.lock().await;
                if link == "*" {
                    state.links.values().cloned().collect()
                } else {
                    vec![
                        state
                            .links
                            .get(&link)
                            .cloned()
                            .ok_or(BackendError::Unknown {
                                what: "link",
                                name: link,
                            })?,
                    ]
                }
            };
            futures::future::try_join_all(links.iter().map(|link| link.set_toxics(&toxics)))
                .await?;
            Ok(())
        })
    }

    fn metrics(&self, target: ComponentTarget) -> BoxFuture<'_, Result<String>> {
        Box::pin(async move {
            let port = self.health_port(&target).await?;
            let url = format!("http://127.0.0.1:{port}/metrics");
            let res = reqwest::Client::new()
                .get(&url)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .map_err(|e| BackendError::Other(format!("GET {url}: {e}")))?;
            res.text()
                .await
                .map_err(|e| BackendError::Other(format!("GET {url}: {e}")))
        })
    }

    fn agent_command(
        &self,
        agent: &str,
        args: Vec<String>,
    ) -> BoxFuture<'_, Result<CommandOutput>> {
        let agent = agent.to_string();
        Box::pin(async move {
            let (namespace, plane_id) = {
                let state = self.state.lock().await;
                let info = state
                    .agents
                    .get(&agent)
                    .ok_or_else(|| BackendError::Unknown {
                        what: "agent",
                        name: agent.clone(),
                    })?;
                (
                    info.spec.identity_namespace.clone(),
                    info.spec.plane_id.clone(),
                )
            };
            let program = self.binaries.path("cluster-agent")?;
            let mut full = args;
            full.extend([
                "--kubeconfig".to_string(),
                self.build.kubeconfig.display().to_string(),
                "--identity-namespace".into(),
                namespace,
                "--plane-id".into(),
                plane_id,
            ]);
            let output = tokio::process::Command::new(program)
                .args(&full)
                .envs(component_env())
                .output()
                .await
                .map_err(io_err("running cluster-agent"))?;
            Ok(CommandOutput {
                code: output.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            })
        })
    }

    fn logs(&self, lines: usize) -> BTreeMap<String, String> {
        match self.state.try_lock() {
            Ok(state) => state
                .logs
                .iter()
                .map(|(name, path)| (name.clone(), tail(path, lines)))
                .collect(),
            Err(_) => BTreeMap::new(),
        }
    }

    fn shutdown(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let mut state = self.state.lock().await;
            let mut procs: Vec<Proc> = std::mem::take(&mut state.procs).into_values().collect();
            // Agents first, API servers last, so the others do not log spurious errors.
            procs.sort_by_key(|p| match p.name() {
                n if n.starts_with("agent") || n.starts_with("swarm") => 0,
                n if n == "controller" || n.starts_with("link-") => 1,
                n if n.starts_with("gateway") => 2,
                n if n.starts_with("controller-manager") => 3,
                n if n.starts_with("etcd") => 5,
                _ => 4,
            });
            for proc in &mut procs {
                let signal = stop_signal(proc.name());
                proc.stop(signal, Duration::from_secs(2)).await;
            }
            state.links.clear();
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A swarm the open-files limit cannot hold is refused up front, naming the fix; one it
    /// can hold passes.
    #[test]
    fn a_swarm_over_the_open_files_limit_is_refused_with_the_fix() {
        let _ = rlimit::increase_nofile_limit(u64::MAX);
        let (soft, _) = rlimit::Resource::NOFILE.get().unwrap();
        if soft == rlimit::INFINITY {
            return; // nothing to exceed on this machine
        }
        let err = open_files_suffice(soft).unwrap_err().to_string();
        assert!(err.contains(&format!("the limit is {soft}")), "{err}");
        assert!(err.contains("ulimit -n"), "{err}");
        if soft >= open_files_needed(10) {
            open_files_suffice(10).unwrap();
        }
    }

    /// A swarm whose proxy processes could not hold their share of its links is refused up
    /// front, naming the fix; the full profile's storm (10,000 agents in 8 processes) passes
    /// under a hard limit of 20,000, where one proxy for the whole swarm could not.
    #[test]
    fn a_swarm_too_large_for_its_proxy_processes_is_refused_with_the_fix() {
        let (_, hard) = rlimit::Resource::NOFILE.get().unwrap();
        if hard == rlimit::INFINITY {
            return;
        }
        let err = proxy_files_suffice(hard).unwrap_err().to_string();
        assert!(err.contains("more `processes`"), "{err}");
        if hard >= 20_000 {
            proxy_files_suffice(10_000u64.div_ceil(8)).unwrap();
        }
        assert!(open_files_needed(10_000) > 20_000);
    }
}
