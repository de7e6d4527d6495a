//! Shared test helpers: servers, the committed BuildPlane CRDs, kube-rs dynamic APIs and kubectl.
#![allow(dead_code, unreachable_pub)]

use std::{path::Path, process::Output};

use k8s_openapi::{
    api::core::v1::Namespace,
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, ObjectMeta, PostParams},
};
use kube_sim::{Config, RunningServer, Server};
use tempfile::TempDir;

/// The repository root (kubectl runs there, so manifests use repository paths).
pub fn repo_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// The committed CRDs (generated from crates/api), or this crate's fixture copy.
pub fn crd_dir() -> &'static str {
    if repo_root()
        .join("k3d/manifests/crds/openchoreo.dev_buildplanes.yaml")
        .exists()
    {
        "k3d/manifests/crds/"
    } else {
        "crates/kube-sim/tests/fixtures/crds/"
    }
}

/// The CRDs as typed objects.
pub fn crds() -> Vec<CustomResourceDefinition> {
    let dir = repo_root().join(crd_dir());
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("CRD directory")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| {
            serde_yaml::from_str(&std::fs::read_to_string(p).expect("read CRD")).expect("CRD YAML")
        })
        .collect()
}

/// `openchoreo.dev/v1alpha1` BuildPlane.
pub fn build_planes() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("openchoreo.dev", "v1alpha1", "BuildPlane"),
        "buildplanes",
    )
}

/// Which server the tests run against: kube-sim in memory (the default), or with
/// `KUBE_SIM_TESTS_AGAINST=apiserver` a real kube-apiserver (etcd, kube-apiserver and
/// kube-controller-manager from `cargo xtask peers build`), so the same checks hold kube-sim to
/// the real server. CI runs both.
pub const AGAINST_ENV: &str = "KUBE_SIM_TESTS_AGAINST";

/// The server under test.
pub enum TestServer {
    /// kube-sim in this process.
    Sim(RunningServer),
    /// A real cluster as local processes.
    Real(buildplane_peers::LocalCluster),
}

impl TestServer {
    /// A client as the cluster's admin.
    pub async fn client(&self) -> Result<Client, String> {
        match self {
            TestServer::Sim(server) => server.client().await.map_err(|e| e.to_string()),
            TestServer::Real(cluster) => cluster.client().await.map_err(|e| e.to_string()),
        }
    }

    /// Writes an admin kubeconfig.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<(), String> {
        match self {
            TestServer::Sim(server) => server.write_kubeconfig(path).map_err(|e| e.to_string()),
            TestServer::Real(cluster) => cluster.write_kubeconfig(path).map_err(|e| e.to_string()),
        }
    }

    /// The admin kubeconfig (YAML).
    pub fn kubeconfig_yaml(&self) -> String {
        match self {
            TestServer::Sim(server) => server.kubeconfig_yaml(),
            TestServer::Real(cluster) => cluster.kubeconfig_yaml(),
        }
    }

    /// The admin kubeconfig whose user authenticates with a client certificate (the real
    /// cluster's own, as kubeadm writes `admin.conf`; kube-sim's with its admin certificate).
    pub fn cert_kubeconfig_yaml(&self) -> String {
        match self {
            TestServer::Sim(server) => {
                server.kubeconfig_yaml_with(kube_sim::KubeconfigAuth::ClientCertificate)
            }
            TestServer::Real(cluster) => cluster.kubeconfig_yaml(),
        }
    }

    /// Whether this is the real server.
    pub fn is_real(&self) -> bool {
        matches!(self, TestServer::Real(_))
    }

    /// Stops the server.
    pub async fn shutdown(self) {
        match self {
            TestServer::Sim(server) => server.shutdown().await,
            TestServer::Real(cluster) => cluster.shutdown().await,
        }
    }
}

/// Starts the server under test (see [`AGAINST_ENV`]).
pub async fn start() -> TestServer {
    match std::env::var(AGAINST_ENV).as_deref() {
        Ok("apiserver") => TestServer::Real(
            buildplane_peers::LocalCluster::start("kube-sim-tests")
                .await
                .expect("a real cluster starts"),
        ),
        Ok("") | Ok("kube-sim") | Err(_) => TestServer::Sim(start_sim().await),
        Ok(other) => panic!("{AGAINST_ENV}={other}: expected `apiserver` or `kube-sim`"),
    }
}

/// Starts kube-sim in memory (tests of kube-sim itself: faults, data directory).
pub async fn start_sim() -> RunningServer {
    Server::start(Config::default())
        .await
        .expect("kube-sim starts")
}

/// Installs the CRDs, waits until they are established (a real server serves a new CRD's
/// resources only then), and creates namespace `org`; returns a client.
pub async fn with_crds(server: &TestServer) -> Client {
    let client = server.client().await.expect("client");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in self::crds() {
        crds.create(&PostParams::default(), &crd)
            .await
            .expect("CRD created");
        let name = crd.metadata.name.clone().unwrap_or_default();
        let established = kube::runtime::wait::await_condition(
            crds.clone(),
            &name,
            kube::runtime::wait::conditions::is_crd_established(),
        );
        tokio::time::timeout(std::time::Duration::from_secs(30), established)
            .await
            .expect("CRD established within 30 s")
            .expect("CRD watch");
    }
    create_namespace(&client, "org").await;
    client
}

/// Creates a namespace.
pub async fn create_namespace(client: &Client, name: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace created");
}

/// A BuildPlane with an inline CA.
pub fn build_plane(name: &str, plane_id: &str) -> DynamicObject {
    let mut object = DynamicObject::new(name, &build_planes());
    object.data = serde_json::json!({"spec": {"planeID": plane_id, "clusterAgent": {"clientCA": {"value": "pem"}}}});
    object
}

/// The BuildPlane API in namespace `org`.
pub fn bp_api(client: &Client) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), "org", &build_planes())
}

/// A kubectl runner against one server, with its own discovery cache.
pub struct Kubectl {
    pub dir: TempDir,
}

impl Kubectl {
    /// Writes the server's kubeconfig into a fresh directory.
    pub fn new(server: &TestServer) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        server
            .write_kubeconfig(&dir.path().join("kubeconfig"))
            .expect("kubeconfig written");
        Self { dir }
    }

    /// Writes the given kubeconfig into a fresh directory.
    pub fn with_kubeconfig(yaml: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("kubeconfig"), yaml).expect("kubeconfig written");
        Self { dir }
    }

    /// Runs kubectl with optional stdin.
    pub async fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        use tokio::io::AsyncWriteExt as _;
        let mut command = tokio::process::Command::new("kubectl");
        command
            .arg("--kubeconfig")
            .arg(self.dir.path().join("kubeconfig"))
            .arg("--cache-dir")
            .arg(self.dir.path().join("cache"))
            .args(args)
            .current_dir(repo_root())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = command.spawn().expect("kubectl is installed");
        let mut input = child.stdin.take().expect("stdin piped");
        if let Some(text) = stdin {
            input
                .write_all(text.as_bytes())
                .await
                .expect("stdin written");
        }
        drop(input);
        child.wait_with_output().await.expect("kubectl ran")
    }

    /// Runs kubectl and returns stdout, failing the test with stderr when it fails.
    pub async fn ok(&self, args: &[&str]) -> String {
        self.ok_with(args, None).await
    }

    /// Like [`Kubectl::ok`] with stdin.
    pub async fn ok_with(&self, args: &[&str], stdin: Option<&str>) -> String {
        let output = self.run(args, stdin).await;
        assert!(
            output.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Runs kubectl expecting failure; returns stderr.
    pub async fn fails(&self, args: &[&str], stdin: Option<&str>) -> String {
        let output = self.run(args, stdin).await;
        assert!(
            !output.status.success(),
            "kubectl {args:?} should have failed: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        String::from_utf8_lossy(&output.stderr).into_owned()
    }

    /// The kubeconfig path.
    pub fn kubeconfig(&self) -> std::path::PathBuf {
        self.dir.path().join("kubeconfig")
    }
}

/// The header row of `kubectl get` output, split into columns.
pub fn header(table: &str) -> Vec<String> {
    table
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}
