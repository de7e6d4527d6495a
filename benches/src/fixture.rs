//! The systems under test, started in-process on 127.0.0.1: PKI, backend, raw relay, tunnel.

use std::{convert::Infallible, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::Context as _;
use buildplane_api::{BuildPlane, BuildPlaneSpec, ClusterAgentConfig, ValueFrom};
use buildplane_pki::{Ca, Leaf, ReloadableCert};
use bytes::Bytes;
use cluster_agent::{Agent, AgentConfig};
use cluster_gateway::{GatewayConfig, RunningGateway};
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use k8s_openapi::{
    api::core::v1::Namespace,
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use kube_sim::{RunningServer, Server};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::MAX_BODY;

const DAY: Duration = Duration::from_secs(86_400);

/// Namespace of the benches' BuildPlanes.
pub const NAMESPACE: &str = "bench";

/// Certificates of every hop.
pub struct Pki {
    /// Issues the gateway's (and the relays') serving certificate.
    pub server_ca: Ca,
    /// Serving leaf for `localhost` and `127.0.0.1`.
    pub server: Leaf,
    /// CA of the internal API's clients.
    pub internal_ca: Ca,
    /// The benches' internal API client.
    pub internal_client: Leaf,
    /// The agents' CA (each BuildPlane's `clientCA`).
    pub agent_ca: Ca,
    /// An agent leaf.
    pub agent: Leaf,
}

impl Pki {
    /// Generates every CA and leaf (ECDSA P-256).
    pub fn generate() -> anyhow::Result<Pki> {
        let server_ca = Ca::generate("bench-gateway-ca", DAY)?;
        let server = server_ca.issue_server(&["localhost"], &["127.0.0.1".parse()?], DAY)?;
        let internal_ca = Ca::generate("bench-internal-ca", DAY)?;
        let internal_client = internal_ca.issue_client("bench-client", DAY)?;
        let agent_ca = Ca::generate("bench-agent-ca", DAY)?;
        let agent = agent_ca.issue_client("bench", DAY)?;
        Ok(Pki {
            server_ca,
            server,
            internal_ca,
            internal_client,
            agent_ca,
            agent,
        })
    }

    /// The serving certificate as a resolver.
    pub fn server_cert(&self) -> anyhow::Result<Arc<ReloadableCert>> {
        Ok(ReloadableCert::from_pem(
            &self.server.cert_pem,
            &self.server.key_pem,
        )?)
    }

    /// The agent leaf as a resolver.
    pub fn agent_cert(&self) -> anyhow::Result<Arc<ReloadableCert>> {
        Ok(ReloadableCert::from_pem(
            &self.agent.cert_pem,
            &self.agent.key_pem,
        )?)
    }

    /// The HTTP/1.1 client of every path: trusts the server CA, presents the internal leaf.
    pub fn http_client(&self) -> anyhow::Result<reqwest::Client> {
        let identity = format!(
            "{}{}",
            self.internal_client.cert_pem, self.internal_client.key_pem
        );
        Ok(buildplane_runtime::internal_api_client(
            self.server_ca.cert_pem().as_bytes(),
            identity.as_bytes(),
        )?
        .http1_only()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(1024)
        .build()?)
    }

    /// Writes the files a gateway process reads: (`tls.crt`, `tls.key`, `internal-ca.crt`,
    /// `server-ca.crt`).
    pub fn write(&self, dir: &Path) -> anyhow::Result<PkiFiles> {
        let write = |name: &str, text: &str| -> anyhow::Result<std::path::PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        };
        Ok(PkiFiles {
            server_cert: write("tls.crt", &self.server.cert_pem)?,
            server_key: write("tls.key", &self.server.key_pem)?,
            internal_ca: write("internal-ca.crt", self.internal_ca.cert_pem())?,
            server_ca: write("server-ca.crt", self.server_ca.cert_pem())?,
        })
    }
}

/// Paths written by [`Pki::write`].
pub struct PkiFiles {
    /// Serving certificate.
    pub server_cert: std::path::PathBuf,
    /// Serving key.
    pub server_key: std::path::PathBuf,
    /// CA of the internal API's clients.
    pub internal_ca: std::path::PathBuf,
    /// The CA agents trust for the gateway.
    pub server_ca: std::path::PathBuf,
}

/// The fixed-response backend: `GET /.../{n}` answers `n` bytes (at most [`MAX_BODY`]) over
/// plain HTTP/1.1 with keep-alive.
pub struct Backend {
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Backend {
    /// Binds 127.0.0.1:0 and serves until the runtime ends.
    pub async fn start() -> anyhow::Result<Backend> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let body = Bytes::from(vec![b'x'; MAX_BODY]);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let body = body.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let n = req
                            .uri()
                            .path()
                            .rsplit('/')
                            .next()
                            .and_then(|n| n.parse::<usize>().ok())
                            .unwrap_or(0)
                            .min(body.len());
                        let body = body.slice(..n);
                        async move {
                            let mut res = Response::new(Full::new(body));
                            res.headers_mut().insert(
                                hyper::header::CONTENT_TYPE,
                                hyper::header::HeaderValue::from_static("application/octet-stream"),
                            );
                            Ok::<_, Infallible>(res)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Ok(Backend { addr })
    }

    /// The URL of an `n`-byte response.
    pub fn url(&self, n: usize) -> String {
        format!("http://{}/size/{n}", self.addr)
    }
}

/// Relay buffer per direction, as a proxy would size it.
const RELAY_BUFFER: usize = 64 * 1024;

/// The raw TLS byte relay: relay 1 terminates the client's mTLS (like the gateway's internal
/// API) and copies bytes into a TLS connection to relay 2 (mutual TLS, like the agent link),
/// which copies them to the backend. One relay chain per client connection; nothing parsed.
pub struct Relay {
    /// Relay 1's address (the client connects here).
    pub addr: SocketAddr,
}

impl Relay {
    /// Starts both relays in front of `backend`.
    pub async fn start(pki: &Pki, backend: SocketAddr) -> anyhow::Result<Relay> {
        let server_cert = pki.server_cert()?;
        // Relay 2: accepts the inner TLS (client certificate from the agent CA).
        let inner_server = buildplane_pki::mtls_server_config(
            server_cert.clone(),
            pki.agent_ca.cert_pem().as_bytes(),
        )?;
        let inner_listener = TcpListener::bind("127.0.0.1:0").await?;
        let inner_addr = inner_listener.local_addr()?;
        tokio::spawn(relay_hop(
            inner_listener,
            inner_server,
            Upstream::Plain(backend),
        ));
        // Relay 1: terminates the client's mTLS, dials relay 2 over TLS.
        let outer_server =
            buildplane_pki::mtls_server_config(server_cert, pki.internal_ca.cert_pem().as_bytes())?;
        let inner_client = buildplane_pki::client_config(
            pki.server_ca.cert_pem().as_bytes(),
            Some(pki.agent_cert()?),
        )?;
        let outer_listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = outer_listener.local_addr()?;
        tokio::spawn(relay_hop(
            outer_listener,
            outer_server,
            Upstream::Tls {
                addr: inner_addr,
                config: inner_client,
            },
        ));
        Ok(Relay { addr })
    }

    /// The URL of an `n`-byte response through the relay.
    pub fn url(&self, n: usize) -> String {
        format!("https://127.0.0.1:{}/size/{n}", self.addr.port())
    }
}

/// Where a relay hop sends the bytes it accepts.
pub enum Upstream {
    /// Plain TCP (the benches' HTTP backend).
    Plain(SocketAddr),
    /// TLS to `addr` (127.0.0.1), as `config` says (with a client certificate or without).
    Tls {
        /// The next hop.
        addr: SocketAddr,
        /// Its client configuration.
        config: Arc<rustls::ClientConfig>,
    },
}

/// One hop of the raw TLS relay, until the process ends: every connection `listener` accepts
/// is TLS-terminated with `server` and copied, both ways, into a connection to `upstream`.
/// Nothing is parsed. The in-process [`Relay`] is two of these; `buildplane-bench relay-hop`
/// runs one as a process of its own (the CPU bench's floor).
pub async fn relay_hop(
    listener: TcpListener,
    server: Arc<rustls::ServerConfig>,
    upstream: Upstream,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    let upstream = Arc::new(upstream);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let addr = match &*upstream {
                Upstream::Plain(addr) | Upstream::Tls { addr, .. } => *addr,
            };
            let Ok(out) = TcpStream::connect(addr).await else {
                return;
            };
            let _ = out.set_nodelay(true);
            match &*upstream {
                Upstream::Plain(_) => copy_both_ways(tls, out).await,
                Upstream::Tls { config, .. } => {
                    let name = rustls_pki_types::ServerName::from(addr.ip());
                    let connector = tokio_rustls::TlsConnector::from(config.clone());
                    if let Ok(out) = connector.connect(name, out).await {
                        copy_both_ways(tls, out).await;
                    }
                }
            }
        });
    }
}

/// Copies bytes both ways between `a` and `b` until both sides end, [`RELAY_BUFFER`] at a time.
async fn copy_both_ways<A, B>(mut a: A, mut b: B)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _ =
        tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, RELAY_BUFFER, RELAY_BUFFER).await;
}

/// The tunnel: a control-cluster kube-sim with one BuildPlane per protocol, the gateway and
/// two agents (one offering v2, one offering only v1), all in this process.
pub struct Tunnel {
    /// The control cluster.
    pub control: RunningServer,
    /// The gateway.
    pub gateway: RunningGateway,
    /// `https://127.0.0.1:{internal port}`.
    pub internal_base: String,
    agents: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Tunnel {
    /// Starts everything and waits until both agents answer through the gateway.
    pub async fn start(pki: &Pki, backend: &Backend) -> anyhow::Result<Tunnel> {
        let control = Server::start(kube_sim::Config {
            name: "bench-control".into(),
            ..kube_sim::Config::default()
        })
        .await?;
        let client = control.client().await?;
        install_crds(&client).await?;
        create_namespace(&client, NAMESPACE).await?;
        for protocol in [1, 2] {
            let name = plane(protocol);
            apply_build_plane(&client, NAMESPACE, &name, &name, pki.agent_ca.cert_pem()).await?;
        }
        let dir = tempfile::tempdir()?;
        let files = pki.write(dir.path())?;
        let kubeconfig = dir.path().join("control.kubeconfig");
        control.write_kubeconfig(&kubeconfig)?;
        let mut config = GatewayConfig::new(
            Some(kubeconfig),
            (files.server_cert, files.server_key),
            files.internal_ca,
        );
        let localhost = SocketAddr::from(([127, 0, 0, 1], 0));
        config.agent_listen = localhost;
        config.internal_listen = localhost;
        config.health_listen = localhost;
        // Every admission verifies its chain, as in a storm of agents the gateway has not seen
        // since it started (the worst case; a reconnect with a remembered leaf costs less).
        config.verdict_cache_size = 0;
        let gateway = cluster_gateway::start(config).await?;
        let internal_base = format!("https://127.0.0.1:{}", gateway.internal_addr.port());
        let agents = CancellationToken::new();
        let backend_cluster = cluster_agent::BuildCluster::from_config(kube::Config::new(
            format!("http://{}", backend.addr).parse()?,
        ))?;
        for protocol in [1, 2] {
            let mut config = AgentConfig::new(
                format!("wss://127.0.0.1:{}/ws", gateway.agent_addr.port()),
                plane(protocol),
            );
            config.protocol = protocol;
            let agent = Agent::new(
                config,
                backend_cluster.clone(),
                pki.server_ca.cert_pem().as_bytes(),
                pki.agent_cert()?,
            )?;
            tokio::spawn(agent.supervise(agents.clone()));
        }
        let tunnel = Tunnel {
            control,
            gateway,
            internal_base,
            agents,
            _dir: dir,
        };
        let http = pki.http_client()?;
        for protocol in [1, 2] {
            let url = tunnel.url(protocol, 16);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                match crate::fetch(&http, &url).await {
                    Ok(16) => break,
                    res if tokio::time::Instant::now() > deadline => {
                        anyhow::bail!("the v{protocol} agent never answered through {url}: {res:?}")
                    }
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
        Ok(tunnel)
    }

    /// The proxy URL of an `n`-byte response through the agent speaking `protocol`.
    pub fn url(&self, protocol: u16, n: usize) -> String {
        let name = plane(protocol);
        format!(
            "{}/api/proxy/buildplane/{name}/{NAMESPACE}/{name}/k8s/size/{n}",
            self.internal_base
        )
    }

    /// The agent listener's `wss://` URL.
    pub fn agent_url(&self) -> String {
        format!("wss://127.0.0.1:{}/ws", self.gateway.agent_addr.port())
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.agents.cancel();
        self.gateway.shared.shutdown.cancel();
    }
}

/// planeID and BuildPlane name of the agent of [`Replicas`].
const REPLICAS_PLANE: &str = "bench-replicas";

/// N gateway replicas behind balancers, as a Kubernetes Service puts them, with one v2 agent
/// holding a connection to each (it learns N from the 101s and dials through the agents'
/// balancer until it holds every replica); a control-cluster kube-sim of its own, everything
/// in this process. Callers reach the replicas' internal API through a second balancer, so
/// their connections spread over the replicas and each replica routes over its own
/// connection to the agent. Compared with [`Tunnel`], a request crosses two more relays (one
/// before the gateway, one between gateway and agent), whatever N is.
pub struct Replicas {
    /// The control cluster.
    pub control: RunningServer,
    /// The replicas, `gateway-0..`.
    pub gateways: Vec<RunningGateway>,
    /// In front of the replicas' agent listeners.
    pub agent_balancer: crate::Balancer,
    /// In front of the replicas' internal APIs.
    pub internal_balancer: crate::Balancer,
    agents: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Replicas {
    /// Starts `n` replicas and the agent; waits until the agent holds every replica and each
    /// replica answers through it.
    pub async fn start(pki: &Pki, backend: &Backend, n: u32) -> anyhow::Result<Replicas> {
        anyhow::ensure!(n >= 1, "at least one replica");
        let control = Server::start(kube_sim::Config {
            name: format!("bench-replicas-{n}"),
            ..kube_sim::Config::default()
        })
        .await?;
        let client = control.client().await?;
        install_crds(&client).await?;
        create_namespace(&client, NAMESPACE).await?;
        apply_build_plane(
            &client,
            NAMESPACE,
            REPLICAS_PLANE,
            REPLICAS_PLANE,
            pki.agent_ca.cert_pem(),
        )
        .await?;
        let dir = tempfile::tempdir()?;
        let files = pki.write(dir.path())?;
        let kubeconfig = dir.path().join("control.kubeconfig");
        control.write_kubeconfig(&kubeconfig)?;
        let localhost = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut gateways = Vec::new();
        for i in 0..n {
            let mut config = GatewayConfig::new(
                Some(kubeconfig.clone()),
                (files.server_cert.clone(), files.server_key.clone()),
                files.internal_ca.clone(),
            );
            config.agent_listen = localhost;
            config.internal_listen = localhost;
            config.health_listen = localhost;
            // As the single gateway of `Tunnel`.
            config.verdict_cache_size = 0;
            config.replica = cluster_gateway::Replica {
                id: format!("gateway-{i}"),
                count: n,
            };
            gateways.push(cluster_gateway::start(config).await?);
        }
        let agent_balancer =
            crate::Balancer::start(localhost, gateways.iter().map(|g| g.agent_addr).collect())
                .await?;
        let internal_balancer = crate::Balancer::start(
            localhost,
            gateways.iter().map(|g| g.internal_addr).collect(),
        )
        .await?;
        let agents = CancellationToken::new();
        let backend_cluster = cluster_agent::BuildCluster::from_config(kube::Config::new(
            format!("http://{}", backend.addr).parse()?,
        ))?;
        let mut config = AgentConfig::new(
            format!("wss://127.0.0.1:{}/ws", agent_balancer.addr.port()),
            REPLICAS_PLANE,
        );
        config.protocol = 2;
        let agent = Agent::new(
            config,
            backend_cluster,
            pki.server_ca.cert_pem().as_bytes(),
            pki.agent_cert()?,
        )?;
        tokio::spawn(agent.clone().supervise(agents.clone()));
        let replicas = Replicas {
            control,
            gateways,
            agent_balancer,
            internal_balancer,
            agents,
            _dir: dir,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while agent.held_replicas().len() < n as usize {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the agent holds {:?}, not all {n} replicas, after 60 s",
                agent.held_replicas()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Each replica routes to the agent over its own connection.
        let http = pki.http_client()?;
        for gateway in &replicas.gateways {
            let url = replicas.url_at(gateway.internal_addr, 16);
            loop {
                match crate::fetch(&http, &url).await {
                    Ok(16) => break,
                    res if tokio::time::Instant::now() > deadline => {
                        anyhow::bail!("{url} never answered through the agent: {res:?}")
                    }
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
        Ok(replicas)
    }

    /// The proxy URL of an `n`-byte response, through the internal API's balancer.
    pub fn url(&self, n: usize) -> String {
        self.url_at(self.internal_balancer.addr, n)
    }

    fn url_at(&self, internal: SocketAddr, n: usize) -> String {
        format!(
            "https://127.0.0.1:{}/api/proxy/buildplane/{REPLICAS_PLANE}/{NAMESPACE}/{REPLICAS_PLANE}/k8s/size/{n}",
            internal.port()
        )
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        self.agents.cancel();
        for gateway in &self.gateways {
            gateway.shared.shutdown.cancel();
        }
    }
}

/// planeID, BuildPlane name of the agent speaking `protocol`.
pub fn plane(protocol: u16) -> String {
    format!("bench-v{protocol}")
}

/// Installs the BuildPlane and ClusterBuildPlane CRDs.
pub async fn install_crds(client: &kube::Client) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in buildplane_api::crds() {
        crds.create(&PostParams::default(), &crd)
            .await
            .context("creating a CRD")?;
    }
    Ok(())
}

/// Creates a namespace (an existing one is fine).
pub async fn create_namespace(client: &kube::Client, name: &str) -> anyhow::Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(err) => Err(err).context("creating a namespace"),
    }
}

/// Applies a BuildPlane trusting the inline `ca_pem`.
pub async fn apply_build_plane(
    client: &kube::Client,
    ns: &str,
    name: &str,
    plane_id: &str,
    ca_pem: &str,
) -> anyhow::Result<()> {
    let api: Api<BuildPlane> = Api::namespaced(client.clone(), ns);
    let mut bp = BuildPlane::new(
        name,
        BuildPlaneSpec {
            plane_id: Some(plane_id.into()),
            cluster_agent: ClusterAgentConfig {
                client_ca: ValueFrom {
                    secret_ref: None,
                    value: Some(ca_pem.into()),
                },
            },
            secret_store_ref: None,
            observability_plane_ref: None,
        },
    );
    bp.metadata.namespace = Some(ns.into());
    api.patch(
        name,
        &PatchParams::apply("buildplane-bench").force(),
        &Patch::Apply(&bp),
    )
    .await
    .with_context(|| format!("applying BuildPlane {ns}/{name}"))?;
    Ok(())
}
