//! Shared fixture: two kube-sim API servers (control and build cluster), the gateway's PKI, a
//! running gateway over real sockets, in-process agents, raw WebSocket peers and an mTLS client
//! of the internal API.
#![allow(dead_code, unreachable_pub)]

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use buildplane_api::{
    BuildPlane, BuildPlaneSpec, ClusterAgentConfig, ClusterBuildPlane, ClusterBuildPlaneSpec,
    SecretKeyReference, ValueFrom,
};
use buildplane_pki::{Ca, Leaf, ReloadableCert};
use buildplane_tunnel::{SUBPROTOCOL_V1, SUBPROTOCOL_V2};
use cluster_agent::{Agent, AgentConfig, BuildCluster, backoff::Backoff};
use cluster_gateway::{GatewayConfig, RunningGateway};
use k8s_openapi::{
    ByteString,
    api::core::v1::{Namespace, Secret},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
};
use kube_sim::{Config, RunningServer, Server};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, http::HeaderValue};
use tokio_util::sync::CancellationToken;

pub const DAY: Duration = Duration::from_secs(86_400);

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// Everything a gateway test needs.
pub struct Env {
    pub control: RunningServer,
    pub build: RunningServer,
    pub control_client: Client,
    /// The build cluster (its client, and the request path agents use, as in `cluster-agent run`).
    pub build_cluster: BuildCluster,
    pub dir: tempfile::TempDir,
    pub server_ca: Ca,
    pub config: GatewayConfig,
    pub gateway: Option<RunningGateway>,
    pub http: reqwest::Client,
    /// HTTP/1.1 only (for headers HTTP/2 cannot carry, like `Upgrade`).
    pub http1: reqwest::Client,
    /// Files of an internal-API client (certificate, key, the gateway's serving CA), for
    /// processes that call the internal API themselves (the controller).
    pub internal_client_files: (PathBuf, PathBuf, PathBuf),
    pub base: String,
    pub agent_addr: SocketAddr,
    agents: Vec<CancellationToken>,
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write fixture file");
    path
}

impl Env {
    /// Two API servers (CRDs and namespaces `org-a`, `org-b` in the control one) and a gateway.
    pub async fn start() -> Env {
        buildplane_pki::install_crypto_provider();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        let control = Server::start(Config {
            name: "control".into(),
            ..Config::default()
        })
        .await
        .expect("control API server");
        let build = Server::start(Config {
            name: "build".into(),
            ..Config::default()
        })
        .await
        .expect("build API server");
        let control_client = control.client().await.expect("control client");
        let build_cluster =
            BuildCluster::from_config(build.client_config().await.expect("build client config"))
                .expect("build cluster");
        let crds: Api<CustomResourceDefinition> = Api::all(control_client.clone());
        for crd in buildplane_api::crds() {
            crds.create(&PostParams::default(), &crd)
                .await
                .expect("CRD created");
        }
        for ns in ["org-a", "org-b", "org-c"] {
            create_namespace(&control_client, ns).await;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let server_ca = Ca::generate("gateway-ca", DAY).expect("server CA");
        let server = server_ca
            .issue_server(&["localhost"], &["127.0.0.1".parse().unwrap()], DAY)
            .expect("server leaf");
        let internal_ca = Ca::generate("internal-ca", DAY).expect("internal CA");
        let internal_client = internal_ca
            .issue_client("controller", DAY)
            .expect("internal client leaf");
        let kubeconfig = dir.path().join("control.kubeconfig");
        control
            .write_kubeconfig(&kubeconfig)
            .expect("write kubeconfig");
        let mut config = GatewayConfig::new(
            Some(kubeconfig),
            (
                write(dir.path(), "tls.crt", &server.cert_pem),
                write(dir.path(), "tls.key", &server.key_pem),
            ),
            write(dir.path(), "internal-ca.crt", internal_ca.cert_pem()),
        );
        let localhost = SocketAddr::from(([127, 0, 0, 1], 0));
        config.agent_listen = localhost;
        config.internal_listen = localhost;
        config.health_listen = localhost;
        config.heartbeat_interval = Duration::from_secs(2);
        config.heartbeat_timeout = Duration::from_secs(6);
        config.shutdown_stagger = Duration::from_millis(100);
        let client = || {
            buildplane_runtime::internal_api_client(
                server_ca.cert_pem().as_bytes(),
                format!("{}{}", internal_client.cert_pem, internal_client.key_pem).as_bytes(),
            )
            .expect("internal API client")
        };
        let http = client().build().expect("internal API client");
        let internal_client_files = (
            write(dir.path(), "internal-client.crt", &internal_client.cert_pem),
            write(dir.path(), "internal-client.key", &internal_client.key_pem),
            write(dir.path(), "server-ca.crt", server_ca.cert_pem()),
        );
        let http1 = client().http1_only().build().expect("internal API client");
        let mut env = Env {
            control,
            build,
            control_client,
            build_cluster,
            dir,
            server_ca,
            config,
            gateway: None,
            http,
            http1,
            internal_client_files,
            base: String::new(),
            agent_addr: localhost,
            agents: Vec::new(),
        };
        env.start_gateway().await;
        // Later restarts reuse the same ports, as a restarted pod behind a Service would.
        env.config.agent_listen = env.agent_addr;
        env.config.internal_listen = env.gateway.as_ref().unwrap().internal_addr;
        env.config.health_listen = env.gateway.as_ref().unwrap().health_addr;
        env
    }

    /// Starts the gateway with `self.config`.
    pub async fn start_gateway(&mut self) {
        let gateway = cluster_gateway::start(self.config.clone())
            .await
            .expect("gateway started");
        self.base = format!("https://127.0.0.1:{}", gateway.internal_addr.port());
        self.agent_addr = gateway.agent_addr;
        self.gateway = Some(gateway);
    }

    /// Stops the gateway (staggered close of agents, listeners closed).
    pub async fn stop_gateway(&mut self) {
        if let Some(gateway) = self.gateway.take() {
            gateway
                .shutdown(Duration::from_millis(100))
                .await
                .expect("no gateway task ended before shutdown");
        }
    }

    pub fn shared(&self) -> &Arc<cluster_gateway::Shared> {
        &self.gateway.as_ref().expect("gateway running").shared
    }

    pub fn agent_url(&self) -> String {
        format!("wss://127.0.0.1:{}/ws", self.agent_addr.port())
    }

    /// GET on the internal API: (status, body).
    pub async fn get(&self, path: &str) -> (u16, String) {
        match self.http.get(format!("{}{path}", self.base)).send().await {
            Ok(res) => {
                let status = res.status().as_u16();
                (status, res.text().await.unwrap_or_default())
            }
            Err(err) => (0, err.to_string()),
        }
    }

    /// POST on the internal API: (status, body).
    pub async fn post(&self, path: &str, body: &str) -> (u16, String) {
        let request = self.http.post(format!("{}{path}", self.base));
        match request.body(body.to_owned()).send().await {
            Ok(res) => {
                let status = res.status().as_u16();
                (status, res.text().await.unwrap_or_default())
            }
            Err(err) => (0, err.to_string()),
        }
    }

    /// GET through the proxy to a CR's plane.
    pub async fn proxy(&self, plane_id: &str, ns: &str, name: &str, path: &str) -> (u16, String) {
        self.get(&format!(
            "/api/proxy/buildplane/{plane_id}/{ns}/{name}/k8s{path}"
        ))
        .await
    }

    /// Polls `check` until it holds or `within` passes; panics with `what`.
    pub async fn eventually<F, Fut>(&self, what: &str, within: Duration, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if check().await {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("timed out after {within:?} waiting for: {what}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until a proxied GET answers `status`.
    pub async fn wait_proxy_status(
        &self,
        plane_id: &str,
        ns: &str,
        name: &str,
        status: u16,
        within: Duration,
    ) {
        let what = format!("{plane_id} {ns}/{name} answering {status}");
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let last = self.proxy(plane_id, ns, name, "/api/v1/namespaces").await;
            if last.0 == status {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("timed out waiting for {what}; last answer {last:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Creates (or replaces the spec of) a BuildPlane trusting an inline CA.
    pub async fn build_plane(&self, ns: &str, name: &str, plane_id: &str, ca_pem: &str) {
        self.build_plane_from(ns, name, plane_id, inline(ca_pem))
            .await;
    }

    pub async fn build_plane_from(&self, ns: &str, name: &str, plane_id: &str, ca: ValueFrom) {
        let api: Api<BuildPlane> = Api::namespaced(self.control_client.clone(), ns);
        let mut bp = BuildPlane::new(
            name,
            BuildPlaneSpec {
                plane_id: Some(plane_id.into()),
                cluster_agent: ClusterAgentConfig { client_ca: ca },
                secret_store_ref: None,
                observability_plane_ref: None,
            },
        );
        bp.metadata.namespace = Some(ns.into());
        api.patch(
            name,
            &PatchParams::apply("gateway-tests").force(),
            &Patch::Apply(&bp),
        )
        .await
        .expect("BuildPlane applied");
    }

    pub async fn cluster_build_plane(&self, name: &str, plane_id: &str, ca_pem: &str) {
        let api: Api<ClusterBuildPlane> = Api::all(self.control_client.clone());
        let cbp = ClusterBuildPlane::new(
            name,
            ClusterBuildPlaneSpec {
                plane_id: plane_id.into(),
                cluster_agent: ClusterAgentConfig {
                    client_ca: inline(ca_pem),
                },
                secret_store_ref: None,
                observability_plane_ref: None,
            },
        );
        api.patch(
            name,
            &PatchParams::apply("gateway-tests").force(),
            &Patch::Apply(&cbp),
        )
        .await
        .expect("ClusterBuildPlane applied");
    }

    pub async fn delete_build_plane(&self, ns: &str, name: &str) {
        let api: Api<BuildPlane> = Api::namespaced(self.control_client.clone(), ns);
        api.delete(name, &DeleteParams::default())
            .await
            .expect("BuildPlane deleted");
    }

    /// Creates or replaces a Secret with one key in the control cluster.
    pub async fn secret(&self, ns: &str, name: &str, key: &str, value: &str) {
        let api: Api<Secret> = Api::namespaced(self.control_client.clone(), ns);
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                ..ObjectMeta::default()
            },
            data: Some([(key.to_owned(), ByteString(value.as_bytes().to_vec()))].into()),
            ..Secret::default()
        };
        api.patch(
            name,
            &PatchParams::apply("gateway-tests").force(),
            &Patch::Apply(&secret),
        )
        .await
        .expect("Secret applied");
    }

    /// Starts an in-process agent with a leaf from `ca` for `plane_id`.
    pub fn agent(&mut self, ca: &Ca, plane_id: &str, protocol: u16) -> Arc<Agent> {
        let leaf = ca.issue_client(plane_id, DAY).expect("agent leaf");
        self.agent_with_leaf(&leaf, plane_id, protocol)
    }

    /// Starts an in-process agent (leaf from `ca`, v2) that names the CRs it serves.
    pub fn agent_serving(&mut self, ca: &Ca, plane_id: &str, served: &str) -> Arc<Agent> {
        let leaf = ca.issue_client(plane_id, DAY).expect("agent leaf");
        let mut config = AgentConfig::new(self.agent_url(), plane_id);
        config.served =
            buildplane_api::served::ServedCrs::parse_list(served).expect("--serve list");
        let server_ca = self.server_ca.cert_pem().to_owned();
        self.agent_with_config(config, &server_ca, &leaf)
    }

    pub fn agent_with_leaf(&mut self, leaf: &Leaf, plane_id: &str, protocol: u16) -> Arc<Agent> {
        let url = self.agent_url();
        let server_ca = self.server_ca.cert_pem().to_owned();
        self.agent_to(&url, &server_ca, leaf, plane_id, "buildplane", protocol)
    }

    /// Starts an in-process agent serving the build cluster, dialling `url` (any gateway, ours
    /// or OpenChoreo's) and trusting `server_ca_pem` for it.
    pub fn agent_to(
        &mut self,
        url: &str,
        server_ca_pem: &str,
        leaf: &Leaf,
        plane_id: &str,
        plane_type: &str,
        protocol: u16,
    ) -> Arc<Agent> {
        let mut config = AgentConfig::new(url, plane_id);
        config.plane_type = plane_type.into();
        config.protocol = protocol;
        self.agent_with_config(config, server_ca_pem, leaf)
    }

    /// Starts an in-process agent with `config` (test-speed backoff and heartbeats set here).
    pub fn agent_with_config(
        &mut self,
        mut config: AgentConfig,
        server_ca_pem: &str,
        leaf: &Leaf,
    ) -> Arc<Agent> {
        config.backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        config.ping_interval = Duration::from_secs(1);
        config.read_deadline = Duration::from_secs(5);
        self.agent_as_configured(config, server_ca_pem, leaf)
    }

    /// Starts an in-process agent with `config` exactly as given.
    pub fn agent_as_configured(
        &mut self,
        config: AgentConfig,
        server_ca_pem: &str,
        leaf: &Leaf,
    ) -> Arc<Agent> {
        let cert = ReloadableCert::from_pem(&leaf.cert_pem, &leaf.key_pem).expect("cert");
        let agent = Agent::new(
            config,
            self.build_cluster.clone(),
            server_ca_pem.as_bytes(),
            cert,
        )
        .expect("agent");
        let token = CancellationToken::new();
        tokio::spawn(agent.clone().supervise(token.clone()));
        self.agents.push(token);
        agent
    }

    /// Dials the agent listener by hand: the upgrade's (status, body) on refusal.
    pub async fn raw_connect(
        &self,
        query: &str,
        leaf: Option<&Leaf>,
        protocols: Option<&str>,
    ) -> Result<(Ws, Option<String>), (u16, String)> {
        let cert = leaf.map(|l| ReloadableCert::from_pem(&l.cert_pem, &l.key_pem).unwrap());
        let tls = buildplane_pki::client_config(self.server_ca.cert_pem().as_bytes(), cert)
            .expect("client TLS");
        let tcp = tokio::net::TcpStream::connect(self.agent_addr)
            .await
            .map_err(|e| (0, e.to_string()))?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect("127.0.0.1".try_into().unwrap(), tcp)
            .await
            .map_err(|e| (0, e.to_string()))?;
        let mut request = format!("{}{query}", self.agent_url())
            .into_client_request()
            .unwrap();
        if let Some(protocols) = protocols {
            request.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_str(protocols).unwrap(),
            );
        }
        match tokio_tungstenite::client_async(request, stream).await {
            Ok((ws, response)) => {
                let protocol = response
                    .headers()
                    .get("sec-websocket-protocol")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                Ok((ws, protocol))
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err((
                response.status().as_u16(),
                response
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default(),
            )),
            Err(err) => Err((0, err.to_string())),
        }
    }

    /// [`Env::raw_connect`] until admitted (the reflector sees a new BuildPlane shortly after
    /// it is applied), then until the gateway has registered the connection: the upgrade's 101
    /// goes out before the connection is in the table, and a request sent in between is
    /// answered 503 NoAgentConnected, never reaching this agent (a test that then waited for it
    /// hung once in CI).
    pub async fn raw_admitted(
        &self,
        query: &str,
        leaf: &Leaf,
        protocols: Option<&str>,
    ) -> (Ws, Option<String>) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let newest_before = self.newest_connection_id().await;
        let admitted = loop {
            match self.raw_connect(query, Some(leaf), protocols).await {
                Ok(ok) => break ok,
                Err(err) if tokio::time::Instant::now() > deadline => {
                    panic!("not admitted: {err:?}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        while self.newest_connection_id().await <= newest_before {
            assert!(
                tokio::time::Instant::now() < deadline,
                "admitted but never registered in the connection table"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        admitted
    }

    /// The highest connection id in the gateway's table (ids only grow), 0 when it is empty.
    async fn newest_connection_id(&self) -> u64 {
        let (_, body) = self.get("/api/v1/connections").await;
        serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                v["connections"]
                    .as_array()?
                    .iter()
                    .filter_map(|c| c["id"].as_u64())
                    .max()
            })
            .unwrap_or(0)
    }

    /// The gateway's Prometheus text (`/metrics` on the health listener).
    pub async fn metrics(&self) -> String {
        let url = format!(
            "http://{}/metrics",
            self.gateway.as_ref().expect("gateway running").health_addr
        );
        reqwest::get(url).await.unwrap().text().await.unwrap()
    }

    /// The connection table's `total`.
    pub async fn connections(&self) -> usize {
        let (_, body) = self.get("/api/v1/connections").await;
        serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["total"].as_u64())
            .unwrap_or(0) as usize
    }

    /// `connectedAgents` of a plane's status (for one CR when `cr` is given).
    pub async fn connected_agents(&self, plane_id: &str, cr: Option<(&str, &str)>) -> u64 {
        let query = cr
            .map(|(ns, name)| format!("?namespace={ns}&name={name}"))
            .unwrap_or_default();
        let (_, body) = self
            .get(&format!(
                "/api/v1/planes/buildplane/{plane_id}/status{query}"
            ))
            .await;
        serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["connectedAgents"].as_u64())
            .unwrap_or(0)
    }

    /// Stops every in-process agent.
    pub fn stop_agents(&mut self) {
        for token in self.agents.drain(..) {
            token.cancel();
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.stop_agents();
        if let Some(gateway) = &self.gateway {
            gateway.shared.shutdown.cancel();
        }
    }
}

pub fn inline(ca_pem: &str) -> ValueFrom {
    ValueFrom {
        secret_ref: None,
        value: Some(ca_pem.into()),
    }
}

pub fn from_secret(name: &str, namespace: Option<&str>, key: &str) -> ValueFrom {
    ValueFrom {
        secret_ref: Some(SecretKeyReference {
            name: name.into(),
            namespace: namespace.map(str::to_owned),
            key: key.into(),
        }),
        value: None,
    }
}

async fn create_namespace(client: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    let _ = api.create(&PostParams::default(), &ns).await;
}

pub const V2_FIRST: &str = "buildplane.tunnel.v2, buildplane.tunnel.v1";

pub fn subprotocols() -> (&'static str, &'static str) {
    (SUBPROTOCOL_V1, SUBPROTOCOL_V2)
}
