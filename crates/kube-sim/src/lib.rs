//! kube-sim: an embedded Kubernetes API server that `kubectl` and kube-rs talk to like a real one.
//!
//! It serves HTTPS with a generated CA and a bearer token, discovery and OpenAPI documents, the
//! built-in kinds the BuildPlane system uses, and CustomResourceDefinitions (with schema and CEL
//! enforcement); it watches with resourceVersions, bookmarks and 410 Gone; with a data directory,
//! every acknowledged write survives `kill -9` (an fsynced append-only log).
//!
//! ```no_run
//! # async fn demo() -> Result<(), kube_sim::Error> {
//! let server = kube_sim::Server::start(kube_sim::Config::default()).await?;
//! server.write_kubeconfig("/tmp/kubeconfig".as_ref())?;
//! # Ok(()) }
//! ```

pub mod api;
pub mod apiservices;
pub mod client_certs;
pub mod component_status;
pub mod discovery;
pub mod error;
pub mod events;
pub mod kinds;
pub mod managed;
pub mod protobuf;
pub mod scale;
pub mod schema;
pub mod selector;
pub mod server;
pub mod store;
pub mod strategic;
pub mod table;
pub mod tokens;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use base64::Engine as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use thiserror::Error;
use tokio::{net::TcpListener, sync::broadcast};
use tracing::{debug, info};

pub use server::Faults;
use server::Shared;
use store::Store;

/// Failures starting a server.
#[derive(Debug, Error)]
pub enum Error {
    /// Binding, reading or writing files.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Generating or loading the serving certificate.
    #[error("serving certificate: {0}")]
    Tls(String),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// How to start a server.
#[derive(Debug, Clone)]
pub struct Config {
    /// Cluster, context and user name in the kubeconfig.
    pub name: String,
    /// Listen address; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Directory for the durable log, certificates and token; in memory when `None`.
    pub data_dir: Option<PathBuf>,
    /// How the written kubeconfig's user authenticates (the bearer token unless asked).
    pub kubeconfig_auth: KubeconfigAuth,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            name: "kube-sim".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: None,
            kubeconfig_auth: KubeconfigAuth::Token,
        }
    }
}

/// The credential of the admin kubeconfig kube-sim writes. Both are always accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KubeconfigAuth {
    /// kube-sim's bearer token (user `kube-sim:admin`).
    #[default]
    Token,
    /// The admin client certificate (`CN=kubernetes-admin`, `O=system:masters`, as kubeadm, kind
    /// and k3d write it), issued by kube-sim's client CA.
    ClientCertificate,
}

/// The server's identity: CA, serving certificate, token, and the client CA with the admin's
/// client certificate (persisted in the data directory).
struct Identity {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
    token: String,
    clients: client_certs::ClientCa,
}

impl Identity {
    fn load_or_generate(data_dir: Option<&Path>) -> Result<Self, Error> {
        if let Some(dir) = data_dir {
            let files = ["ca.crt", "tls.crt", "tls.key", "token"].map(|f| dir.join(f));
            if files.iter().all(|f| f.exists()) {
                let read = |p: &PathBuf| {
                    std::fs::read_to_string(p).map_err(io(format!("reading {}", p.display())))
                };
                return Ok(Self {
                    ca_pem: read(&files[0])?,
                    cert_pem: read(&files[1])?,
                    key_pem: read(&files[2])?,
                    token: read(&files[3])?.trim().to_owned(),
                    clients: client_certs::ClientCa::load_or_generate(Some(dir))?,
                });
            }
        }
        let identity = Self::generate(data_dir)?;
        if let Some(dir) = data_dir {
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
            for (file, text) in [
                ("ca.crt", &identity.ca_pem),
                ("tls.crt", &identity.cert_pem),
                ("tls.key", &identity.key_pem),
                ("token", &identity.token),
            ] {
                std::fs::write(dir.join(file), text).map_err(io(format!("writing {file}")))?;
            }
        }
        Ok(identity)
    }

    fn generate(data_dir: Option<&Path>) -> Result<Self, Error> {
        let tls = |e: rcgen::Error| Error::Tls(e.to_string());
        let ca_key = rcgen::KeyPair::generate().map_err(tls)?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(tls)?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kube-sim CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).map_err(tls)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().map_err(tls)?;
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "kube-sim".to_owned()])
                .map_err(tls)?;
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kube-sim");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &issuer).map_err(tls)?;
        let token: String = (0..32)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect();
        Ok(Self {
            ca_pem: ca_cert.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            token,
            clients: client_certs::ClientCa::load_or_generate(data_dir)?,
        })
    }

    fn server_config(
        &self,
        clients: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    ) -> Result<Arc<rustls::ServerConfig>, Error> {
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| Error::Tls(e.to_string()))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| Error::Tls(e.to_string()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_client_cert_verifier(clients)
            .with_single_cert(certs, key)
            .map_err(|e| Error::Tls(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// The file of a data directory that remembers the address chosen for `--listen ...:0`.
const LISTEN_FILE: &str = "listen";

/// Binds the listener: with a data directory and port 0, the port of the previous run is reused
/// (so the kubeconfig stays valid); a port still held by the previous process is retried for
/// up to 10 s.
async fn bind(config: &Config) -> Result<TcpListener, Error> {
    let mut addr = config.listen;
    if addr.port() == 0
        && let Some(dir) = &config.data_dir
        && let Ok(text) = std::fs::read_to_string(dir.join(LISTEN_FILE))
        && let Ok(previous) = text.trim().parse::<SocketAddr>()
        && previous.ip() == addr.ip()
    {
        addr = previous;
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => return Ok(listener),
            Err(err)
                if err.kind() == std::io::ErrorKind::AddrInUse
                    && addr.port() != 0
                    && tokio::time::Instant::now() < deadline =>
            {
                debug!(%addr, "address in use; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(err) => {
                return Err(Error::Io {
                    context: format!("binding {addr}"),
                    source: err,
                });
            }
        }
    }
}

/// Starts servers.
pub struct Server;

/// Pause after a failed accept (EMFILE, ENFILE, ECONNABORTED), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

impl Server {
    /// Starts a server and returns once it accepts connections.
    pub async fn start(config: Config) -> Result<RunningServer, Error> {
        let identity = Identity::load_or_generate(config.data_dir.as_deref())?;
        let store = Store::open(config.data_dir.as_deref()).map_err(io("opening the store"))?;
        let listener = bind(&config).await?;
        let addr = listener
            .local_addr()
            .map_err(io("reading the bound address"))?;
        if let Some(dir) = &config.data_dir {
            std::fs::write(dir.join(LISTEN_FILE), addr.to_string())
                .map_err(io("writing the listen address"))?;
        }
        let verifier = identity.clients.verifier()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(
            identity.server_config(Arc::new(client_certs::AnyClientCert::new(verifier.clone())))?,
        );
        let (close_watches, _) = broadcast::channel(4);
        let shared = Arc::new(Shared {
            store: Mutex::new(store),
            token: identity.token.clone(),
            faults: Mutex::new(Faults::default()),
            close_watches,
            tokens: tokens::Tokens::new(&identity.token),
        });
        let (shutdown_tx, mut shutdown_rx) = tokio::sync::watch::channel(false);
        let task_shared = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        // Out of file descriptors (EMFILE) fails every accept at once until
                        // one is freed: back off instead of spinning on the error.
                        Err(err) => {
                            debug!(%err, "accept failed");
                            tokio::time::sleep(ACCEPT_BACKOFF).await;
                            continue;
                        }
                    },
                    _ = shutdown_rx.changed() => return,
                };
                let acceptor = acceptor.clone();
                let verifier = verifier.clone();
                let shared = task_shared.clone();
                let mut shutdown_rx = shutdown_rx.clone();
                tokio::spawn(async move {
                    let tls = match acceptor.accept(tcp).await {
                        Ok(tls) => tls,
                        Err(err) => {
                            debug!(%err, %peer, "TLS handshake failed");
                            return;
                        }
                    };
                    // The user of a client certificate chained to the client CA, once per
                    // connection; an untrusted one counts as none (a token may still do).
                    let client = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| client_certs::user_of(verifier.as_ref(), chain))
                        .map(Arc::new);
                    let service = hyper::service::service_fn(move |req| {
                        server::handle(shared.clone(), req, client.clone())
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection(TokioIo::new(tls), service);
                    tokio::select! {
                        res = conn => { if let Err(err) = res { debug!(%err, %peer, "connection ended with an error"); } }
                        _ = shutdown_rx.changed() => {}
                    }
                });
            }
        });
        info!(%addr, name = %config.name, "kube-sim listening");
        Ok(RunningServer {
            addr,
            name: config.name,
            kubeconfig_auth: config.kubeconfig_auth,
            identity,
            shared,
            shutdown: shutdown_tx,
            task,
        })
    }
}

/// A running server.
pub struct RunningServer {
    addr: SocketAddr,
    name: String,
    kubeconfig_auth: KubeconfigAuth,
    identity: Identity,
    shared: Arc<Shared>,
    shutdown: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningServer {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The serving CA (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.identity.ca_pem
    }

    /// The bearer token.
    pub fn token(&self) -> &str {
        &self.identity.token
    }

    /// The client CA (PEM) that client certificates must chain to.
    pub fn client_ca_pem(&self) -> &str {
        &self.identity.clients.ca_pem
    }

    /// The admin client certificate (PEM): `CN=kubernetes-admin`, `O=system:masters`.
    pub fn admin_certificate_pem(&self) -> &str {
        &self.identity.clients.admin_cert_pem
    }

    /// The admin client certificate's private key (PEM).
    pub fn admin_key_pem(&self) -> &str {
        &self.identity.clients.admin_key_pem
    }

    /// A kubeconfig selecting this server (cluster, context and user named after the server),
    /// with the credential chosen in [`Config::kubeconfig_auth`].
    pub fn kubeconfig_yaml(&self) -> String {
        self.kubeconfig_yaml_with(self.kubeconfig_auth)
    }

    /// A kubeconfig selecting this server with the given credential.
    pub fn kubeconfig_yaml_with(&self, auth: KubeconfigAuth) -> String {
        let b64 = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
        let ca = b64(&self.identity.ca_pem);
        let name = &self.name;
        let user = match auth {
            KubeconfigAuth::Token => format!("    token: {}\n", self.identity.token),
            KubeconfigAuth::ClientCertificate => format!(
                "    client-certificate-data: {}\n    client-key-data: {}\n",
                b64(&self.identity.clients.admin_cert_pem),
                b64(&self.identity.clients.admin_key_pem)
            ),
        };
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: {name}\n  cluster:\n    server: {url}\n    certificate-authority-data: {ca}\ncontexts:\n- name: {name}\n  context:\n    cluster: {name}\n    user: {name}\n    namespace: default\ncurrent-context: {name}\nusers:\n- name: {name}\n  user:\n{user}",
            url = self.url(),
        )
    }

    /// Writes the kubeconfig atomically (readers never see a partial file).
    pub fn write_kubeconfig(&self, path: &Path) -> Result<(), Error> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, self.kubeconfig_yaml())
            .map_err(io(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, path).map_err(io(format!("renaming to {}", path.display())))
    }

    /// A kube-rs client for this server.
    pub async fn client(&self) -> Result<kube::Client, kube::Error> {
        kube::Client::try_from(self.client_config().await?)
    }

    /// The kubeconfig YAML (same as [`RunningServer::kubeconfig_yaml`]).
    pub fn kubeconfig(&self) -> String {
        self.kubeconfig_yaml()
    }

    /// A kube-rs client configuration for this server.
    pub async fn client_config(&self) -> Result<kube::Config, kube::Error> {
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&self.kubeconfig_yaml())
            .map_err(kube::Error::InferKubeconfig)?;
        kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .map_err(kube::Error::InferKubeconfig)
    }

    /// The fault-injection handle (also reachable over HTTPS under `/_sim/`).
    pub fn faults(&self) -> FaultHandle {
        FaultHandle {
            shared: self.shared.clone(),
        }
    }

    /// Sets the injected faults.
    pub fn set_faults(&self, faults: Faults) {
        self.faults().set(faults);
    }

    /// Ends every open watch (clients reconnect).
    pub fn close_watches(&self) {
        self.faults().close_watches();
    }

    /// Forgets the watch history: watches resuming from older versions get 410 Gone.
    pub fn compact(&self) {
        self.faults().compact();
    }

    /// Stops accepting and closes every connection.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.shared.close_watches.send(());
        let _ = self.task.await;
    }
}

/// Injects faults into a running server.
#[derive(Clone)]
pub struct FaultHandle {
    shared: Arc<Shared>,
}

impl FaultHandle {
    /// Sets the injected faults (latency, error responses for a fraction of requests).
    pub fn set(&self, faults: Faults) {
        *self.shared.faults.lock() = faults;
    }

    /// Removes every injected fault.
    pub fn clear(&self) {
        self.set(Faults::default());
    }

    /// The faults in force.
    pub fn current(&self) -> Faults {
        self.shared.faults.lock().clone()
    }

    /// Ends every open watch (clients reconnect); returns how many watch streams were told.
    pub fn close_watches(&self) -> usize {
        self.shared.close_watches.send(()).unwrap_or(0)
    }

    /// Forgets the watch history: watches resuming from older versions get 410 Gone.
    pub fn compact(&self) {
        if let Err(err) = self.shared.store.lock().compact() {
            tracing::warn!(%err, "compacting the history");
        }
    }
}
